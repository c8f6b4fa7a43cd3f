"""Backward of the logit-free path: turn one recomputed vocabulary chunk of logits into its gradient, in place.

Reads   raw logits r[n, j] of the columns v0 + j, j in [0, C) (float32 / bfloat16 / float16 / float64, last
        dimension contiguous), labels y[n] (int64), the transform's (scale, cap, inv_temperature) when
        HAS_TRANSFORM (logit_transform.py: x = transform(r)), the forward's row max m[n] and
        s[n] = log Σ_v exp(x[n, v] − m[n]) over the whole vocabulary, and one grad_scale g[n] per row
        (the incoming gradient of the row's log-prob; 0 for a row that is not scored); m, s, g in float32
        (float64 for float64).
Writes  G[n, j] = g[n] · (1[v0 + j = y[n]] − exp((x[n, j] − m[n]) − s[n])) · dx/dr[n, j]
computed in float32 (float64; log_prob_grad.py), stored over r in the chunk's dtype. m and s are kept apart
rather than summed into lse = m + s, which float32 would round (by up to 1e-3 at |lse| ~ 3e4) before the
subtraction.
The caller then multiplies G by the hidden states and the weight chunk (GEMMs) for the weight, bias and
hidden-state gradients.

Grid: (rows, splits of the chunk); the chunk's columns are split only when there are too few rows to fill
the GPU. Offsets are int64. Every element is read once and written once; no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import FP_FUSION, gradient_config
from .log_prob_grad import label_lane, log_prob_grad
from .logit_transform import load_transform, transform_derivative, transformed_logits


@triton.jit
def chunk_logits_grad_kernel(
    logits_ptr, labels_ptr, params_ptr, row_max_ptr, log_sum_exp_ptr, grad_scale_ptr,
    C, vocab_start, stride_logits_n, blocks_per_program,
    HAS_TRANSFORM: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    row_logits_ptr = logits_ptr + row * stride_logits_n
    acc_dtype = log_sum_exp_ptr.dtype.element_ty

    row_max = tl.load(row_max_ptr + row)
    log_sum_exp = tl.load(log_sum_exp_ptr + row)
    grad_scale = tl.load(grad_scale_ptr + row).to(acc_dtype)
    local_label = tl.load(labels_ptr + row).to(tl.int64) - vocab_start
    if HAS_TRANSFORM:
        scale, cap, inv_temperature = load_transform(params_ptr)
    first_col = split * blocks_per_program * BLOCK_V
    lanes = tl.arange(0, BLOCK_V)
    for i in range(0, blocks_per_program):
        column = first_col + i * BLOCK_V
        cols = column + lanes
        in_chunk = cols < C
        raw = tl.load(row_logits_ptr + cols, mask=in_chunk, other=0.0).to(acc_dtype)
        x = raw
        if HAS_TRANSFORM:
            x = transformed_logits(raw, scale, cap, inv_temperature, HAS_SOFTCAP)
        grad = log_prob_grad(x, row_max, log_sum_exp, grad_scale, lanes == label_lane(local_label, column, BLOCK_V))
        if HAS_TRANSFORM:
            grad = grad * transform_derivative(raw, scale, cap, inv_temperature, HAS_SOFTCAP)
        tl.store(row_logits_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_chunk)


def chunk_logits_grad_(logits_chunk: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                       row_max: torch.Tensor, log_sum_exp: torch.Tensor, grad_scale: torch.Tensor,
                       transform=None) -> torch.Tensor:
    """Overwrite logits_chunk (N, C), stride(-1) == 1, with its gradient and return it.

    labels (N,) int64; row_max, log_sum_exp and grad_scale (N,) in the compute dtype; all contiguous.
    transform: None, or (params, has_softcap).
    """
    rows, width = logits_chunk.shape
    if rows == 0 or width == 0:
        return logits_chunk
    block_v, num_warps, blocks_per_program = gradient_config(rows, width, logits_chunk.element_size())
    splits = triton.cdiv(triton.cdiv(width, block_v), blocks_per_program)
    chunk_logits_grad_kernel[(rows, splits)](
        logits_chunk, labels, row_max if transform is None else transform[0], row_max, log_sum_exp, grad_scale,
        width, vocab_start, logits_chunk.stride(0), blocks_per_program,
        HAS_TRANSFORM=transform is not None, HAS_SOFTCAP=transform is not None and transform[1],
        BLOCK_V=block_v, num_warps=num_warps, enable_fp_fusion=FP_FUSION,
    )
    return logits_chunk
