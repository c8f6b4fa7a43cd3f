"""The hidden-state path's row bookkeeping: which tokens are projected, and how their gradients return.

Eager: only tokens whose label is not ignore_index are projected. Their hidden states (from every group,
any batch and time strides) are gathered into one (N, H) matrix, so that ignored tokens cost no GEMM FLOPs;
their gradients, accumulated as (N, H) float32 rows, are scattered back into zero (B, T, H) gradients in the
hidden states' dtype. Counting the scored rows reads the labels (one synchronization), so under
torch.compile or CUDA-graph capture every token is a row instead, the ignored ones zeroed (`masked_rows`).
"""

from __future__ import annotations

import torch


def scored_positions(scored):
    """Flat indices t + T·b of the scored tokens (a (B, T) bool mask), ascending."""
    return scored.reshape(-1).nonzero().squeeze(1)


def sequence_of_rows(positions, seq_len):
    """The sequence b of each flat position t + T·b."""
    return torch.div(positions, max(seq_len, 1), rounding_mode="floor")


def gather_rows(hiddens, positions):
    """The scored rows of every hidden tensor, stacked in order into one (N, H) tensor."""
    first = hiddens[0]
    total_rows = sum(index.numel() for index in positions)
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


def masked_rows(hiddens, scored):
    """Every token of every hidden tensor as one (ΣB·T, H) tensor, the ignored tokens' rows zeroed (so that
    nothing they hold, NaN included, reaches a result)."""
    return torch.cat([torch.where(mask[..., None], hidden, 0).reshape(-1, hidden.shape[2])
                      for hidden, mask in zip(hiddens, scored)])


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


def hidden_gradients(hiddens, positions, needs_hidden, grad_rows):
    """The (B_k, T_k, H) gradient of each hidden tensor that needs one (None for the others), from the
    float32 rows of all groups stacked in order (positions None: every token is a row)."""
    grads, start = [], 0
    for hidden, index, needed in zip(hiddens, positions, needs_hidden):
        count = hidden.shape[0] * hidden.shape[1] if index is None else index.numel()
        grad_hidden = None
        if needed:
            mine = grad_rows[start:start + count]
            if index is None:
                grad_hidden = mine.view(hidden.shape).to(hidden.dtype)
            else:
                grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                scatter_rows(grad_hidden, index, mine)
        grads.append(grad_hidden)
        start += count
    return grads
