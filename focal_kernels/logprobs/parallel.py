"""Log-probs beyond one GPU on torch.distributed: a vocabulary split over ranks (tensor parallelism of the
lm_head), and sequences split over ranks (context parallelism).

Vocabulary-parallel (`vocab_parallel_sequence_logps`, `vocab_parallel_fused_linear_sequence_logps`, and per
token with statistics `vocab_parallel_fused_linear_token_logps`)
    Each rank of `group` holds a contiguous slice of the vocabulary, the slices in rank order (rank r holds
    ids [v_r, v_r + V_r), v_r = V_0 + ... + V_{r-1}; sizes may differ between ranks, as torch.chunk or an
    uneven ColwiseParallel lm_head leaves them): logits (B, T, V_r), or the lm_head weight (V_r, H) and bias
    (V_r,). Labels are global ids and the same on every rank, as are the hidden states of the second form.
    Forward   each rank computes, per token, its slice's max m_r, s_r = log Σ_{v in slice} exp(x − m_r) and
              the label's logit where the label falls in its slice (else 0) with the single-GPU kernels
              (token_logps in WRITE_TARGET mode; the hidden path's chunked walk); then two all-reduces of
              O(tokens) floats combine them:  m = max_r m_r (MAX),  Σ_r exp(s_r + m_r − m) and the target
              (one SUM of two floats per token);  log p(y) = target − m − log Σ.  Every rank returns the same
              log-probs. Nothing vocabulary-sized crosses the network. Per-token statistics (entropy, mean
              logit, first argmax, log Σ p²) combine the slices' running sums the same way
              (`_whole_vocabulary_state`: one more SUM and one MAX).
    Backward  the logits' gradient g·(1[v = y] − exp((x − m) − s)) needs only the global m and s, which every
              rank already holds: no communication. The hidden path's rank computes its weight / bias slices'
              gradients and a partial hidden-state gradient (its slice's share of G·W), all-reduced (SUM) so
              that every rank returns the full hidden-state gradient (as ColwiseParallel's input does).
    Labels outside [0, Σ_r V_r) raise ValueError (validate_labels), or give NaN. Inputs that disagree between
    ranks (token or sequence counts, dtypes, labels, cu_seqlens, ignore_index, the logit options, whether there
    is a bias, whether the hidden states need a gradient, the hidden states' bits) raise the same ValueError
    on every rank, from one all_gather of a few integers per rank (and one host read) per call: never a hang
    (logprobs/agreement.py).
    A rank whose own inputs fail a check (any exception, the callers' own checks included) raises its error
    and the other ranks raise `RankFailed` naming it (through the sequence-parallel group too, when both are
    used). The fused losses add a digest of their own arguments (options, reference log-probs, pair_weights)
    to the comparison. The hidden states are compared through a digest of their bits (kernels/bits_digest.py:
    one read of them per call, one int64 in the all_gather), so that hidden states that differ between ranks
    (dropout with a per-rank seed, a rank's stale batch) raise instead of mixing into wrong log-probs.

Sequence (context) parallel (`sequence_parallel_sum`)
    Each rank holds a contiguous slice of every sequence's tokens (padded: (B, T_r, ...); packed: its own
    cu_seqlens with the same number of sequences, some possibly empty). Compute the per-sequence log-probs
    (and token counts) of the local tokens as usual, then `sequence_parallel_sum(values, group)` all-reduces
    them (SUM) before the loss. Its backward passes the gradient through unchanged: every rank computes the
    same loss from the same sums, so each rank's tokens receive the full dℓ/dlogp exactly once.

    Gradients of shared weights (the lm_head, the whole model): each context rank's gradient holds only its
    own tokens' share, so the full gradient is their SUM over the context group. With data parallelism on top:
      - reduce the gradients SUM over the context group and MEAN over the data-parallel group; or
      - with one gradient all-reduce over the whole data × context mesh (DDP / FSDP over all D·C ranks,
        which AVERAGE): multiply the loss (or the gradients) by the context size C, since the mesh average
        is (1 / (D·C)) Σ while the wanted value is (1 / D) Σ.
    Token-local gradients (logits, hidden states) need nothing: each rank's slice of them is already exact.

Both at once: `sequence_parallel_sum(vocab_parallel_sequence_logps(..., group=tp), cp)`.

`dtensor_vocab_logits(logits)` takes logits as a DTensor sharded on the vocabulary dimension (a
ColwiseParallel lm_head with use_local_output=False) and returns (local logits, process group).

The group may be a ProcessGroup or a one-dimensional DeviceMesh. Every call reads the ranks' gathered checks
(and the vocabulary offsets) on the host: under torch.compile that read runs eagerly, a graph break
(fullgraph=True refuses these calls, saying so); inside CUDA-graph capture they raise a RuntimeError.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch

from .. import backend
from ..checks import (check_chunk_size, check_flag, check_hidden_and_labels, check_linear, check_logits_and_labels,
                      is_dtensor)
from ..dtypes import compute_dtype
from ..first_order import first_order_only
from . import ops
from .agreement import (DTYPE_CODES, SP_MAX_DIMS, RankFailed, agree_sum_layout, check_group, dtype_code, float_bits,
                        gather_layout, mesh_group, torch_distributed)
from .linear import (TokenLogps, agreed_on_mesh, autocast_dtype_for, autocast_inputs, cast_dtype,
                     check_logit_transform, check_memory_budget, gathered_params, stat_names, token_grid,
                     transform_params)
from .linear_autograd import row_values
from .logits import unit_stride_logits
from .packing import as_token_grid, per_sequence
from .scored_rows import masked_rows
from .vocab_chunks import default_chunk_size

__all__ = ["RankFailed", "dtensor_vocab_logits", "sequence_parallel_sum", "vocab_parallel_fused_linear_sequence_logps",
           "vocab_parallel_fused_linear_token_logps", "vocab_parallel_sequence_logps"]


# ------------------------------------------------------------------ combining the slices' statistics

def _combine(row_max, log_sum_exp, target, labels, ignore_index, vocab_total, group):
    """Global (max, s = log Σ_all exp(x − max), token log-probs, the summed (Σ_all exp(x − max), label logit))
    from every rank's slice statistics: one MAX all-reduce of 1 float and one SUM all-reduce of 2 floats per
    token. The max and s of an ignored token stay those of whatever its row held (the hidden path projects it as
    a zeroed row: its bias's logits), so that the backward's exp(x − max − s) is at most 1 there too."""
    dist = torch_distributed()
    scored = labels != ignore_index
    # A slice whose row is all -inf (sum 0) must not pull the max up: its max takes no part.
    empty = log_sum_exp == -math.inf
    global_max = torch.where(empty, -math.inf, row_max)
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    global_max = torch.where(global_max == -math.inf, 0.0, global_max)
    sums = torch.stack([torch.exp(log_sum_exp + (row_max - global_max)), target])
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    log_sum = torch.log(sums[0])
    in_range = scored & (labels >= 0) & (labels < vocab_total)
    logps = torch.where(in_range, (sums[1] - global_max) - log_sum, math.nan)
    return global_max, log_sum, torch.where(scored, logps, 0.0), sums


def _whole_vocabulary_state(state, stats, global_max, sums, group):
    """The chunk walk's final state (ops.STATE_NAMES) over the whole vocabulary, from every rank's state of its
    slice (running max m_r, sum_r = Σ e^(x − m_r), wsum_r = Σ e^(x − m_r)(x − m_r), sqsum_r = Σ e^(2(x − m_r)),
    xsum_r = Σ x, before_r = the max over the slice's columns before the label) and `_combine`'s global max m
    and summed (Σ e^(x − m), label logit). With d_r = m_r − m: Σ e^(x − m)(x − m) = Σ_r e^(d_r)(wsum_r +
    d_r·sum_r), Σ e^(2(x − m)) = Σ_r e^(2 d_r) sqsum_r, Σ x adds, the before-maxima take their MAX: one SUM
    and one MAX all-reduce, of what `stats` needs only. `linear_autograd.row_values` then reads the statistics
    from it as on one rank."""
    dist = torch_distributed()
    named = dict(zip(ops.STATE_NAMES, state))
    held = named["sum"] > 0  # a slice whose logits are all -inf adds nothing
    shift = torch.where(held, named["max"] - global_max, 0.0)
    scale = torch.where(held, torch.exp(shift), 0.0)
    local = {"wsum": lambda: scale * (named["wsum"] + shift * named["sum"]),
             "sqsum": lambda: scale * scale * named["sqsum"], "xsum": lambda: named["xsum"]}
    # stats come in STATS' order (`stat_names`) and the ranks agreed on them: the same stack on every rank
    summed = [ops.STATE_OF_STAT[stat] for stat in stats if ops.STATE_OF_STAT[stat] in local]
    whole = {"max": global_max, "sum": sums[0], "target": sums[1]}
    if summed:
        stacked = torch.stack([local[name]() for name in summed])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
        whole.update(zip(summed, stacked))
    if "is_top1" in stats:
        whole["before"] = named["before"].clone()
        dist.all_reduce(whole["before"], op=dist.ReduceOp.MAX, group=group)
    return [whole.get(name, named[name]) for name in ops.STATE_NAMES]


def _local_stats_torch(logits, labels, ignore_index, vocab_start):
    """PyTorch twin of the token_logps kernel in WRITE_TARGET mode: (target or 0, row max, log-sum-exp)."""
    acc = compute_dtype(logits.dtype)
    scored = labels != ignore_index
    x = torch.where(scored[..., None], logits, 0).to(acc)
    row_max = x.amax(dim=-1)
    row_max = torch.where(row_max == -math.inf, 0.0, row_max)
    log_sum_exp = torch.log(torch.exp(x - row_max[..., None]).sum(dim=-1))
    local = labels.to(torch.int64) - vocab_start
    in_slice = scored & (local >= 0) & (local < logits.shape[-1])
    target = x.gather(-1, torch.where(in_slice, local, 0)[..., None])[..., 0]
    zero = torch.zeros((), dtype=acc, device=x.device)
    return (torch.where(in_slice, target, zero), torch.where(scored, row_max, zero),
            torch.where(scored, log_sum_exp, zero))


def _logits_grad_torch(logits, labels, row_max, log_sum_exp, grad_tokens, ignore_index, vocab_start):
    acc = row_max.dtype
    scored = labels != ignore_index
    x = torch.where(scored[..., None], logits, 0).to(acc)
    probs = torch.exp((x - row_max[..., None]) - log_sum_exp[..., None])
    columns = torch.arange(vocab_start, vocab_start + logits.shape[-1], device=logits.device)
    one_hot = (columns == labels.to(torch.int64)[..., None]).to(acc)
    grad = torch.where(scored[..., None], grad_tokens[..., None] * (one_hot - probs), 0.0)
    return grad.to(logits.dtype)


class _Slice(NamedTuple):
    ignore_index: int
    vocab_start: int
    vocab_total: int
    group: object
    kernels: bool


class VocabParallelTokenLogps(torch.autograd.Function):
    """(this rank's logits (B, T, V_r), global labels (B, T), _Slice) → (B, T) token log-probs over the whole
    vocabulary (the same on every rank), 0 at ignored tokens. Backward: no communication."""

    @staticmethod
    def forward(ctx, logits, labels, where):
        if where.kernels:
            target, row_max, log_sum_exp = ops.token_logps([logits], [labels], where.ignore_index,
                                                           where.vocab_start, True)
        else:
            target, row_max, log_sum_exp = _local_stats_torch(logits, labels, where.ignore_index, where.vocab_start)
        global_max, log_sum, logps, _ = _combine(row_max, log_sum_exp, target, labels, where.ignore_index,
                                                 where.vocab_total, where.group)
        ctx.save_for_backward(logits, labels, global_max, log_sum)
        ctx.where = where
        return logps

    @staticmethod
    @first_order_only
    def backward(ctx, grad_tokens):
        logits, labels, global_max, log_sum = ctx.saved_tensors
        where = ctx.where
        grad_tokens = grad_tokens.to(global_max.dtype)
        if where.kernels:
            (grad,) = ops.logits_grad([logits], [labels], global_max, log_sum, [grad_tokens], where.ignore_index,
                                      where.vocab_start)
        else:
            grad = _logits_grad_torch(logits, labels, global_max, log_sum, grad_tokens, where.ignore_index,
                                      where.vocab_start)
        return grad, None, None


class _LinearSlice(NamedTuple):
    ignore_index: int
    vocab_start: int
    vocab_total: int
    group: object
    chunk_size: int
    params: torch.Tensor | None
    has_softcap: bool
    stats: tuple = ()


class VocabParallelLinearTokenLogps(torch.autograd.Function):
    """(hidden (B, T, H), this rank's weight (V_r, H), bias (V_r,) or None, global labels (B, T), _LinearSlice)
    → B·T token log-probs, flat (the same on every rank; flat for torch.compile, see LinearTokenLogps), then
    one B·T tensor per requested statistic (`_whole_vocabulary_state`; not differentiable). Every token is a row
    (ignored ones zeroed). Backward: this rank's weight / bias slice gradients, and the hidden-state gradient
    all-reduced (SUM)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, where):
        scored = labels != where.ignore_index
        rows = masked_rows([hidden], [scored])
        row_labels = torch.where(scored, labels, -1).reshape(-1).to(torch.int64)
        state = ops.linear_forward(rows, weight, bias, row_labels, where.params, where.has_softcap,
                                   where.vocab_start, where.chunk_size, ",".join(where.stats))
        del rows
        row_max, running_sum, target = state[0], state[1], state[2]
        flat_labels = labels.reshape(-1)
        global_max, log_sum, logps, sums = _combine(row_max, torch.log(running_sum), target, flat_labels,
                                                    where.ignore_index, where.vocab_total, where.group)
        stats = []
        if where.stats:
            whole = _whole_vocabulary_state(state, where.stats, global_max, sums, where.group)
            scored = flat_labels != where.ignore_index
            stats = [torch.where(scored, value, torch.zeros((), dtype=value.dtype, device=value.device))
                     for value in row_values(whole, where.vocab_total, flat_labels, where.stats)[1][1:]]
        ctx.save_for_backward(hidden, weight, bias, labels, global_max, log_sum)
        ctx.where = where
        ctx.mark_non_differentiable(*stats)
        return (logps, *stats)

    @staticmethod
    @first_order_only
    def backward(ctx, grad_tokens, *_):
        hidden, weight, bias, labels, global_max, log_sum = ctx.saved_tensors
        where = ctx.where
        scored = labels != where.ignore_index
        rows = masked_rows([hidden], [scored])
        row_labels = torch.where(scored, labels, -1).reshape(-1).to(torch.int64)
        grad_scale = torch.where(scored.reshape(-1), grad_tokens.to(global_max.dtype), 0.0)
        needs_hidden, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_bias = bias is not None and ctx.needs_input_grad[2]
        grad_rows, grad_weight, grad_bias = ops.linear_backward(
            rows, weight, bias, row_labels, global_max, log_sum, grad_scale, where.params, where.has_softcap,
            where.vocab_start, where.chunk_size, needs_hidden, needs_weight, needs_bias)
        del rows
        grad_hidden = None
        if needs_hidden:
            dist = torch_distributed()
            dist.all_reduce(grad_rows, op=dist.ReduceOp.SUM, group=where.group)
            grad_hidden = grad_rows.view(hidden.shape).to(hidden.dtype)
        return (grad_hidden, grad_weight if needs_weight else None, grad_bias if needs_bias else None, None, None)


# ------------------------------------------------------------------ DTensor inputs

def _same_ranks(group, sharded_group, name):
    """`group` when it has the ranks (in order) of the mesh group `name` is sharded over; else ValueError."""
    dist = torch_distributed()
    given, sharded = dist.get_process_group_ranks(group), dist.get_process_group_ranks(sharded_group)
    if given != sharded:
        raise ValueError(f"{name} is a DTensor sharded over global ranks {sharded}, but vocab_parallel_group has "
                         f"ranks {given}; pass the group of the mesh dimension that shards the vocabulary")
    return group


def vocab_shard(tensor, name, group):
    """A weight / bias DTensor as this rank's vocabulary slice (to_local(), differentiable), after checking
    that it really is one: Shard(0) over exactly the ranks of `group` (Replicate on other mesh dimensions).
    A replicated DTensor would hold the whole vocabulary on every rank, and taking it as a slice would count
    every entry world-size times. Plain tensors pass unchanged (the caller's promise)."""
    if not is_dtensor(tensor):
        return tensor
    placements = tuple(tensor.placements)
    vocab_dims = [i for i, p in enumerate(placements) if p.is_shard() and p.dim % tensor.dim() == 0]
    others = [p for i, p in enumerate(placements) if i not in vocab_dims and not p.is_replicate()]
    if len(vocab_dims) != 1 or others:
        raise ValueError(f"{name} is a DTensor with placements {placements}; with vocab_parallel_group it must be "
                         "sharded on its vocabulary dimension 0, Shard(0), over one mesh dimension (Replicate on any "
                         "other), as ColwiseParallel shards the lm_head")
    _same_ranks(group, mesh_group(tensor.device_mesh, vocab_dims[0], name), name)
    return tensor.to_local()


def replicated_hidden(hidden):
    """Hidden states as a DTensor must be replicated (every rank of the vocabulary-parallel group scores the
    same tokens): taken as to_local(), whose gradient (all-reduced, the same on every rank) is a replicated
    one. Anything else passes unchanged (the checks refuse other DTensors)."""
    if is_dtensor(hidden) and not all(p.is_replicate() for p in hidden.placements):
        raise ValueError(f"hidden is a DTensor with placements {tuple(hidden.placements)}; the vocabulary-parallel "
                         "path needs the same hidden states on every rank of the group: pass "
                         "hidden.redistribute(placements=[Replicate()] * mesh.ndim), as ColwiseParallel's input "
                         "layout does (or hidden.to_local() when each rank's local tokens are the ones its "
                         "vocabulary-parallel group shares)")
    return hidden.to_local() if is_dtensor(hidden) else hidden


# ------------------------------------------------------------------ entry points

def dtensor_vocab_logits(logits):
    """(local logits, ProcessGroup) of a DTensor sharded on its last (vocabulary) dimension, e.g. the output of
    a ColwiseParallel lm_head with use_local_output=False: `Shard(2)` or `Shard(-1)` on exactly one mesh
    dimension, Replicate on any other. The local tensor is differentiable (to_local): its gradient returns
    to the DTensor with the same placements."""
    from torch.distributed.tensor import DTensor
    if not isinstance(logits, DTensor):
        raise TypeError(f"logits must be a DTensor sharded on the vocabulary dimension, got "
                        f"{type(logits).__name__}")
    ndim = logits.dim()
    vocab_dims = []
    for mesh_dim, placement in enumerate(logits.placements):
        if placement.is_shard():
            if placement.dim % ndim != ndim - 1:
                raise ValueError(f"logits is a DTensor sharded on dimension {placement.dim} (placements "
                                 f"{tuple(logits.placements)}); vocabulary-parallel log-probs need it sharded on the "
                                 f"last (vocabulary) dimension only, Shard({ndim - 1}) or Shard(-1), e.g. from a "
                                 "ColwiseParallel lm_head with use_local_output=False")
            vocab_dims.append(mesh_dim)
        elif placement.is_partial():
            raise ValueError(f"logits is a DTensor with a pending reduction (placements {tuple(logits.placements)});"
                             " redistribute it to Shard(-1) on the vocabulary dimension first")
    if not vocab_dims:
        raise ValueError(f"logits is a replicated DTensor (placements {tuple(logits.placements)}): every rank holds "
                         "the whole vocabulary, so use fk.sequence_logps(logits.to_local(), ...) instead of the "
                         "vocabulary-parallel path")
    if len(vocab_dims) > 1:
        raise ValueError(f"logits is a DTensor whose vocabulary is sharded over {len(vocab_dims)} mesh dimensions "
                         f"(placements {tuple(logits.placements)}); only one is supported")
    return logits.to_local(), mesh_group(logits.device_mesh, vocab_dims[0], "logits")


def vocab_parallel_sequence_logps(logits, labels, ignore_index: int = -100, *, group=None, cu_seqlens=None,
                                  return_token_counts: bool = False, validate_labels: bool = True):
    """`fk.sequence_logps` with the vocabulary split over the ranks of `group` (see the module docstring).

    logits: this rank's slice (B, T, V_r) (packed: (N, V_r) or (1, N, V_r) with cu_seqlens), or a DTensor
    sharded on the vocabulary (then group may be None: the DTensor's). labels: global ids, identical on every
    rank. Returns the (B,) or (S,) log-probs, the same on every rank, differentiable with respect to this
    rank's logits; with return_token_counts=True, `(logps, counts)`. Must be called by every rank of the
    group (it communicates).
    """
    return _vocab_parallel_sequence_logps(logits, labels, ignore_index, group=group, cu_seqlens=cu_seqlens,
                                          return_token_counts=return_token_counts, validate_labels=validate_labels)


def _vocab_parallel_sequence_logps(logits, labels, ignore_index, *, group, cu_seqlens, return_token_counts,
                                   validate_labels, more_checks=None, agree_on=(0, 0), names=("logits", "labels"),
                                   group_name="group", layout=None):
    """vocab_parallel_sequence_logps, with more_checks() (the caller's own argument checks) run among this
    rank's checks, before the agreement: an error there raises on every rank of the group; agree_on: two
    ints (or 0-dim integer tensors) of the caller's that must be equal on every rank; names: the logits'
    and labels' names in the errors, group_name the group's (its checks run inside a sequence-parallel
    caller's agreement); layout: a list that receives the agreed VocabLayout."""
    if is_dtensor(logits):  # its mesh's group (checked there), or the given group, which must have its ranks
        logits, sharded_over = dtensor_vocab_logits(logits)
        group = sharded_over if group is None else _same_ranks(check_group(group, group_name), sharded_over, "logits")
    else:
        group = check_group(group, group_name)
    what = "vocab_parallel_sequence_logps"
    error = None
    try:
        logits, labels, cu_seqlens = as_token_grid(logits, labels, cu_seqlens, values_name=names[0],
                                                   labels_name=names[1], last_dim="V")
        check_logits_and_labels(logits, labels, logits_name=names[0], labels_name=names[1],
                                ignore_index=ignore_index)
        check_flag(return_token_counts, "return_token_counts")
        check_flag(validate_labels, "validate_labels")
        if more_checks is not None:
            more_checks()
    except Exception as exc:  # any error: the other ranks must hear of it
        error = exc
    tensor = logits if isinstance(logits, torch.Tensor) else None
    shape = (0, 0, 0) if error is not None else tuple(logits.shape)
    agreed = gather_layout(
        group, what, tensor, error, vocab=shape[2], batch=shape[0], seq_len=shape[1], cu_seqlens=cu_seqlens,
        hidden=-1, dtype=None if error is not None else logits.dtype, needs_grad=False, labels=labels,
        ignore_index=ignore_index, validate_labels=validate_labels, agree_on=agree_on, names=names,
        token_counts=return_token_counts)
    if layout is not None:
        layout.append(agreed)
    kernels = backend.use_triton(logits)
    if kernels:
        logits = unit_stride_logits(logits)
    where = _Slice(int(ignore_index), agreed.start, agreed.total, group, kernels)
    token_logps = VocabParallelTokenLogps.apply(logits, labels, where)
    return per_sequence(token_logps, labels, cu_seqlens, logits, ignore_index, return_token_counts)


def vocab_parallel_fused_linear_sequence_logps(hidden, weight, labels, bias=None, ignore_index: int = -100, *,
                                               group, cu_seqlens=None, return_token_counts: bool = False,
                                               chunk_size: int | None = None, logit_softcap: float | None = None,
                                               logit_scale: float = 1.0, temperature: float = 1.0,
                                               validate_labels: bool = True):
    """`fk.fused_linear_sequence_logps` with the lm_head's vocabulary split over the ranks of `group`.

    weight (V_r, H) and bias (V_r,) or None: this rank's rows of the lm_head, slices in rank order (or DTensors
    Shard(0) over `group`). hidden (B, T, H) (packed: (N, H) or (1, N, H) with cu_seqlens; or a replicated
    DTensor) and labels (global ids): the same on every rank.
    Returns the (B,) or (S,) log-probs, the same on every rank, differentiable with respect to hidden (the
    full gradient on every rank), this rank's weight and bias slices. Every token is projected (no
    compaction of the scored ones). Must be called by every rank of the group.
    """
    return _vocab_parallel_fused_linear_sequence_logps(
        hidden, weight, labels, bias, ignore_index, group=group, cu_seqlens=cu_seqlens,
        return_token_counts=return_token_counts, chunk_size=chunk_size, logit_softcap=logit_softcap,
        logit_scale=logit_scale, temperature=temperature, validate_labels=validate_labels)


def _vocab_parallel_fused_linear_sequence_logps(hidden, weight, labels, bias, ignore_index, *, group, cu_seqlens,
                                                return_token_counts, chunk_size, logit_softcap, logit_scale,
                                                temperature, validate_labels, more_checks=None, agree_on=(0, 0),
                                                names=("hidden", "labels"), group_name="group", layout=None):
    """vocab_parallel_fused_linear_sequence_logps, with more_checks(), agree_on, names and layout as in
    `_vocab_parallel_sequence_logps`."""
    def checks():
        check_flag(return_token_counts, "return_token_counts")
        if more_checks is not None:
            more_checks()

    (token_logps,), labels, cu_seqlens, weight = _vocab_parallel_linear_tokens(
        hidden, weight, labels, bias, ignore_index, group=group, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        logit_softcap=logit_softcap, logit_scale=logit_scale, temperature=temperature,
        validate_labels=validate_labels, stats=None, more_checks=checks, agree_on=agree_on, names=names,
        group_name=group_name, what="vocab_parallel_fused_linear_sequence_logps", token_counts=return_token_counts,
        layout=layout)
    return per_sequence(token_logps.view(labels.shape), labels, cu_seqlens, weight, ignore_index,
                        return_token_counts)


def vocab_parallel_fused_linear_token_logps(hidden, weight, labels, bias=None, ignore_index: int = -100, *, group,
                                            stats=(), chunk_size: int | None = None,
                                            logit_softcap: float | None = None, logit_scale: float = 1.0,
                                            temperature: float = 1.0, validate_labels: bool = True,
                                            memory_budget=None):
    """`fk.fused_linear_token_logps` with the lm_head's vocabulary split over the ranks of `group` (weight,
    bias, hidden and labels as for `vocab_parallel_fused_linear_sequence_logps`; hidden (B, T, H) with labels
    (B, T), or (N, H) / (1, N, H) with (N,) / (1, N)). Returns `TokenLogps` shaped like the labels, the same on
    every rank: the log-probs, differentiable, and the requested `stats` over the whole vocabulary (their
    slices' running statistics combined across the ranks: two more all-reduces of O(tokens)). memory_budget:
    None or 0 only (no logits are kept here). Must be called by every rank of the group."""
    names = []

    def checks():
        check_memory_budget(memory_budget)
        if memory_budget:
            raise ValueError(f"memory_budget is not supported with vocab_parallel_group (got {memory_budget!r}; "
                             "None or 0 keeps no logits)")
        names.extend(stat_names(stats))

    outputs, grid_labels, _, _ = _vocab_parallel_linear_tokens(
        hidden, weight, labels, bias, ignore_index, group=group, cu_seqlens=None, chunk_size=chunk_size,
        logit_softcap=logit_softcap, logit_scale=logit_scale, temperature=temperature,
        validate_labels=validate_labels, stats=names, more_checks=checks,
        what="vocab_parallel_fused_linear_token_logps", per_token=True)
    shape = labels.shape if isinstance(labels, torch.Tensor) else grid_labels.shape
    return TokenLogps(**dict(zip(("log_probs", *names), (out.view(shape) for out in outputs))))


def _vocab_parallel_linear_tokens(hidden, weight, labels, bias, ignore_index, *, group, cu_seqlens, chunk_size,
                                  logit_softcap, logit_scale, temperature, validate_labels, stats, more_checks,
                                  what, agree_on=(0, 0), names=("hidden", "labels"), group_name="group",
                                  token_counts=False, layout=None, per_token=False):
    """The checked, agreed call of VocabParallelLinearTokenLogps: (flat token log-probs and `stats`, the labels
    and cu_seqlens on the token grid, this rank's weight slice). per_token: hidden and labels as the
    token-level call takes them (put on the grid by `token_grid`, among the checks). stats: None (the
    per-sequence callers, whose `agree_on` is agreed), or the token-level call's list of statistics, which
    more_checks() may fill (it runs among this rank's checks, so that its errors raise on every rank) and which
    every rank must share.
    token_counts: whether the per-sequence caller returns token counts (agreed); layout: as in
    `_vocab_parallel_sequence_logps`."""
    group = check_group(group, group_name)
    error = None
    try:
        weight, bias = (vocab_shard(t, name, group) for t, name in ((weight, "weight"), (bias, "bias")))
        hidden = replicated_hidden(hidden)
        if per_token:
            hidden, labels = token_grid(hidden, labels, *names)
        check_flag(validate_labels, "validate_labels")
        hidden, labels, cu_seqlens = as_token_grid(hidden, labels, cu_seqlens, values_name=names[0],
                                                   labels_name=names[1], last_dim="H")
        weight, bias, hidden = autocast_inputs(weight, bias, hidden)
        check_linear(weight, bias)
        check_hidden_and_labels(hidden, labels, weight, hidden_name=names[0], labels_name=names[1],
                                ignore_index=ignore_index)
        chunk_size = check_chunk_size(chunk_size)
        check_logit_transform(logit_softcap, logit_scale, temperature)
        if more_checks is not None:
            more_checks()
    except Exception as exc:  # any error: the other ranks must hear of it
        error = exc
    tensor = weight if isinstance(weight, torch.Tensor) else None
    ok = error is None
    agreed = gather_layout(
        group, what, tensor, error, vocab=weight.shape[0] if ok else 0, batch=hidden.shape[0] if ok else 0,
        seq_len=hidden.shape[1] if ok else 0, cu_seqlens=cu_seqlens, hidden=hidden.shape[2] if ok else 0,
        dtype=hidden.dtype if ok else None, needs_grad=ok and hidden.requires_grad and torch.is_grad_enabled(),
        labels=labels,
        ignore_index=ignore_index, validate_labels=validate_labels, has_bias=bias is not None,
        options=(logit_softcap, logit_scale, temperature) if ok else (1.0, 1.0, 1.0),
        # the token-level call: every rank must request the same statistics (their all-reduces must match)
        agree_on=(sum(1 << ops.STATS.index(name) for name in stats), 0) if stats is not None else agree_on,
        agree_on_name="stats" if stats is not None else None, names=names, hidden_values=hidden if ok else None,
        token_counts=token_counts)
    if layout is not None:
        layout.append(agreed)
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0] * hidden.shape[1], weight.shape[0], weight.shape[1],
                                        weight.element_size())
    params, has_softcap = transform_params(weight, logit_softcap, logit_scale, temperature)
    where = _LinearSlice(int(ignore_index), agreed.start, agreed.total, group, chunk_size, params, has_softcap,
                         tuple(stats or ()))
    return VocabParallelLinearTokenLogps.apply(hidden, weight, bias, labels, where), labels, cu_seqlens, weight


class _SumOverRanks(torch.autograd.Function):
    """Forward: all-reduce (SUM) over the group. Backward: identity (every rank computes the same loss from
    the same sums, so each rank's own terms get dℓ/dsum once; torch.distributed.nn's all_reduce would sum the
    ranks' gradients instead, making them world-size times too large)."""

    @staticmethod
    def forward(ctx, values, group):
        dist = torch_distributed()
        out = values.clone(memory_format=torch.contiguous_format)  # the collective sums storage, in this order
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        # A fresh copy, not the tensor the collective wrote: under torch.compile with torch 2.11, returning
        # the all-reduced tensor itself gave a zero gradient (values right); 2.13 and 2.14 were not affected.
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sequence_parallel_sum(per_sequence_values, group):
    """Context parallelism: the SUM over the ranks of `group` of per-sequence values computed from each rank's
    slice of every sequence's tokens (log-probs, token counts): a tensor of at most 11 dimensions (SP_MAX_DIMS),
    the same shape and dtype on every rank. Forward: one all-reduce (after one small all_gather checking the
    shapes and dtypes); backward: the gradient unchanged.
    See the module docstring for the data-parallel recipe. Must be called by every rank of the group."""
    group = check_group(group, "sequence_parallel_group", ordered=False)
    error = None
    if not isinstance(per_sequence_values, torch.Tensor):
        error = TypeError(f"per_sequence_values must be a torch.Tensor, got {type(per_sequence_values).__name__}")
    elif per_sequence_values.dtype not in DTYPE_CODES:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in DTYPE_CODES)
        error = TypeError(f"per_sequence_values must have one of the dtypes {names}, got {per_sequence_values.dtype}")
    elif per_sequence_values.dim() > SP_MAX_DIMS:  # the agreement compares this many sizes
        error = ValueError(f"per_sequence_values must have at most {SP_MAX_DIMS} dimensions, got shape "
                           f"{tuple(per_sequence_values.shape)}")
    return _agreed_sum(per_sequence_values, group, error, "sequence_parallel_sum")


