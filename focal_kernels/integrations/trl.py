"""TRL integration: `FocalPOTrainer`, a drop-in for TRL's `DPOTrainer` whose log-probs and loss come from this library.

```python
from focal_kernels.integrations.trl import FocalPOConfig, FocalPOTrainer

args = FocalPOConfig(output_dir="out", loss_type="focal", focal_gamma=0.05, beta=0.1)
trainer = FocalPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=ds, processing_class=tok)
trainer.train()
```

What it changes in `DPOTrainer` (TRL 1.16), and nothing else:

- The fused LM head. `DPOTrainer` patches the policy's and the reference's `forward` so that
  `model(..., labels=..., fused_lm_head=True)` returns per-token log-probs from TRL's `ChunkedLogProbFunction`.
  Here the same patch (same call, same output type, applied at the same points) runs the backbone, takes its final
  hidden states and the `lm_head` weight, and calls `fk.fused_linear_token_logps` with the logit softcap / scale the
  model's config defines (`fk.logit_options_from_config`). The per-token entropy, mean logit, top-1 flag and
  `log Σ p²` (for `use_weighting`) come from that same pass (`stats=`). The loss still runs inside the model's
  forward, so FSDP2's and DeepSpeed's forward hooks fire as they do for TRL.
- The loss (`_compute_loss`, `compute_ref_log_probs`): `fk.preference_loss` computes every TRL loss type, `"focal"`
  and `"simpo"`, alone or weighted (`loss_weights`); `ld_alpha`, `use_weighting`, `label_smoothing`,
  `f_divergence_type`, `discopop_tau`, precomputed or live reference log-probs keep their TRL meaning, and the
  logged metrics are TRL's names with TRL's definitions.
- `padding_free=True` (which TRL 1.16 turns off): the collated batch is packed into one row of real tokens with
  position ids restarting at 0 per sequence (transformers then keeps attention within each sequence), the first
  token of each sequence is never scored, and the per-token results are laid back out through `cu_seqlens` onto the
  padded grid, so everything downstream is the padded computation; `pad_to_multiple_of` pads the packed row. (A
  model that reads the batch's largest position id, as dynamic RoPE scaling does, sees the longest real sequence
  when packed and the padded length when padded: the packed result is the one that does not depend on padding.)

Data (tokenization, collator, reference precompute and its cache) is TRL's, unchanged.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from dataclasses import dataclass, field

import torch

import focal_kernels as fk
from focal_kernels.checks import check_chunk_size
from focal_kernels.losses.batch import spec_of
from focal_kernels.losses.validation import check_options, OPTION_DEFAULTS, reads_option, resolve_loss_types

SUPPORTED_TRL_VERSIONS = ">=1.16,<1.17"
_SUPPORTED_RELEASE = (1, 16)


def _check_trl_version(version: str | None = None) -> None:
    """Raise `ImportError` unless the installed TRL (or `version`) is a 1.16.x release."""
    from packaging.version import InvalidVersion, Version

    if version is None:
        try:
            import trl
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "focal_kernels.integrations.trl needs TRL and Python >= 3.11: pip install -e '.[trl]' from a "
                f"checkout (trl{SUPPORTED_TRL_VERSIONS})."
            ) from e
        version = trl.__version__
    try:
        release = Version(version).release[:2]
    except InvalidVersion:
        release = None
    if release != _SUPPORTED_RELEASE:
        raise ImportError(
            f"focal_kernels.integrations.trl supports TRL {SUPPORTED_TRL_VERSIONS} only (it overrides DPOTrainer's "
            f"loss and fused LM head, which change between TRL releases); found trl {version}. Install "
            f"'trl{SUPPORTED_TRL_VERSIONS}' (pip install -e '.[trl]' from a checkout)."
        )


_check_trl_version()

from accelerate.utils import is_peft_model  # noqa: E402
from transformers import ProcessorMixin  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer import dpo_trainer as _trl_dpo  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

from ._trl_model import (  # noqa: E402
    forward_slot, hash_sharded_module, install_fused_head, lora_head_unsupported_reason, probe_head, probe_packing,
    refuse_multimodal, refuse_unpackable, zero3_sharded,
)

__all__ = ["SUPPORTED_TRL_VERSIONS", "FocalPOConfig", "FocalPOTrainer"]


@dataclass
class FocalPOConfig(DPOConfig):
    """`DPOConfig` with FocalPO's options; every `DPOConfig` option keeps its meaning.

    Args:
        loss_type (`str` or `list[str]`, defaults to `["focal"]`):
            `"focal"`, `"simpo"` or any TRL 1.16 DPO loss type; a list is combined with `loss_weights`.
        focal_gamma (`float`, defaults to `0.05`):
            FocalPO's γ: the pair loss is `-p^γ · log p` with `p = σ(β·margin)`; `0.0` is DPO's sigmoid loss.
        detach_focal_weight (`bool`, defaults to `False`):
            Treat `p^γ` as a constant in the backward.
        simpo_gamma (`float`, defaults to `0.5`):
            SimPO's target margin, for `loss_type="simpo"`.
        logprob_chunk_size (`int`, *optional*):
            Vocabulary rows per chunk of the fused head (`chunk_size` of `fk.fused_linear_token_logps`); `None`
            lets the library choose.
    """

    loss_type: list[str] = field(
        default_factory=lambda: ["focal"],
        metadata={
            "help": "Loss type: 'focal', 'simpo' or any TRL DPO loss type ('sigmoid', 'hinge', 'ipo', 'exo_pair', "
            "'nca_pair', 'robust', 'bco_pair', 'sppo_hard', 'aot', 'aot_unpaired', 'apo_zero', 'apo_down', "
            "'discopop', 'sft', 'sigmoid_norm'); several are combined with `loss_weights`."
        },
    )
    focal_gamma: float = field(
        default=0.05, metadata={"help": "FocalPO's gamma: loss = -p^gamma log p, p = sigmoid(beta*margin)."}
    )
    detach_focal_weight: bool = field(
        default=False, metadata={"help": "Treat FocalPO's modulating factor p^gamma as a constant in the backward."}
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO's target reward margin."})
    logprob_chunk_size: int | None = field(
        default=None, metadata={"help": "Vocabulary rows per chunk of the fused LM head; None: the library's default."}
    )


# --------------------------------------------------------------------------------------------------------------------
# Construction: what TRL's `__init__` runs with (the fused head and the model checks: _trl_model.py)


class _NoTunerLayer:
    """Matches no module: stands in for PEFT's `BaseTunerLayer` in TRL's lm_head-adapter refusal."""


# TRL's `__init__` is run with two of its module's names swapped (`_swap_attribute`): trainers built at once in
# several threads take turns.
_CONSTRUCTION_LOCK = threading.RLock()


@contextlib.contextmanager
def _swap_attribute(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


class _DropMessage(logging.Filter):
    """Drops log records whose message contains `text` (accelerate prefixes the rank)."""

    def __init__(self, text):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


def _refuse_sequence_sharding(config) -> None:
    """Context parallelism and (Ulysses) sequence parallelism give each rank a slice of every sequence. The pair
    losses need each whole sequence's log-prob, which the trainer does not gather across those ranks: refused
    rather than trained on partial sums. (Tensor parallelism keeps whole sequences on every rank: it works.)"""
    for dim, what in (("cp", "context parallelism"), ("sp", "sequence parallelism")):
        size = getattr(config, f"{dim}_size", None) or 1
        if size > 1:
            raise NotImplementedError(
                f"FocalPOTrainer does not support {what} (`{dim}_size={size}` in the `ParallelismConfig`): each rank "
                "would score a slice of every sequence, and the preference loss needs whole-sequence log-probs. "
                "Outside the trainer, `fk.sequence_logps(..., sequence_parallel_group=...)` sums them over a group."
            )


@contextlib.contextmanager
def _without_padding_free_warning():
    """TRL 1.16's `__init__` warns that `padding_free=True` is disabled when it reads the trainer's
    `padding_free`, which is True here (it is implemented, see `FocalPOTrainer.padding_free`): that one
    message is dropped while TRL's `__init__` runs."""
    logger = getattr(_trl_dpo, "logger", None)
    logger = getattr(logger, "logger", logger)  # accelerate's MultiProcessAdapter wraps the logging.Logger
    if not isinstance(logger, logging.Logger):
        yield
        return
    drop = _DropMessage("`padding_free=True` is temporarily unavailable")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _policy_only(model):
    """TRL's `create_model_from_path` for a trainer that needs no reference model: a policy given as a hub id or
    path (TRL's first call) is loaded; the reference (the second call) is not, and stays None."""
    load = _trl_dpo.create_model_from_path
    pending = [model] if isinstance(model, str) else []

    def create(path, *args, **kwargs):
        if pending:
            pending.pop()
            return load(path, *args, **kwargs)
        return None

    return create


