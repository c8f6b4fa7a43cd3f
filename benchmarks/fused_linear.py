"""`python -m benchmarks fused-linear` (or `python -m benchmarks.fused_linear`): the logit-free path against
everything that builds the logits.

    python -m benchmarks.fused_linear --quick     # Llama-3-8B head, 4 pairs x 2048 tokens, 0% / 40% ignored, (a)-(c)
    python -m benchmarks.fused_linear             # also 4 pairs x 4096 tokens and (d), where importable
    python -m benchmarks.fused_linear --tiny      # tiny shapes even on a GPU (a smoke run)
    python -m benchmarks.fused_linear --chunk-sizes 2048,8192   # ours again at other chunk widths
    python -m benchmarks.fused_linear --impls ours,ours_frozen,trl_frozen --phases fwdbwd   # a subset

Shapes: the Llama-3-8B head, H = 4096, V = 128256, bf16; "4 pairs x T tokens" is chosen (4, T, H) plus
rejected (4, T, H) hidden states, so N = 8·T rows. "40% ignored" labels the first round(0.4·T) tokens of
every sequence ignore_index (the prompt). Gradients are taken with respect to both hidden states and the
weight (torch.autograd.grad: fresh gradients, no accumulation into .grad), except in the frozen-head rows.

Implementations, all on the same inputs:
    ours             focal_kernels.fused_linear_focal_po_loss (the logits never exist)
    ours GEMMs only  ours' chunk loop with the same chunks, gathers and scatters but no Triton kernel and no
                     loss: the four GEMMs as ours runs them, so ours minus this row is the cost of the rest
                     (full run only; its "loss" is a dummy, not compared)
    ours (frozen head)  ours with a weight that does not require grad (LoRA, adapters): gradients to both
                     hidden states only; ours takes its 2-GEMM path (the forward accumulates d logp / d hidden)
    ours (memory_budget)  ours with memory_budget = the net extra memory (peak net of the returned gradients)
                     of Liger's row on the same shape in this run, else a fixed 2 GiB (the CPU, or no Liger):
                     chunk logits that fit are kept from the forward, 3 GEMMs instead of 4 for those chunks
    matmul+fpo       focal_po_loss(chosen_hidden @ W.T, rejected_hidden @ W.T, ...): the logits path
    matmul+fpo (ip)  the same with inplace_backward=True (full run only: the logits are a temporary there)
    eager            hidden @ W.T, .float(), log_softmax, gather, masked sum, FocalPO in torch
    trl              trl.kernels.ChunkedLogProbFunction on the scored rows, then the same sum and loss
    trl (frozen weight)  the same with a weight that does not require grad (TRL then skips grad_W: 3 GEMMs)
    liger            liger_kernel.chunked_loss.LigerFusedLinearDPOLoss, reference-free DPO (gamma = 0):
                     a different loss, so its loss value is not compared
    cce              cut_cross_entropy.linear_cross_entropy(reduction="none"), then the same sum and loss
    ours (again)     ours timed once more, after all the others on the shape (last in ALL_IMPLS): its time over
                     ours' first shows how far the clocks drifted while the shape ran (the target table shows it)
(d) trl / liger / cce run only where importable (and never in --quick); each is skipped with its reason.

Per row, measured by the same code as the logits benchmark (measure.py, runner.py): fwd, bwd and fwd+bwd
median ms (triton.testing.do_bench, a 1 ms warm-up, i.e. one call, and a budget of --reps fwd+bwd steps per
phase: about --reps calls of fwd+bwd, more of the shorter fwd and bwd; "timed_calls" in the JSON is that
--reps); bwd re-runs the
backward of one graph built once with retain_graph=True (fresh graphs, each built untimed, where an
implementation refuses that; the note says so). Liger computes its gradients in its forward, so its bwd is
only their scaling. The GEMM floor: floor_gemms GEMMs of 2·N_valid·H·V FLOPs (4 for a trainable head:
forward logits, their recompute, grad_W, grad_hidden; 2 for a frozen one: logits and grad_hidden;
N_valid = scored tokens) at two rates measured in this run: the sustained rate of the very GEMMs ours runs
(its chunk loops' four GEMMs over the whole vocabulary at ours' default chunk: forward logits, recompute,
grad_W, grad_hidden; timed as one call per shape, their mean rate) and the 8192³ torch.mm burst rate;
time / each floor; the loss' and the gradients' relative difference from ours' where the row computes the
same ones (the gradients as a digest: measure.gradient_digest; in the JSON, and in the note where beyond the
row's tolerance); peak extra memory of one fwd+bwd (max_memory_allocated minus memory_allocated before it),
also net of the returned gradients; that as % of the bf16 logits' size N·V·2; and each row's time and memory
over ours'. TRL, Liger and CCE take chosen and rejected as one batch: it is concatenated once per input set,
outside the measured calls (a trainer's concatenated forward hands it over so). A target table (targets.py)
reads the issue's goals off the rows. Without CUDA: tiny shapes (H=16, V=128, 2 pairs x 4 tokens) through
Triton's interpreter, CPU timings (NOT GPU timings), no 8192³ rate, no memory figures.

Output: the Markdown table on stdout; fused.json (rewritten after every row) and fused.md in --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

from .baselines import BETA, GAMMA, eager_sequence_logps, focal_po_from_logps
from . import targets
from .environment import bench_device, describe, import_baseline, release_memory, synchronize
from .impls import Impl, build_impls
from .inputs import IGNORE_INDEX, random_labels, random_ref_logps
from .measure import PHASES
from .report import (_clean, _write_atomically, header_lines, print_end, print_start, skip_notes,
                     written_files)
from .runner import (compare_with_ours, comparison_fields, describe_failure, fill_timings, record_row,
                     run_implementation)
from .shapes import PairedTokens, parse_list, parse_names
from .timing import GpuTimer, RepsTimer

HIDDEN, VOCAB, PAIRS = 4096, 128256, 4            # Llama-3-8B lm_head
SEQ_LENS, QUICK_SEQ_LENS = (2048, 4096), (2048,)
TINY_HIDDEN, TINY_VOCAB, TINY_PAIRS, TINY_SEQ_LEN = 16, 128, 2, 4
IGNORED = (0.0, 0.4)
DTYPE, DTYPE_NAME = torch.bfloat16, "bf16"
MATMUL_SIZE = 8192
DEFAULT_MEMORY_BUDGET = 2 << 30  # "ours (memory_budget)" when no Liger row measured its memory on the shape

QUICK_IMPLS = ("ours", "ours_frozen", "ours_budget", "matmul", "eager")
# Liger before ours (memory_budget), which takes its budget from Liger's row.
ALL_IMPLS = ("ours", "gemms", "ours_frozen", "matmul", "matmul_inplace", "eager", "trl", "trl_frozen", "liger",
             "ours_budget", "cce", "ours_again")


# ------------------------------------------------------------------------------------------------ inputs

@dataclass(frozen=True)
class Shape(PairedTokens):
    hidden: int
    vocab: int
    pairs: int
    seq_len: int
    ignored_fraction: float

    dtype_name = DTYPE_NAME

    def row_fields(self) -> dict:
        return {**super().row_fields(), "hidden": self.hidden}

    @property
    def logits_bytes(self) -> int:
        """The bf16 logits of all N rows (what the logits paths materialize, and their gradient's size)."""
        return self.tokens * self.vocab * 2

    def gemm_flops(self) -> int:
        """One GEMM's FLOPs over the whole vocabulary for the scored rows: 2·N_valid·H·V."""
        return 2 * self.valid_tokens * self.hidden * self.vocab

    def group(self) -> str:
        return f"{self.pairs} × {self.seq_len}, {self.ignored_fraction:.0%} ignored"

    def label(self) -> str:
        return (f"H={self.hidden} V={self.vocab} {self.pairs} pairs x {self.seq_len} tokens per side "
                f"(N={self.tokens}) {DTYPE_NAME} ignored={self.ignored_fraction:.0%} (N_valid={self.valid_tokens})")


@dataclass
class Inputs:
    chosen_hidden: torch.Tensor    # (pairs, T, H) leaf, requires_grad
    rejected_hidden: torch.Tensor
    weight: torch.Tensor           # (V, H) leaf, requires_grad (a detached view of it for a frozen head)
    chosen_labels: torch.Tensor    # (pairs, T) int64, prompt = IGNORE_INDEX
    rejected_labels: torch.Tensor
    ref_chosen_logps: torch.Tensor
    ref_rejected_logps: torch.Tensor
    hidden: torch.Tensor | None = None   # (2·pairs, T, H) leaf: chosen then rejected, for `Concatenated` rows
    labels: torch.Tensor | None = None   # (2·pairs, T) likewise

    def _named_grad_inputs(self):
        hiddens = (self.chosen_hidden, self.rejected_hidden) if self.hidden is None else (self.hidden,)
        return [(name, t) for name, t in [*(("hidden", h) for h in hiddens), ("weight", self.weight)]
                if t.requires_grad]

    @property
    def grad_inputs(self):
        return tuple(t for _, t in self._named_grad_inputs())

    @property
    def grad_groups(self):
        """What each of grad_inputs is, for measure.gradient_digest (the hidden states, split or not; the weight)."""
        return tuple(name for name, _ in self._named_grad_inputs())

    @property
    def grad_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.grad_inputs)


