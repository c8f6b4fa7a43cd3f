"""`focal_kernels.integrations.trl`: FocalPOTrainer against TRL's DPOTrainer on a tiny model built in code.

No downloads: the model comes from a config, the tokenizer is trained on the fly (tests/tiny_lm.py). Trainer
constructions are the slow part, so each test builds few and varies the loss options on the built trainers.
"""

from __future__ import annotations

import logging

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("peft")
datasets = pytest.importorskip("datasets")

import sharded_trainers  # noqa: E402
import tiny_lm  # noqa: E402

from focal_kernels.integrations import _trl_model, trl as fk_trl  # noqa: E402
from focal_kernels.integrations.trl import FocalPOConfig, FocalPOTrainer  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

METRICS = [
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
]
TRL_LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]


@pytest.fixture(scope="module")
def tok():
    return tiny_lm.make_tokenizer()


@pytest.fixture(scope="module")
def dataset():
    return datasets.Dataset.from_dict(tiny_lm.preference_rows(8))


def _args(cls, tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        save_strategy="no",
        logging_steps=1,
        max_steps=1,
        disable_tqdm=True,
        seed=0,
        bf16=False,
    )
    base.update(kw)
    return cls(**base)


def _trained(trainer):
    """trainer.train(), then (losses, gradient norms, [parameters]) for `sharded_trainers.assert_same_training`."""
    trainer.train()
    return *sharded_trainers.logged(trainer), [{n: p.detach().clone() for n, p in trainer.model.named_parameters()}]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    for values in trainer._metrics["train"].values():
        values.clear()
    trainer._total_train_tokens = 0  # num_tokens is cumulative
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), _grads(trainer.model), metrics


def _assert_same(ours, theirs, *, rtol=2e-4, atol=1e-6):
    (loss_a, grads_a, metrics_a), (loss_b, grads_b, metrics_b) = ours, theirs
    torch.testing.assert_close(loss_a, loss_b, rtol=rtol, atol=atol)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_b:
        # fp32 with different summation orders: entries near zero are judged against the tensor's scale
        scale = grads_b[name].abs().max().item()
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=max(atol, 2e-5 * scale),
                                   msg=lambda m, name=name: f"{name}: {m}")
    for name in METRICS:
        assert metrics_a[name] == pytest.approx(metrics_b[name], rel=1e-3, abs=1e-5), name


def _build_pair(tmp_path, tok, dataset, *, setup, **config):
    """A stock DPOTrainer and a FocalPOTrainer on identical copies of the same model, reference and data."""
    model = tiny_lm.make_model(tok, seed=0)
    ref = tiny_lm.make_model(tok, seed=1) if setup in ("ref_model", "precompute") else None
    peft_config = None
    if setup in ("peft_model", "peft_config"):
        from peft import LoraConfig, get_peft_model

        # Random B: the adapter changes the policy, so the reference (adapter disabled / its copy) differs
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                 lora_dropout=0.0)
    trainers = []
    for trainer_cls, config_cls in ((DPOTrainer, DPOConfig), (FocalPOTrainer, FocalPOConfig)):
        m = tiny_lm.clone(model)
        kwargs = {}
        if setup == "peft_model":
            torch.manual_seed(0)
            m = get_peft_model(m, peft_config)
        elif setup == "peft_config":
            kwargs["peft_config"] = peft_config
        args = _args(config_cls, tmp_path / trainer_cls.__name__, precompute_ref_log_probs=setup == "precompute",
                     **config)
        trainers.append(trainer_cls(model=m, ref_model=None if ref is None else tiny_lm.clone(ref), args=args,
                                    train_dataset=dataset, processing_class=tok, **kwargs))
    if setup == "peft_config":  # same adapter init in both (get_peft_model draws after set_seed in each)
        stock, ours = trainers
        ours.model.load_state_dict(stock.model.state_dict())
    return trainers


