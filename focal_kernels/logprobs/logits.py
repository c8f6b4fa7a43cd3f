"""Per-sequence log-probs from logits: `sequence_logps`, padded or packed."""

from __future__ import annotations

import sys
import warnings

import torch

from .. import backend, reference
from ..checks import (CU_SEQLENS_HINT, check_flag, check_ignore_index_value, check_inplace_target,
                      check_inplace_targets_disjoint, check_labels_in_range, check_logits_and_labels,
                      data_checks_enabled, is_dtensor, refuse_leaf, unit_rows)
from .ops import distinct
from .packing import as_token_grid, per_sequence


def _user_stacklevel():
    """The `stacklevel` that makes a warning raised by the caller of this function name the first frame outside
    focal_kernels: the user's line, however deep the public entry calls."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _in_library(frame.f_globals.get("__name__")):
        frame, level = frame.f_back, level + 1
    return level


def _in_library(module_name) -> bool:
    return isinstance(module_name, str) and module_name.split(".")[0] == "focal_kernels"


def unit_stride_logits(logits, name="logits"):
    """The kernels read rows with unit stride: any other last-dimension stride is copied once, with a warning
    naming the user's line, in eager mode (torch.compile cannot trace warnings.warn; inplace_backward=True has
    refused such logits already: `check_inplace`)."""
    if unit_rows(logits):
        return logits
    if not torch.compiler.is_compiling():
        warnings.warn(f"{name} has a last-dimension stride of {logits.stride(-1)}; the kernels read rows with unit "
                      f"stride, so it is copied once ({logits.numel() * logits.element_size() / 2**20:.1f} MiB). "
                      "Pass a tensor whose last dimension is contiguous to avoid the copy.",
                      stacklevel=_user_stacklevel())
    return logits.contiguous()


def check_inplace(logits, name="logits"):
    """What inplace_backward=True needs, on every backend (the plain-CPU path then ignores the flag): rows of
    unit stride that do not overlap, and not a leaf that requires grad (it would be overwritten by its own
    gradient)."""
    check_inplace_target(logits, name)
    refuse_leaf(logits, name)


def _kernel_ready(logits, inplace_backward, name="logits"):
    """The logits as the kernels read them: unit last stride (else copied, with a warning), and contiguous
    when batch-minor under torch.compile."""
    logits = unit_stride_logits(logits, name)
    if (torch.compiler.is_compiling() and not inplace_backward and logits.shape[0] > 1 and logits.shape[1] > 1
            and logits.stride(0) < logits.stride(1)):
        # Batch-minor logits (e.g. a transposed (T, B, V) tensor): inductor may lay out the saved tensor
        # differently from how it traced it, so they are made contiguous once (a shifted view such as
        # logits[:, :-1] keeps its zero-copy path).
        logits = logits.contiguous()
    return logits


def token_logps(logits, labels, ignore_index, inplace_backward):
    """(B, T) differentiable token log-probs of checked (B, T, V) logits: the kernels, or the spec on a plain CPU.
    With inplace_backward the caller has refused a leaf already (`refuse_leaf`, on the tensor it was given:
    these logits may be the packed path's own view of it)."""
    if inplace_backward:
        check_inplace_target(logits)
    if not backend.use_triton(logits):  # a plain CPU: the spec itself (inplace_backward has no effect)
        return reference.token_logps(logits, labels, ignore_index)
    from .logits_autograd import TokenLogpsFromLogits

    return TokenLogpsFromLogits.apply(_kernel_ready(logits, inplace_backward), labels, int(ignore_index),
                                      inplace_backward)


def pair_sequence_logps(chosen_logits, rejected_logits, chosen_labels, rejected_labels, ignore_index,
                        inplace_backward):
    """(chosen (B,), rejected (B,)) differentiable log-probs of checked padded logits of one dtype and V:
    one launch of each kernel for both sides (logits_autograd.PairSequenceLogps), or the spec on a plain CPU."""
    sides = ((chosen_logits, "chosen_logits"), (rejected_logits, "rejected_logits"))
    if inplace_backward:
        for logits, name in sides:
            check_inplace(logits, name)
        check_inplace_targets_disjoint(chosen_logits, rejected_logits)
    if not backend.use_triton(chosen_logits):
        return tuple(reference.token_logps(logits, labels, ignore_index).sum(-1)
                     for logits, labels in ((chosen_logits, chosen_labels), (rejected_logits, rejected_labels)))
    from .logits_autograd import PairSequenceLogps

    chosen_logits = _kernel_ready(chosen_logits, inplace_backward, "chosen_logits")
    rejected_logits = _kernel_ready(rejected_logits, inplace_backward, "rejected_logits")
    tensors = distinct([chosen_logits, rejected_logits, chosen_labels, rejected_labels])
    return PairSequenceLogps.apply(*tensors, int(ignore_index), inplace_backward)


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, *,
                   cu_seqlens: torch.Tensor | None = None, return_token_counts: bool = False,
                   inplace_backward: bool = False, validate_labels: bool = True, vocab_parallel_group=None,
                   sequence_parallel_group=None):
    """Σ_t log softmax(logits[t])[labels[t]] per sequence, over the tokens whose label is not ignore_index.

    Padded: logits (B, T, V), labels (B, T) → (B,). Packed: logits (N, V) or (1, N, V), labels (N,) or (1, N),
    cu_seqlens (S + 1,) int32/int64 → (S,) (labels shifted within each sequence: `shift_packed_labels`).
    logits float32/bfloat16/float16/float64, any batch and time strides (a shifted view such as
    `logits[:, :-1]` is read without a copy); labels int64/int32. Returns float32 (float64 for float64
    logits), differentiable; with return_token_counts=True, `(logps, counts)` with counts int64 scored tokens.

    inplace_backward=True writes the gradient into the logits' own storage: they are consumed. validate_labels
    (default True) reads the labels and cu_seqlens once to raise a clear error on bad values (one device
    synchronization); False skips it, as does torch.compile or CUDA-graph capture: there a label outside
    [0, V) is never read out of bounds and gives its sequence a NaN log-prob.

    vocab_parallel_group: logits hold this rank's contiguous slice of the vocabulary (slices in rank order);
    a DTensor sharded on the vocabulary needs no group. sequence_parallel_group: each rank holds a slice of
    every sequence's tokens; the per-sequence sums (and counts) are all-reduced. See logprobs/parallel.py.
    """
    if vocab_parallel_group is not None or sequence_parallel_group is not None or is_dtensor(logits):
        from .parallel import parallel_sequence_logps

        return parallel_sequence_logps(local_sequence_logps, logits, labels, ignore_index, cu_seqlens=cu_seqlens,
                                       return_token_counts=return_token_counts, validate_labels=validate_labels,
                                       inplace_backward=inplace_backward, vocab_parallel_group=vocab_parallel_group,
                                       sequence_parallel_group=sequence_parallel_group)
    return local_sequence_logps(logits, labels, ignore_index, cu_seqlens=cu_seqlens,
                                return_token_counts=return_token_counts, inplace_backward=inplace_backward,
                                validate_labels=validate_labels)


