"""Forward of the logit-free path: fold one vocabulary chunk of logits into running per-token state.

Reads   logits x[n, j] of one chunk, the columns v0 + j for j in [0, C) (float32 / bfloat16 / float16 /
        float64, last dimension contiguous), labels y[n] (int64, every row scored), and the running
        max[n], sum[n], target[n] (float32, float64 for float64 logits).
Writes  max'[n] = max(max[n], max_j x[n, j])
        sum'[n] = sum[n] · exp(max[n] − max'[n]) + Σ_j exp(x[n, j] − max'[n])
        target'[n] = x[n, y[n] − v0]   when v0 <= y[n] < v0 + C, else target[n] unchanged
in place, in float32 (float64). After the last chunk, lse = max + log(sum) and log p(y) = target − lse.

One program per row; the chunk row is streamed in BLOCK_V-wide blocks with the same online update, starting
from the running state, so the merge across chunks is exact algebra, not an approximation. Offsets int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import reduction_config
from .online_logsumexp import online_logsumexp_step


@triton.jit
def chunk_lse_update_kernel(
    logits_ptr, labels_ptr, running_max_ptr, running_sum_ptr, target_logits_ptr,
    C, vocab_start, stride_logits_n,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits_ptr = logits_ptr + row * stride_logits_n
    acc_dtype = running_sum_ptr.dtype.element_ty

    running_max = tl.load(running_max_ptr + row)
    running_sum = tl.load(running_sum_ptr + row)
    for start in range(0, C, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_logits_ptr + cols, mask=cols < C, other=float("-inf")).to(acc_dtype)
        running_max, running_sum = online_logsumexp_step(running_max, running_sum, x)
    tl.store(running_max_ptr + row, running_max)
    tl.store(running_sum_ptr + row, running_sum)

    local_label = tl.load(labels_ptr + row).to(tl.int64) - vocab_start
    in_chunk = (local_label >= 0) & (local_label < C)
    picked = tl.load(row_logits_ptr + tl.where(in_chunk, local_label, 0), mask=in_chunk, other=0.0).to(acc_dtype)
    previous = tl.load(target_logits_ptr + row)
    tl.store(target_logits_ptr + row, tl.where(in_chunk, picked, previous))


def chunk_lse_update(logits_chunk: torch.Tensor, labels: torch.Tensor, vocab_start: int,
                     running_max: torch.Tensor, running_sum: torch.Tensor, target_logits: torch.Tensor) -> None:
    """Update running_max, running_sum and target_logits (each (N,) contiguous, compute dtype) in place.

    logits_chunk (N, C) with stride(-1) == 1 holds the logits of vocabulary rows [vocab_start, vocab_start + C);
    labels (N,) int64 contiguous, all in [0, V).
    """
    rows, width = logits_chunk.shape
    if rows == 0 or width == 0:
        return
    block_v, num_warps = reduction_config(width, logits_chunk.element_size())
    chunk_lse_update_kernel[(rows,)](
        logits_chunk, labels, running_max, running_sum, target_logits,
        width, vocab_start, logits_chunk.stride(0),
        BLOCK_V=block_v, num_warps=num_warps,
    )
