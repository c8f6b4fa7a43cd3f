#!/usr/bin/env bash
# One device check for a lent GPU (about 5 minutes on an H200): the test suite on CUDA, the quick
# logits-path benchmark, three larger logits-path shapes, and the hidden-state (fused linear) benchmark;
# SWEEP=1 adds the launch-configuration sweep. Results go into $OUT (else ./bench_out), where at most 8
# files come back: tests.log, bench.{json,md,png}, grid/bench.{json,md}, fused.{json,md}.
# Each step runs even when an earlier one failed; the exit status is non-zero if any failed.
#
# Baselines that are not on the GPU image (TRL, Liger-Kernel, Cut Cross-Entropy) can travel as wheels in
# ./.whl (see benchmarks/NOTES.md); they are installed into /tmp/site here, without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out_dir="${OUT:-./bench_out}"
mkdir -p "$out_dir"

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

{
    nvidia-smi
    python -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
    echo "== tests: python -m pytest -q tests -k 'not smoke'"
    timeout 120 python -m pytest -q -k "not smoke" tests
} 2>&1 | tee "$out_dir/tests.log"
tests_rc=$?

echo "== benchmark: python -m benchmarks --quick --out $out_dir"
timeout 90 python -m benchmarks --quick --out "$out_dir" 2>&1 | tee /tmp/bench.log | grep -v "^|"
bench_rc=$?

echo "== benchmark, larger shapes: python -m benchmarks --shapes 151936x16K,256000x16K,128256x64K --dtypes bf16 --ignored-fraction 0"
timeout 80 python -m benchmarks --shapes 151936x16K,256000x16K,128256x64K --dtypes bf16 --ignored-fraction 0 \
    --out "$out_dir/grid" 2>&1 | tee /tmp/grid.log | grep -v "^|"
grid_rc=$?
rm -f "$out_dir/grid/bench.png"  # at most 8 files come back from $OUT

echo "== fused-linear benchmark: python -m benchmarks.fused_linear --impls ours,gemms,matmul,eager,trl,liger,cce --chunk-sizes 2048,8192"
timeout 150 python -m benchmarks.fused_linear --impls ours,gemms,matmul,eager,trl,liger,cce --chunk-sizes 2048,8192 \
    --out "$out_dir" 2>&1 \
    | tee /tmp/fused.log | grep -v "^|"
fused_rc=$?

if [ "${SWEEP:-0}" = "1" ]; then  # the launch-configuration sweep behind kernels/config.py (about a minute)
    timeout 120 python -m benchmarks.sweep_configs --dtypes bfloat16 float32 --vocab 32000 128256 2>&1 | tail -n 8
fi

echo
echo "exit status: tests $tests_rc, benchmark $bench_rc, larger shapes $grid_rc, fused $fused_rc (124 = timed out)"
tail -n 3 "$out_dir/tests.log"
for table in bench.md grid/bench.md fused.md; do
    echo
    if [ -f "$out_dir/$table" ]; then cat "$out_dir/$table"; else echo "no $out_dir/$table was written"; fi
done
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$grid_rc" -eq 0 ] && [ "$fused_rc" -eq 0 ]
