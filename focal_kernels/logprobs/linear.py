"""Log-probs from final hidden states and the lm_head weight, never materializing the logits.

`fused_linear_sequence_logps` gives per-sequence log-probs (padded or packed), `fused_linear_token_logps`
per-token log-probs and, from the same pass, TRL's per-token statistics. linear_autograd.py holds the
design and its memory account. Here: validation, the logit transform's options, and autocast (the inputs
are cast to the autocast dtype first, as `torch.mm` would cast them for a model's lm_head; float64 is left
alone).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch

from ..checks import (CU_SEQLENS_HINT, autocast_dtype, check_chunk_size, check_flag, check_hidden_and_labels,
                      check_ignore_index_value, check_labels_in_range, check_linear, data_checks_enabled, is_dtensor,
                      is_integer, is_real, values_readable)
from ..dtypes import compute_dtype
from .agreement import agree_over_mesh
from .linear_autograd import LinearOptions, LinearTokenLogps
from .ops import STATS, distinct
from .packing import as_token_grid, per_sequence


class TokenLogps(NamedTuple):
    """Per-token outputs of `fused_linear_token_logps`, each shaped like the labels, 0 (False) at ignored tokens.

    log_probs:        log p(y_t), float32 (float64 for float64 inputs); differentiable.
    entropy:          −Σ_v p_v log p_v                 (None unless requested in `stats`; detached)
    mean_logits:      (1/V) Σ_v x_v                    (likewise)
    is_top1:          y_t is the first argmax, bool    (likewise; False where log p is NaN: a NaN or +inf logit)
    log_sum_sq_probs: log Σ_v p_v²                     (likewise; TRL's use_weighting)
    """

    log_probs: torch.Tensor
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None


def check_memory_budget(memory_budget):
    if memory_budget is None:
        return
    if not is_integer(memory_budget):
        raise TypeError(f"memory_budget must be None or an int number of bytes, got {type(memory_budget).__name__}")
    if memory_budget < 0:
        raise ValueError(f"memory_budget must be >= 0 bytes, got {memory_budget}")


def check_logit_transform(logit_softcap, logit_scale, temperature):
    if logit_softcap is not None and not (is_real(logit_softcap) and 0 < logit_softcap < math.inf):
        raise ValueError(f"logit_softcap must be None or a finite number > 0, got {logit_softcap!r}")
    # (comparisons, not math.isfinite, which torch.compile(dynamic=True) cannot trace; NaN fails both)
    if not (is_real(logit_scale) and -math.inf < logit_scale < math.inf and logit_scale != 0):
        raise ValueError(f"logit_scale must be a finite non-zero number, got {logit_scale!r}")
    if not (is_real(temperature) and 0 < temperature < math.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def transform_params(weight, logit_softcap, logit_scale, temperature):
    """(params, has_softcap): (scale, softcap, 1 / temperature) as a compute-dtype device tensor (filled by
    kernels, so CUDA-graph capture works), or None when the transform is the identity."""
    if logit_softcap is None and logit_scale == 1 and temperature == 1:
        return None, False
    dtype = compute_dtype(weight.dtype)
    info = torch.finfo(dtype)
    # Each option, and each product of two that the kernels form once (kernels/logit_transform.py: out of range,
    # a logit of 0 would be NaN). Comparisons only, as in check_logit_transform: traceable with symbolic floats;
    # a normal temperature has a finite reciprocal.
    values = [("logit_scale", logit_scale), ("temperature", temperature)]
    if logit_softcap is not None:
        values += [("logit_softcap", logit_softcap), ("logit_scale / logit_softcap", logit_scale / logit_softcap),
                   ("logit_softcap / temperature", logit_softcap / temperature)]
    values.append(("logit_scale / temperature", logit_scale / temperature))
    for name, value in values:
        if not (info.smallest_normal <= abs(value) <= info.max):
            raise ValueError(f"{name} = {value!r} is outside {dtype}'s normal range, in which the transform of "
                             f"{weight.dtype} weights is computed; it would overflow or round to 0")
    params = torch.empty(3, dtype=dtype, device=weight.device)
    params[0] = float(logit_scale)
    params[1] = float(logit_softcap) if logit_softcap is not None else 1.0
    params[2] = 1.0 / float(temperature)
    return params, logit_softcap is not None


def gathered(tensor):
    """A DTensor parameter (FSDP2's shard of the lm_head, say) as the whole tensor, differentiably; anything
    else unchanged. Its gradient returns to the shard averaged over the mesh, as FSDP averages every other
    parameter's (each rank's gradient comes from its own data: a plain full_tensor() would keep each rank's
    own rows unreduced): summed over the mesh (Partial("sum"): a reduce-scatter), then scaled by 1 / the
    mesh's size on the shard. Not Partial("avg"): in a compiled step on torch 2.11 (gloo; the mesh agreement's
    graph break between this gather and its use), its backward summed, gradients world-size times too large
    without an error; 2.13 averages."""
    if not is_dtensor(tensor):
        return tensor
    from torch.distributed.tensor import Partial

    mesh = tensor.device_mesh
    return _ScaledGrad.apply(tensor, 1.0 / mesh.size()).full_tensor(grad_placements=[Partial("sum")] * mesh.ndim)


class _ScaledGrad(torch.autograd.Function):
    """The identity, whose backward multiplies the gradient by `scale` (on a DTensor shard: shard-sized)."""

    @staticmethod
    def forward(ctx, tensor, scale):
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def gathered_params(weight, bias):
    """(weight, bias, mesh): DTensor parameters gathered (`gathered`), which every rank does before anything
    can raise, and the device mesh they were sharded over (None for plain tensors): see `agreed_on_mesh`."""
    mesh = next((t.device_mesh for t in (weight, bias) if is_dtensor(t)), None)
    return gathered(weight), gathered(bias), mesh


def agreed_on_mesh(mesh, body):
    """body(); with a mesh (the parameters were gathered from it), every rank of the mesh then learns
    whether the call raised on any rank, and all raise: a rank whose own inputs fail (FSDP2 gives each rank
    its own batch) must not leave the others waiting in the gather's backward collective. One small
    all_gather per mesh dimension."""
    if mesh is None:
        return body()
    error = out = None
    try:
        out = body()
    except Exception as exc:  # any error: the other ranks must hear of it
        error = exc
    error = agree_over_mesh(mesh, error, "the hidden-state path (a DTensor lm_head gathered from its mesh)")
    if error is not None:
        raise error
    return out


def autocast_inputs(weight, bias, *hiddens):
    """Under autocast on the weight's device, weight, bias and hidden states cast to the autocast dtype as
    `torch.mm` would cast them for a model's lm_head (float64 and non-tensors are left for the checks);
    the casts are differentiable, so gradients reach the originals in their own dtype. Unchanged otherwise."""
    tensors = (weight, bias, *hiddens)
    dtype = autocast_dtype_for(weight)
    if dtype is None:
        return tensors
    return tuple(t.to(cast_dtype(t, dtype)) if isinstance(t, torch.Tensor) else t for t in tensors)


def autocast_dtype_for(weight):
    """The autocast dtype on the weight's device (None where autocast is off there, or weight is no tensor)."""
    return autocast_dtype(weight.device) if isinstance(weight, torch.Tensor) else None