def make_weight(hidden: int, vocab: int, device, seed: int = 7) -> torch.Tensor:
    """W ~ N(0, 1/H) so that logits ~ N(0, 1)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    weight = torch.randn((vocab, hidden), generator=gen, dtype=DTYPE, device=device)
    weight.mul_(hidden ** -0.5)
    return weight.requires_grad_()


def make_inputs(shape: Shape, weight: torch.Tensor, seed: int = 1000) -> Inputs:
    device = weight.device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    size = (shape.pairs, shape.seq_len)

    def hidden():
        return torch.randn(size + (shape.hidden,), generator=gen, dtype=DTYPE, device=device).requires_grad_()

    chosen, rejected = hidden(), hidden()
    return Inputs(chosen, rejected, weight, random_labels(shape, gen, device), random_labels(shape, gen, device),
                  random_ref_logps(shape, gen, device), random_ref_logps(shape, gen, device))


# ----------------------------------------------------------------------------------------- implementations

class Ours(Impl):
    key, name = "ours", "ours"
    memory_budget = None

    def __init__(self, chunk_size=None):
        import focal_kernels

        self._fn = focal_kernels.fused_linear_focal_po_loss
        self.chunk_size = chunk_size
        if chunk_size is not None:  # a variant for --chunk-sizes; "ours" stays the default chunk
            self.key, self.name = f"ours_chunk{chunk_size}", f"ours (chunk {chunk_size})"
            self.note = f"chunk_size={chunk_size}"

    def loss(self, x):
        return self._fn(x.chosen_hidden, x.rejected_hidden, x.weight, x.chosen_labels, x.rejected_labels,
                        x.ref_chosen_logps, x.ref_rejected_logps, beta=BETA, gamma=GAMMA,
                        ignore_index=IGNORE_INDEX, chunk_size=self.chunk_size, memory_budget=self.memory_budget).loss


class FrozenHead:
    """Mixin: the same inputs with a weight that does not require grad (a detached view, no copy), so the
    gradients reach both hidden states only; the task's GEMM floor is 2 GEMMs (logits, grad_hidden)."""

    floor_gemms = 2

    def inputs(self, x: Inputs) -> Inputs:
        return dataclasses.replace(super().inputs(x), weight=x.weight.detach())


