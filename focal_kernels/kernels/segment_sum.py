"""Per-sequence sums of per-token values over segments of one flat array, deterministic.

Reads   values (N,) contiguous, float32 (float64), and the segments, either
          packed: offsets (S+1,) int32 / int64, segment s = values[offsets[s] : offsets[s+1]] (offsets
                  non-decreasing, offsets[0] = 0, offsets[S] = N); offsets outside [0, N] (unvalidated input)
                  are clamped into it: never an out-of-bounds read; or
          padded: B segments of T values, then B2 segments of T2 (chosen and rejected token grids flattened
                  one after the other, as the logits path's forward writes them); no offsets tensor.
Writes  sums[s] = Σ values of segment s, values' dtype, an empty segment summing to 0: the first B (packed:
        all S) segments into `sums`, the B2 others into `second_sums`.

One program per segment walks it in BLOCK-wide blocks in a fixed order and reduces once at the end: no
atomics, so the same inputs always give the same bits. Offsets are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import FP_FUSION


@triton.jit
def segment_sum_kernel(values_ptr, offsets_ptr, sums_ptr, second_sums_ptr, N, first_segments, first_tokens, T,
                       second_T, PACKED: tl.constexpr, BLOCK: tl.constexpr):
    segment = tl.program_id(0).to(tl.int64)
    second = segment >= first_segments
    if PACKED:
        # Offsets that were not validated (validate_labels=False, torch.compile, CUDA graphs) may lie outside
        # [0, N]: clamped, so that nothing outside values is ever read.
        start = tl.minimum(tl.maximum(tl.load(offsets_ptr + segment).to(tl.int64), 0), N)
        stop = tl.minimum(tl.maximum(tl.load(offsets_ptr + segment + 1).to(tl.int64), start), N)
    else:
        start = tl.where(second, first_tokens + (segment - first_segments) * second_T, segment * T)
        stop = start + tl.where(second, second_T, T)
    partial = tl.zeros((BLOCK,), dtype=sums_ptr.dtype.element_ty)
    for first in range(start, stop, BLOCK):
        index = first + tl.arange(0, BLOCK)
        partial += tl.load(values_ptr + index, mask=index < stop, other=0.0)
    if second:
        tl.store(second_sums_ptr + (segment - first_segments), tl.sum(partial, axis=0))
    else:
        tl.store(sums_ptr + segment, tl.sum(partial, axis=0))


def segment_block(tokens: int) -> int:
    """BLOCK for segments of about `tokens` values."""
    return min(max(triton.next_power_of_2(max(tokens, 1)), 16), 1024)


def segment_sum(values: torch.Tensor, offsets: torch.Tensor | None, batches=(), seq_lens=()) -> list[torch.Tensor]:
    """Per-segment sums of values (N,) contiguous, in values' dtype: [(S,)] for packed offsets (S+1,) on
    values' device, else [(B,)] or [(B,), (B2,)] for the padded grids of batches (B[, B2]) and seq_lens
    (T[, T2]) (values then holds B·T [+ B2·T2] values)."""
    if offsets is not None:
        batches, seq_lens = [offsets.shape[0] - 1], [values.shape[0] // max(offsets.shape[0] - 1, 1)]
    sums = [torch.empty((batch,), dtype=values.dtype, device=values.device) for batch in batches]
    segments = sum(batches)
    if segments:
        first, second = (batches[0], seq_lens[0]), (batches[-1], seq_lens[-1])
        block = segment_block(max(seq_lens))
        segment_sum_kernel[(segments,)](values, values if offsets is None else offsets, sums[0], sums[-1],
                                        values.shape[0], first[0], first[0] * first[1], first[1], second[1],
                                        PACKED=offsets is not None, BLOCK=block, num_warps=4,
                                        enable_fp_fusion=FP_FUSION)
    return sums
