"""The public API of the logit-free path: FocalPO from final hidden states and the lm_head weight.

`fused_linear_focal_po_loss` and `FusedLinearFocalPOLoss` give what `focal_po_loss` gives on the logits
hidden · Wᵀ + bias, and `fused_linear_sequence_logps` the (B,) log-probs (for a reference model, say),
without ever materializing the logits: fused_linear_autograd.py holds the design and its memory account.
Here: validation, and autocast (the inputs are cast to the autocast dtype first, as `torch.mm` would cast
them for a model's lm_head; float64 is left alone).
"""

from __future__ import annotations

import torch

from .checks import (autocast_dtype, check_chunk_size, check_hidden_and_labels, check_label_values,
                     check_labels_in_range, check_linear, check_loss_options, check_pair_shapes,
                     check_reference_logps)
from .fused_linear_autograd import FusedLinearSequenceLogps
from .loss import PreferenceLossModule, preference_output
from .output import PreferenceLossOutput


def _autocast_inputs(weight, bias, *hiddens):
    """Under autocast on the weight's device, weight, bias and hidden states cast to the autocast dtype as
    `torch.mm` would cast them for a model's lm_head (float64 and non-tensors are left for the checks);
    the casts are differentiable, so gradients reach the originals in their own dtype. Unchanged otherwise."""
    tensors = (weight, bias, *hiddens)
    dtype = autocast_dtype(weight.device) if isinstance(weight, torch.Tensor) else None
    if dtype is None:
        return tensors
    castable = (torch.float32, torch.bfloat16, torch.float16)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in castable else t for t in tensors)


def fused_linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                bias: torch.Tensor | None = None, ignore_index: int = -100,
                                chunk_size: int | None = None) -> torch.Tensor:
    """(B,) Σ_t log softmax(hidden[b, t] · Wᵀ + bias)[labels[b, t]] over the tokens not labelled ignore_index.

    hidden (B, T, H) and weight (V, H) of one dtype (float32/bfloat16/float16/float64), bias (V,) or None,
    labels (B, T) int64/int32 aligned with hidden. The logits are never materialized: the vocabulary is
    processed chunk_size rows at a time (None: chosen from the shapes, see `default_chunk_size`). Returns
    float32 (float64 for float64), differentiable with respect to hidden, weight and bias.
    """
    weight, bias, hidden = _autocast_inputs(weight, bias, hidden)
    check_linear(weight, bias)
    check_hidden_and_labels(hidden, labels, weight, ignore_index=ignore_index, check_values=False)
    chunk_size = check_chunk_size(chunk_size)
    check_label_values(labels, weight.shape[0], ignore_index=ignore_index)
    (logps,) = FusedLinearSequenceLogps.apply(weight, bias, ignore_index, chunk_size, hidden, labels)
    return logps


def fused_linear_focal_po_loss(chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
                               chosen_labels: torch.Tensor, rejected_labels: torch.Tensor,
                               ref_chosen_logps: torch.Tensor | None = None,
                               ref_rejected_logps: torch.Tensor | None = None,
                               *, bias: torch.Tensor | None = None, beta: float = 0.1, gamma: float = 0.05,
                               ignore_index: int = -100, reduction: str = "mean", detach_focal_weight: bool = False,
                               chunk_size: int | None = None) -> PreferenceLossOutput:
    """`focal_po_loss` on the logits hidden · Wᵀ + bias, without ever materializing them.

    chosen_hidden (B, T, H) and rejected_hidden (B, T2, H): final hidden states aligned with chosen_labels
    (B, T) and rejected_labels (B, T2) (shift before calling: `hidden[:, :-1]` with `labels[:, 1:]`).
    weight (V, H) the lm_head weight, bias (V,) or None. chunk_size: vocabulary rows per chunk (None: from
    the shapes). The other arguments and the output are those of `focal_po_loss`; gradients reach both
    hidden states, the weight and the bias.
    """
    weight, bias, chosen_hidden, rejected_hidden = _autocast_inputs(weight, bias, chosen_hidden, rejected_hidden)
    check_linear(weight, bias)
    check_hidden_and_labels(chosen_hidden, chosen_labels, weight, hidden_name="chosen_hidden",
                            labels_name="chosen_labels", ignore_index=ignore_index, check_values=False)
    check_hidden_and_labels(rejected_hidden, rejected_labels, weight, hidden_name="rejected_hidden",
                            labels_name="rejected_labels", ignore_index=ignore_index, check_values=False)
    check_pair_shapes(chosen_hidden.shape, rejected_hidden.shape, chosen_hidden.device, rejected_hidden.device,
                      what="hidden")
    check_reference_logps(ref_chosen_logps, ref_rejected_logps, chosen_hidden.shape[0], chosen_hidden.device,
                          what="hidden states")
    check_loss_options(beta=beta, gamma=gamma, reduction=reduction, detach_focal_weight=detach_focal_weight)
    chunk_size = check_chunk_size(chunk_size)
    check_labels_in_range([(chosen_labels, "chosen_labels"), (rejected_labels, "rejected_labels")],
                          weight.shape[0], ignore_index=ignore_index)
    chosen_logps, rejected_logps = FusedLinearSequenceLogps.apply(
        weight, bias, ignore_index, chunk_size, chosen_hidden, chosen_labels, rejected_hidden, rejected_labels)
    return preference_output(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                             beta=beta, gamma=gamma, reduction=reduction, detach_focal_weight=detach_focal_weight)


class FusedLinearFocalPOLoss(PreferenceLossModule):
    """Module form of `fused_linear_focal_po_loss`: the options at construction, the tensors (the lm_head's
    weight and bias included) at call."""

    def __init__(self, *, beta: float = 0.1, gamma: float = 0.05, ignore_index: int = -100,
                 reduction: str = "mean", detach_focal_weight: bool = False, chunk_size: int | None = None):
        super().__init__(beta=beta, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
                         detach_focal_weight=detach_focal_weight, chunk_size=chunk_size)

    def forward(self, chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                ref_chosen_logps=None, ref_rejected_logps=None, bias=None) -> PreferenceLossOutput:
        return fused_linear_focal_po_loss(chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                                          ref_chosen_logps, ref_rejected_logps, bias=bias, **self.options)
