"""Worker processes for tests/test_parallel_trainers.py: FocalPOTrainer beside TRL's DPOTrainer under FSDP2, two
ranks over gloo on the CPU.

accelerate 1.16 applies `fully_shard` to the decoder layers, the input embeddings, a tail unit of the final norm
and `lm_head` (kept gathered from the norm's forward to the end of the backward) and the root. Inside the model's
forward the fused head then reads a whole weight. A head whose unit has not gathered it there is a shard (a
DTensor): a head in a unit of its own (here every Linear is one), or a tail unit of the head alone (accelerate
finds no final norm beneath a PEFT model). The fused head then runs as that unit's forward, so that FSDP2
gathers the weight (in its mixed-precision dtype), gathers it again for the backward and reduce-scatters its
gradient, as for any call of the head. Each scenario trains the same model, reference and data with both
trainers (see tests/sharded_trainers.py) and compares them.

One thing here exists only because this is a CPU: accelerate 1.16 sets up FSDP only with an accelerator (on
MULTI_CPU it drops the FSDP plugin); `_cpu_fsdp2` keeps it, and points accelerate's backend lookup at gloo.
"""

from __future__ import annotations

import os
import warnings

import sharded_trainers
from sharded_trainers import LORA, on_disk

# (mode, name): "interpret" runs fk's Triton kernels through the interpreter, "plain" its PyTorch path.
# sync_ref_model: TR-DPO, a model object with a separate reference model (both compared after the steps); lora: PEFT
# (the reference is the adapter disabled); padding_free_tied: FocalPO packed against TRL padded, tied embeddings,
# FSDP's activation checkpointing (the others: TRL's default gradient checkpointing); path_precompute: a policy
# loaded from a path, with the reference precompute (under FSDP, TRL loads the reference from the policy's path for
# it), packed; head_unit: `lm_head` wrapped as a unit of its own (with every Linear), two micro-batches a step
# (gradient accumulation), against DPOTrainer with the default units, the head in the tail unit (TRL's own fused
# head reads a shard of a head in a unit of its own and takes its gradient from each rank's own tokens; see
# benchmarks/NOTES.md); head_unit_bf16: the head a unit of its own in bfloat16 mixed precision, whose shard is
# float32 (fk's PyTorch path, which rounds as TRL's head does: the interpreter truncates to bfloat16); compiled:
# FocalPOTrainer with `torch_compile=True` and the head a unit of its own, against DPOTrainer eager with the default
# units (fk's cross-rank check of the redirected head's inputs is a graph break there, the rest compiles).
SCENARIOS = (("interpret", "sync_ref_model"), ("interpret", "lora"), ("interpret", "padding_free_tied"),
             ("interpret", "path_precompute"), ("interpret", "head_unit"), ("plain", "head_unit_bf16"),
             ("interpret", "compiled"))
DECODER_UNITS = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
HEAD_UNITS = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer", "Linear"]}


def run(rank, world, port, scenarios):
    warnings.simplefilter("ignore")
    sharded_trainers.run(rank, world, port, scenarios, "fk-fsdp2", _compare, {})


def _cpu_fsdp2():
    import accelerate.state
    from accelerate.utils import DistributedType

    sharded_trainers.accelerate_over_gloo()
    state = accelerate.state.AcceleratorState
    if getattr(state.__init__, "_fk_cpu_fsdp2", False):
        return
    original = state.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init._fk_cpu_fsdp2 = True
    state.__init__ = init


