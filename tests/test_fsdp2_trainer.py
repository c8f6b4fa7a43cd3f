"""FocalPOTrainer under FSDP2 (two ranks, gloo, CPU) against TRL's DPOTrainer in the same set-up: one spawned
group (tests/fsdp2_trainer_workers.py) runs every scenario; see that file for what each checks."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import dist_workers  # noqa: E402
import fsdp2_trainer_workers  # noqa: E402


def test_fsdp2_matches_dpo_trainer():
    dist_workers.spawn(2, fsdp2_trainer_workers.SCENARIOS, target=fsdp2_trainer_workers.run, timeout_s=300)
