"""The online logsumexp step of the logits path's forward, per lane (a `@triton.jit` helper, inlined where it
is called).

Lane j keeps the running max m_j and sum s_j = Σ exp(x_seen − m_j) of the columns it has seen; for the next
value x of each lane:
    m_j' = max(m_j, x_j),     s_j' = s_j · exp(m_j − m_j') + exp(x_j − m_j')
and, once the row is done, m = max_j m_j and s = Σ_j s_j · exp(m_j − m), so that logsumexp(row) = m + log s.
Masked-out columns must be loaded as −inf. A lane that is −inf so far is rescaled by 0, not by exp(nan).
(The hidden-state path's chunk kernel keeps one running state per row instead: it also carries statistics.)
"""

import triton
import triton.language as tl


@triton.jit
def online_logsumexp_lanes(lane_max, lane_sum, x):
    new_max = tl.maximum(lane_max, x)
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max).to(lane_sum.dtype)
    new_sum = lane_sum * tl.exp(lane_max - safe_max) + tl.exp(x - safe_max)
    return new_max, new_sum
