"""Launch parameters for the row kernels, chosen from the vocabulary size and element size (and, for the
backward's vocabulary split, the number of rows).

Fixed heuristics rather than autotuning: the same shape always gets the same configuration, so results
are bitwise reproducible for the same shape and layout (a row's 16-byte offset decides where its aligned
blocks start: row_alignment.py) and the first call pays no tuning sweep. benchmarks/NOTES.md records how these
numbers were measured.
"""

from __future__ import annotations

import triton

# Every launch asks for floating-point contraction (a·b + c as one fused multiply-add) rather than taking
# Triton's default: on through 3.9, which warns at the first compile that 3.10 turns it off. The kernels'
# instruction counts (benchmarks/NOTES.md) and the tolerances of their GPU tests were set with it on.
FP_FUSION = True

# Bytes of one row that a program holds per loop iteration, and warps per program. Measured on an H200
# with benchmarks/sweep_configs.py (bf16, 16K rows, V = 32000 and 128256; see benchmarks/NOTES.md): the
# forward's online reduction is fastest at 16 KiB blocks with 8 warps, the backward's elementwise pass at
# 8 KiB blocks with 16 warps; larger blocks or more warps lose 10-40%.
_FORWARD_BLOCK_BYTES, _FORWARD_WARPS = 16384, 8
_BACKWARD_BLOCK_BYTES, _BACKWARD_WARPS = 8192, 16
# Half-precision forward: the run-2 sweep measured 4096-wide blocks with 4 warps at 0.993 ms against 1.07 ms
# for 8192 / 8 (bf16, V = 128256, 16K rows: the logits path's forward kernel); adopted 2026-12-02 with the
# per-lane reduction, kept for its per-column successor (2026-12-07, 48 registers where the per-lane one took
# 108-117: more warps may pay now), neither re-measured end to end. The hidden-state path's chunk fold
# (chunk_lse_update) reads the same configuration: its own best one has not been swept.
_HALF_FORWARD_BLOCK_BYTES, _HALF_FORWARD_WARPS = 8192, 4
# Rows below this count get their vocabulary split over several programs in the backward.
_MIN_PROGRAMS = 4 * 132


def _block_and_warps(vocab: int, element_size: int, block_bytes: int, max_warps: int):
    block_v = min(triton.next_power_of_2(vocab), max(block_bytes // element_size, 16))
    # Small rows (small V) get fewer warps: at least 4 elements (one 8-16 byte access) per thread.
    num_warps = max(1, min(max_warps, block_v // (4 * 32)))
    return block_v, num_warps


def reduction_config(vocab: int, element_size: int):
    """(BLOCK_V, num_warps) for the forward's online logsumexp over one row."""
    if element_size == 2:
        return _block_and_warps(vocab, element_size, _HALF_FORWARD_BLOCK_BYTES, _HALF_FORWARD_WARPS)
    return _block_and_warps(vocab, element_size, _FORWARD_BLOCK_BYTES, _FORWARD_WARPS)


def fold_config(vocab: int, element_size: int, stats: bool):
    """(BLOCK_V, num_warps) for the hidden-state path's chunk fold (chunk_lse_update): the forward's, with at
    most 16 elements a thread when it folds per-token statistics too. Offline sm_90 counts (benchmarks/NOTES.md,
    not timed): with entropy, logit sum, top-1 and Σp², a 4096-wide bf16 block on 4 warps takes 118 registers
    (the compiler's interleaving), on 8 warps 64 (the old kernel's, at 4 warps) and 24 instructions a logit
    against the old kernel's 27."""
    block_v, num_warps = reduction_config(vocab, element_size)
    if stats:
        num_warps = max(num_warps, min(block_v // (16 * 32), 8))
    return block_v, num_warps


def gradient_config(rows: int, vocab: int, element_size: int):
    """(BLOCK_V, num_warps, blocks_per_program) for the backward; the vocabulary is split when rows are few."""
    block_v, num_warps = _block_and_warps(vocab, element_size, _BACKWARD_BLOCK_BYTES, _BACKWARD_WARPS)
    blocks_per_row = triton.cdiv(vocab, block_v)
    splits = min(blocks_per_row, max(1, triton.cdiv(_MIN_PROGRAMS, max(rows, 1))))
    blocks_per_program = triton.cdiv(blocks_per_row, splits)
    return block_v, num_warps, blocks_per_program
