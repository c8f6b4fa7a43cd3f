"""The float32 tolerances hold with a GPU's exp, log and division (tests/gpu_math.py): the kernel tests in
float32 and with a soft-cap (whose tanh divides and exponentiates) pass when every float32 exp, log and
division in the kernels carries the error NVIDIA's approximate instructions may make, and the soft-cap ones
fail at four times that error, so the selection is sensitive to it. Each run is a pytest subprocess through the
interpreter, the plugin loaded there only."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpu_math
from helpers import subprocess_env

TESTS = Path(__file__).parent
SELECTION = ["test_focal_po_loss.py", "test_logit_transform.py", "test_frozen_head_and_budget.py",
             "test_packing.py", "test_fused_linear.py"]


def _env(**extra):
    """The environment of a subprocess: the interpreter on, tests/ importable (the plugin, helpers)."""
    return subprocess_env(TESTS, TRITON_INTERPRET="1", **extra)


def test_error_model():
    x = np.random.default_rng(0).uniform(-30, 10, 100_000).astype(np.float32)
    exact = np.exp(x.astype(np.float64))
    relative = gpu_math.exp(x).astype(np.float64) / exact - 1
    bound = gpu_math.EXP_ULPS * gpu_math.EPS + np.abs(x.astype(np.float64)) * 2.0 ** -24
    rounding = 2 * gpu_math.EPS  # NumPy's float32 exp (not always correctly rounded) and the result's rounding
    assert (np.abs(relative) <= bound + rounding).all()
    assert (relative > 0.5 * bound).any() and (relative < -0.5 * bound).any()  # both signs, near the bound
    assert np.array_equal(gpu_math.exp(x), gpu_math.exp(x.copy()))  # a function of the input
    a, b = np.float32(1) + x[:1000] ** 2, np.float32(3) + np.abs(x[1000:2000])
    quotient = gpu_math.divide(a, b).astype(np.float64) / (a.astype(np.float64) / b) - 1
    assert np.abs(quotient).max() <= gpu_math.DIV_ULPS * gpu_math.EPS + rounding
    assert np.abs(quotient).max() > 0.5 * gpu_math.DIV_ULPS * gpu_math.EPS
    logs = gpu_math.log(b).astype(np.float64) / np.log(b.astype(np.float64)) - 1
    assert 0.5 * gpu_math.EPS < np.abs(logs).max() <= gpu_math.LOG_ULPS * gpu_math.EPS + rounding
    special = np.float32([-np.inf, np.inf, np.nan, 0.0, -200.0, 100.0])  # exp: 0, inf, NaN, 1, 0, inf
    with np.errstate(over="ignore"):
        assert np.array_equal(gpu_math.exp(special), np.exp(special), equal_nan=True)
    float64 = np.linspace(-3, 3, 7)
    assert np.array_equal(gpu_math.exp(float64), np.exp(float64))  # libdevice on the GPU: left exact
    # exp2 (ex2.approx.ftz.f32, what kernels/fast_exp.py runs): about 2 ulp, exact at integers, below 2^-126 zero
    powers = x * np.float32(np.log2(np.e))
    relative = gpu_math.exp2(powers).astype(np.float64) / np.exp2(powers.astype(np.float64)) - 1
    assert 0.5 * gpu_math.EXP_ULPS * gpu_math.EPS < np.abs(relative).max() <= gpu_math.EXP_ULPS * gpu_math.EPS + rounding
    assert np.array_equal(gpu_math.exp2(np.float32([-3, 0, 5])), np.float32([0.125, 1, 32]))
    tiny = gpu_math.exp2(np.float32([-126.5, -130, -149, -np.inf]))
    assert np.array_equal(tiny, np.zeros(4, np.float32)) and gpu_math.exp2(np.float32(-125.5)) > 0


PLUGIN_IN_EFFECT = """
import sys
import numpy as np
import torch
import triton
import triton.language as tl
import gpu_math

if sys.argv[1] == "plugin":
    gpu_math.pytest_configure(None)


@triton.jit
def exp_and_round(x_ptr, exp_ptr, bf16_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets, mask=offsets < n)
    tl.store(exp_ptr + offsets, tl.exp(x), mask=offsets < n)
    tl.store(bf16_ptr + offsets, x, mask=offsets < n)  # float32 -> bfloat16


x = torch.linspace(-3, 3, 1000) * (1 + 2.0 ** -10)  # most not exact in bfloat16
exps, rounded = torch.empty_like(x), torch.empty(1000, dtype=torch.bfloat16)
exp_and_round[(1,)](x, exps, rounded, 1000, BLOCK=1024)
exact = torch.exp(x.double())
print(float(((exps.double() - exact) / exact).abs().max() / 2.0 ** -23),
      int((exps != torch.from_numpy(np.exp(x.numpy()))).sum()), int((rounded != x.to(torch.bfloat16)).sum()))
"""


interpreted_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="emulates on Triton's interpreter; on a GPU the tests meet the real thing")


@interpreted_only
def test_the_plugin_changes_the_kernels_arithmetic():
    """Through a kernel: with the plugin, exp is off by up to 2 ulp + |x|·2^-24 (here |x| <= 3) and float32 ->
    bfloat16 rounds to nearest (torch's conversion); without it, exp is NumPy's and the conversion
    truncates."""
    counts = {}
    for mode in ("plugin", "plain"):
        run = subprocess.run([sys.executable, "-c", PLUGIN_IN_EFFECT, mode], env=_env(), capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        exp_ulps, not_numpys, bf16_differs = run.stdout.split()
        counts[mode] = float(exp_ulps), int(not_numpys), int(bf16_differs)
    # the largest exp error in float32 ulps at 1 (NumPy's own error, up to about an ulp, included), how many
    # exps differ from NumPy's, how many bfloat16 values from torch's rounding
    exp_ulps, not_numpys, bf16_differs = counts["plugin"]
    assert 2.5 < exp_ulps < 6.5 and not_numpys > 500 and bf16_differs == 0, counts
    exp_ulps, not_numpys, bf16_differs = counts["plain"]
    assert not_numpys == 0 and bf16_differs > 200, counts


def _run_selection(scale: str, keyword: str = "float32 or softcap", default_inputs: bool = False):
    env = _env(GPU_MATH_SCALE=scale)
    if default_inputs:  # the inputs the check was calibrated on, whatever FK_TEST_SEED says
        env.pop("FK_TEST_SEED", None)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "gpu_math",
                           "-k", keyword, *(str(TESTS / name) for name in SELECTION)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=TESTS.parent)


@interpreted_only
def test_float32_tolerances_hold_with_gpu_math():
    at_gpu = _run_selection("1")
    output = at_gpu.stdout + at_gpu.stderr
    assert "gpu_math: float32 exp / exp2 (flushing to zero) / log / division with up to 1 x" in output, \
        output[-3000:]  # it was loaded
    assert at_gpu.returncode == 0, output[-3000:]
    assert int(re.search(r"(\d+) passed", output).group(1)) >= 40, output[-3000:]
    # At 4x, test_softcap_keeps_float32_precision fails (it holds to 3x; the others hold at 4x): the selection
    # can see the error. Its soft-cap part alone is run (a few seconds), on the default inputs: other draws
    # (FK_TEST_SEED) may hold at 4x.
    beyond = _run_selection("4", "softcap", default_inputs=True)
    assert beyond.returncode == 1 and re.search(r"\d+ failed", beyond.stdout), (
        "at 4 x a GPU's float32 error no selected test failed: the selection no longer tells whether its "
        "tolerances hold on a GPU\n" + (beyond.stdout + beyond.stderr)[-3000:])
