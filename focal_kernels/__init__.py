"""focal-kernels: fused Triton loss kernels for preference optimization (FocalPO; gamma = 0 is DPO)."""

from . import reference
from .fused_linear import FusedLinearFocalPOLoss, fused_linear_focal_po_loss, fused_linear_sequence_logps
from .loss import FocalPOLoss, focal_po_loss, sequence_logps
from .output import PreferenceLossOutput

__version__ = "0.1.0"

__all__ = [
    "FocalPOLoss",
    "FusedLinearFocalPOLoss",
    "PreferenceLossOutput",
    "focal_po_loss",
    "fused_linear_focal_po_loss",
    "fused_linear_sequence_logps",
    "reference",
    "sequence_logps",
]
