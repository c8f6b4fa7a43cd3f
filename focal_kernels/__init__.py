"""focal-kernels: fused Triton loss kernels for preference optimization (FocalPO; gamma = 0 is DPO)."""

from . import reference
from .loss import FocalPOLoss, focal_po_loss, sequence_logps
from .output import PreferenceLossOutput

__version__ = "0.1.0"

__all__ = [
    "FocalPOLoss",
    "PreferenceLossOutput",
    "focal_po_loss",
    "reference",
    "sequence_logps",
]
