"""Test set-up: with no GPU, run the Triton kernels through the interpreter (must precede `import triton`)."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter, without its repeated patching (40% faster)
    import interpreter_patch_once

    interpreter_patch_once.install()

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs per test, but reproducible from the test's name when a failure needs chasing; FK_TEST_SEED
    # (any string) draws other inputs for every test, to see whether tolerances hold beyond the usual ones.
    torch.manual_seed(zlib.crc32((request.node.nodeid + os.environ.get("FK_TEST_SEED", "")).encode()))


@pytest.fixture(params=["triton", "torch"])
def path(request, monkeypatch):
    """'triton': the kernels (interpreted on a CPU); 'torch': the plain-PyTorch path of a CPU tensor."""
    if request.param == "torch":
        if DEVICE != "cpu":
            pytest.skip("the plain-PyTorch path runs only for CPU tensors")
        from focal_kernels import backend

        monkeypatch.setattr(backend, "use_triton", lambda tensor: False)
    return request.param


@pytest.fixture(scope="module")
def one_rank_mesh():
    """A ("tp", "cp") DeviceMesh of one CPU rank over gloo in this process, torn down after the module: for
    DTensors and group keywords without spawning workers (tests/dist_workers.py runs several ranks)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only, as tests/dist_workers.py
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("tp", "cp"))
    finally:
        dist.destroy_process_group()
