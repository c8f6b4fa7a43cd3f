"""The model side of `FocalPOTrainer` (focal_kernels/integrations/trl.py): the fused LM head it installs in
place of TRL's (`add_fused_lm_head`'s contract, the log-probs computed by fk), and the checks run as a model
arrives, so that a model whose log-probs fk would not reproduce is refused instead of trained on wrong ones:
LoRA variants on the head that one effective weight cannot express, multimodal models, architectures whose
packed sequences see each other, and two probes (packing; the fused head against the model's own logits).

Imported by trl.py after its TRL version check, not on its own.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import sys
import types

import torch
from transformers.utils import is_peft_available
from trl.trainer.utils import FusedCausalLMOutput

import focal_kernels as fk
from focal_kernels.checks import is_dtensor
from focal_kernels.logprobs.linear import agreed_on_mesh


# Read once: the fused head calls the functions below inside the model's forward, which torch.compile may trace
# (and tracing `is_peft_available`, an lru_cache, warns).
PEFT_AVAILABLE = is_peft_available()


def lora_head_unsupported_reason(head) -> str | None:
    """Why a PEFT-wrapped `lm_head` can't be expressed as one weight (and bias); None if it can."""
    if not PEFT_AVAILABLE:
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not isinstance(head, BaseTunerLayer):
        return None  # a plain Linear, or `modules_to_save` (whose `.weight` follows the active adapter)
    from peft.tuners.lora.layer import Linear as LoraLinear

    if not isinstance(head, LoraLinear):
        return f"a {type(head).__name__} adapter on `lm_head` (only plain LoRA is supported there)"
    if getattr(head, "fan_in_fan_out", False):
        return "LoRA with `fan_in_fan_out=True` on `lm_head`"
    if is_dtensor(head.get_base_layer().weight):
        # B·A is one whole (V, H) tensor, not a DTensor of the weight's rows (TRL refuses LoRA on lm_head anyway)
        return ("LoRA on an `lm_head` whose weight is sharded (a DTensor, as under tensor parallelism); leave "
                "`lm_head` out of `target_modules`")
    for name in head.lora_A:
        if name in getattr(head, "lora_variant", {}):
            return "a LoRA variant (DoRA, ...) on `lm_head`"
        if getattr(head, "lora_bias", {}).get(name, False):
            return "`lora_bias=True` on `lm_head`"
        dropout = head.lora_dropout[name]
        if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
            return (
                f"LoRA dropout ({dropout.p}) on `lm_head`: the head's output is computed from one effective weight "
                "W + s·B·A, which dropout on the head's input can't be folded into; set `lora_dropout=0` or leave "
                "`lm_head` out of `target_modules`"
            )
    return None


def _head_weight_and_bias(head):
    """The weight and bias `head(x)` applies, as differentiable tensors.

    A plain `nn.Linear` and PEFT's `modules_to_save` wrapper give their parameters. A LoRA-wrapped head gives
    W + Σ scaling·B·A over its active adapters (none while adapters are disabled or merged): one (V, H) tensor per
    call, whose gradient reaches A and B.
    """
    reason = lora_head_unsupported_reason(head)
    if reason is not None:
        raise NotImplementedError(f"FocalPOTrainer does not support {reason}.")
    if PEFT_AVAILABLE:
        from peft.tuners.tuners_utils import BaseTunerLayer

        if isinstance(head, BaseTunerLayer):
            base = head.get_base_layer()
            weight, bias = base.weight, base.bias
            if not head.disable_adapters and not head.merged:
                for name in head.active_adapters:
                    if name in head.lora_A:
                        weight = weight + head.get_delta_weight(name).to(weight.dtype)
            return weight, bias
    return head.weight, getattr(head, "bias", None)


