"""The logit-free path: FocalPO from final hidden states and the lm_head weight, never materializing logits.

    logits[n, v] = hidden[n] · W[v] (+ bias[v])        for the N scored tokens n (label ≠ ignore_index)
    logp_b       = Σ_{n in b} (logits[n, y_n] − logsumexp_v logits[n, v])

Forward   the scored rows of chosen and rejected are gathered into one (N, H) matrix (ignored tokens cost no
          FLOPs). The vocabulary is walked in chunks [v0, v1): one GEMM gives the (N, v1 − v0) logits, and
          the chunk_lse_update kernel folds them into a running max / sum of exponentials per token and picks
          up the label's logit when it falls in the chunk. Per-token log-probs are scattered into a zero
          (B, T) tensor and summed per sequence by the sequence_sum kernel (deterministic).
Backward  with g_n the incoming gradient of token n's sequence, each chunk's logits are recomputed and
          the chunk_logits_grad kernel overwrites them with G = g_n · (1[v = y_n] − exp((x − m_n) − s_n)),
          m_n the row's max and s_n = log Σ_v exp(x − m_n) kept apart (as in token_logps: no rounding of
          a large lse_n = m_n + s_n to float32 before the subtraction); then
              grad_W[v0:v1] = Gᵀ · hidden   (one GEMM written straight into that slice of grad_W)
              grad_b[v0:v1] = Σ_n G
              grad_hidden  += G · W[v0:v1]   (into an (N, H) float32 buffer, float64 for float64)
          and grad_hidden is scattered back into a zero (B, T, H) gradient in the hidden states' dtype.

Memory: besides the inputs and the gradients themselves, one chunk of logits (N × chunk), the gathered rows
(N × H), in the backward the float32 grad_hidden buffer (N × H) and O(N) per-token values; nothing scales
with V. The gathered rows are freed before the hidden-state gradients are allocated, and those are filled
from the float32 buffer without a temporary of their size. Only the inputs, the valid-row index, the int64
labels of those rows and each row's max and log-sum-exp (O(tokens)) are saved for the backward.

The chunk GEMMs run in the inputs' dtype (cuBLAS accumulates in float32 and rounds its output to bfloat16 /
float16), so the logits the kernels see are exactly what `hidden @ W.T` gives; the kernels then compute in
float32. grad_W and grad_b are each written once per slice by a GEMM / reduction that accumulates in
float32: no low-precision running sum across chunks.

Under autocast the hidden states, weight and bias are first cast to the autocast dtype (float64 is left
alone), as `torch.mm` would cast them for a model's lm_head; the Function itself then runs with autocast
off, so the backward recomputes exactly the forward's logits.

Chosen and rejected go through one autograd Function call, so every chunk of W is read once per pass and
grad_W is written once, instead of two weight-sized gradients being added by autograd.

Without Triton (a CPU without TRITON_INTERPRET=1) the same chunked Function runs with PyTorch versions of
the two per-chunk kernels: the same memory bound, the same results up to rounding.
"""

from __future__ import annotations

import math

import torch

from . import backend
from .checks import (check_label_values, check_labels_in_range, check_logits_and_labels, check_loss_options,
                     check_pair_shapes, check_reference_logps, is_integer)
from .first_order import first_order_only
from .loss import PreferenceLossModule, preference_output
from .output import PreferenceLossOutput
from .reference import compute_dtype

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# The default chunk: the widest multiple of _CHUNK_MULTIPLE rows of W whose logits fit in _CHUNK_BYTES, but
# at least a floor of _MIN_CHUNK_COLUMNS, lowered where that would exceed 1/_MAX_CHUNK_FRACTION of the
# vocabulary or make the chunk larger than the float32 accumulator it feeds; at most the vocabulary.
_MIN_CHUNK_COLUMNS = 4096
_MAX_CHUNK_FRACTION = 16
_CHUNK_BYTES = 128 * 2**20
_CHUNK_MULTIPLE = 256


