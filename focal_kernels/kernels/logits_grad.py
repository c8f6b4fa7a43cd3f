"""Backward: the gradient of Σ_b g_b · logp_b with respect to the logits, recomputing the softmax.

Reads   logits x[b, t, :] of the vocabulary columns [v0, v0 + V), labels y[b, t] (global ids; v0 =
        vocab_start is 0 unless the vocabulary is split over ranks), the forward's row_max[b, t] and
        log_sum_exp[b, t] (over the whole vocabulary: lse = row_max + log_sum_exp) and the incoming gradient
        g[b, t] of each token's log-prob (any strides: a padded sequence's gradient broadcast over its tokens
        is read with a time stride of 0), in float32 (float64 for float64 logits).
Writes  grad[b, t, v] = g[b, t] · m_t · (1[v0 + v = y_t] − exp((x[b, t, v] − row_max) − log_sum_exp))  in the logits' dtype,
        computed in float32 (float64), into `grad` (a fresh tensor, or the logits themselves in place).
Rows whose label is ignore_index read no logits and write zeros; every element of `grad` is written.

Grid: (rows, vocabulary splits). Each program covers blocks_per_program · BLOCK_V columns of one row;
the vocabulary is split only when there are too few rows to fill the GPU. Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import gradient_config


@triton.jit
def logits_grad_kernel(
    logits_ptr, labels_ptr, row_max_ptr, log_sum_exp_ptr, grad_scale_ptr, grad_ptr,
    T, V, vocab_start, blocks_per_program,
    stride_logits_b, stride_logits_t,
    stride_labels_b, stride_labels_t,
    stride_scale_b, stride_scale_t,
    stride_grad_b, stride_grad_t,
    ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    b = row // T
    t = row % T
    label = tl.load(labels_ptr + b * stride_labels_b + t * stride_labels_t).to(tl.int64)
    scored = label != ignore_index
    local_label = label - vocab_start
    acc_dtype = row_max_ptr.dtype.element_ty
    row_logits_ptr = logits_ptr + b * stride_logits_b + t * stride_logits_t
    row_grad_ptr = grad_ptr + b * stride_grad_b + t * stride_grad_t
    first_col = split * blocks_per_program * BLOCK_V
    # One branch per row kind, so that every mask is the plain `cols < V` (its alignment is known to the
    # compiler through V's divisibility specialization; a row-dependent bound's is not).
    if scored:
        row_max = tl.load(row_max_ptr + row)
        log_sum_exp = tl.load(log_sum_exp_ptr + row)
        grad_scale = tl.load(grad_scale_ptr + b * stride_scale_b + t * stride_scale_t).to(acc_dtype)
        for i in range(0, blocks_per_program):
            cols = first_col + i * BLOCK_V + tl.arange(0, BLOCK_V)
            in_row = cols < V
            x = tl.load(row_logits_ptr + cols, mask=in_row, other=float("-inf")).to(acc_dtype)
            probs = tl.exp((x - row_max) - log_sum_exp)
            grad = grad_scale * (tl.where(cols == local_label, 1.0, 0.0) - probs)
            tl.store(row_grad_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)
    else:  # an ignored row: its logits are never read, its gradient is zero
        zeros = tl.zeros((BLOCK_V,), dtype=grad_ptr.dtype.element_ty)
        for i in range(0, blocks_per_program):
            cols = first_col + i * BLOCK_V + tl.arange(0, BLOCK_V)
            tl.store(row_grad_ptr + cols, zeros, mask=cols < V)


def logits_grad(logits, labels, row_max, log_sum_exp, grad_scale, ignore_index, vocab_start=0, out=None):
    """Write the logits' gradient into `out` (default: a new tensor shaped like `logits`) and return it.

    grad_scale is (B, T), any strides, in row_max's dtype. `out`, when given, must have the logits' shape and dtype and
    stride(-1) == 1; passing `logits` itself computes the gradient in place.
    """
    batch, seq_len, vocab = logits.shape
    if out is None:
        out = torch.empty_like(logits)  # the logits' own layout where dense, else contiguous (as the fake)
    rows = batch * seq_len
    if rows == 0:
        return out
    block_v, num_warps, blocks_per_program = gradient_config(rows, vocab, logits.element_size())
    splits = triton.cdiv(triton.cdiv(vocab, block_v), blocks_per_program)
    logits_grad_kernel[(rows, splits)](
        logits, labels, row_max, log_sum_exp, grad_scale, out,
        seq_len, vocab, vocab_start, blocks_per_program,
        logits.stride(0), logits.stride(1),
        labels.stride(0), labels.stride(1),
        grad_scale.stride(0), grad_scale.stride(1),
        out.stride(0), out.stride(1),
        ignore_index,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return out
