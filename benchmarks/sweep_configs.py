"""`python -m benchmarks.sweep_configs`: time the row kernels alone over (BLOCK_V, num_warps) on a GPU.

This is the instrument behind focal_kernels/kernels/config.py: for each vocabulary and dtype it times the
forward (token_logps) and backward (logits_grad) kernels at every candidate configuration and prints the
bandwidth of each against the floor (forward reads the logits once; backward reads them once and writes
the gradient once). The results go into benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch
import triton
import triton.testing

from focal_kernels.kernels import logits_grad as logits_grad_module
from focal_kernels.kernels import token_logps as token_logps_module

BLOCKS = (2048, 4096, 8192, 16384)
WARPS = (4, 8, 16)


def _timer(device):
    """Median milliseconds of fn: do_bench on a GPU; one call on a CPU (the interpreter smoke run)."""
    if device.type == "cuda":
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    def once(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    return once


def sweep(vocab, rows, dtype, blocks=BLOCKS, warps=WARPS, device="cuda"):
    """Time the kernels through their own launchers (kernels/token_logps.py, kernels/logits_grad.py) with the
    configuration forced, so the sweep never drifts from the kernels' signatures."""
    device = torch.device(device)
    logits = torch.randn(rows, 1, vocab, device=device, dtype=torch.float32).to(dtype)
    labels = torch.randint(0, vocab, (rows, 1), device=device)
    grad_scale = torch.randn(rows, 1, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    _, row_max, log_sum_exp = token_logps_module.token_logps_and_lse([logits], [labels], -100)
    logits_bytes = logits.numel() * logits.element_size()
    timer = _timer(device)
    results = []
    for block_v in blocks:
        if block_v > triton.next_power_of_2(vocab):
            continue
        for num_warps in warps:
            forward_config = mock.patch.object(token_logps_module, "reduction_config",
                                               lambda *_: (block_v, num_warps))
            backward_config = mock.patch.object(logits_grad_module, "gradient_config",
                                                lambda *_: (block_v, num_warps, triton.cdiv(vocab, block_v)))

            def forward():
                token_logps_module.token_logps_and_lse([logits], [labels], -100)

            def backward():
                logits_grad_module.logits_grad([logits], [labels], row_max, log_sum_exp, [grad_scale], -100)
            try:
                with forward_config, backward_config:
                    fwd_ms, bwd_ms = timer(forward), timer(backward)
            except Exception as exc:  # a configuration the compiler rejects (registers, shared memory)
                print(f"V={vocab} {dtype} BLOCK_V={block_v} warps={num_warps}: failed ({type(exc).__name__}: "
                      f"{str(exc)[:120]})")
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
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep_configs", description=__doc__.splitlines()[0])
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
