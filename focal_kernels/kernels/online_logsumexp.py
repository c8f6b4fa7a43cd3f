"""The online logsumexp step shared by the row kernels (a `@triton.jit` helper, inlined where it is called).

Given the running max m and running sum s = Σ exp(x_seen − m) of a row so far, and the next block x:
    m' = max(m, max_j x_j),     s' = s · exp(m − m') + Σ_j exp(x_j − m')
so that after the last block logsumexp(row) = m + log s. Masked-out columns must be loaded as −inf.
A row that is −inf so far keeps m' = −inf and is rescaled by 0, not by exp(nan).
"""

import triton
import triton.language as tl


@triton.jit
def online_logsumexp_step(running_max, running_sum, x):
    new_max = tl.maximum(running_max, tl.max(x, axis=0))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max).to(running_sum.dtype)
    new_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(x - safe_max), axis=0)
    return new_max, new_sum
