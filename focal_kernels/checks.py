"""Input validation shared by every entry point: clear errors, raised before any kernel runs."""

from __future__ import annotations

import numbers

import torch

from .dtypes import FLOAT_DTYPES

_LAST_DIMS = {"V": "vocabulary", "H": "hidden size"}


def is_dtensor(value) -> bool:
    """Whether value is a torch.distributed DTensor (without importing torch.distributed unless it is loaded)."""
    return _is_subclass_of(value, "torch.distributed.tensor", "DTensor")


def _is_subclass_of(value, module_name, class_name) -> bool:
    """isinstance(value, module_name.class_name), False where that module is not loaded (not imported for it)."""
    import sys

    module = sys.modules.get(module_name)
    cls = getattr(module, class_name, None) if module is not None else None
    return cls is not None and isinstance(value, cls)


def refuse_dtensor(value, name):
    """A DTensor where a plain tensor is expected raises a TypeError that says what to pass instead (DTensor
    arithmetic would otherwise fail deep inside with a message about mixed tensor types)."""
    if is_dtensor(value):
        raise TypeError(f"{name} is a DTensor (placements {tuple(value.placements)}) where a plain torch.Tensor is "
                        f"expected: pass {name}.to_local() (this rank's shard) or {name}.full_tensor() (the whole "
                        "tensor). DTensors are taken only as logits sharded on the vocabulary (sequence_logps, and "
                        "focal_po_loss with both sides DTensors), as the lm_head weight / bias, and, with "
                        "vocab_parallel_group, as replicated hidden states")


def refuse_wrapper_subclass(value, name):
    """A tensor subclass that wraps other tensors (a quantized weight such as torchao's `Int8Tensor`) raises a
    TypeError naming it: the hidden-state path reads a plain tensor's elements, and the subclass would otherwise
    fail deep inside with its own message about an operator it does not implement. DTensor is handled apart; an
    AsyncCollectiveTensor (a functional collective's pending result) is a plain tensor once waited for."""
    kind = type(value)
    wrapper = kind not in (torch.Tensor, torch.nn.Parameter) and hasattr(kind, "__tensor_flatten__")
    if wrapper and not is_dtensor(value) and not _is_subclass_of(value, "torch.distributed._functional_collectives",
                                                                  "AsyncCollectiveTensor"):
        raise TypeError(f"{name} is a {kind.__module__}.{kind.__name__}, a tensor subclass wrapping other tensors "
                        "(a quantized weight?), where a plain torch.Tensor or a DTensor is expected: pass its "
                        "dequantized values (a plain tensor)")


def refuse_functorch(value, name):
    """A tensor inside a torch.func transform (grad, vmap, jacrev, ...) raises a NotImplementedError naming the
    transform's tensor: the log-prob path runs autograd Functions around Triton kernels, which have no vmap
    rule and no functorch-style (setup_context) form, and would fail deep inside with PyTorch's own message."""
    if torch.compiler.is_compiling() or not torch._C._functorch.is_functorch_wrapped_tensor(value):
        return
    raise NotImplementedError(f"{name} is a torch.func transform's tensor (torch.func.grad, vmap, jacrev, ...): the "
                              "log-prob functions run hand-written kernels that torch.func cannot transform; use "
                              "torch.autograd (loss.backward() or torch.autograd.grad). The pair losses on (B,) "
                              "log-probs (preference_loss) are plain PyTorch and work under torch.func")


