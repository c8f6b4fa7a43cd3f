"""Worker processes for tests/test_deepspeed.py: FocalPOTrainer beside TRL's DPOTrainer under DeepSpeed ZeRO-3,
two ranks over gloo on the CPU, each rank training on its own half of every batch.

Under ZeRO-3 every parameter is a shard of numel 0 outside its module's forward. The fused head reads
`lm_head.weight` inside the model's forward (the patched `forward`), not through `lm_head`'s own call: during
the forward of the module a DeepSpeed engine wraps, DeepSpeed gathers it as an external parameter of the model
(its `_parameters` dictionary's access hook registers it), and keeps it gathered through the model's backward,
where fk's backward reads it again. Each scenario trains the same model, reference and data with both trainers
(plain SGD, so that a parameter's update is its gradient, scaled) and compares the logged losses and gradient
norms and every parameter after the steps (the reference model's too where it is synced).

Two things here exist only because this is a CPU: accelerate 1.16 has no DeepSpeed set-up without an
accelerator (its backend lookup is pointed at gloo), and DeepSpeed's shared-memory all-reduce op, which it
would JIT-compile first (about 35 s, with g++), is marked unavailable, so gloo runs every collective.
"""

from __future__ import annotations

import os
import warnings

import torch

import sharded_trainers
from sharded_trainers import LORA, on_disk

# sync_ref_model: TR-DPO, a model object with a separate reference model (both compared after the steps);
# lora: PEFT (the reference is the adapter disabled); padding_free_tied: FocalPO packed against TRL padded, tied
# embeddings; precompute: TRL's reference precompute on its DeepSpeed inference engine; path: policy and reference
# loaded from a path under `zero.Init` (sharded before any engine exists: fk's head probe and packing probe wait
# for the first forward), packed; path_lora: a path and PEFT (the head is installed on the base model, the engine
# wraps the PEFT model); wrong_head: a path, with a fused head that differs from the model's own (the waiting
# probe refuses it, at every try); cache_key: two models of one architecture loaded from paths, each with the
# reference precompute (TRL's cache key hashes the state_dict, empty shards here); zero2: ZeRO-2 (whole
# parameters), packed; compiled: FocalPOTrainer with `torch_compile=True` against DPOTrainer eager (TRL 1.16's own
# fused head fails in its backward there), a model object with a reference model; leaf_head: every Linear a ZeRO-3
# leaf module (`set_z3_leaf_modules`), `lm_head` included, against TRL on the model without them (TRL 1.16's own
# fused head never calls `lm_head`, so DeepSpeed never reduces a leaf head's gradient there: it stays unchanged);
# leaf_refused: a leaf inside a LoRA-wrapped `lm_head` (its base layer), which fk refuses.
SCENARIOS = ("sync_ref_model", "lora", "padding_free_tied", "precompute", "path", "path_lora", "wrong_head",
             "cache_key", "zero2", "compiled", "leaf_head", "leaf_refused")
PATHS = ("path", "path_lora", "wrong_head", "cache_key")


def run(rank, world, port, scenarios):
    warnings.simplefilter("ignore")
    sharded_trainers.run(rank, world, port, scenarios, "fk-zero3", _compare,
                         dict(ACCELERATE_USE_DEEPSPEED="true", DS_ACCELERATOR="cpu"))


