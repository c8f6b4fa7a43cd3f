"""The fused entry points: preference losses straight from logits or from hidden states and the lm_head.

Each is the composition of the two layers beneath it, written out: the log-prob primitive
(`sequence_logps` / the hidden-state path, with token counts for the length-normalized losses) for chosen
and rejected, then `preference_loss` on the (B,) results. So `out.chosen_logps` is a genuine input of
`out.loss` (`torch.autograd.grad(out.loss, out.chosen_logps)` works), and every loss option of
`preference_loss` (`loss_type`, `loss_weights`, `label_smoothing`, ...) is accepted here too.
"""

from __future__ import annotations

import inspect
import zlib
from functools import partial

import torch

from .checks import (check_chunk_size, check_flag, check_ignore_index_value, check_labels_in_range,
                     check_logits_and_labels, check_logits_pair, check_pair_shapes, data_checks_enabled, is_dtensor)
from .logprobs.linear import (agreed_on_mesh, autocast_inputs, check_logit_transform, check_memory_budget,
                               gathered_params, linear_token_logps, local_fused_linear_sequence_logps)
from .logprobs.logits import local_sequence_logps, pair_sequence_logps
from .logprobs.agreement import float_words, weighted_sum
from .logprobs.parallel import parallel_fused_linear_sequence_logps, parallel_sequence_logps
from .logprobs.packing import layout_of, sum_per_sequence, token_counts
from .losses import LOSS_TYPES, preference_loss
from .losses.batch import spec_of
from .losses.validation import (check_options, check_reference_logps, check_tensors, OPTION_DEFAULTS,
                                resolve_loss_types)
from .output import PreferenceLossOutput


def _padded(name, tensor):
    if isinstance(tensor, torch.Tensor) and tensor.dim() != 3:
        raise ValueError(f"{name} must have shape (B, T, {'H' if 'hidden' in name else 'V'}), got "
                         f"{tuple(tensor.shape)} (for packed sequences, compose sequence_logps / "
                         "fused_linear_sequence_logps with preference_loss)")


def _counts_needed(loss_options):
    """Whether a selected loss type is length-normalized (needs token counts): only then are they computed."""
    names, _ = resolve_loss_types(loss_options.get("loss_type", "focal"), loss_options.get("loss_weights"))
    return any(spec_of(LOSS_TYPES[name])["token_counts"] for name in names)


def _padded_counts(labels, ignore_index):
    return token_counts(labels, layout_of(labels.shape[0], labels.shape[1], None), ignore_index)


_LOSS_OPTIONS = ("loss_type", "loss_weights", "label_smoothing", "simpo_gamma", "discopop_tau", "f_divergence_type",
                 "f_alpha_divergence_coef", "pair_weights")
_OPTION_DEFAULTS = {name: OPTION_DEFAULTS[name] for name in _LOSS_OPTIONS if name in OPTION_DEFAULTS}


def _check_loss_options(*, beta, gamma, detach_focal_weight, reduction, loss_options, caller=None):
    """The loss's non-tensor options: unknown names (caller: the fused loss function called, whose keywords
    a misspelt name is matched against), the loss types and their option values."""
    unknown = sorted(set(loss_options) - set(_LOSS_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}{_did_you_mean(unknown, caller)}; besides its "
                        f"named keywords, the function takes the loss options {list(_LOSS_OPTIONS)}")
    names, _ = resolve_loss_types(loss_options.get("loss_type", "focal"), loss_options.get("loss_weights"))
    options = {name: loss_options.get(name, default) for name, default in _OPTION_DEFAULTS.items()}
    check_options(names, beta=beta, gamma=gamma, detach_focal_weight=detach_focal_weight, reduction=reduction,
                  **options)
    return names


def _did_you_mean(unknown, caller):
    """' (did you mean 'gamma'?)' for a misspelt keyword of `caller` or a loss option, and a keyword of the
    other fused loss named as such; else '' (always '' while torch.compile traces, which cannot trace
    inspect and difflib)."""
    if caller is None or torch.compiler.is_compiling():
        return ""

    def keywords(fn):
        return {name for name, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY}

    other = fused_linear_focal_po_loss if caller is focal_po_loss else focal_po_loss
    return _suggestions(unknown, {*_LOSS_OPTIONS, *keywords(caller)}, keywords(other), caller.__name__,
                        other.__name__)


