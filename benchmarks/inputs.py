"""Input sets for one shape, and how many of them fit in device memory.

Several sets are generated and rotated through the timed calls so that a repeat does not find the
previous call's data in cache. Every implementation sees the very same sets (same seeds).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .environment import free_device_memory
from .shapes import Shape

IGNORE_INDEX = -100
# Kept free beyond the inputs and ours' gradient: do_bench's 256 MB cache-flush buffer, ours' O(rows)
# buffers, the allocator's rounding.
_RESERVE_BYTES = 1 << 30
# Share of free memory the input sets may take, the rest is left for the baselines' intermediates.
_SETS_SHARE = 0.4


@dataclass
class InputSet:
    chosen_logits: torch.Tensor      # (pairs, seq_len, V), leaf, requires_grad
    rejected_logits: torch.Tensor
    chosen_labels: torch.Tensor      # (pairs, seq_len) int64, prompt part = IGNORE_INDEX
    rejected_labels: torch.Tensor
    ref_chosen_logps: torch.Tensor   # (pairs,) float32, precomputed reference log-probs
    ref_rejected_logps: torch.Tensor

    @property
    def grad_inputs(self):
        return (self.chosen_logits, self.rejected_logits)

    grad_groups = ("logits", "logits")  # what each of grad_inputs is, for measure.gradient_digest


def random_labels(shape, gen: torch.Generator, device) -> torch.Tensor:
    """(pairs, seq_len) int64 labels in [0, vocab), the first ignored_per_sequence of each row IGNORE_INDEX.
    `shape` is any shape with pairs, seq_len, vocab and ignored_per_sequence."""
    out = torch.randint(0, shape.vocab, (shape.pairs, shape.seq_len), generator=gen, device=device)
    out[:, :shape.ignored_per_sequence] = IGNORE_INDEX
    return out


def random_ref_logps(shape, gen: torch.Generator, device) -> torch.Tensor:
    """(pairs,) float32 reference log-probs."""
    return torch.randn((shape.pairs,), generator=gen, dtype=torch.float32, device=device) * 10.0


def make_input_set(shape: Shape, device: torch.device, seed: int) -> InputSet:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    size = (shape.pairs, shape.seq_len)

    def logits():
        return torch.randn(size + (shape.vocab,), generator=gen, dtype=shape.dtype, device=device).requires_grad_()

    chosen, rejected = logits(), logits()
    return InputSet(chosen, rejected, random_labels(shape, gen, device), random_labels(shape, gen, device),
                    random_ref_logps(shape, gen, device), random_ref_logps(shape, gen, device))


def work_copy(source: InputSet) -> InputSet:
    """Fresh logits leaves shaped like `source` (labels and refs shared), for implementations that
    overwrite their inputs: `refill` copies a pristine set into them before every timed call."""
    def like(t):
        return torch.empty_like(t).requires_grad_()

    return InputSet(like(source.chosen_logits), like(source.rejected_logits), source.chosen_labels,
                    source.rejected_labels, source.ref_chosen_logps, source.ref_rejected_logps)


def refill(work: InputSet, source: InputSet) -> InputSet:
    with torch.no_grad():
        work.chosen_logits.copy_(source.chosen_logits)
        work.rejected_logits.copy_(source.rejected_logits)
    work.chosen_labels, work.rejected_labels = source.chosen_labels, source.rejected_labels
    work.ref_chosen_logps, work.ref_rejected_logps = source.ref_chosen_logps, source.ref_rejected_logps
    return work


def plan_input_sets(shape: Shape, device: torch.device, max_sets: int):
    """(number of sets, None), or (0, reason) when one set and ours' gradient do not fit."""
    memory = free_device_memory(device)
    if memory is None:
        return max_sets, None
    free, _total = memory
    set_bytes = shape.logits_bytes
    needed = 2 * set_bytes + _RESERVE_BYTES  # one set + its gradient (what ours needs)
    if needed > free:
        return 0, (f"does not fit: one input set and its gradient need {needed / 1e9:.1f} GB, "
                   f"{free / 1e9:.1f} GB free")
    fitting = int(min(_SETS_SHARE * free, free - needed + set_bytes) // set_bytes)
    return max(1, min(max_sets, fitting)), None