class Concatenated:
    """Mixin: chosen and rejected hidden states (and labels) as one (2·pairs, T, H) leaf, made once per input
    set outside the measured calls, as a trainer's concatenated forward hands them to these baselines (whose
    APIs take one batch); the gradients go to that leaf."""

    def inputs(self, x: Inputs) -> Inputs:
        x = super().inputs(x)
        hidden = torch.cat([x.chosen_hidden, x.rejected_hidden]).detach().requires_grad_()
        return dataclasses.replace(x, hidden=hidden, labels=torch.cat([x.chosen_labels, x.rejected_labels]))


class OursFrozen(FrozenHead, Ours):
    key, name = "ours_frozen", "ours (frozen head)"
    note = "weight without grad: gradients to both hidden states only"


class OursMemoryBudget(Ours):
    """memory_budget = Liger's net extra memory on the same shape in this run (the issue's setting: the
    logits Liger's memory would hold are kept; ours' own default net comes on top, and the target table shows
    the total over Liger's); else DEFAULT_MEMORY_BUDGET."""

    key, name = "ours_budget", "ours (memory_budget)"

    def prepare(self, shape, earlier_rows):
        liger = next((r for r in earlier_rows if r["impl"] == "liger" and r["status"] == "ok"), None)
        net = (liger or {}).get("peak_extra_bytes_without_grads")
        if net and net > 0:
            self.memory_budget = int(net)
            source = "Liger's net extra memory in this run"
        else:
            self.memory_budget = DEFAULT_MEMORY_BUDGET
            source = "fixed: no Liger memory figure on this shape"
        self.note = f"memory_budget={self.memory_budget / 2**20:.0f} MiB ({source})"


class OursAgain(Ours):
    """ours once more, run last on each shape: the drift check beside the targets' few-percent margins (ours is
    timed first, the baselines minutes later, each a median of a few calls)."""

    key, name = "ours_again", "ours (again)"
    note = "ours timed again after the others on the shape"


class _OursGemmsOnly(torch.autograd.Function):
    """focal_kernels.vocab_chunks' own chunk loops (logits_pass, gradient_pass) with the Triton kernels
    replaced by nothing: the same gathers, GEMMs and scatters at the default chunk size, the recomputed logits
    standing in for their gradient. Returns a dummy zero."""

    @staticmethod
    def forward(ctx, weight, chosen_hidden, rejected_hidden, chosen_labels, rejected_labels):
        from focal_kernels.logprobs import scored_rows, vocab_chunks

        hiddens = (chosen_hidden, rejected_hidden)
        positions = [scored_rows.scored_positions(labels != IGNORE_INDEX)
                     for labels in (chosen_labels, rejected_labels)]
        rows = sum(index.numel() for index in positions)
        chunk = vocab_chunks.default_chunk_size(rows, weight.shape[0], weight.shape[1], weight.element_size())
        hidden_rows = scored_rows.gather_rows(hiddens, positions)
        vocab_chunks.logits_pass(hidden_rows, weight, None, chunk, lambda logits, start: None)
        ctx.save_for_backward(weight, *hiddens, *positions)
        ctx.rows, ctx.chunk = rows, chunk
        return weight.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        from focal_kernels.logprobs import scored_rows, vocab_chunks

        weight, *rest = ctx.saved_tensors
        hiddens, positions = rest[:2], rest[2:]
        grad_weight = torch.empty_like(weight)
        grad_hidden_rows = torch.zeros((ctx.rows, weight.shape[1]), dtype=torch.float32, device=weight.device)
        hidden_rows = scored_rows.gather_rows(hiddens, positions)
        vocab_chunks.gradient_pass(hidden_rows, weight, None, ctx.chunk, lambda logits, start: logits,
                                   grad_weight, None, grad_hidden_rows)
        del hidden_rows
        grad_hiddens = scored_rows.hidden_gradients(hiddens, positions, (True, True), grad_hidden_rows)
        return grad_weight, *grad_hiddens, None, None


class OursGemmsOnly(Impl):
    key, name = "gemms", "ours GEMMs only"
    loss_tolerance = grad_tolerance = None
    note = "ours' chunk loop without its Triton kernels or loss: the rest of ours costs the difference"

    def loss(self, x):
        return _OursGemmsOnly.apply(x.weight, x.chosen_hidden, x.rejected_hidden, x.chosen_labels,
                                    x.rejected_labels)


