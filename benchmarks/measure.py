"""Timing one implementation on one shape: forward, backward, forward+backward and peak memory. Both
benchmarks (logits path, hidden-state path) measure every implementation through `measure` below.

What each phase times:
  fwd      the loss with autograd recording, as in training (the graph is built, then dropped).
  fwd+bwd  the loss, then torch.autograd.grad(loss, x.grad_inputs) (the logits; or the hidden states and,
           unless frozen, the weight). autograd.grad
           returns fresh gradients instead of accumulating into .grad, so repeats do not add the extra
           read-modify-write of an accumulation that a single training step never pays.
  bwd      for implementations that leave their inputs alone: one graph per input set is built once,
           untimed, and its backward re-run with retain_graph=True. Nothing a backward computes depends
           on an earlier backward of the same graph (it only reads the saved tensors), so each repeat
           does exactly the work of the one backward of a training step. An implementation that refuses
           a retained graph (torch.compile donates saved buffers to its backward) gets the "fresh_graph"
           method instead: before every timed backward a new graph is built, untimed.
For implementations that overwrite their logits (ours with inplace_backward, Liger's forward), every
timed call gets a private copy refilled from the next pristine input set first, untimed; bwd uses
the fresh_graph method.

The warm-up's gradients are kept as a digest (`gradient_digest`: a norm and random projections per group
of inputs), which runner.compare_with_ours compares with ours': a baseline timed on a wrong gradient is
flagged, not only one with a wrong loss.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch

from .environment import is_out_of_memory, release_memory, synchronize
from .inputs import refill, work_copy
from .timing import peak_extra_bytes

PHASES = ("fwd", "bwd", "fwdbwd")


@dataclass
class Measurement:
    fwd_ms: float | None           # None: that phase was not asked for
    bwd_ms: float | None
    fwdbwd_ms: float | None
    bwd_method: str | None         # "retain_graph" or "fresh_graph" (None: bwd not timed)
    bwd_note: str
    peak_extra_bytes: int | None
    loss: float
    warmup_s: float
    grad_digest: dict              # gradient_digest of the warm-up's gradients


# Elements of a gradient turned into float32 at a time by gradient_digest (never a whole vocabulary-sized copy).
_DIGEST_CHUNK_ELEMENTS = 1 << 23
# Random projections per gradient group. Their RMS misses an error of relative size ε (the tolerance being
# 2e-2) with probability P(chi_k / sqrt(k) < 2e-2 / ε): with k = 16, 2e-9 at ε = 10% and 6e-5 at 5% (with
# one projection: 16% and 31%).
_DIGEST_PROBES = 16


def gradient_digest(named_grads, chunk_elements=_DIGEST_CHUNK_ELEMENTS) -> dict:
    """{group: [norm, projection_1, ..., projection_k]} of gradients given as (group, tensor) pairs, in order.

    A group's rows are every index but the last, numbered on through the group's tensors (chosen's rows,
    then rejected's: the order of a concatenation of the two), its columns the last index (a 0-D or 1-D
    gradient is one column). norm is the Frobenius norm; projection_i the sum of g[r, c] · R_i[r] · C_i[c]
    over the group, R_i and C_i fixed standard normal vectors. All are the same however a group is split
    into tensors, so a row that concatenates chosen and rejected compares with ours. For an error e, each
    projection's error has mean square ||e||^2, so the RMS over the k projections of an error is about ||e||
    (gradient_rel_diff): a sign, a scale, a permutation, a wrong row move it by about the gradient's own norm,
    bf16 rounding by about its own size. Accumulated in float64 from float32 blocks of at most chunk_elements;
    run once, untimed (warm-up)."""
    parts = {}
    for group, grad in named_grads:
        parts.setdefault(group, []).append(grad if grad.dim() >= 2 else grad.reshape(-1, 1))
    digest = {}
    for group, grads in parts.items():
        device, cols = grads[0].device, grads[0].shape[-1]
        if any(g.shape[-1] != cols for g in grads):
            raise ValueError(f"gradient_digest: the {group!r} gradients' last dimensions differ")
        gen = torch.Generator(device=device)
        gen.manual_seed(0)
        col_probes = torch.randn((cols, _DIGEST_PROBES), generator=gen, device=device)
        row_probes = torch.randn((sum(math.prod(g.shape[:-1]) for g in grads), _DIGEST_PROBES), generator=gen,
                                 device=device)
        square = torch.zeros((), dtype=torch.float64, device=device)
        projections = torch.zeros(_DIGEST_PROBES, dtype=torch.float64, device=device)
        offset = 0
        for grad in grads:
            for block in _row_blocks(grad, max(1, chunk_elements // max(cols, 1))):
                block = block.float()
                flat = block.reshape(-1)
                square += torch.dot(flat, flat).double()
                rows = row_probes[offset:offset + len(block)]
                projections += ((block @ col_probes) * rows).sum(0, dtype=torch.float64)
                offset += len(block)
        digest[group] = [float(square.sqrt()), *projections.tolist()]
    return digest


def _row_blocks(grad, rows_per_block):
    """A gradient of two or more dimensions as 2-D views (rows, last dimension) of at most rows_per_block
    rows, in row order, never copied whole (an expanded or strided one is walked along its leading indices)."""
    if grad.dim() > 2:
        try:
            grad = grad.view(-1, grad.shape[-1])
        except RuntimeError:  # not viewable as 2-D: one leading index at a time
            for part in grad.unbind(0):
                yield from _row_blocks(part, rows_per_block)
            return
    for start in range(0, grad.shape[0], rows_per_block):
        yield grad[start:start + rows_per_block]


def gradient_rel_diff(digest: dict | None, ours: dict | None) -> float | None:
    """Over the groups both digests have, the larger of the norm's difference and the RMS of the projections'
    differences from ours', relative to ours' norm (about ||e|| / ||g_ours|| for an error e). NaN where any
    figure is not finite (ours' included: a NaN or inf gradient is never called equal); None: nothing to
    compare."""
    shared = sorted((digest or {}).keys() & (ours or {}).keys())
    if not shared:
        return None
    worst = 0.0
    for group in shared:
        mine, theirs = ours[group], digest[group]
        if not all(math.isfinite(x) for x in (*mine, *theirs)):
            return math.nan
        projections = [a - b for a, b in zip(theirs[1:], mine[1:])]
        difference = max(abs(theirs[0] - mine[0]), math.sqrt(sum(d * d for d in projections) / len(projections)))
        if mine[0] > 0:
            worst = max(worst, difference / mine[0])
        elif difference > 0:
            return math.inf
    return worst


def digest_is_finite(digest: dict | None) -> bool:
    """Whether every figure of a gradient digest is finite (no NaN or inf in the gradients it digests)."""
    return all(math.isfinite(x) for figures in (digest or {}).values() for x in figures)


def _grads(loss, inputs, retain_graph=False):
    return torch.autograd.grad(loss, inputs, retain_graph=retain_graph)


def measure(impl, sets, timer, device, phases=PHASES) -> Measurement:
    """Warm-up call, peak memory of one fwd+bwd, then the median of each phase in `phases`.

    `timer.for_step(ms of that one fwd+bwd)` gives the timer used (a fixed call count for long steps).
    Implementations that overwrite their inputs get a private copy refilled from the next set before every
    timed call (logits path only: inputs.work_copy)."""
    sets = [impl.inputs(x) for x in sets]
    work = work_copy(sets[0]) if impl.overwrites_inputs else None

    def take(source):
        return source if work is None else refill(work, source)

    def step(x):
        return _grads(impl.loss(x), x.grad_inputs)

    started = time.perf_counter()
    first = take(sets[0])
    loss = impl.loss(first)  # warm-up: JIT / torch.compile / cuBLAS heuristics happen here, untimed
    loss_value = float(loss.detach())
    digest = gradient_digest(zip(first.grad_groups, _grads(loss, first.grad_inputs)))
    del loss
    synchronize(device)
    warmup_s = time.perf_counter() - started

    started = time.perf_counter()
    first = take(sets[0])
    peak = peak_extra_bytes(device, lambda: step(first))
    timer = timer.for_step((time.perf_counter() - started) * 1e3)
    rotation = itertools.cycle(sets)

    def timed(fn):
        if work is None:
            return timer.median_ms(lambda: fn(next(rotation)))
        return timer.median_ms_with_setup(lambda: take(next(rotation)), fn)

    fwd = timed(impl.loss) if "fwd" in phases else None
    fwdbwd = timed(step) if "fwdbwd" in phases else None
    bwd, method, note = _backward_ms(impl, sets, timer, take, work is None) if "bwd" in phases else (None, None, "")
    return Measurement(fwd, bwd, fwdbwd, method, note, peak, loss_value, warmup_s, digest)


def _backward_ms(impl, sets, timer, take, shared: bool):
    """(ms, method, note): retain_graph re-runs when the implementation allows them, else fresh graphs."""
    note = ""
    if shared:
        try:
            return _backward_on_retained_graphs(impl, sets, timer), "retain_graph", ""
        except Exception as exc:
            if is_out_of_memory(exc):
                raise
            text = str(exc).strip().splitlines()
            note = f"retain_graph refused ({type(exc).__name__}: {text[0][:100] if text else ''})"
        release_memory()  # the retained graphs died with the exception's traceback
    return _backward_on_fresh_graphs(impl, sets, timer, take), "fresh_graph", note


def _backward_on_retained_graphs(impl, sets, timer):
    """Median of backwards re-run, with retain_graph=True, on one graph per input set built once."""
    graphs = [(impl.loss(x), x.grad_inputs) for x in sets]
    rotation = itertools.cycle(graphs)

    def backward():
        loss, inputs = next(rotation)
        return _grads(loss, inputs, retain_graph=True)

    return timer.median_ms(backward)


def _backward_on_fresh_graphs(impl, sets, timer, take):
    """Median of single backwards, each on a graph built (untimed) just before it."""
    rotation = itertools.cycle(sets)

    def fresh_graph():
        x = take(next(rotation))
        return impl.loss(x), x.grad_inputs

    return timer.median_ms_with_setup(fresh_graph, lambda graph: _grads(*graph))
