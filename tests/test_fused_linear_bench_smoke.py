"""Smoke test of the fused-linear benchmark: `python -m benchmarks fused-linear` (the same as
`python -m benchmarks.fused_linear`) runs end to end with every row that runs here: ours, ours at another
chunk size, ours' GEMMs-only row, ours with a frozen head and with memory_budget, the logits path, eager,
and TRL's fused head trainable and frozen where TRL is installed; each phase timed, the sustained GEMM loop
measured, the target table written, the commit named.

Without a GPU the benchmark runs tiny shapes through Triton's interpreter in this process (a few seconds).
With a GPU the test adds --tiny so it stays short (the real Llama-3-8B-head run is not a test).
"""

import importlib.util
import json
import math

import torch

from test_benchmarks_smoke import TINY, check_commit, check_written_files, run_main

IMPLS = ("ours", "gemms", "ours_frozen", "matmul", "eager", "trl", "trl_frozen", "ours_budget")


def test_fused_linear_benchmark_every_row(tmp_path, capsys):
    from benchmarks.__main__ import main

    argv = ["fused-linear", *TINY[:3], "--ignored-fraction", "0.4", "--impls", ",".join(IMPLS),
            "--chunk-sizes", "64", "--out", str(tmp_path)]
    stdout, output = run_main(main, argv, capsys)

    results = json.loads((tmp_path / "fused.json").read_text())
    assert results["complete"], output
    rows = {r["impl"]: r for r in results["rows"]}
    expected = {"ours", "ours_chunk64", *IMPLS}
    if importlib.util.find_spec("trl") is None:  # installed, its rows must run (a failed import included)
        expected -= {"trl", "trl_frozen"}
    assert set(rows) == expected and all(r["status"] == "ok" for r in rows.values()), output
    for key, row in rows.items():
        for phase in ("fwd", "bwd", "fwdbwd"):
            ms = row[f"{phase}_ms"]
            assert ms is not None and math.isfinite(ms) and ms > 0, (key, phase, ms)
        assert row["bwd_method"] == "retain_graph", row
        assert row["loss"] is not None and math.isfinite(row["loss"]), row
        if key != "ours" and row["loss_comparable"]:  # everything but the GEMMs-only row computes our loss
            assert row["loss_rel_diff_vs_ours"] < 1e-2, row
        assert row["floor_ratio_sustained"] is not None and row["floor_ratio_sustained"] > 0, row
    assert rows["ours_frozen"]["floor_gemms"] == 2 and rows["ours"]["floor_gemms"] == 4
    # Frozen rows differentiate w.r.t. the hidden states only: their gradients are smaller than ours'.
    assert rows["ours_frozen"]["grad_bytes"] < rows["ours"]["grad_bytes"]
    assert "memory_budget=2048 MiB (fixed" in rows["ours_budget"]["note"]  # no Liger row on the CPU

    loops = results["meta"]["gemm_loops"]
    assert len(loops) == 1 and loops[0]["ms"] > 0 and loops[0]["chunk"] > 0, loops
    met = {t["target"]: t for t in results["targets"]}
    assert met["frozen head: trainable ours / ours (frozen head)"]["met"] is not None
    assert met["trainable head, default: ours / ours GEMMs only"]["met"] is not None
    markdown = (tmp_path / "fused.md").read_text()
    assert markdown.count("| ours |") == 1 and "## Targets" in markdown and "| ours (frozen head) |" in markdown
    check_commit(results["meta"], markdown)
    assert "| impl |" in stdout
    if not torch.cuda.is_available():  # no float32-output addmm on the CPU: the fallback, and the header says so
        assert results["meta"]["float32_addmm"] is False
        assert "factors upcast to float32 first" in stdout
        assert "NOT GPU timings" in stdout
        assert results["meta"]["matmul"] is None
    check_written_files(stdout, tmp_path, output)


def test_memory_budget_row_and_target_are_at_ligers_memory():
    """ours (memory_budget) keeps logits up to Liger's net memory less ours' own, and its target is met only
    when it is faster at no more net memory than Liger's."""
    from benchmarks import targets
    from benchmarks.fused_linear import OursMemoryBudget

    mib = 2**20

    def row(impl, ms, net):
        return {"impl": impl, "status": "ok", "fwdbwd_ms": ms, "peak_extra_bytes_without_grads": net * mib,
                "seq_len": 2048}

    budget = OursMemoryBudget()
    budget.prepare(None, [row("ours", 12.0, 384), row("liger", 10.0, 4200)])
    assert budget.memory_budget == (4200 - 384) * mib and "less ours' default" in budget.note
    goal = next(t for t in targets.FUSED_TARGETS if t.what.startswith("memory_budget"))
    for net, met in ((4100, True), (4584, False)):
        rows = [row("ours", 12.0, 384), row("liger", 10.0, 4200), row("ours_budget", 8.0, net)]
        assert goal.evaluate(rows)[1] is met, net
    assert goal.evaluate([row("liger", 10.0, 4200), row("ours_budget", 9.5, 4100)])[1] is False  # 1.05× < 1.10×