def cast_dtype(tensor, autocast):
    """The dtype `autocast_inputs` gives tensor under the autocast dtype `autocast` (None: off): that dtype for
    float32 / bfloat16 / float16, else (float64) its own."""
    if autocast is None or tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return tensor.dtype
    return autocast


def linear_token_logps(groups, weight, bias, *, ignore_index, chunk_size, logit_softcap, logit_scale, temperature,
                       stats=(), validate_labels=True, cu_seqlens=(), more_checks=None, memory_budget=None):
    """The shared entry: groups = [(hidden, labels, hidden_name, labels_name)], each already a (B, T, H) token
    grid. Checks everything (more_checks(), when given, after the tensors' own checks), then one
    LinearTokenLogps call; returns, per group, the list of its (B, T) outputs (log-probs, then the statistics
    in `stats` order). cu_seqlens: [(cu_seqlens, tokens)] to check."""
    check_linear(weight, bias)
    for hidden, labels, hidden_name, labels_name in groups:
        check_hidden_and_labels(hidden, labels, weight, hidden_name=hidden_name, labels_name=labels_name,
                                ignore_index=ignore_index)
    chunk_size = check_chunk_size(chunk_size)
    check_logit_transform(logit_softcap, logit_scale, temperature)
    check_memory_budget(memory_budget)
    if more_checks is not None:
        more_checks()
    if data_checks_enabled(validate_labels, weight):
        check_labels_in_range([(labels, labels_name) for _, labels, _, labels_name in groups], weight.shape[0],
                              ignore_index=ignore_index, cu_seqlens=cu_seqlens)
    compact = values_readable(weight)  # projecting only the scored rows needs their count on the host
    params, has_softcap = transform_params(weight, logit_softcap, logit_scale, temperature)
    frozen = (torch.is_grad_enabled() and not weight.requires_grad and (bias is None or not bias.requires_grad)
              and any(hidden.requires_grad for hidden, *_ in groups))
    will_backward = torch.is_grad_enabled() and (weight.requires_grad or any(
        t is not None and t.requires_grad for t in (bias, *(hidden for hidden, *_ in groups))))
    budget = int(memory_budget) if memory_budget and will_backward and not frozen else 0
    options = LinearOptions(int(ignore_index), chunk_size, params, has_softcap, tuple(stats), compact, frozen,
                            budget)
    group_tensors = distinct([t for hidden, labels, *_ in groups for t in (hidden, labels)])
    outputs = LinearTokenLogps.apply(weight, bias, options, *group_tensors, None)
    per_group = 1 + len(stats)
    return [[out.view(hidden.shape[:2]) for out in outputs[k * per_group:(k + 1) * per_group]]
            for k, (hidden, *_) in enumerate(groups)]


