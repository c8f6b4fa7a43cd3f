"""The hidden-state path's autograd Function: per-token log-probs from hidden states and the lm_head weight,
never materializing logits.

    raw[n, v]    = hidden[n] · W[v] (+ bias[v])        for the scored tokens n (label ≠ ignore_index)
    x[n, v]      = transform(raw[n, v])                 scale, soft-cap, temperature (kernels/logit_transform.py)
    logp_n       = x[n, y_n] − logsumexp_v x[n, v]

Forward   the scored rows of every group (chosen and rejected, say) are gathered into one (N, H) matrix
          (scored_rows.py; ignored tokens cost no FLOPs). One operator (ops.linear_forward) walks the
          vocabulary in chunks (vocab_chunks.py): a GEMM gives each chunk's raw logits, the chunk_lse_update
          kernel folds them into a running max / sum of exponentials per token, picks up the label's logit and,
          on request, TRL's statistics (entropy, log Σ p², mean logit, top-1). Per-token values are scattered
          into zero flat B·T tensors (LinearTokenLogps says why flat).
Backward  with g_n the incoming gradient of token n's log-prob, one operator (ops.linear_backward) recomputes
          each chunk and the chunk_logits_grad kernel overwrites it with
              G = g_n · (1[v = y_n] − exp((x − m_n) − s_n)) · dx/draw
          (m_n the row's max and s_n = log Σ_v exp(x − m_n) kept apart: no rounding of a large lse to float32
          before the subtraction); then
              grad_W[v0:v1] = Gᵀ · hidden   (one GEMM written straight into that slice of grad_W)
              grad_b[v0:v1] = Σ_n G
              grad_hidden  += G · W[v0:v1]   (into an (N, H) float32 buffer, float64 for float64)
          and grad_hidden is scattered back into zero (B, T, H) gradients in the hidden states' dtype.

A frozen weight (no gradient for W or b: LoRA, adapters) takes 2 GEMMs instead of 4: the forward walk also
accumulates d logp / d hidden (vocab_chunks.py), saved as one (N, H) float32 tensor, and the backward only
scales its rows. `memory_budget` keeps the first chunks' logits from the forward, so the backward skips
their recompute (3 GEMMs for those chunks).

Compaction (gathering only the scored rows) needs their number on the host: one synchronization. While
torch.compile traces or a CUDA graph is captured, every row is processed instead, the ignored ones zeroed
(their gradient scale is 0, so they contribute exactly nothing): same results, more FLOPs.

Memory: besides the inputs and the gradients themselves, one chunk of logits (N × chunk), the gathered rows
(N × H), in the backward the float32 grad_hidden buffer (N × H) and O(N) per-token values; nothing scales
with V. The gathered rows are freed before the hidden-state gradients are allocated, and those are filled
from the float32 buffer without a temporary of their size. Only the inputs, the row index, the int64 labels
of those rows and each row's max and log-sum-exp (O(tokens)) are saved for the backward, plus, for a frozen
weight, the (N, H) float32 d logp / d row, and, with memory_budget, the kept chunks of logits.

The chunk GEMMs run in the inputs' dtype with autocast off, forward and backward (cuBLAS accumulates in
float32 and rounds its output to bfloat16 / float16), so the logits the kernels see are exactly what
`hidden @ W.T` gives and the backward recomputes exactly the forward's; the kernels then compute in float32.
grad_W and grad_b are each written once per slice by a GEMM / reduction that accumulates in float32: no
low-precision running sum across chunks. All groups share one walk over the vocabulary, so every chunk of W
is read once per pass and grad_W is written once.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..first_order import first_order_only
from . import ops
from .scored_rows import gather_rows, hidden_gradients, masked_rows, scored_positions
from .vocab_chunks import default_chunk_size


class LinearOptions(NamedTuple):
    ignore_index: int
    chunk_size: int | None         # None: `default_chunk_size` of the rows actually projected
    params: torch.Tensor | None    # (scale, softcap, 1 / temperature) in the compute dtype, or None
    has_softcap: bool
    stats: tuple                  # names from ops.STATS
    compact: bool                 # gather the scored rows (eager) or process every row (compile / capture)
    frozen: bool = False          # no weight or bias gradient: accumulate d logp / d hidden in the forward
    memory_budget: int = 0        # bytes of chunk logits to keep from the forward for the backward


def row_values(state, vocab, row_labels, stats):
    """(per-row log-sum-exp, [per-row log-probs (NaN for a label outside [0, V)), then the requested
    statistics]) from the final state."""
    row_max, running_sum, target = state[0], state[1], state[2]
    log_sum_exp = torch.log(running_sum)
    in_range = (row_labels >= 0) & (row_labels < vocab)
    values = [torch.where(in_range, (target - row_max) - log_sum_exp, math.nan)]
    named = dict(zip(ops.STATE_NAMES, state))
    for stat in stats:
        if stat == "entropy":
            values.append(log_sum_exp - named["wsum"] / running_sum)
        elif stat == "log_sum_sq_probs":
            values.append(torch.log(named["sqsum"]) - 2 * log_sum_exp)
        elif stat == "mean_logits":
            values.append(named["xsum"] / vocab)
        else:  # is_top1: the label is the first maximum (never for a label outside the vocabulary), and the
            # row's log-softmax is defined: a NaN or +inf logit makes the sum NaN (whether or not the GPU's
            # max kept the NaN), every logit −inf fails the comparisons.
            values.append(in_range & (target >= row_max) & (target > named["before"]) & ~running_sum.isnan())
    return log_sum_exp, values


class LinearTokenLogps(torch.autograd.Function):
    """(weight, bias, options, hidden_1, labels_1, hidden_2, labels_2, ..., None) → for each group, its
    B_k·T_k token log-probs followed by one B_k·T_k tensor per requested statistic (not differentiable), all
    flat: the caller views them as (B_k, T_k). Inputs are assumed checked.

    Flat outputs keep torch.compile's automatic dynamic shapes working: dynamo's traced backward took T_k
    from the incoming gradient's stride (B_k, T_k) → T_k, which a reduction's expanded gradient, stride
    (1, 0), does not have (torch 2.13). A flat gradient has no such stride; its view's backward makes it
    contiguous."""

    @staticmethod
    def forward(ctx, weight, bias, options, *hidden_and_labels):
        # The caller appends a None: with one group, five arguments would match the five parameters (varargs
        # counted once), which dynamo takes, in a no-grad call, for a forward without ctx.
        hiddens, labels = hidden_and_labels[0:-1:2], hidden_and_labels[1:-1:2]
        scored = [lab != options.ignore_index for lab in labels]
        if options.compact:
            positions = [scored_positions(mask) for mask in scored]
            rows = gather_rows(hiddens, positions)
        else:
            positions = [None] * len(hiddens)
            rows = masked_rows(hiddens, scored)
        row_labels = _pick(labels, positions, scored, fill=0).to(torch.int64)
        # (a chunk_size wider than V is one chunk of V columns: so the memory budget counts it, and buffers fit)
        chunk_size = min(options.chunk_size or default_chunk_size(rows.shape[0], weight.shape[0], weight.shape[1],
                                                                  weight.element_size()), weight.shape[0])
        keep_chunks = min(options.memory_budget // (max(rows.shape[0], 1) * chunk_size * rows.element_size()),
                          weight.shape[0] // chunk_size)
        *state, unit, kept = ops.linear_forward(rows, weight, bias, row_labels, options.params, options.has_softcap,
                                                0, chunk_size, ",".join(options.stats), options.frozen, keep_chunks)
        del rows
        log_sum_exp, values = row_values(state, weight.shape[0], row_labels, options.stats)

        outputs = []
        for group in range(len(hiddens)):
            for value in values:
                outputs.append(_scatter(value, group, positions, scored))
        ctx.save_for_backward(weight, bias, state[0], log_sum_exp, row_labels, unit, kept, *hiddens, *labels,
                              *(index for index in positions if index is not None))
        ctx.options = options
        ctx.chunk_size = chunk_size
        ctx.groups = len(hiddens)
        ctx.per_group = len(values)
        ctx.mark_non_differentiable(*(out for k, out in enumerate(outputs) if k % len(values)))
        return tuple(outputs)

    @staticmethod
    @first_order_only
    def backward(ctx, *grad_outputs):
        options, groups = ctx.options, ctx.groups
        weight, bias, row_max, log_sum_exp, row_labels, unit, kept, *rest = ctx.saved_tensors
        hiddens, labels = rest[:groups], rest[groups:2 * groups]
        positions = list(rest[2 * groups:]) if options.compact else [None] * groups
        scored = [lab != options.ignore_index for lab in labels]
        grads = [grad if grad is not None else torch.zeros(label.numel(), dtype=row_max.dtype,
                                                            device=row_max.device)
                 for grad, label in zip(grad_outputs[0::ctx.per_group], labels)]
        grad_scale = _pick([grad.to(row_max.dtype) for grad in grads], positions, scored, fill=0)
        needs_hidden = [ctx.needs_input_grad[3 + 2 * k] for k in range(groups)]
        if options.frozen:  # d logp / d row was accumulated in the forward: only scale the rows
            grad_rows, grad_weight, grad_bias = grad_scale[:, None] * unit, None, None
        else:
            if weight.dim() != 2:  # the forward checked it (V, H): ZeRO-3 swapped its data for a placeholder since
                raise RuntimeError(
                    f"the lm_head weight saved for the backward is now of shape {tuple(weight.shape)}, not (V, H): "
                    "DeepSpeed ZeRO-3 re-partitioned it after the forward. Compute the loss inside the forward of "
                    "the module the DeepSpeed engine wraps (DeepSpeed keeps a weight read there gathered through "
                    "its backward), or gather it for the backward too."
                )
            rows = gather_rows(hiddens, positions) if options.compact else masked_rows(hiddens, scored)
            grad_rows, grad_weight, grad_bias = ops.linear_backward(
                rows, weight, bias, row_labels, row_max, log_sum_exp, grad_scale, options.params,
                options.has_softcap, 0, ctx.chunk_size, any(needs_hidden), ctx.needs_input_grad[0],
                ctx.needs_input_grad[1], kept if kept.numel() else None)
            del rows  # before the hidden-state gradients exist: the two never share the peak
        grad_hiddens = hidden_gradients(hiddens, positions, needs_hidden, grad_rows)
        return (grad_weight if ctx.needs_input_grad[0] else None, grad_bias if ctx.needs_input_grad[1] else None,
                None, *(g for grad in grad_hiddens for g in (grad, None)), None)


def _pick(per_token, positions, scored, fill):
    """The rows' values of per-token tensors ((B_k, T_k) or flat), stacked in row order: the scored positions
    (compact), or every token with the ignored ones set to `fill`."""
    if positions[0] is not None:
        return torch.cat([values.reshape(-1)[index] for values, index in zip(per_token, positions)])
    return torch.cat([torch.where(mask.reshape(-1), values.reshape(-1), fill)
                      for values, mask in zip(per_token, scored)])


def _scatter(row_values, group, positions, scored):
    """Group `group`'s flat B·T per-token tensor from per-row values, zero (False) at ignored tokens."""
    start = sum(mask.numel() if index is None else index.numel()
                for index, mask in zip(positions[:group], scored[:group]))
    index, mask = positions[group], scored[group]
    count = mask.numel() if index is None else index.numel()
    mine = row_values[start:start + count]
    if index is None:
        return torch.where(mask.reshape(-1), mine, torch.zeros((), dtype=mine.dtype, device=mine.device))
    out = torch.zeros(mask.numel(), dtype=mine.dtype, device=mine.device)
    out.index_copy_(0, index, mine)
    return out
