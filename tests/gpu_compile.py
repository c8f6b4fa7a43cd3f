"""Compile the Triton kernels for a GPU on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs a kernel's Python, not its compilation: a kernel can pass every CPU
test and still fail to compile (a loop-carried value changing type, an op the compiler rejects, too much
shared memory). This module closes that gap without a GPU, in two steps:

1. record: while the kernels run through the interpreter, every launch is written down as a launch
   specification: the kernel, each argument's kind (tensor dtype and 16-byte alignment; integer as the class
   Triton specializes it by: 1, a multiple of 16, other, or 64-bit; float; bool; None), the constexprs and
   num_warps / num_stages. Launches that differ only in the values of their integers share one specification.
2. compile: in a process without the interpreter, each distinct specification is compiled by Triton's own
   compiler for an NVIDIA target (default sm_90, the H100 / H200 of the benchmarks) down to a cubin, with a
   stand-in driver that names the target and launches nothing.

    python tests/gpu_compile.py record SPECS.json -- [pytest arguments]   # the launches of a test run
    python tests/gpu_compile.py record-gpu-shapes SPECS.json              # those of launch_gpu_shapes()
    python tests/gpu_compile.py compile SPECS.json [--arch 90]            # compile each; exit 1 on failure

tests/test_gpu_compile.py records launch_gpu_shapes(): the launch configuration depends on V and the dtype,
so the tests' small vocabularies alone would miss the block sizes and warps the GPU's shapes get.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import time

import torch

_INT32 = range(-(2**31), 2**31)
# Shared memory one block may use, in bytes, by compute capability (CUDA programming guide's table); a launch
# asking for more fails with "out of resource".
_SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


def _int_class(value: int) -> int:
    """A representative of the specialization Triton gives an integer argument: equal to 1, divisible by 16,
    neither, each as int32 or int64."""
    wide = 0 if value in _INT32 else 2**40
    if value == 1:
        return 1
    return wide + (16 if value % 16 == 0 else 17)


def _describe(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, bool) or value is None:
        return {"const": value}
    if isinstance(value, int):
        return {"int": _int_class(value)}
    if isinstance(value, float):
        return {"float": 0.5}
    raise TypeError(f"gpu_compile: cannot describe a kernel argument of type {type(value).__name__}")


@contextlib.contextmanager
def recording(specs: dict, execute: bool = True):
    """Record, into specs (key -> specification), every kernel launch made through the interpreter; with
    execute=False the launches are recorded but not run (their outputs keep whatever they were allocated with)."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        spec = {
            "module": self.fn.__module__,
            "kernel": self.fn.__name__,
            "args": [_describe(arg) for arg in args],
            # Keywords are the constexprs and num_warps: kept as they are.
            "kwargs": {name: _describe(value) if isinstance(value, torch.Tensor) else value
                       for name, value in sorted(kwargs.items())},
        }
        specs.setdefault(json.dumps(spec, sort_keys=True), spec)
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        return None

    InterpretedFunction.run = run
    try:
        yield specs
    finally:
        InterpretedFunction.run = original