class MatmulThenFocalPO(Impl):
    key, name = "matmul", "matmul+fpo"
    inplace_backward = False

    def __init__(self):
        import focal_kernels

        self._fn = focal_kernels.focal_po_loss

    def loss(self, x):
        w_t = x.weight.t()
        return self._fn(x.chosen_hidden @ w_t, x.rejected_hidden @ w_t, x.chosen_labels, x.rejected_labels,
                        x.ref_chosen_logps, x.ref_rejected_logps, beta=BETA, gamma=GAMMA,
                        ignore_index=IGNORE_INDEX, inplace_backward=self.inplace_backward).loss


class MatmulThenFocalPOInplace(MatmulThenFocalPO):
    """The logits are a temporary here, so the logits' gradient may overwrite them."""

    key, name = "matmul_inplace", "matmul+fpo (ip)"
    inplace_backward = True
    note = "inplace_backward=True"


class Eager(Impl):
    key, name = "eager", "eager"

    def loss(self, x):
        w_t = x.weight.t()
        return focal_po_from_logps(eager_sequence_logps(x.chosen_hidden @ w_t, x.chosen_labels),
                                   eager_sequence_logps(x.rejected_hidden @ w_t, x.rejected_labels),
                                   x.ref_chosen_logps, x.ref_rejected_logps, BETA, GAMMA)


def _scored_rows(x: Inputs):
    """(rows (N_valid, H) of chosen then rejected, their int64 labels, flat positions in the (2·pairs·T) grid)."""
    hidden, labels = x.hidden.flatten(0, 1), x.labels.reshape(-1)
    positions = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    return hidden.index_select(0, positions), labels.index_select(0, positions), positions


def _pair_loss_from_token_logps(x: Inputs, token_logps, positions):
    """Scatter scored tokens' log-probs back, sum per sequence, then the FocalPO loss (all in torch)."""
    pairs, seq_len = x.chosen_labels.shape
    grid = torch.zeros(2 * pairs * seq_len, dtype=torch.float32, device=token_logps.device)
    grid = grid.index_add(0, positions, token_logps.float())
    sequence_logps = grid.view(2 * pairs, seq_len).sum(-1)
    return focal_po_from_logps(sequence_logps[:pairs], sequence_logps[pairs:], x.ref_chosen_logps,
                               x.ref_rejected_logps, BETA, GAMMA)


class TRLChunkedLogProb(Concatenated, Impl):
    """TRL's fused LM head on the scored rows of chosen and rejected together (one call, as its DPOTrainer
    concatenates them). The Function's positional arguments are matched to its forward's parameter names,
    since they have changed between TRL releases."""

    key, name = "trl", "trl"
    note = "trl.kernels.ChunkedLogProbFunction"
    vocab_chunk = 32768  # TRL 1.16's; unavailable_reason reads the installed TRL's

    def __init__(self):
        self._fn = None
        self._params = None

    def unavailable_reason(self, device):
        ChunkedLogProbFunction, reason = import_baseline("trl.kernels", "ChunkedLogProbFunction", device)
        if reason:
            return reason
        try:
            params = list(inspect.signature(ChunkedLogProbFunction.forward).parameters.values())[1:]  # drop ctx
        except (TypeError, ValueError) as exc:
            return f"cannot read ChunkedLogProbFunction.forward's signature ({exc})"
        known = {"hidden", "weight", "bias", "targets", "temperature", "chunk_size", "final_logit_softcapping",
                 "softcap", "logit_scale", "outputs"}
        unknown = [p.name for p in params if p.name not in known and p.default is inspect.Parameter.empty]
        if unknown:
            return f"ChunkedLogProbFunction.forward has required parameters this benchmark does not know: {unknown}"
        self._fn, self._params = ChunkedLogProbFunction, params
        try:  # the vocabulary chunk TRL's DPOTrainer passes (32768 in TRL 1.16), where this TRL names it
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
            self.vocab_chunk = int(chunk)
        except (ImportError, TypeError, ValueError):
            pass
        return None

    def loss(self, x):
        rows, targets, positions = _scored_rows(x)
        values = {"hidden": rows, "weight": x.weight, "bias": None, "targets": targets, "temperature": 1.0,
                  "chunk_size": min(self.vocab_chunk, x.weight.shape[0]), "final_logit_softcapping": None,
                  "softcap": None, "logit_scale": 1.0, "outputs": ()}
        args = [values[p.name] if p.name in values else p.default for p in self._params]
        out = self._fn.apply(*args)
        token_logps = out[0] if isinstance(out, (tuple, list)) else out
        return _pair_loss_from_token_logps(x, token_logps, positions)


class TRLChunkedLogProbFrozen(FrozenHead, TRLChunkedLogProb):
    key, name = "trl_frozen", "trl (frozen weight)"
    note = "trl.kernels.ChunkedLogProbFunction, weight without grad"


