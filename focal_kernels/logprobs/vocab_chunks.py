"""The hidden-state path's walk over the vocabulary, shared by its forward and backward.

For the N scored tokens' hidden rows (N, H) and the lm_head weight W (V, H), the vocabulary is taken in
chunks [v0, v1) of `chunk_size` rows of W. Each chunk's logits rows · W[v0:v1]ᵀ (+ bias) come from one GEMM in
the inputs' dtype (cuBLAS accumulates in float32 and rounds its output), into an (N, v1 − v0) buffer: the
walk's only chunk-sized buffer, but for float32 copies of a chunk where no mixed-dtype addmm can accumulate
(`accumulate_product`) and the chunks a memory budget keeps for the whole step. The forward folds each chunk
into per-token state; the backward turns it into its gradient G in place and spends it on three reductions
that each accumulate in float32:
    grad_W[v0:v1] = Gᵀ · rows      (one GEMM, written straight into that slice: no running sum across chunks)
    grad_b[v0:v1] = Σ_n G
    grad_rows    += G · W[v0:v1]   (into an (N, H) float32 buffer, through cuBLAS where it can accumulate)
Two variants save GEMMs. A memory budget keeps the first chunks' logits from the forward, so the backward
copies them instead of recomputing (3 GEMMs for those chunks instead of 4). A frozen weight (no gradient
for W or b) needs only grad_rows = g · (W[y]·x'_y − Σ_v p_v x'_v W_v) (x' = d logits / d raw), and the sum
over v ≠ y is accumulated during the forward walk with online rescaling, as flash-attention accumulates its
output: acc ← acc · e^(m_old − m_new) + E · W[v0:v1] with E = e^(x − m_new) · x' and the label's column of E
set to 0, so that acc / S = Σ_{v≠y} p_v x'_v W_v (S = Σ e^(x − m)). The label's own term, x'_y·W[y]·(1 − p_y),
is added at the end with 1 − p_y = (S − e^(x_y − m)) / S from the float32 state, which keeps its precision
where p_y is close to 1. That is 2 GEMMs in all (1 under no_grad), and the backward only scales rows.
"""

from __future__ import annotations

import torch

# The default chunk: the widest multiple of _CHUNK_MULTIPLE rows of W whose logits fit in _CHUNK_BYTES, but
# at least a floor of _MIN_CHUNK_COLUMNS, lowered where that would exceed 1/_MAX_CHUNK_FRACTION of the
# vocabulary or make the chunk larger than the float32 accumulator it feeds; at most the vocabulary.
_MIN_CHUNK_COLUMNS = 4096
_MAX_CHUNK_FRACTION = 16
_CHUNK_BYTES = 128 * 2**20
_CHUNK_MULTIPLE = 256