def _compare(name, rank, workdir):
    import datasets
    import torch
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    import tiny_lm
    from focal_kernels.integrations import _trl_model
    from focal_kernels.integrations.trl import FocalPOConfig, FocalPOTrainer

    _cpu_fsdp2()
    tok = tiny_lm.make_tokenizer()
    data = datasets.Dataset.from_dict(tiny_lm.preference_rows(8))
    model = tiny_lm.make_model(tok, seed=0, tie=name == "padding_free_tied")
    ref = None if name in ("lora", "path_precompute") else tiny_lm.make_model(tok, seed=1)
    options, ours, kwargs = dict(loss_type="sigmoid", bf16=False), {}, {}
    # FocalPO at gamma = 0 is the sigmoid loss: packed here, padded in TRL
    packed = dict(loss_type="focal", focal_gamma=0.0, padding_free=True)
    if name == "lora":
        kwargs["peft_config"] = LoraConfig(**LORA)
    elif name == "sync_ref_model":
        options.update(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5)
    elif name == "path_precompute":
        options["precompute_ref_log_probs"] = True
        data = on_disk(rank, workdir, "data", lambda path: data.save_to_disk(path), datasets.load_from_disk)
        model = on_disk(rank, workdir, "model", model.save_pretrained, str)
    elif name == "head_unit_bf16":
        options.update(bf16=True, use_cpu=True)  # use_cpu: transformers refuses bf16 on a CPU otherwise
    if name in ("padding_free_tied", "path_precompute", "head_unit"):
        ours = packed
    elif name == "compiled":  # without gradient checkpointing, whose checkpointed layers break graphs themselves
        options["gradient_checkpointing"] = False
        ours = dict(torch_compile=True, torch_compile_backend="aot_eager")
    if name == "head_unit":
        options.update(per_device_train_batch_size=1, gradient_accumulation_steps=2)

    redirected, run_as_forward = [], _trl_model.run_as_forward

    def recorded(module, fn, *args):
        def spied(*inner):  # the head's weight as the fused head reads it, inside the unit's forward
            redirected.append((module, type(module.weight).__name__, torch.is_grad_enabled()))
            return fn(*inner)

        return run_as_forward(module, spied, *args)

    def train(trainer_class, config_class, extra, units):
        args = config_class(output_dir=os.path.join(workdir, f"out-{rank}"), fsdp=True, fsdp_config=units,
                            **{**sharded_trainers.TRAINING, **options, **extra})
        trainer = trainer_class(model=model if isinstance(model, str) else tiny_lm.clone(model),
                                ref_model=None if ref is None else tiny_lm.clone(ref), args=args,
                                train_dataset=data, processing_class=tok, **kwargs)
        redirected.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sharded_trainers.train(trainer)
        views = [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]
        assert trainer_class is DPOTrainer or not views, (name, views[:1])  # fk's outputs are not views
        assert trainer.accelerator.state.num_processes == 2 and trainer.is_fsdp_enabled
        policy = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
        base = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        head = base.get_output_embeddings()
        assert type(head.weight).__name__ == "DTensor", f"{name}: FSDP2 did not shard lm_head.weight"
        if trainer_class is FocalPOTrainer:
            # The head's unit was called, with its weight whole inside, wherever its forward had not gathered it:
            # at every policy forward, and only there. With PEFT, accelerate finds no final norm beneath the PEFT
            # model, so its tail unit is lm_head alone; that unit stays gathered after its forward, so the reference
            # forward (the adapter disabled) after the policy's reads a whole weight.
            alone = units is HEAD_UNITS or name == "lora"
            calls = 2 * args.gradient_accumulation_steps if alone else 0
            assert redirected == [(head, "Parameter", True)] * calls, (name, redirected)
        models = [policy] + [trainer.ref_model] * (name == "sync_ref_model")
        result = *sharded_trainers.logged(trainer), [_whole(m) for m in models]
        if name == "head_unit" and trainer_class is FocalPOTrainer:  # last: it leaves rank 1's head gathered
            _one_rank_fails(trainer.model, rank)
        return result

    units = DECODER_UNITS
    if name == "padding_free_tied":  # FSDP's activation checkpointing in place of TRL's default gradient checkpointing
        units = {**DECODER_UNITS, "activation_checkpointing": True}
        options["gradient_checkpointing"] = False
    stock = train(DPOTrainer, DPOConfig, {}, units)
    _trl_model.run_as_forward = recorded
    try:
        mine = train(FocalPOTrainer, FocalPOConfig, ours,
                     HEAD_UNITS if name.startswith("head_unit") or name == "compiled" else units)
    finally:
        _trl_model.run_as_forward = run_as_forward
    sharded_trainers.assert_same_training(f"{name}, rank {rank}", mine, stock)


def _whole(model):
    """Every parameter of `model`, whole."""
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _one_rank_fails(model, rank):
    """An error in one rank's inputs to the redirected head (rank 1's label out of the vocabulary) is raised on
    every rank, where the other rank's backward would otherwise wait for it in FSDP2's collectives."""
    import pytest
    import torch

    ids = torch.tensor([[5, 6, 7, 8]])
    labels = ids.clone()
    if rank == 1:
        labels[0, 2] = 10**6
    with pytest.raises(ValueError, match="labels must be in"):
        model(input_ids=ids, labels=labels, fused_lm_head=True)
