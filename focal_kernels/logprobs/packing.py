"""Batch layouts: padded (B, T) sequences, or packed sequences told apart by `cu_seqlens`.

Padded     logits (B, T, V) / hidden (B, T, H), labels (B, T): sequence b is row b.
Packed     logits (N, V) or (1, N, V) / hidden (N, H) or (1, N, H), labels (N,) or (1, N), and cu_seqlens
           (S + 1,) int32 / int64 on their device (the flash-attention varlen convention): sequence s is
           tokens [cu_seqlens[s], cu_seqlens[s + 1]). An empty sequence has log-prob 0 and count 0.

Both become one (B, T) token grid (packed: B = 1, T = N, a view, no copy), so every kernel sees one layout,
and the per-sequence sums are one segmented reduction over its flattened tokens: padded, segments of T
tokens (computed in the kernel, no offsets tensor); packed, the segments cu_seqlens names. Labels must
already be shifted per sequence (`shift_packed_labels`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import backend
from ..checks import check_cu_seqlens, check_ignore_index, refuse_dtensor
from . import ops


class Layout(NamedTuple):
    """The token grid's shape, the segment offsets (S + 1,) on the device (packed; None when padded: sequence
    b is row b), and whether it came packed (a field, not a property: torch 2.10's dynamo does not trace a
    NamedTuple's properties; build it with `layout_of`)."""

    batch: int
    seq_len: int
    offsets: Optional[torch.Tensor]
    packed: bool

    def broadcast(self, per_sequence: torch.Tensor) -> torch.Tensor:
        """(S,) per-sequence values → (B, T), each token holding its sequence's value (padded: an expanded
        view with time stride 0, no copy; packed: one gather)."""
        if not self.packed:
            return per_sequence[:, None].expand(self.batch, self.seq_len)
        sequences = self.offsets.shape[0] - 1
        if sequences == 0:
            return per_sequence.new_zeros((1, self.seq_len))
        ids, inside = token_segments(self.offsets, self.seq_len)
        values = per_sequence[ids.clamp(max=sequences - 1)]
        return torch.where(inside, values, 0).view(1, self.seq_len)


def token_segments(offsets: torch.Tensor, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """((tokens,) the sequence of each packed token (int64; S for a token past offsets[S]), (tokens,) whether
    it lies in [offsets[0], offsets[S]): tokens outside (unvalidated cu_seqlens) belong to no sequence, as in
    the segment-sum kernel. No host synchronization."""
    positions = torch.arange(tokens, device=offsets.device, dtype=offsets.dtype)
    ids = torch.searchsorted(offsets[1:], positions, right=True)
    return ids, (ids < offsets.shape[0] - 1) & (positions >= offsets[0])


def packed_sums(token_values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(S,) sums of the packed tokens' values over their sequences, in PyTorch (the CPU path without the
    kernels). Unvalidated cu_seqlens that start above 0 or end below N leave the tokens outside out, as the
    kernel does; decreasing ones give unspecified sums (the kernel sums overlapping ranges). Never an
    out-of-range index."""
    flat = token_values.reshape(-1)
    sequences = offsets.shape[0] - 1
    ids, inside = token_segments(offsets, flat.shape[0])
    return flat.new_zeros(sequences + 1).index_add(0, torch.where(inside, ids, sequences), flat)[:sequences]


def layout_of(batch, seq_len, cu_seqlens) -> Layout:
    return Layout(batch, seq_len, cu_seqlens, cu_seqlens is not None)


class SegmentSum(torch.autograd.Function):
    """token values (B, T) → per-sequence sums (S,) through the deterministic segment_sum kernel; the
    backward broadcasts each sequence's gradient to its tokens (Layout.broadcast)."""

    @staticmethod
    def forward(ctx, token_values, offsets, batch, seq_len):
        # The grid's shape travels as a zero-stride tensor of that shape (no memory), not as ints on ctx:
        # under torch.compile with dynamic shapes, sizes kept on ctx belong to the forward's graph and broke
        # the backward's ("does not belong to this Graph").
        ctx.save_for_backward(offsets, token_values.new_empty(()).expand(batch, seq_len))
        (sums,) = ops.segment_sum(token_values.reshape(-1), offsets, [batch], [seq_len])
        return sums

    @staticmethod
    def backward(ctx, grad_sums):
        offsets, grid = ctx.saved_tensors
        return layout_of(*grid.shape, offsets).broadcast(grad_sums), None, None, None


def sum_per_sequence(token_values, layout, like):
    """(S,) per-sequence sums of (B, T) token values: the deterministic segment kernel (`like` on a device
    that runs the kernels), or PyTorch."""
    if not backend.use_triton(like):
        return token_values.sum(-1) if not layout.packed else packed_sums(token_values, layout.offsets)
    return SegmentSum.apply(token_values.contiguous(), layout.offsets, layout.batch, layout.seq_len)


def per_sequence(token_values, labels, cu_seqlens, like, ignore_index, return_token_counts):
    """The common tail of every log-prob entry: (B, T) token log-probs on the grid `as_token_grid` made
    → (S,) sums, and with return_token_counts the (S,) int64 scored-token counts too."""
    layout = layout_of(labels.shape[0], labels.shape[1], cu_seqlens)
    sums = sum_per_sequence(token_values, layout, like)
    return (sums, token_counts(labels, layout, ignore_index)) if return_token_counts else sums


def as_token_grid(values, labels, cu_seqlens, *, values_name, labels_name, last_dim):
    """(values as (B, T, last), labels as (B, T), cu_seqlens contiguous or None). Padded inputs come back
    as they are; packed ones become (1, N, ...) views.

    Shapes are checked here; the cu_seqlens values are checked with the labels (`checks.check_labels_in_range`,
    one device read)."""
    if cu_seqlens is None:
        if isinstance(values, torch.Tensor) and values.dim() != 3:
            raise ValueError(f"{values_name} must have shape (B, T, {last_dim}) (or, packed with cu_seqlens, "
                             f"(N, {last_dim}) or (1, N, {last_dim})), got {tuple(values.shape)}")
        return values, labels, None
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{values_name} must be a torch.Tensor, got {type(values).__name__}")
    check_cu_seqlens(cu_seqlens, values)
    given = tuple(values.shape)
    if values.dim() == 3:
        if values.shape[0] != 1:
            raise ValueError(f"packed {values_name} (with cu_seqlens) must have shape (N, {last_dim}) or "
                             f"(1, N, {last_dim}), got {tuple(values.shape)}")
        values = values[0]
    if values.dim() != 2:
        raise ValueError(f"packed {values_name} (with cu_seqlens) must have shape (N, {last_dim}) or "
                         f"(1, N, {last_dim}), got {tuple(values.shape)}")
    if isinstance(labels, torch.Tensor) and labels.dim() == 2 and labels.shape[0] == 1:
        labels = labels[0]
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"packed {labels_name} (with cu_seqlens) must have shape (N,) or (1, N), got {shape}")
    if labels.shape[0] != values.shape[0]:
        raise ValueError(f"packed {labels_name} must have N = {values.shape[0]} tokens, one per row of {values_name} "
                         f"(shape {given}), got {labels.shape[0]}")
    return values[None], labels[None], cu_seqlens.contiguous()  # the segment-sum kernel reads it unstrided


def token_counts(labels: torch.Tensor, layout: Layout, ignore_index: int) -> torch.Tensor:
    """(S,) int64 scored tokens per sequence (no host synchronization)."""
    scored = (labels != ignore_index).to(torch.int64)
    if not layout.packed:
        return scored.sum(dim=1)
    running = torch.cat([scored.new_zeros(1), scored.reshape(-1).cumsum(0)])
    offsets = layout.offsets.to(torch.int64)
    # Unvalidated offsets are clamped as the segment-sum kernel clamps them: start into [0, N], stop into
    # [start, N]. The counts then describe the very segments that were summed, and nothing is read out of bounds.
    start = offsets[:-1].clamp(0, scored.numel())
    stop = torch.minimum(torch.maximum(offsets[1:], start), torch.full_like(start, scored.numel()))
    return running[stop] - running[start]


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(S + 1,) int32 cu_seqlens of packed sequences whose position ids restart at 0 ((N,) or (1, N)).

    Eager only: the number of sequences depends on the values, so this reads them (one synchronization) and
    is not for use inside torch.compile or CUDA-graph capture; compute cu_seqlens in the data loader there.
    """
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError("position_ids must be an int32 or int64 tensor of shape (N,) or (1, N)")
    refuse_dtensor(position_ids, "position_ids")
    if position_ids.device.type == "meta":
        raise ValueError("position_ids is a meta tensor: cu_seqlens_from_position_ids reads the values (its output "
                         "length depends on them), which a meta tensor does not hold")
    if position_ids.dim() == 2 and position_ids.shape[0] == 1:
        position_ids = position_ids[0]
    if position_ids.dim() != 1:
        raise ValueError(f"position_ids must have shape (N,) or (1, N), got {tuple(position_ids.shape)}")
    tokens = position_ids.shape[0]
    starts = (position_ids == 0).nonzero().squeeze(1)
    if tokens and (starts.numel() == 0 or int(starts[0]) != 0):
        raise ValueError("position_ids must start a sequence at 0 (the first position id must be 0)")
    end = torch.tensor([tokens], device=position_ids.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)


def shift_packed_labels(input_ids: torch.Tensor, cu_seqlens: torch.Tensor, ignore_index: int = -100,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token labels for packed sequences, shifted within each sequence, never across a boundary.

    Token i's label is labels[i + 1] (default input_ids[i + 1]) when i + 1 lies in the same sequence, and
    ignore_index at each sequence's last token. (N,) or (1, N) in (labels, when given, of input_ids' shape),
    the same shape out; no synchronization, so the cu_seqlens values are not read (the log-prob functions
    check them).
    """
    if not isinstance(input_ids, torch.Tensor):  # (read for its shape only when labels are given)
        raise TypeError(f"input_ids must be a torch.Tensor of shape (N,) or (1, N), got {type(input_ids).__name__}")
    refuse_dtensor(input_ids, "input_ids")
    source = input_ids if labels is None else labels
    name = "input_ids" if labels is None else "labels"
    if not isinstance(source, torch.Tensor) or source.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32 or int64 tensor of shape (N,) or (1, N)")
    refuse_dtensor(source, name)
    if not (source.dim() == 1 or (source.dim() == 2 and source.shape[0] == 1)):
        raise ValueError(f"{name} must have shape (N,) or (1, N), got {tuple(source.shape)}")
    if labels is not None and tuple(input_ids.shape) != tuple(labels.shape):
        raise ValueError(f"labels must have the shape of input_ids, got {tuple(labels.shape)} and "
                         f"{tuple(input_ids.shape)}")
    check_ignore_index(ignore_index, source, name)
    check_cu_seqlens(cu_seqlens, source)
    flat = source.reshape(-1)
    shifted = torch.full_like(flat, ignore_index)
    if flat.shape[0] == 0:
        return shifted.view(source.shape)
    shifted[:-1] = flat[1:]
    # Each sequence's last token; an empty sequence names the last token before it (or, first, token N − 1),
    # which is some sequence's last token too.
    last = (cu_seqlens[1:].to(torch.int64) - 1) % flat.shape[0]
    shifted.index_fill_(0, last, ignore_index)
    return shifted.view(source.shape)
