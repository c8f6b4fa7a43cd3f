"""`preference_loss` and its module form: any of TRL 1.16's DPO loss types, FocalPO and SimPO, from
per-sequence log-probs, combined with TRL's `loss_weights` rule. Plain PyTorch on (B,) tensors."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..output import PreferenceLossOutput
from .batch import PairBatch
from .divergence import f_divergence_scores
from .pairwise import LOSS_TYPES
from .validation import check_options, check_tensors, resolve_loss_types


def _compute_dtype(*tensors) -> torch.dtype:
    """float64 if any log-prob tensor is float64, otherwise float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _reduce(per_pair: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_pair.mean()
    if reduction == "sum":
        return per_pair.sum()
    return per_pair


_METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                 "logps/rejected")


def _metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """TRL's logged metrics, as detached 0-dim tensors (no .item(): the caller decides when to sync), the
    six means taken in one reduction (fewer launches where the step is host-bound)."""
    margins = chosen_rewards - rejected_rewards
    # NaN in, NaN out: a pair with a NaN margin is neither right nor wrong (the comparison alone says wrong)
    accuracies = torch.where(margins.isnan(), margins, (margins > 0).to(margins.dtype))
    per_pair = torch.stack([chosen_rewards, rejected_rewards, accuracies, margins, chosen_logps.detach(),
                            rejected_logps.detach()])
    return dict(zip(_METRIC_NAMES, per_pair.mean(dim=1).unbind()))


