"""exp(x) with one instruction of the GPU's exponential unit, for the kernels' per-element exponentials (a
`@triton.jit` helper, inlined where it is called).

Reads x in float32 or float64 and returns exp(x) in its dtype. Triton (3.6 to 3.9) lowers a float32 `tl.exp`
to `ex2.approx.f32` of x·log2(e), which ptxas wraps in a range test and rescaling around the hardware's ex2:
three more instructions per element in the sm_90 SASS. `tl.exp2` lowers to `ex2.approx.ftz.f32`, the bare
instruction, with the same multiply by log2(e) first, so the same rounding. The one difference: results
below 2^-126 (1.2e-38) flush to 0. Every use here adds them to a sum that holds a 1 (the running max's own
term) or scales a gradient by them (an absolute change below 1.2e-38 · its scale), except the entropy
statistic's Σ e^(x − m)·(x − m) (chunk_lse_update.py), whose max term is 0: a row whose runner-up logit is
more than about 87 below its max gets entropy 0 where float64 gives about 1e-37 or less. float64 keeps
`tl.exp` (libdevice's), for the float64 comparisons.
"""

import triton
import triton.language as tl

LOG2_E: tl.constexpr = tl.constexpr(1.4426950408889634)


@triton.jit
def fast_exp(x):
    if x.dtype == tl.float64:
        return tl.exp(x)
    return tl.exp2(x * LOG2_E)