def default_chunk_size(rows: int, vocab: int, hidden: int, element_size: int) -> int:
    """Vocabulary rows per chunk: the widest multiple of 256 whose rows × chunk logits fit in 128 MiB, but at
    least min(4096, V / 16, 4 · H / element_size) (rounded down to a multiple of 256, at least 256), at most V.

    Why a floor in columns rather than a byte budget alone: the chunk width is the inner dimension K of the
    backward's grad_hidden GEMM, which reads and writes the (rows, H) float32 accumulator once per chunk, K/4
    FLOPs per byte of that traffic whatever the number of rows; a byte budget alone narrows the chunk as rows
    grow (2048 columns at 32K bf16 rows, where the H200 run spent far more time outside the GEMMs than at 16K
    rows with 4096 columns; benchmarks/NOTES.md). The floor never makes a chunk larger than that accumulator
    (rows × H × 4 bytes) or than 1/16 of the logits it stands for.
    """
    multiple = _CHUNK_MULTIPLE
    fit = _CHUNK_BYTES // (max(rows, 1) * element_size) // multiple * multiple
    floor = min(_MIN_CHUNK_COLUMNS, vocab // _MAX_CHUNK_FRACTION, 4 * hidden // element_size)
    floor = max(multiple, floor // multiple * multiple)
    return min(max(floor, fit), vocab)


# ---------------------------------------------------------------------------------------------- validation

def check_linear(weight, bias, *, weight_name="weight", bias_name="bias"):
    """weight (V, H) floating with V >= 1; bias None or (V,) with the weight's dtype and device."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{weight_name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{weight_name} must be float32, bfloat16, float16 or float64, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must have shape (V, H), got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{weight_name} must have a non-empty vocabulary (V >= 1), got shape {tuple(weight.shape)}")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{bias_name} must be a torch.Tensor or None, got {type(bias).__name__}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{bias_name} must have the dtype of {weight_name} ({weight.dtype}), got {bias.dtype}")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{bias_name} must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    if bias.device != weight.device:
        raise ValueError(f"{bias_name} is on {bias.device} but {weight_name} is on {weight.device}")


def check_hidden_and_labels(hidden, labels, weight, *, hidden_name="hidden", labels_name="labels",
                            weight_name="weight", ignore_index=-100, check_values=True):
    """hidden (B, T, H) with the weight's dtype, device and H; labels (B, T) int in [0, V) or ignore_index.

    The weight must already have passed `check_linear`. The label values are read last (a device sync);
    check_values=False leaves them to `check_label_values`.
    """
    if not isinstance(hidden, torch.Tensor):
        raise TypeError(f"{hidden_name} must be a torch.Tensor, got {type(hidden).__name__}")
    if hidden.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{hidden_name} must be float32, bfloat16, float16 or float64, got {hidden.dtype}")
    check_logits_and_labels(hidden, labels, logits_name=hidden_name, labels_name=labels_name,
                            ignore_index=ignore_index, check_values=False, last_dim="H")
    if hidden.dtype != weight.dtype:
        after_autocast = ""
        if torch.amp.is_autocast_available(hidden.device.type) and torch.is_autocast_enabled(hidden.device.type):
            after_autocast = " (under autocast: after casting to the autocast dtype, which leaves float64 alone)"
        raise TypeError(f"{hidden_name} ({hidden.dtype}) and {weight_name} ({weight.dtype}) must have the same "
                        f"dtype{after_autocast}")
    if hidden.device != weight.device:
        raise ValueError(f"{hidden_name} is on {hidden.device} but {weight_name} is on {weight.device}; "
                         "they must be on the same device")
    if hidden.shape[2] != weight.shape[1]:
        raise ValueError(f"{hidden_name} has hidden size H = {hidden.shape[2]} but {weight_name} has shape "
                         f"{tuple(weight.shape)}; it must be (V, {hidden.shape[2]})")
    if check_values:
        check_label_values(labels, weight.shape[0], labels_name=labels_name, ignore_index=ignore_index)


def check_chunk_size(chunk_size):
    """chunk_size None or a positive integer (a NumPy one too), returned as a Python int (or None)."""
    if chunk_size is None:
        return None
    if not is_integer(chunk_size):
        raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    return int(chunk_size)


# ------------------------------------------------------------------------- per-chunk operations, two backends

def _kernels(use_triton):
    """(chunk_lse_update, chunk_logits_grad_, sequence_sum): the Triton kernels, imported on first use so that
    importing focal_kernels does not import triton (see backend.py), or their PyTorch twins."""
    if not use_triton:
        return _chunk_lse_update_torch, _chunk_logits_grad_torch, lambda token_logps: token_logps.sum(dim=1)
    from .kernels.chunk_logits_grad import chunk_logits_grad_
    from .kernels.chunk_lse_update import chunk_lse_update
    from .kernels.sequence_sum import sequence_sum

    return chunk_lse_update, chunk_logits_grad_, sequence_sum


def _chunk_lse_update_torch(logits_chunk, labels, vocab_start, running_max, running_sum, target_logits):
    """PyTorch twin of kernels.chunk_lse_update (chunk-sized temporaries)."""
    if logits_chunk.shape[0] == 0:
        return
    x = logits_chunk.to(running_sum.dtype)
    new_max = torch.maximum(running_max, x.amax(dim=1))
    safe_max = torch.where(new_max == -math.inf, torch.zeros_like(new_max), new_max)
    running_sum.mul_(torch.exp(running_max - safe_max)).add_(torch.exp(x - safe_max[:, None]).sum(dim=1))
    running_max.copy_(new_max)
    local_label = labels - vocab_start
    in_chunk = (local_label >= 0) & (local_label < x.shape[1])
    picked = x.gather(1, local_label.clamp(0, x.shape[1] - 1)[:, None]).squeeze(1)
    target_logits.copy_(torch.where(in_chunk, picked, target_logits))


def _chunk_logits_grad_torch(logits_chunk, labels, vocab_start, row_max, log_sum_exp, grad_scale):
    """PyTorch twin of kernels.chunk_logits_grad (chunk-sized temporaries)."""
    x = logits_chunk.to(log_sum_exp.dtype)
    columns = torch.arange(vocab_start, vocab_start + x.shape[1], device=x.device)
    one_hot = (columns[None, :] == labels[:, None]).to(x.dtype)
    probs = torch.exp((x - row_max[:, None]) - log_sum_exp[:, None])
    logits_chunk.copy_(grad_scale[:, None] * (one_hot - probs))
    return logits_chunk


_MIXED_ADDMM_WORKS = {}  # (device type, input dtype, accumulator dtype) → bool, probed once each


def _mixed_addmm_works(acc, a):
    """Whether this PyTorch and device take `addmm(acc, a, b, out_dtype=acc.dtype, out=acc)` with a, b in a
    lower precision than acc (CUDA from PyTorch 2.10; not the CPU). Probed once on 1 × 1 tensors; never
    while a CUDA graph is being captured (the probe reads its result back), which takes the fallback."""
    key = (acc.device.type, a.dtype, acc.dtype)
    if key not in _MIXED_ADDMM_WORKS:
        if acc.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        probe = torch.zeros((1, 1), dtype=acc.dtype, device=acc.device)
        factor = torch.ones((1, 1), dtype=a.dtype, device=a.device)
        try:
            torch.addmm(probe, factor, factor, out_dtype=acc.dtype, out=probe)
            _MIXED_ADDMM_WORKS[key] = probe.item() == 1.0
        except (TypeError, RuntimeError):  # no such overload, or not for this device
            _MIXED_ADDMM_WORKS[key] = False
    return _MIXED_ADDMM_WORKS[key]


def _accumulate_product(acc, a, b):
    """acc += a @ b with acc in float32 (float64) and a, b possibly bfloat16 / float16.

    Where `addmm(..., out_dtype=float32)` takes a float32 accumulator (CUDA), cuBLAS accumulates the
    low-precision product straight into the float32 buffer. Elsewhere (older PyTorch, the CPU) the product
    is rounded to the inputs' dtype by its GEMM (which accumulates in float32 internally), then added in
    float32.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _mixed_addmm_works(acc, a):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.add_(torch.mm(a, b))


def _chunk_logits(hidden_rows, weight, bias, start, stop):
    """(N, stop − start) logits of vocabulary rows [start, stop), in the inputs' dtype, contiguous."""
    weight_chunk = weight[start:stop]
    if bias is None:
        return torch.mm(hidden_rows, weight_chunk.t())
    return torch.addmm(bias[start:stop], hidden_rows, weight_chunk.t())


def logits_pass(hidden_rows, weight, bias, chunk_size, fold):
    """The forward's loop: fold(logits_chunk, vocab_start) for every chunk of the rows' logits."""
    vocab = weight.shape[0]
    for start in range(0, vocab, chunk_size):
        fold(_chunk_logits(hidden_rows, weight, bias, start, min(start + chunk_size, vocab)), start)


def gradient_pass(hidden_rows, weight, bias, chunk_size, to_gradient, grad_weight, grad_bias, grad_hidden_rows):
    """The backward's loop: each chunk of logits recomputed, turned into its gradient G by
    to_gradient(logits_chunk, vocab_start) (in place), then grad_weight[chunk] = Gᵀ · rows,
    grad_bias[chunk] = Σ_n G and grad_hidden_rows += G · W[chunk], for those of the three that are not None."""
    vocab = weight.shape[0]
    for start in range(0, vocab, chunk_size):
        stop = min(start + chunk_size, vocab)
        grad_chunk = to_gradient(_chunk_logits(hidden_rows, weight, bias, start, stop), start)
        if grad_weight is not None:
            torch.mm(grad_chunk.t(), hidden_rows, out=grad_weight[start:stop])
        if grad_bias is not None:
            torch.sum(grad_chunk, dim=0, out=grad_bias[start:stop])
        if grad_hidden_rows is not None:
            _accumulate_product(grad_hidden_rows, grad_chunk, weight[start:stop])
        del grad_chunk


# ------------------------------------------------------------------------------------- row bookkeeping

def _scored_positions(labels, ignore_index):
    """Flat indices t + T·b of the scored tokens, ascending."""
    return (labels != ignore_index).reshape(-1).nonzero().squeeze(1)


def _sequence_of_rows(positions, seq_len):
    """The sequence b of each flat position t + T·b."""
    return torch.div(positions, max(seq_len, 1), rounding_mode="floor")


def _gather_rows(hiddens, positions, total_rows):
    """The scored rows of every hidden tensor, stacked in order into one (N, H) tensor."""
    first = hiddens[0]
    rows = torch.empty((total_rows, first.shape[2]), dtype=first.dtype, device=first.device)
    start = 0
    for hidden, index in zip(hiddens, positions):
        stop = start + index.numel()
        batch, seq_len, _ = hidden.shape
        if batch == 1 or seq_len == 1 or hidden.stride(0) == seq_len * hidden.stride(1):
            torch.index_select(hidden.flatten(0, 1), 0, index, out=rows[start:stop])  # a view: no copy of hidden
        else:  # e.g. a shifted view hidden[:, :-1]
            sequence = _sequence_of_rows(index, seq_len)
            rows[start:stop] = hidden[sequence, index - sequence * seq_len]
        start = stop
    return rows


# Rows converted per step when scattering the float32 accumulator into a hidden-state gradient with gaps.
_SCATTER_ROWS = 4096


def _scatter_rows(grad_hidden, index, rows):
    """grad_hidden (B, T, H), contiguous ← zeros, except rows (len(index), H), any float dtype, at the flat
    positions index (ascending and unique, as from `_scored_positions`).

    A gradient with no ignored token is one converting copy; otherwise the rows are converted a block at a
    time, so the temporary stays small.
    """
    batch, seq_len, hidden_size = grad_hidden.shape
    flat = grad_hidden.view(batch * seq_len, hidden_size)
    if index.numel() == flat.shape[0]:  # every token scored: index (ascending, unique) is 0, 1, 2, ...
        flat.copy_(rows)
        return
    flat.zero_()
    for start in range(0, index.numel(), _SCATTER_ROWS):
        stop = start + _SCATTER_ROWS
        flat.index_copy_(0, index[start:stop], rows[start:stop].to(flat.dtype))


def hidden_gradients(hiddens, positions, needs_hidden, grad_hidden_rows):
    """The (B_k, T_k, H) gradient of each hidden tensor that needs one (None for the others), from the
    float32 rows of all groups stacked in order."""
    grads, start = [], 0
    for hidden, index, needed in zip(hiddens, positions, needs_hidden):
        grad_hidden = None
        if needed:
            grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
            _scatter_rows(grad_hidden, index, grad_hidden_rows[start:start + index.numel()])
        grads.append(grad_hidden)
        start += index.numel()
    return grads


# ------------------------------------------------------------------------------------------- autocast

def _autocast_inputs(weight, bias, *hiddens):
    """Under autocast on the weight's device, weight, bias and hidden states cast to the autocast dtype as
    `torch.mm` would cast them for a model's lm_head (float64 and non-tensors are left for the checks);
    the casts are differentiable, so gradients reach the originals in their own dtype. Unchanged otherwise."""
    tensors = (weight, bias, *hiddens)
    device_type = weight.device.type if isinstance(weight, torch.Tensor) else None
    if not (device_type and torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    castable = (torch.float32, torch.bfloat16, torch.float16)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in castable else t for t in tensors)


def _autocast_off(device):
    """Inside the Function the GEMMs run in the inputs' dtype, forward and backward alike, whatever autocast
    state the backward happens to run in."""
    return torch.autocast(device_type=device.type, enabled=False)


# ------------------------------------------------------------------------------------------- autograd

class FusedLinearSequenceLogps(torch.autograd.Function):
    """(weight, bias, ignore_index, chunk_size, hidden_1, labels_1, hidden_2, labels_2, ...) → (logps_1, ...).

    Each hidden_k is (B_k, T_k, H) with labels_k (B_k, T_k); logps_k is (B_k,) in float32 (float64 for
    float64). All groups share one chunked pass over the vocabulary. Inputs are assumed checked.
    """

    @staticmethod
    def forward(ctx, weight, bias, ignore_index, chunk_size, *hidden_and_labels):
        hiddens, labels = hidden_and_labels[0::2], hidden_and_labels[1::2]
        use_triton = backend.use_triton(weight)
        chunk_lse_update, _, sequence_sum = _kernels(use_triton)
        acc_dtype = compute_dtype(weight.dtype)
        device = weight.device
        vocab = weight.shape[0]

        positions = [_scored_positions(lab, ignore_index) for lab in labels]
        total_rows = sum(index.numel() for index in positions)
        if chunk_size is None:
            chunk_size = default_chunk_size(total_rows, vocab, weight.shape[1], weight.element_size())
        hidden_rows = _gather_rows(hiddens, positions, total_rows)
        row_labels = torch.cat([lab.reshape(-1)[index].to(torch.int64) for lab, index in zip(labels, positions)])

        running_max = torch.full((total_rows,), -math.inf, dtype=acc_dtype, device=device)
        running_sum = torch.zeros((total_rows,), dtype=acc_dtype, device=device)
        target_logits = torch.zeros((total_rows,), dtype=acc_dtype, device=device)
        if total_rows:
            with _autocast_off(device):
                logits_pass(hidden_rows, weight, bias, chunk_size,
                            lambda logits_chunk, start: chunk_lse_update(logits_chunk, row_labels, start,
                                                                         running_max, running_sum, target_logits))
        del hidden_rows
        log_sum_exp = torch.log(running_sum)
        row_logps = (target_logits - running_max) - log_sum_exp  # as in token_logps: x − max stays exact

        outputs = []
        start = 0
        for hidden, index in zip(hiddens, positions):
            stop = start + index.numel()
            token_logps = torch.zeros(hidden.shape[:2], dtype=acc_dtype, device=device)
            token_logps.view(-1).index_copy_(0, index, row_logps[start:stop])
            outputs.append(sequence_sum(token_logps))
            start = stop

        ctx.save_for_backward(weight, bias, running_max, log_sum_exp, row_labels, *hiddens, *positions)
        ctx.chunk_size = chunk_size
        ctx.groups = len(hiddens)
        ctx.use_triton = use_triton
        return tuple(outputs)

    @staticmethod
    @first_order_only
    def backward(ctx, *grad_logps):
        weight, bias, row_max, log_sum_exp, row_labels, *rest = ctx.saved_tensors
        hiddens, positions = rest[:ctx.groups], rest[ctx.groups:]
        needs_weight, needs_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_hidden = [ctx.needs_input_grad[4 + 2 * k] for k in range(ctx.groups)]
        acc_dtype, device, vocab = log_sum_exp.dtype, weight.device, weight.shape[0]
        total_rows = log_sum_exp.numel()

        grad_scale = torch.cat([grad.to(acc_dtype)[_sequence_of_rows(index, hidden.shape[1])]
                                for grad, hidden, index in zip(grad_logps, hiddens, positions)])
        hidden_rows = _gather_rows(hiddens, positions, total_rows)
        grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device) if needs_weight else None
        grad_bias = torch.empty((vocab,), dtype=bias.dtype, device=device) if needs_bias else None
        grad_hidden_rows = None
        if any(needs_hidden):
            grad_hidden_rows = torch.zeros((total_rows, weight.shape[1]), dtype=acc_dtype, device=device)
        _, chunk_logits_grad_, _ = _kernels(ctx.use_triton)

        with _autocast_off(device):
            gradient_pass(hidden_rows, weight, bias, ctx.chunk_size,
                          lambda logits_chunk, start: chunk_logits_grad_(logits_chunk, row_labels, start, row_max,
                                                                         log_sum_exp, grad_scale),
                          grad_weight, grad_bias, grad_hidden_rows)
        del hidden_rows  # before the hidden-state gradients exist: the two never share the peak

        grad_hiddens = hidden_gradients(hiddens, positions, needs_hidden, grad_hidden_rows)
        return (grad_weight, grad_bias, None, None, *(g for grad in grad_hiddens for g in (grad, None)))


# ------------------------------------------------------------------------------------------- public API

def fused_linear_sequence_logps(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                bias: torch.Tensor | None = None, ignore_index: int = -100,
                                chunk_size: int | None = None) -> torch.Tensor:
    """(B,) Σ_t log softmax(hidden[b, t] · Wᵀ + bias)[labels[b, t]] over the tokens not labelled ignore_index.

    hidden (B, T, H) and weight (V, H) of one dtype (float32/bfloat16/float16/float64), bias (V,) or None,
    labels (B, T) int64/int32 aligned with hidden. The logits are never materialized: the vocabulary is
    processed chunk_size rows at a time (None: chosen from the shapes, see `default_chunk_size`). Returns
    float32 (float64 for float64), differentiable with respect to hidden, weight and bias.
    """
    weight, bias, hidden = _autocast_inputs(weight, bias, hidden)
    check_linear(weight, bias)
    check_hidden_and_labels(hidden, labels, weight, ignore_index=ignore_index, check_values=False)
    chunk_size = check_chunk_size(chunk_size)
    check_label_values(labels, weight.shape[0], ignore_index=ignore_index)
    (logps,) = FusedLinearSequenceLogps.apply(weight, bias, ignore_index, chunk_size, hidden, labels)
    return logps


def fused_linear_focal_po_loss(chosen_hidden: torch.Tensor, rejected_hidden: torch.Tensor, weight: torch.Tensor,
                               chosen_labels: torch.Tensor, rejected_labels: torch.Tensor,
                               ref_chosen_logps: torch.Tensor | None = None,
                               ref_rejected_logps: torch.Tensor | None = None,
                               *, bias: torch.Tensor | None = None, beta: float = 0.1, gamma: float = 0.05,
                               ignore_index: int = -100, reduction: str = "mean", detach_focal_weight: bool = False,
                               chunk_size: int | None = None) -> PreferenceLossOutput:
    """`focal_po_loss` on the logits hidden · Wᵀ + bias, without ever materializing them.

    chosen_hidden (B, T, H) and rejected_hidden (B, T2, H): final hidden states aligned with chosen_labels
    (B, T) and rejected_labels (B, T2) (shift before calling: `hidden[:, :-1]` with `labels[:, 1:]`).
    weight (V, H) the lm_head weight, bias (V,) or None. chunk_size: vocabulary rows per chunk (None: from
    the shapes). The other arguments and the output are those of `focal_po_loss`; gradients reach both
    hidden states, the weight and the bias.
    """
    weight, bias, chosen_hidden, rejected_hidden = _autocast_inputs(weight, bias, chosen_hidden, rejected_hidden)
    check_linear(weight, bias)
    check_hidden_and_labels(chosen_hidden, chosen_labels, weight, hidden_name="chosen_hidden",
                            labels_name="chosen_labels", ignore_index=ignore_index, check_values=False)
    check_hidden_and_labels(rejected_hidden, rejected_labels, weight, hidden_name="rejected_hidden",
                            labels_name="rejected_labels", ignore_index=ignore_index, check_values=False)
    check_pair_shapes(chosen_hidden.shape, rejected_hidden.shape, chosen_hidden.device, rejected_hidden.device,
                      what="hidden")
    check_reference_logps(ref_chosen_logps, ref_rejected_logps, chosen_hidden.shape[0], chosen_hidden.device,
                          what="hidden states")
    check_loss_options(beta=beta, gamma=gamma, reduction=reduction, detach_focal_weight=detach_focal_weight)
    chunk_size = check_chunk_size(chunk_size)
    check_labels_in_range([(chosen_labels, "chosen_labels"), (rejected_labels, "rejected_labels")],
                          weight.shape[0], ignore_index=ignore_index)
    chosen_logps, rejected_logps = FusedLinearSequenceLogps.apply(
        weight, bias, ignore_index, chunk_size, chosen_hidden, chosen_labels, rejected_hidden, rejected_labels)
    return preference_output(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                             beta=beta, gamma=gamma, reduction=reduction, detach_focal_weight=detach_focal_weight)


class FusedLinearFocalPOLoss(PreferenceLossModule):
    """Module form of `fused_linear_focal_po_loss`: the options at construction, the tensors (the lm_head's
    weight and bias included) at call."""

    def __init__(self, *, beta: float = 0.1, gamma: float = 0.05, ignore_index: int = -100,
                 reduction: str = "mean", detach_focal_weight: bool = False, chunk_size: int | None = None):
        super().__init__(beta=beta, gamma=gamma, ignore_index=ignore_index, reduction=reduction,
                         detach_focal_weight=detach_focal_weight, chunk_size=chunk_size)

    def forward(self, chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                ref_chosen_logps=None, ref_rejected_logps=None, bias=None) -> PreferenceLossOutput:
        return fused_linear_focal_po_loss(chosen_hidden, rejected_hidden, weight, chosen_labels, rejected_labels,
                                          ref_chosen_logps, ref_rejected_logps, bias=bias, **self.options)
