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
    if tensor.device.type == "cpu" and interpreter_enabled():
        _check_interpreted()
        return True
    return False


_INTERPRETED = []  # filled once: the kernels were compiled as interpreter functions


def _check_interpreted():
    """TRITON_INTERPRET=1 takes effect only if it was set before the kernels were decorated (and, on some
    Triton versions, before triton was imported): refuse CPU tensors loudly rather than fail obscurely."""
    if torch.compiler.is_compiling() or _INTERPRETED:
        return
    from .kernels.segment_sum import segment_sum

    failure = None
    try:  # a one-element probe: the interpreter fails inside the kernel when triton was imported without it
        (probe,) = segment_sum(torch.ones(1, device="cpu"), torch.tensor([0, 1], device="cpu"))
        works = probe.item() == 1.0
    except Exception as exc:  # noqa: BLE001 (the interpreter wraps its failure in its own exception types)
        works, failure = False, exc
    if not works:
        detail = f" (the probe kernel raised {type(failure).__name__}: {str(failure)[:300]})" if failure else ""
        raise RuntimeError("TRITON_INTERPRET=1 is set, but a one-element probe kernel failed in Triton's "
                           f"interpreter{detail}. Usual causes: TRITON_INTERPRET=1 was set after triton (or "
                           "focal_kernels' kernels) had been imported: set it before importing triton, or unset "
                           "it to use the PyTorch path; or Triton < 3.7's interpreter with NumPy >= 2.3 "
                           "(seen on loops with a run-time bound; see also triton-lang/triton#9171): install "
                           "numpy<2.3 or a newer Triton.")
    _INTERPRETED.append(True)
