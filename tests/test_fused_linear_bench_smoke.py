"""Smoke test of the fused-linear benchmark: `python -m benchmarks fused-linear --quick` (the same as
`python -m benchmarks.fused_linear --quick`) runs end to end, with ours' GEMMs-only row and ours at
another chunk size added.

Without a GPU the benchmark picks tiny shapes and runs the kernels through Triton's interpreter (a few
seconds). With a GPU the test adds --tiny so it stays short (the real Llama-3-8B-head run is not a test).
"""

import json
import math

import torch

from test_benchmarks_smoke import run_benchmark


def test_fused_linear_quick_benchmark_writes_finite_rows(tmp_path):
    args = ["--quick", "--impls", "ours,gemms,matmul,eager", "--chunk-sizes", "64", "--out", str(tmp_path)]
    if torch.cuda.is_available():
        args.append("--tiny")
    proc, output = run_benchmark("benchmarks", "fused-linear", *args)

    results = json.loads((tmp_path / "fused.json").read_text())
    assert results["complete"], output
    rows = results["rows"]
    ours = [r for r in rows if r["impl"] == "ours"]
    assert len(ours) == 2 and all(r["status"] == "ok" for r in ours), output  # 0% and 40% ignored
    for row in ours:
        assert row["fwdbwd_ms"] is not None and math.isfinite(row["fwdbwd_ms"]) and row["fwdbwd_ms"] > 0, row
        assert row["loss"] is not None and math.isfinite(row["loss"]), row
    for row in rows:  # the logits path and eager compute the same loss from the same inputs
        if row["impl"] != "ours" and row["status"] == "ok" and row["loss_comparable"]:
            assert row["loss_rel_diff_vs_ours"] < 1e-2, row
    assert {r["impl"] for r in rows if r["status"] == "ok"} == {"ours", "ours_chunk64", "gemms", "matmul",
                                                                "eager"}, output
    assert (tmp_path / "fused.md").read_text().count("| ours |") == len(ours)
    assert "| impl |" in proc.stdout
    if not torch.cuda.is_available():  # no float32-output addmm on the CPU: the fallback, and the header says so
        assert results["meta"]["float32_addmm"] is False
        assert "rounded to bf16, then added to the float32 buffer" in proc.stdout
    if not torch.cuda.is_available():
        assert "NOT GPU timings" in proc.stdout
        assert results["meta"]["matmul"] is None