class LigerFusedLinearDPO(Concatenated, Impl):
    """Liger's fused-linear DPO (gamma = 0), reference-free (it does not take precomputed reference
    log-probs): the same GEMM work on a different loss, so its loss value is not compared with ours."""

    key, name = "liger", "liger DPO γ=0"
    loss_tolerance = grad_tolerance = None
    gradient_in_forward = True
    note = "LigerFusedLinearDPOLoss, γ=0, reference-free: loss and gradients not compared; bwd only scales " \
           "the gradients its forward computed"

    def __init__(self):
        self._module = None

    def unavailable_reason(self, device):
        LigerFusedLinearDPOLoss, reason = import_baseline("liger_kernel.chunked_loss", "LigerFusedLinearDPOLoss",
                                                          device, needs_gpu=True)
        if reason:
            return reason
        try:
            accepted = set(inspect.signature(LigerFusedLinearDPOLoss.__init__).parameters)
        except (TypeError, ValueError):
            accepted = set()
        options = {"ignore_index": IGNORE_INDEX, "beta": BETA, "use_ref_model": False,
                   "compute_nll_loss": False, "average_log_prob": False}
        try:
            self._module = LigerFusedLinearDPOLoss(**{k: v for k, v in options.items() if k in accepted})
        except Exception as exc:
            return f"LigerFusedLinearDPOLoss(...) failed ({type(exc).__name__}: {exc})"
        return None

    def loss(self, x):
        out = self._module(x.weight, x.hidden, x.labels)
        return out[0] if isinstance(out, (tuple, list)) else out


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class CutCrossEntropy(Concatenated, Impl):
    key, name = "cce", "cce"
    loss_tolerance = 1e-2  # its default filter_eps approximates; 2e-3 from ours' measured at 4 × 4096 (H200)
    note = "cut_cross_entropy.linear_cross_entropy (default filter_eps: approximate gradient)"

    def __init__(self):
        self._fn = None

    def unavailable_reason(self, device):
        self._fn, reason = import_baseline("cut_cross_entropy", "linear_cross_entropy", device, needs_gpu=True)
        return reason

    def loss(self, x):
        pairs, labels = x.chosen_labels.shape[0], x.labels
        nll = self._fn(x.hidden, x.weight, labels, ignore_index=IGNORE_INDEX, reduction="none")
        # Its backward views the incoming gradient as flat: hand it a contiguous one (sum's is expanded).
        nll = _ContiguousGrad.apply(nll)
        sequence_logps = -nll.float().reshape(labels.shape).sum(-1)  # ignored tokens have loss 0
        return focal_po_from_logps(sequence_logps[:pairs], sequence_logps[pairs:], x.ref_chosen_logps,
                                   x.ref_rejected_logps, BETA, GAMMA)


IMPLS = {cls.key: cls for cls in (Ours, OursGemmsOnly, OursFrozen, OursMemoryBudget, MatmulThenFocalPO,
                                   MatmulThenFocalPOInplace, Eager, TRLChunkedLogProb, TRLChunkedLogProbFrozen,
                                   LigerFusedLinearDPO, CutCrossEntropy, OursAgain)}


# ---------------------------------------------------------------------------------------------- measuring

def matmul_rate(device) -> dict | None:
    """bf16 dense matmul rate of this device, now: median of an 8192³ torch.mm (None off CUDA)."""
    if device.type != "cuda":
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    n = MATMUL_SIZE
    a = torch.randn((n, n), generator=gen, dtype=DTYPE, device=device)
    b = torch.randn((n, n), generator=gen, dtype=DTYPE, device=device)
    c = torch.empty((n, n), dtype=DTYPE, device=device)
    ms = GpuTimer(device, warmup_ms=25, rep_ms=100).median_ms(lambda: torch.mm(a, b, out=c))
    del a, b, c
    release_memory()
    return {"size": n, "dtype": DTYPE_NAME, "ms": ms, "tflops": 2 * n ** 3 / ms / 1e9}


def chunk_gemm_loop(shape: Shape, weight: torch.Tensor, device, reps: int) -> dict:
    """The sustained rate of the GEMMs ours runs on this shape: through ours' own loops at ours' default chunk,
    the forward's (N_valid, H) × (H, chunk) products over the whole vocabulary (vocab_chunks.logits_pass), then
    the backward's recompute, grad_W and float32-accumulating grad_hidden products (vocab_chunks.gradient_pass,
    the logits standing in for their gradient), timed as one call with the rows' timer (a budget of about `reps`
    calls: do_bench median on a GPU, L2 flushed before each): "ms" is the time of those 4 GEMMs, so a task of n
    GEMMs has the floor n/4 · ms."""
    from focal_kernels.logprobs import vocab_chunks

    rows = torch.randn((shape.valid_tokens, shape.hidden), dtype=DTYPE, device=device)
    chunk = vocab_chunks.default_chunk_size(shape.valid_tokens, shape.vocab, shape.hidden, rows.element_size())
    weight = weight.detach()
    grad_weight = torch.empty_like(weight)
    grad_rows = torch.zeros((shape.valid_tokens, shape.hidden), dtype=torch.float32, device=device)

    def four_gemms():
        vocab_chunks.logits_pass(rows, weight, None, chunk, lambda logits, start: None)
        vocab_chunks.gradient_pass(rows, weight, None, chunk, lambda logits, start: logits, grad_weight, None,
                                   grad_rows)

    # Timed as the rows are (RepsTimer): one call's length sizes the budget, so that the median is of about
    # `reps` calls (a fixed 100 ms budget gave one call of these 100-200 ms loops).
    synchronize(device)
    started = time.perf_counter()
    four_gemms()
    synchronize(device)
    ms = RepsTimer(device, reps).for_step((time.perf_counter() - started) * 1e3).median_ms(four_gemms)
    del rows, grad_weight, grad_rows
    return {"shape": shape.group(), "valid_tokens": shape.valid_tokens, "chunk": chunk, "gemms": 4, "ms": ms,
            "tflops": 4 * shape.gemm_flops() / ms / 1e9}