def stat_names(stats) -> tuple:
    """`stats` as a tuple of distinct names from STATS, in STATS' order (a set's order differs between
    processes), or a TypeError / ValueError naming the argument."""
    if isinstance(stats, str):
        raise TypeError(f"stats must be a sequence of names from {STATS}, got the string {stats!r} (write "
                        f"stats=({stats!r},))")
    if not isinstance(stats, (tuple, list, set, frozenset)):
        raise TypeError(f"stats must be a tuple, list or set of names from {STATS} (() for none), got "
                        f"{type(stats).__name__}")
    names = tuple(stats)
    unknown = [name for name in names if name not in STATS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"stats must be distinct names from {STATS}, got {stats!r}")
    return tuple(name for name in STATS if name in names)


def token_grid(hidden, labels, hidden_name="hidden", labels_name="labels"):
    """The per-token calls' hidden and labels as (B, T, H) and (B, T): packed hidden (N, H) as one row of N,
    with labels of any shape with N elements; labels (N,) beside hidden (1, N, H) as (1, N). A token count
    that does not match is a ValueError naming the shapes as passed (not the internal (1, N) grid); anything
    else comes back as given, for the checks to judge."""
    if isinstance(hidden, torch.Tensor) and isinstance(labels, torch.Tensor):
        if hidden.dim() == 2:
            if labels.numel() != hidden.shape[0]:
                raise ValueError(f"{labels_name} must have N = {hidden.shape[0]} elements, one per row of "
                                 f"{hidden_name} (shape {tuple(hidden.shape)}), got shape {tuple(labels.shape)}")
            return hidden.unsqueeze(0), labels.reshape(1, -1)
        if labels.dim() == 1 and hidden.dim() == 3:
            if hidden.shape[0] != 1 or labels.shape[0] != hidden.shape[1]:
                allowed = f"({hidden.shape[1]},) or " if hidden.shape[0] == 1 else ""
                raise ValueError(f"{labels_name} of shape {tuple(labels.shape)} go with packed {hidden_name} "
                                 f"({labels.shape[0]}, H) or (1, {labels.shape[0]}, H); {hidden_name} has shape "
                                 f"{tuple(hidden.shape)}, so {labels_name} must have shape "
                                 f"{allowed}{tuple(hidden.shape[:2])}")
            return hidden, labels.unsqueeze(0)
    return hidden, labels