def _suggestions(unknown, known, other_known, this, other):
    """' (...)' naming, for each unknown keyword, the closest of `known`, or `other` where it is one of
    `other_known` (the other fused loss's); '' where there is nothing to say."""
    import difflib

    hints = []
    for name in unknown:
        if name in other_known:
            hints.append(f"{name!r} is an option of {other}, not of {this}")
        else:
            hints.extend(f"did you mean {match!r}?" for match in difflib.get_close_matches(name, sorted(known), n=1))
    return f" ({'; '.join(hints)})" if hints else ""


def _check_loss_arguments(ref_chosen_logps, ref_rejected_logps, batch, device, what, *, beta, gamma,
                          detach_focal_weight, reduction, loss_options, caller):
    """The loss's options and reference log-probs, checked before any kernel runs (preference_loss checks
    them again, with the log-probs)."""
    names = _check_loss_options(beta=beta, gamma=gamma, detach_focal_weight=detach_focal_weight,
                                reduction=reduction, loss_options=loss_options, caller=caller)
    check_reference_logps(ref_chosen_logps, ref_rejected_logps, batch, device, what)
    # The (B,) tensors the primitive will produce, as empty stand-ins: preference_loss's own tensor checks
    # (reference-free losses given references, pair_weights' shape, ...) run before any kernel.
    logps = torch.empty((batch,), device=device)
    counts = torch.empty((batch,), dtype=torch.int64, device=device) if _counts_needed(loss_options) else None
    check_tensors(names, chosen_logps=logps, rejected_logps=logps, ref_chosen_logps=ref_chosen_logps,
                  ref_rejected_logps=ref_rejected_logps, chosen_token_counts=counts, rejected_token_counts=counts,
                  pair_weights=loss_options.get("pair_weights"))
    return counts is not None


def _group_pair_loss(logps_fn, kind, sides, pair_checks, ref_chosen_logps, ref_rejected_logps, beta, gamma,
                     detach_focal_weight, reduction, loss_options, **options):
    """The distributed forms: chosen and rejected each through logps_fn(values, labels=, **options) on its
    own (they communicate per call; its errors name chosen_{kind}, chosen_labels, ...), then the pair loss.
    pair_checks() (the pair's and the loss's arguments) runs inside the chosen side's agreement, where the
    ranks also compare a digest of the loss's arguments: a bad argument on one rank raises on every rank
    instead of leaving the others waiting in a collective, and ranks given different loss arguments raise
    instead of computing different losses."""
    digest = _loss_digest(ref_chosen_logps, ref_rejected_logps, loss_options, beta=beta, gamma=gamma,
                          detach_focal_weight=detach_focal_weight, reduction=reduction)
    try:
        with_counts = _counts_needed(loss_options)
    except (TypeError, ValueError):
        with_counts = False  # a bad loss_type: pair_checks raises it, on every rank
    out = [logps_fn(values, labels=labels, return_token_counts=with_counts, more_checks=checks, agree_on=agree_on,
                    names=(f"{side}_{kind}", f"{side}_labels"), **options)
           for (values, labels), side, checks, agree_on in zip(sides, ("chosen", "rejected"), (pair_checks, None),
                                                               (digest, (0, 0)))]
    chosen, rejected = out if with_counts else [(logps, None) for logps in out]
    return _pair_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps, beta, gamma, detach_focal_weight,
                      reduction, loss_options)


