"""The online logsumexp step of the logits path's forward, per lane (a `@triton.jit` helper, inlined where it
is called).

Lane j keeps the running max m_j and sum s_j = Σ exp(x_seen − m_j) of the columns it has seen; for the next
value x of each lane:
    x > m_j:   m_j' = x,     s_j' = s_j · exp(m_j − x) + 1
    else:      m_j' = m_j,   s_j' = s_j + exp(x − m_j)
and, once the row is done, m = max_j m_j and s = Σ_j s_j · exp(m_j − m), so that logsumexp(row) = m + log s.
One exponential per element, of the smaller value minus the larger (the textbook form, s_j · exp(m_j − m_j') +
exp(x − m_j'), takes two, which at bf16 bandwidth is more than the GPU's exponential units keep up with).
Masked-out columns must be loaded as −inf; an exponential whose smaller value is −inf is 0 (two −inf give
exp(−inf − 0) = 0, not exp(nan)). A NaN x makes the lane's sum NaN (the comparison is false, and exp(NaN) is NaN), so NaN in,
NaN out. (The hidden-state path's chunk kernel keeps one running state per row instead: it also carries
statistics.)
"""

import triton
import triton.language as tl


@triton.jit
def online_logsumexp_lanes(lane_max, lane_sum, x):
    grows = x > lane_max
    smaller = tl.where(grows, lane_max, x)
    new_max = tl.where(grows, x, lane_max)
    scale = tl.exp(smaller - tl.where(new_max == float("-inf"), 0.0, new_max))  # two -inf: exp(-inf - 0) = 0
    new_sum = tl.where(grows, lane_sum * scale + 1.0, lane_sum + scale)
    return new_max, new_sum
