"""focal-kernels: fused Triton kernels for preference optimization (FocalPO; gamma = 0 is DPO).

Three layers: the log-prob primitive (`focal_kernels.logprobs`: logits or hidden states, padded or packed),
the pair losses on (B,) log-probs (`focal_kernels.losses`), and the trainer integrations
(`focal_kernels.integrations`, imported on demand). The fused entry points compose the first two.
"""

from . import reference
from .fused_losses import FocalPOLoss, FusedLinearFocalPOLoss, focal_po_loss, fused_linear_focal_po_loss
from .logprobs import (TokenLogps, cu_seqlens_from_position_ids, fused_linear_sequence_logps,
                       fused_linear_token_logps, logit_options_from_config, sequence_logps, shift_packed_labels)
from .losses import LOSS_TYPES, PreferenceLoss, preference_loss
from .output import PreferenceLossOutput

__version__ = "0.2.0"

__all__ = [
    "FocalPOLoss",
    "FusedLinearFocalPOLoss",
    "LOSS_TYPES",
    "PreferenceLoss",
    "PreferenceLossOutput",
    "TokenLogps",
    "cu_seqlens_from_position_ids",
    "focal_po_loss",
    "fused_linear_focal_po_loss",
    "fused_linear_sequence_logps",
    "fused_linear_token_logps",
    "logit_options_from_config",
    "preference_loss",
    "reference",
    "sequence_logps",
    "shift_packed_labels",
]
