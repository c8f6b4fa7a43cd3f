"""Per-sequence sum of per-token log-probabilities, deterministic.

Reads   token_logps (B, T), contiguous, float32 (float64).
Writes  sequence_logps[b] = Σ_t token_logps[b, t]   (B,), same dtype.

One program per sequence walks its row in BLOCK_T-wide blocks in a fixed order and reduces once at the
end: no atomics, so the same inputs always give the same bits. A packed layout (several sequences in one
row, told apart by segment ids) becomes a segmented version of this one kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def row_sum(row_ptr, T, BLOCK_T: tl.constexpr, acc_dtype: tl.constexpr):
    """Σ of a contiguous row of T values, in BLOCK_T-wide blocks in a fixed order, reduced once."""
    partial = tl.zeros((BLOCK_T,), dtype=acc_dtype)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        partial += tl.load(row_ptr + cols, mask=cols < T, other=0.0)
    return tl.sum(partial, axis=0)


@triton.jit
def sequence_sum_kernel(token_logps_ptr, sequence_logps_ptr, T, BLOCK_T: tl.constexpr):
    seq = tl.program_id(0).to(tl.int64)
    total = row_sum(token_logps_ptr + seq * T, T, BLOCK_T, sequence_logps_ptr.dtype.element_ty)
    tl.store(sequence_logps_ptr + seq, total)


def row_block(seq_len: int) -> int:
    """BLOCK_T for rows of seq_len values."""
    return min(max(triton.next_power_of_2(seq_len), 16), 1024)


def sequence_sum(token_logps: torch.Tensor) -> torch.Tensor:
    """(B, T) contiguous → (B,)."""
    batch, seq_len = token_logps.shape
    out = torch.empty((batch,), dtype=token_logps.dtype, device=token_logps.device)
    sequence_sum_kernel[(batch,)](token_logps, out, seq_len, BLOCK_T=row_block(seq_len), num_warps=4)
    return out
