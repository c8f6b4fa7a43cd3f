"""The kernels compile for the benchmarks' GPUs (sm_90: H100, H200) with Triton's own compiler, at the launch
configurations that GPU-sized vocabularies get in every mode, on a machine without a GPU (tests/gpu_compile.py):
the interpreter runs a kernel's Python but never compiles it.

Each step runs in its own process: recording needs TRITON_INTERPRET=1 before triton is imported, compiling
needs it unset."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import subprocess_env

TOOL = str(Path(__file__).with_name("gpu_compile.py"))
ROOT = Path(__file__).resolve().parents[1]
LAUNCHED_KERNELS = {"token_logps_kernel", "logits_grad_kernel", "segment_sum_kernel", "chunk_lse_update_kernel",
                    "chunk_logits_grad_kernel", "bits_digest_kernel"}


def _run(*args, interpret, extra_path=None, cache=None):
    # The checkout's package, whether or not it is installed (the tool runs from tests/, not the repository root).
    env = subprocess_env(*filter(None, [extra_path]), ROOT)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if cache:
        env["TRITON_CACHE_DIR"] = str(cache)  # a fresh cache: every launch really compiled here
    return subprocess.run([sys.executable, TOOL, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def gpu_shape_launches(tmp_path_factory):
    """The recorded launches of launch_gpu_shapes(): their JSON file."""
    specs = tmp_path_factory.mktemp("gpu_shapes") / "specs.json"
    recorded = _run("record-gpu-shapes", specs, interpret=True)
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    return specs


def test_every_kernel_compiles_for_sm90_at_gpu_vocabularies(gpu_shape_launches, tmp_path):
    specs = gpu_shape_launches
    launches = json.loads(specs.read_text())
    assert {spec["kernel"] for spec in launches} == LAUNCHED_KERNELS
    # The configurations of the benchmarks' shapes are among them (bf16 forward: 4096-wide blocks, 4 warps;
    # the vocabulary-parallel forward writing target logits).
    assert any(spec["kernel"] == "token_logps_kernel" and spec["args"][0] == {"tensor": "bfloat16", "aligned": True}
               and {"BLOCK_V": 4096, "WRITE_TARGET": True, "num_warps": 4}.items() <= spec["kwargs"].items()
               for spec in launches)
    # Each asks for FMA contraction itself (kernels/config.py FP_FUSION), not Triton's default (off from 3.10)
    assert all(spec["kwargs"].get("enable_fp_fusion") is True for spec in launches), launches
    compiled = _run("compile", specs, "--arch", "90", interpret=False, cache=tmp_path / "cache")
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert f"{len(launches)} of {len(launches)} launches compiled for sm_90" in compiled.stdout
    assert "TRITON_DEFAULT_FP_FUSION" not in compiled.stderr  # Triton 3.9's warning when a launch leaves it unset


BROKEN_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def type_changing_loop(x_ptr, n):
    total = 0  # an int32 that the loop turns into a float32: the interpreter runs it, the compiler refuses
    for i in range(n):
        total += tl.load(x_ptr + i)
    tl.store(x_ptr, total)
'''

LAUNCH_BROKEN = '''
import json, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import torch
import gpu_compile
from broken_kernel import type_changing_loop

specs = {}
with gpu_compile.recording(specs):
    x = torch.arange(4, dtype=torch.float32)
    type_changing_loop[(1,)](x, 4)
assert x[0].item() == 6.0, x  # the interpreter ran it
with open(sys.argv[2], "w") as file:
    json.dump(list(specs.values()), file)
'''


def test_a_kernel_the_interpreter_runs_but_the_compiler_refuses_fails(tmp_path):
    (tmp_path / "broken_kernel.py").write_text(textwrap.dedent(BROKEN_KERNEL))
    specs = tmp_path / "specs.json"
    recorded = subprocess.run([sys.executable, "-c", LAUNCH_BROKEN, TOOL, specs], capture_output=True, text=True,
                              env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(tmp_path)}, timeout=300)
    assert recorded.returncode == 0, recorded.stdout + recorded.stderr
    assert [spec["args"] for spec in json.loads(specs.read_text())] == [[{"tensor": "float32", "aligned": True},
                                                                        {"int": 17}]]
    compiled = _run("compile", specs, interpret=False, extra_path=tmp_path, cache=tmp_path / "cache")
    assert compiled.returncode == 1, compiled.stdout + compiled.stderr
    assert "FAILED type_changing_loop(float32, 17" in compiled.stdout
    assert "0 of 1 launches compiled for sm_90" in compiled.stdout


VECTOR_CHECK = '''
import json, re, sys
sys.path.insert(0, sys.argv[1])
import gpu_compile
from triton.runtime import driver

driver.set_active(gpu_compile._CompileOnlyDriver(90))
counts = {}
for spec in json.load(open(sys.argv[2])):
    kwargs = spec["kwargs"]
    if spec["args"][0].get("tensor") != "bfloat16":
        continue
    peeled = kwargs.get("PEEL") and kwargs.get("GRAD_PEELED", True)
    soft_capped = kwargs.get("HAS_SOFTCAP") and not kwargs.get("ENTROPY")
    if peeled or soft_capped:
        compiled = gpu_compile.compile_spec(spec)
        ptx = compiled.asm["ptx"]
        registers = int(re.search(r"(\\d+) registers", gpu_compile._resource_usage(compiled)).group(1))
        found = {name: len(re.findall(pattern, ptx)) for name, pattern in (
            ("vector_loads", r"ld\\.global\\.v4"), ("scalar_loads", r"ld\\.global\\.b16"),
            ("vector_stores", r"st\\.global\\.v4"), ("exps", r"ex2\\.approx"), ("fmas", r"fma\\.rn\\.f32"),
            ("compares_64", r"setp\\.\\w+\\.[sub]64"), ("divisions", r"div\\.full\\.f32"))}
        found.update(per_thread=kwargs["BLOCK_V"] // (32 * kwargs["num_warps"]), registers=registers)
        counts[spec["kernel"] + ("_softcap" if soft_capped else "")] = found
print(json.dumps(counts))
'''


@pytest.fixture(scope="module")
def ptx_counts(gpu_shape_launches, tmp_path_factory):
    """Per bfloat16 kernel of launch_gpu_shapes() (the peeled ones, and the soft-capped hidden-path ones):
    counts of instructions in its sm_90 PTX, elements per thread, registers."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("ptx_cache"))
    checked = subprocess.run([sys.executable, "-c", VECTOR_CHECK, str(Path(TOOL).parent), str(gpu_shape_launches)],
                             env=env, capture_output=True, text=True, timeout=600)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    return json.loads(checked.stdout.strip().splitlines()[-1])


