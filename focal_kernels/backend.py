"""Which implementation a tensor gets: the Triton kernels, or the PyTorch reference on the CPU.

CUDA tensors always run the Triton kernels. CPU tensors run them through Triton's interpreter when
TRITON_INTERPRET=1 was set before triton was imported (that is how the tests reach the kernels without a
GPU); otherwise they run `focal_kernels.reference`, which gives the same results with more memory.
Importing focal_kernels does not import triton; the kernel modules load on first use, so the variable
may be set after `import focal_kernels` as long as triton itself was not imported yet.
"""

from __future__ import annotations

import os

import torch


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor) -> bool:
    if tensor.is_cuda:
        return True
    return tensor.device.type == "cpu" and interpreter_enabled()
