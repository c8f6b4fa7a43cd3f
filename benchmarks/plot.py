"""bench.png: fwd+bwd effective bandwidth against vocabulary size per implementation, and peak extra
memory bars. Skipped with a message when matplotlib is not installed."""

from __future__ import annotations

import os
from collections import Counter


def _main_tokens(rows):
    """The token count most rows share (ties: the larger), so each panel compares like with like."""
    counts = Counter(r["tokens"] for r in rows)
    return max(counts, key=lambda t: (counts[t], t))


def save_plot(results: dict, out_dir: str):
    """Write out_dir/bench.png and return its path, or None (with the reason printed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"plot skipped: matplotlib not available ({type(exc).__name__}: {exc})", flush=True)
        return None
    rows = [r for r in results["rows"] if r["status"] == "ok" and r["fwdbwd_gbps"] is not None]
    if not rows:
        print("plot skipped: no successful rows", flush=True)
        return None
    tokens = _main_tokens(rows)
    rows = [r for r in rows if r["tokens"] == tokens]
    impls = list(dict.fromkeys(r["name"] for r in rows))
    panels = sorted({(r["dtype"], r["ignored_fraction"]) for r in rows})

    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5.5 * (len(panels) + 1), 4.5), squeeze=False)
    axes = axes[0]
    copy = (results["meta"].get("copy") or {}).get("gbps")
    for ax, (dtype, ignored) in zip(axes, panels):
        for impl in impls:
            points = sorted((r["vocab"], r["fwdbwd_gbps"]) for r in rows
                            if r["name"] == impl and r["dtype"] == dtype and r["ignored_fraction"] == ignored)
            if points:
                ax.plot(*zip(*points), marker="o", label=impl)
        if copy:
            ax.axhline(copy, color="gray", linestyle="--", linewidth=1, label="device copy")
        ax.set_xscale("log")
        ax.set_xlabel("vocabulary size")
        ax.set_ylabel("fwd+bwd effective GB/s (floor bytes)")
        ax.set_title(f"{tokens} tokens, {dtype}, {ignored:.0%} ignored")
        ax.legend(fontsize=8)

    ax = axes[-1]
    groups = sorted({(r["vocab"], r["dtype"]) for r in rows if r["peak_extra_bytes"] is not None})
    width = 0.8 / max(len(impls), 1)
    for i, impl in enumerate(impls):
        heights = []
        for vocab, dtype in groups:
            match = [r["peak_extra_bytes"] for r in rows if r["name"] == impl and r["vocab"] == vocab
                     and r["dtype"] == dtype and r["peak_extra_bytes"] is not None]
            heights.append(max(match) / 2**30 if match else 0.0)
        ax.bar([g + i * width for g in range(len(groups))], heights, width, label=impl)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"V={v}\n{d}" for v, d in groups], fontsize=8)
    ax.set_ylabel("peak extra memory, one fwd+bwd (GiB)")
    ax.set_title(f"peak memory above inputs, {tokens} tokens" if groups else "peak memory: not measured (CPU)")
    if groups:
        ax.legend(fontsize=8)

    fig.suptitle(f"focal-kernels on {results['meta']['device_name']}"
                 + ("" if results["meta"]["gpu_timings"] else " (CPU: NOT GPU timings)"))
    fig.tight_layout()
    path = os.path.join(out_dir, "bench.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
