"""Smoke test of the logits-path benchmark: `python -m benchmarks` runs end to end with every implementation
that runs here (ours, in place, without the label check, sequence_logps padded and packed, eager, TRL where
installed), writes JSON and Markdown with the commit and the target table, and names only files it wrote.

Without a GPU the harness runs the kernels through Triton's interpreter on one tiny shape, in this process
(a few seconds). With a GPU it adds --tiny (the real runs are benchmarks/gpu_check.sh's job).
"""

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY = ["--tiny", "--reps", "1", "--max-sets", "1"]


def run_main(main, argv, capsys):
    """main(argv) in this process; (its stdout, stdout + stderr tails for messages), asserting exit 0."""
    rc = main(argv)
    captured = capsys.readouterr()
    output = f"stdout:\n{captured.out[-6000:]}\nstderr:\n{captured.err[-4000:]}"
    assert rc == 0, output
    return captured.out, output


def check_written_files(stdout: str, out_dir: Path, output: str) -> None:
    """The final "results in DIR/a, b" line names exactly the result files that exist."""
    line = next(line for line in stdout.splitlines() if "; results in " in line)
    listed = line.split("; results in ", 1)[1].strip()
    names = [os.path.basename(name.strip()) for name in listed.split(",")]
    assert names and all((out_dir / name).is_file() for name in names), output
    assert sorted(names) == sorted(p.name for p in out_dir.iterdir() if p.suffix in (".json", ".md", ".png")), output


def check_commit(meta: dict, markdown: str) -> None:
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", meta["commit"] or ""), meta.get("commit")
        assert meta["commit_dirty"] in (True, False)
        assert f"Commit: {meta['commit'][:12]}" in markdown
    else:
        assert "Commit:" in markdown


def test_logits_benchmark_every_row(tmp_path, capsys):
    from benchmarks.__main__ import main

    impls = ["ours", "inplace", "novalidate", "unaligned", "padded", "packed", "eager"]
    argv = [*TINY, "--shapes", "256x20", "--dtypes", "bf16", "--ignored-fraction", "0.4",
            "--baselines", ",".join(impls[1:] + ["trl"]), "--out", str(tmp_path)]
    stdout, output = run_main(main, argv, capsys)

    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["complete"], output
    rows = results["rows"]
    # TRL's row is checked wherever TRL is installed (the runner records a baseline that raises as an error
    # row and goes on: an unchecked row would hide it).
    for impl in impls + (["trl"] if importlib.util.find_spec("trl") is not None else []):
        ok = [r for r in rows if r["impl"] == impl and r["status"] == "ok"]
        assert len(ok) == 1, f"no successful {impl!r} row\n{output}"
        row = ok[0]
        for phase in ("fwd", "bwd", "fwdbwd"):
            ms = row[f"{phase}_ms"]
            assert ms is not None and math.isfinite(ms) and ms > 0, (impl, phase, ms)
        assert row["loss"] is not None and math.isfinite(row["loss"])
        # All compute the same loss on the same inputs; TRL's selective_log_softmax returns bf16 token log-probs
        # from bf16 logits (2e-3 here, at V = 256), which its tolerance allows.
        assert row["loss_rel_diff_vs_ours"] < (1e-2 if impl == "trl" else 1e-3), row
        # ... and the same gradients (a digest of both sides' logits gradients, measure.gradient_digest).
        assert set(row["grad_digest"]) == {"logits"}, row
        assert (row["grad_rel_diff_vs_ours"] is None) == (impl == "ours"), row
        assert impl == "ours" or row["grad_rel_diff_vs_ours"] < 2e-2, row
        assert row["bwd_method"] == ("fresh_graph" if impl == "inplace" else "retain_graph"), row
    markdown = (tmp_path / "bench.md").read_text()
    assert markdown.count("| ours |") == 1 and "| seqlogps packed |" in markdown
    check_commit(results["meta"], markdown)
    packed = [t for t in results["targets"] if t["target"].startswith("packed layout")]
    assert len(packed) == 1 and packed[0]["met"] is not None, results["targets"]  # evaluated, whatever the verdict
    assert "## Targets" in markdown and "not in this run" in markdown  # the V=32000... lines: no such shape
    assert "| vocab |" in stdout
    if not torch.cuda.is_available():
        assert "NOT GPU timings" in stdout
    check_written_files(stdout, tmp_path, output)