def launch_gpu_shapes(vocab_parallel: bool = True):
    """Run every mode of the public API once per dtype at the benchmarks' vocabulary sizes, with two or three
    tokens a sequence (the launch configuration depends on V and the dtype, and the backward's loop on the
    number of rows, which one batch of about 100 rows covers):
    the logits path (strided and contiguous, int64 and int32 labels, in-place backward, unvalidated labels),
    packed sequences, the hidden-state path (trainable, frozen and budgeted head, bias, logit transform,
    per-token statistics) and the vocabulary-parallel path, on a one-rank gloo group."""
    import focal_kernels as fk

    def labels(batch, length, vocab, dtype=torch.int64):
        y = torch.randint(0, vocab, (batch, length), dtype=dtype)
        y[0, 0] = -100
        return y

    def backward(output):
        output.loss.backward() if hasattr(output, "loss") else output.sum().backward()

    for dtype, vocabs in ((torch.bfloat16, (32000, 50257, 128256)), (torch.float16, (50257, 151936)),
                          (torch.float32, (32000, 50257)), (torch.float64, (32000, 50257))):
        for vocab in vocabs:
            chosen = (torch.randn(2, 4, vocab) * 3).to(dtype)[:, :-1].requires_grad_()  # a causal-shift view
            rejected = (torch.randn(2, 2, vocab) * 3).to(dtype).requires_grad_()
            y_c, y_r = labels(2, 3, vocab), labels(2, 2, vocab, torch.int32)
            backward(fk.focal_po_loss(chosen, rejected, y_c, y_r))
            backward(fk.focal_po_loss(chosen * 1, rejected * 1, y_c, y_r, inplace_backward=True,  # not leaves
                                      validate_labels=False))
            packed = (torch.randn(1, 5, vocab) * 3).to(dtype).requires_grad_()
            backward(fk.sequence_logps(packed, labels(1, 5, vocab), cu_seqlens=torch.tensor([0, 2, 5])))
        # Enough rows that the backward's programs walk more than one block each (config.gradient_config splits
        # a row over fewer programs as rows grow): with a handful of rows blocks_per_program is 1, which Triton
        # specializes as a constant, and the loop that 16K-row batches run would never be compiled here.
        if dtype in (torch.bfloat16, torch.float32):
            many = (torch.randn(2, 50, 32000) * 3).to(dtype)[:, :-1].requires_grad_()
            backward(fk.sequence_logps(many, labels(2, 49, 32000)))
        vocab, hidden = vocabs[-1], 32
        h_c = torch.randn(2, 3, hidden).to(dtype).requires_grad_()
        h_r = torch.randn(2, 2, hidden).to(dtype).requires_grad_()
        y_c, y_r = labels(2, 3, vocab), labels(2, 2, vocab)
        for weight_grad, options in ((True, {}), (False, {}), (True, {"memory_budget": 2**30}),
                                     (True, {"chunk_size": 4096, "bias": torch.randn(vocab).to(dtype)}),
                                     (True, {"logit_softcap": 30.0, "logit_scale": 0.5, "temperature": 0.7}),
                                     (True, {"logit_scale": 0.5})):
            weight = (torch.randn(vocab, hidden) * 0.1).to(dtype).requires_grad_(weight_grad)
            backward(fk.fused_linear_focal_po_loss(h_c, h_r, weight, y_c, y_r, **options))
        weight = (torch.randn(vocab, hidden) * 0.1).to(dtype)
        for options in ({}, {"logit_softcap": 30.0}):
            out = fk.fused_linear_token_logps(h_c, weight, y_c, stats=("entropy", "log_sum_sq_probs", "mean_logits",
                                                                     "is_top1"), **options)
            out.log_probs.sum().backward()
    if vocab_parallel:
        import tempfile

        import torch.distributed as dist

        store = tempfile.NamedTemporaryFile(prefix="gpu_compile_store_", delete=False).name
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        try:
            group = dist.new_group([0])
            for dtype in (torch.bfloat16, torch.float32):
                vocab = 64128  # one of two halves of 128256
                chosen = (torch.randn(2, 3, vocab) * 3).to(dtype).requires_grad_()
                rejected = (torch.randn(2, 2, vocab) * 3).to(dtype).requires_grad_()
                backward(fk.focal_po_loss(chosen, rejected, labels(2, 3, vocab), labels(2, 2, vocab),
                                          vocab_parallel_group=group))
                weight = (torch.randn(vocab, 32) * 0.1).to(dtype).requires_grad_()
                backward(fk.fused_linear_focal_po_loss(torch.randn(2, 3, 32).to(dtype).requires_grad_(),
                                                       torch.randn(2, 2, 32).to(dtype).requires_grad_(), weight,
                                                       labels(2, 3, vocab), labels(2, 2, vocab),
                                                       vocab_parallel_group=group))
        finally:
            dist.destroy_process_group()
            with contextlib.suppress(FileNotFoundError):
                os.remove(store)


class _CompileOnlyDriver:
    """Stands in for Triton's CUDA driver where there is no GPU: names the target to compile for and the
    current device and stream; anything that would touch a GPU is missing (AttributeError)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True

    def __getattr__(self, name):
        raise AttributeError(f"gpu_compile: the compile-only driver has no {name!r}: nothing here can launch")


def _argument(description: dict):
    """A value the JIT binder specializes the same way as the recorded argument."""
    if "tensor" in description:
        tensor = torch.empty(16, dtype=getattr(torch, description["tensor"]))
        # torch.empty is at least 16-byte aligned; one element on is not (1-byte dtypes aside, not used here).
        return tensor if description["aligned"] else tensor[1:]
    if "int" in description:
        return description["int"]
    if "float" in description:
        return description["float"]
    return description["const"]


def compile_spec(spec: dict):
    """Compile one launch specification with Triton's compiler (the active driver names the target)."""
    kernel = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    kwargs = {name: _argument(value) if isinstance(value, dict) else value for name, value in spec["kwargs"].items()}
    return kernel.warmup(*[_argument(arg) for arg in spec["args"]], grid=(1,), **kwargs)


