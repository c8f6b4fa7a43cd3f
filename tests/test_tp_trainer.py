"""FocalPOTrainer under tensor parallelism (a model loaded with `tp_plan="auto"`; two ranks, gloo, CPU) against
TRL's DPOTrainer in the same set-up: one spawned group (tests/tp_trainer_workers.py) runs every scenario; see
that file for what each checks."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import dist_workers  # noqa: E402
import tp_trainer_workers  # noqa: E402


def test_tensor_parallel_matches_dpo_trainer():
    dist_workers.spawn(2, tp_trainer_workers.SCENARIOS, target=tp_trainer_workers.run, timeout_s=300)
