"""FocalPOTrainer beside TRL's DPOTrainer in the same set-up on two ranks (gloo, CPU): under FSDP2
(tests/fsdp2_trainer_workers.py), under tensor parallelism, a model loaded with `tp_plan="auto"`, and on four
ranks under both, a model loaded with `DistributedConfig(tp_size=2, fsdp_size=2)` (tests/tp_trainer_workers.py).
Each test spawns one group that runs every scenario of its workers' file; see those files for what each checks.
(DeepSpeed ZeRO-3: tests/test_deepspeed.py, skipped without its extra.)"""

from __future__ import annotations

import pytest

pytest.importorskip("trl")
pytest.importorskip("peft")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

import dist_workers  # noqa: E402
import fsdp2_trainer_workers  # noqa: E402
import tp_trainer_workers  # noqa: E402


def test_fsdp2_matches_dpo_trainer():
    dist_workers.spawn(2, fsdp2_trainer_workers.SCENARIOS, target=fsdp2_trainer_workers.run, timeout_s=300)


def test_tensor_parallel_matches_dpo_trainer():
    dist_workers.spawn(2, tp_trainer_workers.SCENARIOS, target=tp_trainer_workers.run, timeout_s=300)


def test_fsdp2_and_tensor_parallel_matches_dpo_trainer():
    dist_workers.spawn(4, tp_trainer_workers.FSDP_TP_SCENARIOS, target=tp_trainer_workers.run, timeout_s=300)
