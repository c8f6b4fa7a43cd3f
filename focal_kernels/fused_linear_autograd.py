"""The hidden-state path's autograd Function: per-sequence log-probs from hidden states and the lm_head
weight, never materializing logits.

    logits[n, v] = hidden[n] · W[v] (+ bias[v])        for the N scored tokens n (label ≠ ignore_index)
    logp_b       = Σ_{n in b} (logits[n, y_n] − logsumexp_v logits[n, v])

Forward   the scored rows of chosen and rejected are gathered into one (N, H) matrix (scored_rows.py;
          ignored tokens cost no FLOPs). The vocabulary is walked in chunks [v0, v1) (vocab_chunks.py): one
          GEMM gives the (N, v1 − v0) logits, and the chunk_lse_update kernel folds them into a running max /
          sum of exponentials per token and picks up the label's logit when it falls in the chunk. Per-token
          log-probs are scattered into a zero (B, T) tensor and summed per sequence by the sequence_sum
          kernel (deterministic).
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

The Function runs its GEMMs with autocast off, forward and backward, so the backward recomputes exactly the
forward's logits (under autocast, fused_linear.py has already cast the inputs to the autocast dtype).

Chosen and rejected go through one autograd Function call, so every chunk of W is read once per pass and
grad_W is written once, instead of two weight-sized gradients being added by autograd.

Without Triton (a CPU without TRITON_INTERPRET=1) the same chunked Function runs with PyTorch versions of
the two per-chunk kernels (chunk_kernels.py): the same memory bound, the same results up to rounding.
"""

from __future__ import annotations

import math

import torch

from . import backend
from .chunk_kernels import chunk_kernels
from .first_order import first_order_only
from .reference import compute_dtype
from .scored_rows import gather_rows, hidden_gradients, scored_positions, sequence_of_rows
from .vocab_chunks import default_chunk_size, gradient_pass, logits_pass


def _autocast_off(device):
    """Inside the Function the GEMMs run in the inputs' dtype, forward and backward alike, whatever autocast
    state the backward happens to run in."""
    return torch.autocast(device_type=device.type, enabled=False)


class FusedLinearSequenceLogps(torch.autograd.Function):
    """(weight, bias, ignore_index, chunk_size, hidden_1, labels_1, hidden_2, labels_2, ...) → (logps_1, ...).

    Each hidden_k is (B_k, T_k, H) with labels_k (B_k, T_k); logps_k is (B_k,) in float32 (float64 for
    float64). All groups share one chunked pass over the vocabulary. Inputs are assumed checked.
    """

    @staticmethod
    def forward(ctx, weight, bias, ignore_index, chunk_size, *hidden_and_labels):
        hiddens, labels = hidden_and_labels[0::2], hidden_and_labels[1::2]
        use_triton = backend.use_triton(weight)
        chunk_lse_update, _, sequence_sum = chunk_kernels(use_triton)
        acc_dtype = compute_dtype(weight.dtype)
        device = weight.device
        vocab = weight.shape[0]

        positions = [scored_positions(lab, ignore_index) for lab in labels]
        total_rows = sum(index.numel() for index in positions)
        if chunk_size is None:
            chunk_size = default_chunk_size(total_rows, vocab, weight.shape[1], weight.element_size())
        hidden_rows = gather_rows(hiddens, positions, total_rows)
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

        grad_scale = torch.cat([grad.to(acc_dtype)[sequence_of_rows(index, hidden.shape[1])]
                                for grad, hidden, index in zip(grad_logps, hiddens, positions)])
        hidden_rows = gather_rows(hiddens, positions, total_rows)
        grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=device) if needs_weight else None
        grad_bias = torch.empty((vocab,), dtype=bias.dtype, device=device) if needs_bias else None
        grad_hidden_rows = None
        if any(needs_hidden):
            grad_hidden_rows = torch.zeros((total_rows, weight.shape[1]), dtype=acc_dtype, device=device)
        _, chunk_logits_grad_, _ = chunk_kernels(ctx.use_triton)

        with _autocast_off(device):
            gradient_pass(hidden_rows, weight, bias, ctx.chunk_size,
                          lambda logits_chunk, start: chunk_logits_grad_(logits_chunk, row_labels, start, row_max,
                                                                         log_sum_exp, grad_scale),
                          grad_weight, grad_bias, grad_hidden_rows)
        del hidden_rows  # before the hidden-state gradients exist: the two never share the peak

        grad_hiddens = hidden_gradients(hiddens, positions, needs_hidden, grad_hidden_rows)
        return (grad_weight, grad_bias, None, None, *(g for grad in grad_hiddens for g in (grad, None)))
