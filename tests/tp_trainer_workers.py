"""Worker processes for tests/test_parallel_trainers.py: FocalPOTrainer beside TRL's DPOTrainer under tensor
parallelism, two ranks over gloo on the CPU, and under FSDP2 and tensor parallelism at once, four ranks.

transformers loads the model with `tp_plan="auto"`: Llama's plan shards the attention and MLP projections and
`lm_head` (colwise: its weight a DTensor of vocabulary rows, `Shard(0)`); the trainer then gives accelerate a
`ParallelismConfig(tp_size=2)`. Both ranks train on the same batch. The fused head scores the weight shard
vocabulary-parallel (the test checks that it did, and that fk gathered no DTensor; TRL's own head gathers it
with `full_tensor()`). On four ranks transformers loads the model with `DistributedConfig(tp_size=2,
fsdp_size=2)`: the same plan over a (fsdp, tp) mesh, then `fully_shard` of its units over the fsdp dimension
(the head a unit of its own); each TP pair trains on its own batch. There the fused head runs as the head's unit's
forward, whose gathered weight is the TP shard again, scored vocabulary-parallel.
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
# the adapter disabled; then LoRA on lm_head is refused)
SCENARIOS = (("interpret", "tp"), ("interpret", "tp_packed"), ("interpret", "tp_compiled"), ("interpret", "tp_lora"))
# four ranks, (fsdp, tp) = (2, 2): fsdp_tp: padded, the sigmoid loss; fsdp_tp_packed: as tp_packed
FSDP_TP_SCENARIOS = (("interpret", "fsdp_tp"), ("interpret", "fsdp_tp_packed"))
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
    from focal_kernels.integrations import _trl_model
    from focal_kernels.integrations.trl import FocalPOConfig, FocalPOTrainer
    from focal_kernels.logprobs import linear

    _cpu_tensor_parallel()
    tok = tiny_lm.make_tokenizer()
    data = datasets.Dataset.from_dict(tiny_lm.preference_rows(8))
    paths = [on_disk(rank, workdir, f"model-{seed}", tiny_lm.make_model(tok, seed=seed).save_pretrained, str)
             for seed in (0, 1)]
    packed = dict(loss_type="focal", focal_gamma=0.0, padding_free=True)
    ours = {"tp": {}, "tp_packed": packed, "tp_compiled": dict(torch_compile=True, torch_compile_backend="aot_eager"),
            "tp_lora": {}, "fsdp_tp": {}, "fsdp_tp_packed": packed}[name]
    both = dict(gradient_checkpointing=False) if name == "tp_compiled" else {}
    load = dict(tp_plan="auto")  # deprecated by transformers for DistributedConfig(tp_plan=...): the same effect
    if name.startswith("fsdp_"):
        from transformers.distributed import DistributedConfig

        load = dict(distributed_config=DistributedConfig(tp_size=2, fsdp_size=2))
    gathers, gathered, metrics, groups, group_of = [], linear.gathered, [], [], _trl_model.tensor_parallel_group

    def counted(tensor):
        if isinstance(tensor, DTensor):
            gathers.append(tensor.shape)
        return gathered(tensor)

    def recorded(model, weight):
        groups.append(group_of(model, weight))
        return groups[-1]

    linear.gathered, _trl_model.tensor_parallel_group = counted, recorded

    def train(trainer_class, config_class, extra):
        policy, ref = (AutoModelForCausalLM.from_pretrained(path, **load) for path in paths)
        head = policy.get_output_embeddings().weight
        # the TP placement last (before it, on four ranks, FSDP's strided shard of the same rows)
        assert isinstance(head, DTensor) and head.placements[-1].is_shard(0), f"{name}: lm_head is not vocab-sharded"
        args = config_class(output_dir=os.path.join(workdir, f"out-{rank}"), bf16=False,
                            **{**sharded_trainers.TRAINING, "loss_type": "sigmoid", **both, **extra})
        lora = dict(ref_model=None, peft_config=LoraConfig(**LORA)) if name == "tp_lora" else dict(ref_model=ref)
        trainer = trainer_class(model=policy, args=args, train_dataset=data, processing_class=tok, **lora)
        gathers.clear()
        groups.clear()
        sharded_trainers.train(trainer)
        if trainer_class is FocalPOTrainer:  # scored vocabulary-parallel: fk never gathered the head
            assert groups and all(group is not None for group in groups), \
                f"{name}: not scored vocabulary-parallel ({groups})"
            assert not gathers, f"{name}: fk gathered {len(gathers)} DTensor(s)"
        config = trainer.accelerator.parallelism_config
        assert (config.tp_size, config.dp_shard_size) == (2, 2 if name.startswith("fsdp_") else 1), config
        whole = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                 for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()}
        metrics.append([[entry[key] for key in METRICS] for entry in trainer.state.log_history if "loss" in entry])
        return *sharded_trainers.logged(trainer), [whole]

    try:
        stock = train(DPOTrainer, DPOConfig, {})
        mine = train(FocalPOTrainer, FocalPOConfig, ours)
    finally:
        linear.gathered, _trl_model.tensor_parallel_group = gathered, group_of
    sharded_trainers.assert_same_training(f"{name}, rank {rank}", mine, stock)
    if name == "tp_lora":  # LoRA on the sharded head itself is refused (DPOTrainer refuses LoRA on any lm_head)
        args = FocalPOConfig(output_dir=os.path.join(workdir, f"out-{rank}"), bf16=False, **sharded_trainers.TRAINING)
        lora = LoraConfig(**{**LORA, "target_modules": ["q_proj", "lm_head"]})
        with pytest.raises(NotImplementedError, match="LoRA on an `lm_head` whose weight is sharded"):
            FocalPOTrainer(model=AutoModelForCausalLM.from_pretrained(paths[0], tp_plan="auto"), args=args,
                           train_dataset=data, processing_class=tok, peft_config=lora)
    for step, (ours, theirs) in enumerate(zip(*reversed(metrics), strict=True)):
        assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-6), f"{name}, step {step}: {METRICS} {ours} {theirs}"