def install_fused_head(model, *, outputs=("log_probs",), chunk_size=None) -> str:
    """Patch `model.forward` like TRL's `add_fused_lm_head`, with the log-probs computed by fk.

    `model(..., labels=labels, fused_lm_head=True)` runs the backbone and returns a `FusedCausalLMOutput` whose
    per-token fields (log_probs and the requested `outputs`) are `(B, T-1)` (the usual next-token shift) or, with
    `shift_labels=`, aligned with those; 0 where the label is -100. `router_token_mask=` (fused calls only) names
    the tokens a MoE router's load-balancing loss averages over, where `attention_mask` can't (a packed row with
    padding at its end). Without `fused_lm_head` the forward is the original one, kept on the model under the
    name returned (to remove with the fused forward, to undo the installation).
    """
    slot = forward_slot(model)
    # The forward replaced is kept on the model, not in the closure, so that a deep copy (a reference model
    # copied from the policy) calls its own: a bound method or accelerate's partial is copied bound to the copy.
    # One name per installation: a second trainer on the same model wraps the first's fused forward.
    original = f"_fk_original_forward_{sum(name.startswith('_fk_original_forward_') for name in vars(model))}"
    setattr(model, original, getattr(model, slot))
    text_config = model.config.get_text_config()
    logit_options = fk.logit_options_from_config(text_config)  # softcap / logit scale the model applies
    unpadded_rows = getattr(text_config, "unpadded_vocab_size", None)
    stats = tuple(name for name in outputs if name != "log_probs")

    @functools.wraps(type(model).forward)
    def _fk_fused_forward(
        self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
        router_token_mask=None, **kwargs
    ):
        if not fused_lm_head:
            for key, value in (("labels", labels), ("shift_labels", shift_labels)):
                if value is not None:
                    kwargs[key] = value
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return getattr(self, original)(*args, **kwargs)

        kwargs["use_cache"] = False
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        backbone_outputs = self.base_model(*args, **kwargs)
        hidden = backbone_outputs.last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()

        def score(hidden, labels):
            weight, bias = _head_weight_and_bias(head)
            if weight.device.type == "meta":
                raise NotImplementedError(
                    "FocalPOTrainer does not support an lm_head whose weight is a meta tensor where the fused head "
                    "reads it: offloaded by accelerate under a PEFT wrapper (LoRA or modules_to_save on lm_head, "
                    "whose call does not load it), or never loaded. Keep lm_head on a device, or leave it out of "
                    "the PEFT config.")
            if unpadded_rows is not None and unpadded_rows < weight.shape[0]:  # Inkling keeps only these logits
                weight, bias = weight[:unpadded_rows], None if bias is None else bias[:unpadded_rows]
            # A tensor-parallel head (vocabulary rows sharded over the model's TP mesh, the same tokens on every
            # rank) is scored vocabulary-parallel: no rank gathers the weight. Another DTensor weight left (FSDP2,
            # a unit the call below does not reach) is gathered by fk, its gradient averaged back to the shard.
            token = fk.fused_linear_token_logps(hidden.to(weight.device), weight, labels.to(weight.device), bias,
                                                -100, chunk_size=chunk_size, stats=stats,
                                                vocab_parallel_group=tensor_parallel_group(self, weight),
                                                **logit_options)
            # not views of fk's flat outputs: FSDP2 warns at every forward of a unit (the model's, the head's)
            # whose outputs are views, since an in-place op on one would skip its pre-backward hook
            # (the class called, not `_make` of a generator: PyTorch 2.11's dynamo fails on those after a resume)
            return type(token)(*[None if t is None else t.clone() for t in token])

        if (managed_by_zero3(self) and _eager(zero3_leaf_head, self, head)) or accelerate_hooked(head):
            # Hooks that must run in the head's call, which reading its weight skips; run as its forward. A ZeRO-3
            # leaf's reduce its gradients (TRL 1.16's fused head drops them so); accelerate's (a `device_map`
            # dispatch) move the inputs to the head's device and load offloaded weights (CPU, disk; read outside
            # the call, an offloaded weight is a meta tensor).
            token = _eager(run_as_forward, head, score, hidden, labels)
        elif managed_by_zero3(head):
            # DeepSpeed ZeRO-3 gathers the head's parameters when Python reads them from the module (its
            # parameter-access hook); code torch.compile traced reads them without that hook, empty shards. Eager.
            token = _eager(score, hidden, labels)
        elif (unit := fsdp_unit_of_head(self, head)) is not None:
            # An error in one rank's inputs is raised on every rank of the head's mesh, as where fk gathers a shard
            # itself, not left to hang the others in the backward's collectives.
            token = agreed_on_mesh(head.weight.device_mesh, lambda: run_as_forward(unit, score, hidden, labels))
        elif hooks := weight_setting_hooks(head):
            # read outside a call, such a weight is the one the last call set, with no gradient path once that
            # call is over: the hooks set it again first (not the head's call, whose other hooks expect logits)
            token = _eager(_after_hooks, hooks, head, score, hidden, labels)
        else:
            token = score(hidden, labels)
        labels = labels.to(token.log_probs.device)
        mask = labels != -100
        log_probs = token.log_probs
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)

        aux_loss = None
        if kwargs.get("output_router_logits"):
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            aux_loss = load_balancing_loss_func(
                backbone_outputs.router_logits,
                text_config.num_experts if hasattr(text_config, "num_experts") else text_config.num_local_experts,
                text_config.num_experts_per_tok,
                kwargs.get("attention_mask") if router_token_mask is None else router_token_mask,
            )
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss

        return FusedCausalLMOutput(
            loss=loss,
            log_probs=log_probs,
            entropy=token.entropy,
            log_sum_sq_probs=token.log_sum_sq_probs,
            mean_logits=token.mean_logits,
            is_top1=token.is_top1,
            label_mask=mask,
            aux_loss=aux_loss,
        )

    setattr(model, slot, types.MethodType(_fk_fused_forward, model))
    return original