def new_row(shape: Shape, impl, grad_bytes: int) -> dict:
    return {
        "impl": impl.key, "name": impl.name, **shape.row_fields(), "status": "ok", "note": impl.note,
        **{f"{p}_ms": None for p in PHASES}, "bwd_method": None, "floor_gemms": impl.floor_gemms,
        "gemm_flops": impl.floor_gemms * shape.gemm_flops(), "gemm_floor_sustained_ms": None,
        "floor_ratio_sustained": None, "gemm_floor_ms": None, "floor_ratio": None,
        "peak_extra_bytes": None, "grad_bytes": grad_bytes, "peak_extra_bytes_without_grads": None,
        "logits_bytes": shape.logits_bytes, "peak_pct_of_logits": None, "peak_without_grads_pct_of_logits": None,
        **comparison_fields(impl),
        "gradient_in_forward": impl.gradient_in_forward,
        **{f"speedup_{p}": None for p in PHASES}, "memory_vs_ours": None, "memory_without_grads_vs_ours": None,
        "timed_calls": None, "warmup_s": None, "wall_s": None,
    }


def _fill(row: dict, m, shape: Shape, reps: int, tflops, loop) -> None:
    """The shared timings, then this benchmark's floors (sustained loop, 8192³ burst) and memory shares."""
    fill_timings(row, m)
    row["timed_calls"] = reps
    peak = m.peak_extra_bytes
    if peak is not None:
        row["peak_extra_bytes_without_grads"] = peak - row["grad_bytes"]
        row["peak_pct_of_logits"] = 100.0 * peak / shape.logits_bytes
        row["peak_without_grads_pct_of_logits"] = 100.0 * (peak - row["grad_bytes"]) / shape.logits_bytes
    if row["fwdbwd_ms"]:
        if loop:
            row["gemm_floor_sustained_ms"] = row["floor_gemms"] / loop["gemms"] * loop["ms"]
            row["floor_ratio_sustained"] = row["fwdbwd_ms"] / row["gemm_floor_sustained_ms"]
        if tflops:
            row["gemm_floor_ms"] = row["gemm_flops"] / (tflops * 1e9)
            row["floor_ratio"] = row["fwdbwd_ms"] / row["gemm_floor_ms"]


def _memory_vs_ours(row: dict, ours: dict) -> None:
    """Each row's peak memory over ours' (>1: ours smaller), with and without the returned gradients."""
    if row["peak_extra_bytes"] is not None and ours["peak_extra_bytes"]:
        row["memory_vs_ours"] = row["peak_extra_bytes"] / ours["peak_extra_bytes"]
    mine, theirs = ours["peak_extra_bytes_without_grads"], row["peak_extra_bytes_without_grads"]
    if mine is not None and theirs is not None and mine > 0:
        row["memory_without_grads_vs_ours"] = theirs / mine


# ---------------------------------------------------------------------------------------------- reporting

COLUMNS = ("T/side", "ignored", "N_valid", "impl", "fwd ms", "bwd ms", "fwd+bwd ms", "× floor (sustained)",
           "× floor (8192³)", "peak extra MiB", "net of grads MiB", "% of logits (peak / net)", "ours faster",
           "ours less mem (peak / net)", "note")


def _num(value, digits=3) -> str:
    if value is None:
        return "—"
    return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.0f}"


def _times(value, digits=3) -> str:
    return "—" if value is None else f"{value:.{digits}g}×"


def _row_cells(row: dict) -> list:
    note = row["note"] if row["status"] == "ok" else f"{row['status'].upper()}: {row['note']}"
    if row["status"] == "ok" and row.get("bwd_method") == "fresh_graph":
        note = "bwd on fresh graphs" + (f"; {note}" if note else "")
    if row["status"] == "ok" and row["peak_extra_bytes"] is not None:
        pct = f"{row['peak_pct_of_logits']:.1f}% / {row['peak_without_grads_pct_of_logits']:.1f}%"
    else:
        pct = "n/a"
    memory = "—" if row["memory_vs_ours"] is None else (
        f"{_times(row['memory_vs_ours'])} / {_times(row['memory_without_grads_vs_ours'])}")
    floors = [("—" if ratio is None else f"{ratio:.2f}") + (f" ({row['floor_gemms']})" if ratio is not None else "")
              for ratio in (row["floor_ratio_sustained"], row["floor_ratio"])]
    return [str(row["seq_len"]), f"{row['ignored_fraction']:.0%}", str(row["valid_tokens"]), row["name"],
            *(_num(row[f"{p}_ms"], 4) for p in PHASES), *floors,
            _mib(row["peak_extra_bytes"]), _mib(row["peak_extra_bytes_without_grads"]), pct,
            "—" if row["impl"] == "ours" else _times(row["speedup_fwdbwd"]), memory, (note or "").replace("|", "/")]


