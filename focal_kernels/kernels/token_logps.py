"""Forward of the logits path: per-token log-probability of the label, one pass over each row's vocabulary.

Reads   logits x[b, t, :] of the vocabulary columns [v0, v0 + V) (float32 / bfloat16 / float16 / float64;
        any batch and time strides, last dimension contiguous) and labels y[b, t] (int32 / int64, any
        strides), global vocabulary ids; v0 = vocab_start is 0 unless the vocabulary is split over ranks.
        One grid (B, T, V), or two of one dtype, (B, T, V) and (B2, T2, V), read in one launch (chosen and
        rejected: pair_rows.py); their rows follow each other in the outputs.
Writes  row_max[b, t] = max_v x[b, t, v],  log_sum_exp[b, t] = log Σ_v exp(x[b, t, v] − row_max), and
          token_logps[b, t] = (x[b, t, y − v0] − row_max) − log_sum_exp   when v0 <= y < v0 + V,
                              NaN                                         for any other label,
        or, with WRITE_TARGET (the vocabulary-parallel forward, whose ranks combine the statistics),
          token_logps[b, t] = x[b, t, y − v0] when the label lies in this slice, else 0;
        all three contiguous, (B, T) for one grid and flat (B·T + B2·T2,) for two, in float32 (float64 for
        float64 logits). The backward uses row_max and log_sum_exp separately: x − row_max is exact, where
        x − lse would lose lse's rounding (large at logits of ±3e4). A label outside the slice is never read
        out of bounds.
Rows whose label is ignore_index read no logits and write 0 everywhere.

One program per row. The row is streamed in BLOCK_V-wide blocks, each read as SUB × (BLOCK_V / SUB) values,
with an online max and sum of exponentials kept per column in the threads' registers and reduced across
threads once at the end (online_logsumexp.py), so any V works and nothing of size V is stored. The full
blocks start on 16-byte boundaries, so that they load as vectors whatever V is (row_alignment.py).
Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..dtypes import compute_dtype
from .config import FP_FUSION, reduction_config
from .fast_exp import fast_exp
from .online_logsumexp import online_logsumexp_columns
from .pair_rows import pair_row
from .row_alignment import aligned_body, alignment, aligned_sum, needs_peel


@triton.jit
def token_logps_kernel(
    logits_ptr, labels_ptr, second_logits_ptr, second_labels_ptr,
    token_logps_ptr, row_max_ptr, log_sum_exp_ptr,
    first_rows, T, second_T, V, vocab_start,
    stride_logits_b, stride_logits_t, stride_labels_b, stride_labels_t,
    second_stride_logits_b, second_stride_logits_t, second_stride_labels_b, second_stride_labels_t,
    ignore_index,
    BLOCK_V: tl.constexpr, SUB: tl.constexpr, WRITE_TARGET: tl.constexpr, ALIGN: tl.constexpr,
    PEEL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    second, b, t = pair_row(row, first_rows, T, second_T)
    if second:
        base_ptr = second_logits_ptr
        row_offset = b * second_stride_logits_b + t * second_stride_logits_t
        label = tl.load(second_labels_ptr + b * second_stride_labels_b + t * second_stride_labels_t).to(tl.int64)
    else:
        base_ptr = logits_ptr
        row_offset = b * stride_logits_b + t * stride_logits_t
        label = tl.load(labels_ptr + b * stride_labels_b + t * stride_labels_t).to(tl.int64)
    row_logits_ptr = base_ptr + row_offset
    scored = label != ignore_index
    local_label = label - vocab_start
    in_slice = scored & (local_label >= 0) & (local_label < V)
    acc_dtype = row_max_ptr.dtype.element_ty

    # Each column of the (SUB, COLS) blocks keeps its own running max and sum of exponentials, and the columns
    # are reduced once at the end (no cross-warp reduction per block). Full blocks of the row's aligned body load
    # without a mask, one masked block covers the rest of the body, and with PEEL the unaligned head and end
    # load as one ALIGN-wide block each (row_alignment.py). Ignored rows load nothing: their logits are never
    # read.
    vocab_end = tl.where(scored, V, 0)
    head, body_end = aligned_body(row_offset, vocab_end, ALIGN, PEEL)
    full_end = head + (body_end - head) // BLOCK_V * BLOCK_V
    COLS: tl.constexpr = BLOCK_V // SUB
    lanes = tl.arange(0, SUB)[:, None] * COLS + tl.arange(0, COLS)[None, :]
    col_max = tl.full((COLS,), float("-inf"), acc_dtype)
    col_sum = tl.zeros((COLS,), acc_dtype)
    for start in range(head, full_end, BLOCK_V):
        x = tl.load(base_ptr + aligned_sum(row_offset, start, ALIGN, PEEL) + lanes).to(acc_dtype)
        col_max, col_sum = online_logsumexp_columns(col_max, col_sum, x)
    x = tl.load(base_ptr + aligned_sum(row_offset, full_end, ALIGN, PEEL) + lanes,
                mask=lanes < aligned_sum(body_end, -full_end, ALIGN, PEEL), other=float("-inf")).to(acc_dtype)
    col_max, col_sum = online_logsumexp_columns(col_max, col_sum, x)
    running_max = tl.max(col_max, axis=0)
    if PEEL:
        edge = tl.arange(0, ALIGN)
        head_x = tl.load(row_logits_ptr + edge, mask=(edge < head) & (edge < vocab_end),
                         other=float("-inf")).to(acc_dtype)
        end_x = tl.load(row_logits_ptr + body_end + edge, mask=body_end + edge < vocab_end,
                        other=float("-inf")).to(acc_dtype)
        running_max = tl.maximum(running_max, tl.maximum(tl.max(head_x, axis=0), tl.max(end_x, axis=0)))
    # An ignored row (or a scored row of all -inf, whose log-prob is then nan as in log_softmax) has no finite
    # max: shift by 0 rather than by -inf.
    row_max = tl.where(running_max == float("-inf"), 0.0, running_max).to(acc_dtype)
    running_sum = tl.sum(col_sum * fast_exp(col_max - row_max), axis=0)
    if PEEL:
        running_sum += tl.sum(fast_exp(head_x - row_max) + fast_exp(end_x - row_max), axis=0)
    log_sum_exp = tl.log(tl.where(scored, running_sum, 1.0))

    target_logit = tl.load(row_logits_ptr + tl.where(in_slice, local_label, 0), mask=in_slice,
                           other=0.0).to(acc_dtype)
    if WRITE_TARGET:
        token_logp = target_logit
    else:
        token_logp = tl.where(in_slice, (target_logit - row_max) - log_sum_exp, float("nan"))
        token_logp = tl.where(scored, token_logp, 0.0)
    tl.store(token_logps_ptr + row, token_logp)
    tl.store(row_max_ptr + row, tl.where(scored, row_max, 0.0))
    tl.store(log_sum_exp_ptr + row, tl.where(scored, log_sum_exp, 0.0))


def token_logps_and_lse(logits: list[torch.Tensor], labels: list[torch.Tensor], ignore_index: int,
                        vocab_start: int = 0, write_target: bool = False):
    """(token_logps, row_max, log_sum_exp), contiguous in the compute dtype (see above): (B, T) for one grid,
    flat (B·T + B2·T2,) for two.

    logits: one or two (B, T, V) tensors of one dtype and V, each with stride(-1) == 1; labels: their (B, T)."""
    (first, second), (first_labels, second_labels) = (logits[0], logits[-1]), (labels[0], labels[-1])  # one grid: twice
    first_rows = first.shape[0] * first.shape[1]
    rows = sum(part.numel() for part in labels)
    acc_dtype = compute_dtype(first.dtype)
    token_logps = torch.empty(first_labels.shape if len(labels) == 1 else (rows,), dtype=acc_dtype,
                              device=first.device)
    row_max = torch.empty_like(token_logps)
    log_sum_exp = torch.empty_like(token_logps)
    if rows == 0:
        return token_logps, row_max, log_sum_exp
    block_v, num_warps = reduction_config(first.shape[2], first.element_size())
    # SUB rows per block, so that each thread's part of a row is one 16-byte access wide (16 / element size
    # columns) and the per-column max over the rows stays in its registers.
    sub = max(1, block_v // (16 // first.element_size() * 32 * num_warps))
    token_logps_kernel[(rows,)](
        first, first_labels, second, second_labels,
        token_logps, row_max, log_sum_exp,
        first_rows, first.shape[1], second.shape[1], first.shape[2], vocab_start,
        first.stride(0), first.stride(1), first_labels.stride(0), first_labels.stride(1),
        second.stride(0), second.stride(1), second_labels.stride(0), second_labels.stride(1),
        ignore_index,
        BLOCK_V=block_v, SUB=sub, WRITE_TARGET=write_target, ALIGN=alignment(first.element_size()),
        PEEL=needs_peel([first, second], block_v), num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )
    return token_logps, row_max, log_sum_exp
