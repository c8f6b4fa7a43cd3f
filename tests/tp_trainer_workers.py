"""Worker processes for tests/test_parallel_trainers.py: FocalPOTrainer beside TRL's DPOTrainer under tensor
parallelism, two ranks over gloo on the CPU.

transformers loads the model with `tp_plan="auto"`: Llama's plan shards the attention and MLP projections and
`lm_head` (colwise: its weight a DTensor of vocabulary rows, `Shard(0)`); the trainer then gives accelerate a
`ParallelismConfig(tp_size=2)`. Both ranks train on the same batch. The fused head scores the weight shard
vocabulary-parallel (the test checks that fk gathers no DTensor; TRL's own head gathers it with `full_tensor()`).
Each scenario trains the same model, reference and data with both trainers and compares the logged losses and
gradient norms and every parameter after two SGD steps.

One thing here exists only because this is a CPU: accelerate 1.16 accepts a `ParallelismConfig` only on an
accelerator (or under FSDP2 or DeepSpeed): `_cpu_tensor_parallel` counts two CPU processes as multi-device, and
points accelerate's backend lookup at gloo.
"""

from __future__ import annotations

import os
import warnings

import sharded_trainers
from sharded_trainers import LORA, on_disk

# tp: padded, the sigmoid loss; tp_packed: FocalPO at gamma = 0 padding-free against TRL padded; tp_compiled:
# FocalPO with torch_compile=True (aot_eager; the vocabulary-parallel call's checks are graph breaks) against
# TRL eager, both without gradient checkpointing; tp_lora: PEFT LoRA on the sharded projections (the reference is
# the adapter disabled)
SCENARIOS = (("interpret", "tp"), ("interpret", "tp_packed"), ("interpret", "tp_compiled"), ("interpret", "tp_lora"))
# logged at every step beside the loss: the fused head's statistics (entropy, mean logit, first argmax) among them
METRICS = ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected", "rewards/margins")


def run(rank, world, port, scenarios):
    warnings.simplefilter("ignore")
    sharded_trainers.run(rank, world, port, scenarios, "fk-tp", _compare, {})


def _cpu_tensor_parallel():
    import accelerate

    sharded_trainers.accelerate_over_gloo()
    accelerate.Accelerator.multi_device = property(lambda self: self.num_processes > 1)


def _compare(name, rank, workdir):
    import datasets
    import pytest
    from peft import LoraConfig
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    import tiny_lm
    from focal_kernels.integrations.trl import FocalPOConfig, FocalPOTrainer
    from focal_kernels.logprobs import linear

    _cpu_tensor_parallel()
    tok = tiny_lm.make_tokenizer()
    data = datasets.Dataset.from_dict(tiny_lm.preference_rows(8))
    paths = [on_disk(rank, workdir, f"model-{seed}", tiny_lm.make_model(tok, seed=seed).save_pretrained, str)
             for seed in (0, 1)]
    ours = {"tp": {}, "tp_packed": dict(loss_type="focal", focal_gamma=0.0, padding_free=True),
            "tp_compiled": dict(torch_compile=True, torch_compile_backend="aot_eager"), "tp_lora": {}}[name]
    both = dict(gradient_checkpointing=False) if name == "tp_compiled" else {}
    gathers, gathered, metrics = [], linear.gathered, []

    def counted(tensor):
        if isinstance(tensor, DTensor):
            gathers.append(tensor.shape)
        return gathered(tensor)

    linear.gathered = counted

    def train(trainer_class, config_class, extra):
        policy, ref = (AutoModelForCausalLM.from_pretrained(path, tp_plan="auto") for path in paths)
        head = policy.get_output_embeddings().weight
        assert isinstance(head, DTensor) and head.placements[0].is_shard(0), f"{name}: lm_head is not vocab-sharded"
        args = config_class(output_dir=os.path.join(workdir, f"out-{rank}"), bf16=False,
                            **{**sharded_trainers.TRAINING, "loss_type": "sigmoid", **both, **extra})
        lora = dict(ref_model=None, peft_config=LoraConfig(**LORA)) if name == "tp_lora" else dict(ref_model=ref)
        trainer = trainer_class(model=policy, args=args, train_dataset=data, processing_class=tok, **lora)
        gathers.clear()
        sharded_trainers.train(trainer)
        if trainer_class is FocalPOTrainer:  # scored vocabulary-parallel: fk never gathered the head
            assert not gathers, f"{name}: fk gathered {len(gathers)} DTensor(s)"
        assert trainer.accelerator.parallelism_config.tp_size == 2
        whole = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                 for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
        metrics.append([[entry[key] for key in METRICS] for entry in trainer.state.log_history if "loss" in entry])
        return *sharded_trainers.logged(trainer), [whole]

    try:
        stock = train(DPOTrainer, DPOConfig, {})
        mine = train(FocalPOTrainer, FocalPOConfig, ours)
    finally:
        linear.gathered = gathered
    sharded_trainers.assert_same_training(f"{name}, rank {rank}", mine, stock)
    for step, (ours, theirs) in enumerate(zip(*reversed(metrics), strict=True)):
        assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6), f"{name}, step {step}: {METRICS} {ours} {theirs}"
