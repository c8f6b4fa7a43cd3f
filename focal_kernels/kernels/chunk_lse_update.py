"""Forward of the hidden-state path: fold one vocabulary chunk of logits into running per-token state.

Reads   raw logits r[n, j] of one chunk, the columns v0 + j for j in [0, C) (float32 / bfloat16 / float16 /
        float64, last dimension contiguous) as the GEMM wrote them, labels y[n] (int64), the transform's
        (scale, cap, inv_temperature) (logit_transform.py; applied when HAS_TRANSFORM) and the running
        state per token, all in float32 (float64 for float64 logits):
            max[n], sum[n] = Σ exp(x − max)                   always
            target[n] = x[n, y[n] − v0]  when v0 <= y[n] < v0 + C, else left unchanged
            wsum[n] = Σ exp(x − max)·(x − max)                ENTROPY:      entropy = log sum − wsum / sum
                                                              (a −inf logit adds 0: 0 log 0 = 0)
            sqsum[n] = Σ exp(2(x − max))                      SQUARES:      log Σ p² = log sqsum − 2 log sum
            xsum[n] = Σ x                                     LOGIT_SUM:    mean logit = xsum / V
            before[n] = max of x over columns v < y[n]        TOP1:         y is the first argmax when
                                                                            target >= max and target > before
        where x = transform(r). Writes the updated state in place.

One program per row; the chunk row is streamed in BLOCK_V-wide blocks with the same online update, starting
from the running state, so the merge across chunks is exact algebra, not an approximation: the full blocks
unmasked, the last, partial one masked. TOP1 finds the columns left of the label by comparing each lane index
with a per-block int32 bound. Offsets int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import FP_FUSION, fold_config
from .fast_exp import fast_exp
from .logit_transform import load_transform, transformed_logits


@triton.jit
def _fold_block(x, valid, lanes, label_offset, running_max, running_sum, wsum, sqsum, xsum, before,
                MASKED: tl.constexpr, ENTROPY: tl.constexpr, SQUARES: tl.constexpr, LOGIT_SUM: tl.constexpr,
                TOP1: tl.constexpr):
    """Fold one block of transformed logits x into the running state; returns the new state. With MASKED, only
    the lanes where `valid` holds are columns of the chunk. label_offset: the label's column less the block's
    first (int64); the lanes below it are the columns left of the label (TOP1), found with an int32 bound."""
    if LOGIT_SUM:
        if MASKED:
            xsum += tl.sum(tl.where(valid, x, 0.0), axis=0)
        else:
            xsum += tl.sum(x, axis=0)
    if MASKED:
        x = tl.where(valid, x, float("-inf"))
    if TOP1:
        before_end = tl.minimum(tl.maximum(label_offset, 0), x.shape[0]).to(tl.int32)
        before = tl.maximum(before, tl.max(tl.where(lanes < before_end, x, float("-inf")), axis=0))
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max).to(running_sum.dtype)
    rescale = fast_exp(running_max - safe_max)
    exps = fast_exp(x - safe_max)
    if ENTROPY:  # Σ e^(x − m)(x − m) moves to the new max m' as r·(wsum + (m − m')·sum), r = e^(m − m')
        shift = tl.where(running_max == float("-inf"), 0.0, running_max - safe_max)
        # masked columns and −inf logits (a masked vocabulary): e^(−inf) · 0, not 0 · (−inf), so 0 log 0 = 0
        centered = tl.where(x == float("-inf"), 0.0, x - safe_max)
        wsum = rescale * (wsum + shift * running_sum) + tl.sum(exps * centered, axis=0)
    if SQUARES:
        sqsum = sqsum * rescale * rescale + tl.sum(exps * exps, axis=0)
    running_sum = running_sum * rescale + tl.sum(exps, axis=0)
    return new_max, running_sum, wsum, sqsum, xsum, before


@triton.jit
def chunk_lse_update_kernel(
    logits_ptr, labels_ptr, params_ptr,
    running_max_ptr, running_sum_ptr, target_logits_ptr, wsum_ptr, sqsum_ptr, xsum_ptr, before_ptr,
    C, vocab_start, stride_logits_n,
    HAS_TRANSFORM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ENTROPY: tl.constexpr, SQUARES: tl.constexpr, LOGIT_SUM: tl.constexpr, TOP1: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits_ptr = logits_ptr + row * stride_logits_n
    if HAS_TRANSFORM:
        scale, cap, inv_temperature = load_transform(params_ptr)
    local_label = tl.load(labels_ptr + row).to(tl.int64) - vocab_start

    acc_dtype = running_sum_ptr.dtype.element_ty
    running_max = tl.load(running_max_ptr + row)
    running_sum = tl.load(running_sum_ptr + row)
    # the statistics not asked for ride along as copies of running_sum (never stored)
    wsum, sqsum, xsum, before = running_sum, running_sum, running_sum, running_sum
    if ENTROPY:
        wsum = tl.load(wsum_ptr + row)
    if SQUARES:
        sqsum = tl.load(sqsum_ptr + row)
    if LOGIT_SUM:
        xsum = tl.load(xsum_ptr + row)
    if TOP1:
        before = tl.load(before_ptr + row)
    lanes = tl.arange(0, BLOCK_V)
    # the full blocks unmasked, then the chunk's last, partial block masked
    full_blocks = C // BLOCK_V
    for block in range(0, full_blocks):
        start = block * BLOCK_V
        x = tl.load(row_logits_ptr + start + lanes).to(acc_dtype)
        if HAS_TRANSFORM:
            x = transformed_logits(x, scale, cap, inv_temperature, HAS_SOFTCAP)
        running_max, running_sum, wsum, sqsum, xsum, before = _fold_block(
            x, lanes < BLOCK_V, lanes, local_label - start, running_max, running_sum, wsum, sqsum, xsum, before,
            False, ENTROPY, SQUARES, LOGIT_SUM, TOP1)
    start = full_blocks * BLOCK_V
    if start < C:
        valid = lanes < C - start
        x = tl.load(row_logits_ptr + start + lanes, mask=valid, other=0.0).to(acc_dtype)
        if HAS_TRANSFORM:
            x = transformed_logits(x, scale, cap, inv_temperature, HAS_SOFTCAP)
        running_max, running_sum, wsum, sqsum, xsum, before = _fold_block(
            x, valid, lanes, local_label - start, running_max, running_sum, wsum, sqsum, xsum, before,
            True, ENTROPY, SQUARES, LOGIT_SUM, TOP1)
    tl.store(running_max_ptr + row, running_max)
    tl.store(running_sum_ptr + row, running_sum)
    if ENTROPY:
        tl.store(wsum_ptr + row, wsum)
    if SQUARES:
        tl.store(sqsum_ptr + row, sqsum)
    if LOGIT_SUM:
        tl.store(xsum_ptr + row, xsum)
    if TOP1:
        tl.store(before_ptr + row, before)

    in_chunk = (local_label >= 0) & (local_label < C)
    picked = tl.load(row_logits_ptr + tl.where(in_chunk, local_label, 0), mask=in_chunk, other=0.0).to(acc_dtype)
    if HAS_TRANSFORM:
        picked = transformed_logits(picked, scale, cap, inv_temperature, HAS_SOFTCAP)
    previous = tl.load(target_logits_ptr + row)
    tl.store(target_logits_ptr + row, tl.where(in_chunk, picked, previous))


def chunk_lse_update(logits_chunk: torch.Tensor, labels: torch.Tensor, vocab_start: int, state: dict,
                     transform) -> None:
    """Update the running state (a dict of (N,) contiguous compute-dtype tensors: max, sum, target and,
    when present, wsum, sqsum, xsum, before) in place.

    logits_chunk (N, C) with stride(-1) == 1 holds the raw logits of vocabulary rows
    [vocab_start, vocab_start + C); labels (N,) int64 contiguous. transform: None, or (params, has_softcap).
    """
    rows, width = logits_chunk.shape
    if rows == 0 or width == 0:
        return
    block_v, num_warps = fold_config(width, logits_chunk.element_size(),
                                     any(name in state for name in ("wsum", "sqsum", "xsum", "before")))
    placeholder = state["max"]
    params, has_softcap = transform if transform is not None else (placeholder, False)
    chunk_lse_update_kernel[(rows,)](
        logits_chunk, labels, params,
        state["max"], state["sum"], state["target"],
        *(state.get(name, placeholder) for name in ("wsum", "sqsum", "xsum", "before")),
        width, vocab_start, logits_chunk.stride(0),
        HAS_TRANSFORM=transform is not None, HAS_SOFTCAP=has_softcap,
        ENTROPY="wsum" in state, SQUARES="sqsum" in state, LOGIT_SUM="xsum" in state, TOP1="before" in state,
        BLOCK_V=block_v, num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )
