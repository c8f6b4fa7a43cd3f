"""The one implementation interface both benchmarks time, and the one way their registries are built.

An implementation computes a scalar loss from one input set (`loss(x)`); the harness differentiates it with
respect to `grad_inputs(x)`. The logits path (baselines.BASELINES) and the hidden-state path
(fused_linear.IMPLS) each keep a registry {key: class}; `build_impls` turns chosen keys into runnable
instances, ours first, and the reasons the others were skipped. measure.measure and runner.run_implementation
time and record every one of them the same way.
"""

from __future__ import annotations

import torch


class Impl:
    key = ""                  # the name on the command line and in the JSON rows' "impl"
    name = ""                 # the name in the tables
    note = ""                 # shown in the table's note column
    loss_tolerance = 1e-3     # computes ours' loss: relative difference beyond which its row is flagged (None:
                              # a different loss, not compared; `prepare` may set it per shape)
    grad_tolerance = 2e-2     # computes ours' gradients: a relative difference of their digest (measure.py)
                              # beyond which its row is flagged (None: a different gradient, not compared)
    gradient_in_forward = False  # computes its gradients in its forward: only fwd+bwd is like-for-like with ours
    overwrites_inputs = False  # writes into its input tensors: timed on a private copy refilled before each call
    floor_gemms = 4           # hidden-state path: GEMMs of 2·N_valid·H·V FLOPs its task needs (GEMM floor)

    def unavailable_reason(self, device: torch.device):
        """None when it can run here, else why not (printed once, then skipped)."""
        return None

    def prepare(self, shape, earlier_rows) -> None:
        """Called before each shape's measurement, with the rows already measured on that shape."""

    def inputs(self, x):
        """The input set as this implementation takes it (e.g. a frozen weight); called once per set."""
        return x

    def loss(self, x) -> torch.Tensor:
        raise NotImplementedError


def build_impls(registry: dict, keys, device: torch.device):
    """(runnable implementations, [(name, reason)] skipped): "ours" first, then `keys` in order."""
    runnable, skipped = [], []
    for key in ["ours"] + [k for k in keys if k != "ours"]:
        try:
            impl = registry[key]()
            reason = impl.unavailable_reason(device)
        except Exception as exc:  # a baseline's own set-up failing must not end the run
            impl, reason = None, f"set-up failed ({type(exc).__name__}: {str(exc)[:200]})"
        if reason is None:
            runnable.append(impl)
        else:
            skipped.append((registry[key].name, reason))
    return runnable, skipped
