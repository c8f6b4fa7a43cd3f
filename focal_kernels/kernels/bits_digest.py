"""A digest of a tensor's exact bits, to check that ranks hold the same values without sending them.

Reads   bits (B, T, C), any strides: a float tensor viewed as integers of its width, at most 32 bits (bf16 /
        fp16 as int16, fp32 as int32, fp64 as two int32 words), so that the digest sees bits, not values (NaN
        equals its own bits, -0.0 differs from 0.0).
Writes  partial[p] = Σ_{rows r of program p, c} bits[r, c] · u(c) · w(r), int64 arithmetic wrapping modulo
        2^64 (r = b·T + t), where w(r) = mix(2r + 1) and u(c) = mix(2c + 2) are odd splitmix64-style mixes of
        the position. The caller sums the partials (int64, wrapping): the digest.

Integer addition modulo 2^64 is associative, so the digest depends on the bits alone, not on the layout,
the launch configuration or the device. Two tensors that differ in one element always differ in digest
(odd weights times a nonzero difference below 2^33 are nonzero modulo 2^64); two that differ in more
elements collide only by an accident of probability about 2^-32 or less (a sign flip changes a 32-bit word
by 2^31; in 64-bit words two flips would cancel exactly, hence the 32-bit words). Different row and column
mixes keep a transposed square tensor from matching. Offsets are int64. A 16 × 256 tile over 8 warps keeps
16 int64 partial sums per thread (about 80 registers for sm_90, no spills: tests/gpu_compile.py
--resources; 16 × 256 over 4 warps needed 150).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import FP_FUSION


@triton.jit
def _mix(z):
    """An odd pseudo-random int64 per int64 position (splitmix64's finalizer with arithmetic shifts)."""
    z = z * -7046029254386353131  # 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return (z ^ (z >> 31)) | 1


@triton.jit
def bits_digest_kernel(bits_ptr, partial_ptr, R, T, C, stride_b, stride_t, stride_c,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    program = tl.program_id(0)
    rows = program.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_offsets = (rows // T) * stride_b + (rows % T) * stride_t
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.int64)
    for first in range(0, C, BLOCK_C):
        cols = first + tl.arange(0, BLOCK_C).to(tl.int64)
        mask = (rows < R)[:, None] & (cols < C)[None, :]
        x = tl.load(bits_ptr + row_offsets[:, None] + cols[None, :] * stride_c, mask=mask, other=0)
        acc += x.to(tl.int64) * _mix(2 * cols + 2)[None, :]
    tl.store(partial_ptr + program, tl.sum(tl.sum(acc, axis=1) * _mix(2 * rows + 1), axis=0))


def bits_digest(bits: torch.Tensor) -> torch.Tensor:
    """The 0-dim int64 digest (on bits' device, no host read) of an integer tensor (B, T, C)."""
    batch, seq_len, width = bits.shape
    rows = batch * seq_len
    if rows == 0 or width == 0:
        return torch.zeros((), dtype=torch.int64, device=bits.device)
    block_r, block_c = 16, min(max(triton.next_power_of_2(width), 16), 256)
    programs = triton.cdiv(rows, block_r)
    partial = torch.full((programs,), -1, dtype=torch.int64, device=bits.device)  # poisoned: every one written
    bits_digest_kernel[(programs,)](bits, partial, rows, seq_len, width, *bits.stride(), BLOCK_R=block_r,
                                    BLOCK_C=block_c, num_warps=8,
                                    enable_fp_fusion=FP_FUSION)
    return partial.sum()
