"""Smoke test of the benchmark harness: `python -m benchmarks --quick` runs end to end and writes JSON.

Without a GPU the harness picks tiny shapes and runs the kernels through Triton's interpreter. With a
GPU the test adds --tiny and keeps to the eager baseline, so it stays short (the real --quick run is
benchmarks/gpu_check.sh's job).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(module: str, *args: str):
    """`python -m module args...` from the repository root; (the completed process, its output's tails),
    asserting that it exited 0."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    output = f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, output
    return proc, output


def test_quick_benchmark_writes_finite_rows(tmp_path):
    args = ["--quick", "--out", str(tmp_path)]
    if torch.cuda.is_available():
        args += ["--tiny", "--baselines", "eager,inplace"]
    proc, output = run_benchmark("benchmarks", *args)

    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["complete"], output
    rows = results["rows"]
    for impl in ("ours", "eager"):
        ok = [r for r in rows if r["impl"] == impl and r["status"] == "ok"]
        assert ok, f"no successful {impl!r} row\n{output}"
        for row in ok:
            for phase in ("fwd", "bwd", "fwdbwd"):
                ms = row[f"{phase}_ms"]
                assert ms is not None and math.isfinite(ms) and ms > 0, (impl, phase, ms)
            assert row["loss"] is not None and math.isfinite(row["loss"])
            assert row["loss_rel_diff_vs_ours"] < 1e-3, row
    assert (tmp_path / "bench.md").read_text().count("| ours |") == len([r for r in rows if r["impl"] == "ours"])
    assert "| vocab |" in proc.stdout
