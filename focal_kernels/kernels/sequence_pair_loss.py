"""Per-sequence sums of token log-probabilities and the pair loss, in one deterministic kernel.

Reads   chosen_token_logps (B, T) and rejected_token_logps (B, T2) (contiguous, 0 at ignored tokens),
        ref_chosen_logps, ref_rejected_logps (B,) when given, and (β, γ); all float32 (float64).
Writes  chosen_logps[b]   = Σ_t chosen_token_logps[b, t]      rejected_logps[b] likewise
        chosen_rewards[b] = β·(chosen_logps[b] − ref_c[b])    rejected_rewards[b] likewise
        loss[b], dloss_dchosen[b], dloss_drejected[b]          as in pair_loss.py (focal_po_of_margin)
all (B,), same dtype. dloss_d* are what the backward multiplies by the incoming gradient to get each
sequence's grad_scale.

One program per pair walks both rows in BLOCK_T-wide blocks in a fixed order and reduces once: no atomics,
so the same inputs always give the same bits. Doing the sums and the loss in one launch keeps the forward's
small-kernel count (and its launch overhead) low. A packed layout becomes a segmented sum here. Per-sequence
log-probs that were summed elsewhere (the hidden-state path) come in as rows of length 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pair_loss import focal_po_of_margin, loss_params
from .sequence_sum import row_block, row_sum


@triton.jit
def sequence_pair_loss_kernel(
    chosen_token_logps_ptr, rejected_token_logps_ptr, ref_chosen_logps_ptr, ref_rejected_logps_ptr, params_ptr,
    chosen_logps_ptr, rejected_logps_ptr, chosen_rewards_ptr, rejected_rewards_ptr,
    loss_ptr, dloss_dchosen_ptr, dloss_drejected_ptr,
    T_chosen, T_rejected,
    HAS_REF_CHOSEN: tl.constexpr, HAS_REF_REJECTED: tl.constexpr, DETACH_FOCAL_WEIGHT: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    acc_dtype: tl.constexpr = chosen_logps_ptr.dtype.element_ty
    beta = tl.load(params_ptr)
    gamma = tl.load(params_ptr + 1)
    chosen = row_sum(chosen_token_logps_ptr + pair * T_chosen, T_chosen, BLOCK_T, acc_dtype)
    rejected = row_sum(rejected_token_logps_ptr + pair * T_rejected, T_rejected, BLOCK_T, acc_dtype)
    chosen_ratio = chosen
    rejected_ratio = rejected
    if HAS_REF_CHOSEN:
        chosen_ratio = chosen - tl.load(ref_chosen_logps_ptr + pair).to(acc_dtype)
    if HAS_REF_REJECTED:
        rejected_ratio = rejected - tl.load(ref_rejected_logps_ptr + pair).to(acc_dtype)
    loss, dloss_dz = focal_po_of_margin(beta * (chosen_ratio - rejected_ratio), gamma, DETACH_FOCAL_WEIGHT)
    tl.store(chosen_logps_ptr + pair, chosen)
    tl.store(rejected_logps_ptr + pair, rejected)
    tl.store(chosen_rewards_ptr + pair, beta * chosen_ratio)
    tl.store(rejected_rewards_ptr + pair, beta * rejected_ratio)
    tl.store(loss_ptr + pair, loss)
    tl.store(dloss_dchosen_ptr + pair, beta * dloss_dz)
    tl.store(dloss_drejected_ptr + pair, -beta * dloss_dz)


def sequence_pair_loss(chosen_token_logps, rejected_token_logps, ref_chosen_logps, ref_rejected_logps,
                       *, beta, gamma, detach_focal_weight):
    """Returns a dict of (B,) tensors: chosen_logps, rejected_logps, chosen_rewards, rejected_rewards, loss,
    dloss_dchosen, dloss_drejected. Token log-probs (B, T) contiguous in the compute dtype; refs may be None."""
    dtype, device = chosen_token_logps.dtype, chosen_token_logps.device
    batch = chosen_token_logps.shape[0]
    names = ("chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards", "loss",
             "dloss_dchosen", "dloss_drejected")
    outputs = {name: torch.empty((batch,), dtype=dtype, device=device) for name in names}
    block_t = row_block(max(chosen_token_logps.shape[1], rejected_token_logps.shape[1]))

    def as_input(ref):  # a placeholder pointer when absent: the kernel does not read it
        return chosen_token_logps if ref is None else ref.detach().contiguous()

    sequence_pair_loss_kernel[(batch,)](
        chosen_token_logps, rejected_token_logps, as_input(ref_chosen_logps), as_input(ref_rejected_logps),
        loss_params(beta, gamma, dtype, device),
        *outputs.values(),
        chosen_token_logps.shape[1], rejected_token_logps.shape[1],
        HAS_REF_CHOSEN=ref_chosen_logps is not None, HAS_REF_REJECTED=ref_rejected_logps is not None,
        DETACH_FOCAL_WEIGHT=detach_focal_weight, BLOCK_T=block_t, num_warps=4,
    )
    return outputs
