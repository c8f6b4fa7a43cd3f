"""tests/interpreter_patch_once.py, which conftest installs under the interpreter: triton.language is patched
once per function per launch, the kernels compute what they did, and each launch still undoes its patch (an
exception included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import subprocess_env

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the interpreter's harness", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402


@triton.jit
def helper(x):
    return tl.exp(x) + 1.0


@triton.jit
def kernel(x_ptr, out_ptr, n, FAIL: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(3):
        acc += helper(tl.load(x_ptr + offsets, mask=mask, other=0.0))
    tl.static_assert(not FAIL, "fails on purpose")
    tl.store(out_ptr + offsets, acc, mask=mask)


def test_helpers_patch_once_per_launch_and_launches_restore():
    assert getattr(interpreter._patch_lang, "_patched_once", False), "conftest did not install the speed-up"
    x = torch.randn(37)
    out = torch.full_like(x, float("nan"))
    patch_lang = interpreter._patch_lang
    original, patched = patch_lang.original, []
    patch_lang.original = lambda fn: patched.append(fn.__name__) or original(fn)
    try:
        kernel[(3,)](x, out, x.numel(), FAIL=False, BLOCK=16)
    finally:
        patch_lang.original = original
    torch.testing.assert_close(out, 3 * (x.exp() + 1.0))
    # the launch, then tl.zeros and the helper (called 3 and 9 times in the interpreter): once each
    assert patched == ["kernel", "zeros", "helper"], patched
    assert tl.core.is_builtin(tl.exp), "the launch left triton.language patched"
    with pytest.raises(Exception, match="fails on purpose"):
        kernel[(1,)](x, out, x.numel(), FAIL=True, BLOCK=16)
    assert tl.core.is_builtin(tl.exp), "a failed launch left triton.language patched"
    kernel[(3,)](x, out.fill_(float("nan")), x.numel(), FAIL=False, BLOCK=16)  # patched again, afresh
    torch.testing.assert_close(out, 3 * (x.exp() + 1.0))


HOST_CALL_THEN_LAUNCHES = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import interpreter_patch_once
assert interpreter_patch_once.install()
import torch, triton, triton.language as tl

@triton.jit
def kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.exp(tl.load(x_ptr + offsets, mask=offsets < n)), mask=offsets < n)

x = torch.randn(37)
assert tl.cdiv(x.numel(), 16) == 3  # host code calling a jit function (where triton.cdiv was meant)
for _ in range(2):
    out = torch.full_like(x, float("nan"))
    kernel[(3,)](x, out, x.numel(), BLOCK=16)
    torch.testing.assert_close(out, x.exp())
print("ok")
"""


def test_a_jit_function_called_from_host_code_leaves_launches_patching():
    """Outside a launch every call patches, as Triton does, and is remembered nowhere: a review found the
    first version keeping the host call's function, after which every kernel's second launch skipped its
    own patch and failed. In a fresh process (this one's interpreter state depends on the tests before)."""
    run = subprocess.run([sys.executable, "-c", HOST_CALL_THEN_LAUNCHES], env=subprocess_env(Path(__file__).parent),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr[-3000:]
