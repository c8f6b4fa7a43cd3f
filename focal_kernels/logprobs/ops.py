"""The Triton kernels as PyTorch operators (`torch.library.custom_op`), launched on their tensors' device.

Each kernel launch is wrapped twice over:
- a device guard, so tensors on cuda:1 run on cuda:1 whatever device is current (on the current stream);
- a registered custom operator `focal_kernels::<name>` with a fake (meta) implementation, so that
  `torch.compile(fullgraph=True)` sees one opaque operator with known output shapes instead of tracing
  into Triton's launcher. In eager mode the implementation is called directly (the dispatcher costs tens
  of microseconds per call, which the small-vocabulary case would feel); under compilation the operator is.

Importing this module registers the operators; it does not import triton (the kernels load on first call).
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from .. import backend
from ..checks import check_inplace_target, check_inplace_targets_disjoint, unit_rows
from ..dtypes import compute_dtype
from . import chunk_kernels as _chunks


def _on_device(tensor):
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def distinct(tensors):
    """The tensors, with any tensor passed a second time (the same labels for chosen and rejected, say)
    replaced by a view of itself: torch.compile refuses an autograd.Function that is given one tensor twice
    ("duplicate tensor input"). The view shares the memory, and gradients flow back through it."""
    out = []
    for tensor in tensors:
        if tensor is not None and any(tensor is seen for seen in out):
            tensor = tensor.view_as(tensor)
        out.append(tensor)
    return out


def _without_autocast(tensor):
    """Autocast off for the chunk GEMMs (they run in the inputs' dtype); nothing to turn off on a device type
    autocast does not know (meta: torch.autocast raises there)."""
    if tensor.device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=tensor.device.type, enabled=False)


def _dispatch(op, impl):
    """`impl` in eager mode, the registered operator while torch.compile traces."""
    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return impl(*args)
    return call


# ------------------------------------------------------------------ the logits path

def _token_logps(logits: list[torch.Tensor], labels: list[torch.Tensor], ignore_index: int, vocab_start: int,
                 write_target: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch over one or two logits tensors (chosen and rejected); for two, flat statistics of both."""
    from ..kernels.token_logps import token_logps_and_lse
    with _on_device(logits[0]):
        return token_logps_and_lse(logits, labels, ignore_index, vocab_start, write_target)


def _gradient_like(logits: torch.Tensor) -> torch.Tensor:
    """A new tensor for the logits' gradient, in their own layout where its rows have unit stride (a
    batch-minor tensor stays batch-minor), else contiguous: `empty_like` of overlapping views (`unfold`'s
    windows) can put another dimension innermost, and the kernel writes rows with unit stride."""
    out = torch.empty_like(logits)
    if unit_rows(out):
        return out
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _logits_grad(logits: list[torch.Tensor], labels: list[torch.Tensor], row_max: torch.Tensor,
                 log_sum_exp: torch.Tensor, grad_scales: list[torch.Tensor], ignore_index: int,
                 vocab_start: int) -> list[torch.Tensor]:
    from ..kernels.logits_grad import logits_grad
    with _on_device(logits[0]):
        return logits_grad(logits, labels, row_max, log_sum_exp, grad_scales, ignore_index, vocab_start,
                           out=[_gradient_like(part) for part in logits])


def _logits_grad_inplace(logits: list[torch.Tensor], labels: list[torch.Tensor], row_max: torch.Tensor,
                         log_sum_exp: torch.Tensor, grad_scales: list[torch.Tensor], ignore_index: int,
                         vocab_start: int, places: None = None) -> None:
    """Eager mode (`places`: the compiled operator's argument, None here)."""
    from ..kernels.logits_grad import logits_grad
    with _on_device(logits[0]):
        logits_grad(logits, labels, row_max, log_sum_exp, grad_scales, ignore_index, vocab_start, out=logits)


def _storage_places(logits: list[torch.Tensor]) -> torch.Tensor:
    """(len(logits), 2) int64 on the CPU: each tensor's storage address and storage offset, as a compiled
    forward reads them (no device access), for `_at_recorded_place` in the compiled in-place backward."""
    return torch.tensor([[part.untyped_storage().data_ptr(), part.storage_offset()] for part in logits],
                        dtype=torch.int64, device="cpu")  # not the default device (torch.set_default_device)


def _at_recorded_place(part, place):
    """`part` at the storage offset the forward recorded. Inductor (seen with torch 2.11, 2.13 and 2.14.1)
    passes a mutated view whose storage offset is symbolic (logits[B:] of a batch whose length changes between
    calls) at offset 0, where the in-place gradient would overwrite other rows: such a view is moved back onto
    the rows the forward read. A view in other memory at the recorded offset is the compiler's functional copy
    of the logits' storage (aot_eager makes one), laid out alike, and is written as given; one at another offset
    cannot be placed (inductor hands over interleaved views such as logits[1::2, :-1] so, and moving them to the
    recorded offset in its copy gave wrong gradients), and is refused."""
    address, offset = place
    if part.storage_offset() == offset:
        return part
    if part.untyped_storage().data_ptr() == address:
        return part.as_strided(part.shape, part.stride(), offset)
    raise RuntimeError("inplace_backward=True: the compiled backward received the logits in other memory, at "
                       f"another storage offset ({part.storage_offset()}) than the forward read them ({offset}), "
                       "where its gradient would be wrong (inductor does this with sizes that change between calls "
                       "for views such as logits[1::2]); turn inplace_backward off for this compiled step, or "
                       "compile it with dynamic=False")


def _checked_logits_grad_inplace(logits: list[torch.Tensor], labels: list[torch.Tensor], row_max: torch.Tensor,
                                 log_sum_exp: torch.Tensor, grad_scales: list[torch.Tensor], ignore_index: int,
                                 vocab_start: int, places: torch.Tensor | None) -> None:
    """The operator's body: eager mode checked the targets before the forward, but tracing cannot see
    storage, so a compiled graph checks them here, when it runs, at the places its forward recorded
    (`places`, from `storage_places`; None in eager mode)."""
    if places is not None:
        logits = [_at_recorded_place(part, place) for part, place in zip(logits, places.tolist())]
    for part in logits:
        check_inplace_target(part)
    if len(logits) == 2:
        check_inplace_targets_disjoint(*logits)
    _logits_grad_inplace(logits, labels, row_max, log_sum_exp, grad_scales, ignore_index, vocab_start)


def _segment_sum(values: torch.Tensor, offsets: torch.Tensor | None, batches: list[int],
                 seq_lens: list[int]) -> list[torch.Tensor]:
    """Packed (offsets) or padded (one or two grids of batches × seq_lens) per-sequence sums."""
    from ..kernels.segment_sum import segment_sum
    with _on_device(values):
        return segment_sum(values, offsets, batches, seq_lens)


# The kernels read their inputs through strides and the gradient takes the logits' layout: inductor must pass
# these operators the very layouts they were traced with.
_EXACT_STRIDES = (getattr(torch.Tag, "needs_exact_strides", torch.Tag.needs_fixed_stride_order),)


def _strided_op(name, fn, mutates_args=()):
    """custom_op with the exact-strides tag, where this PyTorch's custom_op takes tags."""
    if "tags" in inspect.signature(torch.library.custom_op).parameters:
        return torch.library.custom_op(name, fn, mutates_args=mutates_args, tags=_EXACT_STRIDES)
    return torch.library.custom_op(name, fn, mutates_args=mutates_args)


_token_logps_op = _strided_op("focal_kernels::token_logps", _token_logps)
_logits_grad_op = _strided_op("focal_kernels::logits_grad", _logits_grad)
_logits_grad_inplace_op = _strided_op("focal_kernels::logits_grad_inplace", _checked_logits_grad_inplace,
                                      mutates_args=("logits",))
_segment_sum_op = torch.library.custom_op("focal_kernels::segment_sum", _segment_sum, mutates_args=())
_storage_places_op = _strided_op("focal_kernels::storage_places", _storage_places)


@_token_logps_op.register_fake
def _(logits, labels, ignore_index, vocab_start, write_target):
    rows = sum(part.shape[0] * part.shape[1] for part in labels)
    out = logits[0].new_empty(labels[0].shape if len(labels) == 1 else (rows,), dtype=compute_dtype(logits[0].dtype))
    return out, torch.empty_like(out), torch.empty_like(out)


@_logits_grad_op.register_fake
def _(logits, labels, row_max, log_sum_exp, grad_scales, ignore_index, vocab_start):
    return [_gradient_like(part) for part in logits]  # the layout the operator allocates


@_logits_grad_inplace_op.register_fake
def _(logits, labels, row_max, log_sum_exp, grad_scales, ignore_index, vocab_start, places):
    return None


@_storage_places_op.register_fake
def _(logits):
    return torch.empty((len(logits), 2), dtype=torch.int64, device="cpu")


@_segment_sum_op.register_fake
def _(values, offsets, batches, seq_lens):
    if offsets is not None:
        return [values.new_empty((offsets.shape[0] - 1,))]
    return [values.new_empty((batch,)) for batch in batches]


token_logps = _dispatch(_token_logps_op, _token_logps)
logits_grad = _dispatch(_logits_grad_op, _logits_grad)
logits_grad_inplace = _dispatch(_logits_grad_inplace_op, _logits_grad_inplace)
storage_places = _storage_places_op  # only ever called while torch.compile traces
segment_sum = _dispatch(_segment_sum_op, _segment_sum)


# ------------------------------------------------------------------ the vocabulary-parallel ranks' agreement

def _bits_digest(bits: torch.Tensor) -> torch.Tensor:
    """kernels/bits_digest.py: a 0-dim int64 digest of an integer tensor (B, T, C)'s values."""
    from ..kernels.bits_digest import bits_digest
    with _on_device(bits):
        return bits_digest(bits)


_bits_digest_op = torch.library.custom_op("focal_kernels::bits_digest", _bits_digest, mutates_args=())


@_bits_digest_op.register_fake
def _(bits):
    return bits.new_empty((), dtype=torch.int64)


bits_digest = _dispatch(_bits_digest_op, _bits_digest)


# ------------------------------------------------------------------ the hidden-state path
# The whole walk over the vocabulary is one operator each way (vocab_chunks.py: GEMMs and per-chunk
# kernels, or their PyTorch twins on a CPU without Triton), so compiled graphs hold two opaque calls.

STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
STATE_OF_STAT = {"entropy": "wsum", "log_sum_sq_probs": "sqsum", "mean_logits": "xsum", "is_top1": "before"}
STATE_NAMES = ("max", "sum", "target", "wsum", "sqsum", "xsum", "before")


def _transform(params, has_softcap):
    return None if params is None else (params, has_softcap)


def _linear_forward(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_labels: torch.Tensor,
                    params: torch.Tensor | None, has_softcap: bool, vocab_start: int, chunk_size: int,
                    stats: str, hidden_grad: bool = False, keep_chunks: int = 0) -> list[torch.Tensor]:
    """The final running state (ops.STATE_NAMES) of every row, then `unit` and `kept`. stats: requested names,
    comma-separated (states not requested come back empty). hidden_grad (a frozen weight): unit (N, H) is
    d logp / d row, accumulated during the walk (vocab_chunks.py), else empty. keep_chunks: the first k
    chunks' raw logits (k, N, chunk_size) for the backward (the memory budget), else empty."""
    from .vocab_chunks import accumulate_product, logits_pass
    acc_dtype = compute_dtype(weight.dtype)
    total = rows.shape[0]
    state = {"max": torch.full((total,), -torch.inf, dtype=acc_dtype, device=rows.device),
             "sum": torch.zeros((total,), dtype=acc_dtype, device=rows.device),
             "target": torch.zeros((total,), dtype=acc_dtype, device=rows.device)}
    for stat in filter(None, stats.split(",")):
        name = STATE_OF_STAT[stat]
        state[name] = torch.full((total,), -torch.inf if name == "before" else 0.0, dtype=acc_dtype,
                                 device=rows.device)
    fold, to_gradient = _chunks.chunk_kernels(backend.use_triton(weight))
    transform = _transform(params, has_softcap)
    kept = rows.new_empty((keep_chunks, total, chunk_size)) if keep_chunks else None
    acc = torch.zeros((total, rows.shape[1]), dtype=acc_dtype, device=rows.device) if hidden_grad else None
    if acc is not None:  # E = e^(x − m)·x' is written over each chunk by the gradient kernel with g = −1, s = 0
        minus_one = torch.full((total,), -1.0, dtype=acc_dtype, device=rows.device)
        zero = torch.zeros((total,), dtype=acc_dtype, device=rows.device)
        no_label = torch.full((total,), -1, dtype=torch.int64, device=rows.device)

    def fold_chunk(chunk, start):
        previous_max = state["max"].clone() if acc is not None else None
        fold(chunk, row_labels, start + vocab_start, state, transform)
        if acc is not None:
            new_max = torch.where(state["max"] == -torch.inf, 0.0, state["max"])
            acc.mul_(torch.exp(previous_max - new_max)[:, None])
            weights = to_gradient(chunk, no_label, 0, new_max, zero, minus_one, transform)
            _zero_label_column(weights, row_labels - (start + vocab_start))
            accumulate_product(acc, weights, weight[start:start + chunk.shape[1]])

    if total:
        with _on_device(rows), _without_autocast(rows):
            logits_pass(rows, weight, bias, chunk_size, fold_chunk, kept)
    unit = rows.new_empty((0,), dtype=acc_dtype)
    if acc is not None:  # x'_y·W[y]·(1 − p_y) − Σ_{v≠y} p_v x'_v W_v, with 1 − p_y = (S − e^(x_y − m)) / S in float32
        label_weight = state["sum"] - torch.exp(state["target"] - state["max"])
        unit = _target_row(weight, row_labels, vocab_start, state["target"], params, has_softcap, acc_dtype)
        unit.mul_(label_weight[:, None]).sub_(acc).div_(state["sum"][:, None])
    outputs = [state[name] if name in state else rows.new_empty((0,), dtype=acc_dtype) for name in STATE_NAMES]
    return outputs + [unit, kept if kept is not None else rows.new_empty((0,))]


def _zero_label_column(weights, local_labels):
    """weights[n, local_labels[n]] = 0 where the label falls in this chunk: the label's own term is taken
    exactly from the float32 state rather than from a rounded chunk element (1 − p_y cancels)."""
    in_chunk = (local_labels >= 0) & (local_labels < weights.shape[1])
    column = local_labels.clamp(0, weights.shape[1] - 1)[:, None]
    weights.scatter_(1, column, torch.where(in_chunk[:, None], 0, weights.gather(1, column)))


def _target_row(weight, row_labels, vocab_start, target, params, has_softcap, acc_dtype):
    """(N, H) x'_y · W[y] for the rows' labels (zero where the label is not in this weight's rows), x'_y the
    transform's derivative at the label, recovered from the transformed target logit."""
    local = row_labels - vocab_start
    in_rows = (local >= 0) & (local < weight.shape[0])
    rows = weight[local.clamp(0, weight.shape[0] - 1)].to(acc_dtype) * in_rows[:, None]
    if params is None:
        return rows
    scale, cap, inv_temperature = params[0], params[1], params[2]
    derivative = (scale * inv_temperature).expand_as(target)
    if has_softcap:
        tanh = target / (cap * inv_temperature)
        derivative = derivative * (1 - tanh * tanh)
    return rows * derivative[:, None]


def _linear_backward(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, row_labels: torch.Tensor,
                     row_max: torch.Tensor, log_sum_exp: torch.Tensor, grad_scale: torch.Tensor,
                     params: torch.Tensor | None, has_softcap: bool, vocab_start: int, chunk_size: int,
                     needs_rows: bool, needs_weight: bool, needs_bias: bool,
                     kept: torch.Tensor | None = None) -> list[torch.Tensor]:
    from .vocab_chunks import gradient_pass
    acc_dtype = log_sum_exp.dtype
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if needs_weight else None
    grad_bias = torch.empty(bias.shape, dtype=bias.dtype, device=bias.device) if needs_bias else None
    grad_rows = torch.zeros(rows.shape, dtype=acc_dtype, device=rows.device) if needs_rows else None
    _, to_gradient = _chunks.chunk_kernels(backend.use_triton(weight))
    transform = _transform(params, has_softcap)
    with _on_device(rows), _without_autocast(rows):
        if rows.shape[0]:
            gradient_pass(rows, weight, bias, chunk_size,
                          lambda chunk, start: to_gradient(chunk, row_labels, start + vocab_start, row_max,
                                                           log_sum_exp, grad_scale, transform),
                          grad_weight, grad_bias, grad_rows, kept)
        else:  # no scored token: zero gradients
            for grad in (grad_weight, grad_bias):
                if grad is not None:
                    grad.zero_()
    return [rows.new_empty((0,)) if grad is None else grad for grad in (grad_rows, grad_weight, grad_bias)]


_linear_forward_op = torch.library.custom_op("focal_kernels::linear_forward", _linear_forward, mutates_args=())
_linear_backward_op = torch.library.custom_op("focal_kernels::linear_backward", _linear_backward, mutates_args=())


@_linear_forward_op.register_fake
def _(rows, weight, bias, row_labels, params, has_softcap, vocab_start, chunk_size, stats, hidden_grad=False,
      keep_chunks=0):
    acc_dtype = compute_dtype(weight.dtype)
    wanted = {"max", "sum", "target"} | {STATE_OF_STAT[stat] for stat in filter(None, stats.split(","))}
    state = [rows.new_empty((rows.shape[0] if name in wanted else 0,), dtype=acc_dtype) for name in STATE_NAMES]
    unit = rows.new_empty(rows.shape if hidden_grad else (0,), dtype=acc_dtype)
    kept = rows.new_empty((keep_chunks, rows.shape[0], chunk_size) if keep_chunks else (0,))
    return state + [unit, kept]


@_linear_backward_op.register_fake
def _(rows, weight, bias, row_labels, row_max, log_sum_exp, grad_scale, params, has_softcap, vocab_start,
      chunk_size, needs_rows, needs_weight, needs_bias, kept=None):
    grad_rows = rows.new_empty(rows.shape, dtype=log_sum_exp.dtype) if needs_rows else rows.new_empty((0,))
    grad_weight = weight.new_empty(weight.shape) if needs_weight else rows.new_empty((0,))
    grad_bias = bias.new_empty(bias.shape) if needs_bias else rows.new_empty((0,))
    return [grad_rows, grad_weight, grad_bias]


linear_forward = _dispatch(_linear_forward_op, _linear_forward)
linear_backward = _dispatch(_linear_backward_op, _linear_backward)