@pytest.mark.parametrize("setup", ["ref_model", "precompute", "peft_model", "peft_config"])
def test_matches_dpo_trainer(tmp_path, tok, dataset, setup):
    stock, ours = _build_pair(tmp_path, tok, dataset, setup=setup, loss_type="sigmoid", beta=0.5)
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    if setup == "precompute":
        assert "ref_chosen_logps" in batch
        stock_batch = stock._prepare_inputs(next(iter(stock.get_train_dataloader())))
        torch.testing.assert_close(batch["ref_chosen_logps"], stock_batch["ref_chosen_logps"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch["ref_rejected_logps"], stock_batch["ref_rejected_logps"], rtol=1e-5,
                                   atol=1e-5)
        batch = stock_batch
    reference = _loss_and_grads(stock, batch)
    assert reference[0].item() != pytest.approx(0.6931, abs=1e-3) or setup == "peft_model"
    _assert_same(_loss_and_grads(ours, batch), reference)

    # FocalPO at gamma = 0 is DPO's sigmoid loss.
    ours.loss_types, ours.focal_gamma = ["focal"], 0.0
    _assert_same(_loss_and_grads(ours, batch), reference)

    if setup == "ref_model":
        # TRL's other options on the same trainers: LD-DPO's ld_alpha, WPO weighting, combined losses.
        for trainer in (stock, ours):
            trainer.ld_alpha = 0.5
        ours.loss_types = ["sigmoid"]
        _assert_same(_loss_and_grads(ours, batch), _loss_and_grads(stock, batch))
        for trainer in (stock, ours):
            trainer.loss_types, trainer.loss_weights = ["sigmoid", "sft"], [1.0, 0.5]
        _assert_same(_loss_and_grads(ours, batch), _loss_and_grads(stock, batch))
        for trainer in (stock, ours):
            trainer.ld_alpha = None
            trainer.loss_types, trainer.loss_weights = ["hinge", "ipo"], [0.7, 0.3]
        _assert_same(_loss_and_grads(ours, batch), _loss_and_grads(stock, batch))
        # Every TRL 1.16 loss type alone, and the f-divergences, on the same batch.
        smoothed = {"exo_pair", "robust", "aot", "aot_unpaired"}
        for loss_type in TRL_LOSS_TYPES:
            for trainer in (stock, ours):
                trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
                trainer.label_smoothing = 0.1 if loss_type in smoothed else 0.0
            _assert_same(_loss_and_grads(ours, batch), _loss_and_grads(stock, batch))
        for divergence in ("forward_kl", "js_divergence", "alpha_divergence"):
            for trainer in (stock, ours):
                trainer.loss_types, trainer.label_smoothing = ["sigmoid"], 0.0
                trainer.f_divergence_type, trainer.f_alpha_divergence_coef = divergence, 0.3
            _assert_same(_loss_and_grads(ours, batch), _loss_and_grads(stock, batch))


def test_moe_router_loss_matches_dpo_trainer(tmp_path, tok, dataset):
    """A mixture of experts whose config asks for router logits: the load-balancing loss (× its coefficient) is
    added and logged as DPOTrainer adds it, padded, packed (padding_free) and packed with `pad_to_multiple_of`
    (whose padding the router's loss leaves out, as the padded batch's attention mask does)."""
    model, ref = tiny_lm.make_moe_model(tok, seed=0), tiny_lm.make_moe_model(tok, seed=1)
    stock, ours = (
        cls(model=tiny_lm.clone(model), ref_model=tiny_lm.clone(ref), train_dataset=dataset, processing_class=tok,
            args=_args(config, tmp_path / cls.__name__, loss_type="sigmoid", beta=0.5))
        for cls, config in ((DPOTrainer, DPOConfig), (FocalPOTrainer, FocalPOConfig)))
    assert stock.aux_loss_enabled and ours.aux_loss_enabled
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    reference = _loss_and_grads(stock, batch)
    assert reference[2]["aux_loss"] > 0
    assert int(batch["attention_mask"].sum()) % 64
    for padding_free, multiple in ((False, None), (True, None), (True, 64)):
        ours.padding_free, ours.args.pad_to_multiple_of = padding_free, multiple
        result = _loss_and_grads(ours, batch)
        _assert_same(result, reference, rtol=1e-4)
        assert result[2]["aux_loss"] == pytest.approx(reference[2]["aux_loss"], rel=1e-5), (padding_free, multiple)


def test_evaluate_and_predict_match_dpo_trainer(tmp_path, tok, dataset):
    """TRL's evaluation loop, inherited: `evaluate()` and `predict()` on an eval dataset whose reference
    log-probs are precomputed (with a reference model), prompts truncated from the left (`truncation_mode=
    "keep_end"`, a `max_length` shorter than the longest pair) and an eval batch that does not divide the
    dataset: every metric is DPOTrainer's, and so are `predict`'s logits."""
    from datasets import Dataset

    eval_dataset = Dataset.from_dict(tiny_lm.preference_rows(7, seed=1))
    model, ref = tiny_lm.make_model(tok, seed=0), tiny_lm.make_model(tok, seed=1)
    results = []
    for cls, config in ((DPOTrainer, DPOConfig), (FocalPOTrainer, FocalPOConfig)):
        args = _args(config, tmp_path / cls.__name__, loss_type="sigmoid", beta=0.5, precompute_ref_log_probs=True,
                     max_length=7, truncation_mode="keep_end", per_device_eval_batch_size=3)
        trainer = cls(model=tiny_lm.clone(model), ref_model=tiny_lm.clone(ref), args=args, train_dataset=dataset,
                      eval_dataset=eval_dataset, processing_class=tok)
        results.append((trainer.evaluate(), trainer.predict(trainer.eval_dataset)))
    timing = ("runtime", "per_second", "preparation_time")
    (stock_eval, stock_predict), (our_eval, our_predict) = results
    for stock_metrics, our_metrics in ((stock_eval, our_eval), (stock_predict.metrics, our_predict.metrics)):
        kept = {name for name in stock_metrics if not name.endswith(timing)}
        assert kept == {name for name in our_metrics if not name.endswith(timing)} and kept
        for name in kept:
            assert our_metrics[name] == pytest.approx(stock_metrics[name], rel=1e-5, abs=1e-6), name
    assert stock_eval["eval_rewards/margins"] != 0 and "eval_logps/chosen" in stock_eval
    torch.testing.assert_close(torch.as_tensor(our_predict.predictions), torch.as_tensor(stock_predict.predictions))


def test_use_weighting_matches_dpo_trainer(tmp_path, tok, dataset):
    stock, ours = _build_pair(tmp_path, tok, dataset, setup="ref_model", loss_type="sigmoid", use_weighting=True)
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    _assert_same(_loss_and_grads(ours, batch), _loss_and_grads(stock, batch))
    # hinge: TRL 1.16's backward fails there (it weights the relu's output in place); its forward value is the
    # loss, and fk's gradient exists
    for trainer in (stock, ours):
        trainer.loss_types = ["hinge"]
    with torch.no_grad():
        expected = stock.compute_loss(stock.model, batch)
    loss, grads, _ = _loss_and_grads(ours, batch)
    torch.testing.assert_close(loss, expected, rtol=2e-4, atol=1e-6)
    assert all(torch.isfinite(g).all() for g in grads.values()) and any(g.abs().sum() > 0 for g in grads.values())


def test_sync_ref_model_matches_dpo_trainer(tmp_path, tok, dataset):
    """TR-DPO's `sync_ref_model`: TRL's callback mixes the policy into the reference model after every step, in
    place; the fused head reads the mixed weights. Losses after the first step depend on the synced reference."""
    stock, ours = _build_pair(tmp_path, tok, dataset, setup="ref_model", loss_type="sigmoid", beta=0.5,
                              sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5,
                              learning_rate=1e-2, max_steps=3)
    before = {name: p.detach().clone() for name, p in ours.ref_model.named_parameters()}
    losses = []
    for trainer in (stock, ours):
        trainer.train()
        losses.append([entry["loss"] for entry in trainer.state.log_history if "loss" in entry])
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    synced = dict(stock.ref_model.named_parameters())
    # Parameters within 1% of one optimizer step (lr = 1e-2; a typical element moves 1.5e-2 in three steps, a
    # missed sync by about that): Adam normalizes each element's gradient, so where it is near zero (6.08e-8
    # from TRL's head, 6.13e-8 from ours, at rounding level) the two runs' updates differ by up to 1.7e-5.
    for name, param in ours.ref_model.named_parameters():
        assert not torch.equal(param, before[name]), name
        torch.testing.assert_close(param, synced[name], rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("padding_free", [False, True])
def test_torch_compile_matches_eager_dpo_trainer(tmp_path, tok, dataset, padding_free):
    """`torch_compile=True` (accelerate compiles the model): two steps match DPOTrainer's eager ones, and the fused
    head traces into the model's graph, fk's operator inside it, with no graph break or warning of fk's own
    (TRL's default gradient checkpointing is off: transformers' checkpointed layers break graphs themselves)."""
    model, ref = tiny_lm.make_model(tok, seed=0), tiny_lm.make_model(tok, seed=1)
    # SGD: a parameter moves by its gradient (Adam would scale up the rounding in gradients near zero)
    options = dict(loss_type="sigmoid", beta=0.5, learning_rate=1e-2, max_steps=2, gradient_checkpointing=False,
                   optim="sgd")
    results = []
    for trainer_cls, config_cls, extra in ((DPOTrainer, DPOConfig, {}),
                                           (FocalPOTrainer, FocalPOConfig, dict(
                                               torch_compile=True, torch_compile_backend="aot_eager",
                                               padding_free=padding_free))):
        args = _args(config_cls, tmp_path / trainer_cls.__name__, **options, **extra)
        trainer = trainer_cls(model=tiny_lm.clone(model), ref_model=tiny_lm.clone(ref), args=args,
                              train_dataset=dataset, processing_class=tok)
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(_trained(trainer))
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"  # compiled
    assert not [str(w.message) for w in caught if "focal_kernels" in str(w.filename) + str(w.message)]
    sharded_trainers.assert_same_training(f"compiled, padding_free={padding_free}", results[1], results[0])

    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if padding_free:  # the call the packed trainer makes: one row of real tokens, positions restarting per sequence
        inputs = dict(input_ids=ids[mask.bool()][None],
                      position_ids=torch.cat([torch.arange(int(n)) for n in mask.sum(1)])[None])
    else:
        inputs = dict(input_ids=ids, attention_mask=mask)
    explained = torch._dynamo.explain(trainer.model)(**inputs, labels=inputs["input_ids"], fused_lm_head=True)
    ours = [reason for reason in explained.break_reasons
            if reason.user_stack and "focal_kernels" in reason.user_stack[-1].filename]
    assert not ours, [(reason.reason, reason.user_stack[-1]) for reason in ours]
    traced = [module.code for graph in explained.graphs for module in graph.modules() if hasattr(module, "code")]
    for op in ("linear_forward", "linear_backward"):  # fk's autograd.Function's forward and backward bodies
        assert any(f"torch.ops.focal_kernels.{op}." in code for code in traced), op


def test_activation_offloading_matches_dpo_trainer(tmp_path, tok, dataset, monkeypatch):
    """TRL's `activation_offloading`: saved-tensor hooks copy every activation saved for the backward out and back,
    fk's too. TRL builds its offloader only with an accelerator; here it is built with the CPU as its device,
    without streams or pinned memory, offloading tensors of any size."""
    from trl.models.activation_offloading import get_act_offloading_ctx_manager

    model, ref = tiny_lm.make_model(tok, seed=0), tiny_lm.make_model(tok, seed=1)
    options = dict(loss_type="sigmoid", beta=0.5, learning_rate=1e-2, max_steps=2, optim="sgd")
    results = []
    for trainer_cls, config_cls, offloaded, extra in ((DPOTrainer, DPOConfig, False, {}),
                                                      (FocalPOTrainer, FocalPOConfig, True, {}),
                                                      (FocalPOTrainer, FocalPOConfig, True, dict(padding_free=True))):
        args = _args(config_cls, tmp_path / str(len(results)), **options, **extra)
        trainer = trainer_cls(model=tiny_lm.clone(model), ref_model=tiny_lm.clone(ref), args=args,
                              train_dataset=dataset, processing_class=tok)
        packed = []
        if offloaded:
            with monkeypatch.context() as patch:
                patch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cpu"))
                offloader = get_act_offloading_ctx_manager(trainer.model, use_streams=False, use_pin_memory=False,
                                                           min_offload_size=0)
            pack = offloader.pack_hook
            offloader.pack_hook = lambda tensor, pack=pack: packed.append(tensor.shape) or pack(tensor)
            trainer.maybe_activation_offload_context = offloader
        results.append(_trained(trainer))
        assert bool(packed) == offloaded
    for packed_too, result in enumerate(results[1:]):
        sharded_trainers.assert_same_training(f"offloaded, padding_free={bool(packed_too)}", result, results[0])


def test_tied_embeddings_with_gradient_checkpointing_train_as_dpo_trainer(tmp_path, tok, dataset):
    """Two SGD steps of `train()` on a model whose lm_head is its input embedding (tied), with gradient
    checkpointing on: the fused head's weight gradient adds into the embedding's, as the model's own head's does.
    Losses, gradient norms and every parameter after the steps are DPOTrainer's, padded and packed."""
    model, ref = tiny_lm.make_model(tok, seed=0, tie=True), tiny_lm.make_model(tok, seed=1, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    options = dict(loss_type="sigmoid", beta=0.5, learning_rate=1e-2, max_steps=2, optim="sgd",
                   gradient_checkpointing=True)
    results = []
    for trainer_cls, config_cls, extra in ((DPOTrainer, DPOConfig, {}), (FocalPOTrainer, FocalPOConfig, {}),
                                           (FocalPOTrainer, FocalPOConfig, dict(padding_free=True))):
        args = _args(config_cls, tmp_path / str(len(results)), **options, **extra)
        trainer = trainer_cls(model=tiny_lm.clone(model), ref_model=tiny_lm.clone(ref), args=args,
                              train_dataset=dataset, processing_class=tok)
        results.append(_trained(trainer))
        assert trainer.model.is_gradient_checkpointing
        assert trainer.model.lm_head.weight is trainer.model.model.embed_tokens.weight
    for packed, result in enumerate(results[1:]):
        sharded_trainers.assert_same_training(f"tied, padding_free={bool(packed)}", result, results[0])


@pytest.mark.parametrize("dispatched", ["reference_offloaded", "policy"])
def test_models_dispatched_by_accelerate(tmp_path, tok, dataset, dispatched):
    """Models loaded with a `device_map` carry accelerate's hooks, which move a module's inputs to its device and
    load its offloaded weights in its call. A reference model with lm_head offloaded to disk (a meta tensor outside
    the head's call; TRL 1.16's fused head reads the meta tensor and fails) and a trained policy with hooks: the
    fused head runs as the head's call. Loss and gradients equal DPOTrainer's on the models in memory. (The policy
    case, nothing offloaded, would pass with the weight read directly too: it checks the gradients through the
    head's call.) The model's own hook (which moves outputs back to the inputs' device) runs for the fused forward
    too."""
    from accelerate import dispatch_model
    from transformers import AutoModelForCausalLM

    model, ref = tiny_lm.make_model(tok, seed=0), tiny_lm.make_model(tok, seed=1)
    if dispatched == "reference_offloaded":
        ref.save_pretrained(tmp_path / "saved")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", offload_folder=str(tmp_path / "offload"),
                                                      device_map={"model": "cpu", "lm_head": "disk"})
    else:  # hooks on one device (as a multi-GPU device_map sets them on each)
        loaded = dispatch_model(tiny_lm.clone(model), device_map={"model": "cpu", "lm_head": "cpu"}, force_hooks=True)
    assert loaded.lm_head._hf_hook is not None
    assert _trl_model.forward_slot(loaded) == "_old_forward"  # accelerate's wrapper is the model's forward
    over = tiny_lm.clone(loaded)
    own = over.forward
    over.forward = lambda *args, **kwargs: own(*args, **kwargs)  # a wrapper set over it is replaced, as without hooks
    assert _trl_model.forward_slot(over) == "forward"
    options = dict(loss_type="sigmoid", beta=0.5)
    stock = DPOTrainer(model=tiny_lm.clone(model), ref_model=ref, args=_args(DPOConfig, tmp_path / "stock", **options),
                       train_dataset=dataset, processing_class=tok)
    mine = dict(model=loaded, ref_model=tiny_lm.clone(ref)) if dispatched == "policy" else \
        dict(model=tiny_lm.clone(model), ref_model=loaded)
    ours = FocalPOTrainer(**mine, train_dataset=dataset, processing_class=tok,
                          args=_args(FocalPOConfig, tmp_path / "ours", **options))
    weight = loaded.lm_head.weight
    assert weight.device.type == ("meta" if dispatched == "reference_offloaded" else "cpu")
    outputs, post_forward = [], loaded._hf_hook.post_forward
    loaded._hf_hook.post_forward = lambda module, output: post_forward(module, outputs.append(output) or output)
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    _assert_same(_loss_and_grads(ours, batch), _loss_and_grads(stock, batch))
    assert [type(output).__name__ for output in outputs] == ["FusedCausalLMOutput"]
    assert loaded.lm_head.weight.device == weight.device  # offloaded again after the call


@pytest.mark.parametrize("peft_head", ["lora", "modules_to_save"])
def test_offloaded_head_under_a_peft_wrapper_is_refused(tmp_path, tok, dataset, peft_head):
    """An lm_head offloaded by accelerate and then wrapped by PEFT: the wrapper's call does not load the offloaded
    weight, which stays a meta tensor where the fused head reads it. Refused by name at construction (the head
    probe), not PyTorch's meta-tensor error."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    tiny_lm.make_model(tok, seed=0).save_pretrained(tmp_path / "saved")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", offload_folder=str(tmp_path / "offload"),
                                                 device_map={"model": "cpu", "lm_head": "disk"})
    where = dict(target_modules=["q_proj", "lm_head"]) if peft_head == "lora" else \
        dict(target_modules=["q_proj"], modules_to_save=["lm_head"])
    with pytest.raises(NotImplementedError, match="lm_head whose weight is a meta tensor"):
        FocalPOTrainer(model=model, args=_args(FocalPOConfig, tmp_path / "ours"), train_dataset=dataset,
                       processing_class=tok, peft_config=LoraConfig(r=4, lora_dropout=0.0, **where))


def test_head_with_a_weight_setting_hook(tmp_path, tok, dataset):
    """A pruned lm_head (`torch.nn.utils.prune`: a forward pre-hook sets `weight = weight_orig * weight_mask` for
    each call). Read outside a call, the weight is the one the last call set: the head probe's, made without
    gradients, so lm_head would silently never train. The fused head runs the pruning hook first; loss and
    gradients (`weight_orig`'s included) equal DPOTrainer's at its first step, twice over (TRL 1.16 reads the
    weight its pruning set, which works once: its second backward raises). The head is not called: another hook
    on it, which expects logits, is not run with the fused head's result."""
    import torch.nn.utils.prune as prune

    model, ref = tiny_lm.make_model(tok, seed=0), tiny_lm.make_model(tok, seed=1)
    trainers = []
    for trainer_cls, config_cls in ((DPOTrainer, DPOConfig), (FocalPOTrainer, FocalPOConfig)):
        pruned = tiny_lm.clone(model)  # pruned after the copy (a pruned module can't be deep-copied)
        prune.l1_unstructured(pruned.lm_head, "weight", amount=0.3)
        args = _args(config_cls, tmp_path / trainer_cls.__name__, loss_type="sigmoid", beta=0.5)
        trainers.append(trainer_cls(model=pruned, ref_model=tiny_lm.clone(ref), args=args, train_dataset=dataset,
                                    processing_class=tok))
    stock, ours = trainers
    outputs = []
    ours.model.lm_head.register_forward_hook(lambda module, args, output: outputs.append(output.float().mean()))
    batch = ours._prepare_inputs(next(iter(ours.get_train_dataloader())))
    expected = _loss_and_grads(stock, batch)
    assert expected[1]["lm_head.weight_orig"].abs().sum() > 0
    for _ in range(2):
        _assert_same(_loss_and_grads(ours, batch), expected)
    assert not outputs


def test_padding_free_matches_padded(tmp_path, tok, dataset, caplog):
    model = tiny_lm.make_model(tok, seed=0)
    ref = tiny_lm.make_model(tok, seed=1)
    args = _args(FocalPOConfig, tmp_path, padding_free=True, loss_type="focal", focal_gamma=0.5, beta=0.5)
    with caplog.at_level(logging.WARNING):
        trainer = FocalPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dataset, processing_class=tok)
    assert trainer.padding_free
    # TRL's "padding_free is disabled" warning would be false here: it is dropped
    assert not [r for r in caplog.records if "padding_free" in r.getMessage()], caplog.text
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert (batch["attention_mask"] == 0).any(), "the test batch must have padding"

    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    packed = _loss_and_grads(trainer, batch)
    hook.remove()
    n_real = int(batch["attention_mask"].sum())
    assert seen and all(shape == (1, n_real) for shape in seen), seen  # policy and reference: real tokens only

    trainer.padding_free = False
    _assert_same(packed, _loss_and_grads(trainer, batch), rtol=1e-4, atol=1e-6)

    # pad_to_multiple_of bounds the packed row's length too (TRL turns padding_free off and pads the batch to
    # it): the padding is in sequences of its own, unscored; the loss and gradients are the packed ones
    trainer.padding_free = True
    trainer.args.pad_to_multiple_of = 48
    seen.clear()
    positions = []
    hooks = [model.model.embed_tokens.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape)),
             model.register_forward_pre_hook(lambda mod, args, kwargs: positions.append(kwargs["position_ids"]),
                                             with_kwargs=True)]
    padded_packed = _loss_and_grads(trainer, batch)
    assert n_real % 48 and seen and all(shape == (1, -(-n_real // 48) * 48) for shape in seen), (n_real, seen)
    _assert_same(padded_packed, packed, rtol=1e-5, atol=1e-7)
    # the padding's positions restart at 0 and stay below the longest sequence's length (one model's largest
    # position id is the same packed, padded or not)
    longest = int(batch["attention_mask"].sum(1).max())
    assert -n_real % 48 > longest, (n_real, longest)  # (padding alone would reach a larger position)
    assert all(int(p.max()) == longest - 1 and p.shape[1] % 48 == 0 for p in positions), (longest, positions)
    for hook in hooks:
        hook.remove()
    trainer.args.pad_to_multiple_of = None

    # A row without real tokens is an empty sequence: the rows after it keep their own log-probs
    trainer.padding_free = True
    empty = 1
    holey = {k: v.clone() for k, v in batch.items()}
    holey["attention_mask"][empty] = 0
    holey["completion_mask"][empty] = 0
    with torch.no_grad():
        kept = [trainer._fused_per_token(model, b, trainer._model_kwargs(b))[1]["log_probs"] for b in (batch, holey)]
    others = [i for i in range(batch["input_ids"].shape[0]) if i != empty]
    assert (kept[1][empty] == 0).all()
    torch.testing.assert_close(kept[1][others], kept[0][others], rtol=1e-5, atol=1e-6)


def test_focal_training_learns_and_logs(tmp_path, tok, dataset):
    model = tiny_lm.make_model(tok, seed=0)
    args = _args(
        FocalPOConfig,
        tmp_path,
        loss_type="focal",
        focal_gamma=0.05,
        beta=0.5,
        learning_rate=3e-3,
        max_steps=8,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
        eval_strategy="no",
        precompute_ref_log_probs=True,  # no ref_model: the reference is the initial policy, scored up front
    )
    trainer = FocalPOTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset,
                             processing_class=tok)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 8
    for name in METRICS:
        assert name in logs[0], name
        assert f"eval_{name}" in after, name
    assert after["eval_loss"] < before["eval_loss"] - 1e-3
    assert after["eval_rewards/accuracies"] > before["eval_rewards/accuracies"]
    assert logs[-1]["loss"] < logs[0]["loss"]
    trainer.create_model_card()  # names FocalPO's paper and tags, not DPO's paper
    card = Path(trainer.args.output_dir, "README.md").read_text()
    assert "2501.06645" in card and "liu2025focalpo" in card and "rafailov2023direct" not in card
    assert "focal-kernels" in card


def test_bf16_autocast_on_cpu(tmp_path, tok, dataset):
    """bf16 = True with use_cpu (CPU autocast) trains. accelerate's autocast wrapper stays on the model's
    forward afterwards: a second trainer built on the same model (here with bf16 = False) probes its head
    under that autocast, and the probe's tolerance is bfloat16's (it raised with float32's)."""
    model = tiny_lm.make_model(tok, seed=0)
    args = _args(FocalPOConfig, tmp_path, bf16=True, max_steps=2, padding_free=True, loss_type="focal")
    trainer = FocalPOTrainer(model=model, ref_model=tiny_lm.clone(model), args=args, train_dataset=dataset,
                             processing_class=tok)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs)
    assert model.forward.__func__ is not type(model).forward  # still wrapped
    FocalPOTrainer(model=model, ref_model=tiny_lm.clone(model), args=_args(FocalPOConfig, tmp_path),
                   train_dataset=dataset, processing_class=tok)


def _other_head(kind, tok):
    """Tiny models whose forward transforms the logits beyond a soft-cap field the fused head always read."""
    import transformers

    special = {name: getattr(tok, name) for name in ("pad_token_id", "eos_token_id", "bos_token_id")}
    small = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    if kind == "recurrent_gemma":  # soft-caps with `logits_soft_cap`
        config = transformers.RecurrentGemmaConfig(**small, num_key_value_heads=1, lru_width=32,
                                                   attention_window_size=16, block_types=["recurrent", "attention"],
                                                   logits_soft_cap=2.0, **special)
        model = transformers.RecurrentGemmaForCausalLM(config)
    elif kind == "inkling":  # divides the hidden states by a width multiplier, keeps the first 200 logits
        from transformers.models.inkling.configuration_inkling import InklingTextConfig
        from transformers.models.inkling.modeling_inkling import InklingForCausalLM

        config = InklingTextConfig(**small, num_key_value_heads=2, head_dim=8, logits_mup_width_multiplier=4.0,
                                   unpadded_vocab_size=200, **special)
        model = InklingForCausalLM(config)
    else:  # roberta: dense, gelu and a norm before the Linear that get_output_embeddings() returns
        config = transformers.RobertaConfig(**small, is_decoder=True, max_position_embeddings=80, **special)
        model = transformers.RobertaForCausalLM(config)
    with torch.no_grad():  # logits as large as a trained model's, for the transforms to matter
        model.get_output_embeddings().weight.mul_(30.0)
    return model


@pytest.mark.parametrize("kind", ["recurrent_gemma", "inkling", "roberta"])
def test_fused_head_is_the_models_own_or_refused(tmp_path, tok, dataset, kind):
    """The fused head reproduces the model's own logits (soft-cap and scaling fields, a sliced vocabulary), and
    a head it cannot reproduce is refused at construction instead of training on wrong log-probs."""
    model = _other_head(kind, tok)
    args = _args(FocalPOConfig, tmp_path, loss_type="focal")
    build = lambda: FocalPOTrainer(model=model, ref_model=tiny_lm.clone(model), args=args,  # noqa: E731
                                   train_dataset=dataset, processing_class=tok)
    if kind == "roberta":
        with pytest.raises(NotImplementedError, match="output head .*'roberta'"):
            build()
        # refused: left as it came, without the fused head's forward or the one it kept
        assert not [name for name in vars(model) if name == "forward" or name.startswith("_fk_")], vars(model).keys()
        # refused as the policy's head is installed: before any reference log-probs are precomputed
        ref, calls = tiny_lm.clone(model), []
        ref.register_forward_hook(lambda *_: calls.append(1))
        with pytest.raises(NotImplementedError, match="output head"):
            FocalPOTrainer(model=model, ref_model=ref, train_dataset=dataset, processing_class=tok,
                           args=_args(FocalPOConfig, tmp_path / "pre", precompute_ref_log_probs=True))
        assert not calls
        return
    trainer = build()
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    trainer.model.eval()
    with torch.no_grad():
        fused = trainer.model(**kwargs, labels=labels, fused_lm_head=True).log_probs.sum(1)
        logits = trainer.model(**kwargs).logits[:, :-1].double()
    shifted = labels[:, 1:]
    expected = logits.log_softmax(-1).gather(-1, shifted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = expected.masked_fill(shifted == -100, 0).sum(1)
    torch.testing.assert_close(fused.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("fill", [float("-inf"), torch.finfo(torch.float32).min])
def test_head_probe_sees_a_masked_vocabulary(tmp_path, tok, dataset, fill):
    """A model that masks part of its vocabulary (which the fused head cannot know) is refused: the probe's
    tolerance scales with the logits that carry probability mass, not with the mask's value."""
    model = tiny_lm.make_model(tok, seed=0)
    forward = model.forward

    def masked(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits[..., -1] = fill  # a row the probe's tokens never name
        return out

    model.forward = masked
    with pytest.raises(NotImplementedError, match="output head"):
        FocalPOTrainer(model=model, ref_model=tiny_lm.make_model(tok, seed=1), args=_args(FocalPOConfig, tmp_path),
                       train_dataset=dataset, processing_class=tok)


def test_peft_trainable_token_indices(tmp_path, tok, dataset):
    """PEFT's trainable tokens wrap the embedding (a wrapper without `num_embeddings`): the trainer builds and
    its loss is finite."""
    from peft import LoraConfig

    config = LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices=[5, 6])
    trainer = FocalPOTrainer(model=tiny_lm.make_model(tok), args=_args(FocalPOConfig, tmp_path),
                             train_dataset=dataset, processing_class=tok, peft_config=config)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))


def test_a_copy_of_a_fused_model_runs_its_own_weights(tok):
    """A deep copy of a model with the fused head installed (twice: a second trainer on the same model) calls
    its own forward without `fused_lm_head`, not the original's (the replaced forward was a closure's bound
    method of the original): after the copy's weights change, its logits and fused log-probs are its own."""
    model = tiny_lm.make_model(tok, seed=0)
    _trl_model.install_fused_head(model)
    _trl_model.install_fused_head(model)
    copy = tiny_lm.clone(model)
    with torch.no_grad():
        for parameter in copy.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = copy(input_ids=ids).logits
        expected = type(copy).forward(copy, input_ids=ids).logits
        fused = copy(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        original = model(input_ids=ids).logits
    assert torch.equal(logits, expected) and not torch.allclose(logits, original)
    own = logits[:, :-1].double().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(fused.double(), own, rtol=0, atol=1e-5)


def test_head_probe_reads_the_per_backend_tf32_switch(tmp_path, tok, dataset):
    """transformers' `tf32=True` sets PyTorch's per-backend `fp32_precision` (after which the legacy getter may
    raise): the head probe's tolerance reads it there, and construction works."""
    from transformers.utils.import_utils import enable_tf32

    backends = (torch.backends, torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [backend.fp32_precision for backend in backends]
    try:
        enable_tf32(True)
        assert _trl_model.fp32_matmul_eps(torch.device("cpu")) == 2.0**-10
        FocalPOTrainer(model=tiny_lm.make_model(tok), ref_model=tiny_lm.make_model(tok, seed=1),
                       args=_args(FocalPOConfig, tmp_path), train_dataset=dataset, processing_class=tok)
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        assert _trl_model.fp32_matmul_eps(torch.device("cpu")) == 2.0**-7
    finally:
        for backend, value in zip(backends, saved):
            backend.fp32_precision = value
    assert _trl_model.fp32_matmul_eps(torch.device("cpu")) == 0.0


@pytest.mark.parametrize("dispatched", [False, True], ids=["", "dispatched"])
@pytest.mark.parametrize("head", ["lora", "modules_to_save"])
def test_peft_lm_head_matches_model_forward(tmp_path, tok, dataset, head, dispatched):
    """LoRA on lm_head (TRL refuses it) or the head in `modules_to_save`: the fused head's log-probs equal the PEFT
    model's own full-logit forward, with the adapter on and off (the reference), and the head's adapter trains.
    Dispatched: accelerate's hooks on the model's modules before PEFT wraps the head (`modules_to_save`'s wrapper
    passes attribute lookups on to the hooked head it wraps, but has no hooks of its own)."""
    from accelerate import dispatch_model
    from peft import LoraConfig

    model = tiny_lm.make_model(tok, seed=0)
    if dispatched:
        model = dispatch_model(model, device_map={"model": "cpu", "lm_head": "cpu"}, force_hooks=True)
    if head == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False,
                            lora_dropout=0.0)
    else:
        config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    args = _args(FocalPOConfig, tmp_path, loss_type="focal")
    trainer = FocalPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=config)
    lm_head = trainer.model.get_base_model().lm_head
    if head == "modules_to_save":  # make the trained copy differ from the original head
        with torch.no_grad():
            lm_head.modules_to_save["default"].weight.add_(0.5 * torch.randn_like(lm_head.weight))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)[:, 1:]
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    for disabled in (False, True):
        context = trainer.model.disable_adapter() if disabled else torch.enable_grad()
        with context:
            fused = trainer.model(**kwargs, labels=batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100),
                                  fused_lm_head=True).log_probs
            logits = trainer.model(**kwargs).logits[:, :-1].double()
        expected = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        expected = expected.masked_fill(labels == -100, 0).sum(1)
        torch.testing.assert_close(fused.sum(1).double(), expected, rtol=1e-5, atol=1e-4)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    trained = lm_head.lora_B["default"] if head == "lora" else lm_head.modules_to_save["default"]
    assert trained.weight.grad is not None and trained.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "case",
    ["use_liger_kernel", "processor", "compute_metrics", "unknown_loss", "lora_head_dropout",
     "dora_head", "padding_free_opt", "context_parallel", "sequence_parallel", "context_parallel_accelerate"],
)
def test_unsupported_options_raise(tmp_path, tok, dataset, case, monkeypatch):
    model = tiny_lm.make_model(tok)
    config, kwargs, error = {}, {}, NotImplementedError
    if case == "dora_head":
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, target_modules=["lm_head"], use_dora=True, lora_dropout=0.0)
    elif case == "padding_free_opt":  # an architecture whose packed sequences would see each other
        monkeypatch.setattr(model.config, "model_type", "opt")
        config["padding_free"] = True
    elif case == "use_liger_kernel":
        config["use_liger_kernel"] = True
    elif case == "processor":
        from transformers import ProcessorMixin

        class Processor(ProcessorMixin):
            attributes = []

            def __init__(self):
                pass

        kwargs["processing_class"] = Processor()
    elif case == "compute_metrics":
        kwargs["compute_metrics"] = lambda pred: {}
    elif case in ("context_parallel", "sequence_parallel"):  # refused before accelerate sees the world size
        from accelerate import ParallelismConfig

        config["parallelism_config"] = ParallelismConfig(
            **(dict(cp_size=2) if case == "context_parallel" else dict(sp_size=2, sp_backend="deepspeed")))
    elif case == "context_parallel_accelerate":  # set in accelerate's own config: known once the trainer is built
        from accelerate import ParallelismConfig

        built = DPOTrainer.__init__

        def init(self, *args, **kwargs):
            built(self, *args, **kwargs)
            monkeypatch.setattr(self.accelerator.state, "parallelism_config", ParallelismConfig(cp_size=2))

        monkeypatch.setattr(DPOTrainer, "__init__", init)
        kwargs["ref_model"] = tiny_lm.make_model(tok, seed=1)  # built in full this time (no hub id to load from)
    elif case == "unknown_loss":
        config["loss_type"], error = "no_such_loss", ValueError
    elif case == "lora_head_dropout":
        from peft import LoraConfig

        kwargs["peft_config"] = LoraConfig(r=4, target_modules=["lm_head"], lora_dropout=0.1)
        config["disable_dropout"] = False  # TRL's default zeroes every dropout, LoRA's included
    kwargs.setdefault("processing_class", tok)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error) as info:
            FocalPOTrainer(model=model, args=_args(FocalPOConfig, tmp_path, **config), train_dataset=dataset, **kwargs)
    message = str(info.value)
    if case != "unknown_loss":
        assert "FocalPOTrainer does not support" in message
    if "_parallel" in case:
        assert case.split("_parallel")[0] + " parallelism" in message
    assert "no_such_loss" in message or case != "unknown_loss"


