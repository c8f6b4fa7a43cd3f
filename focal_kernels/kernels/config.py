"""Launch parameters for the row kernels, chosen from the vocabulary size and element size.

Fixed heuristics rather than autotuning: the same shape always gets the same configuration, so results
are bitwise reproducible and the first call pays no tuning sweep. benchmarks/NOTES.md records how these
numbers were measured.
"""

from __future__ import annotations

import triton

# Bytes of one row that a program holds in registers per loop iteration.
_BYTES_PER_BLOCK = 32768
# Rows below this count get their vocabulary split over several programs in the backward.
_MIN_PROGRAMS = 4 * 132


def _block_and_warps(vocab: int, element_size: int, bytes_per_block: int):
    block_v = min(triton.next_power_of_2(vocab), max(bytes_per_block // element_size, 16))
    if block_v >= 8192:
        num_warps = 16
    elif block_v >= 2048:
        num_warps = 8
    else:
        num_warps = 4
    return block_v, num_warps


def reduction_config(vocab: int, element_size: int):
    """(BLOCK_V, num_warps) for the forward's online logsumexp over one row."""
    return _block_and_warps(vocab, element_size, _BYTES_PER_BLOCK)


def gradient_config(rows: int, vocab: int, element_size: int):
    """(BLOCK_V, num_warps, blocks_per_program) for the backward; the vocabulary is split when rows are few."""
    block_v, num_warps = _block_and_warps(vocab, element_size, _BYTES_PER_BLOCK)
    blocks_per_row = triton.cdiv(vocab, block_v)
    splits = min(blocks_per_row, max(1, triton.cdiv(_MIN_PROGRAMS, max(rows, 1))))
    blocks_per_program = triton.cdiv(blocks_per_row, splits)
    return block_v, num_warps, blocks_per_program