def fused_linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             bias: torch.Tensor | None = None, ignore_index: int = -100, *,
                             chunk_size: int | None = None, logit_softcap: float | None = None,
                             logit_scale: float = 1.0, temperature: float = 1.0, stats=(),
                             validate_labels: bool = True, memory_budget: int | None = None,
                             vocab_parallel_group=None) -> TokenLogps:
    """Per-token log p(labels[t]) under logits = transform(hidden · Wᵀ + bias), never materializing them.

    hidden (B, T, H) with labels (B, T), or packed hidden (N, H) / (1, N, H) with labels (N,) / (1, N); hidden
    (N, H) also takes labels of any shape with N elements (e.g. flattened (B·T, H) with (B, T) labels: token
    log-probs do not depend on the layout). The outputs have the labels' shape.
    transform: z = logit_scale · raw, then logit_softcap · tanh(z / logit_softcap) when set, then
    z / temperature (the order of the models and of TRL's fused head; `logit_options_from_config` reads
    them from a model config). stats: any of "entropy", "mean_logits", "is_top1", "log_sum_sq_probs",
    computed in the same pass over the vocabulary. Returns `TokenLogps`; the other arguments are those of
    `fused_linear_sequence_logps`. vocab_parallel_group: weight and bias hold this rank's slice of the
    vocabulary (or are DTensors Shard(0) over the group), hidden and labels are the same on every rank, and the
    outputs (the statistics too) are over the whole vocabulary, the same on every rank; see
    logprobs/parallel.py (no memory_budget there).
    """
    if vocab_parallel_group is not None:
        from .parallel import vocab_parallel_fused_linear_token_logps

        return vocab_parallel_fused_linear_token_logps(
            hidden, weight, labels, bias, ignore_index, group=vocab_parallel_group, stats=stats,
            chunk_size=chunk_size, logit_softcap=logit_softcap, logit_scale=logit_scale, temperature=temperature,
            validate_labels=validate_labels, memory_budget=memory_budget)
    weight, bias, mesh = gathered_params(weight, bias)

    def body():
        names = stat_names(stats)
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
        shape = labels.shape
        grid_hidden, grid_labels = token_grid(hidden, labels)
        cast_weight, cast_bias, grid_hidden = autocast_inputs(weight, bias, grid_hidden)
        (outputs,) = linear_token_logps([(grid_hidden, grid_labels, "hidden", "labels")], cast_weight, cast_bias,
                                        ignore_index=ignore_index, chunk_size=chunk_size, logit_softcap=logit_softcap,
                                        logit_scale=logit_scale, temperature=temperature, stats=names,
                                        validate_labels=validate_labels, memory_budget=memory_budget)
        return TokenLogps(**dict(zip(("log_probs", *names), (out.view(shape) for out in outputs))))

    return agreed_on_mesh(mesh, body)


