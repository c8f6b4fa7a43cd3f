"""A pytest plugin: the interpreter's float32 exp, log and division with a GPU's rounding errors.

On an NVIDIA GPU, Triton compiles the kernels' float32 `tl.exp` to `ex2.approx.f32` of x·log2(e) (about 2 ulp,
plus the rounding of the product: up to |x|·2^-24 relative; exact at integer powers of 2), `tl.exp2` (which
the kernels use, as kernels/fast_exp.py, on x·log2(e) rounded by the kernel itself) to `ex2.approx.ftz.f32`
(about 2 ulp; results below 2^-126 flushed to 0), `tl.log` to
libdevice's `logf` (within 1 ulp) and `/` to `div.full.f32` (about 2 ulp): see the PTX that
tests/gpu_compile.py compiles. The interpreter's NumPy is within about an ulp, so a tolerance tuned on the CPU
could be tighter than what the GPU meets, and the first GPU run would be the one to find out. With this plugin
each such float32 result gets an error of up to those sizes, of either sign, deterministic (a hash of the
input's bits, as the hardware's error is a function of its input); float64 (libdevice on the GPU too) and
everything else are left exact. float32 -> bfloat16 conversions round to nearest even, as on the GPU (the
interpreter truncates).

    TRITON_INTERPRET=1 PYTHONPATH=tests python -m pytest -p gpu_math tests/...
    GPU_MATH_SCALE=4 ...    # four times those errors (the margin of a tolerance)

tests/test_gpu_math.py runs the float32 and soft-cap kernel tests under it."""

from __future__ import annotations

import os

import numpy as np

SCALE = float(os.environ.get("GPU_MATH_SCALE", "1"))
EPS = 2.0 ** -23  # one float32 ulp at 1
EXP_ULPS, LOG_ULPS, DIV_ULPS = 2.0, 1.0, 2.0


def _unit(bits: np.ndarray, salt: int) -> np.ndarray:
    """A deterministic pseudo-random value in [-1, 1) per element, from its bits."""
    h = ((bits.astype(np.uint64) ^ np.uint64(salt)) * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(13)
    return h.astype(np.float64) / 2.0 ** 31 - 1.0


def _bits(a) -> np.ndarray:
    return np.array(a, dtype=np.float32).view(np.uint32)  # a copy: contiguous, 0-d kept 0-d


def _perturbed(out: np.ndarray, relative: np.ndarray) -> np.ndarray:
    """out · (1 + relative), rounded back to float32; inf, NaN and zero stay as they are."""
    out = np.asarray(out)
    with np.errstate(invalid="ignore", over="ignore"):
        moved = (out.astype(np.float64) * (1.0 + relative)).astype(np.float32)
    return np.where(np.isfinite(out) & np.isfinite(relative), moved, out)


def _is_float32(out) -> bool:
    return np.asarray(out).dtype == np.float32  # a block, or a 0-d result (NumPy gives a scalar for those)


def _ex2(out, x, power, bound, salt):
    """out, an exponential that ex2 computed of `power` (from the input x), with up to `bound` relative error,
    none where power is an integer (ex2 of an integer is exact: exp(0) = 1)."""
    bound = np.where(power == np.floor(power), 0.0, bound)
    return _perturbed(out, _unit(_bits(x), salt) * bound)


def exp(x):
    out = np.exp(x)
    if not _is_float32(out):
        return out
    with np.errstate(invalid="ignore", over="ignore"):
        x = np.asarray(x)
        power = (x * np.float32(np.log2(np.e))).astype(np.float32)  # the product's rounding: up to |x|·2^-24
        return _ex2(out, x, power, SCALE * (EXP_ULPS * EPS + np.abs(x.astype(np.float64)) * 2.0 ** -24), 0x1F)


def exp2(x):
    out = np.exp2(x)
    if not _is_float32(out):
        return out
    with np.errstate(invalid="ignore", over="ignore"):
        x = np.asarray(x)
        out = np.where(np.abs(out) < np.float32(2.0 ** -126), np.float32(0.0), out).astype(np.float32)  # ftz
        return _ex2(out, x, x, SCALE * EXP_ULPS * EPS, 0x27)


def log(x):
    out = np.log(x)
    if not _is_float32(out):
        return out
    return _perturbed(out, _unit(_bits(x), 0x2E) * SCALE * LOG_ULPS * EPS)


def divide(a, b):
    out = np.divide(a, b)
    if not _is_float32(out):
        return out
    shape = np.shape(out)
    bits = _bits(np.broadcast_to(a, shape)) ^ _bits(np.broadcast_to(b, shape))
    return _perturbed(out, _unit(bits, 0x3D) * SCALE * DIV_ULPS * EPS)


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (as its uint16 bits) rounded to nearest even, as the GPU converts (the interpreter
    truncates)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16).view(torch.int16) \
        .numpy().view(np.uint16)


def pytest_configure(config):
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("gpu_math changes Triton's interpreter: set TRITON_INTERPRET=1")
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    for name in ("create_exp", "create_exp2", "create_log", "create_fdiv", "unary_op", "binary_op", "cast_impl"):
        if not hasattr(InterpreterBuilder, name):
            raise RuntimeError(f"gpu_math: this Triton's interpreter has no InterpreterBuilder.{name}")

    truncating_cast = InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return TensorHandle(to_bfloat16_bits(src.data), dst_type.scalar)
        return truncating_cast(self, src, dst_type)

    InterpreterBuilder.cast_impl = cast_impl
    InterpreterBuilder.create_exp = lambda self, arg: self.unary_op(arg, exp)
    InterpreterBuilder.create_exp2 = lambda self, arg: self.unary_op(arg, exp2)
    InterpreterBuilder.create_log = lambda self, arg: self.unary_op(arg, log)
    InterpreterBuilder.create_fdiv = lambda self, lhs, rhs: self.binary_op(lhs, rhs, divide)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"gpu_math: float32 exp / exp2 (flushing to zero) / log / division with up to "
                                f"{SCALE:g} x ({EXP_ULPS:g} ulp + |x|·2^-24, {EXP_ULPS:g} ulp, {LOG_ULPS:g} ulp, "
                                f"{DIV_ULPS:g} ulp) error")
