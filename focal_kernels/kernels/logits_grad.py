"""Backward: the gradient of Σ_b g_b · logp_b with respect to the logits, recomputing the softmax.

Reads   logits x[b, t, :] of the vocabulary columns [v0, v0 + V) (float32 / bfloat16 / float16 / float64, any
        batch and time strides, last dimension contiguous), labels y[b, t] (int32 / int64, any strides; global
        ids; v0 = vocab_start is 0 unless the vocabulary is split over ranks), the forward's row_max[b, t] and
        log_sum_exp[b, t] (over the whole vocabulary: lse = row_max + log_sum_exp) and the incoming gradient
        g[b, t] of each token's log-prob (any strides: a padded sequence's gradient broadcast over its tokens
        is read with a time stride of 0), in float32 (float64 for float64 logits).
Writes  grad[b, t, v] = g[b, t] · (1[v0 + v = y[b, t]] − exp((x[b, t, v] − row_max) − log_sum_exp)) for scored
        rows, in the logits' dtype, computed in float32 (float64; log_prob_grad.py), into `grad` (a fresh
        tensor, or the logits themselves in place). Rows whose label is ignore_index read no logits and
        write zeros; every element of `grad` is written.
One grid (B, T, V), or two of one dtype, (B, T, V) and (B2, T2, V), in one launch (chosen and rejected:
pair_rows.py), each with its own labels, g and gradient tensor; row_max and log_sum_exp are the forward's
flat (rows,) statistics of both.

Grid: (rows, vocabulary splits). Each program covers blocks_per_program · BLOCK_V columns of one row;
the vocabulary is split only when there are too few rows to fill the GPU. The blocks start on the logits'
16-byte boundaries, so that they load as vectors whatever V is, and store as vectors where the gradient's
rows lie at the same offsets (row_alignment.py). Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import FP_FUSION, gradient_config
from .log_prob_grad import label_lane, log_prob_grad
from .pair_rows import pair_row
from .row_alignment import aligned_body, alignment, aligned_sum, needs_peel, same_row_alignment


@triton.jit
def _gradient_block(x_ptr, x_offset, grad_ptr, grad_offset, column, n_valid, local_label, row_max, log_sum_exp,
                    grad_scale, scored, BLOCK: tl.constexpr, ALIGN: tl.constexpr, X_ALIGNED: tl.constexpr,
                    GRAD_ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Columns [column, column + BLOCK) of one row (the first n_valid of them when MASKED): the logits at
    x_ptr + x_offset + lane, their gradient to grad_ptr + grad_offset + lane; the offsets declared multiples
    of ALIGN where X_ALIGNED / GRAD_ALIGNED say so. An ignored row's gradient is zero, its logits unread."""
    lanes = tl.arange(0, BLOCK)
    x_at = x_ptr + aligned_sum(x_offset, column, ALIGN, X_ALIGNED) + lanes
    grad_at = grad_ptr + aligned_sum(grad_offset, column, ALIGN, GRAD_ALIGNED) + lanes
    if scored:
        if MASKED:
            x = tl.load(x_at, mask=lanes < n_valid, other=float("-inf"))
        else:
            x = tl.load(x_at)
        grad = log_prob_grad(x.to(row_max.dtype), row_max, log_sum_exp, grad_scale,
                             lanes == label_lane(local_label, column, BLOCK))
    else:
        grad = tl.zeros((BLOCK,), dtype=row_max.dtype)
    if MASKED:
        tl.store(grad_at, grad.to(grad_ptr.dtype.element_ty), mask=lanes < n_valid)
    else:
        tl.store(grad_at, grad.to(grad_ptr.dtype.element_ty))