def test_gpu_check_script_parses_and_refuses_unknown_phases():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    proc = subprocess.run(["bash", str(script), "no-such-phase"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "usage" in proc.stderr
    text = script.read_text()
    assert re.search(r"^\s*tests\|tests-compile\|bench\|logits-small\|fused\|trl\) ;;$", text, re.M)  # accepted
    for phase in ("tests", "tests-compile", "bench", "logits-small", "fused", "trl"):
        assert re.search(rf'^\s*{re.escape(phase)}\)\s', text, re.M), phase  # ... and runs
    if not torch.cuda.is_available():  # the GPU-sized phases refuse to start here
        proc = subprocess.run(["bash", str(script), "bench"], capture_output=True, text=True, timeout=60,
                              env={k: v for k, v in os.environ.items() if k != "GPU_CHECK_WITHOUT_CUDA"})
        assert proc.returncode == 3 and "no CUDA device" in proc.stderr


def test_commit_of_a_copied_tree_inside_another_repository(tmp_path):
    """A copied tree (no .git of its own, as on the lent GPU) inside some other git repository: the results
    name BENCH_COMMIT, not the outer repository's HEAD, in gpu_check.sh's folder and in the JSON headers."""
    import shutil

    if shutil.which("git") is None:
        pytest.skip("needs the git command")
    outer = tmp_path / "outer"
    (outer / "inner").mkdir(parents=True)
    shutil.copytree(ROOT / "benchmarks", outer / "inner" / "benchmarks",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    git = ["git", "-C", str(outer), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "outer"], check=True)
    named = "0123456789abcdef0123456789abcdef01234567"
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "python").write_text("#!/bin/sh\nexit 0\n")  # every step "succeeds" at once
    (shim / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{shim}:{os.environ['PATH']}", "OUT": str(tmp_path / "out"),
           "BENCH_COMMIT": named, "GPU_CHECK_WITHOUT_CUDA": "1"}
    proc = subprocess.run(["bash", str(outer / "inner" / "benchmarks" / "gpu_check.sh"), "logits-small"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"commit {named}" in proc.stdout and (tmp_path / "out" / named[:7]).is_dir(), proc.stdout
    probe = ("import json, sys; sys.path.insert(0, sys.argv[1]); from benchmarks.environment import git_commit; "
             "print(json.dumps(git_commit()))")
    found = subprocess.run([sys.executable, "-c", probe, str(outer / "inner")], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "BENCH_COMMIT": named}, check=True)
    assert json.loads(found.stdout.strip().splitlines()[-1]) == {"commit": named, "commit_dirty": None}


def test_gpu_timer_with_setup_queues_calls_as_do_bench_does(monkeypatch):
    """GpuTimer.median_ms_with_setup (rows that refill their inputs, backwards on fresh graphs): each call's
    set-up and L2 flush come before its start event, and the timed calls are queued without a synchronization
    between them (one at the end of each batch), as triton.testing.do_bench queues the other rows' calls.
    Run here with stand-ins for CUDA events and synchronize."""
    from benchmarks import timing

    log = []

    class Event:
        clock = 0.0

        def __init__(self, enable_timing):
            assert enable_timing
            self.at = None

        def record(self):
            Event.clock += 1.0
            self.at = Event.clock
            log.append("record")

        def elapsed_time(self, other):
            return other.at - self.at

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    timer = timing.GpuTimer(torch.device("cpu"), warmup_ms=1, rep_ms=6, min_reps=2, max_reps=10)
    timer._flush = torch.empty(8, dtype=torch.int8)

    def fn(state):
        Event.clock += state
        log.append("call")

    assert timer.median_ms_with_setup(lambda: log.append("setup") or 2.0, fn) == 3.0  # 1 (record) + 2 (work)
    calls = ["setup", "record", "call", "record"]
    # warm-up, estimate (3 ms: 2 calls for 6 ms), then 2 timed calls queued back to back.
    assert log == calls + ["sync"] + calls + ["sync"] + calls * 2 + ["sync"], log


def test_config_sweep_runs_the_kernels_it_tunes():
    """benchmarks.sweep_configs drives the kernels through their own launchers with the configuration
    forced: every configuration runs (none fails on a signature) and the forced block size is the one used."""
    from benchmarks import sweep_configs
    from focal_kernels.kernels import token_logps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seen = []
    real = token_logps.token_logps_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs["BLOCK_V"])
                return real[grid](*args, **kwargs)
            return launch

    token_logps.token_logps_kernel = Spy()
    try:
        rows = sweep_configs.sweep(100, 3, torch.float32, blocks=(16, 64, 256), warps=(1, 2), device=device)
    finally:
        token_logps.token_logps_kernel = real
    # 256 > next_power_of_2(100) = 128 is skipped
    assert [(row["block_v"], row["num_warps"]) for row in rows] == [(16, 1), (16, 2), (64, 1), (64, 2)]
    assert all(row["fwd_ms"] > 0 and row["bwd_ms"] > 0 for row in rows)
    assert sorted(set(seen[1:])) == [16, 64]  # seen[0]: the statistics, with the default configuration


def test_gradient_digest_compares_split_and_concatenated_and_catches_wrong_gradients(capsys):
    """The benchmarks' gradient check (measure.gradient_digest, gradient_rel_diff, runner.compare_with_ours and
    record_row): the same gradients give the same digest whether chosen and rejected come split or
    concatenated (1-D ones too), expanded or not, and whatever the block size; a sign, a scale, a swap of two
    rows or of two columns, a 10% error, a NaN or inf on either side, or a missing group are caught; a NaN in
    ours' gradients is flagged on ours' row, not blamed on the others."""
    from benchmarks.measure import gradient_digest, gradient_rel_diff
    from benchmarks.runner import compare_with_ours, record_row

    chosen, rejected, weight, bias = torch.randn(2, 3, 5), torch.randn(2, 3, 5), torch.randn(7, 5), torch.randn(7)
    split = gradient_digest([("hidden", chosen), ("hidden", rejected), ("weight", weight), ("bias", bias[:3]),
                             ("bias", bias[3:])])
    joined = gradient_digest([("hidden", torch.cat([chosen, rejected])), ("weight", weight), ("bias", bias)],
                             chunk_elements=11)
    assert gradient_rel_diff(joined, split) < 1e-6
    expanded = torch.randn(1, 3, 5).expand(2, 3, 5)  # walked along its leading index, never copied whole
    assert gradient_digest([("h", expanded)], chunk_elements=7)["h"] == pytest.approx(
        gradient_digest([("h", expanded.contiguous())])["h"], rel=1e-6)
    assert gradient_digest([("empty", torch.zeros(3, 0))])["empty"][0] == 0.0
    norm, *projections = split["hidden"]
    assert norm == pytest.approx(torch.cat([chosen, rejected]).double().norm().item())
    assert len(projections) == 16 and all(p != 0.0 for p in projections)

    def rel_diff(changed_weight, ours=split):
        return gradient_rel_diff(gradient_digest([("hidden", chosen), ("hidden", rejected),
                                                  ("weight", changed_weight)]), ours)

    assert 5e-4 < rel_diff(weight * (1 + 1e-3)) < 5e-3  # a rounding-sized difference stays that size
    noise = torch.randn_like(weight) * (0.1 * weight.norm() / weight.numel() ** 0.5)  # 10% of the gradient
    for wrong in (-weight, 2 * weight, weight[[1, 0, *range(2, 7)]], weight[:, [1, 0, 2, 3, 4]], weight + noise):
        assert rel_diff(wrong) > 0.05
    for bad in (float("nan"), float("inf")):
        broken = weight.clone()
        broken[3, 2] = bad
        assert math.isnan(rel_diff(broken))  # a baseline's
        assert math.isnan(rel_diff(weight, ours=gradient_digest([("weight", broken)])))  # ours'
    assert gradient_rel_diff({"hidden": split["hidden"]}, split) == 0.0  # a frozen head: the hidden states only
    assert gradient_rel_diff({"logits": [1.0, 0.5]}, split) is None  # nothing in common
    zero = {"hidden": [0.0, 0.0]}
    assert gradient_rel_diff(zero, zero) == 0.0 and gradient_rel_diff({"hidden": [1.0, 0.0]}, zero) == math.inf

    def row(name, digest, diff=None):
        return {"name": name, "impl": name, "status": "ok", "note": "", "fwd_ms": None, "bwd_ms": None,
                "fwdbwd_ms": None, "loss": 1.0, "loss_comparable": True, "loss_rel_diff_vs_ours": 0.0,
                "loss_tolerance": 1e-3, "grad_digest": digest, "grad_rel_diff_vs_ours": diff, "grad_tolerance": 2e-2}

    # A row whose gradients differ beyond its tolerance is flagged in its note and on the console, NaN included.
    for diff, flagged in ((1e-3, False), (0.5, True), (math.nan, True)):
        measured = row("x", split, diff)
        record_row(measured, [], {"rows": []}, lambda rows: None, lambda r: "")
        assert ("GRADIENT DIFFERS" in measured["note"]) == flagged, measured
        assert ("GRADIENT DIFFERS" in capsys.readouterr().out) == flagged
    # Ours' NaN: ours' row says so; the next row, whose gradients are fine, is not compared with it.
    nan_weight = weight.clone()
    nan_weight[0, 0] = float("nan")
    rows, results = [], {"rows": []}
    for measured in (row("ours", gradient_digest([("weight", nan_weight)])), row("other", split)):
        record_row(measured, rows, results, compare_with_ours, lambda r: "")
    assert "GRADIENT NOT FINITE" in rows[0]["note"] and rows[1]["note"] == "", rows
    assert rows[1]["grad_rel_diff_vs_ours"] is None
    # Ours' fine, another's NaN: that row says its gradients are not finite.
    rows, results = [], {"rows": []}
    for measured in (row("ours", split), row("other", gradient_digest([("weight", nan_weight)]))):
        record_row(measured, rows, results, compare_with_ours, lambda r: "")
    assert rows[0]["note"] == "" and "GRADIENT NOT FINITE" in rows[1]["note"], rows
