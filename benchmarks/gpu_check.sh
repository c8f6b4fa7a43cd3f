#!/usr/bin/env bash
# Device checks for a lent GPU, in phases that each fit in one device call of under 8 minutes:
#
#   bash benchmarks/gpu_check.sh tests          # the GPU test suite (not smoke / distributed / trl), ~1-4 min
#   bash benchmarks/gpu_check.sh bench          # logits path: --quick, larger shapes, logits-small (~3-4 min)
#   bash benchmarks/gpu_check.sh logits-small   # only V = 32000 and 50257 at 16K tokens, validate_labels on/off
#   bash benchmarks/gpu_check.sh fused          # the hidden-state (fused linear) benchmark (~4-5 min)
#   bash benchmarks/gpu_check.sh trl            # the TRL integration's tests and FocalPOTrainer vs DPOTrainer steps
#   bash benchmarks/gpu_check.sh all            # tests, bench, fused in turn (longer than one device call)
#
# Results go into $OUT/<short commit>[-dirty]/ (else ./bench_out/<...>/), so every folder names the commit it
# measured; the JSON and Markdown headers carry the full hash. Without a .git directory (a copied tree), pass
# the hash: BENCH_COMMIT=<hash> bash benchmarks/gpu_check.sh fused. At most 8 files come back from $OUT, two
# folders deep at most; per phase: tests -> tests.log; bench -> bench.{json,md,png}, grid/bench.{json,md},
# small/bench.{json,md}; logits-small -> small/bench.{json,md}; fused -> fused.{json,md}. (all writes 10.)
# Each step runs even when an earlier one failed; the exit status is non-zero if any failed (124: timed out).
#
# Baselines that are not on the GPU image (TRL, Liger-Kernel, Cut Cross-Entropy) can travel as wheels in
# ./.whl (see benchmarks/NOTES.md); they are installed into /tmp/site here, without dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
phase="${1:-all}"
case "$phase" in
    tests|bench|logits-small|fused|trl|all) ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [tests|bench|logits-small|fused|trl|all]" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1
# TRITON_INTERPRET=1 (set for CPU runs) would send the kernels through the interpreter on the GPU too; on a
# machine without CUDA the benchmarks and the tests' conftest set it again themselves.
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

commit="$(git rev-parse HEAD 2>/dev/null || true)"
commit="${commit:-${BENCH_COMMIT:-}}"
export BENCH_COMMIT="$commit"
label="${commit:0:7}"
label="${label:-unknown-commit}"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then label="$label-dirty"; fi
out_dir="${OUT:-./bench_out}/$label"
mkdir -p "$out_dir"
echo "phase $phase, commit ${commit:-unknown}, results in $out_dir"

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

failed=()
tables=()

step() {  # step NAME SECONDS COMMAND...: run with a timeout, table lines (|...) kept off the console
    local name="$1" limit="$2"
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "/tmp/$name.log" | grep -v "^|"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || failed+=("$name=$rc")
}

run_tests() {
    {
        nvidia-smi
        python -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
        echo "== tests: python -m pytest -q -x tests -k 'not smoke and not distributed and not trl'"
        timeout 400 python -m pytest -q -x tests -k "not smoke and not distributed and not trl"
    } 2>&1 | tee "$out_dir/tests.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || failed+=("tests=$rc")
    tail -n 3 "$out_dir/tests.log"
}

run_small() {
    step logits-small 100 python -m benchmarks --shapes 32000x16K,50257x16K --dtypes bf16 --ignored-fraction 0 \
        --baselines novalidate,padded,packed,trl --out "$out_dir/small"
    rm -f "$out_dir/small/bench.png"  # at most 8 files come back from $OUT
    tables+=(small/bench.md)
}

run_bench() {
    step bench 150 python -m benchmarks --quick --out "$out_dir"
    step grid 140 python -m benchmarks --shapes 151936x16K,256000x16K,128256x64K --dtypes bf16 --ignored-fraction 0 \
        --out "$out_dir/grid"
    rm -f "$out_dir/grid/bench.png"
    tables+=(bench.md grid/bench.md)
    run_small
}

run_fused() {
    step fused 420 python -m benchmarks.fused_linear \
        --impls ours,gemms,ours_frozen,matmul,eager,trl,trl_frozen,liger,ours_budget,cce --chunk-sizes 2048,8192 \
        --out "$out_dir"
    tables+=(fused.md)
}

run_trl() {  # TRL, transformers and PEFT are not on the GPU image: they travel as wheels in ./.whl
    step trl-tests 200 python -m pytest -q -x tests/test_trl_integration.py
    step trl-step 300 python -m benchmarks.trl_step --out "$out_dir/trl_step.json"
}

case "$phase" in
    tests) run_tests ;;
    trl) run_trl ;;
    bench) run_bench ;;
    logits-small) run_small ;;
    fused) run_fused ;;
    all) run_tests; run_bench; run_fused ;;
esac

if [ "${SWEEP:-0}" = "1" ]; then  # the launch-configuration sweep behind kernels/config.py (about a minute)
    timeout 120 python -m benchmarks.sweep_configs --dtypes bfloat16 float32 --vocab 32000 128256 2>&1 | tail -n 8
fi

for table in "${tables[@]}"; do
    echo
    if [ -f "$out_dir/$table" ]; then cat "$out_dir/$table"; else echo "no $out_dir/$table was written"; fi
done
echo
echo "phase $phase, commit ${commit:-unknown}: ${failed[*]:-all steps exited 0}${failed[*]:+ (exit status; 124 = timed out)}"
[ "${#failed[@]}" -eq 0 ]
