"""The readable spec: per-sequence log-probs and FocalPO (DPO at gamma = 0) in plain PyTorch, differentiated
by autograd.

    logp      = Σ_t m_t · (x[t, y_t] − logsumexp_v x[t, v]),      m_t = [y_t ≠ ignore_index]
    z         = β · ((logp_c − ref_c) − (logp_r − ref_r))
    p         = σ(z)
    loss      = −p^γ · log p                                         (γ = 0: DPO, −log σ(z))

From hidden states: x = transform(hidden · Wᵀ + bias) with transform(r) = softcap·tanh(scale·r / softcap)
/ temperature (`linear_logits`). Packed sequences: tokens [cu_seqlens[s], cu_seqlens[s + 1]) form sequence s.

Everything is computed in float32, or float64 for float64 logits. Ignored tokens contribute exactly 0,
whatever their logits hold; a label outside [0, V) gives NaN. The kernels must match these functions; the
logits path on a CPU without the Triton interpreter calls `token_logps` directly; the rest is the spec that
the tests and the self-check compare against. This file materializes the log-softmax: it is the spec, not
the fast path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .checks import check_labels_in_range, check_logits_pair
from .losses.validation import check_options, check_reference_logps
from .dtypes import compute_dtype
from .output import PreferenceLossOutput


def token_logps(logits, labels, ignore_index=-100):
    """labels.shape: log p(y_t) for scored tokens (NaN for a label outside [0, V)), 0 where the label is
    ignore_index (whose logits never reach the result or its gradient)."""
    scored = labels != ignore_index
    in_range = scored & (labels >= 0) & (labels < logits.shape[-1])
    rows = torch.where(scored[..., None], logits, 0).to(compute_dtype(logits.dtype))
    picked = F.log_softmax(rows, dim=-1).gather(-1, torch.where(in_range, labels, 0).long()[..., None])[..., 0]
    return torch.where(scored, torch.where(in_range, picked, torch.nan), 0.0)


def segment_sums(token_values, cu_seqlens=None):
    """(B, T) → (B,) row sums; or, packed ((1, N) or (N,) values), (S,) sums over [cu_seqlens[s], cu_seqlens[s+1])."""
    if cu_seqlens is None:
        return token_values.sum(-1)
    flat = token_values.reshape(-1)
    positions = torch.arange(flat.shape[0], device=flat.device)
    sequence = torch.searchsorted(cu_seqlens[1:].long(), positions, right=True)
    return flat.new_zeros(cu_seqlens.shape[0] - 1).index_add_(0, sequence, flat)


def sequence_logps(logits, labels, ignore_index=-100, cu_seqlens=None):
    """(B,) Σ_t m_t · log p(y_t); packed ((N, V) logits, (N,) labels, cu_seqlens): (S,)."""
    return segment_sums(token_logps(logits, labels, ignore_index), cu_seqlens)


def linear_logits(hidden, weight, bias=None, *, logit_scale=1.0, logit_softcap=None, temperature=1.0):
    """The logits the hidden-state path scores: softcap·tanh(scale·(hidden · Wᵀ + bias) / softcap) / temperature."""
    z = logit_scale * F.linear(hidden, weight, bias)
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    return z / temperature


def token_stats(logits, labels, ignore_index=-100):
    """TRL's per-token statistics of the scored tokens (0 / False at ignored ones): entropy −Σ p log p (with
    0 log 0 = 0, where a logit is −inf), log Σ p², mean logit, and whether the label is the (first) argmax,
    False where the row's log-softmax is NaN (a NaN or +inf logit, or every logit −inf)."""
    scored = labels != ignore_index
    x = logits.to(compute_dtype(logits.dtype))
    log_p = F.log_softmax(x, dim=-1)
    p_log_p = torch.where(log_p == -math.inf, 0.0, log_p.exp() * log_p)  # (a NaN stays NaN)
    stats = {"entropy": -p_log_p.sum(-1), "log_sum_sq_probs": torch.logsumexp(2 * log_p, dim=-1),
             "mean_logits": x.mean(-1), "is_top1": (x.argmax(-1) == labels) & ~log_p.isnan().any(-1)}
    return {name: torch.where(scored, value, torch.zeros_like(value)) for name, value in stats.items()}


def focal_po_pair_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None,
                       *, beta=0.1, gamma=0.05, detach_focal_weight=False):
    """(B,) −p^γ · log p with p = σ(β·margin), through logsigmoid so that |z| up to 1e4 stays finite."""
    ref_margin = 0.0
    if ref_chosen_logps is not None:
        ref_margin = ref_margin + ref_chosen_logps.to(chosen_logps.dtype)
    if ref_rejected_logps is not None:
        ref_margin = ref_margin - ref_rejected_logps.to(chosen_logps.dtype)
    z = float(beta) * ((chosen_logps - rejected_logps) - ref_margin)
    log_p = F.logsigmoid(z)
    if gamma == 0:  # DPO: −log σ(z), +inf at z = −inf
        return -log_p
    # p = 0 (z = −inf): p^γ · log p → 0 for γ > 0, and so does its gradient: the limit is taken there, the
    # product computed at log p = 0 (at −inf it would be 0 · (−inf) = NaN, and so would its gradient)
    at_limit = log_p == -torch.inf
    log_p = torch.where(at_limit, 0.0, log_p)
    focal_weight = torch.exp(float(gamma) * log_p)
    if detach_focal_weight:
        focal_weight = focal_weight.detach()
    return torch.where(at_limit, 0.0, -focal_weight * log_p)


def rewards(logps, ref_logps, beta):
    """β·(logp − ref), detached: what trainers log as rewards/chosen and rewards/rejected."""
    logps = logps.detach()
    if ref_logps is not None:
        logps = logps - ref_logps.detach().to(logps.dtype)
    return float(beta) * logps


def focal_po_loss(chosen_logits, rejected_logits, chosen_labels, rejected_labels,
                  ref_chosen_logps=None, ref_rejected_logps=None,
                  *, beta=0.1, gamma=0.05, ignore_index=-100, reduction="mean", detach_focal_weight=False):
    """FocalPO on padded logits: the loss, log-probs and rewards of `focal_kernels.focal_po_loss`."""
    check_logits_pair(chosen_logits, rejected_logits, chosen_labels, rejected_labels, ignore_index)
    check_reference_logps(ref_chosen_logps, ref_rejected_logps, chosen_logits.shape[0], chosen_logits.device)
    check_options(("focal",), beta=beta, gamma=gamma, detach_focal_weight=detach_focal_weight, label_smoothing=0.0,
                  simpo_gamma=0.5, discopop_tau=0.05, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
                  reduction=reduction)
    check_labels_in_range([(chosen_labels, "chosen_labels"), (rejected_labels, "rejected_labels")],
                          chosen_logits.shape[2], ignore_index=ignore_index)
    chosen_logps = sequence_logps(chosen_logits, chosen_labels, ignore_index)
    rejected_logps = sequence_logps(rejected_logits, rejected_labels, ignore_index)
    per_pair = focal_po_pair_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                  beta=beta, gamma=gamma, detach_focal_weight=detach_focal_weight)
    return PreferenceLossOutput(
        loss=per_pair.mean() if reduction == "mean" else per_pair.sum() if reduction == "sum" else per_pair,
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_rewards=rewards(chosen_logps, ref_chosen_logps, beta),
        rejected_rewards=rewards(rejected_logps, ref_rejected_logps, beta),
    )
