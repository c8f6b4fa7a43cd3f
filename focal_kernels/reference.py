"""The readable spec: FocalPO (and DPO, gamma = 0) in plain PyTorch, differentiated by autograd.

    logp      = Σ_t m_t · (x[t, y_t] − logsumexp_v x[t, v]),      m_t = [y_t ≠ ignore_index]
    z         = β · ((logp_c − ref_c) − (logp_r − ref_r))
    p         = σ(z)
    loss      = −p^γ · log p                                         (γ = 0: DPO, −log σ(z))

Everything is computed in float32, or float64 for float64 logits. Ignored tokens contribute exactly 0,
whatever their logits hold. The kernels must match these functions; the CPU path without the Triton
interpreter runs them directly. This file materializes the scored tokens' log-softmax: it is the spec, not
the fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_logits_and_labels, check_pair, reduce_loss
from .output import PreferenceLossOutput


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_logps(logits, labels, ignore_index=-100):
    """(B, T) log p(y_t) for scored tokens, 0 where the label is ignore_index (whose logits are never read)."""
    scored = labels != ignore_index
    rows = logits[scored].to(compute_dtype(logits.dtype))                  # (N, V): the scored tokens only
    picked = F.log_softmax(rows, dim=-1).gather(-1, labels[scored].long().unsqueeze(-1)).squeeze(-1)
    token_logps = torch.zeros(labels.shape, dtype=rows.dtype, device=logits.device)
    token_logps[scored] = picked
    return token_logps


def sequence_logps(logits, labels, ignore_index=-100):
    """(B,) Σ_t m_t · log p(y_t)."""
    check_logits_and_labels(logits, labels, ignore_index=ignore_index)
    return token_logps(logits, labels, ignore_index).sum(-1)


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
    focal_weight = torch.exp(float(gamma) * log_p)
    if detach_focal_weight:
        focal_weight = focal_weight.detach()
    return -focal_weight * log_p


def rewards(logps, ref_logps, beta):
    """β·(logp − ref), detached: what trainers log as rewards/chosen and rewards/rejected."""
    logps = logps.detach()
    if ref_logps is not None:
        logps = logps - ref_logps.detach().to(logps.dtype)
    return float(beta) * logps


def focal_po_loss(chosen_logits, rejected_logits, chosen_labels, rejected_labels,
                  ref_chosen_logps=None, ref_rejected_logps=None,
                  *, beta=0.1, gamma=0.05, ignore_index=-100, reduction="mean", detach_focal_weight=False):
    """The same call and outputs as `focal_kernels.focal_po_loss`."""
    check_pair(chosen_logits, rejected_logits, chosen_labels, rejected_labels, ref_chosen_logps, ref_rejected_logps,
               beta=beta, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
               detach_focal_weight=detach_focal_weight)
    chosen_logps = token_logps(chosen_logits, chosen_labels, ignore_index).sum(-1)
    rejected_logps = token_logps(rejected_logits, rejected_labels, ignore_index).sum(-1)
    per_pair = focal_po_pair_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                                  beta=beta, gamma=gamma, detach_focal_weight=detach_focal_weight)
    return PreferenceLossOutput(
        loss=reduce_loss(per_pair, reduction),
        chosen_logps=chosen_logps,
        rejected_logps=rejected_logps,
        chosen_rewards=rewards(chosen_logps, ref_chosen_logps, beta),
        rejected_rewards=rewards(rejected_logps, ref_rejected_logps, beta),
    )
