"""The rows of one or two token grids in one launch (a `@triton.jit` helper, inlined where it is called).

The logits path's kernels read chosen and rejected logits, (B, T, V) and (B, T2, V), in a single launch:
flat row r < first_rows = B·T is row (r // T, r % T) of the first grid, any later row r is row
((r − B·T) // T2, (r − B·T) % T2) of the second. One grid alone is the first with no second rows.
"""

import triton
import triton.language as tl


@triton.jit
def pair_row(row, first_rows, first_len, second_len):
    """(second, b, t) of flat row `row` (int64): whether it lies in the second grid, and its batch and time
    index there."""
    second = row >= first_rows
    local = tl.where(second, row - first_rows, row)
    length = tl.where(second, second_len, first_len).to(tl.int64)
    return second, local // length, local % length