def markdown_table(rows: list) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_row_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def report_header(meta: dict) -> list:
    lines = header_lines({**meta, "copy": None})[:-1]  # the harness' device / timer lines, no copy bandwidth
    matmul = meta.get("matmul")
    if matmul:
        lines.append(f"bf16 matmul rate (same run, {matmul['size']}³ torch.mm): {matmul['tflops']:.0f} TFLOP/s "
                     f"({matmul['ms']:.3f} ms)")
    else:
        lines.append(f"bf16 matmul rate: n/a ({meta.get('matmul_note', 'not measured')}); no 8192³ GEMM floor")
    for loop in meta.get("gemm_loops", []):
        lines.append(f"Sustained GEMM rate (same run), {loop['shape']}: ours' {loop['gemms']} chunk GEMMs over V "
                     f"(logits, recompute, grad_W, grad_hidden; {loop['valid_tokens']} rows × H={meta['hidden']}, "
                     f"chunk {loop['chunk']}): {loop['tflops']:.4g} TFLOP/s mean ({loop['ms']:.4g} ms for the "
                     f"{loop['gemms']})")
    lines.append(f"Head: H={meta['hidden']}, V={meta['vocab']}, {DTYPE_NAME}; β={BETA}, γ={GAMMA}; "
                 f"gradients w.r.t. both hidden states and the weight (frozen rows: the hidden states only)")
    used = meta.get("float32_addmm")
    if used is not None:
        lines.append("Ours' hidden-state gradient: " + (
            "cuBLAS accumulates each chunk into the float32 buffer (addmm with out_dtype=float32)" if used else
            "each chunk's factors upcast to float32 first (no float32-output addmm here)"))
    return lines


def float32_addmm_used(device):
    """Whether ours' backward accumulated through addmm(out_dtype=float32) in this run (None: it never ran)."""
    from focal_kernels.logprobs import vocab_chunks

    return vocab_chunks._MIXED_ADDMM_WORKS.get((device.type, DTYPE, torch.float32))


def markdown_report(results: dict) -> str:
    meta = results["meta"]
    parts = ["# focal-kernels fused-linear benchmark", "", *(f"{line}  " for line in report_header(meta)), ""]
    parts.append("GEMM floor = n GEMMs × 2·N_valid·H·V FLOPs (n in brackets: 4 for a trainable head, 2 for a "
                 "frozen one) at the mean sustained rate of ours' own four chunk GEMMs on that shape, and at the "
                 "8192³ burst rate. bwd: backward of a retained graph unless the note says fresh graphs. Peak extra = "
                 "max_memory_allocated − memory_allocated before one fwd+bwd; \"net\" subtracts the returned "
                 "gradients (the hidden states' and, for a trainable head, the weight's). % of logits: of N·V·2 "
                 "bytes. \"ours faster\" / \"ours less mem\" = that row's time / peak ÷ ours' (>1: ours better).")
    parts += skip_notes(results)
    parts += targets.markdown(results["targets"], meta["gpu_timings"])
    parts += ["", "## Rows", "", markdown_table(results["rows"])]
    return "\n".join(parts) + "\n"


def save(results: dict, out_dir: str) -> None:
    """fused.json and fused.md, flat in out_dir (rewritten after every row)."""
    results["targets"] = targets.evaluate(targets.FUSED_TARGETS, results["rows"],
                                          lambda row: f"{row['pairs']} × {row['seq_len']}, "
                                                      f"{row['ignored_fraction']:.0%} ignored",
                                          results.get("planned_shapes", ()))
    os.makedirs(out_dir, exist_ok=True)
    _write_atomically(os.path.join(out_dir, "fused.json"), json.dumps(_clean(results), indent=1) + "\n")
    _write_atomically(os.path.join(out_dir, "fused.md"), markdown_report(results))


def _summary(row: dict) -> str:
    if row["status"] != "ok":
        return f"  {row['name']}: {row['status'].upper()} {row['note']}"
    text = f"  {row['name']}: " + "  ".join(f"{p} {row[f'{p}_ms']:.3f} ms" for p in PHASES if row[f"{p}_ms"])
    if row["floor_ratio_sustained"] is not None:
        text += f" ({row['floor_ratio_sustained']:.2f}× sustained floor {row['gemm_floor_sustained_ms']:.3f} ms)"
    if row["floor_ratio"] is not None:
        text += f" ({row['floor_ratio']:.2f}× GEMM floor {row['gemm_floor_ms']:.3f} ms)"
    if row["peak_extra_bytes"] is not None:
        text += (f"  peak +{row['peak_extra_bytes'] / 2**20:.0f} MiB "
                 f"(net of grads {row['peak_extra_bytes_without_grads'] / 2**20:.0f} MiB)")
    return text + f"  loss {row['loss']:.6g}  [{row['wall_s']} s]"


# --------------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.fused_linear", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"4 pairs x 2048 tokens only, 0%% and 40%% ignored, {' / '.join(QUICK_IMPLS)}")
    p.add_argument("--tiny", action="store_true",
                   help=f"tiny shapes even on a GPU (H={TINY_HIDDEN}, V={TINY_VOCAB}, {TINY_PAIRS} pairs x "
                        f"{TINY_SEQ_LEN} tokens; always so without a GPU)")
    p.add_argument("--impls", help=f"comma list of {','.join(ALL_IMPLS)} (ours always runs; default: "
                                   f"{','.join(QUICK_IMPLS)} with --quick, all otherwise)")
    p.add_argument("--chunk-sizes", help="comma list of chunk_size values: ours again at each, after ours at the "
                                         "default chunk (e.g. 2048,8192)")
    p.add_argument("--ignored-fraction", help="comma list of ignored fractions (default 0,0.4)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {','.join(PHASES)} (default all)")
    p.add_argument("--reps", type=int, help="timed calls per phase (default 3 with --quick, else 5)")
    p.add_argument("--out", default="bench_out", help="directory for fused.json and fused.md (default ./bench_out)")
    return p.parse_args(argv)


