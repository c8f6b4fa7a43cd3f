#!/usr/bin/env bash
# Device checks for a lent GPU, in phases that each fit in one device call of under 8 minutes:
#
#   bash benchmarks/gpu_check.sh tests          # self-check, the GPU test suite (not trl / distributed / fsdp2 /
#                                               # deepspeed / tensor-parallel / torch.compile), ~3-5 min
#   bash benchmarks/gpu_check.sh tests-compile  # the torch.compile tests (inductor compiles on the GPU), ~2-4 min
#   bash benchmarks/gpu_check.sh bench          # logits path: --quick, larger shapes, logits-small (~3-4 min)
#   bash benchmarks/gpu_check.sh logits-small   # only V = 32000 and 50257 at 16K tokens, validate_labels on/off,
#                                               # and logits off 16-byte alignment (what row peeling gains)
#   bash benchmarks/gpu_check.sh fused          # the hidden-state (fused linear) benchmark (~4-5 min)
#   bash benchmarks/gpu_check.sh trl            # FocalPOTrainer vs DPOTrainer steps (TRL must travel as a wheel)
#
# The device gets a copy of the working tree without .git: commit first, then pass the hash,
#   BENCH_COMMIT=$(git rev-parse HEAD) bash benchmarks/gpu_check.sh fused
# (written into the command line here). Results go into $OUT/<short commit>/ (else ./bench_out/<...>/), so
# every folder names the commit it measured; the JSON and Markdown headers carry the full hash. Where git is
# present (this tree's own checkout) it wins, and uncommitted changes to tracked files add "-dirty". At most
# 8 files come back from $OUT; per phase: tests -> tests.log; tests-compile -> tests-compile.log; bench ->
# bench.log, bench.{json,md}, grid/bench.{json,md}, small/bench.{json,md}; logits-small -> logits-small.log,
# small/bench.{json,md}; fused -> fused.log, fused.{json,md}; trl -> trl.log, trl_step.json. The console
# (of which only the last 12,000 characters come back) gets each step's non-table output and, at the end,
# each table's header and target verdicts (the full tables are in the files). Each step runs even when an
# earlier one failed; the exit status is non-zero if any failed (124: timed out, a pytest step too: it is
# interrupted with SIGINT, so its summary still reaches the log). SWEEP=1 adds the launch-configuration sweep
# (about a minute).
#
# Baselines that are not on the GPU image (TRL, Liger-Kernel, Cut Cross-Entropy) travel as wheels in ./.whl
# (see benchmarks/NOTES.md); they are installed into /tmp/site here, without dependencies. The fused, bench,
# logits-small and trl phases refuse to start where the baselines they compare with do not import (exit 4;
# GPU_CHECK_WITHOUT_BASELINES=1 runs them anyway).
set -uo pipefail
cd "$(dirname "$0")/.."
phase="${1:-}"
case "$phase" in
    tests|tests-compile|bench|logits-small|fused|trl) ;;
    *) echo "usage: bash benchmarks/gpu_check.sh tests|tests-compile|bench|logits-small|fused|trl" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1
# TRITON_INTERPRET=1 (set for CPU runs) would send the kernels through the interpreter on the GPU too; on a
# machine without CUDA the benchmarks and the tests' conftest set it again themselves.
unset TRITON_INTERPRET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The bench phases' shapes are GPU-sized (inputs of up to 17 GB, run through the interpreter without CUDA):
# refuse to start without a GPU (GPU_CHECK_WITHOUT_CUDA=1 overrides, for trying the script itself).
if [ -z "${GPU_CHECK_WITHOUT_CUDA:-}" ] && \
    ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA device here: gpu_check.sh is for a lent GPU (GPU_CHECK_WITHOUT_CUDA=1 runs it anyway)" >&2
    exit 3
fi

commit=""
git_here=""  # this repository's own checkout (not a copied tree inside some other repository)
if [ "$(git rev-parse --show-toplevel 2>/dev/null)" = "$(pwd -P)" ]; then
    git_here=1
    commit="$(git rev-parse HEAD 2>/dev/null || true)"
fi
commit="${commit:-${BENCH_COMMIT:-}}"
export BENCH_COMMIT="$commit"
label="${commit:0:7}"
if [ -z "$label" ]; then
    label="unknown-commit"
    echo "WARNING: no commit known (no .git here and BENCH_COMMIT unset): results are NOT tied to a commit" >&2
fi
if [ -n "$git_here" ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
    label="$label-dirty"
fi
out_dir="${OUT:-./bench_out}/$label"
mkdir -p "$out_dir"
log="$out_dir/$phase.log"
echo "phase $phase, commit ${commit:-unknown}, results in $out_dir" | tee "$log"

if compgen -G ".whl/*.whl" > /dev/null; then
    if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl; then
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
        echo "WARNING: installing the wheels in .whl failed; the baselines they carry will be skipped" | tee -a "$log"
    fi
fi

# The baselines a phase compares with: without them it measures ours alone and most of issue 13's targets read
# "not measured", a device call spent for little, so it refuses to start (GPU_CHECK_WITHOUT_BASELINES=1 runs it).
case "$phase" in
    fused) needed="trl.kernels liger_kernel.chunked_loss cut_cross_entropy" ;;
    bench|logits-small) needed="trl.trainer.utils liger_kernel.transformers.functional" ;;
    trl) needed="trl.trainer.dpo_trainer" ;;
    *) needed="" ;;
esac
if [ -n "$needed" ] && [ -z "${GPU_CHECK_WITHOUT_BASELINES:-}" ]; then
    # shellcheck disable=SC2086  # one module name per argument
    missing="$(python - $needed <<'PY' 2>&1
