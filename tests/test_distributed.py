"""Vocabulary-parallel and sequence-parallel log-probs (focal_kernels.logprobs.parallel) on real process groups.

Each test spawns one gloo group on 127.0.0.1 (start method "spawn") and runs several scenarios inside it
(tests/dist_workers.py), each compared with a single-process float64 reference computed in the worker.
Every spawn is bounded by a timeout: a hang fails the test (and its processes are killed) instead of blocking.
"""

from __future__ import annotations

import pytest
import torch

import dist_workers

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from focal_kernels.logprobs.parallel import (dtensor_vocab_logits, sequence_parallel_sum,  # noqa: E402
                                             vocab_parallel_fused_linear_sequence_logps,
                                             vocab_parallel_sequence_logps)


def _spawn(world, scenarios):
    dist_workers.spawn(world, scenarios)


ALL = ("vp_logits_padded", "vp_logits_packed", "vp_hidden_padded", "vp_hidden_packed", "vp_hidden_tokens", "dtensor",
       "sp_logits", "sp_hidden", "errors", "agreement")
KERNELS = ("vp_logits_padded", "vp_logits_packed", "vp_hidden_padded", "vp_hidden_packed", "vp_hidden_tokens")
API = ("api_logits", "api_hidden", "api_losses")  # the public entry points' group keywords (world 2: uneven slices)


@pytest.mark.parametrize("world, scenarios", [
    # One group per world size (spawning dominates the run time): the Triton kernels through the interpreter,
    # then the plain PyTorch path.
    (2, [("interpret", name) for name in KERNELS + ("vp_logits_bf16", "sp_logits", "errors", "modes_and_dtypes") + API]
        + [("plain", name) for name in ALL + API + ("modes_and_dtypes", "saved_copies")]),
    (3, [("interpret", name) for name in KERNELS] + [("plain", name) for name in ALL]),
], ids=["world2", "world3"])
def test_process_group(world, scenarios):
    _spawn(world, scenarios)


def test_compiled():
    """The calls with a group under torch.compile (aot_eager, then inductor: its compile time, most of this
    test's, gets a group of its own, and twice the spawn's usual time limit: about 100 s alone on two cores,
    over 150 s beside another suite's worker)."""
    dist_workers.spawn(2, [("plain", "compiled")], timeout_s=2 * dist_workers.SPAWN_TIMEOUT_S)


def test_context_by_vocabulary_mesh():
    """Both at once on a 2 x 2 (context x vocabulary) mesh: four processes, the plain PyTorch path (the
    parallel functions, then the public entry points with both group keywords)."""
    _spawn(4, [("plain", "mesh_2x2")])


def test_group_without_initialized_distributed_raises():
    assert not dist.is_initialized()
    logits = torch.randn(1, 3, 5)
    labels = torch.zeros(1, 3, dtype=torch.int64)
    for call in (lambda: vocab_parallel_sequence_logps(logits, labels, group=object()),
                 lambda: vocab_parallel_fused_linear_sequence_logps(torch.randn(1, 3, 4), torch.randn(5, 4), labels,
                                                                    group=object()),
                 lambda: sequence_parallel_sum(torch.zeros(2), object())):
        with pytest.raises(RuntimeError, match="not initialized"):
            call()


def test_dtensor_helper_rejects_plain_tensor():
    with pytest.raises(TypeError, match="DTensor"):
        dtensor_vocab_logits(torch.randn(1, 2, 3))