def test_rows_off_16_byte_boundaries_load_as_vectors(ptx_counts):
    """V = 50257 in bfloat16: rows start off 16-byte boundaries, and the peeled kernels
    (kernels/row_alignment.py) still read (and, where the gradient's rows share the logits' offsets, write)
    their bodies with 16-byte accesses; only the label's logit and the head and end are 2-byte loads. And the
    forward takes one exponential per logit (kernels/online_logsumexp.py): two would outrun the exponential
    units at bf16 bandwidth), in few enough registers for 32 warps an SM (its per-lane form took 108-117)."""
    counts = ptx_counts
    forward, backward = counts["token_logps_kernel"], counts["logits_grad_kernel"]
    # the full blocks' loop, the masked block, the lanes' final rescaling (per_thread each), the peeled head and end
    assert forward["exps"] <= 3 * forward["per_thread"] + 2, counts
    assert forward["registers"] <= 64, counts
    assert forward["vector_loads"] >= 2 and forward["scalar_loads"] <= 3, counts  # 4096 / 128 threads: 4 a block
    assert backward["vector_loads"] >= 2 and backward["scalar_loads"] <= 2 and backward["vector_stores"] >= 2, counts


def test_backward_and_soft_cap_arithmetic_per_logit(ptx_counts):
    """The per-element arithmetic of the backward kernels (kernels/log_prob_grad.py): two fused multiply-adds
    an element (the exponent and g·(1[label] − p)) in the loop and in the masked block, and the label found by
    a 32-bit lane compare (64-bit column compares per element took 25 of them; now about 11, the head and end
    and the loop's bounds); the soft-capped hidden-path kernels (kernels/logit_transform.py) one division an
    element (tanh's), not two (z / cap was the other): the bf16 fold has 66, 32 in its loop and 32 in its masked
    block (2 more outside), where z / cap would make it 130."""
    counts = ptx_counts
    backward = counts["logits_grad_kernel"]
    assert backward["fmas"] >= 4 * backward["per_thread"], counts
    assert backward["compares_64"] <= 2 * backward["per_thread"], counts
    # the loop and the masked block: each an element's worth (the backward has no loop at these rows)
    for kernel in ("chunk_lse_update_kernel_softcap", "chunk_logits_grad_kernel_softcap"):
        assert counts[kernel]["divisions"] <= 2 * counts[kernel]["per_thread"] + 2, counts
