"""`python -m focal_kernels`: self-check of the fused loss against the float64 reference on this machine.

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
    (2, 64, 64, 151936, torch.float16),
    (2, 16, 9, 3001, torch.float64),
]
CPU_CASES = [
    (2, 6, 5, 1000, torch.float32),
    (2, 4, 3, 3001, torch.bfloat16),
    (3, 3, 4, 77, torch.float16),
    (2, 5, 1, 37, torch.float64),
]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = "cuda" if ON_GPU else "cpu"
    where = torch.cuda.get_device_name() if ON_GPU else "CPU, Triton interpreter (timings are not GPU timings)"
    print(f"focal_kernels {fk.__version__} self-check on {where}; torch {torch.__version__}, "
          f"triton {triton.__version__}")
    generator = torch.Generator(device=device).manual_seed(args.seed)
    rows = [check_case(case, device, generator) for case in (GPU_CASES if ON_GPU else CPU_CASES)]
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