def forward_slot(model) -> str:
    """The attribute the fused forward replaces: `forward`, or, where accelerate put hooks on the model itself (a
    `device_map` dispatch) and its wrapper is still the model's `forward`, `_old_forward`, which that wrapper calls
    between its hooks, so that they run for the fused forward too (the model's own moves the outputs back to the
    inputs' device). A `forward` set over accelerate's wrapper is replaced, as on a model without hooks."""
    wrapper = model.__dict__.get("forward")
    accelerates = (isinstance(wrapper, functools.partial) and wrapper.args and wrapper.args[0] is model
                   and getattr(wrapper.func, "__module__", None) == "accelerate.hooks")
    return "_old_forward" if accelerates and accelerate_hooked(model) and "_old_forward" in model.__dict__ \
        else "forward"


def tensor_parallel_group(model, weight):
    """The process group of `model`'s tensor-parallel mesh where `weight` is sharded by vocabulary rows over it
    (transformers' `tp_plan`: a DTensor, `Shard(0)` over a one-dimensional mesh with the ranks of the mesh
    transformers keeps as the model's "tp"); else None. Under tensor parallelism every rank of that mesh scores
    the same tokens, which the vocabulary-parallel path needs (it checks: hidden states that differ between
    ranks raise). Under FSDP2 as well (a (fsdp, tp) mesh), the weight is such a DTensor inside its unit's forward,
    once FSDP2 has gathered the fsdp dimension."""
    if (getattr(model, "_tp_size", None) or 1) < 2 or not is_dtensor(weight):
        return None
    return _tensor_parallel_mesh_group(model, weight)


@torch.compiler.disable
def _tensor_parallel_mesh_group(model, weight):
    """`tensor_parallel_group`'s mesh lookups, never traced: PyTorch 2.11's dynamo fails on the mesh manager's
    (and the group was then None: the head gathered); the vocabulary-parallel call after it breaks the graph
    anyway."""
    from torch.distributed.tensor import Shard

    mesh = weight.device_mesh
    manager = getattr(model, "_mesh_manager", None)
    if mesh.ndim != 1 or tuple(weight.placements) != (Shard(0),) or manager is None:
        return None
    try:
        tp_mesh = manager.get_mesh("tp")
    except Exception:  # no "tp" dimension: not this layout
        return None
    ranks = torch.distributed.get_process_group_ranks
    if tp_mesh.ndim != 1 or ranks(tp_mesh.get_group()) != ranks(mesh.get_group()):
        return None
    return mesh.get_group()


