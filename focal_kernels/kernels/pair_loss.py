"""The FocalPO loss of one margin and its derivative: the math every pair-loss kernel inlines.

    ℓ(z) = −p^γ · log p,   p = σ(z),   z = β·((logp_c − ref_c) − (logp_r − ref_r))
    dℓ/dz = −p^γ · (1 − p) · (1 + γ·log p),  or −p^γ · (1 − p) when the focal weight p^γ is detached.
log p = logsigmoid(z) and p^γ = exp(γ·log p), so |z| up to 1e4 stays finite. γ = 0 is DPO. Computed in
the dtype of z (float32, or float64 for float64 logits).

Another pair loss (IPO, hinge, ...) is another `@triton.jit` function of z beside `focal_po_of_margin`,
selected by a constexpr in sequence_pair_loss.py.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def log1p_of_unit(u):
    """log(1 + u) for u in [0, 1], accurate when u is tiny (Goldberg's correction; no log1p needed)."""
    one_plus_u = 1.0 + u
    rounded_u = one_plus_u - 1.0
    safe_rounded_u = tl.where(rounded_u == 0.0, 1.0, rounded_u)
    return tl.where(rounded_u == 0.0, u, tl.log(one_plus_u) * (u / safe_rounded_u))


@triton.jit
def focal_po_of_margin(z, gamma, DETACH_FOCAL_WEIGHT: tl.constexpr):
    """(ℓ(z), dℓ/dz) for ℓ = −σ(z)^γ · log σ(z)."""
    softplus_tail = log1p_of_unit(tl.exp(-tl.abs(z)))
    log_p = tl.minimum(z, 0.0) - softplus_tail              # logsigmoid(z)
    one_minus_p = tl.exp(tl.minimum(-z, 0.0) - softplus_tail)  # σ(−z)
    focal_weight = tl.exp(gamma * log_p)                     # p^γ
    loss = -focal_weight * log_p
    dloss_dz = -focal_weight * one_minus_p
    if not DETACH_FOCAL_WEIGHT:
        dloss_dz = dloss_dz * (1.0 + gamma * log_p)
    return loss, dloss_dz


@functools.lru_cache(maxsize=64)
def loss_params(beta, gamma, dtype, device):
    """(β, γ) as a device tensor in the compute dtype (float64 stays exact; Triton's float scalars are
    float32), made once per setting: no per-call host-to-device copy. Never written to."""
    params = torch.full((2,), beta, dtype=dtype, device=device)
    params[1:].fill_(gamma)
    return params
