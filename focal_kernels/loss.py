"""The public API on logits: `sequence_logps`, `focal_po_loss` and the `FocalPOLoss` module."""

from __future__ import annotations

import torch

from . import backend, reference
from .checks import (check_flag, check_inplace_target, check_inplace_targets_disjoint, check_logits_and_labels,
                     check_pair, reduce_loss)
from .output import PreferenceLossOutput


def _last_dim_contiguous(logits, inplace_backward):
    """The kernels read rows with unit stride: any other last-dimension stride is copied once."""
    if inplace_backward:
        check_inplace_target(logits)
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _output(per_pair, reduction, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards):
    return PreferenceLossOutput(loss=reduce_loss(per_pair, reduction), chosen_logps=chosen_logps,
                                rejected_logps=rejected_logps, chosen_rewards=chosen_rewards,
                                rejected_rewards=rejected_rewards)


def preference_output(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, gamma,
                      reduction, detach_focal_weight):
    """The loss and logged quantities from differentiable per-sequence log-probs (the hidden-state path)."""
    if backend.use_triton(chosen_logps):
        from .autograd import FocalPOPairLoss

        per_pair, chosen_rewards, rejected_rewards = FocalPOPairLoss.apply(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
            float(beta), float(gamma), detach_focal_weight)
    else:
        per_pair = reference.focal_po_pair_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                                beta=beta, gamma=gamma, detach_focal_weight=detach_focal_weight)
        chosen_rewards = reference.rewards(chosen_logps, ref_chosen_logps, beta)
        rejected_rewards = reference.rewards(rejected_logps, ref_rejected_logps, beta)
    return _output(per_pair, reduction, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                   inplace_backward: bool = False) -> torch.Tensor:
    """(B,) Σ_t log softmax(logits[b, t])[labels[b, t]] over tokens whose label is not ignore_index.

    logits (B, T, V) float32/bfloat16/float16/float64, any batch and time strides (a shifted view such as
    `logits[:, :-1]` is read without a copy); labels (B, T) int64/int32. Returns float32 (float64 for
    float64 logits), differentiable. With inplace_backward=True the backward writes the gradient into the
    logits' own storage: the logits are consumed and must not be used afterwards.
    """
    check_logits_and_labels(logits, labels, ignore_index=ignore_index)
    check_flag(inplace_backward, "inplace_backward")
    if not backend.use_triton(logits):  # a plain CPU: the spec itself
        return reference.sequence_logps(logits, labels, ignore_index)
    from .autograd import SequenceLogps  # imports triton: only when a kernel runs (see backend.py)

    return SequenceLogps.apply(_last_dim_contiguous(logits, inplace_backward), labels, int(ignore_index),
                               inplace_backward)


def focal_po_loss(chosen_logits: torch.Tensor, rejected_logits: torch.Tensor,
                  chosen_labels: torch.Tensor, rejected_labels: torch.Tensor,
                  ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                  *, beta: float = 0.1, gamma: float = 0.05, ignore_index: int = -100, reduction: str = "mean",
                  detach_focal_weight: bool = False, inplace_backward: bool = False) -> PreferenceLossOutput:
    """FocalPO loss −p^γ·log p, p = σ(β·((logp_c − ref_c) − (logp_r − ref_r))); γ = 0 is DPO.

    chosen_logits (B, T, V) and rejected_logits (B, T2, V), labels (B, T) and (B, T2), aligned with the
    logits (shift before calling: `logits[:, :-1]` with `labels[:, 1:]`). ref_*_logps: (B,) reference-model
    log-probs, or None for reference-free (0). reduction: "mean" | "sum" | "none" (per pair, (B,)).
    detach_focal_weight=True treats p^γ as a constant in the backward. inplace_backward=True writes the
    logits' gradients into the logits' storage (they are consumed).

    Returns PreferenceLossOutput(loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards);
    the loss and both log-probs are differentiable, the rewards β·(logp − ref) are detached.
    """
    check_pair(chosen_logits, rejected_logits, chosen_labels, rejected_labels, ref_chosen_logps, ref_rejected_logps,
               beta=beta, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
               detach_focal_weight=detach_focal_weight)
    check_flag(inplace_backward, "inplace_backward")
    if not backend.use_triton(chosen_logits):  # a plain CPU: the spec itself (inplace_backward has no effect)
        return reference.focal_po_loss(chosen_logits, rejected_logits, chosen_labels, rejected_labels,
                                       ref_chosen_logps, ref_rejected_logps, beta=beta, gamma=gamma,
                                       ignore_index=ignore_index, reduction=reduction,
                                       detach_focal_weight=detach_focal_weight)
    from .autograd import FocalPOFromLogits

    if inplace_backward:
        check_inplace_targets_disjoint(chosen_logits, rejected_logits)

    per_pair, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards = FocalPOFromLogits.apply(
        _last_dim_contiguous(chosen_logits, inplace_backward), _last_dim_contiguous(rejected_logits, inplace_backward),
        chosen_labels, rejected_labels, ref_chosen_logps, ref_rejected_logps,
        float(beta), float(gamma), detach_focal_weight, int(ignore_index), inplace_backward)
    return _output(per_pair, reduction, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards)


class PreferenceLossModule(torch.nn.Module):
    """The options shared by the module forms, kept as attributes (as PyTorch's losses keep `reduction`);
    `options` gathers them for the functional form at each call."""

    def __init__(self, *, beta: float = 0.1, gamma: float = 0.05, ignore_index: int = -100,
                 reduction: str = "mean", detach_focal_weight: bool = False, **extra_options):
        super().__init__()
        given = dict(beta=beta, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
                     detach_focal_weight=detach_focal_weight, **extra_options)
        for name, value in given.items():
            setattr(self, name, value)
        self._option_names = tuple(given)

    @property
    def options(self) -> dict:
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.options.items())


class FocalPOLoss(PreferenceLossModule):
    """Module form of `focal_po_loss`: the options at construction, the tensors at call."""

    def __init__(self, *, beta: float = 0.1, gamma: float = 0.05, ignore_index: int = -100,
                 reduction: str = "mean", detach_focal_weight: bool = False, inplace_backward: bool = False):
        super().__init__(beta=beta, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
                         detach_focal_weight=detach_focal_weight, inplace_backward=inplace_backward)

    def forward(self, chosen_logits, rejected_logits, chosen_labels, rejected_labels,
                ref_chosen_logps=None, ref_rejected_logps=None) -> PreferenceLossOutput:
        return focal_po_loss(chosen_logits, rejected_logits, chosen_labels, rejected_labels,
                             ref_chosen_logps, ref_rejected_logps, **self.options)
