"""Test set-up: with no GPU, run the Triton kernels through the interpreter (must precede `import triton`)."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs per test, but reproducible from the test's name when a failure needs chasing.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """'triton': the kernels (interpreted on a CPU); 'torch': the plain-PyTorch path of a CPU tensor."""
    if request.param == "torch":
        if DEVICE != "cpu":
            pytest.skip("the plain-PyTorch path runs only for CPU tensors")
        from focal_kernels import backend

        monkeypatch.setattr(backend, "use_triton", lambda tensor: False)
    return request.param
