"""The hidden-state path's row bookkeeping: only tokens whose label is not ignore_index are projected.

Their hidden states (from the chosen and the rejected tensors, any batch and time strides) are gathered into
one (N, H) matrix, so that ignored tokens cost no GEMM FLOPs; their gradients, accumulated as (N, H) float32
rows, are scattered back into zero (B, T, H) gradients in the hidden states' dtype.
"""

from __future__ import annotations

import torch


def scored_positions(labels, ignore_index):
    """Flat indices t + T·b of the scored tokens, ascending."""
    return (labels != ignore_index).reshape(-1).nonzero().squeeze(1)


def sequence_of_rows(positions, seq_len):
    """The sequence b of each flat position t + T·b."""
    return torch.div(positions, max(seq_len, 1), rounding_mode="floor")


def gather_rows(hiddens, positions, total_rows):
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
            sequence = sequence_of_rows(index, seq_len)
            rows[start:stop] = hidden[sequence, index - sequence * seq_len]
        start = stop
    return rows


# Rows converted per step when scattering the float32 accumulator into a hidden-state gradient with gaps.
_SCATTER_ROWS = 4096


def scatter_rows(grad_hidden, index, rows):
    """grad_hidden (B, T, H), contiguous ← zeros, except rows (len(index), H), any float dtype, at the flat
    positions index (ascending and unique, as from `scored_positions`).

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
            scatter_rows(grad_hidden, index, grad_hidden_rows[start:start + index.numel()])
        grads.append(grad_hidden)
        start += index.numel()
    return grads
