"""Where the benchmark runs: the interpreter switch, the device, versions, and memory helpers."""

from __future__ import annotations

import gc
import importlib
import os
import platform
import subprocess
import sys

import torch


def prepare_environment() -> None:
    """With no CUDA device and TRITON_INTERPRET unset, set TRITON_INTERPRET=1 (must precede `import triton`)."""
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return
    if "triton" in sys.modules:
        print("note: triton was imported before the benchmark could set TRITON_INTERPRET=1", flush=True)
    os.environ["TRITON_INTERPRET"] = "1"


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def import_baseline(module: str, name: str, device: torch.device, *, needs_gpu: bool = False):
    """(the object, None) when `module.name` imports (and a GPU is there if it needs one), else (None, why).

    Any exception counts: a baseline that is not installed, or broken by its own dependencies, is skipped."""
    try:
        found = getattr(importlib.import_module(module), name)
    except Exception as exc:
        return None, f"{module}.{name} not importable ({type(exc).__name__}: {exc})"
    if needs_gpu and device.type != "cuda":
        return None, f"{module}.{name} needs a GPU"
    return found, None


def bench_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def describe(device: torch.device) -> dict:
    """Device name and library versions, for the report header and the JSON."""
    import triton

    info = {
        "device": device.type,
        "device_name": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "triton_interpreter": interpreter_on(),
        "gpu_timings": device.type == "cuda",
        **git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = torch.cuda.get_device_name(device)
        info["device_memory_gb"] = round(props.total_memory / 1e9, 1)
        info["sm_count"] = props.multi_processor_count
    return info


def git_commit() -> dict:
    """{"commit": the full hash of HEAD or None, "commit_dirty": whether tracked files differ from it (None:
    unknown)}. Without a git checkout (a copied tree) the caller may name the commit in BENCH_COMMIT."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        # Only this repository's own checkout: a copied tree inside some other repository is not it.
        if os.path.realpath(git("rev-parse", "--show-toplevel")) == os.path.realpath(root):
            return {"commit": git("rev-parse", "HEAD"),
                    "commit_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        pass
    given = os.environ.get("BENCH_COMMIT", "").strip()
    return {"commit": given or None, "commit_dirty": None}


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA allocation failure, however it was wrapped (torch, Triton, torch.compile)."""
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    return "out of memory" in str(exc).lower()


def release_memory() -> None:
    """Drop unreachable tensors and hand cached blocks back, after an OOM or between shapes."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_device_memory(device: torch.device):
    """(free, total) bytes on a CUDA device, None on the CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