@torch.compiler.disable
def _eager(fn, *args):
    """fn(*args), never traced by torch.compile (a graph break where the caller is compiled)."""
    return fn(*args)


def managed_by_zero3(module) -> bool:
    """Whether DeepSpeed ZeRO-3 manages `module` (its engine gives every module it hooks a `ds_id`), gathered or
    not (`zero3_sharded` asks whether parameters are shards now). Read from the module, not its parameters: a
    parameter that torch.compile reads gets a guard on its shape, which ZeRO-3's gathers change within the frame
    (PyTorch 2.11's dynamo then fails: "Guard failed on the same frame it was created")."""
    return hasattr(module, "ds_id")


def zero3_leaf_head(model, head) -> bool:
    """Whether `head` is a DeepSpeed ZeRO-3 leaf module (`deepspeed.utils.set_z3_leaf_modules`) below `model`.

    DeepSpeed gathers a leaf module's parameters, its descendants' included, in the hook of the leaf's own call,
    and reduces their gradients in that call's backward hook (its descendants get no hooks of their own). The fused
    head reads the head's parameters inside `model`'s forward and never calls the head or what lies between: a
    leaf there would have its gradients silently dropped. The head itself is handled (the caller runs the fused
    head as the head's forward); a leaf between `model` and `head`, or below `head`, is refused. A leaf at `model`
    or above it is left to DeepSpeed (its call gathers everything below it). Read from DeepSpeed's flag on the
    modules, set before its engine registers them; cached per head on `model`."""
    cached = model.__dict__.get("_fk_zero3_leaf_head")
    if cached is not None and cached[0] is head:
        return cached[1]
    path = _module_path(model, head)
    if path is None:  # not registered below `model`'s engine call: nothing of DeepSpeed's to skip
        return False
    *between, (head_name, _) = path
    leaves = [name for name, module in between if _z3_leaf(module)]
    if not _z3_leaf(head):
        leaves += [f"{head_name}.{name}" for name, module in head.named_modules() if name and _z3_leaf(module)]
    if leaves:
        raise NotImplementedError(
            f"FocalPOTrainer does not support DeepSpeed ZeRO-3 leaf modules ({', '.join(leaves)}) between the model "
            "and its output head or inside it: the fused head reads the head's parameters without calling those "
            "modules, so DeepSpeed would never reduce their gradients. Mark `lm_head` itself (or none of them)."
        )
    model.__dict__["_fk_zero3_leaf_head"] = (head, _z3_leaf(head))
    return _z3_leaf(head)


def _z3_leaf(module) -> bool:
    """DeepSpeed's ZeRO-3 leaf flag (what `deepspeed.utils.z3_leaf_module` reads), without importing DeepSpeed."""
    return bool(getattr(module, "_z3_leaf", False))


def _module_path(model, target):
    """[(qualified name, module)] from `model`'s child down to `target`, or None if `target` is not below it."""
    for name, module in model.named_modules():
        if module is target and name:
            break
    else:
        return None
    path, module = [], model
    for depth, part in enumerate(parts := name.split(".")):
        module = getattr(module, part)
        path.append((".".join(parts[:depth + 1]), module))
    return path