def _loss_digest(ref_chosen_logps, ref_rejected_logps, loss_options, **scalars):
    """Two int64 fields that the ranks of a group compare: a CRC of the loss's options (scalars and
    loss_options, with which tensors are None) and a pseudo-randomly weighted sum of the float64 bits of its
    per-pair tensors (ref_chosen_logps, ref_rejected_logps, pair_weights), a 0-dim device tensor (no host
    read). Never raises: on arguments that fail their checks it gives (-1, -1) and the checks name them."""
    tensors = (ref_chosen_logps, ref_rejected_logps, loss_options.get("pair_weights"))
    try:  # normalized: beta=1 and beta=1.0, a default given or left out, a list or a tuple compare equal
        names, weights = resolve_loss_types(loss_options.get("loss_type", "focal"), loss_options.get("loss_weights"))
        options = {name: loss_options.get(name, default) for name, default in _OPTION_DEFAULTS.items()}
        options = {name: value if isinstance(value, str) else float(value) for name, value in options.items()}
        scalars = {name: value if isinstance(value, (str, bool)) else float(value) for name, value in scalars.items()}
        unknown = sorted(set(loss_options) - set(_LOSS_OPTIONS))
        shapes = [None if t is None else tuple(t.shape) for t in tensors]
        crc = zlib.crc32(repr((names, [float(w) for w in weights], sorted(options.items()), sorted(scalars.items()),
                               unknown, shapes)).encode())
        given = [t.detach().reshape(-1).to(torch.float64) for t in tensors if t is not None]
        if not given:
            return crc, 0
        words = float_words(torch.cat([t.to(given[0].device) for t in given]) + 0.0)  # −0.0 and 0.0 alike
        return crc, weighted_sum(words.to(torch.int64))
    except Exception:  # noqa: BLE001 (the checks raise the error, on every rank)
        return -1, -1


