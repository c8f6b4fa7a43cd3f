"""The result of a preference loss: the loss and the per-sequence quantities trainers log."""

from __future__ import annotations

from typing import NamedTuple

import torch


class PreferenceLossOutput(NamedTuple):
    """What `focal_po_loss` (and the reference) and `preference_loss` return.

    loss:             scalar, or (B,) for reduction="none"; differentiable.
    chosen_logps:     (B,) Σ_t log p(y_t) over the chosen sequence's scored tokens; differentiable.
                      (`preference_loss` returns the tensor it was given, so autograd.grad(loss, it) works.)
    rejected_logps:   (B,) the same for the rejected sequence; differentiable.
    chosen_rewards:   (B,) β·(chosen_logps − ref_chosen_logps), detached.
    rejected_rewards: (B,) β·(rejected_logps − ref_rejected_logps), detached.
    metrics:          dict of detached 0-dim tensors under TRL's names ("rewards/chosen", "rewards/rejected",
                      "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"); filled by
                      `preference_loss` (and so by every fused entry point). Only `fk.reference.focal_po_loss`
                      builds the output without it and gets the shared empty default: treat it as read-only.
    """

    loss: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    metrics: dict = {}