def default_chunk_size(rows: int, vocab: int, hidden: int, element_size: int) -> int:
    """Vocabulary rows per chunk: the widest multiple of 256 whose rows × chunk logits fit in 128 MiB, but at
    least min(4096, V / 16, 4 · H / element_size) (rounded down to a multiple of 256, at least 256), at most V.

    Why a floor in columns rather than a byte budget alone: the chunk width is the inner dimension K of the
    backward's grad_hidden GEMM, which reads and writes the (rows, H) float32 accumulator once per chunk, K/4
    FLOPs per byte of that traffic whatever the number of rows; a byte budget alone narrows the chunk as rows
    grow (2048 columns at 32K bf16 rows, where the H200 run spent far more time outside the GEMMs than at 16K
    rows with 4096 columns; benchmarks/NOTES.md). The floor never makes a chunk larger than that accumulator
    (rows × H × 4 bytes) or than 1/16 of the logits it stands for.
    """
    multiple = _CHUNK_MULTIPLE
    fit = _CHUNK_BYTES // (max(rows, 1) * element_size) // multiple * multiple
    floor = min(_MIN_CHUNK_COLUMNS, vocab // _MAX_CHUNK_FRACTION, 4 * hidden // element_size)
    floor = max(multiple, floor // multiple * multiple)
    return min(max(floor, fit), vocab)


_MIXED_ADDMM_WORKS = {}  # (device type, input dtype, accumulator dtype) → bool, probed once each


def _mixed_addmm_works(acc, a):
    """Whether this PyTorch and device take `addmm(acc, a, b, out_dtype=acc.dtype, out=acc)` with a, b in a
    lower precision than acc (CUDA from PyTorch 2.10; not the CPU). Probed once on 1 × 1 tensors; never
    while a CUDA graph is being captured (the probe reads its result back), which takes the fallback."""
    key = (acc.device.type, a.dtype, acc.dtype)
    if key not in _MIXED_ADDMM_WORKS:
        if acc.is_cuda and torch.cuda.is_current_stream_capturing():
            return False
        probe = torch.ones((1, 1), dtype=acc.dtype, device=acc.device)
        factor = torch.ones((1, 1), dtype=a.dtype, device=a.device)
        try:
            torch.addmm(probe, factor, factor, out_dtype=acc.dtype, out=probe)
            _MIXED_ADDMM_WORKS[key] = probe.item() == 2.0  # accumulated into, not overwritten
        except (TypeError, RuntimeError):  # no such overload, or not for this device
            _MIXED_ADDMM_WORKS[key] = False
    return _MIXED_ADDMM_WORKS[key]


def accumulate_product(acc, a, b):
    """acc += a @ b with acc in float32 (float64) and a, b possibly bfloat16 / float16.

    Where `addmm(..., out_dtype=float32)` takes a float32 accumulator (CUDA, recent PyTorch), cuBLAS
    accumulates the low-precision product straight into the float32 buffer. Elsewhere (older PyTorch, the
    CPU) both factors are upcast first, so that no chunk's product is rounded to bfloat16 / float16 before it
    is added (a float32 GEMM and chunk-sized float32 copies: slower, never less exact).
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif _mixed_addmm_works(acc, a):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _chunk_logits(hidden_rows, weight, bias, start, stop, out=None):
    """(N, stop − start) logits of vocabulary rows [start, stop), in the inputs' dtype, contiguous (into
    `out` when given)."""
    weight_chunk = weight[start:stop]
    if bias is None:
        return torch.mm(hidden_rows, weight_chunk.t(), out=out)
    return torch.addmm(bias[start:stop], hidden_rows, weight_chunk.t(), out=out)


def logits_pass(hidden_rows, weight, bias, chunk_size, fold, kept=None):
    """The forward's loop: fold(logits_chunk, vocab_start) for every chunk of the rows' logits. The first
    len(kept) chunks are written into kept[i] ((k, N, chunk_size), the memory budget's buffer) and stay there."""
    vocab = weight.shape[0]
    for index, start in enumerate(range(0, vocab, chunk_size)):
        out = kept[index] if kept is not None and index < kept.shape[0] else None
        fold(_chunk_logits(hidden_rows, weight, bias, start, min(start + chunk_size, vocab), out), start)


def gradient_pass(hidden_rows, weight, bias, chunk_size, to_gradient, grad_weight, grad_bias, grad_hidden_rows,
                  kept=None):
    """The backward's loop: each chunk of logits recomputed (or copied from the forward's kept[i], which
    saves that GEMM and stays intact for another backward), turned into its gradient G by
    to_gradient(logits_chunk, vocab_start) (in place), then grad_weight[chunk] = Gᵀ · rows,
    grad_bias[chunk] = Σ_n G and grad_hidden_rows += G · W[chunk], for those of the three that are not None."""
    vocab = weight.shape[0]
    for index, start in enumerate(range(0, vocab, chunk_size)):
        stop = min(start + chunk_size, vocab)
        if kept is not None and index < kept.shape[0]:
            logits_chunk = kept[index].clone()
        else:
            logits_chunk = _chunk_logits(hidden_rows, weight, bias, start, stop)
        grad_chunk = to_gradient(logits_chunk, start)
        if grad_weight is not None:
            torch.mm(grad_chunk.t(), hidden_rows, out=grad_weight[start:stop])
        if grad_bias is not None:
            torch.sum(grad_chunk, dim=0, out=grad_bias[start:stop])
        if grad_hidden_rows is not None:
            accumulate_product(grad_hidden_rows, grad_chunk, weight[start:stop])
        del grad_chunk