def fused_linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                bias: torch.Tensor | None = None, ignore_index: int = -100, *,
                                cu_seqlens: torch.Tensor | None = None, return_token_counts: bool = False,
                                chunk_size: int | None = None, logit_softcap: float | None = None,
                                logit_scale: float = 1.0, temperature: float = 1.0, validate_labels: bool = True,
                                memory_budget: int | None = None, vocab_parallel_group=None,
                                sequence_parallel_group=None):
    """Σ_t log softmax(transform(hidden[t] · Wᵀ + bias))[labels[t]] per sequence, over the tokens not labelled
    ignore_index, without ever materializing the logits.

    Padded: hidden (B, T, H), labels (B, T) → (B,). Packed: hidden (N, H) or (1, N, H), labels (N,) or (1, N),
    cu_seqlens (S + 1,) → (S,). weight (V, H) and hidden of one dtype (float32/bfloat16/float16/float64),
    bias (V,) or None, labels int64/int32 aligned with hidden. The vocabulary is processed chunk_size rows at
    a time (None: chosen from the shapes, see `default_chunk_size`). logit_scale / logit_softcap /
    temperature: the model's logit transform (see `fused_linear_token_logps`). Returns float32 (float64 for
    float64), differentiable with respect to hidden, weight and bias; with return_token_counts=True,
    `(logps, counts)`. validate_labels: as for `sequence_logps`.

    A weight (and bias) that does not require grad (a frozen lm_head: LoRA, adapters) takes 2 GEMMs instead
    of 4 (1 under no_grad). memory_budget (bytes, default None: bounded memory, 4 GEMMs) keeps the first
    chunks of logits whose total fits in it from the forward for the backward, which then skips their
    recompute (3 GEMMs for those chunks).

    vocab_parallel_group: weight and bias hold this rank's contiguous slice of the vocabulary (slices in
    rank order). Without it, a DTensor weight (FSDP2 shards parameters on dim 0 too, over ranks that hold
    different tokens) is gathered with `full_tensor()`, its gradient flowing back to the shard averaged over
    the ranks (as FSDP averages the other parameters' gradients).
    sequence_parallel_group: each rank holds a slice of every sequence's tokens. See logprobs/parallel.py.
    """
    if vocab_parallel_group is not None or sequence_parallel_group is not None:
        from .parallel import parallel_fused_linear_sequence_logps

        return parallel_fused_linear_sequence_logps(
            local_fused_linear_sequence_logps, hidden, weight, labels, bias, ignore_index, cu_seqlens=cu_seqlens,
            return_token_counts=return_token_counts, chunk_size=chunk_size, logit_softcap=logit_softcap,
            logit_scale=logit_scale, temperature=temperature, validate_labels=validate_labels,
            memory_budget=memory_budget, vocab_parallel_group=vocab_parallel_group,
            sequence_parallel_group=sequence_parallel_group)
    weight, bias, mesh = gathered_params(weight, bias)
    return agreed_on_mesh(mesh, partial(
        local_fused_linear_sequence_logps, hidden, weight, labels, bias, ignore_index, cu_seqlens=cu_seqlens,
        return_token_counts=return_token_counts, chunk_size=chunk_size, logit_softcap=logit_softcap,
        logit_scale=logit_scale, temperature=temperature, validate_labels=validate_labels,
        memory_budget=memory_budget))


def local_fused_linear_sequence_logps(hidden, weight, labels, bias=None, ignore_index=-100, *, cu_seqlens=None,
                                      return_token_counts=False, chunk_size=None, logit_softcap=None,
                                      logit_scale=1.0, temperature=1.0, validate_labels=True, memory_budget=None,
                                      names=("hidden", "labels")):
    """`fused_linear_sequence_logps` on this rank's tensors alone (weight and bias plain tensors, gathered
    already), its errors naming hidden and labels `names` (the fused losses pass chosen_hidden, ...)."""
    hidden_name, labels_name = names
    check_ignore_index_value(ignore_index, CU_SEQLENS_HINT)  # first: cu_seqlens passed by position lands here
    check_flag(return_token_counts, "return_token_counts")
    hidden, labels, cu_seqlens = as_token_grid(hidden, labels, cu_seqlens, values_name=hidden_name,
                                               labels_name=labels_name, last_dim="H")
    weight, bias, hidden = autocast_inputs(weight, bias, hidden)
    checked_cu = [] if cu_seqlens is None else [(cu_seqlens, hidden.shape[1])]
    ((token_logps,),) = linear_token_logps([(hidden, labels, hidden_name, labels_name)], weight, bias,
                                           ignore_index=ignore_index, chunk_size=chunk_size,
                                           logit_softcap=logit_softcap, logit_scale=logit_scale,
                                           temperature=temperature, validate_labels=validate_labels,
                                           cu_seqlens=checked_cu, memory_budget=memory_budget)
    return per_sequence(token_logps, labels, cu_seqlens, weight, ignore_index, return_token_counts)


