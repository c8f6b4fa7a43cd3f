"""The per-pair FocalPO loss and its derivative with respect to each sequence's log-probability.

Reads   chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps (B,), and (β, γ),
        all in float32 (float64 for float64 logits).
Writes  loss[b]            = −p^γ · log p,   p = σ(z),   z = β·((logp_c − ref_c) − (logp_r − ref_r))
        dloss_dchosen[b]   = +β · dℓ/dz
        dloss_drejected[b] = −β · dℓ/dz
with dℓ/dz = −p^γ · (1 − p) · (1 + γ·log p), or −p^γ · (1 − p) when the focal weight p^γ is detached.
log p = logsigmoid(z) and p^γ = exp(γ·log p), so |z| up to 1e4 stays finite. γ = 0 is DPO.

The derivatives are what the backward multiplies by the incoming gradient to get each sequence's
grad_scale. Another pair loss (IPO, hinge, ...) is another `@triton.jit` function of z beside
`focal_po_of_margin`, selected by a constexpr.
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


@triton.jit
def focal_po_pair_loss_kernel(
    chosen_logps_ptr, rejected_logps_ptr, ref_chosen_logps_ptr, ref_rejected_logps_ptr, params_ptr,
    loss_ptr, dloss_dchosen_ptr, dloss_drejected_ptr,
    B,
    DETACH_FOCAL_WEIGHT: tl.constexpr, BLOCK_B: tl.constexpr,
):
    offsets = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = offsets < B
    beta = tl.load(params_ptr)
    gamma = tl.load(params_ptr + 1)
    chosen = tl.load(chosen_logps_ptr + offsets, mask=mask, other=0.0)
    rejected = tl.load(rejected_logps_ptr + offsets, mask=mask, other=0.0)
    ref_chosen = tl.load(ref_chosen_logps_ptr + offsets, mask=mask, other=0.0)
    ref_rejected = tl.load(ref_rejected_logps_ptr + offsets, mask=mask, other=0.0)
    z = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    loss, dloss_dz = focal_po_of_margin(z, gamma, DETACH_FOCAL_WEIGHT)
    tl.store(loss_ptr + offsets, loss, mask=mask)
    tl.store(dloss_dchosen_ptr + offsets, beta * dloss_dz, mask=mask)
    tl.store(dloss_drejected_ptr + offsets, -beta * dloss_dz, mask=mask)


@functools.lru_cache(maxsize=64)
def loss_params(beta, gamma, dtype, device):
    """(β, γ) as a device tensor in the compute dtype (float64 stays exact; Triton's float scalars are
    float32), made once per setting: no per-call host-to-device copy. Never written to."""
    params = torch.full((2,), beta, dtype=dtype, device=device)
    params[1:].fill_(gamma)
    return params


def focal_po_pair_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                       *, beta, gamma, detach_focal_weight):
    """(loss, dloss_dchosen, dloss_drejected), each (B,) in chosen_logps' dtype. Refs may be None (= 0)."""
    dtype, device = chosen_logps.dtype, chosen_logps.device
    batch = chosen_logps.shape[0]

    def as_input(ref):
        if ref is None:
            return torch.zeros((batch,), dtype=dtype, device=device)
        return ref.detach().to(dtype).contiguous()

    params = loss_params(beta, gamma, dtype, device)
    loss = torch.empty((batch,), dtype=dtype, device=device)
    dloss_dchosen = torch.empty_like(loss)
    dloss_drejected = torch.empty_like(loss)
    block_b = min(max(triton.next_power_of_2(batch), 16), 1024)
    focal_po_pair_loss_kernel[(triton.cdiv(batch, block_b),)](
        chosen_logps.contiguous(), rejected_logps.contiguous(), as_input(ref_chosen_logps),
        as_input(ref_rejected_logps), params,
        loss, dloss_dchosen, dloss_drejected,
        batch,
        DETACH_FOCAL_WEIGHT=detach_focal_weight, BLOCK_B=block_b, num_warps=4,
    )
    return loss, dloss_dchosen, dloss_drejected
