"""FSDP2 (`torch.distributed.fsdp.fully_shard`) with the hidden-state path, on the CPU over gloo (world 2).

One spawned group (tests/fsdp2_workers.py) runs every scenario: the lm_head applied outside the model's forward,
where its weight and bias are DTensor shards that focal_kernels gathers, and inside an FSDP-wrapped module's
forward, where FSDP has gathered them, and the pair loss in a step compiled with inductor; log-probs, loss and
every parameter's gradient (averaged over the data-parallel ranks by FSDP) against a single-process float64
reference.
"""

from __future__ import annotations

import pytest

import dist_workers
import fsdp2_workers

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401
except ImportError as exc:  # pragma: no cover (PyTorch < 2.6)
    pytest.skip(f"torch.distributed.fsdp.fully_shard is not available: {exc}", allow_module_level=True)

SCENARIOS = ("outside_forward", "outside_forward_root_group", "inside_forward", "outside_forward_pair_loss")


def test_fully_shard_lm_head():
    import torch.multiprocessing as mp

    scenarios = [("plain", name) for name in SCENARIOS] + [("interpret", "outside_forward"),
                                                            ("interpret", "inside_forward"),
                                                            ("interpret", "compiled_pair_loss")]
    try:
        dist_workers.spawn(2, scenarios, target=fsdp2_workers.run)
    except mp.ProcessRaisedException as exc:
        if fsdp2_workers.UNSUPPORTED in str(exc):  # fully_shard itself refused the CPU / gloo set-up
            message = next(line for line in str(exc).splitlines() if fsdp2_workers.UNSUPPORTED in line)
            pytest.skip(message.strip())
        raise