def preference_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor] = None,
    ref_rejected_logps: Optional[torch.Tensor] = None,
    *,
    loss_type: Union[str, Sequence[str]] = "focal",
    loss_weights: Optional[Sequence[float]] = None,
    beta: float = 0.1,
    gamma: float = 0.05,
    detach_focal_weight: bool = False,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    chosen_token_counts: Optional[torch.Tensor] = None,
    rejected_token_counts: Optional[torch.Tensor] = None,
    pair_weights: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> PreferenceLossOutput:
    """A preference-optimization loss from per-sequence log-probs, as TRL 1.16's DPOTrainer computes it.

    chosen_logps, rejected_logps:         (B,) floating, differentiable: Σ_t log p(y_t) per sequence.
    ref_chosen_logps, ref_rejected_logps: (B,) the reference model's, or both None (reference-free: 0).
                  Reference-free types (simpo) never read them: given when every selected type is
                  reference-free, they are refused; beside other types, they are those types'.
    loss_type:    a name in `LOSS_TYPES` or a list of names; `loss_weights` one float per name (default
                  1.0 each). The loss is Σ_k w_k · mean_i ℓ_k,i (TRL's rule; "sum" uses sums, "none" gives
                  Σ_k w_k · ℓ_k,i per pair).
    beta, gamma, detach_focal_weight: β for every type; γ and the detach switch for "focal".
    label_smoothing: ε for robust, exo_pair, aot, aot_unpaired, simpo.
    simpo_gamma, discopop_tau: the SimPO margin γ (divided by β) and DiscoPOP's τ.
                  An option that no selected type reads (above, and f_alpha_divergence_coef without
                  "alpha_divergence") is refused unless it keeps its default: it would be ignored.
    f_divergence_type, f_alpha_divergence_coef: TRL's f-DPO scores, for the types built on the score
                  difference (sigmoid, sigmoid_norm, hinge, ipo, exo_pair, robust, discopop, sft, focal).
    chosen_token_counts, rejected_token_counts: (B,) scored tokens per sequence, needed by ipo,
                  sigmoid_norm, simpo (both) and sft (chosen). Integer or floating; their values are taken as
                  given (a check would cost a device sync): `sequence_logps(..., return_token_counts=True)`
                  gives them. ipo and sigmoid_norm divide by max(count, 1), simpo by the count, sft by
                  the chosen counts' sum (as TRL).
    pair_weights: (B,) multiplies every loss type's per-pair loss before the reduction (TRL's
                  use_weighting; TRL's WPO weights are computed without gradient, so pass detached weights
                  to match it). Refused with aot / aot_unpaired, as TRL does.
    reduction:    "mean" | "sum" | "none". With "none", entry i is pair i's loss, except for aot and
                  aot_unpaired (entry i comes from the i-th smallest sorted margins) and sft (the batch
                  token-mean NLL, repeated for every pair) — as TRL computes them.

    Computed in float32 (float64 when any log-prob input is float64; forward_kl internally in float64).
    Returns `PreferenceLossOutput`: loss; chosen_logps and rejected_logps (the tensors given);
    chosen_rewards, rejected_rewards = β·(logp − ref), detached; metrics (TRL's names, detached 0-dim
    tensors). No host synchronization.
    """
    names, weights = resolve_loss_types(loss_type, loss_weights)
    options = check_options(names, beta=beta, gamma=gamma, detach_focal_weight=detach_focal_weight,
                            label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, discopop_tau=discopop_tau,
                            f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                            reduction=reduction)
    check_tensors(names, chosen_logps=chosen_logps, rejected_logps=rejected_logps,
                  ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                  chosen_token_counts=chosen_token_counts, rejected_token_counts=rejected_token_counts,
                  pair_weights=pair_weights)
    if reduction == "mean" and chosen_logps.shape[0] == 0:  # (a sum over no pairs is 0, "none" empty)
        raise ValueError("chosen_logps has no pairs (B = 0): reduction='mean' would be NaN; pass at least one "
                         "pair, or reduction='sum' (0 for an empty batch, e.g. a rank's share that is empty)")

    out_dtype = _compute_dtype(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    # forward_kl's score 1 − e^(−u) leaves float32 at u < −88 (a sequence log-ratio reached in training), where
    # the score difference would be inf − inf = NaN: its losses are computed in float64 (B numbers)
    dtype = torch.float64 if f_divergence_type == "forward_kl" else out_dtype
    policy_c, policy_r = chosen_logps.to(dtype), rejected_logps.to(dtype)
    if ref_chosen_logps is None:
        ref_c, ref_r = torch.zeros_like(policy_c), torch.zeros_like(policy_r)
    else:
        ref_c, ref_r = ref_chosen_logps.to(dtype), ref_rejected_logps.to(dtype)
    logratio_c, logratio_r = policy_c - ref_c, policy_r - ref_r
    alpha = float(f_alpha_divergence_coef)
    pairs = PairBatch(
        chosen_logps=policy_c, rejected_logps=policy_r, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r,
        chosen_logratios=logratio_c, rejected_logratios=logratio_r,
        chosen_scores=f_divergence_scores(logratio_c, f_divergence_type, alpha),
        rejected_scores=f_divergence_scores(logratio_r, f_divergence_type, alpha),
        chosen_token_counts=None if chosen_token_counts is None else chosen_token_counts.to(dtype),
        rejected_token_counts=None if rejected_token_counts is None else rejected_token_counts.to(dtype),
    )

    # A loss type weighted 0 is left out (0 · its infinite value, or its infinite derivative, at an infinite
    # margin would be NaN).
    per_pair = None
    for name, weight in zip(names, weights):
        if weight == 0:
            continue
        term = LOSS_TYPES[name](pairs, options)
        if pair_weights is not None:
            term = term * pair_weights.to(dtype)
        term = term * weight
        per_pair = term if per_pair is None else per_pair + term
    if per_pair is None:  # every weight 0: a zero loss on the policy's graph, zero gradients (NaN stays NaN)
        logps = policy_c + policy_r
        per_pair = 0 * torch.where(logps.isinf(), 0.0, logps)

    chosen_rewards = (options.beta * logratio_c).detach()
    rejected_rewards = (options.beta * logratio_r).detach()
    loss = _reduce(per_pair, reduction)
    if dtype != out_dtype:  # forward_kl's float64 back to the usual dtype
        loss, chosen_rewards, rejected_rewards, policy_c, policy_r = (
            t.to(out_dtype) for t in (loss, chosen_rewards, rejected_rewards, policy_c, policy_r))
    return PreferenceLossOutput(
        loss=loss,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        metrics=_metrics(chosen_rewards, rejected_rewards, policy_c, policy_r),
    )


class PreferenceLoss(nn.Module):
    """`preference_loss` as a module: the options at construction (checked there), kept as attributes as
    PyTorch's losses keep `reduction`; each call passes them to `preference_loss`, which checks them again (an
    attribute may have been changed).

    loss_fn = PreferenceLoss(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.1], beta=0.1)
    out = loss_fn(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_token_counts=n_chosen)

    Stateless: every loss type, bco_pair included, depends on the current batch only (TRL 1.16 keeps no
    running mean for bco_pair).
    """

    _OPTION_NAMES = ("loss_type", "loss_weights", "beta", "gamma", "detach_focal_weight", "label_smoothing",
                     "simpo_gamma", "discopop_tau", "f_divergence_type", "f_alpha_divergence_coef", "reduction")

    def __init__(self, *, loss_type: Union[str, Sequence[str]] = "focal",
                 loss_weights: Optional[Sequence[float]] = None, beta: float = 0.1, gamma: float = 0.05,
                 detach_focal_weight: bool = False, label_smoothing: float = 0.0, simpo_gamma: float = 0.5,
                 discopop_tau: float = 0.05, f_divergence_type: str = "reverse_kl",
                 f_alpha_divergence_coef: float = 0.5, reduction: str = "mean", **unexpected):
        if "pair_weights" in unexpected:
            raise TypeError("pair_weights is a per-batch (B,) tensor, not a module option: pass it at each call, "
                            "forward(..., pair_weights=...)")
        if unexpected:
            raise TypeError(f"PreferenceLoss got unexpected keyword argument(s) {sorted(unexpected)}; the options "
                            f"are {list(self._OPTION_NAMES)}")
        super().__init__()
        names, weights = resolve_loss_types(loss_type, loss_weights)
        check_options(names, beta=beta, gamma=gamma, detach_focal_weight=detach_focal_weight,
                      label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, discopop_tau=discopop_tau,
                      f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                      reduction=reduction)
        # loss_weights as given: None stays None (equal weights for whatever loss_type becomes later)
        self.loss_type, self.loss_weights = list(names), None if loss_weights is None else list(weights)
        self.beta, self.gamma, self.detach_focal_weight = beta, gamma, detach_focal_weight
        self.label_smoothing, self.simpo_gamma, self.discopop_tau = label_smoothing, simpo_gamma, discopop_tau
        self.f_divergence_type, self.f_alpha_divergence_coef = f_divergence_type, f_alpha_divergence_coef
        self.reduction = reduction

    @property
    def options(self) -> dict:
        """The options as `preference_loss` keywords, read from the attributes at each call (a copy: change
        the attributes, not this dict)."""
        return {name: getattr(self, name) for name in self._OPTION_NAMES}

    def __setstate__(self, state):
        # A module pickled by 0.2.0 kept its options in one dict attribute, `options`.
        old_options = state.pop("options", None)
        super().__setstate__(state)
        for name, value in (old_options or {}).items():
            setattr(self, name, value)

    def forward(self, chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                chosen_token_counts=None, rejected_token_counts=None, pair_weights=None) -> PreferenceLossOutput:
        return preference_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               chosen_token_counts=chosen_token_counts, rejected_token_counts=rejected_token_counts,
                               pair_weights=pair_weights, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.options.items())