def local_sequence_logps(logits, labels, ignore_index=-100, *, cu_seqlens=None, return_token_counts=False,
                         inplace_backward=False, validate_labels=True, names=("logits", "labels")):
    """`sequence_logps` on this rank's tensors alone, its errors naming them `names` (the fused losses pass
    chosen_logits / chosen_labels, ...)."""
    logits_name, labels_name = names
    check_ignore_index_value(ignore_index, CU_SEQLENS_HINT)  # first: cu_seqlens passed by position lands here
    check_flag(inplace_backward, "inplace_backward")
    if inplace_backward:  # on the caller's tensor: a packed one is viewed as (1, N, V) below
        refuse_leaf(logits, logits_name)
    logits, labels, cu_seqlens = as_token_grid(logits, labels, cu_seqlens, values_name=logits_name,
                                               labels_name=labels_name, last_dim="V")
    check_logits_and_labels(logits, labels, logits_name=logits_name, labels_name=labels_name,
                            ignore_index=ignore_index)
    check_flag(return_token_counts, "return_token_counts")
    if data_checks_enabled(validate_labels, logits):
        check_labels_in_range([(labels, labels_name)], logits.shape[2], ignore_index=ignore_index,
                              cu_seqlens=[] if cu_seqlens is None else [(cu_seqlens, logits.shape[1])])
    return per_sequence(token_logps(logits, labels, ignore_index, inplace_backward), labels, cu_seqlens, logits,
                        ignore_index, return_token_counts)
