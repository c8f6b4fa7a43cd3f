"""Per-sequence sums of per-token values over segments of one flat array, deterministic.

Reads   values (N,) contiguous, float32 (float64), and offsets (S+1,) int32 / int64: segment s is
        values[offsets[s] : offsets[s+1]] (offsets non-decreasing, offsets[0] = 0, offsets[S] = N).
Writes  sums[s] = Σ values[offsets[s] : offsets[s+1]]   (S,), values' dtype; an empty segment sums to 0.
        Offsets outside [0, N] (unvalidated input) are clamped into it: never an out-of-bounds read.

A padded (B, T) batch is the segments offsets = [0, T, 2T, ..., BT]; a packed batch uses its cu_seqlens.
One program per segment walks it in BLOCK-wide blocks in a fixed order and reduces once at the end: no
atomics, so the same inputs always give the same bits. Offsets are read as int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def segment_sum_kernel(values_ptr, offsets_ptr, sums_ptr, N, BLOCK: tl.constexpr):
    segment = tl.program_id(0).to(tl.int64)
    # Offsets that were not validated (validate_labels=False, torch.compile, CUDA graphs) may lie outside
    # [0, N]: clamped, so that nothing outside values is ever read.
    start = tl.minimum(tl.maximum(tl.load(offsets_ptr + segment).to(tl.int64), 0), N)
    stop = tl.minimum(tl.maximum(tl.load(offsets_ptr + segment + 1).to(tl.int64), start), N)
    partial = tl.zeros((BLOCK,), dtype=sums_ptr.dtype.element_ty)
    for first in range(start, stop, BLOCK):
        index = first + tl.arange(0, BLOCK)
        partial += tl.load(values_ptr + index, mask=index < stop, other=0.0)
    tl.store(sums_ptr + segment, tl.sum(partial, axis=0))


def segment_block(tokens: int) -> int:
    """BLOCK for segments of about `tokens` values."""
    return min(max(triton.next_power_of_2(max(tokens, 1)), 16), 1024)


def segment_sum(values: torch.Tensor, offsets: torch.Tensor, block: int) -> torch.Tensor:
    """values (N,) contiguous, offsets (S+1,) on the same device → (S,) sums in values' dtype."""
    segments = offsets.shape[0] - 1
    sums = torch.empty((segments,), dtype=values.dtype, device=values.device)
    if segments:
        segment_sum_kernel[(segments,)](values, offsets, sums, values.shape[0], BLOCK=block, num_warps=4)
    return sums