def fsdp_unit_of_head(model, head):
    """Where `head`'s weight is an FSDP2 shard (a DTensor) inside `model`'s forward, the unit to gather it: the
    module `fully_shard` was applied to nearest above or at `head`, below `model`; else None. Inside `model`'s
    forward FSDP2 has gathered `model`'s own unit and the units whose forward has run (accelerate's tail unit of
    the final norm and `lm_head`, with the norm); a head in a unit of its own, or alone in the tail unit, is
    still a shard there. A shard with no such unit is left to fk, which gathers it."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):  # no shards without one
        return None
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if not isinstance(getattr(head, "weight", None), DTensor):
        return None
    unit = None
    for _, module in _module_path(model, head) or ():
        if isinstance(module, FSDPModule):
            unit = module
    return unit


def accelerate_hooked(module) -> bool:
    """Whether accelerate put hooks on `module` itself (`add_hook_to_module`), read from the module's own
    attributes: PEFT's `ModulesToSaveWrapper` passes attribute lookups on to the module it wraps, whose hooks
    its own call does not run."""
    return module.__dict__.get("_hf_hook") is not None


# The forward pre-hooks that set a module's weight for each call, from the weight's own parameters
# (`torch.nn.utils.prune`, the old `weight_norm` and `spectral_norm`): (module, class), read only if imported.
_WEIGHT_SETTING_HOOKS = (("torch.nn.utils.prune", "BasePruningMethod"), ("torch.nn.utils.weight_norm", "WeightNorm"),
                         ("torch.nn.utils.spectral_norm", "SpectralNorm"))


def weight_setting_hooks(head) -> list:
    """`head`'s forward pre-hooks that set its weight for each call (`_WEIGHT_SETTING_HOOKS`), in their order."""
    if not head._forward_pre_hooks:
        return []
    kinds = tuple(kind for module, name in _WEIGHT_SETTING_HOOKS
                  if (kind := getattr(sys.modules.get(module), name, None)) is not None)
    return [hook for hook in head._forward_pre_hooks.values() if isinstance(hook, kinds)]


def _after_hooks(hooks, head, score, hidden, labels):
    """score(hidden, labels) after the weight-setting `hooks` have set `head`'s weight, as they do in its call
    (each reads only the module; the inputs are passed for their signature)."""
    for hook in hooks:
        hook(head, (hidden,))
    return score(hidden, labels)


def run_as_forward(module, fn, *args):
    """fn(*args) called as `module`'s forward, so that the hooks on `module` run around it, as for any call of
    `module`. FSDP2's gather its parameters (in its mixed-precision policy's dtype) for the call, again for its
    backward, and reduce-scatter their gradients to the shards; a DeepSpeed ZeRO-3 leaf's gather its parameters
    and reduce their gradients; accelerate's (which wrap `forward` itself and call `_old_forward`) move the inputs
    to the module's device and load offloaded weights for the call."""
    name = forward_slot(module)
    had_own = name in module.__dict__
    original = getattr(module, name)

    def forward(*inner):
        restore()
        return fn(*inner)

    def restore():
        if had_own:
            setattr(module, name, original)
        else:
            module.__dict__.pop(name, None)

    setattr(module, name, forward)
    try:
        return module(*args)
    finally:
        restore()


# Architectures whose packed sequences see each other (found by comparing packed with padded log-probs under
# transformers 5): learned absolute positions or ALiBi without per-sequence masking, or a recurrent state.
# GPT-Neo is exact with eager attention but not with sdpa; refused whatever the attention.
_UNPACKABLE_MODEL_TYPES = frozenset({"opt", "bloom", "mpt", "xglm", "gpt_neo", "mamba", "mamba2", "falcon_mamba",
                                     "jamba"})


def refuse_multimodal(model) -> None:
    """Vision-language / multimodal models (a text config inside the model's config) are not supported."""
    config = getattr(model, "config", None)
    if config is not None and config.get_text_config() is not config:
        raise NotImplementedError(f"FocalPOTrainer does not support vision-language / multimodal models "
                                  f"({type(model).__name__}). Use a text-only causal LM, or TRL's DPOTrainer.")


