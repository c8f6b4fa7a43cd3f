"""The issues' targets, read off a run's rows: one Markdown table of goal, measured value and met / missed,
written into bench.md / fused.md (and the JSON's "targets") so a GPU run is judged without arithmetic.

A target needs its rows in the same run and shape; where one is missing (a baseline not installed, a shape
not run, a CPU run's tiny shapes) the line says "not in this run". On a CPU run every verdict is about CPU
timings through Triton's interpreter and means nothing.
"""

from __future__ import annotations

from collections import namedtuple

Target = namedtuple("Target", "what goal applies evaluate")  # applies(shape_rows) -> bool


def _ok(rows, key):
    return next((r for r in rows if r["impl"] == key and r["status"] == "ok"), None)


def _time_ratio(rows, numerator, denominator):
    """fwd+bwd time of one row over another's, or None when either is missing."""
    a, b = _ok(rows, numerator), _ok(rows, denominator)
    if a is None or b is None or not a["fwdbwd_ms"] or not b["fwdbwd_ms"]:
        return None
    return a["fwdbwd_ms"] / b["fwdbwd_ms"]


def _ratio(rows, slower, faster, at_least):
    """(text, met) for time(slower) / time(faster) >= at_least, or None when a row is missing."""
    ratio = _time_ratio(rows, slower, faster)
    return None if ratio is None else (f"{ratio:.3f}×", ratio >= at_least)


def _at_most(rows, key, reference, limit):
    """(text, met) for time(key) / time(reference) <= limit."""
    ratio = _time_ratio(rows, key, reference)
    return None if ratio is None else (f"{ratio:.3f}×", ratio <= limit)


def _pct_copy(rows, key, at_least):
    row = _ok(rows, key)
    if row is None or row["fwdbwd_pct_copy"] is None:
        return None
    return f"{row['fwdbwd_pct_copy']:.1f}%", row["fwdbwd_pct_copy"] >= at_least


def _faster_at_less_memory(rows, key, other, at_least, memory_fraction):
    """(text, met): time(other) / time(key) >= at_least and net memory(key) <= memory_fraction · other's."""
    speed = _ratio(rows, other, key, at_least)
    if speed is None:
        return None
    mine, theirs = (_ok(rows, k)["peak_extra_bytes_without_grads"] for k in (key, other))
    if mine is None or not theirs:
        return f"{speed[0]}, memory not measured", None
    share = mine / theirs
    return f"{speed[0]}, {share:.2f} of its net memory", speed[1] and share <= memory_fraction


def _logits_shape(vocab, tokens=16384):
    return lambda rows: (rows[0]["vocab"], rows[0]["tokens"], rows[0]["dtype"], rows[0]["ignored_fraction"]) == (
        vocab, tokens, "bf16", 0.0)


LOGITS_TARGETS = [
    *(Target(f"{name} fwd+bwd, V={vocab}, 16K tokens, bf16", f"≥ {pct}% of copy", _logits_shape(vocab),
             lambda rows, key=key, pct=pct: _pct_copy(rows, key, pct))
      for vocab, pct in ((32000, 85), (50257, 85), (128256, 93))
      for key, name in (("ours", "ours"), ("novalidate", "ours (no label check)"))),
    Target("packed layout's fwd+bwd time / padded's (seqlogps packed / padded)", "≤ 1.02× (2% noise allowance)",
           lambda rows: True, lambda rows: _at_most(rows, "packed", "padded", 1.02)),
]


def _liger_goal(rows):
    return 1.10 if rows[0]["seq_len"] <= 2048 else 1.00


FUSED_TARGETS = [
    Target("frozen head: trainable ours / ours (frozen head)", "≥ 1.4×", lambda rows: True,
           lambda rows: _ratio(rows, "ours", "ours_frozen", 1.4)),
    Target("frozen head: TRL fused head, frozen weight / ours (frozen head)", "≥ 1.3×", lambda rows: True,
           lambda rows: _ratio(rows, "trl_frozen", "ours_frozen", 1.3)),
    Target("memory_budget: Liger fused DPO / ours (memory_budget), at ≤ Liger's net memory",
           "≥ 1.10× at 4 × 2048, ≥ 1.00× at 4 × 4096; ≤ 1.00",
           lambda rows: True,
           lambda rows: _faster_at_less_memory(rows, "ours_budget", "liger", _liger_goal(rows), 1.0)),
    Target("trainable head, default: ours / ours GEMMs only", "≤ 1.05×", lambda rows: True,
           lambda rows: _at_most(rows, "ours", "gemms", 1.05)),
    Target("trainable head, default: TRL fused head / ours, at ≤ 1/3 of TRL's net memory", "≥ 1.00×, ≤ 0.33",
           lambda rows: True, lambda rows: _faster_at_less_memory(rows, "ours", "trl", 1.00, 1 / 3)),
]


def evaluate(targets, rows, group_key) -> list:
    """[{target, goal, shape, measured, met}] for every target and every shape group it applies to."""
    groups = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    out = []
    for target in targets:
        found = False
        for shape, shape_rows in groups.items():
            if not target.applies(shape_rows):
                continue
            result = target.evaluate(shape_rows)
            if result is not None:
                found = True
                out.append({"target": target.what, "goal": target.goal, "shape": shape, "measured": result[0],
                            "met": result[1]})
        if not found:
            out.append({"target": target.what, "goal": target.goal, "shape": "—", "measured": "not in this run",
                        "met": None})
    return out


def markdown(evaluated: list, gpu_timings: bool) -> list:
    """Lines of the target table (with a warning on a CPU run)."""
    lines = ["", "## Targets", ""]
    if not gpu_timings:
        lines += ["CPU run: these verdicts compare CPU timings through Triton's interpreter and mean nothing.", ""]
    lines += ["| target | shape | goal | measured | met |", "|---|---|---|---|---|"]
    verdict = {True: "met", False: "**missed**", None: "—"}
    lines += [f"| {t['target']} | {t['shape']} | {t['goal']} | {t['measured']} | {verdict[t['met']]} |"
              for t in evaluated]
    return lines
