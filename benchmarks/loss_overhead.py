"""Host overhead of `fk.preference_loss` in eager mode: microseconds per call on (B,) log-probs.

    python benchmarks/loss_overhead.py [--batch 8] [--calls 3000]

The pair losses are a handful of (B,)-sized ops: at training batch sizes their cost is launches and Python,
not arithmetic, so this counts calls per second on whatever device the tensors are on (CPU by default).
"""

from __future__ import annotations

import argparse
import time

import torch

import focal_kernels as fk


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loss_overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    c, r = (torch.randn(args.batch, device=args.device, requires_grad=True) for _ in range(2))
    zero = torch.zeros(args.batch, device=args.device)
    for loss_type in ("focal", "sigmoid"):
        for _ in range(200):
            fk.preference_loss(c, r, zero, zero, loss_type=loss_type)
        if c.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.calls):
            fk.preference_loss(c, r, zero, zero, loss_type=loss_type)
        if c.is_cuda:
            torch.cuda.synchronize()
        print(f"{loss_type}: {(time.perf_counter() - start) / args.calls * 1e6:.1f} us per call")


if __name__ == "__main__":
    main()