def refuse_unpackable(model) -> None:
    """`padding_free=True` is refused for the listed architectures (policy or reference model)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _UNPACKABLE_MODEL_TYPES:
        raise NotImplementedError(
            f"FocalPOTrainer does not support `padding_free=True` with {model_type!r} models. Their attention (or "
            "state) does not keep packed sequences apart by `position_ids`, so the log-probs would be wrong; set "
            "`padding_free=False`."
        )


@contextlib.contextmanager
def _probing(model, shape):
    """Random token ids of `shape` (a fixed seed, the global RNG untouched) within the vocabulary the head
    scores, on the embeddings' device, with the model in eval mode and gradients off for the block."""
    embeddings = model.get_input_embeddings().weight  # (PEFT's trainable-token wrapper has no num_embeddings)
    vocab = getattr(embeddings, "ds_shape", embeddings.shape)[0]  # a DeepSpeed ZeRO-3 shard: the full shape
    rows = getattr(model.config.get_text_config(), "unpadded_vocab_size", None)
    vocab = min(vocab, rows) if rows else vocab
    ids = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(0)).to(embeddings.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield ids
    finally:
        model.train(was_training)


def probe_packing(model) -> None:
    """See `FocalPOTrainer._check_packing`."""
    runs = []
    with _probing(model, (3, 4)) as tokens:
        position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=tokens.device)
        for first in (tokens[0], tokens[1]):
            ids = torch.cat([first, tokens[2, :3]])[None]
            labels = ids.clone()
            labels[:, :5] = -100  # score B's second and third tokens, each predicted from B alone
            out = model(input_ids=ids, position_ids=position_ids, labels=labels, fused_lm_head=True)
            runs.append(out.log_probs[0, 4:6].float())
    change = float((runs[0] - runs[1]).abs().max())
    if not change <= 1e-4:
        raise NotImplementedError(
            f"FocalPOTrainer does not support `padding_free=True` with this model "
            f"({model.config.model_type!r}): a probe found that its packed sequences see each other (a "
            f"sequence's log-probs changed by {change:.3g} when the sequence packed before it changed), so the "
            "log-probs would be wrong. Set `padding_free=False`."
        )


def zero3_sharded(model) -> bool:
    """Whether some parameter of `model` is a DeepSpeed ZeRO-3 shard, not gathered now (models loaded under
    `zero.Init`, or outside any forward once an engine holds them). Such a model runs only where an engine's hooks
    gather its parameters; during the forward of the module the engine wraps, the fused head's read of
    `lm_head.weight` is gathered by DeepSpeed as an external parameter of the model and stays gathered through
    the model's backward."""
    return any(getattr(getattr(p, "ds_status", None), "name", None) == "NOT_AVAILABLE" for p in model.parameters())


