"""The logit transform of models that scale, soft-cap or temperature-scale their lm_head output (a
`@triton.jit` helper, inlined where it is called), in the order of the models and of TRL's fused head:

    z = scale · raw                      raw = hidden · W[v] (+ bias[v]), as the GEMM wrote it
    z = cap · tanh(z / cap)              when soft-capping (Gemma-2's final_logit_softcapping)
    logits = z · inv_temperature
    d logits / d raw = scale · inv_temperature · (1 − tanh²(z / cap))   (without the cap: the first two factors)

computed per element as raw · (scale / cap) and tanh · (cap · inv_temperature) (raw · (scale · inv_temperature)
without the cap), the products of the options formed once: one multiplication each instead of two and a
division (the soft-capped kernels' sm_90 SASS had two divisions an element; see benchmarks/NOTES.md), each
product within an ulp or two of the formula's order; 1 − tanh² as one fused multiply-add.

tanh(u) in float32: the odd Taylor series u·(1 − u²/3 + 2u⁴/15 − 17u⁶/315 + 62u⁸/2835) for |u| < 1/4
(truncation below 1e-8 relative), else sign(u)·(1 − e)/(1 + e) with e = exp(−2|u|) (exact at ±inf): a few
ulps relative everywhere. (2·σ(2u) − 1, used before, has an absolute error of an ulp of 1, so logits far
below the cap lost relative precision: 2.5e-4 in a mean logit of 1e-2 at cap 30.) In float64, 2·σ(2u) − 1
(absolute error 1e-16). params holds (scale, cap, inv_temperature) in the compute dtype, so float64 stays
exact.
"""

import triton
import triton.language as tl

from .fast_exp import LOG2_E


@triton.jit
def load_transform(params_ptr):
    return tl.load(params_ptr), tl.load(params_ptr + 1), tl.load(params_ptr + 2)


@triton.jit
def _tanh(u):
    if u.dtype == tl.float64:
        tanh = 2.0 * tl.sigmoid(2.0 * u) - 1.0
    else:
        magnitude = tl.abs(u)
        e = tl.exp2(magnitude * (-2.0 * LOG2_E))  # fast_exp(−2|u|), the same rounding: −2 scales exactly
        large = (1.0 - e) / (1.0 + e)  # >= 0 (or NaN); u's sign bit is copied onto it (one bitwise OR)
        sign = u.to(tl.int32, bitcast=True) & -2147483648
        signed = (large.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        u2 = u * u
        small = u * (1.0 + u2 * (-1.0 / 3.0 + u2 * (2.0 / 15.0 + u2 * (-17.0 / 315.0 + u2 * (62.0 / 2835.0)))))
        tanh = tl.where(magnitude < 0.25, small, signed)
    return tanh


@triton.jit
def transformed_logits(raw, scale, cap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        return _tanh(raw * (scale / cap)) * (cap * inv_temperature)
    return raw * (scale * inv_temperature)


@triton.jit
def transform_derivative(raw, scale, cap, inv_temperature, HAS_SOFTCAP: tl.constexpr):
    """d logits / d raw, elementwise."""
    derivative = scale * inv_temperature
    if HAS_SOFTCAP:
        tanh = _tanh(raw * (scale / cap))
        derivative = derivative * tl.fma(-tanh, tanh, 1.0)
    return derivative