def _agreed_sum(per_sequence_values, group, error, what, tags=()):
    """sequence_parallel_sum after its argument checks: the agreement round (`agree_sum_layout`: every rank
    raises when `error` is set on any rank; shapes, dtypes and the `tags` must agree), then the all-reduce."""
    agree_sum_layout(per_sequence_values, group, error, what, tags)
    if not (per_sequence_values.dtype.is_floating_point or per_sequence_values.dtype.is_complex):
        out = per_sequence_values.clone(memory_format=torch.contiguous_format)
        dist = torch_distributed()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out
    return _SumOverRanks.apply(per_sequence_values, group)


# ------------------------------------------------------------------ the public entry points' parallel branch

def _sequence_parallel(compute, group, return_token_counts, agree_on=(0, 0), shared=tuple,
                       what="sequence_parallel_sum"):
    """compute(), then its per-sequence values summed over the sequence-parallel group (when given). An error
    from compute on one rank (its own inputs' checks, or its vocabulary-parallel group's agreement) goes
    through the sequence-parallel group's agreement, so that every rank of the group raises instead of
    waiting in the collective; so does a return_token_counts, an `agree_on` or a `shared()` (at most
    9 ints, read once compute's checks passed) that differs between ranks. `what` names the caller
    in the errors."""
    if group is None:
        return compute()
    group = check_group(group, "sequence_parallel_group", ordered=False)
    try:
        out = compute()
    except Exception as exc:  # any error, so that the other ranks hear of it
        _agreed_sum(None, group, exc, what)  # raises on every rank of the group
        raise  # pragma: no cover (the agreement re-raises exc on this rank)
    tags = (int(bool(return_token_counts)), *agree_on, *shared())
    if return_token_counts:
        logps, counts = out
        return _agreed_sum(logps, group, None, what, tags), _agreed_sum(counts, group, None, what)
    return _agreed_sum(out, group, None, what, tags)