def hash_sharded_module(model) -> str:
    """A digest of `model`'s parameters and buffers (names, dtypes, values) where its parameters are ZeRO-3 shards:
    each parameter gathered in turn (one at a time, so at most one whole parameter is held; a collective, which
    every rank runs in the same order)."""
    import deepspeed

    digest = hashlib.sha256()
    tensors = dict(model.named_buffers())
    tensors.update(model.named_parameters())
    for name, tensor in sorted(tensors.items()):
        with deepspeed.zero.GatheredParameters([tensor] if hasattr(tensor, "ds_id") else []):
            whole = tensor.detach().cpu()
            digest.update(f"{name} {whole.dtype} {tuple(whole.shape)}".encode())
            digest.update(whole.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fp32_matmul_eps(device) -> float:
    """The rounding unit of float32 GEMMs on `device` as PyTorch is set to run them: TF32 2^-10, bfloat16 2^-7,
    else 0. Read per backend (`fp32_precision`, PyTorch >= 2.9; transformers' `tf32=True` sets it there, and
    the legacy getter then raises), else through the legacy setting, else bfloat16's (the coarsest)."""
    try:
        backend = torch.backends.cuda.matmul if device.type == "cuda" else torch.backends.mkldnn.matmul
        precision = backend.fp32_precision
        if precision == "none":
            precision = torch.backends.fp32_precision
    except (AttributeError, RuntimeError):
        try:
            precision = {"high": "tf32", "medium": "bf16"}.get(torch.get_float32_matmul_precision(), "ieee")
        except RuntimeError:
            precision = "bf16"
    return {"tf32": 2.0**-10, "bf16": 2.0**-7}.get(precision, 0.0)


def probe_head(model) -> None:
    """The fused head's log-probs must be the model's own, or construction raises (`FocalPOTrainer`'s docstring).

    The fused head computes the logits as hidden states × `get_output_embeddings().weight` (+ bias), scaled
    and soft-capped as `fk.logit_options_from_config` reads the config. A model whose forward does more
    (RoBERTa-style heads with a dense layer and a norm before that Linear, a scaling field that function does
    not know) would train on wrong log-probs, silently: an 8-token forward each way (fused and the model's own),
    in eval mode, without gradients, compares them, and a difference beyond rounding raises."""
    # The precision inside the forward: accelerate's mixed-precision wrapper (which stays on a model a trainer
    # prepared, e.g. for a second trainer built on it) runs the forward under autocast, unseen from out here.
    # Read for the devices of both embeddings (a `device_map` may put the input embedding on the CPU).
    autocast = []
    embedding = model.get_input_embeddings()
    devices = {w.device.type for w in (embedding.weight, model.get_output_embeddings().weight)} - {"meta"}

    def read_autocast(module, args):
        autocast.extend(torch.get_autocast_dtype(d) for d in devices if torch.is_autocast_enabled(d))

    hook = embedding.register_forward_pre_hook(read_autocast)
    try:
        with _probing(model, (1, 8)) as ids:
            fused = model(input_ids=ids, labels=ids, fused_lm_head=True, use_cache=False).log_probs[:, -7:]
            logits = model(input_ids=ids, use_cache=False).logits[:, -8:-1]
    finally:
        hook.remove()
    labels = ids[:, 1:, None].to(logits.device)
    own = logits.double().log_softmax(-1).gather(-1, labels).squeeze(-1)
    weight = model.get_output_embeddings().weight
    # The log-softmax of logits rounded to their dtype moves by up to eps·max|logit| over the logits that carry
    # probability mass and the label's. In float32 the GEMMs' summation orders dominate (the fused head
    # multiplies only the scored rows, in vocabulary chunks): up to 2.8e-7·max|logit| measured (H = 4096,
    # CPU), hence a unit of at least 2^-20 (a margin of about 10). A missing soft-cap or scale moves the
    # log-probs by a large fraction of the logits. Logits more than 100 below their row's largest carry no
    # mass: a vocabulary masked with -inf or -1e9 must not set the scale (it would accept anything).
    eps = max([torch.finfo(d).eps for d in (weight.dtype, logits.dtype, *autocast) if d.is_floating_point]
              + [fp32_matmul_eps(weight.device), 2.0**-20])
    z = logits.double()
    carrying = torch.where(z >= z.amax(-1, keepdim=True) - 100, z.abs(), 0).amax(-1)
    largest = float(torch.maximum(carrying, z.gather(-1, labels).squeeze(-1).abs()).nan_to_num(0.0).max())
    tolerance = eps * (16 + 4 * largest)
    change = float((fused.double().to(own.device) - own).abs().max())
    if not change <= tolerance:
        raise NotImplementedError(
            f"FocalPOTrainer does not support this model's output head ({model.config.model_type!r}): the fused "
            f"head's log-probs (final hidden states × `get_output_embeddings().weight`, with the logit options "
            f"fk.logit_options_from_config reads) differ from its own forward's by {change:.3g} (tolerance "
            f"{tolerance:.3g}). Its forward transforms the logits in another way (a head of more than one layer, "
            "an unread scaling or soft-cap field, a sliced vocabulary). TRL 1.16's DPOTrainer, whose fused head "
            "reads fewer fields, would train on wrong log-probs too: use a trainer that computes the full logits."
        )
