"""`python -m benchmarks.sweep_configs`: time the row kernels alone over (BLOCK_V, num_warps) on a GPU.

This is the instrument behind focal_kernels/kernels/config.py: for each vocabulary and dtype it times the
forward (token_logps) and backward (logits_grad) kernels at every candidate configuration and prints the
bandwidth of each against the floor (forward reads the logits once; backward reads them once and writes
the gradient once). The results go into benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.testing

from focal_kernels.kernels.logits_grad import logits_grad_kernel
from focal_kernels.kernels.token_logps import token_logps_kernel

BLOCKS = (2048, 4096, 8192, 16384)
WARPS = (4, 8, 16)


def sweep(vocab, rows, dtype, blocks=BLOCKS, warps=WARPS):
    logits = torch.randn(rows, 1, vocab, device="cuda", dtype=torch.float32).to(dtype)
    labels = torch.randint(0, vocab, (rows, 1), device="cuda")
    token_logps = torch.empty((rows, 1), device="cuda", dtype=torch.float32)
    row_max, log_sum_exp = torch.empty_like(token_logps), torch.empty_like(token_logps)
    grad_scale = torch.randn(rows, device="cuda")
    grad = torch.empty_like(logits)
    logits_bytes = logits.numel() * logits.element_size()
    results = []
    for block_v in blocks:
        if block_v > triton.next_power_of_2(vocab):
            continue
        for num_warps in warps:
            def forward():
                token_logps_kernel[(rows,)](logits, labels, token_logps, row_max, log_sum_exp, 1, vocab,
                                            logits.stride(0), logits.stride(1), labels.stride(0), labels.stride(1),
                                            -100, BLOCK_V=block_v, num_warps=num_warps)

            def backward():
                blocks_per_program = triton.cdiv(vocab, block_v)
                logits_grad_kernel[(rows, 1)](logits, labels, row_max, log_sum_exp, grad_scale, grad, 1, vocab,
                                              blocks_per_program, logits.stride(0), logits.stride(1),
                                              labels.stride(0), labels.stride(1), grad.stride(0), grad.stride(1),
                                              -100, BLOCK_V=block_v, num_warps=num_warps)
            try:
                fwd_ms = triton.testing.do_bench(forward, warmup=25, rep=100, return_mode="median")
                bwd_ms = triton.testing.do_bench(backward, warmup=25, rep=100, return_mode="median")
            except Exception as exc:  # a configuration the compiler rejects (registers, shared memory)
                print(f"V={vocab} {dtype} BLOCK_V={block_v} warps={num_warps}: failed ({type(exc).__name__})")
                continue
            row = dict(vocab=vocab, rows=rows, dtype=str(dtype).replace("torch.", ""), block_v=block_v,
                       num_warps=num_warps, fwd_ms=fwd_ms, bwd_ms=bwd_ms,
                       fwd_gbps=logits_bytes / fwd_ms / 1e6, bwd_gbps=2 * logits_bytes / bwd_ms / 1e6)
            results.append(row)
            print(f"V={vocab:>6} {row['dtype']:>8} BLOCK_V={block_v:>5} warps={num_warps:>2}  "
                  f"fwd {fwd_ms:.3f} ms {row['fwd_gbps']:.0f} GB/s   bwd {bwd_ms:.3f} ms {row['bwd_gbps']:.0f} GB/s",
                  flush=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sweep_configs needs a GPU")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    results = []
    for dtype_name in args.dtypes:
        for vocab in args.vocab:
            results += sweep(vocab, args.rows, getattr(torch, dtype_name))
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    for key in ("fwd_ms", "bwd_ms"):
        for dtype_name in args.dtypes:
            for vocab in args.vocab:
                rows = [r for r in results if r["vocab"] == vocab and r["dtype"] == dtype_name]
                if rows:
                    best = min(rows, key=lambda r: r[key])
                    print(f"best {key[:3]} V={vocab} {dtype_name}: BLOCK_V={best['block_v']} "
                          f"warps={best['num_warps']} {best[key]:.3f} ms")


if __name__ == "__main__":
    main()