def parallel_sequence_logps(local, logits, labels, ignore_index, *, cu_seqlens, return_token_counts,
                            validate_labels, inplace_backward, vocab_parallel_group, sequence_parallel_group,
                            more_checks=None, agree_on=(0, 0), names=("logits", "labels")):
    """`fk.sequence_logps` with vocab_parallel_group / DTensor logits and / or sequence_parallel_group;
    `local` is the single-rank function (`local_sequence_logps`). The argument checks (inplace_backward, then
    more_checks(), the caller's own) run inside the groups' agreement, so that a bad argument on one rank
    raises on all; the caller's two `agree_on` ints are compared there too. names: the logits' and labels'
    names in the errors."""
    def checks():
        check_flag(inplace_backward, "inplace_backward")
        if inplace_backward:
            groups = (("vocab_parallel_group", vocab_parallel_group),
                      ("sequence_parallel_group", sequence_parallel_group))
            given = [name for name, value in groups if value is not None]
            raise ValueError(f"inplace_backward=True is not supported with {' and '.join(given) or 'DTensor logits'}")
        if more_checks is not None:
            more_checks()

    options = dict(cu_seqlens=cu_seqlens, return_token_counts=return_token_counts, validate_labels=validate_labels,
                   names=names)
    layout = []
    if vocab_parallel_group is not None or is_dtensor(logits):
        compute = partial(_vocab_parallel_sequence_logps, logits, labels, ignore_index, group=vocab_parallel_group,
                          more_checks=checks, agree_on=agree_on, group_name="vocab_parallel_group", layout=layout,
                          **options)
    else:
        compute = _checked(checks, partial(local, logits, labels, ignore_index, **options))

    def shared():  # what the ranks of a sequence-parallel group must share, besides the shapes
        return int(ignore_index), _vocabulary(layout, logits.shape[-1]), dtype_code(logits.dtype)

    return _sequence_parallel(compute, sequence_parallel_group, return_token_counts, agree_on, shared,
                              "sequence_logps (sequence-parallel)")


