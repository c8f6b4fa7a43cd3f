"""`python -m focal_kernels`: self-check of the fused losses against the float64 reference on this machine.

Both paths are checked: the loss on logits, the loss on hidden states and an lm_head weight, and packed
sequences on both.

On a GPU the kernels run compiled; without one they run on the CPU through Triton's interpreter (set here
before triton is imported). Prints a table of max errors and wall times; exits 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402

import focal_kernels as fk  # noqa: E402

# (batch, chosen tokens, rejected tokens, vocab, dtype)
GPU_CASES = [
    (4, 512, 384, 32000, torch.bfloat16),
    (2, 256, 300, 128256, torch.bfloat16),
    (2, 128, 100, 50257, torch.float32),
    (2, 96, 80, 50257, torch.bfloat16),  # rows off 16-byte boundaries: peeled (kernels/row_alignment.py)
    (2, 64, 64, 151936, torch.float16),
    (2, 16, 9, 3001, torch.float64),
]
CPU_CASES = [
    (2, 6, 5, 1000, torch.float32),
    (2, 4, 3, 3001, torch.bfloat16),
    (3, 3, 4, 77, torch.float16),
    (2, 5, 1, 37, torch.float64),
]
# The hidden-state path: (batch, chosen tokens, rejected tokens, hidden size, vocab, dtype).
GPU_LINEAR_CASES = [(2, 64, 48, 256, 5000, torch.bfloat16), (2, 32, 16, 128, 3001, torch.float32)]
CPU_LINEAR_CASES = [(2, 4, 3, 16, 300, torch.float32), (2, 3, 2, 8, 77, torch.float64)]
# Its logits are rounded to the inputs' dtype by the GEMM, so bf16 compares loosely with float64 products.
LINEAR_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# Max error allowed, relative to the largest reference value: log-probs and loss are accumulated in float32
# (float64); gradients are stored in the logits' dtype.
VALUE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
GRAD_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _inputs(batch, chosen_len, rejected_len, vocab, dtype, device, generator):
    def logits(length):
        full = torch.randn(batch, length + 1, vocab, generator=generator, device=device, dtype=torch.float32) * 3
        return full.to(dtype)[:, :-1]  # the causal shift: a strided view, not a copy

    def labels(length):
        y = torch.randint(0, vocab, (batch, length), generator=generator, device=device)
        y[:, : length // 3] = -100  # a prompt
        return y

    ref = -10 * torch.rand(2, batch, generator=generator, device=device) - 20  # reference-model log-probs
    return logits(chosen_len), logits(rejected_len), labels(chosen_len), labels(rejected_len), ref[0], ref[1]


def _run(fn, chosen, rejected, labels_c, labels_r, ref_c, ref_r, sync):
    chosen = chosen.detach().requires_grad_(True)
    rejected = rejected.detach().requires_grad_(True)
    sync()
    start = time.perf_counter()
    out = fn(chosen, rejected, labels_c, labels_r, ref_c, ref_r, beta=0.1, gamma=0.05)
    grads = torch.autograd.grad(out.loss + 1e-3 * out.chosen_logps.sum(), [chosen, rejected])
    sync()
    return out, grads, (time.perf_counter() - start) * 1e3


def _rel_err(actual, expected):
    scale = expected.detach().abs().max().item() or 1.0
    return ((actual.detach().double() - expected.detach().double()).abs().max().item()) / scale


def check_case(case, device, generator):
    batch, chosen_len, rejected_len, vocab, dtype = case
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    chosen, rejected, labels_c, labels_r, ref_c, ref_r = _inputs(*case, device, generator)
    _run(fk.focal_po_loss, chosen, rejected, labels_c, labels_r, ref_c, ref_r, sync)  # compile / warm up
    out, grads, fused_ms = _run(fk.focal_po_loss, chosen, rejected, labels_c, labels_r, ref_c, ref_r, sync)
    ref, ref_grads, ref_ms = _run(fk.reference.focal_po_loss, chosen.double(), rejected.double(), labels_c, labels_r,
                                  ref_c.double(), ref_r.double(), sync)
    value_err = max(_rel_err(getattr(out, name), getattr(ref, name))
                    for name in ("loss", "chosen_logps", "rejected_logps"))
    grad_err = max(_rel_err(g, r) for g, r in zip(grads, ref_grads))
    finite = all(torch.isfinite(t).all().item() for t in (out.loss, *grads))
    ok = finite and value_err <= VALUE_TOL[dtype] and grad_err <= GRAD_TOL[dtype]
    return dict(shape=f"B={batch} T={chosen_len}/{rejected_len} V={vocab}", dtype=str(dtype).replace("torch.", ""),
                value_err=value_err, grad_err=grad_err, fused_ms=fused_ms, ref_ms=ref_ms, ok=ok)


def check_linear_case(case, device, generator):
    """fused_linear_focal_po_loss against the float64 reference on hidden @ W.T."""
    batch, chosen_len, rejected_len, hidden_size, vocab, dtype = case
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    _, _, labels_c, labels_r, ref_c, ref_r = _inputs(batch, chosen_len, rejected_len, 1, torch.float32, device,
                                                     generator)
    labels_c, labels_r = (torch.where(y == -100, y, torch.randint(0, vocab, y.shape, generator=generator,
                                                                  device=device))
                          for y in (labels_c, labels_r))
    weight = (torch.randn(vocab, hidden_size, generator=generator, device=device) / hidden_size ** 0.5).to(dtype)
    hidden_c, hidden_r = (torch.randn(batch, length, hidden_size, generator=generator, device=device).to(dtype)
                          for length in (chosen_len, rejected_len))

    def run(fn, hidden_c, hidden_r, weight):
        leaves = [t.detach().requires_grad_(True) for t in (hidden_c, hidden_r, weight)]
        sync()
        start = time.perf_counter()
        out = fn(*leaves)
        grads = torch.autograd.grad(out.loss + 1e-3 * out.chosen_logps.sum(), leaves)
        sync()
        return out, grads, (time.perf_counter() - start) * 1e3

    def fused(c, r, w):
        return fk.fused_linear_focal_po_loss(c, r, w, labels_c, labels_r, ref_c, ref_r)

    def reference(c, r, w):
        return fk.reference.focal_po_loss(c @ w.T, r @ w.T, labels_c, labels_r, ref_c.double(), ref_r.double())

    run(fused, hidden_c, hidden_r, weight)  # compile / warm up
    out, grads, fused_ms = run(fused, hidden_c, hidden_r, weight)
    ref, ref_grads, ref_ms = run(reference, hidden_c.double(), hidden_r.double(), weight.double())
    value_err = max(_rel_err(getattr(out, name), getattr(ref, name))
                    for name in ("loss", "chosen_logps", "rejected_logps"))
    grad_err = max(_rel_err(g, r) for g, r in zip(grads, ref_grads))
    finite = all(torch.isfinite(t).all().item() for t in (out.loss, *grads))
    ok = finite and value_err <= LINEAR_TOL[dtype] and grad_err <= LINEAR_TOL[dtype]
    return dict(shape=f"hidden B={batch} T={chosen_len}/{rejected_len} H={hidden_size} V={vocab}",
                dtype=str(dtype).replace("torch.", ""), value_err=value_err, grad_err=grad_err, fused_ms=fused_ms,
                ref_ms=ref_ms, ok=ok)


def check_packed_case(device, generator, dtype=torch.float32, vocab=501, hidden_size=32):
    """Packed sequences (one empty) on both paths, the hidden-state one soft-capped, against the float64 spec."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    cu_seqlens = torch.tensor([0, 4, 4, 9, 16], device=device)
    tokens = int(cu_seqlens[-1])
    labels = fk.shift_packed_labels(torch.randint(0, vocab, (tokens,), generator=generator, device=device),
                                    cu_seqlens)
    logits = torch.randn(tokens, vocab, generator=generator, device=device).to(dtype) * 3
    hidden = torch.randn(tokens, hidden_size, generator=generator, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator, device=device) / hidden_size ** 0.5).to(dtype)

    def both(logits, hidden, weight, spec):
        leaves = [t.detach().requires_grad_(True) for t in (logits, hidden, weight)]
        if spec:
            values = torch.cat([fk.reference.sequence_logps(leaves[0], labels, cu_seqlens=cu_seqlens),
                                fk.reference.sequence_logps(fk.reference.linear_logits(leaves[1], leaves[2],
                                                                                       logit_softcap=5.0),
                                                            labels, cu_seqlens=cu_seqlens)])
        else:
            values = torch.cat([fk.sequence_logps(leaves[0], labels, cu_seqlens=cu_seqlens),
                                fk.fused_linear_sequence_logps(leaves[1], leaves[2], labels, cu_seqlens=cu_seqlens,
                                                               logit_softcap=5.0)])
        grads = torch.autograd.grad((values * torch.arange(1, 9, device=device)).sum(), leaves)
        return values, grads

    both(logits, hidden, weight, False)  # compile / warm up
    sync()
    start = time.perf_counter()
    values, grads = both(logits, hidden, weight, False)
    sync()
    fused_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    ref, ref_grads = both(logits.double(), hidden.double(), weight.double(), True)
    ref_ms = (time.perf_counter() - start) * 1e3
    value_err = _rel_err(values, ref)
    grad_err = max(_rel_err(g, r) for g, r in zip(grads, ref_grads))
    ok = bool(torch.isfinite(values).all()) and value_err <= LINEAR_TOL[dtype] and grad_err <= LINEAR_TOL[dtype]
    return dict(shape=f"packed S=4 N={tokens} V={vocab} (logits; hidden H={hidden_size}, softcap)",
                dtype=str(dtype).replace("torch.", ""), value_err=value_err, grad_err=grad_err, fused_ms=fused_ms,
                ref_ms=ref_ms, ok=ok)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m focal_kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = "cuda" if ON_GPU else "cpu"
    if ON_GPU:
        where = torch.cuda.get_device_name()
    elif fk.backend.interpreter_enabled():
        where = "CPU, Triton interpreter (timings are not GPU timings)"
    else:  # TRITON_INTERPRET=0 was set by the caller: the CPU runs the PyTorch path, not the kernels
        where = "CPU, PyTorch path (TRITON_INTERPRET=0: the Triton kernels are not checked)"
    print(f"focal_kernels {fk.__version__} self-check on {where}; torch {torch.__version__}, "
          f"triton {triton.__version__}")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    rows = [check_case(case, device, generator) for case in (GPU_CASES if ON_GPU else CPU_CASES)]
    rows += [check_linear_case(case, device, generator)
             for case in (GPU_LINEAR_CASES if ON_GPU else CPU_LINEAR_CASES)]
    rows.append(check_packed_case(device, generator))
    print()
    print("| shape | dtype | max rel err (loss, logps) | max rel err (grads) | fused fwd+bwd ms | "
          "float64 reference ms | ok |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['dtype']} | {r['value_err']:.2e} | {r['grad_err']:.2e} | {r['fused_ms']:.1f} | "
              f"{r['ref_ms']:.1f} | {'yes' if r['ok'] else 'NO'} |")
    failed = [r for r in rows if not r["ok"]]
    print()
    print("all cases match the float64 reference" if not failed else f"{len(failed)} case(s) MISMATCH")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