def test_padding_free_probe_refuses_an_unlisted_leaking_model(tmp_path, tok, dataset, monkeypatch):
    """An architecture not on the refusal list is probed: OPT (learned absolute positions) is caught by the
    probe alone, and a Llama passes it."""
    from transformers import OPTConfig, OPTForCausalLM

    monkeypatch.setattr(_trl_model, "_UNPACKABLE_MODEL_TYPES", frozenset())
    def opt(seed):
        torch.manual_seed(seed)
        return OPTForCausalLM(OPTConfig(vocab_size=256, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                        num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id))

    with pytest.raises(NotImplementedError, match="a probe found that its packed sequences see each other"):
        FocalPOTrainer(model=opt(0), ref_model=opt(1), args=_args(FocalPOConfig, tmp_path / "opt", padding_free=True),
                       train_dataset=dataset, processing_class=tok)
    trainer = FocalPOTrainer(model=tiny_lm.make_model(tok), ref_model=tiny_lm.make_model(tok, seed=1),
                             args=_args(FocalPOConfig, tmp_path / "llama", padding_free=True), train_dataset=dataset,
                             processing_class=tok)
    assert trainer._fk_packing_checked


def test_padding_free_checks_the_reference_model_and_options(tmp_path, tok, dataset):
    """The reference model is checked like the policy (it runs packed too), and NEFTune's length-scaled noise
    is refused with packing."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=256, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                   num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128))
    with pytest.raises(NotImplementedError, match="`padding_free=True` with 'opt' models"):
        FocalPOTrainer(model=tiny_lm.make_model(tok), ref_model=opt, train_dataset=dataset, processing_class=tok,
                       args=_args(FocalPOConfig, tmp_path / "ref", padding_free=True))
    with pytest.raises(NotImplementedError, match="neftune_noise_alpha"):
        FocalPOTrainer(model=tiny_lm.make_model(tok), ref_model=tiny_lm.make_model(tok, seed=1), train_dataset=dataset,
                       processing_class=tok,
                       args=_args(FocalPOConfig, tmp_path / "neft", padding_free=True, neftune_noise_alpha=5.0))


def test_model_given_as_a_path(tmp_path, tok, dataset):
    """A policy given as a local path: with padding_free (checked once loaded), and with only reference-free
    loss types (the policy is loaded, no reference model is)."""
    path = tmp_path / "policy"
    tiny_lm.make_model(tok).save_pretrained(path)
    trainer = FocalPOTrainer(model=str(path), train_dataset=dataset, processing_class=tok,
                             args=_args(FocalPOConfig, tmp_path / "pf", padding_free=True))
    assert trainer.padding_free and trainer._fk_packing_checked and trainer.ref_model is not None
    trainer = FocalPOTrainer(model=str(path), train_dataset=dataset, processing_class=tok,
                             args=_args(FocalPOConfig, tmp_path / "simpo", loss_type="simpo"))
    assert trainer.model is not None and trainer.ref_model is None
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert torch.isfinite(_loss_and_grads(trainer, batch)[0])


def test_trl_version_pin(monkeypatch, tmp_path, tok, dataset):
    import trl

    fk_trl._check_trl_version()  # the installed one is supported
    for bad in ("1.17.0", "1.15.2", "2.0.0"):
        with pytest.raises(ImportError, match=r"trl>=1\.16,<1\.17"):
            fk_trl._check_trl_version(bad)
    monkeypatch.setattr(trl, "__version__", "1.17.0")
    monkeypatch.delitem(sys.modules, "focal_kernels.integrations.trl")
    with pytest.raises(ImportError, match=r"found trl 1\.17\.0"):
        importlib.import_module("focal_kernels.integrations.trl")
    with pytest.raises(ImportError, match=r"found trl 1\.17\.0"):  # an already-imported module checks again
        FocalPOTrainer(model=tiny_lm.make_model(tok), args=_args(FocalPOConfig, tmp_path), train_dataset=dataset,
                       processing_class=tok)


def test_trl_step_benchmark_smoke(tmp_path, capsys):
    """benchmarks/trl_step.py at a tiny size, in this process (TRL is imported here already)."""
    from benchmarks.trl_step import main

    out = tmp_path / "trl_step.json"
    argv = ["--tiny", "--steps", "1", "--warmup", "1", "--padding-free", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().out[-3000:]
    import json

    result = json.loads(out.read_text())
    assert result["complete"] and {r["impl"] for r in result["rows"]} == {"dpo", "focalpo", "focalpo_padding_free"}
    assert not any(row["compiled"] for row in result["rows"])
    assert {r["impl"]: r["loss_type"] for r in result["rows"]}["dpo"] == "sigmoid"  # focal's γ = 0
    assert all(r["loss_type"] == "focal" for r in result["rows"] if r["impl"] != "dpo")
    assert result["versions"]["trl"] and result["versions"]["transformers"] and result["commit"] is not None
    # One trainer failing (TRL has no simpo) leaves a row saying so; the other trainer's row is still measured.
    assert main([*argv[:argv.index("--padding-free")], "--loss-type", "simpo", "--out", str(out)]) == 1
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["dpo"]["status"].startswith("error: ValueError") and rows["dpo"]["loss_type"] == "simpo"
    assert rows["focalpo"]["status"] == "ok" and rows["focalpo"]["loss_type"] == "simpo"
    # Both trainers compiled (the warm-up step compiles)
    assert main([*argv[:argv.index("--padding-free")], "--torch-compile", "aot_eager", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] and "torch_compile=aot_eager" in result["shape"] and len(result["rows"]) == 2
    assert all(row["compiled"] for row in result["rows"])


def test_importing_focal_kernels_does_not_import_trl():
    code = "import sys, focal_kernels, focal_kernels.integrations; assert 'trl' not in sys.modules, 'trl imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_simpo_is_reference_free_inside_the_trainer(tmp_path, tok, dataset):
    """SimPO (reference-free) alone and in a weighted list with a reference-based type: the trainer computes it
    without the reference log-probs TRL provides, and the list is Σ w_k · mean ℓ_k."""
    model = tiny_lm.make_model(tok, seed=0)
    config = dict(loss_type=["sigmoid", "simpo"], loss_weights=[1.0, 0.5], beta=0.5, simpo_gamma=0.3)
    losses = {}
    for seed in (1, 2):  # two different reference models: the SimPO term must not depend on them
        trainer = FocalPOTrainer(model=tiny_lm.clone(model), ref_model=tiny_lm.make_model(tok, seed=seed),
                                 args=_args(FocalPOConfig, tmp_path / str(seed), **config), train_dataset=dataset,
                                 processing_class=tok)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        combined = _loss_and_grads(trainer, batch)[0]
        parts = {}
        for loss_type in ("sigmoid", "simpo"):
            trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
            parts[loss_type] = _loss_and_grads(trainer, batch)[0]
        torch.testing.assert_close(combined, parts["sigmoid"] + 0.5 * parts["simpo"], rtol=1e-5, atol=1e-6)
        losses[seed] = parts
    torch.testing.assert_close(losses[1]["simpo"], losses[2]["simpo"], rtol=1e-6, atol=1e-7)
    assert abs(losses[1]["sigmoid"].item() - losses[2]["sigmoid"].item()) > 1e-4  # the reference does matter there


def test_simpo_alone_needs_no_reference_model(tmp_path, tok, dataset):
    """Only reference-free types: no reference model is loaded when none is given (a model built from a config
    has no hub id to load it from), and none is run when one is given."""
    model = tiny_lm.make_model(tok, seed=0)
    config = dict(loss_type="simpo", beta=0.5, simpo_gamma=0.3)
    trainer = FocalPOTrainer(model=tiny_lm.clone(model), args=_args(FocalPOConfig, tmp_path / "none", **config),
                             train_dataset=dataset, processing_class=tok)
    assert trainer.ref_model is None
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    without = _loss_and_grads(trainer, batch)

    ref = tiny_lm.make_model(tok, seed=1)
    calls = []
    hook = ref.register_forward_hook(lambda *_: calls.append(1))
    trainer = FocalPOTrainer(model=tiny_lm.clone(model), ref_model=ref, train_dataset=dataset, processing_class=tok,
                             args=_args(FocalPOConfig, tmp_path / "given", **config))
    with_ref = _loss_and_grads(trainer, batch)
    assert not calls, "the reference model ran for a reference-free loss"
    _assert_same(without, with_ref, rtol=1e-6, atol=1e-7)

    # precompute_ref_log_probs: nothing to precompute (no reference forward); the logged rewards are those of
    # TRL's CPOTrainer for SimPO, β · the average log-prob, with or without precompute
    trainer = FocalPOTrainer(model=tiny_lm.clone(model), ref_model=ref, train_dataset=dataset, processing_class=tok,
                             args=_args(FocalPOConfig, tmp_path / "pre", precompute_ref_log_probs=True, **config))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    hook.remove()
    assert not calls, "the reference model ran to precompute log-probs no loss reads"
    logged = {}
    trainer._log_metrics = lambda *args: logged.update(zip(("chosen_logps", "rejected_logps", "chosen_rewards",
                                                            "rejected_rewards"), args[4:8]))
    _loss_and_grads(trainer, batch)
    counts = batch["completion_mask"].sum(dim=1).chunk(2)
    torch.testing.assert_close(logged["chosen_rewards"], 0.5 * logged["chosen_logps"].detach() / counts[0])
    torch.testing.assert_close(logged["rejected_rewards"], 0.5 * logged["rejected_logps"].detach() / counts[1])


def test_simpo_averages_the_scored_tokens_without_a_prompt(tmp_path, tok):
    """With empty prompts a completion starts at the sequence's first token, which nothing predicts: SimPO's
    average log-prob (loss and logged rewards) divides by the tokens really scored, as TRL's CPOTrainer does,
    and by 1 where none is (an empty answer: EOS alone, at the first position)."""
    rows = tiny_lm.preference_rows(8)
    rows["prompt"] = [""] * len(rows["prompt"])
    rows["rejected"][0] = ""
    trainer = FocalPOTrainer(model=tiny_lm.make_model(tok, seed=0), train_dataset=datasets.Dataset.from_dict(rows),
                             processing_class=tok,
                             args=_args(FocalPOConfig, tmp_path, loss_type="simpo", beta=0.5, simpo_gamma=0.3))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert batch["completion_mask"][:, 0].all(), "the test needs completions that start at the first token"
    logged = {}
    trainer._log_metrics = lambda *args: logged.update(zip(("chosen_logps", "rejected_logps", "chosen_rewards",
                                                            "rejected_rewards"), args[4:8]))
    loss = trainer.compute_loss(trainer.model, batch)
    chosen, rejected = logged["chosen_logps"].detach(), logged["rejected_logps"].detach()
    scored_c, scored_r = batch["completion_mask"][:, 1:].sum(dim=1).chunk(2)
    assert (scored_r == 0).any(), "the test needs a rejected answer with no scored token"
    scored_c, scored_r = scored_c.clamp(min=1), scored_r.clamp(min=1)
    expected = -torch.nn.functional.logsigmoid(0.5 * (chosen / scored_c - rejected / scored_r) - 0.3).mean()
    torch.testing.assert_close(loss.detach(), expected)
    torch.testing.assert_close(logged["chosen_rewards"], 0.5 * chosen / scored_c)
    torch.testing.assert_close(logged["rejected_rewards"], 0.5 * rejected / scored_r)


def test_reference_free_precompute_leaves_trl_cache_alone(tmp_path, tok, dataset):
    """TRL caches precomputed reference log-probs in a file keyed by the dataset and the model, not the loss:
    the zeros of a reference-free run must not land there, or a later DPO run on the same dataset and model
    (max_length=None: the same fingerprint) reads them as its reference."""
    dataset.save_to_disk(tmp_path / "data")
    on_disk = lambda: datasets.load_from_disk(str(tmp_path / "data"))  # noqa: E731 (a dataset with cache files)
    model, ref = tiny_lm.make_model(tok, seed=0), tiny_lm.make_model(tok, seed=1)
    FocalPOTrainer(model=tiny_lm.clone(model), ref_model=tiny_lm.clone(ref), train_dataset=on_disk(),
                   processing_class=tok, args=_args(FocalPOConfig, tmp_path / "simpo", loss_type="simpo",
                                                    max_length=None, precompute_ref_log_probs=True))
    trainer = DPOTrainer(model=tiny_lm.clone(model), ref_model=tiny_lm.clone(ref), train_dataset=on_disk(),
                         processing_class=tok,
                         args=_args(DPOConfig, tmp_path / "dpo", max_length=None, precompute_ref_log_probs=True))
    assert (torch.tensor(trainer.train_dataset["ref_chosen_logps"]) < 0).all()


@pytest.mark.parametrize("chunk", [0, -4, 2.5, True])
def test_logprob_chunk_size_checked_at_construction(tmp_path, tok, dataset, chunk):
    with pytest.raises(TypeError if isinstance(chunk, (bool, float)) else ValueError,
                       match="logprob_chunk_size must be a positive int"):
        FocalPOTrainer(model=tiny_lm.make_model(tok), ref_model=tiny_lm.make_model(tok, seed=1),
                       args=_args(FocalPOConfig, tmp_path, logprob_chunk_size=chunk), train_dataset=dataset,
                       processing_class=tok)


@pytest.mark.parametrize("option, words", [
    (dict(label_smoothing=0.1), "label_smoothing=0.1 is read by none"),
    (dict(focal_gamma=2.0), "focal_gamma=2.0 is read only by the 'focal'"),
    (dict(focal_gamma=-1.0, loss_type="focal"), "focal_gamma must be >= 0"),
    (dict(f_divergence_type="gamma"), "got 'gamma'"),  # only the option's own name is renamed
    (dict(detach_focal_weight=True), "detach_focal_weight=True"),
    (dict(simpo_gamma=5.0), "simpo_gamma=5.0 is read only by the 'simpo'"),
    (dict(sync_ref_model=True, loss_type="simpo"), "sync_ref_model=True is read by none"),
])
def test_option_no_loss_type_reads_raises(tmp_path, tok, dataset, option, words):
    """TRL 1.16 ignores such options silently; FocalPOTrainer refuses them at construction."""
    with pytest.raises(ValueError, match=words):
        FocalPOTrainer(model=tiny_lm.make_model(tok), args=_args(FocalPOConfig, tmp_path,
                                                                 **{"loss_type": "sigmoid", **option}),
                       train_dataset=dataset, processing_class=tok)


def test_config_defaults_are_the_checked_defaults(tmp_path):
    """FocalPOConfig's (and TRL's DPOConfig's) defaults of the loss options are the ones fk accepts when no
    selected loss type reads them: a default config with any loss type constructs."""
    from focal_kernels.losses.validation import OPTION_DEFAULTS

    args = _args(FocalPOConfig, tmp_path)
    given = {"gamma": args.focal_gamma, "detach_focal_weight": args.detach_focal_weight,
             **{name: getattr(args, name) for name in OPTION_DEFAULTS if name not in ("gamma", "detach_focal_weight")}}
    assert given == OPTION_DEFAULTS