def parallel_fused_linear_sequence_logps(local, hidden, weight, labels, bias, ignore_index, *, cu_seqlens,
                                         return_token_counts, chunk_size, logit_softcap, logit_scale, temperature,
                                         validate_labels, memory_budget, vocab_parallel_group,
                                         sequence_parallel_group, more_checks=None, agree_on=(0, 0),
                                         names=("hidden", "labels")):
    """`fk.fused_linear_sequence_logps` with vocab_parallel_group and / or sequence_parallel_group; `local` is
    the single-rank function (`local_fused_linear_sequence_logps`). With vocab_parallel_group, a DTensor
    weight or bias must be sharded on the vocabulary over that group and is taken as this rank's slice
    (`vocab_shard`). The argument checks
    (memory_budget, then more_checks()) run inside the groups' agreement, and agree_on is compared there, as
    in `parallel_sequence_logps`; so are the names."""
    def checks():
        check_memory_budget(memory_budget)
        if memory_budget and vocab_parallel_group is not None:
            raise ValueError(f"memory_budget is not supported with vocab_parallel_group (got {memory_budget!r}; "
                             "None or 0 keeps no logits)")
        if more_checks is not None:
            more_checks()

    options = dict(cu_seqlens=cu_seqlens, return_token_counts=return_token_counts, chunk_size=chunk_size,
                   logit_softcap=logit_softcap, logit_scale=logit_scale, temperature=temperature,
                   validate_labels=validate_labels, names=names)
    layout = []
    if vocab_parallel_group is not None:
        compute = partial(_vocab_parallel_fused_linear_sequence_logps, hidden, weight, labels, bias, ignore_index,
                          group=vocab_parallel_group, more_checks=checks, agree_on=agree_on,
                          group_name="vocab_parallel_group", layout=layout, **options)
    else:  # DTensor parameters (FSDP2) gathered first on every rank, then the checks, agreed over their mesh
        weight, bias, mesh = gathered_params(weight, bias)
        compute = partial(agreed_on_mesh, mesh, _checked(checks, partial(
            local, hidden, weight, labels, bias, ignore_index, memory_budget=memory_budget, **options)))

    def shared():  # as in parallel_sequence_logps; the dtypes after autocast, as the vocabulary group agrees them
        autocast = autocast_dtype_for(weight)
        return (int(ignore_index), _vocabulary(layout, weight.shape[0]), weight.shape[1],
                dtype_code(cast_dtype(hidden, autocast)), dtype_code(cast_dtype(weight, autocast)),
                -1 if bias is None else dtype_code(cast_dtype(bias, autocast)),
                *(float_bits(v) for v in (logit_softcap, logit_scale, temperature)))

    return _sequence_parallel(compute, sequence_parallel_group, return_token_counts, agree_on, shared,
                              "fused_linear_sequence_logps (sequence-parallel)")


def _vocabulary(layout, size):
    """What sequence-parallel ranks compare of the vocabulary: its size V on one rank; with a vocabulary-parallel
    group (a 2-D mesh), the digest of that group's agreed slice sizes (`layout`: [VocabLayout]), not this rank's
    own V_r. The digest is the same on every rank of a vocabulary group, so a difference between two of them
    shows in every sequence-parallel group alike: every rank raises, none is left waiting for the others."""
    return layout[0].digest if layout else size


def _checked(checks, compute):
    """compute, preceded by checks() (both inside `_sequence_parallel`'s agreement)."""
    def run():
        checks()
        return compute()
    return run
