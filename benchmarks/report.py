"""Results on disk and on screen: the JSON file, the Markdown table and its header."""

from __future__ import annotations

import json
import math
import os
import sys

from . import targets

COLUMNS = ("vocab", "tokens", "dtype", "ignored", "impl", "fwd ms", "bwd ms", "fwd+bwd ms",
           "fwd GB/s (% copy)", "bwd GB/s (% copy)", "fwd+bwd GB/s (% copy)", "peak extra MiB",
           "ours faster (fwd+bwd)", "note")


def _ms(value) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value < 100 else f"{value:.1f}"


def _bandwidth(gbps, pct) -> str:
    if gbps is None:
        return "—"
    text = f"{gbps:.0f}" if gbps >= 10 else f"{gbps:.3g}"
    return f"{text} ({pct:.0f}%)" if pct is not None else text


def _row_cells(row: dict) -> list:
    phases = ("fwd", "bwd", "fwdbwd")
    peak = row["peak_extra_bytes"]
    note = row["note"] if row["status"] == "ok" else f"{row['status'].upper()}: {row['note']}"
    if row["status"] == "ok" and row.get("bwd_method") == "fresh_graph":
        note = "bwd on fresh graphs" + (f"; {note}" if note else "")
    if row["impl"] == "ours":
        speedup = "—"
    elif row["speedup_fwdbwd"] is not None:
        speedup = f"{row['speedup_fwdbwd']:.3g}×"
    else:
        speedup = "—"
    return [str(row["vocab"]), str(row["tokens"]), row["dtype"], f"{row['ignored_fraction']:.0%}", row["name"],
            *(_ms(row[f"{p}_ms"]) for p in phases),
            *(_bandwidth(row[f"{p}_gbps"], row[f"{p}_pct_copy"]) for p in phases),
            f"{peak / 2**20:.0f}" if peak is not None else "n/a", speedup, note.replace("|", "/")]


def markdown_table(rows: list) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_row_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def commit_line(meta: dict) -> str:
    commit = meta.get("commit")
    if not commit:
        return "Commit: unknown (no git checkout and no BENCH_COMMIT)"
    dirty = {True: " + uncommitted changes to tracked files", False: " (clean tree)", None: " (tree state unknown)"}
    return f"Commit: {commit[:12]}{dirty[meta.get('commit_dirty')]}"


def header_lines(meta: dict) -> list:
    lines = [commit_line(meta),
             f"Device: {meta['device_name']} ({meta['device']}), torch {meta['torch']}, triton {meta['triton']}, "
             f"CUDA {meta['cuda']}",
             f"Timing: {meta['timer']}",
             f"Device copy bandwidth (same run, read+write): {meta['copy']['gbps']:.0f} GB/s"
             if meta.get("copy") else "Device copy bandwidth: not measured"]
    if not meta["gpu_timings"]:
        lines.insert(0, "**CPU RUN: these are NOT GPU timings** (Triton interpreter "
                        f"{'on' if meta['triton_interpreter'] else 'off'}; tiny shapes; smoke test only).")
    return lines


def print_start(meta: dict, device) -> None:
    """The device / timer lines (no copy bandwidth yet), and a warning when these are not GPU timings."""
    print("\n".join(header_lines({**meta, "copy": None})[:-1]), flush=True)
    if device.type != "cuda":
        print("No CUDA device: tiny shapes, kernels through Triton's interpreter. NOT GPU timings.", flush=True)


def print_end(header: list, table: str, rows: list, failed_statuses) -> int:
    """Header and table on stdout; exit status 1 (and a line on stderr) when ours failed on a shape (its
    status is in failed_statuses) or succeeded on none, else 0."""
    print("\n".join(header))
    print()
    print(table, flush=True)
    ours_failed = [r for r in rows if r["impl"] == "ours" and r["status"] in failed_statuses]
    ours_ok = [r for r in rows if r["impl"] == "ours" and r["status"] == "ok"]
    if ours_failed or not ours_ok:
        print(f"\nours failed on {len(ours_failed)} shape(s), succeeded on {len(ours_ok)}", file=sys.stderr)
        return 1
    return 0


def skip_notes(results: dict) -> list:
    """Markdown bullets: skipped implementations, skipped shapes, and whether the run is incomplete."""
    notes = [f"- skipped {name}: {reason}" for name, reason in results["skipped_implementations"]]
    notes += [f"- skipped shape {item['shape']}: {item['reason']}" for item in results["skipped_shapes"]]
    if not results.get("complete"):
        notes.append("- run incomplete (partial results)")
    return notes


def markdown_report(results: dict) -> str:
    """Header, notes, then the table last (gpu_check.sh prints this file as its final output)."""
    meta = results["meta"]
    parts = ["# focal-kernels benchmark", "", *(f"{line}  " for line in header_lines(meta)), ""]
    parts.append("Floor bytes: fwd reads valid rows' logits once; bwd reads them once and writes the whole "
                 "gradient once. \"ours faster\" = that row's fwd+bwd time / ours'.")
    parts += skip_notes(results)
    parts += targets.markdown(results["targets"], meta["gpu_timings"])
    parts += ["", "## Rows", "", markdown_table(results["rows"])]
    return "\n".join(parts) + "\n"


def _shape_label(row: dict) -> str:
    return f"V={row['vocab']}, {row['tokens']} tokens, {row['dtype']}, {row['ignored_fraction']:.0%} ignored"


def written_files(out_dir: str, names) -> str:
    """"dir/a, b" for the files this run wrote (names in out_dir)."""
    return ", ".join([os.path.join(out_dir, names[0]), *names[1:]]) if names else "(none)"


def _clean(value):
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


def save(results: dict, out_dir: str) -> None:
    """bench.json and bench.md in out_dir (rewritten after every row)."""
    results["targets"] = targets.evaluate(targets.LOGITS_TARGETS, results["rows"], _shape_label,
                                          results.get("planned_shapes", ()))
    os.makedirs(out_dir, exist_ok=True)
    _write_atomically(os.path.join(out_dir, "bench.json"), json.dumps(_clean(results), indent=1) + "\n")
    _write_atomically(os.path.join(out_dir, "bench.md"), markdown_report(results))