def _local(tensor):
    """This rank's part of a DTensor (for the shape and dtype checks); anything else as it is."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _pair_loss(chosen, rejected, ref_chosen_logps, ref_rejected_logps, beta, gamma, detach_focal_weight,
               reduction, loss_options):
    (chosen_logps, chosen_counts), (rejected_logps, rejected_counts) = chosen, rejected
    return preference_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                           gamma=gamma, detach_focal_weight=detach_focal_weight, reduction=reduction,
                           chosen_token_counts=chosen_counts, rejected_token_counts=rejected_counts,
                           **loss_options)


def focal_po_loss(chosen_logits: torch.Tensor, rejected_logits: torch.Tensor,
                  chosen_labels: torch.Tensor, rejected_labels: torch.Tensor,
                  ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                  *, beta: float = 0.1, gamma: float = 0.05, ignore_index: int = -100, reduction: str = "mean",
                  detach_focal_weight: bool = False, inplace_backward: bool = False, validate_labels: bool = True,
                  vocab_parallel_group=None, sequence_parallel_group=None, **loss_options) -> PreferenceLossOutput:
    """FocalPO loss −p^γ·log p, p = σ(β·((logp_c − ref_c) − (logp_r − ref_r))) by default (γ = 0 is DPO), or
    any `preference_loss` loss type through `loss_type=` and its options.

    chosen_logits (B, T, V) and rejected_logits (B, T2, V) of one dtype, labels (B, T) and (B, T2), aligned
    with the logits (shift before calling: `logits[:, :-1]` with `labels[:, 1:]`). ref_*_logps: (B,)
    reference-model log-probs, or None for reference-free (0). reduction: "mean" | "sum" | "none".
    detach_focal_weight=True treats p^γ as a constant in the backward. inplace_backward=True writes the
    logits' gradients into the logits' storage (they are consumed). validate_labels: see `sequence_logps`.
    Token counts for the length-normalized losses come from the labels. vocab_parallel_group /
    sequence_parallel_group (or DTensor logits): as for `sequence_logps`, each side computed separately.

    Returns PreferenceLossOutput(loss, chosen_logps, rejected_logps, chosen_rewards, rejected_rewards,
    metrics); the loss and both log-probs are differentiable, the rewards β·(logp − ref) are detached.
    """
    if is_dtensor(chosen_logits) != is_dtensor(rejected_logits):
        dtensor, plain = (("chosen_logits", "rejected_logits") if is_dtensor(chosen_logits)
                          else ("rejected_logits", "chosen_logits"))
        raise TypeError(f"{dtensor} is a DTensor but {plain} is not: pass both as DTensors sharded on the "
                        "vocabulary, or both as plain tensors")

    def pair_checks():
        _padded("chosen_logits", chosen_logits)
        _padded("rejected_logits", rejected_logits)
        check_logits_pair(_local(chosen_logits), _local(rejected_logits), chosen_labels, rejected_labels,
                          ignore_index)
        return _check_loss_arguments(ref_chosen_logps, ref_rejected_logps, chosen_logits.shape[0],
                                     chosen_logits.device, "logits", beta=beta, gamma=gamma,
                                     detach_focal_weight=detach_focal_weight, reduction=reduction,
                                     loss_options=loss_options, caller=focal_po_loss)

    if vocab_parallel_group is not None or sequence_parallel_group is not None or is_dtensor(chosen_logits):
        return _group_pair_loss(
            partial(parallel_sequence_logps, local_sequence_logps), "logits",
            ((chosen_logits, chosen_labels), (rejected_logits, rejected_labels)), pair_checks, ref_chosen_logps,
            ref_rejected_logps, beta, gamma, detach_focal_weight, reduction, loss_options, ignore_index=ignore_index,
            cu_seqlens=None, validate_labels=validate_labels, inplace_backward=inplace_backward,
            vocab_parallel_group=vocab_parallel_group, sequence_parallel_group=sequence_parallel_group)
    with_counts = pair_checks()
    check_flag(inplace_backward, "inplace_backward")
    if data_checks_enabled(validate_labels, chosen_logits):
        check_labels_in_range([(chosen_labels, "chosen_labels"), (rejected_labels, "rejected_labels")],
                              chosen_logits.shape[2], ignore_index=ignore_index)
    chosen_logps, rejected_logps = pair_sequence_logps(chosen_logits, rejected_logits, chosen_labels,
                                                       rejected_labels, ignore_index, inplace_backward)
    sides = [(logps, _padded_counts(labels, ignore_index) if with_counts else None)
             for logps, labels in ((chosen_logps, chosen_labels), (rejected_logps, rejected_labels))]
    return _pair_loss(*sides, ref_chosen_logps, ref_rejected_logps, beta, gamma, detach_focal_weight, reduction,
                      loss_options)


def fused_linear_focal_po_loss(chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
                               chosen_labels: torch.Tensor, rejected_labels: torch.Tensor,
                               ref_chosen_logps: torch.Tensor | None = None,
                               ref_rejected_logps: torch.Tensor | None = None,
                               *, bias: torch.Tensor | None = None, beta: float = 0.1, gamma: float = 0.05,
                               ignore_index: int = -100, reduction: str = "mean", detach_focal_weight: bool = False,
                               chunk_size: int | None = None, logit_softcap: float | None = None,
                               logit_scale: float = 1.0, temperature: float = 1.0, validate_labels: bool = True,
                               memory_budget: int | None = None, vocab_parallel_group=None,
                               sequence_parallel_group=None, **loss_options) -> PreferenceLossOutput:
    """`focal_po_loss` on the logits transform(hidden · Wᵀ + bias), without ever materializing them.

    chosen_hidden (B, T, H) and rejected_hidden (B, T2, H): final hidden states aligned with chosen_labels
    (B, T) and rejected_labels (B, T2) (shift before calling: `hidden[:, :-1]` with `labels[:, 1:]`).
    weight (V, H) the lm_head weight, bias (V,) or None; chunk_size and the logit transform as in
    `fused_linear_sequence_logps`, as are the frozen-weight path, memory_budget, vocab_parallel_group and
    sequence_parallel_group (with a group, each side is computed separately; without, chosen and rejected
    share one pass over the weight). The other arguments and
    the output are those of `focal_po_loss`; gradients reach both hidden states, the weight and the bias.
    """

    def pair_checks():
        check_pair_shapes(chosen_hidden.shape, rejected_hidden.shape, chosen_hidden.device, rejected_hidden.device,
                          what="hidden")
        _check_loss_arguments(ref_chosen_logps, ref_rejected_logps, chosen_hidden.shape[0], chosen_hidden.device,
                              "hidden states", beta=beta, gamma=gamma, detach_focal_weight=detach_focal_weight,
                              reduction=reduction, loss_options=loss_options, caller=fused_linear_focal_po_loss)

    if vocab_parallel_group is not None or sequence_parallel_group is not None:
        def group_checks():  # the tensors' own checks first, named, as linear_token_logps does below
            for side, hidden, labels in (("chosen", chosen_hidden, chosen_labels),
                                         ("rejected", rejected_hidden, rejected_labels)):
                _padded(f"{side}_hidden", hidden)
                check_logits_and_labels(_local(hidden), labels, logits_name=f"{side}_hidden",
                                        labels_name=f"{side}_labels", ignore_index=ignore_index, last_dim="H")
            pair_checks()

        return _group_pair_loss(
            partial(parallel_fused_linear_sequence_logps, local_fused_linear_sequence_logps), "hidden",
            ((chosen_hidden, chosen_labels), (rejected_hidden, rejected_labels)), group_checks, ref_chosen_logps,
            ref_rejected_logps, beta, gamma, detach_focal_weight, reduction, loss_options, weight=weight, bias=bias,
            ignore_index=ignore_index, cu_seqlens=None, chunk_size=chunk_size, logit_softcap=logit_softcap,
            logit_scale=logit_scale, temperature=temperature, validate_labels=validate_labels,
            memory_budget=memory_budget, vocab_parallel_group=vocab_parallel_group,
            sequence_parallel_group=sequence_parallel_group)
    weight, bias, mesh = gathered_params(weight, bias)

    def local():
        _padded("chosen_hidden", chosen_hidden)
        _padded("rejected_hidden", rejected_hidden)
        cast_weight, cast_bias, cast_chosen, cast_rejected = autocast_inputs(weight, bias, chosen_hidden,
                                                                             rejected_hidden)
        (chosen_tokens,), (rejected_tokens,) = linear_token_logps(
            [(cast_chosen, chosen_labels, "chosen_hidden", "chosen_labels"),
             (cast_rejected, rejected_labels, "rejected_hidden", "rejected_labels")], cast_weight, cast_bias,
            ignore_index=ignore_index, chunk_size=chunk_size, logit_softcap=logit_softcap, logit_scale=logit_scale,
            temperature=temperature, validate_labels=validate_labels, more_checks=pair_checks,
            memory_budget=memory_budget)
        with_counts = _counts_needed(loss_options)
        sides = [(sum_per_sequence(tokens, layout_of(labels.shape[0], labels.shape[1], None), cast_weight),
                  _padded_counts(labels, ignore_index) if with_counts else None)
                 for tokens, labels in ((chosen_tokens, chosen_labels), (rejected_tokens, rejected_labels))]
        return _pair_loss(*sides, ref_chosen_logps, ref_rejected_logps, beta, gamma, detach_focal_weight,
                          reduction, loss_options)

    return agreed_on_mesh(mesh, local)


class _OptionsModule(torch.nn.Module):
    """Every option of the functional form kept as an attribute (as PyTorch's losses keep `reduction`), given
    or default; `options` reads them all at each call, and the functional form validates them again, so an
    attribute changed after construction (`module.temperature = 2.0`) takes effect or raises, never is
    ignored. Construction checks what can be checked without tensors: the loss options, ignore_index, the
    flags, chunk_size and the logit transform."""

    _defaults: dict = {}  # each option of the functional form and its default (per class)

    def __init__(self, **options):
        other = FusedLinearFocalPOLoss if isinstance(self, FocalPOLoss) else FocalPOLoss
        _check_module_options(self._defaults, options, type(self).__name__, other)
        super().__init__()
        for name, default in self._defaults.items():
            setattr(self, name, options.get(name, default))

    @property
    def options(self) -> dict:
        """The functional form's keywords, read from the attributes (a copy: change the attributes)."""
        # getattr's default: a module pickled before every option was an attribute
        return {name: getattr(self, name, default) for name, default in self._defaults.items()}

    def extra_repr(self) -> str:
        shown = {name: value for name, value in self.options.items()
                 if name in ("beta", "gamma", "reduction") or not _same_option(value, self._defaults[name])}
        return ", ".join(f"{name}={value!r}" for name, value in shown.items())


def _same_option(value, default) -> bool:
    return value is default or (not isinstance(value, torch.Tensor) and type(value) is type(default)
                                and value == default)


def _module_option_defaults(functional) -> dict:
    """name → default of every module option of `functional`: its keyword-only parameters but the per-call
    tensors (bias, pair_weights), and the loss options."""
    parameters = inspect.signature(functional).parameters.values()
    defaults = {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in _CALL_TENSORS}
    defaults.update(loss_type="focal", loss_weights=None, **_OPTION_DEFAULTS)
    return defaults


_CALL_TENSORS = ("bias", "pair_weights")
_FLAGS = ("inplace_backward", "validate_labels")


def _check_module_options(defaults, options, name, other):
    """The module's options, as far as they can be checked without tensors, against its functional form's
    (`defaults`: _module_option_defaults); an unknown one is matched against them, and against the `other`
    module's (`name`: the module's class name)."""
    if "pair_weights" in options:
        raise TypeError("pair_weights is a per-batch (B,) tensor, not a module option: pass it at each call, "
                        "forward(..., pair_weights=...)")
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        hint = _suggestions(unknown, defaults, set(other._defaults) - set(defaults), name, other.__name__)
        raise TypeError(f"unexpected keyword argument(s) {unknown}{hint}; the options are {sorted(defaults)}")
    loss_options = {k: v for k, v in options.items() if k in _LOSS_OPTIONS}
    _check_loss_options(beta=options["beta"], gamma=options["gamma"],
                        detach_focal_weight=options["detach_focal_weight"], reduction=options["reduction"],
                        loss_options=loss_options)
    check_ignore_index_value(options["ignore_index"])
    for flag in _FLAGS:
        if flag in options:
            check_flag(options[flag], flag)
    if "chunk_size" in options:
        check_chunk_size(options["chunk_size"])
    if "memory_budget" in options:
        check_memory_budget(options["memory_budget"])
    if {"logit_softcap", "logit_scale", "temperature"} & set(options):
        check_logit_transform(options.get("logit_softcap"), options.get("logit_scale", 1.0),
                              options.get("temperature", 1.0))


class FocalPOLoss(_OptionsModule):
    """Module form of `focal_po_loss`: the options at construction (any keyword-only option of
    `focal_po_loss`: validate_labels, vocab_parallel_group, sequence_parallel_group, ..., and any
    `preference_loss` option: loss_type, loss_weights, label_smoothing, ...), the tensors at call
    (pair_weights, a per-batch tensor, included)."""

    _defaults = _module_option_defaults(focal_po_loss)

    def __init__(self, *, beta: float = 0.1, gamma: float = 0.05, ignore_index: int = -100,
                 reduction: str = "mean", detach_focal_weight: bool = False, inplace_backward: bool = False,
                 **loss_options):
        super().__init__(beta=beta, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
                         detach_focal_weight=detach_focal_weight, inplace_backward=inplace_backward, **loss_options)

    def forward(self, chosen_logits, rejected_logits, chosen_labels, rejected_labels,
                ref_chosen_logps=None, ref_rejected_logps=None, *, pair_weights=None) -> PreferenceLossOutput:
        return focal_po_loss(chosen_logits, rejected_logits, chosen_labels, rejected_labels,
                             ref_chosen_logps, ref_rejected_logps, pair_weights=pair_weights, **self.options)


class FusedLinearFocalPOLoss(_OptionsModule):
    """Module form of `fused_linear_focal_po_loss`: the options at construction (any keyword-only option of
    `fused_linear_focal_po_loss` but bias: logit_softcap, logit_scale, temperature, memory_budget,
    validate_labels, the group keywords, ..., and any `preference_loss` option), the tensors (the lm_head's
    weight and bias, pair_weights) at call."""

    _defaults = _module_option_defaults(fused_linear_focal_po_loss)

    def __init__(self, *, beta: float = 0.1, gamma: float = 0.05, ignore_index: int = -100,
                 reduction: str = "mean", detach_focal_weight: bool = False, chunk_size: int | None = None,
                 **loss_options):
        super().__init__(beta=beta, gamma=gamma, ignore_index=ignore_index,
                         reduction=reduction, detach_focal_weight=detach_focal_weight, chunk_size=chunk_size,
                         **loss_options)

    def forward(self, chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                ref_chosen_logps=None, ref_rejected_logps=None, *, bias=None,
                pair_weights=None) -> PreferenceLossOutput:
        return fused_linear_focal_po_loss(chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                                          ref_chosen_logps, ref_rejected_logps, bias=bias, pair_weights=pair_weights,
                                          **self.options)