def check_logits_and_labels(logits, labels, *, logits_name="logits", labels_name="labels", ignore_index=-100,
                            last_dim="V"):
    """Logits (B, T, V) floating, labels (B, T) integer; last_dim="H" checks hidden states (B, T, H) and their
    labels the same way. The label values are left to `check_labels_in_range` (a device read)."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{logits_name} must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{labels_name} must be a torch.Tensor, got {type(labels).__name__}")
    refuse_dtensor(logits, logits_name)
    refuse_dtensor(labels, labels_name)
    refuse_functorch(logits, logits_name)
    refuse_functorch(labels, labels_name)
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{logits_name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
                        f"got {logits.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{labels_name} must be an int64 or int32 tensor, got {labels.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"{logits_name} must have shape (B, T, {last_dim}), got {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"{labels_name} must have shape (B, T) = {tuple(logits.shape[:2])} to match "
                         f"{logits_name} of shape {tuple(logits.shape)}, got {tuple(labels.shape)}")
    if logits.shape[0] == 0:
        raise ValueError(f"{logits_name} must have at least one sequence (B >= 1), got shape {tuple(logits.shape)}")
    if logits.shape[2] == 0:
        raise ValueError(f"{logits_name} must have a non-empty {_LAST_DIMS[last_dim]} ({last_dim} >= 1), "
                         f"got shape {tuple(logits.shape)}")
    if labels.device != logits.device:
        raise ValueError(f"{labels_name} is on {labels.device} but {logits_name} is on {logits.device}; "
                         "they must be on the same device")
    check_ignore_index(ignore_index, labels, labels_name)


CU_SEQLENS_HINT = " (if this is cu_seqlens: it is keyword-only, cu_seqlens=...)"


def check_ignore_index_value(ignore_index, tensor_hint="") -> None:
    """An int that fits in int64 (checked before any labels are seen, e.g. by the loss modules' constructors).
    tensor_hint: added to the error for a 1-D integer tensor, which may be cu_seqlens passed by position
    (CU_SEQLENS_HINT, where cu_seqlens follows ignore_index)."""
    if not is_integer(ignore_index):
        hint = tensor_hint if (isinstance(ignore_index, torch.Tensor) and ignore_index.dim() == 1
                               and ignore_index.dtype in (torch.int32, torch.int64)) else ""
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}{hint}")
    if not -2**63 <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")


def check_ignore_index(ignore_index, labels, labels_name="labels") -> None:
    """An int that fits the labels' dtype (int32 or int64 labels)."""
    check_ignore_index_value(ignore_index)
    if labels.dtype == torch.int32 and not -2**31 <= ignore_index < 2**31:
        # (labels != ignore_index) would compare in int32, where such an index wraps onto real label ids
        raise ValueError(f"ignore_index={ignore_index} does not fit in {labels_name}'s dtype int32: pass int64 "
                         "labels, or an ignore_index in [-2**31, 2**31)")


def values_readable(tensor) -> bool:
    """Whether the host may read tensor values (a synchronization): not while torch.compile traces or a CUDA
    graph is being captured, and not from meta tensors, which hold none."""
    if torch.compiler.is_compiling() or tensor.device.type == "meta":
        return False
    return not (tensor.is_cuda and torch.cuda.is_current_stream_capturing())


def data_checks_enabled(validate_labels, tensor) -> bool:
    """Whether to read label and cu_seqlens values (one device synchronization): where `values_readable`,
    unless validate_labels=False (without the check the kernels still never read out of bounds: a sequence
    with an out-of-range label gets a NaN log-prob)."""
    check_flag(validate_labels, "validate_labels")
    return validate_labels and values_readable(tensor)


# ------------------------------------------------------------------ packed sequences (cu_seqlens)

def check_cu_seqlens(cu_seqlens, values):
    """Type, dtype, device and rank; the values are checked with the labels (one device read)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of shape (S + 1,) or None, got "
                        f"{type(cu_seqlens).__name__}")
    refuse_dtensor(cu_seqlens, "cu_seqlens")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must have shape (S + 1,) with S >= 0, got {tuple(cu_seqlens.shape)}")
    if isinstance(values, torch.Tensor) and cu_seqlens.device != values.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the tokens are on {values.device}; "
                         "they must be on the same device")


def cu_seqlens_problems(cu_seqlens, tokens):
    """Device-side (0-dim bool) flags, one per rule: [starts at 0, non-decreasing, ends at N]; read by the
    caller together with the label checks, in one synchronization."""
    first_ok = cu_seqlens[0] == 0
    last_ok = cu_seqlens[-1] == tokens
    monotone = (cu_seqlens[1:] >= cu_seqlens[:-1]).all()  # True for a single entry (no sequences)
    return torch.stack([first_ok, monotone, last_ok])


CU_SEQLENS_RULES = ("cu_seqlens must start at 0", "cu_seqlens must be non-decreasing",
                    "cu_seqlens must end at N, the number of packed tokens")


def check_labels_in_range(named_labels, vocab, *, ignore_index=-100, cu_seqlens=()):
    """Every label in [0, vocab) or == ignore_index, and every (cu_seqlens, tokens) in `cu_seqlens` well
    formed, for several tensors with one device synchronization.

    A few small kernels per tensor (ignored labels replaced by 0, then min and max; the cu_seqlens rules as
    flags) and one read of their results: this sync is the price of an error raised before any kernel runs.
    """
    named_labels = [(labels, name) for labels, name in named_labels if labels.numel()]
    parts = [torch.stack(torch.aminmax(torch.where(labels == ignore_index, 0, labels))).long()
             for labels, _ in named_labels]
    parts += [cu_seqlens_problems(cu, tokens).long() for cu, tokens in cu_seqlens]
    if not parts:
        return
    values = torch.cat([part.to(parts[0].device) for part in parts]).tolist()
    for (labels, name), (smallest, largest) in zip(named_labels, zip(values[0::2], values[1::2])):
        if smallest < 0 or largest >= vocab:
            bad = smallest if smallest < 0 else largest
            raise ValueError(f"{name} must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {bad}")
    flags = values[2 * len(named_labels):]
    for index, ok in enumerate(flags):
        if not ok:
            cu, tokens = cu_seqlens[index // 3]
            raise ValueError(f"{CU_SEQLENS_RULES[index % 3]} (N = {tokens}); got {cu.tolist()}")


def check_logits_pair(chosen_logits, rejected_logits, chosen_labels, rejected_labels, ignore_index):
    """Both sides' logits and labels, and that they agree (batch, vocabulary, device, dtype)."""
    check_logits_and_labels(chosen_logits, chosen_labels, logits_name="chosen_logits",
                            labels_name="chosen_labels", ignore_index=ignore_index)
    check_logits_and_labels(rejected_logits, rejected_labels, logits_name="rejected_logits",
                            labels_name="rejected_labels", ignore_index=ignore_index)
    check_pair_shapes(chosen_logits.shape, rejected_logits.shape, chosen_logits.device, rejected_logits.device)
    if chosen_logits.dtype != rejected_logits.dtype:
        raise TypeError(f"chosen_logits and rejected_logits must have the same dtype, got {chosen_logits.dtype} "
                        f"and {rejected_logits.dtype}")


def check_pair_shapes(chosen_shape, rejected_shape, chosen_device, rejected_device, what="logits"):
    """Chosen and rejected share the batch size, the last dimension (V, or H) and the device."""
    if rejected_device != chosen_device:
        raise ValueError(f"rejected_{what} is on {rejected_device} but chosen_{what} is on {chosen_device}")
    if chosen_shape[0] != rejected_shape[0]:
        raise ValueError(f"chosen_{what} and rejected_{what} must have the same batch size B, "
                         f"got {chosen_shape[0]} and {rejected_shape[0]}")
    if chosen_shape[-1] != rejected_shape[-1]:
        raise ValueError(f"chosen_{what} and rejected_{what} must have the same last dimension, "
                         f"got {chosen_shape[-1]} and {rejected_shape[-1]}")


def check_flag(value, name):
    if not isinstance(value, bool):  # (a NumPy bool included: its repr may read True)
        kind = type(value)
        raise TypeError(f"{name} must be True or False (a Python bool), got {value!r} of type "
                        f"{kind.__module__}.{kind.__qualname__}")


def unit_rows(tensor) -> bool:
    """Whether the rows (last dimension) have unit stride, as the kernels read and write them: stride(-1) == 1,
    or at most one column, whose stride is never stepped."""
    return tensor.stride(-1) == 1 or tensor.shape[-1] <= 1


def check_inplace_target(logits, name="logits"):
    """inplace_backward writes each element's gradient over it: the logits must be rows of unit stride that
    share no memory with each other (no expand(), no overlapping as_strided views). While torch.compile
    traces, only the unit stride is checked here (the overlap walk sorts sizes, symbolic there); the
    in-place operator checks everything when the graph runs."""
    if not unit_rows(logits):
        raise ValueError(f"inplace_backward=True needs {name} whose last dimension is contiguous "
                         f"(stride(-1) == 1), got strides {tuple(logits.stride())}")
    if torch.compiler.is_compiling():  # symbolic sizes cannot be sorted; the in-place operator checks at run time
        return
    extent = 1  # elements spanned so far, walking the dimensions from the smallest stride up
    dims = sorted(((st, s) for s, st in zip(logits.shape, logits.stride()) if s > 1))
    for stride, size in dims:
        if stride < extent:
            raise ValueError(f"inplace_backward=True needs {name} whose elements do not overlap in memory "
                             f"(no expand() or overlapping views), got shape {tuple(logits.shape)} and strides "
                             f"{tuple(logits.stride())}")
        extent = stride * (size - 1) + extent


def refuse_leaf(logits, name="logits"):
    """A leaf that requires grad, or a view of one (`leaf[:, :-1]`), would be overwritten by its gradient.

    The base is read under torch.compile too, so a view of a leaf is refused there as in eager mode. A view of
    a non-leaf passed into a compiled function fails to compile instead (aot_autograd's trace cannot read a
    graph input's `_base`; slicing inside the compiled function works): loud, never a leaf overwritten.
    Run on the caller's tensor: a view the library makes of it under no_grad (the packed path's (1, N, V)
    view) is a leaf that requires grad in PyTorch's eyes."""
    if not isinstance(logits, torch.Tensor):
        return
    checked = [logits]
    if logits._base is not None:
        checked.append(logits._base)
    if any(t.is_leaf and t.requires_grad for t in checked):  # a view can be a leaf itself: x.detach()[1:]
        raise ValueError(f"inplace_backward=True would overwrite {name}, a leaf tensor that requires grad (or a "
                         "view of one), with its own gradient: pass the output of an op (e.g. the lm_head's), or "
                         "turn it off")


def check_inplace_targets_disjoint(chosen_logits, rejected_logits):
    """With inplace_backward, chosen and rejected must not share an element: halves of one batch, or of one
    sequence (`logits[:, :T]` and `logits[:, T:]`, whose rows interleave in memory), are fine.

    Each side has already passed `check_inplace_target` (unit-stride rows of V elements that do not overlap),
    so the test is exact at row granularity: the rows' start offsets (metadata only, no device access) of both
    sides, sorted together, must lie at least V apart. Skipped while torch.compile traces (storage identity
    cannot be traced); the in-place custom op's body (ops._checked_logits_grad_inplace) checks again at run time.
    Skipped for meta tensors too: every meta storage has address 0, and nothing is written."""
    if torch.compiler.is_compiling() or chosen_logits.device.type == "meta":
        return
    if chosen_logits.numel() == 0 or rejected_logits.numel() == 0:
        return
    if chosen_logits.untyped_storage().data_ptr() != rejected_logits.untyped_storage().data_ptr():
        return
    width = chosen_logits.shape[-1]  # both sides have V (check_logits_pair) and unit last stride

    def row_starts(t):  # element offsets into the shared storage, one per row
        starts = torch.full((), t.storage_offset(), dtype=torch.int64, device="cpu")  # host arithmetic
        for size, stride in zip(t.shape[:-1], t.stride()[:-1]):
            starts = (starts.unsqueeze(-1) + torch.arange(size, dtype=torch.int64, device="cpu") * stride)
        return starts.reshape(-1)

    starts = torch.cat([row_starts(chosen_logits), row_starts(rejected_logits)]).sort().values
    if starts.numel() > 1 and bool((starts.diff() < width).any()):
        raise ValueError("inplace_backward=True needs chosen_logits and rejected_logits that do not overlap in "
                         "memory (views of disjoint parts of one tensor are fine)")


def is_real(value):
    """A Python or NumPy real number (not a bool, not a tensor)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_integer(value):
    """A Python or NumPy integer (not a bool, not a tensor)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# ------------------------------------------------------------------ the hidden-state path

def check_linear(weight, bias):
    """weight (V, H) floating with V >= 1; bias None or (V,) with the weight's dtype and device."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    refuse_wrapper_subclass(weight, "weight")
    refuse_functorch(weight, "weight")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be float32, bfloat16, float16 or float64, got {weight.dtype}")
    if weight.numel() == 0 and (hasattr(weight, "ds_shape") or weight.dim() == 1):
        raise ValueError(f"weight is an empty placeholder of shape {tuple(weight.shape)}, as DeepSpeed ZeRO-3 "
                         "leaves a partitioned parameter outside its forward: gather it first (e.g. inside "
                         "deepspeed.zero.GatheredParameters) or compute the loss inside the model's forward")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (V, H), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have a non-empty vocabulary (V >= 1), got shape {tuple(weight.shape)}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
    refuse_wrapper_subclass(bias, "bias")
    refuse_functorch(bias, "bias")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias must have the dtype of weight ({weight.dtype}), got {bias.dtype}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.device != weight.device:
        raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")


def check_hidden_and_labels(hidden, labels, weight, *, hidden_name="hidden", labels_name="labels",
                            ignore_index=-100):
    """hidden (B, T, H) floating with the weight's dtype, device and H; labels (B, T) int.

    The weight must already have passed `check_linear`; label values are left to `check_labels_in_range`.
    """
    check_logits_and_labels(hidden, labels, logits_name=hidden_name, labels_name=labels_name,
                            ignore_index=ignore_index, last_dim="H")
    if hidden.dtype != weight.dtype:
        after_autocast = ""
        if autocast_dtype(hidden.device) is not None:
            after_autocast = " (under autocast: after casting to the autocast dtype, which leaves float64 alone)"
        raise TypeError(f"{hidden_name} ({hidden.dtype}) and weight ({weight.dtype}) must have the same "
                        f"dtype{after_autocast}")
    if hidden.device != weight.device:
        raise ValueError(f"{hidden_name} is on {hidden.device} but weight is on {weight.device}; "
                         "they must be on the same device")
    if hidden.shape[2] != weight.shape[1]:
        raise ValueError(f"{hidden_name} has hidden size H = {hidden.shape[2]} but weight has shape "
                         f"{tuple(weight.shape)}; it must be (V, {hidden.shape[2]})")


def autocast_dtype(device):
    """The dtype autocast runs matmuls in on this device, or None where autocast is off (or unknown)."""
    try:  # not torch.amp.is_autocast_available: torch.compile cannot trace it in PyTorch 2.11
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return None
    return torch.get_autocast_dtype(device.type) if enabled else None


def check_chunk_size(chunk_size, name="chunk_size"):
    """chunk_size None or a positive integer (a NumPy one too), returned as a Python int (or None)."""
    if chunk_size is None:
        return None
    if not is_integer(chunk_size):
        raise TypeError(f"{name} must be a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {chunk_size}")
    return int(chunk_size)