def _resource_usage(compiled) -> str:
    """Registers, stack, shared and local (spilled) memory of a compiled kernel, as cuobjdump reads the cubin."""
    import tempfile

    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        listing = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", cubin.name],
                                 capture_output=True, text=True, timeout=60).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", listing)
    if usage is None:
        return f"(cuobjdump printed no resource usage: {listing[-200:]!r})"
    registers, stack, shared, local = map(int, usage.groups())
    spills = f", SPILLS: {stack} B stack, {local} B local" if stack or local else ""
    return f"{registers} registers, {shared} B shared{spills}"


def compile_all(specs: list[dict], arch: int = 90, resources: list | None = None) -> list[tuple[dict, str]]:
    """Compile every specification for sm_<arch>; returns (specification, error) for each that failed, and
    appends (specification, resource usage) for each that compiled to resources if given.

    Must run in a process where TRITON_INTERPRET is unset (the kernels must be JIT functions, not
    interpreted ones)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    if not isinstance(getattr(importlib.import_module("focal_kernels.kernels.token_logps"), "token_logps_kernel"),
                      JITFunction):
        raise RuntimeError("gpu_compile: the kernels are interpreted here; compile in a process without "
                           "TRITON_INTERPRET")
    previous = getattr(driver, "_active", None)  # None where no GPU driver was ever created
    driver.set_active(_CompileOnlyDriver(arch))
    failures = []
    try:
        for spec in specs:
            try:
                compiled = compile_spec(spec)
                if "cubin" not in compiled.asm:
                    raise RuntimeError(f"no cubin (stages: {sorted(compiled.asm)})")
                if compiled.metadata.shared > _SHARED_MEMORY.get(arch, float("inf")):
                    raise RuntimeError(f"{compiled.metadata.shared} bytes of shared memory, more than the "
                                       f"{_SHARED_MEMORY[arch]} a block may use on sm_{arch}")
                if resources is not None:
                    resources.append((spec, _resource_usage(compiled)))
            except Exception as error:  # noqa: BLE001 - every failure is reported with its specification
                failures.append((spec, f"{type(error).__name__}: {error}"))
    finally:
        driver._active = previous  # reset_active() would look for a GPU driver, and fail without one
    return failures


def _summary(spec: dict) -> str:
    kinds = ", ".join(str(next(iter(arg.values()))) for arg in spec["args"])  # dtype, int class, float or const
    return f"{spec['kernel']}({kinds}; {spec['kwargs']})"


def _record(path: str, run, execute: bool = True) -> int:
    """Run run() with every launch recorded (and run, if execute); write the distinct ones to path; run()'s
    status (None: 0)."""
    specs = {}
    with recording(specs, execute):
        status = run()
    with open(path, "w") as file:
        json.dump(list(specs.values()), file, indent=1)
    print(f"gpu_compile: {len(specs)} distinct launches recorded in {path}")
    return int(status or 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    record = commands.add_parser("record", help="run pytest through the interpreter, recording each launch")
    record.add_argument("specs", help="the JSON file to write")
    record.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: pytest's arguments")
    shapes = commands.add_parser("record-gpu-shapes", help="record the launches of launch_gpu_shapes()")
    shapes.add_argument("specs", help="the JSON file to write")
    compile_ = commands.add_parser("compile", help="compile each recorded launch for an NVIDIA GPU")
    compile_.add_argument("specs", help="a JSON file written by record")
    compile_.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (sm_90), 80, 100")
    compile_.add_argument("--resources", action="store_true",
                          help="print each launch's registers, shared memory and spills (cuobjdump)")
    args = parser.parse_args(argv)

    if args.command == "record":
        if torch.cuda.is_available():
            parser.error("record runs the kernels through the interpreter: use a machine without a GPU (on a "
                         "GPU the tests compile every kernel they launch)")
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        import pytest

        return _record(args.specs, lambda: pytest.main([arg for arg in args.pytest_args if arg != "--"]))
    if args.command == "record-gpu-shapes":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
        from focal_kernels import backend

        # The launch configurations depend on the shapes and dtypes, not on the values: the GPU-sized launches
        # are recorded without running them (a minute of interpreter time saved). The interpreter's one-element
        # probe runs first, for real, as it checks its result.
        backend.use_triton(torch.zeros(1))
        return _record(args.specs, launch_gpu_shapes, execute=False)

    os.environ.pop("TRITON_INTERPRET", None)
    with open(args.specs) as file:
        specs = json.load(file)
    start = time.perf_counter()
    resources = [] if args.resources else None
    failures = compile_all(specs, args.arch, resources)
    for spec, usage in resources or ():
        print(f"{_summary(spec)}: {usage}")
    for spec, error in failures:
        print(f"FAILED {_summary(spec)}\n    {error}")
    print(f"gpu_compile: {len(specs) - len(failures)} of {len(specs)} launches compiled for sm_{args.arch} "
          f"in {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