def _reference_free(loss_types) -> bool:
    """Whether every one of the loss types ignores the reference log-probs (SimPO)."""
    names = [loss_types] if isinstance(loss_types, str) else list(loss_types)
    return bool(names) and all(name in fk.LOSS_TYPES and spec_of(fk.LOSS_TYPES[name])["reference_free"]
                               for name in names)


# --------------------------------------------------------------------------------------------------------------------
# The trainer


class FocalPOTrainer(DPOTrainer):
    """TRL's `DPOTrainer` with this library's fused log-probs and `preference_loss`.

    Same arguments as `DPOTrainer`; `args` may be a `FocalPOConfig` (FocalPO's options) or a plain `DPOConfig`
    (`focal_gamma=0.05`, `detach_focal_weight=False`, `simpo_gamma=0.5` then). Raises at construction on options it
    does not support: vision-language models, `use_liger_kernel`, `compute_metrics`, `padding_free` with
    prompt-learning PEFT, with `neftune_noise_alpha` or with a policy or reference model that cannot pack (OPT,
    BLOOM, MPT, XGLM, GPT-Neo, Mamba, Mamba-2, Falcon-Mamba, Jamba; any other architecture is probed), PEFT
    adapters on `lm_head` other than plain LoRA without dropout, and a model whose own logits the fused head does
    not reproduce (probed as each head is installed: `probe_head`). `sync_ref_model=True` (TR-DPO) works as in
    DPOTrainer: TRL's callback mixes the policy into the reference model in place, and the fused head reads the
    reference's `lm_head` weight at every call. DeepSpeed ZeRO-3 works: the head reads `lm_head.weight` inside
    the forward of the module the engine wraps, where DeepSpeed gathers it as an external parameter of the model,
    for the backward too; models sharded at construction (`zero.Init`) are probed before their first forward.
    `torch_compile=True` works: the fused head traces into the model's graph (scored eagerly under ZeRO-3, whose
    gathering hook traced code skips). Under tensor parallelism the vocabulary-sharded head is scored
    vocabulary-parallel; context and sequence parallelism are refused.
    """

    _tag_names = ["trl", "dpo", "focal-kernels"]
    _name = "FocalPO"
    # The model card's "trained with … introduced in" and citation (DPOTrainer's would cite DPO).
    _paper = {
        "title": "FocalPO: Enhancing Preference Optimizing by Focusing on Correct Preference Rankings",
        "id": "2501.06645",
        "citation": """@inproceedings{liu2025focalpo,
    title     = {{FocalPO: Enhancing Preference Optimizing by Focusing on Correct Preference Rankings}},
    author    = {Tong Liu and Xiao Yu and Wenxuan Zhou and Jindong Gu and Volker Tresp},
    booktitle = {Proceedings of the 63rd Annual Meeting of the Association for Computational Linguistics
                 (Volume 2: Short Papers)},
    year      = 2025,
    pages     = {256--267},
    doi       = {10.18653/v1/2025.acl-short.21},
}""",
    }

    def __init__(
        self,
        model,
        ref_model=None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        _check_trl_version()
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = FocalPOConfig(f"{name.split('/')[-1]}-FocalPO")
        self._check_supported(model, ref_model, args, processing_class, train_dataset, compute_metrics, peft_config)

        self.focal_gamma = getattr(args, "focal_gamma", 0.05)
        self.detach_focal_weight = getattr(args, "detach_focal_weight", False)
        self.simpo_gamma = getattr(args, "simpo_gamma", 0.5)
        chunk_size = check_chunk_size(getattr(args, "logprob_chunk_size", None), "logprob_chunk_size")
        self._check_loss_options(args)

        def install_head(m, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
            if temperature != 1.0 or cast_lm_head_to_fp32:
                raise NotImplementedError("FocalPOTrainer's fused head takes no temperature / fp32 cast")
            slot = forward_slot(m)
            unpatched = m.__dict__.get(slot)  # an instance's own forward, if it had one
            kept = install_fused_head(m, outputs=outputs, chunk_size=chunk_size)
            # Probed as soon as installed (before TRL precomputes any reference log-probs), the policy and the
            # reference model alike; a reference model that only reference-free types select never runs. A model
            # loaded under ZeRO-3's `zero.Init` can't run before an engine gathers its shards: probed before its
            # first forward (`_fused_per_token`).
            if m is getattr(self, "ref_model", None) and _reference_free(user_loss_types):
                return
            if zero3_sharded(m):
                self._fk_unprobed.append(m)
                return
            try:
                probe_head(m)
            except Exception:  # refused: the model is left as it came
                delattr(m, kept)
                if unpatched is None:
                    delattr(m, slot)
                else:
                    setattr(m, slot, unpatched)
                raise

        # TRL's `__init__` checks its own loss names (f-divergence support, WPO) and turns `padding_free` off with
        # a warning; FocalPO is a sigmoid-family loss of the reward margin, and padding-free is implemented here.
        trl_loss_types = ["sigmoid" if t == "focal" else t for t in args.loss_type]
        user_loss_types = list(args.loss_type)
        # Set before TRL's `__init__` (whose reference precompute already runs padding-free); TRL's own
        # `self.padding_free = False` is ignored while it runs (see the `padding_free` property).
        self._fk_padding_free = bool(args.padding_free)
        self._fk_constructing = True
        self._fk_unprobed = []
        with (
            _CONSTRUCTION_LOCK,
            _swap_attribute(_trl_dpo, "add_fused_lm_head", install_head),
            # TRL refuses any adapter on `lm_head` (its head reads `lm_head.weight` only); a LoRA head is supported
            # here through its effective weight, and the variants that can't be are refused below.
            _swap_attribute(_trl_dpo, "BaseTunerLayer", _NoTunerLayer) if hasattr(_trl_dpo, "BaseTunerLayer")
            else contextlib.nullcontext(),
            _swap_attribute(args, "loss_type", trl_loss_types),
            _swap_attribute(args, "padding_free", False),
            _without_padding_free_warning(),
            # Only reference-free loss types and no reference model given: TRL would load one from the policy's
            # hub id; none is needed.
            _swap_attribute(_trl_dpo, "create_model_from_path", _policy_only(model))
            if ref_model is None and _reference_free(args.loss_type) else contextlib.nullcontext(),
        ):
            super().__init__(
                model,
                ref_model=ref_model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
            )
        self._fk_constructing = False
        # context / sequence parallelism set in accelerate's own config (not `args`) is known only now
        _refuse_sequence_sharding(getattr(self.accelerator, "parallelism_config", None))
        self.loss_types = user_loss_types
        self._check_model_supported()
        if self.padding_free:
            self._check_packing(at_construction=True)

    @property
    def padding_free(self) -> bool:
        """Whether batches are packed into one row of real tokens (settable; TRL's init can't turn it off)."""
        return self.__dict__.get("_fk_padding_free", False)

    @padding_free.setter
    def padding_free(self, value: bool) -> None:
        if not self.__dict__.get("_fk_constructing", False):
            self._fk_padding_free = bool(value)

    def _unwrapped_models(self) -> list:
        """The policy and the reference model (if any) as the modules an engine or wrapper holds."""
        return [self.accelerator.unwrap_model(m) for m in (self.model, self.ref_model) if m is not None]

    def _probe_deferred(self) -> None:
        """The head probe of models that were ZeRO-3 shards at construction (`install_head`), before the first
        forward, through the module a DeepSpeed engine wraps (the policy's PEFT model, where the head was installed
        on its base model): only that module's forward turns on DeepSpeed's gathering of parameters read from
        another module (`lm_head.weight`, here). A model is dropped from the list only once it passes, so a
        refused head raises again at every later forward."""
        if not self._fk_unprobed:
            return
        roots = self._unwrapped_models()
        while self._fk_unprobed:
            model = self._fk_unprobed[-1]
            probe_head(next((root for root in roots if any(sub is model for sub in root.modules())), model))
            self._fk_unprobed.pop()

    def _check_packing(self, at_construction=False) -> None:
        """Before the first padding-free forward (at construction, or after `padding_free` was set, or for ZeRO-3
        shards that no engine gathers at construction, before the first forward): the refusal list, then a
        probe that packed sequences stay apart in the policy and the reference model.

        Two packed rows [A1, B] and [A2, B], position ids restarting at B, with A1 ≠ A2 of one length: where
        attention keeps sequences apart by position ids, B's log-probs do not depend on A at all (the same
        kernels on the same shapes: equal up to rounding, usually bit for bit); where they see each other (learned
        absolute positions, ALiBi without per-sequence masks, recurrent states) they change by far more. Two
        forwards of 7 tokens, in eval mode, without gradients."""
        if self.__dict__.get("_fk_packing_checked", False):
            return
        models = self._unwrapped_models()
        for model in models:  # the listed architectures first (a model given as a path is loaded by now)
            refuse_unpackable(model)
        if at_construction and any(zero3_sharded(model) for model in models):
            return
        for model in models:
            probe_packing(model)
        self._fk_packing_checked = True

    # -- construction-time checks ------------------------------------------------------------------------------------

    @staticmethod
    def _check_supported(model, ref_model, args, processing_class, train_dataset, compute_metrics, peft_config):
        def refuse(what, advice):
            raise NotImplementedError(f"FocalPOTrainer does not support {what}. {advice}")

        if isinstance(processing_class, ProcessorMixin):
            refuse("vision-language models (a `ProcessorMixin` processing class)", "Use TRL's DPOTrainer for them.")
        if train_dataset is not None:
            try:
                sample = next(iter(train_dataset))
            except (StopIteration, TypeError):
                sample = {}
            if "image" in sample or "images" in sample:
                refuse("vision datasets ('image' / 'images' columns)", "Use TRL's DPOTrainer for them.")
        if not isinstance(model, str):
            refuse_multimodal(model)
        if args.use_liger_kernel:
            refuse(
                "`use_liger_kernel=True`",
                "Its kernels replace the model's forward, which this trainer patches with its own fused head; "
                "set `use_liger_kernel=False`.",
            )
        _refuse_sequence_sharding(getattr(args, "parallelism_config", None))
        if compute_metrics is not None:
            refuse(
                "`compute_metrics`",
                "It needs the full (batch, seq, vocab) logits, which this trainer never builds; the logged "
                "rewards/logps/logits/entropy/accuracy metrics are computed from the fused pass.",
            )
        if args.padding_free:
            for m in (model, ref_model):  # a model given as a hub id / path is checked once loaded
                refuse_unpackable(m)
        if args.padding_free and getattr(args, "neftune_noise_alpha", None):
            refuse(
                "`padding_free=True` with `neftune_noise_alpha`",
                "NEFTune scales its noise by 1/sqrt(sequence length · hidden size), and the packed row's length is "
                "the whole batch's tokens, so the noise would shrink with the batch; set `padding_free=False`.",
            )
        if args.padding_free and (
            (peft_config is not None and getattr(peft_config, "is_prompt_learning", False))
            or (not isinstance(model, str) and is_peft_model(model)
                and getattr(model.active_peft_config, "is_prompt_learning", False))
        ):
            refuse(
                "`padding_free=True` with prompt-learning PEFT (virtual tokens)",
                "Set `padding_free=False` or use LoRA.",
            )

    def _check_loss_options(self, args) -> None:
        """Check the options against all the selected loss types (an option that none of them reads, such as
        `focal_gamma` without "focal" or `label_smoothing` without a type that smooths, is refused: TRL 1.16
        ignores its own silently), then run `preference_loss` once on dummy values, so that a bad loss option
        fails now, not at the first step."""
        loss_types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
        names, _ = resolve_loss_types(loss_types, None)
        if args.sync_ref_model and _reference_free(loss_types):
            raise ValueError(
                f"sync_ref_model=True is read by none of the selected loss types {loss_types}: every one is "
                "reference-free, so no reference model runs and there is nothing to synchronize; set "
                "sync_ref_model=False."
            )
        one = torch.zeros(2, dtype=torch.float32)
        counts = torch.ones(2, dtype=torch.int64)
        try:
            check_options(names, beta=args.beta, reduction="mean", **self._loss_options(args))
            self._preference_loss(args, one, one, one, one, counts, counts, None)
        except (TypeError, ValueError) as exc:  # the library's `gamma` (a message's subject) is `focal_gamma` here
            raise type(exc)(re.sub(r"^gamma\b", "focal_gamma", str(exc))) from None

    def _check_model_supported(self) -> None:
        refuse_multimodal(self.model)
        for m in (self.model, self.ref_model):
            if m is None:
                continue
            base = m.get_base_model() if is_peft_model(m) else m
            reason = lora_head_unsupported_reason(base.get_output_embeddings())
            if reason is not None:
                raise NotImplementedError(f"FocalPOTrainer does not support {reason}.")

    # -- the loss -----------------------------------------------------------------------------------------------------

    def _option(self, args, attribute, arg=None):
        """A TRL option: the trainer's attribute after `DPOTrainer.__init__` (which TRL's own loss reads), before
        it `args`' field (`arg`, if named otherwise)."""
        return getattr(self, attribute, getattr(args, arg or attribute))

    def _loss_options(self, args) -> dict:
        """The loss options (OPTION_DEFAULTS' names): FocalPO's from the trainer, TRL's by `_option`."""
        fk_options = {"gamma": self.focal_gamma, "detach_focal_weight": self.detach_focal_weight,
                      "simpo_gamma": self.simpo_gamma, "discopop_tau": args.discopop_tau}
        return {name: fk_options[name] if name in fk_options else self._option(args, name)
                for name in OPTION_DEFAULTS}

    def _preference_loss(self, args, chosen, rejected, ref_chosen, ref_rejected, chosen_counts, rejected_counts,
                         pair_weights, scored_counts=None):
        """The loss of the configured loss types, Σ_k w_k · mean ℓ_k. Reference-free types (simpo) are computed
        without the reference log-probs TRL always provides, in a call of their own, and a loss type's own
        options (label smoothing, γ, ...) go only to the calls whose types read them (`_check_loss_options`
        refused the unread ones). `chosen_counts, rejected_counts`: the completion tokens, as TRL's ipo and
        sigmoid_norm count them; `scored_counts`, (chosen, rejected), the tokens really scored (one fewer where
        a completion starts at the first token), for the reference-free types' averages (CPOTrainer's)."""
        loss_weights = self._option(args, "loss_weights")
        loss_types, weights = resolve_loss_types(list(self._option(args, "loss_types", "loss_type")),
                                                 None if loss_weights is None else list(loss_weights))
        free = [spec_of(fk.LOSS_TYPES[name])["reference_free"] for name in loss_types]
        options = self._loss_options(args)
        loss = 0.0
        groups = ((False, (ref_chosen, ref_rejected), (chosen_counts, rejected_counts)),
                  (True, (None, None), scored_counts or (chosen_counts, rejected_counts)))
        for reference_free, refs, counts in groups:
            names = [name for name, is_free in zip(loss_types, free) if is_free == reference_free]
            if not names:
                continue
            read = {name: value for name, value in options.items()
                    if reads_option(name, names, options["f_divergence_type"])}
            loss = loss + fk.preference_loss(
                chosen,
                rejected,
                *refs,
                loss_type=names,
                loss_weights=[w for w, is_free in zip(weights, free) if is_free == reference_free],
                beta=self._option(args, "beta"),
                chosen_token_counts=counts[0],
                rejected_token_counts=counts[1],
                pair_weights=pair_weights,
                **read,
            ).loss
        return loss

    def _model_kwargs(self, inputs):
        non_model_keys = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        kwargs = {k: v for k, v in inputs.items() if k not in non_model_keys}
        kwargs["use_cache"] = False
        return kwargs

    def _fused_per_token(self, model, inputs, model_kwargs):
        """Run `model(..., fused_lm_head=True)`; per-token fields on the padded, shifted `(2B, T-1)` grid.

        Padded: the collated batch as is. Padding-free: one packed row of the real tokens, position ids restarting
        at 0 per sequence, no attention mask (transformers keeps attention within each sequence from the position
        ids); each sequence's first token is not scored (nothing of its own predicts it), and the packed results
        are laid back onto the padded grid through `cu_seqlens`.
        """
        self._probe_deferred()
        completion_mask = inputs["completion_mask"]
        input_ids = inputs["input_ids"]
        if not self.padding_free:
            labels = input_ids.masked_fill(completion_mask == 0, -100)
            outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
            seq_len = completion_mask.size(1) - 1
            # Prompt-learning PEFT prepends virtual tokens to the outputs; keep the real tokens' positions
            fields = {
                name: (None if getattr(outputs, name) is None else getattr(outputs, name)[:, -seq_len:])
                for name in ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
            }
            return outputs, fields

        extra = set(model_kwargs) - {"input_ids", "attention_mask", "use_cache", "output_router_logits"}
        if extra:
            raise NotImplementedError(f"padding_free=True with extra model inputs {sorted(extra)} is not supported")
        self._check_packing()
        real = inputs["attention_mask"].bool()
        # The collator pads on the right: each row's real tokens are a prefix, so row-major order packs them.
        if not bool((real[:, 1:] <= real[:, :-1]).all()):
            raise NotImplementedError("padding_free=True needs right-padded batches (each row's tokens a prefix of "
                                      "the row); this batch's attention_mask has padding before real tokens")
        position_ids = (real.long().cumsum(1) - 1)[real].unsqueeze(0)
        # One sequence per row, from the row lengths: a row without real tokens is an empty sequence (position
        # ids alone could not show it, and the rows after it would land one row early)
        lengths = real.sum(1)
        cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        packed_ids = input_ids[real].unsqueeze(0)
        packed_labels = packed_ids.masked_fill(completion_mask[real].unsqueeze(0) == 0, -100)
        # the first token of a sequence: predicted by the previous one
        packed_labels[0, cu_seqlens[:-1][lengths > 0]] = -100
        n_real = packed_ids.shape[1]
        kwargs = {k: v for k, v in model_kwargs.items() if k not in ("input_ids", "attention_mask")}
        if tail := -n_real % (self.args.pad_to_multiple_of or 1):
            # `pad_to_multiple_of` bounds the packed row's length as it bounds the padded batch's (fewer shapes to
            # compile): the padding is more sequences, none longer than the longest real one (a model reading the
            # largest position id sees the same), never scored, left out of a MoE router's loss, seen by no other
            pads = (getattr(self.data_collator, "pad_token_id", None), model.config.get_text_config().pad_token_id)
            packed_ids = torch.nn.functional.pad(packed_ids, (0, tail), value=next((i for i in pads if i), 0))
            packed_labels = torch.nn.functional.pad(packed_labels, (0, tail), value=-100)
            pad_positions = torch.arange(tail, device=position_ids.device) % lengths.max().clamp(min=1)
            position_ids = torch.cat([position_ids, pad_positions[None]], dim=1)
            real_tokens = torch.arange(n_real + tail, device=packed_ids.device) < n_real
            kwargs["router_token_mask"] = real_tokens[None].long()  # (unread without router logits)
        outputs = model(input_ids=packed_ids, position_ids=position_ids, labels=packed_labels, fused_lm_head=True,
                        **kwargs)
        # Packed output j predicts packed token j+1. Lay the N-1 first outputs (+ a zero for the last token) onto the
        # (2B, T) grid row by row: row i, position t ← packed cu_seqlens[i] + t, then drop the last column, as the
        # padded path's shift does. A sequence's last position lands on its successor's first token: 0 (unscored).
        grid_rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        grid_cols = torch.arange(n_real, device=lengths.device) - cu_seqlens[:-1][grid_rows]

        def unpack(x):
            if x is None:
                return None
            x = torch.cat([x[0, :n_real - 1], x.new_zeros(1)])  # (n_real >= 1: a multiple of 0 is 0, no padding)
            grid = x.new_zeros(real.shape)
            grid = grid.index_put((grid_rows, grid_cols), x)
            return grid[:, :-1]

        fields = {
            name: unpack(getattr(outputs, name))
            for name in ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
        }
        return outputs, fields

    def _sequence_logps(self, per_token_logps, shift_completion_mask, masks=None):
        """Per-sequence log-probs: the sum, or with `ld_alpha` LD-DPO's shared + α·tail split (TRL's definition)."""
        if self.ld_alpha is None:
            return per_token_logps.sum(dim=1), None
        if masks is None:
            comp_pos = shift_completion_mask.cumsum(dim=1)
            comp_lens = shift_completion_mask.sum(dim=1).long()
            chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
            shared_lens = torch.minimum(chosen_lens, rejected_lens).repeat(2)
            shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
            tail_mask = comp_pos > shared_lens.unsqueeze(1)
            masks = (shared_mask, tail_mask)
        shared_mask, tail_mask = masks
        logps = (per_token_logps * shared_mask).sum(dim=1) + self.ld_alpha * (per_token_logps * tail_mask).sum(dim=1)
        return logps, masks

    def _reference_context(self):
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """TRL's precompute, except when every selected loss type is reference-free: then zero columns in
        memory, no reference forward and nothing written to TRL's cache file, whose key names the dataset and
        the model but not the loss (zeros cached there would be read by a later run whose loss needs the
        reference log-probs)."""
        from datasets import Dataset

        if not _reference_free(self.loss_types) or not isinstance(dataset, Dataset):  # IterableDataset: TRL's error
            scored = self.accelerator.unwrap_model(self.model if self.ref_model is None else self.ref_model)
            if self._precompute_model_hash is not None and zero3_sharded(scored):
                # TRL hashed the model's state_dict for the cache key, which for ZeRO-3 shards is empty tensors:
                # every model of the same parameter dtypes would share one key (another model's cached reference
                # log-probs read back). Hashed again from the gathered parameters.
                self._precompute_model_hash = hash_sharded_module(scored)
            return super()._precompute_ref_logps(dataset, name, batch_size)
        zeros = [0.0] * len(dataset)
        return dataset.add_column("ref_chosen_logps", zeros).add_column("ref_rejected_logps", zeros)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs of one collated batch (used by `precompute_ref_log_probs`); zeros without a
        forward when every selected loss type is reference-free (none reads them)."""
        if _reference_free(self.loss_types):
            return torch.zeros(inputs["completion_mask"].shape[0], device=inputs["completion_mask"].device).chunk(2)
        model_kwargs = self._model_kwargs(inputs)
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self._reference_context(),
            self.accelerator.autocast(),
        ):
            _, fields = self._fused_per_token(model, inputs, model_kwargs)
        ref_logps, _ = self._sequence_logps(fields["log_probs"], inputs["completion_mask"][..., 1:])
        return ref_logps.chunk(2, dim=0)

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        model_kwargs = self._model_kwargs(inputs)
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_completion_mask = completion_mask[..., 1:]

        outputs, tok = self._fused_per_token(model, inputs, model_kwargs)
        per_token_logps = tok["log_probs"]
        logps, ld_masks = self._sequence_logps(per_token_logps, shift_completion_mask)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)

        if _reference_free(self.loss_types):
            # no loss reads them: no reference forward (precomputed ones, zeros too, are not read either)
            ref_chosen_logps = torch.zeros_like(chosen_logps).detach()
            ref_rejected_logps = torch.zeros_like(rejected_logps).detach()
        elif self.precompute_ref_logps:
            ref_chosen_logps, ref_rejected_logps = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
            ref_model = self.model if self.ref_model is None else self.ref_model
            with (
                torch.no_grad(),
                disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
                self._reference_context(),
            ):
                _, ref_tok = self._fused_per_token(ref_model, inputs, ref_kwargs)
            ref_logps, _ = self._sequence_logps(ref_tok["log_probs"], shift_completion_mask, ld_masks)
            ref_chosen_logps, ref_rejected_logps = ref_logps.chunk(2, dim=0)

        token_counts = completion_mask.sum(dim=1)
        chosen_counts, rejected_counts = token_counts.chunk(2, dim=0)
        # (at least 1, as TRL counts for ipo: a completion of one token at the first position scores none)
        scored_counts = shift_completion_mask.sum(dim=1).clamp(min=1).chunk(2, dim=0)
        pair_weights = None
        if self.use_weighting:
            # WPO (Eq. 2 of https://huggingface.co/papers/2406.11827), as TRL weights it: per sequence
            # exp(mean over completion tokens of log p(y_t) − log Σ_v p_v²), detached; a pair's weight is the
            # product.
            with torch.no_grad():
                aligned = (per_token_logps - tok["log_sum_sq_probs"]) * shift_completion_mask
                weights = torch.exp(aligned.sum(dim=1) / shift_completion_mask.sum(dim=1).clamp_min(1))
                chosen_w, rejected_w = weights.chunk(2, dim=0)
                pair_weights = chosen_w * rejected_w

        # TRL's "sft" term averages the scored chosen tokens' log-probs: `preference_loss` forms it from the sequence
        # log-probs and token counts, which is the same unless ld_alpha reweights the sums, or a completion starts
        # at the sequence's first token (never scored, but counted by the completion mask the other types use).
        sft_separately = "sft" in self.loss_types and (
            self.ld_alpha is not None or bool(completion_mask[:, 0].any())
        )
        loss = self._loss(
            chosen_logps,
            rejected_logps,
            ref_chosen_logps,
            ref_rejected_logps,
            chosen_counts,
            rejected_counts,
            pair_weights,
            per_token_logps,
            shift_completion_mask,
            sft_separately,
            scored_counts,
        )

        if self.aux_loss_enabled:
            aux_loss = outputs.aux_loss
            loss = loss + self.router_aux_loss_coef * aux_loss
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        if _reference_free(self.loss_types):
            # the rewards of TRL's CPOTrainer for SimPO: β · the average log-prob, the quantity the loss compares
            chosen_rewards = self.beta * chosen_logps.detach() / scored_counts[0]
            rejected_rewards = self.beta * rejected_logps.detach() / scored_counts[1]
        else:
            chosen_rewards = self.beta * (chosen_logps.detach() - ref_chosen_logps)
            rejected_rewards = self.beta * (rejected_logps.detach() - ref_rejected_logps)
        self._log_metrics(mode, inputs, tok, shift_completion_mask, chosen_logps, rejected_logps, chosen_rewards,
                          rejected_rewards)

        if return_outputs:  # TRL's deprecated path; `compute_metrics` is refused at construction
            with torch.no_grad():
                outputs = model(**model_kwargs)
        return (loss, outputs) if return_outputs else loss

    def _loss(self, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_counts,
              rejected_counts, pair_weights, per_token_logps, shift_completion_mask, sft_separately, scored_counts):
        if not sft_separately:
            return self._preference_loss(self.args, chosen_logps, rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps, chosen_counts, rejected_counts, pair_weights,
                                         scored_counts)
        # TRL's "sft" term, the mean NLL of the scored chosen tokens, formed from the per-token log-probs; every
        # other type by `preference_loss`, one at a time (the combination is Σ_k w_k · mean ℓ_k either way).
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sft":
                chosen_mask, _ = shift_completion_mask.chunk(2, dim=0)
                chosen_tok, _ = per_token_logps.chunk(2, dim=0)
                term = -chosen_tok[chosen_mask.bool()].mean()
                if pair_weights is not None:
                    term = (term * pair_weights).mean()
            else:
                with _swap_attribute(self, "loss_types", [loss_type]), _swap_attribute(self, "loss_weights", None):
                    term = self._preference_loss(self.args, chosen_logps, rejected_logps, ref_chosen_logps,
                                                 ref_rejected_logps, chosen_counts, rejected_counts, pair_weights,
                                                 scored_counts)
            loss = loss + term * weight
        return loss

    def _log_metrics(self, mode, inputs, tok, shift_completion_mask, chosen_logps, rejected_logps, chosen_rewards,
                     rejected_rewards):
        """TRL 1.16's DPO metrics, same names and definitions, from the fused pass's per-token statistics (the
        rewards as given: DPO's β·(logp − ref), or CPO's β·logp/n for reference-free losses)."""
        gather = self.accelerator.gather_for_metrics
        metrics = self._metrics[mode]
        mask = shift_completion_mask
        chosen_mask, rejected_mask = mask.chunk(2, dim=0)

        entropy_sum = gather((tok["entropy"].detach() * mask).sum()).sum()
        total_tokens = gather(mask.sum()).sum()
        metrics["entropy"].append((entropy_sum / total_tokens).item() if total_tokens > 0 else 0.0)

        if mode == "train":
            num_tokens = gather(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += num_tokens // self._tp_size
        metrics["num_tokens"] = [self._total_train_tokens]

        chosen_mean_logits, rejected_mean_logits = tok["mean_logits"].chunk(2, dim=0)
        for name, values, m in (("chosen", chosen_mean_logits, chosen_mask), ("rejected", rejected_mean_logits,
                                                                                rejected_mask)):
            total = gather(values[m.bool()].sum()).sum().item()
            count = gather(m.sum()).sum().item()
            metrics[f"logits/{name}"].append(total / count if count > 0 else 0.0)

        chosen_is_top1, _ = tok["is_top1"].chunk(2, dim=0)
        correct = gather((chosen_is_top1.bool() & chosen_mask.bool()).sum()).sum()
        count = gather(chosen_mask.sum()).sum()
        metrics["mean_token_accuracy"].append((correct / count).item() if count > 0 else 0.0)

        metrics["rewards/chosen"].append(self.accelerator.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(self.accelerator.gather(rejected_rewards).mean().item())
        accuracies = (chosen_rewards > rejected_rewards).float()
        metrics["rewards/accuracies"].append(self.accelerator.gather(accuracies).mean().item())
        metrics["rewards/margins"].append(self.accelerator.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(self.accelerator.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(self.accelerator.gather(rejected_logps.detach()).mean().item())
