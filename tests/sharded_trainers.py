"""What the sharded-trainer workers share (tests/zero3_workers.py: DeepSpeed ZeRO-3; tests/fsdp2_trainer_workers.py:
FSDP2; tests/tp_trainer_workers.py: tensor parallelism): FocalPOTrainer and TRL's DPOTrainer trained in the same
set-up, two ranks over gloo on the CPU, with plain SGD (a parameter's update is its gradient, scaled), then
compared: the logged losses and gradient norms, and every parameter after the steps. The comparison
(`logged`, `assert_same_training`) serves one-process trainer tests too (tests/test_trl_integration.py)."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
# for config_class(..., **TRAINING): two logged SGD steps of two pairs per rank
TRAINING = dict(report_to="none", optim="sgd", per_device_train_batch_size=2, save_strategy="no", logging_steps=1,
                max_steps=2, disable_tqdm=True, seed=0, beta=0.5, learning_rate=1e-2)


def run(rank, world, port, scenarios, prefix, compare, environ):
    """run_group with `compare(name, rank, workdir)` for each scenario; `workdir` (a folder in the temporary
    directory, the same on both ranks) is removed once every scenario has run."""
    from dist_workers import run_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), **environ)
    workdir = os.path.join(tempfile.gettempdir(), f"{prefix}-{port}")

    def finish():
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            shutil.rmtree(workdir, ignore_errors=True)

    run_group(rank, world, port, scenarios, lambda name, mode: compare(name, rank, workdir), finish)


def accelerate_over_gloo():
    """accelerate 1.16 sets up its distributed types only with an accelerator: its backend lookup is pointed at
    the CPU and gloo (each worker then adds what its set-up needs beyond that)."""
    import accelerate.state

    accelerate.state.get_torch_accelerator_backend = lambda: ("cpu", None)
    accelerate.state.get_distributed_backend = lambda device_type: "gloo"


def train(trainer):
    """trainer.train(); with `torch_compile=True`, checks that torch.compile did compile some of the model."""
    from torch._dynamo.utils import counters

    counters["frames"].clear()
    trainer.train()
    assert not trainer.args.torch_compile or counters["frames"]["ok"] > 0, "torch_compile=True compiled nothing"


def logged(trainer):
    """(losses, gradient norms) the trainer logged, a step each."""
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return [e["loss"] for e in logs], [e["grad_norm"] for e in logs]


def assert_same_training(what, mine, theirs, rel=1e-4):
    """mine, theirs: (losses, gradient norms, [{name: parameter}] per model compared)."""
    import pytest

    (loss, norm, params), (stock_loss, stock_norm, stock_params) = mine, theirs
    assert len(loss) == 2 and loss == pytest.approx(stock_loss, rel=rel), f"{what}: {loss}, {stock_loss}"
    assert norm == pytest.approx(stock_norm, rel=rel), f"{what}: grad norm {norm} vs {stock_norm}"
    # SGD: a parameter moves by the learning rate (1e-2) times its gradient a step; 1e-6 is 1e-4 of a unit gradient
    for model, stock_model in zip(params, stock_params, strict=True):
        assert model.keys() == stock_model.keys()
        for key in stock_model:
            torch.testing.assert_close(model[key], stock_model[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, key=key: f"{what}, {key}: {m}")


def on_disk(rank, workdir, what, save, load):
    """save(path) on rank 0, then load(path) on every rank. TRL's reference precompute writes its cache file
    beside the dataset's on rank 0 and reads it on every rank, which an in-memory dataset (a per-process
    temporary cache directory) does not allow; TRL loads a reference model from the policy's path."""
    import torch.distributed as dist

    path = os.path.join(workdir, what)
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        save(path)
    dist.barrier()
    return load(path)
