#!/usr/bin/env bash
# One device check for a lent GPU (about 4 minutes on an H100): the test suite on CUDA, then
# `python -m benchmarks --quick`. Everything is written flat into $OUT (else ./bench_out), since only
# a few files come back from there: env.log, tests.log, bench.log, bench.json, bench.md, bench.png.
# The benchmark runs even when a test fails; the exit status is non-zero if either failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out_dir="${OUT:-./bench_out}"
mkdir -p "$out_dir"

{
    nvidia-smi
    python -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$out_dir/env.log"

echo "== tests: python -m pytest -x -q tests"
timeout 150 python -m pytest -x -q tests 2>&1 | tee "$out_dir/tests.log"
tests_rc=$?

echo "== benchmark: python -m benchmarks --quick --out $out_dir"
timeout 210 python -m benchmarks --quick --out "$out_dir" 2>&1 | tee "$out_dir/bench.log"
bench_rc=$?

echo
echo "tests exit status: $tests_rc; benchmark exit status: $bench_rc (124 = timed out)"
echo
if [ -f "$out_dir/bench.md" ]; then
    cat "$out_dir/bench.md"
else
    echo "no $out_dir/bench.md was written"
fi
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