def _config_number(config, name, positive=False) -> float:
    """config.name as a finite non-zero float (> 0 for a soft-cap), or a ValueError naming the field."""
    value = getattr(config, name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and (number > 0 if positive else number != 0)):
        raise ValueError(f"{type(config).__name__}.{name} must be a finite {'positive' if positive else 'non-zero'} "
                         f"number, got {value!r}")
    return number


def logit_options_from_config(config) -> dict:
    """The hidden-state path's logit options (logit_softcap, logit_scale) for a Hugging Face model config, so
    that the log-probs are those of the model's own logits. Read: the soft-cap `final_logit_softcapping`
    (Gemma-2/3), `logits_soft_cap` (RecurrentGemma) or `output_logit_soft_cap` (xLSTM), and the first
    multiplier present of `logit_scale` (Cohere), `output_multiplier`, `lm_head_multiplier` (Falcon-H1),
    `logits_scaling` (Granite and MiniCPM3 divide by it, HyperCLOVA X multiplies), `logits_mup_width_multiplier`
    (Inkling divides by it). A multimodal config's text config is read. Raises ValueError for a config whose
    logits this cannot reproduce (MiniCPM's `dim_model_base` width scaling). Pass the result as keyword
    arguments. Anything but a model config (a dict from `config.to_dict()`, the model itself, None, a string, a
    GenerationConfig: no `model_type`) is refused with TypeError, as each would silently give the default
    options; a field this reads that is not a finite non-zero number (a soft-cap: > 0) raises ValueError.

    Options describe a scaling of hidden states × weight only: a head of more than one layer (RoBERTa-style
    decoders) or logits sliced to `unpadded_vocab_size` (Inkling: pass `weight[:unpadded_vocab_size]`) are the
    caller's to reproduce. `FocalPOTrainer` checks its models' heads against their own forward."""
    if isinstance(config, dict):
        raise TypeError("config must be a model config object (transformers.PretrainedConfig, e.g. model.config), "
                        "got a dict: rebuild it with transformers.AutoConfig.for_model(**d)")
    if isinstance(config, torch.nn.Module):
        raise TypeError(f"config must be a model config object, got the model itself ({type(config).__name__}): "
                        "pass model.config")
    if config is None or isinstance(config, (str, bytes, int, float)):
        raise TypeError(f"config must be a model config object (transformers.PretrainedConfig, e.g. model.config), "
                        f"got {type(config).__name__}: load a hub id with transformers.AutoConfig.from_pretrained")
    if not hasattr(config, "model_type"):  # every PretrainedConfig has one; a GenerationConfig or DPOConfig not
        raise TypeError(f"config must be a model config object (transformers.PretrainedConfig, e.g. model.config), "
                        f"got {type(config).__name__}, which has no model_type")
    getter = getattr(config, "get_text_config", None)
    config = getter() if callable(getter) else (getattr(config, "text_config", None) or config)
    options = {"logit_softcap": None, "logit_scale": 1.0}
    for name in ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap"):
        if getattr(config, name, None) is not None:
            options["logit_softcap"] = _config_number(config, name, positive=True)
            break
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        if getattr(config, name, None) is not None:
            options["logit_scale"] = _config_number(config, name)
            return options
    if getattr(config, "logits_scaling", None) is not None:
        divisor = _config_number(config, "logits_scaling")
        multiplies = getattr(config, "model_type", None) == "hyperclovax"
        options["logit_scale"] = divisor if multiplies else 1.0 / divisor
    elif getattr(config, "logits_mup_width_multiplier", None) is not None:
        options["logit_scale"] = 1.0 / _config_number(config, "logits_mup_width_multiplier")
    elif getattr(config, "dim_model_base", None) is not None:
        raise ValueError("this config scales the lm_head's input by dim_model_base / hidden_size (MiniCPM); "
                         "logit_options_from_config does not reproduce it: pass logit_scale yourself")
    return options
