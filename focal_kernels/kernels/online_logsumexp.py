"""The online logsumexp step of the logits path's forward, per column of a block (a `@triton.jit` helper,
inlined where it is called).

A block of BLOCK_V logits is read as SUB × COLS values x[i, j] (offset i·COLS + j), laid out so that one
thread holds all SUB values of each of its columns: the max over i needs no other thread. Column j keeps the
running max m_j and sum s_j = Σ exp(x_seen − m_j) of the blocks it has seen; for the next block
    m_j' = max(m_j, max_i x[i, j]),     s_j' = s_j · exp(m_j − m_j') + Σ_i exp(x[i, j] − m_j')
and, once the row is done, m = max_j m_j and s = Σ_j s_j · exp(m_j − m), so that logsumexp(row) = m + log s.
That is 1 + 1/SUB exponentials per element and a handful of other instructions (an earlier per-lane form,
s·exp(m − m') + exp(x − m') per element, took two exponentials, then one with a chain of selects: about 17
instructions per element in the sm_90 SASS at bf16, more than a GPU issues at bf16 bandwidth; this form about
8). The caller picks SUB so that a thread's columns are one 16-byte access wide (token_logps.py).
Masked-out columns must be loaded as −inf. A column that is −inf so far is shifted by 0 (exp(−inf − 0) = 0),
not by −inf (exp(nan)); a NaN makes its column's sum NaN, so NaN in, NaN out.
"""

import triton
import triton.language as tl

from .fast_exp import fast_exp


@triton.jit
def online_logsumexp_columns(col_max, col_sum, x):
    """(m', s') of the columns (COLS,) after the block x (SUB, COLS)."""
    new_max = tl.maximum(col_max, tl.max(x, axis=0))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    new_sum = col_sum * fast_exp(col_max - shift) + tl.sum(fast_exp(x - shift[None, :]), axis=0)
    return new_max, new_sum
