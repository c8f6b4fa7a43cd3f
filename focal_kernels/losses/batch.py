"""What every loss function receives: the pair quantities (`PairBatch`) and the options (`LossOptions`),
plus the `loss_spec` marker that tells `preference_loss` which options a loss reads and which it refuses.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class PairBatch(NamedTuple):
    """(B,) tensors, all in the compute dtype (float32, or float64 for float64 log-probs).

    chosen_logps, rejected_logps:          the policy's per-sequence log-probs.
    ref_chosen_logps, ref_rejected_logps:  the reference model's; zeros when reference-free.
    chosen_logratios, rejected_logratios:  logp − ref.
    chosen_scores, rejected_scores:        the log-ratios after the f-divergence transform (= the log-ratios
                                           for the default "reverse_kl").
    chosen_token_counts, rejected_token_counts: scored tokens per sequence, or None when not given.
    """

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    chosen_logratios: torch.Tensor
    rejected_logratios: torch.Tensor
    chosen_scores: torch.Tensor
    rejected_scores: torch.Tensor
    chosen_token_counts: Optional[torch.Tensor]
    rejected_token_counts: Optional[torch.Tensor]

    @property
    def delta_score(self) -> torch.Tensor:
        """(chosen score) − (rejected score): DPO's implicit reward margin, divided by β. (The built-in losses
        call `pairwise.delta_score(p)` instead: torch 2.10's dynamo does not trace a NamedTuple's properties.)"""
        return self.chosen_scores - self.rejected_scores


class LossOptions(NamedTuple):
    """Python numbers only (never tensors), so checks and formulas never read device data. The defaults are
    validation.OPTION_DEFAULTS' (a test holds them equal); `check_options` builds the library's instances."""

    beta: float = 0.1
    gamma: float = 0.05
    detach_focal_weight: bool = False
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05


def loss_spec(*, f_divergence: bool = False, label_smoothing: bool = False, token_counts: tuple = (),
              per_pair: bool = True, pair_weights: bool = True, reference_free: bool = False):
    """Mark a loss function with what `preference_loss` must check before calling it.

    f_divergence:    a non-default f_divergence_type is allowed (the loss reads only the *scores*).
    label_smoothing: the loss reads `label_smoothing` (a non-zero value that no selected loss reads is refused).
    token_counts:    which of "chosen", "rejected" token counts the loss needs.
    per_pair:        entry i of the loss is pair i's (False: the loss sorts across the batch or is a batch mean);
                     descriptive (what reduction="none" returns): the tests hold each loss to it.
    pair_weights:    per-pair weights may multiply the loss (False where entry i is not pair i's, e.g. sorted).
    reference_free:  the loss never reads reference log-probs: given when every selected loss is reference-free,
                     they are refused (beside other losses they are theirs).

    A function without the mark gets these defaults.
    """

    def mark(fn):
        fn.supports_f_divergence = f_divergence
        fn.uses_label_smoothing = label_smoothing
        fn.needs_token_counts = tuple(token_counts)
        fn.per_pair = per_pair
        fn.accepts_pair_weights = pair_weights
        fn.reference_free = reference_free
        return fn

    return mark


def spec_of(fn) -> dict:
    """The marks of a loss function, with `loss_spec`'s defaults for unmarked ones."""
    return {
        "f_divergence": getattr(fn, "supports_f_divergence", False),
        "label_smoothing": getattr(fn, "uses_label_smoothing", False),
        "token_counts": getattr(fn, "needs_token_counts", ()),
        "per_pair": getattr(fn, "per_pair", True),
        "pair_weights": getattr(fn, "accepts_pair_weights", True),
        "reference_free": getattr(fn, "reference_free", False),
    }