import importlib, sys
missing = []
for module in sys.argv[1:]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # not installed, or broken by its own dependencies
        missing.append(f"{module} ({type(exc).__name__}: {str(exc)[:120]})")
print("; ".join(missing))
PY
)"
    if [ -n "$missing" ]; then
        echo "baselines missing for phase $phase: $missing. Carry them as wheels in ./.whl (benchmarks/NOTES.md" \
            "says how), or set GPU_CHECK_WITHOUT_BASELINES=1 to measure without them" | tee -a "$log" >&2
        exit 4
    fi
fi

failed=()
tables=()

step() {  # step NAME SECONDS COMMAND...: run with a timeout; everything into the phase log, table rows off the console
    local name="$1" limit="$2"
    shift 2
    echo "== $name: $*" | tee -a "$log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$log" | grep --line-buffered -v "^|"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || failed+=("$name=$rc")
}

pytest_step() {  # pytest_step NAME SECONDS ARGS...: on timeout pytest gets SIGINT, so it still prints its summary
    local name="$1" limit="$2"
    shift 2
    echo "== $name: pytest $*" | tee -a "$log"
    timeout -s INT -k 20 "$limit" python -m pytest -q --maxfail=10 --durations=15 -p no:cacheprovider "$@" \
        >> "$log" 2>&1
    local rc=$?
    [ "$rc" -eq 0 ] || failed+=("$name=$rc")
    grep -E "^(FAILED|ERROR)|passed|failed|KeyboardInterrupt" "$log" | tail -n 25
}

run_tests() {
    nvidia-smi 2>&1 | tee -a "$log"
    python -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)" \
        2>&1 | tee -a "$log"
    step selfcheck 80 python -m focal_kernels  # the GPU cases against float64 (odd V in bf16 among them)
    # Whole files ignored rather than deselected: a module that fails to import (TRL missing or of another
    # version) must not stop the collection of the others. distributed / fsdp2 / parallel_trainers / deepspeed
    # are gloo tests on the CPU; test_gpu_compile compiles for sm_90 without a GPU, where here the other tests
    # compile every kernel; test_compile (inductor compiles on the GPU take seconds each) is the tests-compile phase.
    pytest_step tests 360 tests --ignore=tests/test_trl_integration.py --ignore=tests/test_distributed.py \
        --ignore=tests/test_fsdp2.py --ignore=tests/test_parallel_trainers.py --ignore=tests/test_deepspeed.py \
        --ignore=tests/test_gpu_compile.py \
        --ignore=tests/test_compile.py
}

run_tests_compile() {
    pytest_step tests-compile 420 tests/test_compile.py
}

run_small() {
    step logits-small 120 python -m benchmarks --shapes 32000x16K,50257x16K --dtypes bf16 --ignored-fraction 0 \
        --baselines novalidate,unaligned,padded,packed,trl --out "$out_dir/small"
    rm -f "$out_dir/small/bench.png"  # at most 8 files come back from $OUT
    tables+=(small/bench.md)
}

run_bench() {
    step bench 150 python -m benchmarks --quick --out "$out_dir"
    # no `unaligned` row here: these rows start on 16-byte boundaries anyway, and at 64K tokens its copy of the
    # logits runs out of memory on an H100, which drops the shape's later rows to one input set
    step grid 140 python -m benchmarks --shapes 151936x16K,256000x16K,128256x64K --dtypes bf16 --ignored-fraction 0 \
        --baselines inplace,novalidate,padded,packed,eager,compile,trl,liger --out "$out_dir/grid"
    rm -f "$out_dir/bench.png" "$out_dir/grid/bench.png"
    tables+=(bench.md grid/bench.md)
    run_small
}

run_fused() {  # ours first (the others are compared with it); its never-run modes after the baselines, so that
    # a CUDA fault there (which ends the process's use of the GPU) leaves the baselines measured; ours_budget
    # reads Liger's net memory, so it comes after liger; ours_again (ours once more, last) shows the clocks' drift.
    # No --chunk-sizes rows (tuning, not targets): their time goes to ours_again and the timeout's margin.
    step fused 420 python -m benchmarks.fused_linear \
        --impls ours,gemms,matmul,eager,trl,trl_frozen,liger,ours_frozen,ours_budget,cce,ours_again --out "$out_dir"
    tables+=(fused.md)
}

run_trl() {  # TRL itself travels as a wheel in ./.whl (transformers and PEFT are on the image)
    step trl-smoke 120 python -m pytest -q -p no:cacheprovider tests/test_trl_integration.py -k smoke
    step trl-step 300 python -m benchmarks.trl_step --out "$out_dir/trl_step.json"
    grep "^|" "$log" | tail -n 12  # the step table (trl_step.json holds it too)
}

case "$phase" in
    tests) run_tests ;;
    tests-compile) run_tests_compile ;;
    trl) run_trl ;;
    bench) run_bench ;;
    logits-small) run_small ;;
    fused) run_fused ;;
esac

if [ "${SWEEP:-0}" = "1" ]; then  # the launch-configuration sweep behind kernels/config.py (about a minute)
    step sweep 120 python -m benchmarks.sweep_configs --dtypes bfloat16 float32 --vocab 32000 128256
    grep "^best" "$log" | tail -n 8
fi

for table in ${tables[@]+"${tables[@]}"}; do  # each table's header and targets; the rows are in the file
    echo
    if [ -f "$out_dir/$table" ]; then
        echo "---- $table (rows: see the file)"
        awk '/^## Rows/{exit} {print}' "$out_dir/$table"
    else
        echo "no $out_dir/$table was written"
    fi
done
echo
echo "phase $phase, commit ${commit:-unknown}: ${failed[*]:-all steps exited 0}${failed[*]:+ (exit status; 124 = timed out)}"
[ "${#failed[@]}" -eq 0 ]
