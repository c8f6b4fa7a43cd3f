#!/usr/bin/env bash
# One device check for a lent GPU (about 6 minutes on an H100 / H200): the test suite on CUDA, the quick
# logits-path benchmark, the quick hidden-state (fused linear) benchmark, and a sweep of the row kernels'
# launch configurations. Everything is written flat into $OUT (else ./bench_out), since at most 8 files
# come back from there: tests.log, bench.log, bench.json, bench.md, bench.png, fused.json, fused.md,
# sweep.log. Each step runs even when an earlier one failed; the exit status is non-zero if any failed.
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
    timeout 150 python -m pytest -q -k "not smoke" tests
} 2>&1 | tee "$out_dir/tests.log"
tests_rc=$?

echo "== benchmark: python -m benchmarks --quick --out $out_dir"
timeout 200 python -m benchmarks --quick --out "$out_dir" 2>&1 | tee "$out_dir/bench.log"
bench_rc=$?

echo "== fused-linear benchmark: python -m benchmarks.fused_linear --quick --impls ours,matmul,eager,trl,liger,cce"
timeout 150 python -m benchmarks.fused_linear --quick --impls ours,matmul,eager,trl,liger,cce --out "$out_dir" 2>&1 \
    | tail -n 40
fused_rc=$?

echo "== launch-configuration sweep: python -m benchmarks.sweep_configs --dtypes bfloat16 float32 --vocab 128256"
timeout 80 python -m benchmarks.sweep_configs --dtypes bfloat16 float32 --vocab 128256 2>&1 | tee "$out_dir/sweep.log" \
    | tail -n 4
sweep_rc=$?

echo
echo "exit status: tests $tests_rc, benchmark $bench_rc, fused $fused_rc, sweep $sweep_rc (124 = timed out)"
tail -n 3 "$out_dir/tests.log"
for table in bench.md fused.md; do
    echo
    if [ -f "$out_dir/$table" ]; then cat "$out_dir/$table"; else echo "no $out_dir/$table was written"; fi
done
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$fused_rc" -eq 0 ] && [ "$sweep_rc" -eq 0 ]
