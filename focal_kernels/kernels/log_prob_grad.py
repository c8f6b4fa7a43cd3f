"""The gradient of one token's log-prob with respect to a block of its logits (`@triton.jit` helpers, inlined
where they are called: kernels/logits_grad.py and kernels/chunk_logits_grad.py).

    g · d log p(y) / d x_v = g · (1[v = y] − exp((x_v − m) − s))      m the row max, s = log Σ exp(x − m)

Reads a block of logits x in float32 (float64), the row's m, s and g and the label's lane in the block;
returns the block's gradient in that dtype. In float32 it takes, per element: the subtraction x − m (exact
near the max, where the probabilities are large), one fused multiply-add (x − m)·log2 e − s·log2 e (s·log2 e
rounded once, s ≤ log V), the exponential unit's ex2 (fast_exp.py: flushes results below 2^-126 to 0), and one
fused multiply-add g − g·p at the label (−g·p elsewhere): g·(1 − p) rounded once. The label's lane is found by
one 32-bit comparison of each lane index with a per-block scalar, not by 64-bit column indices. Together four
instructions an element fewer in the sm_90 SASS of logits_grad's loop (benchmarks/NOTES.md). float64 keeps the
plain formula, for the float64 comparisons. An infinite g gives NaN at the label's column (∞ − ∞·p), as it
gives NaN in the GEMMs that use the gradient; every other column is −g·p.
"""

import triton
import triton.language as tl

from .fast_exp import LOG2_E


@triton.jit
def label_lane(local_label, column, BLOCK: tl.constexpr):
    """The lane of the label's column in the block of BLOCK columns starting at `column` (int32), or -1
    when the label is not in it (ignore_index, another block, another rank's vocabulary)."""
    offset = local_label - column
    return tl.where((offset >= 0) & (offset < BLOCK), offset, -1).to(tl.int32)


@triton.jit
def log_prob_grad(x, row_max, log_sum_exp, grad_scale, is_label):
    """g · (1[label] − exp((x − m) − s)) elementwise; x in row_max's dtype, is_label a boolean block."""
    if x.dtype == tl.float64:
        return grad_scale * (tl.where(is_label, 1.0, 0.0) - tl.exp((x - row_max) - log_sum_exp))
    probs = tl.exp2(tl.fma(x - row_max, LOG2_E, -(log_sum_exp * LOG2_E)))
    return tl.fma(probs, -grad_scale, tl.where(is_label, grad_scale, 0.0))
