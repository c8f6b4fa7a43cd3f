"""The logit transform of models that scale, soft-cap or temperature-scale their lm_head output (a
`@triton.jit` helper, inlined where it is called), in the order of the models and of TRL's fused head:

    z = scale · raw                      raw = hidden · W[v] (+ bias[v]), as the GEMM wrote it
    z = cap · tanh(z / cap)              when soft-capping (Gemma-2's final_logit_softcapping)
    logits = z · inv_temperature
    d logits / d raw = scale · inv_temperature · (1 − tanh²(z / cap))   (without the cap: the first two factors)

tanh(u) is computed as 2·σ(2u) − 1 (exact at ±inf, absolute error one ulp near 0, where the cap then
multiplies it). params holds (scale, cap, inv_temperature) in the compute dtype, so float64 stays exact.
"""

import triton
import triton.language as tl


@triton.jit
def load_transform(params_ptr):
    return tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2)


@triton.jit
def transformed_logits(raw, scale, cap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    z = raw * scale
    if HAS_SOFTCAP:
        z = cap * (2.0 * tl.sigmoid(2.0 * z / cap) - 1.0)
    return z * inv_temperature


@triton.jit
def transform_derivative(raw, scale, cap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """d logits / d raw, elementwise."""
    derivative = scale * inv_temperature
    if HAS_SOFTCAP:
        tanh = 2.0 * tl.sigmoid(2.0 * (raw * scale) / cap) - 1.0
        derivative = derivative * (1.0 - tanh * tanh)
    return derivative
