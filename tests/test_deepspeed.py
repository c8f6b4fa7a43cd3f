"""FocalPOTrainer under DeepSpeed ZeRO-3 (two ranks, gloo, CPU) against TRL's DPOTrainer in the same set-up: one
spawned group (tests/zero3_workers.py) runs every scenario; see that file for what each checks. DeepSpeed comes
with the `deepspeed` extra (the README's test set-up installs it)."""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")
if importlib.util.find_spec("deepspeed") is None:  # found, not imported: only the spawned workers import it
    pytest.skip("DeepSpeed is not installed (the `deepspeed` extra)", allow_module_level=True)

import dist_workers  # noqa: E402
import zero3_workers  # noqa: E402


def test_zero3_matches_dpo_trainer():
    dist_workers.spawn(2, [("interpret", name) for name in zero3_workers.SCENARIOS], target=zero3_workers.run,
                       timeout_s=300)
