"""The log-prob primitive: the only layer that touches vocabulary-sized data.

Per-sequence (and per-token) log-probs from logits (`sequence_logps`) or from hidden states and an lm_head
weight (`fused_linear_sequence_logps`, `fused_linear_token_logps`), padded or packed (`cu_seqlens`).
"""

from .linear import (TokenLogps, fused_linear_sequence_logps, fused_linear_token_logps,
                     logit_options_from_config)
from .logits import sequence_logps
from .packing import cu_seqlens_from_position_ids, shift_packed_labels

__all__ = ["TokenLogps", "cu_seqlens_from_position_ids", "fused_linear_sequence_logps", "fused_linear_token_logps",
           "logit_options_from_config", "sequence_logps", "shift_packed_labels"]
