"""The benchmark loop: for each shape, make the input sets, time every implementation, record a row.

`run_implementation`, `compare_with_ours` and `record_row` are shared with the hidden-state benchmark
(fused_linear.py): one way to measure, fail, retry and compare. A failure stays local: an implementation
that runs out of memory is retried once with a single input set (the others freed), then recorded as OOM;
any other exception is recorded as an error with its message. `on_update` is called after every row so
partial results reach disk as the run goes.
"""

from __future__ import annotations

import time
import traceback

from .environment import is_out_of_memory, release_memory
from .inputs import make_input_set, plan_input_sets
from .measure import PHASES, digest_is_finite, gradient_rel_diff, measure


def new_row(shape, impl, input_sets: int) -> dict:
    return {
        **shape.row_fields(), "impl": impl.key, "name": impl.name, "status": "ok",
        "note": impl.note, "input_sets": input_sets,
        **{f"{p}_ms": None for p in PHASES}, "bwd_method": None,
        **{f"{p}_bytes": b for p, b in shape.floor_bytes().items()},
        **{f"{p}_gbps": None for p in PHASES}, **{f"{p}_pct_copy": None for p in PHASES},
        "peak_extra_bytes": None, **comparison_fields(impl),
        "gradient_in_forward": impl.gradient_in_forward,
        "warmup_s": None, **{f"speedup_{p}": None for p in PHASES},
    }


def loss_fields(impl) -> dict:
    """Whether a row's loss and gradients are compared with ours', and within what relative difference."""
    return {"loss_comparable": impl.loss_tolerance is not None, "loss_tolerance": impl.loss_tolerance,
            "grad_tolerance": impl.grad_tolerance}


def comparison_fields(impl) -> dict:
    """A new row's loss and gradient fields (both benchmarks): the tolerances, the values still to measure."""
    return {"loss": None, **loss_fields(impl), "loss_rel_diff_vs_ours": None, "grad_digest": None,
            "grad_rel_diff_vs_ours": None}


def like_for_like_phases(row: dict) -> tuple:
    """The phases whose time compares with ours': only fwd+bwd for an implementation that computes its
    gradients in its forward (its fwd holds its backward's work, its bwd only a scaling)."""
    return ("fwdbwd",) if row.get("gradient_in_forward") else PHASES


def fill_timings(row: dict, m) -> None:
    """The measurement's fields every row has (both benchmarks)."""
    note = "; ".join(text for text in (row["note"], m.bwd_note) if text)
    row.update(fwd_ms=m.fwd_ms, bwd_ms=m.bwd_ms, fwdbwd_ms=m.fwdbwd_ms, bwd_method=m.bwd_method, note=note,
               peak_extra_bytes=m.peak_extra_bytes, loss=m.loss, warmup_s=round(m.warmup_s, 3),
               grad_digest=m.grad_digest)


def _fill_bandwidth(row: dict, m, copy_gbps: float) -> None:
    fill_timings(row, m)
    for phase in like_for_like_phases(row):  # another phase's bytes are not what such a row moves there
        ms = row[f"{phase}_ms"]
        if ms and ms > 0:
            gbps = row[f"{phase}_bytes"] / ms / 1e6
            row[f"{phase}_gbps"] = gbps
            row[f"{phase}_pct_copy"] = 100.0 * gbps / copy_gbps if copy_gbps else None


def compare_with_ours(shape_rows: list, more=None) -> None:
    """Per phase, each row's time over ours' (speedup_<phase>: >1 ours faster), the loss' relative difference
    where the row computes the same loss, the gradients' (measure.gradient_rel_diff) where it computes the
    same gradients, and `more(row, ours)` for a benchmark's own comparisons."""
    ours = next((r for r in shape_rows if r["impl"] == "ours" and r["status"] == "ok"), None)
    if ours is None:
        return
    for row in shape_rows:
        if row["status"] != "ok":
            continue
        for phase in like_for_like_phases(row):
            mine, theirs = ours.get(f"{phase}_ms"), row.get(f"{phase}_ms")
            if mine and theirs:
                row[f"speedup_{phase}"] = theirs / mine
        if row["loss"] is not None and ours["loss"] is not None and row["loss_comparable"]:
            row["loss_rel_diff_vs_ours"] = abs(row["loss"] - ours["loss"]) / max(abs(ours["loss"]), 1e-6)
        if row is not ours and row["grad_tolerance"] is not None and digest_is_finite(ours["grad_digest"]):
            row["grad_rel_diff_vs_ours"] = gradient_rel_diff(row["grad_digest"], ours["grad_digest"])
        if more is not None:
            more(row, ours)


