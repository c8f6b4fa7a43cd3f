"""`python -m benchmarks`: time focal_po_loss against its baselines; table on stdout, JSON + PNG in --out.

    python -m benchmarks --quick                         # V=128256 and 32000 at 16K tokens, bf16
    python -m benchmarks                                 # the full grid: 4 vocabularies x 3 token counts x 2 dtypes x 2
    python -m benchmarks --shapes 151936x16K --dtypes fp32 --baselines eager,compile
    python -m benchmarks fused-linear --quick            # the hidden-state path (= python -m benchmarks.fused_linear)
Without a GPU every run uses tiny shapes through Triton's interpreter, and says its times are not GPU times.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from . import shapes as shape_lib
from .baselines import BASELINES, default_baselines
from .environment import bench_device, describe
from .impls import build_impls
from .plot import save_plot
from .report import header_lines, markdown_table, print_end, print_start, save, written_files
from .runner import run
from .timing import copy_bandwidth, make_timer


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", help="VOCABxTOKENS list, e.g. 128256x16K,32000x4K (replaces --vocab/--tokens)")
    p.add_argument("--vocab", help="vocabulary sizes, e.g. 32000,128256 (default: 32000,128256,151936,256000)")
    p.add_argument("--tokens", help="total tokens, chosen + rejected, e.g. 4K,16K,64K (the default)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048; 5 without a GPU)")
    p.add_argument("--dtypes", help="bf16,fp32 (default) or fp16")
    p.add_argument("--ignored-fraction", help="fraction of each sequence's labels ignored as prompt (default 0,0.4)")
    p.add_argument("--baselines", help=f"comma list of {','.join(BASELINES)}, 'all' or 'none' "
                                       "(default all; compile is left out without a GPU). Ours always runs.")
    p.add_argument("--quick", action="store_true",
                   help="V=128256 16K bf16 at 0%% and 40%% ignored, plus V=32000 16K bf16 (tiny without a GPU)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes even on a GPU (a fast smoke run)")
    p.add_argument("--max-sets", type=int, default=3, help="input sets rotated through timed calls (default 3)")
    p.add_argument("--reps", type=int, help="timed calls per phase on the CPU (default 3 with --quick, else 5); "
                                            "on a GPU do_bench sizes the count to a time budget")
    p.add_argument("--out", default="bench_out", help="directory for bench.json, bench.md, bench.png")
    return p.parse_args(argv)


def choose_shapes(args, device):
    tiny = args.tiny or device.type != "cuda"
    if args.quick:
        given = [o for o in ("shapes", "vocab", "tokens", "dtypes", "ignored_fraction") if getattr(args, o)]
        if given:
            print(f"note: --quick fixes the shapes; ignoring --{', --'.join(g.replace('_', '-') for g in given)}")
        return shape_lib.quick_shapes(tiny)
    seq_len = args.seq_len or (shape_lib.TINY_SEQ_LEN if tiny else shape_lib.GPU_SEQ_LEN)
    dtypes = shape_lib.parse_list(args.dtypes, shape_lib.parse_dtype) if args.dtypes else shape_lib.FULL_DTYPES
    ignored = (shape_lib.parse_list(args.ignored_fraction, float) if args.ignored_fraction
               else shape_lib.FULL_IGNORED)
    if args.shapes:
        pairs = shape_lib.parse_list(args.shapes, shape_lib.parse_vocab_tokens)
        return [shape_lib.make_shape(v, t, d, f, seq_len) for d in dtypes for v, t in pairs for f in ignored]
    vocabs = (shape_lib.parse_list(args.vocab, int) if args.vocab
              else shape_lib.TINY_VOCABS if tiny else shape_lib.FULL_VOCABS)
    tokens = (shape_lib.parse_list(args.tokens, shape_lib.parse_count) if args.tokens
              else shape_lib.TINY_TOKENS if tiny else shape_lib.FULL_TOKENS)
    return shape_lib.grid(vocabs, tokens, dtypes, ignored, seq_len)


def choose_baselines(text, device):
    if not text or text == "all":
        return default_baselines(device)
    if text == "none":
        return []
    return shape_lib.parse_names(text, BASELINES, "baseline")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fused-linear"]:
        from . import fused_linear

        return fused_linear.main(argv[1:])
    args = parse_args(argv)
    device = bench_device()
    try:
        shapes = choose_shapes(args, device)
    except ValueError as exc:
        raise SystemExit(f"bad shape option: {exc}")
    meta = describe(device)
    timer = make_timer(device, args.quick, args.reps)
    meta["timer"] = timer.kind
    meta["args"] = vars(args)
    print_start(meta, device)

    impls, skipped = build_impls(BASELINES, choose_baselines(args.baselines, device), device)
    for name, reason in skipped:
        print(f"skipping {name}: {reason}", flush=True)
    if device.type != "cuda" and "compile" not in (args.baselines or ""):
        skipped.append(("torch.compile", "left out on the CPU (compiling would outlast the smoke run); "
                                         "ask with --baselines compile"))
        print(f"skipping torch.compile: {skipped[-1][1]}", flush=True)

    results = {"meta": meta, "skipped_implementations": skipped, "skipped_shapes": [], "rows": [],
               "complete": False, "planned_shapes": [shape.row_fields() for shape in shapes]}
    started = time.perf_counter()
    try:
        meta["copy"] = copy_bandwidth(device, timer)
        print(f"device copy bandwidth: {meta['copy']['gbps']:.0f} GB/s (read+write, "
              f"{meta['copy']['buffer_bytes'] / 2**30:.2f} GiB buffer)", flush=True)
    except Exception as exc:  # the rows still get times and GB/s, only "% copy" goes missing
        meta["copy"] = None
        print(f"copy bandwidth not measured: {type(exc).__name__}: {exc}", flush=True)
    save(results, args.out)

    copy_gbps = meta["copy"]["gbps"] if meta["copy"] else None
    run(shapes, impls, timer, device, copy_gbps, args.max_sets, results, on_update=lambda: save(results, args.out))
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    results["complete"] = True
    save(results, args.out)
    written = ["bench.json", "bench.md"]
    try:
        if save_plot(results, args.out):
            written.append("bench.png")
    except Exception as exc:
        print(f"plot failed: {type(exc).__name__}: {exc}", flush=True)
    stale = os.path.join(args.out, "bench.png")
    if "bench.png" not in written and os.path.exists(stale):  # an earlier run's plot would pass for this one's
        os.remove(stale)
        print(f"removed {stale} (an earlier run's plot)", flush=True)

    print(f"\nfinished in {meta['wall_s']} s; results in {written_files(args.out, written)}\n")
    # An out-of-memory row of ours is reported, not counted as a failure.
    return print_end(header_lines(meta), markdown_table(results["rows"]), results["rows"], ("error",))


if __name__ == "__main__":
    sys.exit(main())
