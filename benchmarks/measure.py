"""Timing one implementation on one shape: forward, backward, forward+backward and peak memory.

What each phase times:
  fwd      the loss with autograd recording, as in training (the graph is built, then dropped).
  fwd+bwd  the loss, then torch.autograd.grad(loss, [chosen_logits, rejected_logits]). autograd.grad
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
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from .environment import is_out_of_memory, release_memory, synchronize
from .inputs import refill, work_copy
from .timing import peak_extra_bytes


@dataclass
class Measurement:
    fwd_ms: float
    bwd_ms: float
    fwdbwd_ms: float
    bwd_method: str      # "retain_graph" or "fresh_graph"
    bwd_note: str
    peak_extra_bytes: int | None
    loss: float
    warmup_s: float


def _grads(loss, inputs, retain_graph=False):
    return torch.autograd.grad(loss, inputs, retain_graph=retain_graph)


def measure(impl, sets, timer, device) -> Measurement:
    if impl.overwrites_inputs:
        return _measure_on_private_copy(impl, sets, timer, device)
    return _measure_shared(impl, sets, timer, device)


def _measure_shared(impl, sets, timer, device) -> Measurement:
    started = time.perf_counter()
    first = sets[0]
    loss = impl.loss(first)  # warm-up: JIT / torch.compile happen here, outside any timing
    loss_value = float(loss.detach())
    _grads(loss, first.grad_inputs)
    del loss
    synchronize(device)
    warmup_s = time.perf_counter() - started

    peak = peak_extra_bytes(device, lambda: _grads(impl.loss(first), first.grad_inputs))
    rotation = itertools.cycle(sets)
    fwd = timer.median_ms(lambda: impl.loss(next(rotation)))

    def step():
        x = next(rotation)
        return _grads(impl.loss(x), x.grad_inputs)

    fwdbwd = timer.median_ms(step)
    bwd, method, note = _backward_ms(impl, sets, timer)
    return Measurement(fwd, bwd, fwdbwd, method, note, peak, loss_value, warmup_s)


def _backward_ms(impl, sets, timer):
    """(ms, method, note): retain_graph re-runs when the implementation allows them, else fresh graphs."""
    try:
        return _backward_on_retained_graphs(impl, sets, timer), "retain_graph", ""
    except Exception as exc:
        if is_out_of_memory(exc):
            raise
        text = str(exc).strip().splitlines()
        note = f"retain_graph refused ({type(exc).__name__}: {text[0][:100] if text else ''})"
    release_memory()  # the retained graphs died with the exception's traceback
    return _backward_on_fresh_graphs(impl, sets, timer, lambda x: x), "fresh_graph", note


def _backward_on_retained_graphs(impl, sets, timer):
    """Median of backwards re-run, with retain_graph=True, on one graph per input set built once."""
    graphs = [(impl.loss(x), x.grad_inputs) for x in sets]
    rotation = itertools.cycle(graphs)

    def backward():
        loss, inputs = next(rotation)
        return _grads(loss, inputs, retain_graph=True)

    return timer.median_ms(backward)


def _backward_on_fresh_graphs(impl, sets, timer, prepare_inputs):
    """Median of single backwards, each on a graph built (untimed) just before it."""
    rotation = itertools.cycle(sets)

    def fresh_graph():
        x = prepare_inputs(next(rotation))
        return impl.loss(x), x.grad_inputs

    return timer.median_ms_with_setup(fresh_graph, lambda graph: _grads(*graph))


def _measure_on_private_copy(impl, sets, timer, device) -> Measurement:
    work = work_copy(sets[0])
    started = time.perf_counter()
    loss = impl.loss(refill(work, sets[0]))
    loss_value = float(loss.detach())
    _grads(loss, work.grad_inputs)
    del loss
    synchronize(device)
    warmup_s = time.perf_counter() - started

    refill(work, sets[0])
    peak = peak_extra_bytes(device, lambda: _grads(impl.loss(work), work.grad_inputs))
    rotation = itertools.cycle(sets)

    def fresh():
        return refill(work, next(rotation))

    fwd = timer.median_ms_with_setup(fresh, lambda x: impl.loss(x))
    fwdbwd = timer.median_ms_with_setup(fresh, lambda x: _grads(impl.loss(x), x.grad_inputs))
    bwd = _backward_on_fresh_graphs(impl, sets, timer, lambda source: refill(work, source))
    return Measurement(fwd, bwd, fwdbwd, "fresh_graph", "", peak, loss_value, warmup_s)