def describe_failure(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def run_implementation(impl, shape, sets: list, timer, device, row: dict, shape_rows: list, fill,
                       phases=PHASES) -> dict:
    """Measure impl on sets into row (`fill(row, measurement)`), or record why it could not be."""
    started = time.perf_counter()
    while True:
        status = note = None
        try:
            impl.prepare(shape, shape_rows)
            row["note"] = impl.note  # prepare may have set it (e.g. the memory budget chosen), and the tolerance
            row.update(loss_fields(impl))
            m = measure(impl, sets, timer, device, phases)
        except Exception as exc:  # one implementation's failure must not end the run
            status = "oom" if is_out_of_memory(exc) else "error"
            note = describe_failure(exc)
            if status == "error":
                print(f"  {impl.name}: error\n" + "".join(traceback.format_exc(limit=-4)), flush=True)
        if status is None:
            fill(row, m)
            break
        release_memory()  # outside the except block: the traceback no longer holds the tensors
        if status == "oom" and len(sets) > 1:
            print(f"  {impl.name}: out of memory with {len(sets)} input sets; retrying with 1", flush=True)
            del sets[1:]
            release_memory()
            row["input_sets"] = 1
            continue
        row["status"], row["note"] = status, note
        break
    row["wall_s"] = round(time.perf_counter() - started, 2)
    return row


def _summary(row: dict) -> str:
    if row["status"] != "ok":
        return f"  {row['name']}: {row['status'].upper()} {row['note']}"
    peak = row["peak_extra_bytes"]
    peak_text = f"  peak +{peak / 2**20:.0f} MiB" if peak is not None else ""
    return (f"  {row['name']}: fwd {row['fwd_ms']:.3f} ms  bwd {row['bwd_ms']:.3f} ms  "
            f"fwd+bwd {row['fwdbwd_ms']:.3f} ms{peak_text}  ({row['wall_s']} s, warm-up {row['warmup_s']} s)")


def record_row(row: dict, shape_rows: list, results: dict, compare, summarize) -> None:
    """Add a measured row to its shape's rows and to the results, compare the shape's rows with ours
    (`compare`), print its summary line, and flag a loss or gradients that differ from ours beyond the
    row's tolerance, NaN included, and gradients with a NaN or inf (ours' too; its NaN is not blamed on the
    others), in its note, so the tables show it, and on the console."""
    shape_rows.append(row)
    results["rows"].append(row)
    compare(shape_rows)
    print(summarize(row), flush=True)
    def differs(what, key):
        diff, tolerance = row[f"{key}_rel_diff_vs_ours"], row[f"{key}_tolerance"]
        if diff is not None and not diff <= tolerance:  # NaN too
            return f"{what} DIFFERS from ours' by {diff:.2%} (tolerance {tolerance:.0e})"
        return None

    gradient = ("GRADIENT NOT FINITE (NaN or inf)" if not digest_is_finite(row.get("grad_digest"))
                else differs("GRADIENT", "grad"))
    for flag in filter(None, (differs("LOSS", "loss"), gradient)):
        row["note"] = "; ".join(text for text in (row["note"], flag) if text)
        print(f"  WARNING: {row['name']}: {flag}", flush=True)


def run(shapes, impls, timer, device, copy_gbps: float, max_sets: int, results: dict, on_update) -> None:
    """Append rows to results["rows"] and skipped shapes to results["skipped_shapes"]."""
    for shape in shapes:
        print(f"\n== {shape.label()}", flush=True)
        n_sets, reason = plan_input_sets(shape, device, max_sets)
        sets = []
        if reason is None:
            try:
                sets = [make_input_set(shape, device, seed=1000 + i) for i in range(n_sets)]
            except Exception as exc:
                reason = f"could not make inputs: {describe_failure(exc)}"
        if reason is not None:
            sets = []
            release_memory()
            print(f"  skipped: {reason}", flush=True)
            results["skipped_shapes"].append({"shape": shape.label(), "reason": reason})
            on_update()
            continue
        print(f"  {len(sets)} input set(s) of {shape.logits_bytes / 1e9:.3g} GB logits", flush=True)
        shape_rows = []
        for impl in impls:
            row = new_row(shape, impl, len(sets))
            run_implementation(impl, shape, sets, timer, device, row, shape_rows,
                               lambda r, m: _fill_bandwidth(r, m, copy_gbps))
            record_row(row, shape_rows, results, compare_with_ours, _summary)
            on_update()
        del sets, shape_rows
        release_memory()
