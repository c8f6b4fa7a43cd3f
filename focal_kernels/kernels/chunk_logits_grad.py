"""Backward of the logit-free path: turn one recomputed vocabulary chunk of logits into its gradient, in place.

Reads   logits x[n, j] of the columns v0 + j, j in [0, C) (float32 / bfloat16 / float16 / float64, last
        dimension contiguous), labels y[n] (int64, every row scored), the forward's lse[n] and one
        grad_scale g[n] per row (the incoming gradient of the row's sequence; float32, float64 for float64).
Writes  G[n, j] = g[n] · (1[v0 + j = y[n]] − exp(x[n, j] − lse[n]))
computed in float32 (float64), stored over x in the chunk's dtype. The caller then multiplies G by the
hidden states and the weight chunk (GEMMs) for the weight, bias and hidden-state gradients.

Grid: (rows, splits of the chunk); the chunk's columns are split only when there are too few rows to fill
the GPU. Offsets are int64. Every element is read once and written once; no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import gradient_config


@triton.jit
def chunk_logits_grad_kernel(
    logits_ptr, labels_ptr, lse_ptr, grad_scale_ptr,
    C, vocab_start, stride_logits_n, blocks_per_program,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    row_logits_ptr = logits_ptr + row * stride_logits_n
    acc_dtype = lse_ptr.dtype.element_ty

    lse = tl.load(lse_ptr + row)
    grad_scale = tl.load(grad_scale_ptr + row).to(acc_dtype)
    local_label = tl.load(labels_ptr + row).to(tl.int64) - vocab_start
    first_col = split * blocks_per_program * BLOCK_V
    for i in range(0, blocks_per_program):
        cols = first_col + i * BLOCK_V + tl.arange(0, BLOCK_V)
        in_chunk = cols < C
        x = tl.load(row_logits_ptr + cols, mask=in_chunk, other=0.0).to(acc_dtype)
        probs = tl.exp(x - lse)
        grad = grad_scale * (tl.where(cols == local_label, 1.0, 0.0) - probs)
        tl.store(row_logits_ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=in_chunk)


def chunk_logits_grad_(logits_chunk: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                       lse: torch.Tensor, grad_scale: torch.Tensor) -> torch.Tensor:
    """Overwrite logits_chunk (N, C), stride(-1) == 1, with its gradient and return it.

    labels (N,) int64, lse and grad_scale (N,) in the compute dtype, all contiguous.
    """
    rows, width = logits_chunk.shape
    if rows == 0 or width == 0:
        return logits_chunk
    block_v, num_warps, blocks_per_program = gradient_config(rows, width, logits_chunk.element_size())
    splits = triton.cdiv(triton.cdiv(width, block_v), blocks_per_program)
    chunk_logits_grad_kernel[(rows, splits)](
        logits_chunk, labels, lse, grad_scale,
        width, vocab_start, logits_chunk.stride(0), blocks_per_program,
        BLOCK_V=block_v, num_warps=num_warps,
    )
    return logits_chunk