def choose_shapes(args, device) -> list:
    ignored = parse_list(args.ignored_fraction, float) if args.ignored_fraction else IGNORED
    if args.tiny or device.type != "cuda":
        return [Shape(TINY_HIDDEN, TINY_VOCAB, TINY_PAIRS, TINY_SEQ_LEN, f) for f in ignored]
    seq_lens = QUICK_SEQ_LENS if args.quick else SEQ_LENS
    return [Shape(HIDDEN, VOCAB, PAIRS, t, f) for t in seq_lens for f in ignored]


def parse_chunk_sizes(text: str) -> list:
    try:
        sizes = parse_list(text, int)
    except ValueError:
        sizes = []
    if not sizes or any(size <= 0 for size in sizes):
        raise SystemExit(f"--chunk-sizes must be a comma list of positive ints, got {text!r}")
    return sizes


def choose_impls(args) -> list:
    if not args.impls:
        return list(QUICK_IMPLS if args.quick else ALL_IMPLS)
    return parse_names(args.impls, IMPLS, "implementation")


def main(argv=None) -> int:
    args = parse_args(argv)
    chunk_sizes = parse_chunk_sizes(args.chunk_sizes) if args.chunk_sizes else []
    device = bench_device()
    shapes = choose_shapes(args, device)
    phases = parse_names(args.phases, PHASES, "phase")
    reps = args.reps or (3 if args.quick else 5)
    timer = RepsTimer(device, reps)
    meta = describe(device)
    meta.update(timer=timer.kind, args=vars(args), hidden=shapes[0].hidden, vocab=shapes[0].vocab, dtype=DTYPE_NAME,
                beta=BETA, gamma=GAMMA, matmul=None, gemm_loops=[])
    print_start(meta, device)

    keys = choose_impls(args)
    impls, skipped = build_impls(IMPLS, keys, device)
    if impls and impls[0].key == "ours":
        impls[1:1] = [Ours(chunk_size=c) for c in chunk_sizes]
    if args.quick and not args.impls:
        skipped += [(IMPLS[k].name, "not run with --quick (ask with --impls)")
                    for k in ALL_IMPLS if k not in keys]
    for name, reason in skipped:
        print(f"skipping {name}: {reason}", flush=True)

    results = {"meta": meta, "skipped_implementations": skipped, "skipped_shapes": [], "rows": [],
               "complete": False, "planned_shapes": [shape.row_fields() for shape in shapes]}
    started = time.perf_counter()
    tflops = None
    if device.type == "cuda":
        try:
            meta["matmul"] = matmul_rate(device)
            tflops = meta["matmul"]["tflops"]
            print(f"bf16 matmul rate: {tflops:.0f} TFLOP/s ({MATMUL_SIZE}³ torch.mm, {meta['matmul']['ms']:.3f} ms)",
                  flush=True)
        except Exception as exc:  # the rows still get times and memory, only the GEMM floor goes missing
            meta["matmul_note"] = f"measurement failed: {describe_failure(exc)}"
            release_memory()
            print(f"matmul rate not measured: {meta['matmul_note']}", flush=True)
    else:
        meta["matmul_note"] = "CPU run, not measured"
        print("bf16 matmul rate: n/a on the CPU (no 8192³ GEMM floor)", flush=True)
    save(results, args.out)

    weight = None
    for shape in shapes:
        print(f"\n== {shape.label()}", flush=True)
        x = reason = None
        try:
            if weight is None or tuple(weight.shape) != (shape.vocab, shape.hidden):
                weight = None
                release_memory()
                weight = make_weight(shape.hidden, shape.vocab, device)
            x = make_inputs(shape, weight)
        except Exception as exc:
            reason = f"could not make inputs: {describe_failure(exc)}"
        if reason is not None:
            x = weight = None
            release_memory()
            print(f"  skipped: {reason}", flush=True)
            results["skipped_shapes"].append({"shape": shape.label(), "reason": reason})
            save(results, args.out)
            continue
        loop = None
        try:
            loop = chunk_gemm_loop(shape, weight, device, reps)
            meta["gemm_loops"].append(loop)
            print(f"  sustained GEMM rate: {loop['tflops']:.4g} TFLOP/s (chunk {loop['chunk']}, "
                  f"{loop['ms']:.4g} ms for its 4 GEMMs over V)", flush=True)
        except Exception as exc:  # the rows keep the 8192³ floor
            print(f"  sustained GEMM rate not measured: {describe_failure(exc)}", flush=True)
        release_memory()
        shape_rows = []
        for impl in impls:
            row = new_row(shape, impl, impl.inputs(x).grad_bytes)
            run_implementation(impl, shape, [x], timer, device, row, shape_rows,
                               lambda r, m: _fill(r, m, shape, reps, tflops, loop), phases)
            record_row(row, shape_rows, results, lambda rows: compare_with_ours(rows, _memory_vs_ours), _summary)
            save(results, args.out)
            release_memory()
        del x, shape_rows
        release_memory()
    del weight
    release_memory()

    meta["wall_s"] = round(time.perf_counter() - started, 1)
    meta["float32_addmm"] = float32_addmm_used(device)
    results["complete"] = True
    save(results, args.out)
    print(f"\nfinished in {meta['wall_s']} s; results in {written_files(args.out, ['fused.json', 'fused.md'])}\n")
    return print_end(report_header(meta), markdown_table(results["rows"]), results["rows"], ("error", "oom"))


if __name__ == "__main__":
    sys.exit(main())
