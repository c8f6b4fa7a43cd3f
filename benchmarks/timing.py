"""Timers (median milliseconds), peak extra memory, and the device copy bandwidth.

GPU: `triton.testing.do_bench` medians (it warms up, sizes the repeat count to a time budget and
flushes L2 before every call, queuing the calls without waiting in between). Calls that need untimed set-up
first (refilling inputs an implementation overwrites, building a fresh graph) use CUDA events around the
call alone, with the same L2 flush, queued the same way. CPU: time.perf_counter
medians, which are NOT GPU timings (the kernels run through Triton's interpreter there).
"""

from __future__ import annotations

import statistics
import time

import torch

from .environment import free_device_memory

_FLUSH_BYTES = 256 << 20  # larger than any L2 so far (H100 50 MB, H200 60 MB)


class GpuTimer:
    kind = "triton.testing.do_bench median (CUDA events)"

    def __init__(self, device: torch.device, warmup_ms: int, rep_ms: int, min_reps: int = 5, max_reps: int = 200):
        self.device, self.warmup_ms, self.rep_ms = device, warmup_ms, rep_ms
        self.min_reps, self.max_reps = min_reps, max_reps
        self._flush = None

    def for_step(self, step_ms: float):
        """The timer for an implementation whose one training step took about step_ms: this one."""
        return self

    def median_ms(self, fn) -> float:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))

    def median_ms_with_setup(self, setup, fn) -> float:
        """Median over calls of fn(setup()), only fn timed: setup's work and the L2 flush are queued before each
        call's start event. As do_bench does, the timed calls are queued without waiting for the GPU between
        them, so rows timed here (implementations that overwrite their inputs, backwards on fresh graphs) and
        rows timed by do_bench are measured alike; waiting after each call would add its launch latency to its
        time (an implementation's own host synchronizations count in both)."""
        if self._flush is None:
            self._flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=self.device)
        self._timed(setup, fn, 1)  # warm-up
        (estimate,) = self._timed(setup, fn, 1)
        reps = int(min(self.max_reps, max(self.min_reps, self.rep_ms / max(estimate, 1e-3))))
        return statistics.median(self._timed(setup, fn, reps))

    def _timed(self, setup, fn, reps: int) -> list:
        """Milliseconds of `reps` calls, queued back to back, read after one synchronization at the end."""
        events = []
        for _ in range(reps):
            state = setup()
            self._flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(state)
            end.record()
            del out, state  # freed in stream order: the caching allocator reuses the memory after these kernels
            events.append((start, end))
        torch.cuda.synchronize(self.device)
        return [start.elapsed_time(end) for start, end in events]


class CpuTimer:
    kind = "time.perf_counter median on the CPU (NOT GPU timings)"

    def __init__(self, reps: int):
        self.reps = reps

    def for_step(self, step_ms: float):
        return self

    def median_ms(self, fn) -> float:
        return self.median_ms_with_setup(lambda: None, lambda _state: fn())

    def median_ms_with_setup(self, setup, fn) -> float:
        """No warm-up call of its own: measure.measure makes an untimed first call of every implementation."""
        times = []
        for _ in range(self.reps):
            state = setup()
            start = time.perf_counter()
            out = fn(state)
            times.append((time.perf_counter() - start) * 1e3)
            del out, state
        return statistics.median(times)


class RepsTimer:
    """A time budget of `reps` steps whatever a step costs (the hidden-state path's 100-400 ms steps): on a GPU,
    do_bench with a 1 ms warm-up (one call) and a budget of reps × the measured fwd+bwd length for every
    phase, so that fwd+bwd gets about reps timed calls and the shorter fwd and bwd more (more samples of the
    same median, at no extra cost per phase); on the CPU exactly reps calls per phase."""

    def __init__(self, device: torch.device, reps: int):
        self.device, self.reps = device, reps
        per_phase = f"a budget of {reps} fwd+bwd steps per phase" if device.type == "cuda" else f"{reps} timed calls"
        self.kind = (GpuTimer.kind if device.type == "cuda" else CpuTimer.kind) + f", {per_phase}"

    def for_step(self, step_ms: float):
        if self.device.type != "cuda":
            return CpuTimer(self.reps)
        # do_bench: 1 + 5 estimate calls, then warmup/estimate (at least 1) and rep/estimate calls.
        # The extra half call keeps int(rep / estimate) from rounding down to reps - 1.
        return GpuTimer(self.device, warmup_ms=1, rep_ms=max(1, int((self.reps + 0.5) * step_ms)))


def peak_extra_bytes(device: torch.device, fn):
    """Peak allocated bytes above what was allocated before one call of fn (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


def copy_bandwidth(device: torch.device, timer) -> dict:
    """Device-to-device copy of a large buffer (2 GiB on a GPU): bytes read + written per median call."""
    nbytes = 2 << 30 if device.type == "cuda" else 64 << 20
    memory = free_device_memory(device)
    if memory is not None:
        nbytes = min(nbytes, int(memory[0] // 4))
    numel = nbytes // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src))
    moved = 2 * numel * 4
    del src, dst
    return {"buffer_bytes": numel * 4, "bytes_moved": moved, "ms": ms, "gbps": moved / ms / 1e6}


def make_timer(device: torch.device, quick: bool, cpu_reps: int | None = None):
    if device.type == "cuda":
        return GpuTimer(device, warmup_ms=25, rep_ms=100 if quick else 250)
    return CpuTimer(reps=cpu_reps or (3 if quick else 5))