@triton.jit
def logits_grad_kernel(
    logits_ptr, labels_ptr, grad_scale_ptr, grad_ptr,
    second_logits_ptr, second_labels_ptr, second_grad_scale_ptr, second_grad_ptr,
    row_max_ptr, log_sum_exp_ptr,
    first_rows, T, second_T, V, vocab_start, blocks_per_program,
    stride_logits_b, stride_logits_t, stride_labels_b, stride_labels_t,
    stride_scale_b, stride_scale_t, stride_grad_b, stride_grad_t,
    second_stride_logits_b, second_stride_logits_t, second_stride_labels_b, second_stride_labels_t,
    second_stride_scale_b, second_stride_scale_t, second_stride_grad_b, second_stride_grad_t,
    ignore_index,
    BLOCK_V: tl.constexpr, ALIGN: tl.constexpr, PEEL: tl.constexpr, GRAD_PEELED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    second, b, t = pair_row(row, first_rows, T, second_T)
    if second:
        label = tl.load(second_labels_ptr + b * second_stride_labels_b + t * second_stride_labels_t).to(tl.int64)
        x_ptr = second_logits_ptr
        x_offset = b * second_stride_logits_b + t * second_stride_logits_t
        out_ptr = second_grad_ptr
        grad_offset = b * second_stride_grad_b + t * second_stride_grad_t
        row_scale_ptr = second_grad_scale_ptr + b * second_stride_scale_b + t * second_stride_scale_t
    else:
        label = tl.load(labels_ptr + b * stride_labels_b + t * stride_labels_t).to(tl.int64)
        x_ptr = logits_ptr
        x_offset = b * stride_logits_b + t * stride_logits_t
        out_ptr = grad_ptr
        grad_offset = b * stride_grad_b + t * stride_grad_t
        row_scale_ptr = grad_scale_ptr + b * stride_scale_b + t * stride_scale_t
    scored = label != ignore_index
    local_label = label - vocab_start
    acc_dtype = row_max_ptr.dtype.element_ty
    row_max = tl.load(row_max_ptr + row, mask=scored, other=0.0)
    log_sum_exp = tl.load(log_sum_exp_ptr + row, mask=scored, other=0.0)
    grad_scale = tl.load(row_scale_ptr, mask=scored, other=0.0).to(acc_dtype)

    # The row's aligned body (row_alignment.py; the logits' alignment, which the gradient shares when
    # GRAD_PEELED) in BLOCK_V-wide blocks: this program's share of its full blocks unmasked, then the masked
    # block after the last full one, and in the first program the unaligned head and end (with PEEL).
    head, body_end = aligned_body(x_offset, V, ALIGN, PEEL)
    full_blocks = (body_end - head) // BLOCK_V
    first_block = split * blocks_per_program
    for block in range(first_block, tl.minimum(first_block + blocks_per_program, full_blocks)):
        _gradient_block(x_ptr, x_offset, out_ptr, grad_offset, head + block * BLOCK_V, BLOCK_V, local_label,
                        row_max, log_sum_exp, grad_scale, scored, BLOCK_V, ALIGN, PEEL, GRAD_PEELED, False)
    if (first_block <= full_blocks) & (full_blocks < first_block + blocks_per_program):
        column = head + full_blocks * BLOCK_V
        _gradient_block(x_ptr, x_offset, out_ptr, grad_offset, column, aligned_sum(body_end, -column, ALIGN, PEEL),
                        local_label, row_max, log_sum_exp, grad_scale, scored, BLOCK_V, ALIGN, PEEL, GRAD_PEELED,
                        True)
    if PEEL:
        if split == 0:
            _gradient_block(x_ptr, x_offset, out_ptr, grad_offset, 0, tl.minimum(head, V), local_label, row_max,
                            log_sum_exp, grad_scale, scored, ALIGN, ALIGN, False, False, True)
            _gradient_block(x_ptr, x_offset, out_ptr, grad_offset, body_end, V - body_end, local_label, row_max,
                            log_sum_exp, grad_scale, scored, ALIGN, ALIGN, False, False, True)


def logits_grad(logits, labels, row_max, log_sum_exp, grad_scales, ignore_index, vocab_start=0, out=None):
    """Write the gradients of one or two logits tensors into `out` (default: new tensors shaped like the
    logits) and return them, a list.

    logits, labels, grad_scales: lists of one or two; each grad_scale is (B, T), any strides, in row_max's
    dtype; row_max and log_sum_exp flat (rows,). `out`, when given, is a list of tensors with the logits'
    shapes and dtype and stride(-1) == 1; passing the logits themselves computes the gradients in place.
    """
    if out is None:
        out = [torch.empty(part.shape, dtype=part.dtype, device=part.device) for part in logits]
    first, first_labels, first_scale, first_out = logits[0], labels[0], grad_scales[0], out[0]
    # One grid is passed as both.
    second, second_labels, second_scale, second_out = logits[-1], labels[-1], grad_scales[-1], out[-1]
    first_rows = first.shape[0] * first.shape[1]
    rows = row_max.numel()
    if rows == 0:
        return out
    vocab = first.shape[2]
    block_v, num_warps, blocks_per_program = gradient_config(rows, vocab, first.element_size())
    splits = triton.cdiv(triton.cdiv(vocab, block_v), blocks_per_program)
    peel = needs_peel([first, second], block_v)
    logits_grad_kernel[(rows, splits)](
        first, first_labels, first_scale, first_out,
        second, second_labels, second_scale, second_out,
        row_max, log_sum_exp,
        first_rows, first.shape[1], second.shape[1], vocab, vocab_start, blocks_per_program,
        first.stride(0), first.stride(1), first_labels.stride(0), first_labels.stride(1),
        first_scale.stride(0), first_scale.stride(1), first_out.stride(0), first_out.stride(1),
        second.stride(0), second.stride(1), second_labels.stride(0), second_labels.stride(1),
        second_scale.stride(0), second_scale.stride(1), second_out.stride(0), second_out.stride(1),
        ignore_index,
        BLOCK_V=block_v, ALIGN=alignment(first.element_size()), PEEL=peel,
        GRAD_PEELED=peel and same_row_alignment([first, second], [first_out, second_out]), num_warps=num_warps,
        enable_fp_fusion=FP_FUSION,
    )
    return out