def _cpu_deepspeed():
    import deepspeed.ops

    sharded_trainers.accelerate_over_gloo()
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _compare(name, rank, workdir):
    import datasets
    import deepspeed.comm
    import deepspeed.utils
    import pytest
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    import tiny_lm
    from focal_kernels.integrations import _trl_model
    from focal_kernels.integrations.trl import FocalPOConfig, FocalPOTrainer

    _cpu_deepspeed()
    tok = tiny_lm.make_tokenizer()
    data = datasets.Dataset.from_dict(tiny_lm.preference_rows(8))
    data = on_disk(rank, workdir, f"data-{name}", lambda path: data.save_to_disk(path), datasets.load_from_disk)
    model = tiny_lm.make_model(tok, seed=0, tie=name == "padding_free_tied")
    with_ref = ("padding_free_tied", "sync_ref_model", "zero2", "compiled", "leaf_head")
    ref = tiny_lm.make_model(tok, seed=1) if name in with_ref else None
    options, ours, kwargs = dict(loss_type="sigmoid"), {}, {}
    leaves = None
    if name in ("leaf_head", "leaf_refused"):
        leaves = tiny_lm.clone(model)
        deepspeed.utils.set_z3_leaf_modules(leaves, [torch.nn.Linear])
    # FocalPO at gamma = 0 is the sigmoid loss: packed here, padded in TRL
    packed = dict(loss_type="focal", focal_gamma=0.0, padding_free=True)
    if name in ("lora", "path_lora"):
        kwargs["peft_config"] = LoraConfig(**LORA)
    elif name == "leaf_refused":
        kwargs["peft_config"] = LoraConfig(**{**LORA, "target_modules": ["q_proj", "lm_head"]})
    if name in ("precompute", "cache_key"):
        options["precompute_ref_log_probs"] = True
    elif name == "sync_ref_model":
        options.update(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    if name in ("padding_free_tied", "path", "path_lora", "wrong_head", "zero2"):
        ours = packed
    if name == "compiled":  # without gradient checkpointing, whose checkpointed layers break graphs themselves
        options["gradient_checkpointing"] = False
        ours = dict(torch_compile=True, torch_compile_backend="aot_eager")
    if name in PATHS:
        model = on_disk(rank, workdir, f"model-{name}", model.save_pretrained, str)
    stage = 2 if name == "zero2" else 3
    zero = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_allow_untested_optimizer": True,
            # every parameter sharded, however small (the default keeps those under 10^5 elements whole)
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}

    def build(trainer_class, config_class, extra, policy=None):
        policy = policy or model
        args = config_class(output_dir=os.path.join(workdir, f"out-{rank}"), bf16=False, deepspeed=zero,
                            **{**sharded_trainers.TRAINING, **options, **extra})
        trainer = trainer_class(model=policy if isinstance(policy, str) else tiny_lm.clone(policy),
                                ref_model=None if ref is None else tiny_lm.clone(ref), args=args,
                                train_dataset=data, processing_class=tok, **kwargs)
        assert deepspeed.comm.comm.cdb.shm_comm_op is None, "DeepSpeed built its shared-memory op after all"
        if isinstance(policy, str) and trainer_class is FocalPOTrainer and "precompute_ref_log_probs" not in options:
            # sharded at construction: not probed yet (the precompute's forwards would have run the probes)
            assert trainer._fk_unprobed and not trainer.__dict__.get("_fk_packing_checked"), name
        return trainer

    def train(trainer_class, config_class, extra, policy=None):
        trainer = build(trainer_class, config_class, extra, policy)
        sharded_trainers.train(trainer)
        assert trainer.accelerator.state.num_processes == 2 and trainer.is_deepspeed_enabled
        if trainer_class is FocalPOTrainer:
            assert not trainer._fk_unprobed
        models = [trainer.accelerator.unwrap_model(trainer.model)] + [trainer.ref_model] * (name == "sync_ref_model")
        return *sharded_trainers.logged(trainer), [_gathered(m, name, stage) for m in models]

    if name == "wrong_head":
        # the fused head installed with a logit scale the model does not apply
        real = _trl_model.fk.logit_options_from_config
        _trl_model.fk.logit_options_from_config = lambda config: {**real(config), "logit_scale": 2.0}
        try:
            trainer = build(FocalPOTrainer, FocalPOConfig, ours)
            pending = list(trainer._fk_unprobed)
            for _ in range(2):  # a refused head stays refused
                with pytest.raises(NotImplementedError, match="does not support this model's output head"):
                    trainer.train()
                assert trainer._fk_unprobed == pending
        finally:
            _trl_model.fk.logit_options_from_config = real
        return
    if name == "cache_key":  # another model's cached reference log-probs must not be read back
        other = on_disk(rank, workdir, "model-cache_key-other", tiny_lm.make_model(tok, seed=2).save_pretrained, str)
        first, second = (build(FocalPOTrainer, FocalPOConfig, {}, policy) for policy in (model, other))
        assert first._precompute_model_hash != second._precompute_model_hash
        refs = [torch.tensor(t.train_dataset["ref_chosen_logps"]) for t in (first, second)]
        assert (refs[0] - refs[1]).abs().max() > 1e-3, refs
        return
    if name == "leaf_refused":
        trainer = build(FocalPOTrainer, FocalPOConfig, ours, leaves)
        with pytest.raises(NotImplementedError, match=r"ZeRO-3 leaf modules \(lm_head\.base_layer\)"):
            trainer.train()
        return
    stock = train(DPOTrainer, DPOConfig, {})
    mine = train(FocalPOTrainer, FocalPOConfig, ours, leaves)
    sharded_trainers.assert_same_training(f"{name}, rank {rank}", mine, stock)


def _gathered(model, name, stage):
    """Every parameter of `model`, whole (after checking that ZeRO-3 really sharded its lm_head)."""
    import deepspeed

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    weight = base.get_output_embeddings().weight
    if stage == 3:
        assert weight.numel() == 0 < weight.ds_numel, f"{name}: lm_head.weight is not a ZeRO-3 shard"
    else:
        assert weight.numel() > 0 and not hasattr(weight, "ds_numel"), name
    named = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().clone() for n, p in named}
