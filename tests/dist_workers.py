"""Worker processes for tests/test_distributed.py: one gloo process group on 127.0.0.1, several scenarios per
group. Each scenario builds the same full inputs on every rank (same seed), gives each rank its slice, and
compares values and gradients with a single-process float64 reference computed in the worker. A failed
assertion raises in the worker, which makes the parent's spawn raise.

Nothing here imports triton at module level: `run` sets TRITON_INTERPRET=1 first, imports the kernels, then
switches the variable per scenario (mode "interpret": the Triton kernels through the interpreter; "plain":
the PyTorch path), so that one process group covers both paths.
"""

from __future__ import annotations

import math
import os
import sys
from datetime import timedelta

import torch

V = 37
SPLITS = {2: [20, 17], 3: [13, 12, 12]}


def run(rank, world, port, scenarios):
    run_group(rank, world, port, scenarios, lambda name, mode: SCENARIOS[name](rank, world))


def run_group(rank, world, port, scenarios, call, finish=None):
    """scenarios: (mode, name) pairs; mode "interpret" runs the Triton kernels through the interpreter,
    "plain" the PyTorch path. The kernels are imported once under TRITON_INTERPRET=1 (it must precede
    `import triton`); the variable is then switched per scenario, which the CPU dispatch reads at every call.
    finish(), when given, runs after every scenario (it raises what they recorded); this process then ends
    here (os._exit): nothing after run_group runs."""
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET was set"
    os.environ["TRITON_INTERPRET"] = "1"
    import interpreter_patch_once  # as tests/conftest.py does

    interpreter_patch_once.install()
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from focal_kernels import backend

    if any(mode == "interpret" for mode, _ in scenarios):
        import focal_kernels.kernels.token_logps  # noqa: F401  (decorated as interpreter functions)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=90))
    try:
        for mode, name in scenarios:
            os.environ["TRITON_INTERPRET"] = "1" if mode == "interpret" else "0"
            assert backend.use_triton(torch.zeros(1)) == (mode == "interpret")
            call(name, mode)
            dist.barrier()
        if finish is not None:
            finish()
    except BaseException:
        dist.destroy_process_group()
        raise
    # Every scenario passed on every rank (the last barrier): leave without gloo's teardown, which now and then
    # aborts ("terminate called without an active exception") after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ------------------------------------------------------------------ the parent's side: spawning a bounded group

SPAWN_TIMEOUT_S = 150


def free_port():
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn(world, scenarios, target=None, timeout_s=SPAWN_TIMEOUT_S):
    """Runs target(rank, world, port, scenarios) (default: `run`) in `world` spawned processes; a worker's
    exception is raised here (ProcessRaisedException), and a group still running after timeout_s fails the
    test (its processes killed) instead of blocking."""
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.start_processes(target or run, args=(world, free_port(), tuple(scenarios)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process group did not finish {scenarios} within {timeout_s} s: a hang")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


# ------------------------------------------------------------------ helpers

def _world():
    import torch.distributed as dist

    return dist.group.WORLD


def _slice(rank, world):
    sizes = SPLITS[world]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def _close(actual, expected, what, rtol=2e-5, atol=2e-5):
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol, atol=atol,
                               equal_nan=False, msg=lambda m: f"{what}: {m}")


def _loss(logps):
    """A loss that is not linear in the log-probs, the same on every rank."""
    weights = torch.linspace(0.5, 1.5, logps.shape[0], dtype=torch.float64)
    return (weights * logps.double()).sum() + 0.05 * (logps.double() ** 2).sum()


def _labels(shape, seed, fraction=0.3):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < fraction] = -100
    return labels


def _logits(shape, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * 3).to(dtype)


def _reference_logits(full, labels, cu_seqlens=None):
    """(logps, grad of the full logits) in float64."""
    from focal_kernels import reference

    full64 = full.detach().double().requires_grad_(True)
    logps = reference.sequence_logps(full64, labels, cu_seqlens=cu_seqlens)
    (grad,) = torch.autograd.grad(_loss(logps), [full64])
    return logps.detach(), grad


# ------------------------------------------------------------------ vocabulary-parallel, logits

def _vp_logits(rank, world, *, packed, dtype=torch.float32):
    from focal_kernels.logprobs.parallel import vocab_parallel_sequence_logps

    start, stop = _slice(rank, world)
    if packed:
        cu = torch.tensor([0, 4, 4, 9, 13], dtype=torch.int32)
        full = _logits((13, V), 11, dtype)
        labels = _labels((13,), 12)
    else:
        cu = None
        full = _logits((3, 6, V), 13, dtype)
        labels = _labels((3, 6), 14)
        labels[2] = -100  # a sequence with no scored token
    ref, ref_grad = _reference_logits(full, labels, cu)
    local = full[..., start:stop].clone()
    if not packed:  # NaN at an ignored token is never read
        local[2, 0, 0] = math.nan
    local.requires_grad_(True)
    logps, counts = vocab_parallel_sequence_logps(local, labels, group=_world(), cu_seqlens=cu,
                                                  return_token_counts=True)
    _close(logps, ref, f"logps (packed={packed}, {dtype})")
    expected_counts = (labels != -100).long().sum(-1) if not packed else torch.stack(
        [(labels[a:b] != -100).sum() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert torch.equal(counts, expected_counts), (counts, expected_counts)
    _loss(logps).backward()
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1.6e-2, 1e-5)
    _close(local.grad, ref_grad[..., start:stop], f"logits grad (packed={packed}, {dtype})", rtol, atol)


def vp_logits_padded(rank, world):
    _vp_logits(rank, world, packed=False)


def vp_logits_packed(rank, world):
    _vp_logits(rank, world, packed=True)


def vp_logits_bf16(rank, world):
    _vp_logits(rank, world, packed=False, dtype=torch.bfloat16)


# ------------------------------------------------------------------ vocabulary-parallel, hidden states

def _vp_hidden(rank, world, *, packed, transform):
    from focal_kernels import reference
    from focal_kernels.logprobs.parallel import vocab_parallel_fused_linear_sequence_logps

    start, stop = _slice(rank, world)
    H = 8
    options = dict(logit_softcap=4.0, logit_scale=0.7, temperature=1.3) if transform else {}
    weight = _logits((V, H), 21) / 2
    bias = _logits((V,), 22) if transform else None
    if packed:
        cu = torch.tensor([0, 5, 11], dtype=torch.int64)
        hidden = _logits((11, H), 23)
        labels = _labels((11,), 24)
    else:
        cu = None
        hidden = _logits((2, 5, H), 25)
        labels = _labels((2, 5), 26)
    # reference in float64
    h64 = hidden.double().requires_grad_(True)
    w64 = weight.double().requires_grad_(True)
    b64 = bias.double().requires_grad_(True) if bias is not None else None
    logits64 = reference.linear_logits(h64, w64, b64, **options)
    ref = reference.sequence_logps(logits64, labels, cu_seqlens=cu)
    ref_grads = torch.autograd.grad(_loss(ref), [h64, w64] + ([b64] if b64 is not None else []))

    h = hidden.clone().requires_grad_(True)
    w = weight[start:stop].clone().requires_grad_(True)
    b = bias[start:stop].clone().requires_grad_(True) if bias is not None else None
    logps = vocab_parallel_fused_linear_sequence_logps(h, w, labels, b, group=_world(), cu_seqlens=cu,
                                                       chunk_size=5, **options)
    what = f"(hidden, packed={packed}, transform={transform})"
    _close(logps, ref, f"logps {what}")
    _loss(logps).backward()
    _close(h.grad, ref_grads[0], f"hidden grad {what}", 1e-5, 1e-5)
    _close(w.grad, ref_grads[1][start:stop], f"weight grad {what}", 1e-5, 1e-5)
    if b is not None:
        _close(b.grad, ref_grads[2][start:stop], f"bias grad {what}", 1e-5, 1e-5)


def vp_hidden_padded(rank, world):
    _vp_hidden(rank, world, packed=False, transform=True)


def vp_hidden_tokens(rank, world):
    """Token-level: fk.fused_linear_token_logps with vocab_parallel_group, every statistic over the whole
    vocabulary against the float64 reference, the log-probs' gradients too. Ties for is_top1 across the
    slices: token (0, 0)'s label ties the maximum with a column on the last rank (after the label: it is the
    first argmax), token (0, 1)'s with a column on rank 0 (before it: it is not)."""
    import focal_kernels as fk
    from focal_kernels import reference

    start, stop = _slice(rank, world)
    H = 8
    options = dict(logit_scale=0.9)  # (a soft-cap would make large logits tie at its cap)
    weight = _logits((V, H), 31) / 2
    hidden = _logits((2, 5, H), 32)
    labels = _labels((2, 5), 33)
    labels[0, 0], labels[0, 1] = 1, V - 1  # the label on rank 0 / on the last rank
    weight[1] = weight[V - 1] = 100 * hidden[0, 0] / hidden[0, 0].norm() ** 2  # raw logit 100 at (0, 0)...
    hidden[0, 1] = hidden[0, 0]  # ... and at (0, 1): both columns tie, above every other column
    # (an exact float32 tie between two ranks' GEMMs: it holds where both round these dot products alike, as
    # the CPU's BLAS does at H = 8; the float64 case below needs no such luck)
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    logits64 = reference.linear_logits(h64, w64, **options)
    ref = reference.token_logps(logits64, labels)
    ref_stats = reference.token_stats(logits64.detach(), labels)
    assert ref_stats["is_top1"][0, 0] and not ref_stats["is_top1"][0, 1]
    ref_grads = torch.autograd.grad(_loss(ref.sum(-1)), [h64, w64])

    h = hidden.clone().requires_grad_(True)
    w = weight[start:stop].clone().requires_grad_(True)
    out = fk.fused_linear_token_logps(h, w, labels, vocab_parallel_group=_world(), chunk_size=5,
                                      stats=("entropy", "mean_logits", "is_top1", "log_sum_sq_probs"), **options)
    _close(out.log_probs, ref, "token log-probs (vocabulary-parallel)")
    for name in ("entropy", "mean_logits", "log_sum_sq_probs"):
        _close(getattr(out, name), ref_stats[name], f"{name} (vocabulary-parallel)", 1e-5, 1e-5)
    assert torch.equal(out.is_top1, ref_stats["is_top1"]), (out.is_top1, ref_stats["is_top1"])
    assert not any(getattr(out, name).requires_grad for name in ("entropy", "mean_logits", "is_top1"))
    _loss(out.log_probs.sum(-1)).backward()
    _close(h.grad, ref_grads[0], "hidden grad (vocabulary-parallel tokens)", 1e-5, 1e-5)
    _close(w.grad, ref_grads[1][start:stop], "weight grad (vocabulary-parallel tokens)", 1e-5, 1e-5)
    # every rank must ask for the same statistics (their all-reduces must match)
    _raises(ValueError, ["stats must be the same on every rank"], lambda: fk.fused_linear_token_logps(
        h, w, labels, vocab_parallel_group=_world(), stats=("entropy",) if rank == 0 else ()))
    # memory_budget refused on one rank only: raised on every rank (inside the agreement), no rank left waiting
    _raises(ValueError, ["memory_budget is not supported with vocab_parallel_group"],
            lambda: fk.fused_linear_token_logps(h, w, labels, vocab_parallel_group=_world(),
                                                memory_budget=(1 << 20) if rank == 0 else None))
    # the statistics listed in another order on each rank (a set's order differs between processes): the same
    # values (their partial sums were once all-reduced in each rank's own order)
    order = ("entropy", "mean_logits", "log_sum_sq_probs")
    rotated = fk.fused_linear_token_logps(hidden, weight[start:stop], labels, vocab_parallel_group=_world(),
                                          stats=order[rank:] + order[:rank], **options)
    for name in order:
        _close(getattr(rotated, name), ref_stats[name], f"{name}, stats in rank {rank}'s order", 1e-5, 1e-5)
    # packed: hidden (N, H) with labels (N,), and (1, N, H) with (N,), as on one process
    for packed_hidden in (hidden.reshape(-1, H), hidden.reshape(1, -1, H)):
        packed = fk.fused_linear_token_logps(packed_hidden, weight[start:stop], labels.reshape(-1),
                                             vocab_parallel_group=_world(), **options)
        _close(packed.log_probs, ref.reshape(-1), f"packed {tuple(packed_hidden.shape)} token log-probs")
    # packed labels one token short on the last rank only: that rank names the shapes as passed (not the
    # internal (1, N) grid), the others name it; no rank is left waiting
    last = rank == world - 1
    short = labels.reshape(-1)[:-1] if last else labels.reshape(-1)
    words = ["labels must have N = 10 elements", "got shape (9,)"] if last else [f"rank {world - 1}"]
    _raises(ValueError, words, lambda: fk.fused_linear_token_logps(hidden.reshape(-1, H), weight[start:stop], short,
                                                                   vocab_parallel_group=_world()))
    # a large bias: logit 95 at an ignored token's row (projected zeroed, its logits the bias's), where the
    # backward once took exp(95) in float32 (NaN gradients)
    bias = torch.zeros(V)
    bias[V // 2] = 9.5
    ignored = labels.clone()
    ignored[1, 2] = -100
    h64, w64, b64 = (t.double().requires_grad_(True) for t in (hidden, weight, bias))
    ref_ignored = reference.token_logps(reference.linear_logits(h64, w64, b64, temperature=0.1), ignored)
    ref_grads = torch.autograd.grad(_loss(ref_ignored.sum(-1)), [h64, w64, b64])
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight[start:stop], bias[start:stop]))
    out = fk.fused_linear_token_logps(h, w, ignored, b, vocab_parallel_group=_world(), temperature=0.1)
    _close(out.log_probs, ref_ignored, "token log-probs, a large bias")
    _loss(out.log_probs.sum(-1)).backward()
    for got, want, name in zip((h.grad, w.grad, b.grad), (ref_grads[0], ref_grads[1][start:stop],
                                                          ref_grads[2][start:stop]), ("hidden", "weight", "bias")):
        _close(got, want, f"{name} grad, a large bias at an ignored token", 1e-5, 1e-4)

    # float64; a bias of -inf over the whole last slice (that rank's sums are 0); labels outside it, one
    # outside the vocabulary with validate_labels=False (NaN log-prob, never the first argmax); a scale and a
    # temperature (a soft-cap would map -inf to a finite logit)
    bias = torch.zeros(V, dtype=torch.float64)
    last = _slice(world - 1, world)[0]
    bias[last:] = -math.inf
    labels64 = labels.clamp(max=last - 1)
    labels64[1, 4] = V + 3
    options64 = dict(logit_scale=1.2, temperature=1.1)
    h64 = hidden.double().requires_grad_(True)
    logits64 = reference.linear_logits(h64, weight.double(), bias, **options64)
    in_vocab = labels64.clamp(max=V - 1)
    ref_stats = reference.token_stats(logits64.detach(), in_vocab)
    out = fk.fused_linear_token_logps(hidden.double(), weight[start:stop].double(), labels64, bias[start:stop],
                                      vocab_parallel_group=_world(), validate_labels=False,
                                      stats=("entropy", "mean_logits", "is_top1", "log_sum_sq_probs"), **options64)
    assert torch.isnan(out.log_probs[1, 4]) and not out.is_top1[1, 4]
    keep = torch.ones_like(labels64, dtype=torch.bool)
    keep[1, 4] = False
    _close(out.log_probs[keep], reference.token_logps(logits64.detach(), in_vocab)[keep], "float64 log-probs")
    for name in ("entropy", "log_sum_sq_probs", "mean_logits"):  # (the mean logit is -inf here)
        _close(getattr(out, name)[keep], ref_stats[name][keep], f"{name} (float64, a -inf slice)", 1e-10, 1e-10)
    assert torch.equal(out.is_top1[keep], ref_stats["is_top1"][keep])


def vp_hidden_packed(rank, world):
    _vp_hidden(rank, world, packed=True, transform=False)


# ------------------------------------------------------------------ DTensor logits

def dtensor(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from focal_kernels.logprobs.parallel import dtensor_vocab_logits, vocab_parallel_sequence_logps

    mesh = init_device_mesh("cpu", (world,))
    full = _logits((2, 5, V), 31, torch.float64)
    labels = _labels((2, 5), 32)
    ref, ref_grad = _reference_logits(full, labels)
    for placement in (Shard(2), Shard(-1)):
        sharded = distribute_tensor(full, mesh, [placement]).requires_grad_(True)
        local, group = dtensor_vocab_logits(sharded)
        assert local.shape[-1] == torch.chunk(full, world, dim=2)[rank].shape[-1]
        logps = vocab_parallel_sequence_logps(sharded, labels)  # group from the DTensor
        _close(logps, ref, f"DTensor {placement} logps", 1e-10, 1e-10)
        _loss(logps).backward()
        # full_tensor(): PyTorch 2.11 leaves an unevenly sharded leaf's gradient Replicate (the same values)
        _close(sharded.grad.full_tensor(), ref_grad, f"DTensor {placement} grad", 1e-10, 1e-12)
    for placements, words in (([Shard(1)], "sharded on dimension 1"), ([Replicate()], "replicated")):
        try:
            dtensor_vocab_logits(distribute_tensor(full, mesh, placements))
        except ValueError as exc:
            assert words in str(exc), str(exc)
        else:
            raise AssertionError(f"no error for {placements}")


# ------------------------------------------------------------------ sequence (context) parallel

def _token_split(tokens, rank, world):
    bounds = [round(tokens * k / world) for k in range(world + 1)]
    return bounds[rank], bounds[rank + 1]


def sp_logits(rank, world):
    import focal_kernels as fk
    from focal_kernels.logprobs.parallel import sequence_parallel_sum

    # padded: each rank holds a slice of every sequence's time steps
    full = _logits((3, 7, V), 41)
    labels = _labels((3, 7), 42)
    ref, ref_grad = _reference_logits(full, labels)
    a, b = _token_split(7, rank, world)
    local = full[:, a:b].clone().requires_grad_(True)
    logps, counts = fk.sequence_logps(local, labels[:, a:b], return_token_counts=True)
    logps = sequence_parallel_sum(logps, _world())
    counts = sequence_parallel_sum(counts, _world())
    _close(logps, ref, "sequence-parallel logps")
    assert torch.equal(counts, (labels != -100).long().sum(-1))
    _loss(logps).backward()
    _close(local.grad, ref_grad[:, a:b], "sequence-parallel logits grad", 1e-5, 1e-6)

    # packed: each rank holds a contiguous slice of the packed tokens, with its own cu_seqlens
    cu = torch.tensor([0, 3, 8, 8, 12])
    full = _logits((12, V), 43)
    labels = _labels((12,), 44)
    ref, ref_grad = _reference_logits(full, labels, cu)
    a, b = _token_split(12, rank, world)
    local_cu = cu.clamp(a, b) - a
    local = full[a:b].clone().requires_grad_(True)
    logps = sequence_parallel_sum(fk.sequence_logps(local, labels[a:b], cu_seqlens=local_cu), _world())
    _close(logps, ref, "sequence-parallel packed logps")
    _loss(logps).backward()
    _close(local.grad, ref_grad[a:b], "sequence-parallel packed logits grad", 1e-5, 1e-6)


def sp_hidden(rank, world):
    """The data-parallel recipe: the weight's gradient summed over the context ranks is the single-process one."""
    import torch.distributed as dist

    import focal_kernels as fk
    from focal_kernels import reference
    from focal_kernels.logprobs.parallel import sequence_parallel_sum

    H = 8
    weight = _logits((V, H), 51) / 2
    hidden = _logits((2, 6, H), 52)
    labels = _labels((2, 6), 53)
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = reference.sequence_logps(reference.linear_logits(h64, w64), labels)
    ref_h, ref_w = torch.autograd.grad(_loss(ref), [h64, w64])
    a, b = _token_split(6, rank, world)
    h = hidden[:, a:b].clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logps = sequence_parallel_sum(fk.fused_linear_sequence_logps(h, w, labels[:, a:b]), _world())
    _close(logps, ref, "sequence-parallel hidden logps")
    _loss(logps).backward()
    _close(h.grad, ref_h[:, a:b], "sequence-parallel hidden grad", 1e-5, 1e-5)
    own_share = w.grad.clone()
    dist.all_reduce(w.grad)  # SUM over the context group: the full gradient
    _close(w.grad, ref_w, "sequence-parallel weight grad (summed over ranks)", 1e-5, 1e-5)
    if world > 1:
        assert not torch.allclose(own_share.double(), ref_w, atol=1e-3), "one rank's share is not the whole gradient"


def modes_and_dtypes(rank, world):
    """What the scenarios above leave out (a coverage review): the frozen head on vocabulary-parallel hidden
    states in bfloat16 and float64 (a causal view, one-token sequences, an all-ignored row, the transform);
    sequence-parallel packed hidden states, frozen and with memory_budget; vocabulary-parallel float16
    logits. Each against float64 of the same inputs."""
    import torch.distributed as dist

    import focal_kernels as fk
    from focal_kernels import reference

    start, stop = _slice(rank, world)
    H = 8
    options = dict(logit_softcap=4.0, logit_scale=0.7, temperature=1.3)
    tolerance = {torch.float64: (1e-10, 1e-10), torch.bfloat16: (1e-1, 4e-2), torch.float16: (2e-2, 1e-2),
                 torch.float32: (2e-5, 2e-5)}
    for dtype in (torch.bfloat16, torch.float64):
        weight = (_logits((V, H), 61) / 6).to(dtype)
        for seq_len in (4, 1):
            hidden = (_logits((2, seq_len + 1, H), 62) / 3).to(dtype)
            labels = _labels((2, seq_len), 63)
            labels[1] = -100
            h64 = hidden.double().requires_grad_(True)
            ref = reference.sequence_logps(reference.linear_logits(h64[:, :-1], weight.double(), **options), labels)
            (ref_grad,) = torch.autograd.grad(_loss(ref), [h64])
            h = hidden.clone().requires_grad_(True)
            logps = fk.fused_linear_sequence_logps(h[:, :-1], weight[start:stop], labels, chunk_size=6,
                                                   vocab_parallel_group=_world(), **options)
            value_tol, grad_tol = tolerance[dtype]
            what = f"frozen vocabulary-parallel ({dtype}, T = {seq_len})"
            _close(logps, ref, f"logps {what}", value_tol, value_tol)
            (grad,) = torch.autograd.grad(_loss(logps), [h])
            assert grad.dtype == dtype
            _close(grad, ref_grad, f"hidden grad {what}", 0, grad_tol * ref_grad.abs().max().item())

    cu = torch.tensor([0, 3, 3, 8, 12])  # an empty and an all-ignored sequence
    hidden, weight, bias = _logits((12, H), 64) / 3, _logits((V, H), 65) / 6, _logits((V,), 66) / 3
    labels = _labels((12,), 67)
    labels[8:] = -100
    a, b = _token_split(12, rank, world)
    local_cu = cu.clamp(a, b) - a
    for mode in ("frozen", "memory_budget"):
        trainable = mode == "memory_budget"
        leaves64 = [hidden.double().requires_grad_(True)] + [t.double().requires_grad_(True) for t in (weight, bias)
                                                             if trainable]
        w64, b64 = (leaves64[1], leaves64[2]) if trainable else (weight.double(), bias.double())
        ref = reference.sequence_logps(reference.linear_logits(leaves64[0], w64, b64), labels, cu_seqlens=cu)
        ref_grads = torch.autograd.grad(_loss(ref), leaves64)
        h = hidden[a:b].clone().requires_grad_(True)
        w, bb = weight.clone().requires_grad_(trainable), bias.clone().requires_grad_(trainable)
        logps = fk.fused_linear_sequence_logps(h, w, labels[a:b], bb, cu_seqlens=local_cu, chunk_size=8,
                                               sequence_parallel_group=_world(),
                                               memory_budget=2**20 if trainable else None)
        _close(logps, ref, f"sequence-parallel packed logps ({mode})")
        assert logps[1] == 0 and logps[3] == 0
        grads = torch.autograd.grad(_loss(logps), [h] + ([w, bb] if trainable else []))
        _close(grads[0], ref_grads[0][a:b], f"sequence-parallel packed hidden grad ({mode})", 1e-5, 1e-5)
        for got, want, name in zip(grads[1:], ref_grads[1:], ("weight", "bias")):
            summed = got.clone()
            dist.all_reduce(summed)  # each rank holds its tokens' share
            _close(summed, want, f"sequence-parallel packed {name} grad ({mode}, summed)", 1e-5, 1e-5)

    full = _logits((2, 5, V), 68, torch.float16)
    labels = _labels((2, 4), 69)
    ref, ref_grad = _reference_logits(full[:, :-1], labels)
    local = full[..., start:stop].clone().requires_grad_(True)
    logps = fk.sequence_logps(local[:, :-1], labels, vocab_parallel_group=_world())
    _close(logps, ref, "vocabulary-parallel float16 logps", 2e-3, 2e-3)
    (grad,) = torch.autograd.grad(_loss(logps), [local])
    assert grad.dtype == torch.float16
    _close(grad[:, :-1], ref_grad[..., start:stop], "vocabulary-parallel float16 grad", 2e-3,
           1e-3 * ref_grad.abs().max().item())


# ------------------------------------------------------------------ bad input: the same error on every rank

def _raises(kind, words, fn):
    try:
        fn()
    except kind as exc:
        assert all(w in str(exc) for w in words), f"{kind.__name__} without {words}: {exc}"
        return
    raise AssertionError(f"no {kind.__name__} ({words})")


def errors(rank, world):
    import focal_kernels as fk
    from focal_kernels.logprobs.agreement import SP_MAX_DIMS
    from focal_kernels.logprobs.parallel import (sequence_parallel_sum, vocab_parallel_fused_linear_sequence_logps,
                                                 vocab_parallel_sequence_logps)

    group = _world()
    start, stop = _slice(rank, world)
    full = _logits((2, 4, V), 61)
    labels = _labels((2, 4), 62, fraction=0.0)

    bad = labels.clone()
    bad[1, 2] = V  # within no rank's slice; V_r < V on every rank, so only the summed vocabulary tells
    _raises(ValueError, ["[0, 37)", "found 37"],
            lambda: vocab_parallel_sequence_logps(full[..., start:stop], bad, group=group))
    # unchecked: that sequence's log-prob is NaN, the other one is fine
    logps = vocab_parallel_sequence_logps(full[..., start:stop], bad, group=group, validate_labels=False)
    assert math.isnan(logps[1]) and not math.isnan(logps[0]), logps

    # token counts that differ between ranks
    seq_len = 4 if rank == 0 else 3
    _raises(ValueError, ["same tokens", f"rank {1}"],
            lambda: vocab_parallel_sequence_logps(full[:, :seq_len, start:stop], labels[:, :seq_len], group=group))
    # labels that differ between ranks
    other = labels.clone()
    other[0, 0] = (labels[0, 0] + rank) % V
    _raises(ValueError, ["labels must be the same"],
            lambda: vocab_parallel_sequence_logps(full[..., start:stop], other, group=group))
    # a local error on one rank only: that rank raises its own, the others name it
    broken = labels.float() if rank == world - 1 else labels
    kind, words = (TypeError, ["int64 or int32"]) if rank == world - 1 else (ValueError, [f"rank {world - 1}"])
    _raises(kind, words, lambda: vocab_parallel_sequence_logps(full[..., start:stop], broken, group=group))
    # hidden path: hidden sizes that differ, and a label outside the summed vocabulary
    weight = _logits((stop - start, 8), 63)
    hidden = _logits((2, 4, 8), 64)
    _raises(ValueError, ["[0, 37)"],
            lambda: vocab_parallel_fused_linear_sequence_logps(hidden, weight, bad, group=group))
    hidden_size = 8 if rank == 0 else 6
    _raises(ValueError, ["hidden size"],
            lambda: vocab_parallel_fused_linear_sequence_logps(hidden[..., :hidden_size], weight[:, :hidden_size],
                                                               labels, group=group))
    # sequence-parallel: different numbers of sequences
    per_sequence = torch.zeros(3 if rank == 0 else 2)
    _raises(ValueError, ["same number of sequences"], lambda: sequence_parallel_sum(per_sequence, group))
    first = rank == 0
    # a dense (3, 2) tensor laid out differently on each rank: summed by index, not by storage
    values = torch.arange(6.0).view(3, 2) + rank
    values = values if first else values.t().contiguous().t()
    _close(sequence_parallel_sum(values, group), world * torch.arange(6.0).view(3, 2) + sum(range(world)),
           "layout")
    # a dtype the agreement cannot name is refused on every rank
    odd = torch.zeros(2, dtype=torch.int16 if first else torch.float32)
    kind, words = (TypeError, ["dtypes"]) if first else (ValueError, ["rank 0"])
    _raises(kind, words, lambda: sequence_parallel_sum(odd, group))
    # more dimensions than the agreement compares: refused on every rank, not summed by storage
    deep = torch.zeros((1,) * SP_MAX_DIMS + (2,)) if first else torch.zeros(2)
    _raises(ValueError, [f"at most {SP_MAX_DIMS} dimensions"] if first else ["rank 0"],
            lambda: sequence_parallel_sum(deep, group))
    # the group still works afterwards
    ref = fk.reference.sequence_logps(full.double(), labels)
    _close(vocab_parallel_sequence_logps(full[..., start:stop], labels, group=group), ref, "after the errors")


def agreement(rank, world):
    """Options every rank must share, errors that must reach every rank of a sequence-parallel group, and
    DTensor weights / hidden states that must really be vocabulary shards / replicated."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import focal_kernels as fk
    from focal_kernels import reference
    from focal_kernels.logprobs.parallel import (vocab_parallel_fused_linear_sequence_logps,
                                                 vocab_parallel_sequence_logps)

    group = _world()
    start, stop = _slice(rank, world)
    full = _logits((2, 4, V), 81)
    labels = _labels((2, 4), 82)
    local = full[..., start:stop]
    weight, hidden = _logits((V, 8), 83) / 2, _logits((2, 4, 8), 84)

    # ignore_index, logit options and bias presence that differ between ranks: the same error everywhere
    _raises(ValueError, ["ignore_index must be the same", "-100 on rank 0"],
            lambda: vocab_parallel_sequence_logps(local, labels, -100 if rank == 0 else -1, group=group))
    _raises(ValueError, ["logit_scale must be the same"],
            lambda: vocab_parallel_fused_linear_sequence_logps(hidden, weight[start:stop], labels, group=group,
                                                               logit_scale=1.0 + rank))
    _raises(ValueError, ["logit_softcap must be the same"],
            lambda: vocab_parallel_fused_linear_sequence_logps(hidden, weight[start:stop], labels, group=group,
                                                               logit_softcap=None if rank == 0 else 30.0))
    bias = torch.zeros(stop - start) if rank == 0 else None
    _raises(ValueError, ["a bias must be given on every rank"],
            lambda: vocab_parallel_fused_linear_sequence_logps(hidden, weight[start:stop], labels, bias, group=group))
    # labels that differ are caught with validate_labels=False too
    other = labels.clone()
    other[1, 3] = (max(int(labels[1, 3]), 0) + rank) % V
    _raises(ValueError, ["labels must be the same"],
            lambda: vocab_parallel_sequence_logps(local, other, group=group, validate_labels=False))
    # hidden states that differ in one element's last bit on one rank (dropout with a per-rank seed, say)
    nudged = hidden.clone()
    if rank == world - 1:
        nudged.view(torch.int32)[1, 2, 5] += 1
    _raises(ValueError, ["hidden must be the same on every rank", f"ranks 0 and {world - 1}"],
            lambda: vocab_parallel_fused_linear_sequence_logps(nudged, weight[start:stop], labels, group=group,
                                                               validate_labels=False))
    _raises(ValueError, ["rejected_hidden must be the same on every rank"],
            lambda: fk.fused_linear_focal_po_loss(hidden, nudged, weight[start:stop], labels, labels,
                                                  vocab_parallel_group=group))
    # one rank under torch.no_grad() (no backward there, while the others' backward all-reduces)
    leaf = hidden.clone().requires_grad_(True)
    with torch.set_grad_enabled(rank != 0):
        _raises(ValueError, ["gradients enabled", "ranks 0 and 1"],
                lambda: vocab_parallel_fused_linear_sequence_logps(leaf, weight[start:stop], labels, group=group))
    # float64 reference log-probs with two signs flipped on one rank (their 64-bit patterns differ by 2^63 each)
    refs64 = torch.tensor([-1.5, -2.25], dtype=torch.float64)
    _raises(ValueError, ["the loss's arguments", "must be the same on every rank"],
            lambda: fk.focal_po_loss(local.double(), local.double(), labels, labels, refs64 * (1 - 2 * (rank == 1)),
                                     refs64, vocab_parallel_group=group))
    # ... also when their sum and their position-weighted sum agree (+1, -2, +1 on three consecutive tokens)
    same_sums = torch.full((2, 4), 5, dtype=torch.int64)
    if rank == world - 1:
        same_sums[0, :3] += torch.tensor([1, -2, 1])
    _raises(ValueError, ["labels must be the same"],
            lambda: vocab_parallel_sequence_logps(local, same_sums, group=group))

    # sequence parallel: an error in one rank's own tokens raises on every rank (no hang)
    a, b = _token_split(4, rank, world)
    bad = labels[:, a:b].clone()
    if rank == world - 1:
        bad[0, 0] = V + 5
    kind, words = (ValueError, [f"found {V + 5}"]) if rank == world - 1 else (ValueError, [f"rank {world - 1}"])
    _raises(kind, words + ([] if rank == world - 1 else ["sequence_logps (sequence-parallel)"]),
            lambda: fk.sequence_logps(full[:, a:b], bad, sequence_parallel_group=group))
    _raises(kind, words, lambda: fk.fused_linear_sequence_logps(hidden[:, a:b], weight, bad,
                                                                sequence_parallel_group=group))
    # the fused losses name the side: chosen_labels here (the hidden-state path too)
    side_words = ["chosen_labels must be in", f"found {V + 5}"] if rank == world - 1 else words
    _raises(kind, side_words, lambda: fk.focal_po_loss(full[:, a:b], full[:, a:b], bad, labels[:, a:b],
                                                       sequence_parallel_group=group))
    _raises(kind, side_words, lambda: fk.fused_linear_focal_po_loss(hidden[:, a:b], hidden[:, a:b], weight, bad,
                                                                    labels[:, a:b], sequence_parallel_group=group))
    # ... and with the vocabulary split (the range is checked against the summed vocabulary, on every rank)
    wrong = labels.clone()
    wrong[1, 2] = V
    _raises(ValueError, ["rejected_labels must be in [0, 37)"],
            lambda: fk.focal_po_loss(local, local, labels, wrong, vocab_parallel_group=group))
    _raises(ValueError, ["rejected_labels must be in [0, 37)"],
            lambda: fk.fused_linear_focal_po_loss(hidden, hidden, weight[start:stop], labels, wrong,
                                                  vocab_parallel_group=group))

    # the pair's and the loss's arguments, wrong on one rank only, raise on every rank before any kernel (not
    # after the forward's collectives, with the other ranks waiting in the backward's)
    last = rank == world - 1
    refs = torch.zeros(2)

    def everywhere(kind, own, fn):
        _raises(kind if last else ValueError, own if last else [f"rank {world - 1} of the group", "every rank stops"],
                fn)

    bad_refs = torch.zeros(3) if last else refs
    everywhere(ValueError, ["ref_chosen_logps"],
               lambda: fk.focal_po_loss(local, local, labels, labels, bad_refs, refs, vocab_parallel_group=group))
    everywhere(ValueError, ["ref_chosen_logps"],
               lambda: fk.focal_po_loss(full[:, a:b], full[:, a:b], labels[:, a:b], labels[:, a:b], bad_refs, refs,
                                        sequence_parallel_group=group))
    loss_type = "no-such-loss" if last else "sigmoid"
    everywhere(ValueError, ["no-such-loss"],
               lambda: fk.fused_linear_focal_po_loss(hidden, hidden, weight[start:stop], labels, labels, refs, refs,
                                                     vocab_parallel_group=group, loss_type=loss_type))
    rejected = hidden[:1] if last else hidden
    everywhere(ValueError, ["chosen_hidden and rejected_hidden", "batch size"],
               lambda: fk.fused_linear_focal_po_loss(hidden, rejected, weight[start:stop], labels,
                                                     labels[:rejected.shape[0]], vocab_parallel_group=group))
    everywhere(ValueError, ["memory_budget must be >= 0"],
               lambda: fk.fused_linear_sequence_logps(hidden, weight[start:stop], labels, vocab_parallel_group=group,
                                                      memory_budget=-1 if last else None))
    everywhere(ValueError, ["memory_budget is not supported with vocab_parallel_group"],
               lambda: fk.fused_linear_sequence_logps(hidden, weight[start:stop], labels, vocab_parallel_group=group,
                                                      memory_budget=1 << 20 if last else None))
    everywhere(ValueError, ["inplace_backward=True is not supported"],
               lambda: fk.sequence_logps(local.clone(), labels, vocab_parallel_group=group, inplace_backward=last))

    # loss arguments that differ between ranks (no error on any rank alone): compared, not silently used
    everywhere_same = ["the loss's arguments", "must be the same on every rank"]
    _raises(ValueError, everywhere_same,
            lambda: fk.focal_po_loss(local, local, labels, labels, refs, refs, beta=0.1 + 0.1 * rank,
                                     vocab_parallel_group=group))
    _raises(ValueError, everywhere_same,
            lambda: fk.focal_po_loss(local, local, labels, labels, refs + rank, refs, vocab_parallel_group=group))
    _raises(ValueError, everywhere_same,
            lambda: fk.fused_linear_focal_po_loss(hidden, hidden, weight[start:stop], labels, labels,
                                                  vocab_parallel_group=group,
                                                  loss_type="sft" if rank == 0 else "sigmoid"))
    _raises(ValueError, ["sequence-parallel group", "ranks 0 and"],
            lambda: fk.focal_po_loss(full[:, a:b], full[:, a:b], labels[:, a:b], labels[:, a:b], refs, refs,
                                     sequence_parallel_group=group, pair_weights=torch.ones(2) * (1 + rank)))
    _raises(ValueError, ["return_token_counts", "must be the same"],
            lambda: fk.sequence_logps(full[:, a:b], labels[:, a:b], sequence_parallel_group=group,
                                      return_token_counts=rank == 0))
    # sequence-parallel: log-prob options that differ between ranks (each rank's own arguments are valid)
    sp_same = ["must be the same on every rank of the sequence-parallel group"]
    _raises(ValueError, sp_same, lambda: fk.sequence_logps(full[:, a:b], labels[:, a:b].clamp(min=0),
                                                           ignore_index=-100 * (rank == 0),
                                                           sequence_parallel_group=group))
    _raises(ValueError, sp_same, lambda: fk.sequence_logps(full[:, a:b, :V - min(rank, 1)], labels[:, a:b] % (V - 1),
                                                           sequence_parallel_group=group))
    for option in (dict(logit_softcap=None if rank == 0 else 2.0), dict(temperature=1.0 + rank),
                   dict(bias=None if rank == 0 else torch.zeros(V)), dict(logit_scale=1.0 + rank)):
        _raises(ValueError, sp_same, lambda: fk.fused_linear_sequence_logps(
            hidden[:, a:b], weight, labels[:, a:b], sequence_parallel_group=group, **option))
    _raises(ValueError, sp_same, lambda: fk.fused_linear_sequence_logps(
        *(t.to(torch.bfloat16 if rank else torch.float32) for t in (hidden[:, a:b], weight)), labels[:, a:b],
        sequence_parallel_group=group))
    # ... and the same arguments pass (−0.0 and 0.0 alike)
    same = fk.focal_po_loss(local, local, labels, labels, refs if rank else -refs, refs, vocab_parallel_group=group)
    assert torch.isfinite(same.loss)
    spelled = dict(beta=1, label_smoothing=0.0, loss_type=["focal"]) if rank == 0 else dict(beta=1.0)
    same = fk.focal_po_loss(local, local, labels, labels, vocab_parallel_group=group, **spelled)
    assert torch.isfinite(same.loss)

    # DTensor weights with vocab_parallel_group: Shard(0) is this rank's slice; Replicate is refused
    mesh = init_device_mesh("cpu", (world,))
    w64, h64 = weight.double(), hidden.double()
    ref = reference.sequence_logps(reference.linear_logits(h64, w64), labels)
    sharded = distribute_tensor(w64, mesh, [Shard(0)])
    logps = fk.fused_linear_sequence_logps(h64, sharded, labels, vocab_parallel_group=mesh, memory_budget=0)
    _close(logps, ref, "Shard(0) DTensor weight logps", 1e-10, 1e-10)
    _raises(ValueError, ["Shard(0)", "Replicate()"],
            lambda: fk.fused_linear_sequence_logps(h64, distribute_tensor(w64, mesh, [Replicate()]), labels,
                                                   vocab_parallel_group=mesh))
    # a mesh whose ranks descend: DTensor's shards follow the mesh, vocabulary slices the group's rank order
    from torch.distributed.device_mesh import DeviceMesh

    backwards = DeviceMesh("cpu", list(reversed(range(world))))
    for call in (lambda: fk.sequence_logps(distribute_tensor(full.double(), backwards, [Shard(-1)]), labels),
                 lambda: fk.fused_linear_sequence_logps(h64, distribute_tensor(w64, backwards, [Shard(0)]), labels,
                                                        vocab_parallel_group=group),
                 lambda: fk.sequence_logps(local, labels, vocab_parallel_group=backwards)):
        _raises(ValueError, ["not in ascending order"], call)
    # ... while a sum over the sequence-parallel group needs no order
    _close(fk.sequence_logps(full[:, a:b], labels[:, a:b], sequence_parallel_group=backwards),
           fk.sequence_logps(full[:, a:b], labels[:, a:b], sequence_parallel_group=group), "descending mesh, SP")
    # replicated hidden states as a DTensor: taken as the local tensor, with a replicated gradient
    h_rep = distribute_tensor(h64, mesh, [Replicate()]).requires_grad_(True)
    logps = fk.fused_linear_sequence_logps(h_rep, w64[_slice(rank, world)[0]:_slice(rank, world)[1]], labels,
                                           vocab_parallel_group=group)
    _close(logps, ref, "replicated DTensor hidden logps", 1e-10, 1e-10)
    h_ref = h64.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_loss(reference.sequence_logps(reference.linear_logits(h_ref, w64), labels)), [h_ref])
    _loss(logps).backward()
    _close(h_rep.grad.to_local(), grad, "replicated DTensor hidden grad", 1e-10, 1e-10)
    _raises(ValueError, ["redistribute"],
            lambda: fk.fused_linear_sequence_logps(distribute_tensor(h64, mesh, [Shard(1)]), w64[start:stop], labels,
                                                   vocab_parallel_group=group))
    # a DTensor hidden without the vocabulary-parallel path, and one DTensor side of a pair
    _raises(TypeError, ["hidden is a DTensor", "to_local()"],
            lambda: fk.fused_linear_sequence_logps(distribute_tensor(h64, mesh, [Replicate()]), w64, labels))
    dt_logits = distribute_tensor(full, mesh, [Shard(2)])
    _raises(TypeError, ["rejected_logits is a DTensor but chosen_logits is not"],
            lambda: fk.focal_po_loss(full, dt_logits, labels, labels))
    # DTensor logits with an explicit group over other ranks (no collective before the error)
    solo = dist.new_group([0])
    words = ["sharded over global ranks"] if rank == 0 else ["not a member"]
    _raises(ValueError, words, lambda: vocab_parallel_sequence_logps(dt_logits, labels, group=solo))
    # an FSDP2-style DTensor lm_head (Shard(0), no group keywords): it is gathered on every rank; an error in
    # one rank's own inputs then raises on every rank of the mesh (not only there, the others left waiting in
    # the gather's backward)
    fsdp_weight = distribute_tensor(w64, mesh, [Shard(0)]).requires_grad_(True)
    own = labels.clone()
    if last:
        own[0, 0] = V + 3
    everywhere(ValueError, [f"found {V + 3}"], lambda: fk.fused_linear_sequence_logps(h64, fsdp_weight, own))
    everywhere(ValueError, ["ref_chosen_logps"],
               lambda: fk.fused_linear_focal_po_loss(h64, h64, fsdp_weight, labels, labels, bad_refs.double(),
                                                     refs.double()))
    everywhere(TypeError, ["stats"],
               lambda: fk.fused_linear_token_logps(h64, fsdp_weight, labels, stats="entropy" if last else ()))
    everywhere(ValueError, ["memory_budget must be >= 0"],
               lambda: fk.fused_linear_sequence_logps(h64[:, a:b], fsdp_weight, labels[:, a:b],
                                                      sequence_parallel_group=group,
                                                      memory_budget=-1 if last else None))
    logps = fk.fused_linear_sequence_logps(h64, fsdp_weight, labels)
    _close(logps, ref, "FSDP2-style DTensor weight logps", 1e-10, 1e-10)
    _loss(logps).backward()  # every rank reaches the gather's backward
    assert fsdp_weight.grad is not None

    # the group still works afterwards
    _close(vocab_parallel_sequence_logps(local, labels, group=group), reference.sequence_logps(full.double(), labels),
           "after the agreement errors")


# ------------------------------------------------------------------ the public entry points with group keywords

def _counts(labels, cu_seqlens=None):
    if cu_seqlens is None:
        return (labels != -100).long().sum(-1)
    bounds = cu_seqlens.tolist()
    return torch.stack([(labels[a:b] != -100).sum() for a, b in zip(bounds[:-1], bounds[1:])])


def _pair_reference(chosen_logits64, rejected_logits64, chosen_labels, rejected_labels, leaves, **options):
    """float64: (loss, gradients of the loss with respect to `leaves`) of fk.preference_loss on the reference
    log-probs (token counts from the labels)."""
    import focal_kernels as fk
    from focal_kernels import reference

    out = fk.preference_loss(reference.sequence_logps(chosen_logits64, chosen_labels),
                             reference.sequence_logps(rejected_logits64, rejected_labels),
                             chosen_token_counts=_counts(chosen_labels),
                             rejected_token_counts=_counts(rejected_labels), **options)
    return out.loss.detach(), torch.autograd.grad(out.loss, leaves)


def api_logits(rank, world):
    """fk.sequence_logps with vocab_parallel_group (padded and packed, with token counts), with
    sequence_parallel_group, with DTensor logits and no group; inplace_backward=True refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import focal_kernels as fk

    group = _world()
    start, stop = _slice(rank, world)
    for packed in (False, True):
        cu = torch.tensor([0, 3, 3, 8, 11], dtype=torch.int64) if packed else None
        full = _logits((11, V), 81) if packed else _logits((3, 5, V), 82)
        labels = _labels((11,), 83) if packed else _labels((3, 5), 84)
        ref, ref_grad = _reference_logits(full, labels, cu)
        local = full[..., start:stop].clone().requires_grad_(True)
        logps, counts = fk.sequence_logps(local, labels, cu_seqlens=cu, return_token_counts=True,
                                          vocab_parallel_group=group)
        _close(logps, ref, f"fk.sequence_logps vocab-parallel logps (packed={packed})")
        assert torch.equal(counts, _counts(labels, cu)), (counts, _counts(labels, cu))
        _loss(logps).backward()
        _close(local.grad, ref_grad[..., start:stop], f"fk.sequence_logps vocab-parallel grad (packed={packed})",
               1e-5, 1e-6)
        # the same logits through the single-rank path give the single-rank answer (no group: no communication)
        _close(fk.sequence_logps(full, labels, cu_seqlens=cu), ref, "fk.sequence_logps without a group")

    # sequence-parallel: each rank holds a slice of every sequence's time steps (padded) or of the packed tokens
    full = _logits((2, 7, V), 85)
    labels = _labels((2, 7), 86)
    ref, ref_grad = _reference_logits(full, labels)
    a, b = _token_split(7, rank, world)
    local = full[:, a:b].clone().requires_grad_(True)
    logps, counts = fk.sequence_logps(local, labels[:, a:b], return_token_counts=True, sequence_parallel_group=group)
    _close(logps, ref, "fk.sequence_logps sequence-parallel logps")
    assert torch.equal(counts, _counts(labels)), (counts, _counts(labels))
    _loss(logps).backward()
    _close(local.grad, ref_grad[:, a:b], "fk.sequence_logps sequence-parallel grad", 1e-5, 1e-6)
    cu = torch.tensor([0, 4, 4, 9, 12])
    full = _logits((12, V), 87)
    labels = _labels((12,), 88)
    ref, ref_grad = _reference_logits(full, labels, cu)
    a, b = _token_split(12, rank, world)
    local = full[a:b].clone().requires_grad_(True)
    logps, counts = fk.sequence_logps(local, labels[a:b], cu_seqlens=cu.clamp(a, b) - a, return_token_counts=True,
                                      sequence_parallel_group=group)
    _close(logps, ref, "fk.sequence_logps sequence-parallel packed logps")
    assert torch.equal(counts, _counts(labels, cu)), (counts, _counts(labels, cu))
    _loss(logps).backward()
    _close(local.grad, ref_grad[a:b], "fk.sequence_logps sequence-parallel packed grad", 1e-5, 1e-6)

    # DTensor logits sharded on the vocabulary: no group needed
    mesh = init_device_mesh("cpu", (world,))
    full = _logits((2, 4, V), 89)
    labels = _labels((2, 4), 90)
    ref, ref_grad = _reference_logits(full, labels)
    sharded = distribute_tensor(full, mesh, [Shard(2)]).requires_grad_(True)
    logps, counts = fk.sequence_logps(sharded, labels, return_token_counts=True)
    _close(logps, ref, "fk.sequence_logps DTensor logps")
    assert torch.equal(counts, _counts(labels))
    _loss(logps).backward()
    _close(sharded.grad.full_tensor(), ref_grad, "fk.sequence_logps DTensor grad", 1e-5, 1e-6)

    # inplace_backward=True is refused with any group and with DTensor logits, before any communication
    local = full[..., start:stop] * 1.0
    for keywords in (dict(vocab_parallel_group=group), dict(sequence_parallel_group=group)):
        _raises(ValueError, ["inplace_backward"],
                lambda: fk.sequence_logps(local, labels, inplace_backward=True, **keywords))
    _raises(ValueError, ["inplace_backward"],
            lambda: fk.sequence_logps(distribute_tensor(full, mesh, [Shard(2)]), labels, inplace_backward=True))
    _raises(ValueError, ["inplace_backward"],
            lambda: fk.focal_po_loss(local, local * 1.0, labels, labels, inplace_backward=True,
                                     vocab_parallel_group=group))


def api_hidden(rank, world):
    """fk.fused_linear_sequence_logps with vocab_parallel_group (padded with bias and the logit transform,
    packed; token counts; a DTensor weight taken as this rank's slice), with sequence_parallel_group;
    memory_budget refused with vocab_parallel_group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import focal_kernels as fk
    from focal_kernels import reference

    group = _world()
    start, stop = _slice(rank, world)
    H = 8
    for packed in (False, True):
        options = {} if packed else dict(logit_softcap=5.0, logit_scale=0.8, temperature=1.2)
        cu = torch.tensor([0, 4, 4, 10], dtype=torch.int32) if packed else None
        weight = _logits((V, H), 91) / 2
        bias = None if packed else _logits((V,), 92)
        hidden = _logits((10, H), 93) if packed else _logits((2, 5, H), 94)
        labels = _labels((10,), 95) if packed else _labels((2, 5), 96)
        leaves = [hidden.double().requires_grad_(True), weight.double().requires_grad_(True)]
        if bias is not None:
            leaves.append(bias.double().requires_grad_(True))
        ref = reference.sequence_logps(reference.linear_logits(*leaves, **options), labels, cu_seqlens=cu)
        ref_grads = torch.autograd.grad(_loss(ref), leaves)
        h = hidden.clone().requires_grad_(True)
        w = weight[start:stop].clone().requires_grad_(True)
        b = None if bias is None else bias[start:stop].clone().requires_grad_(True)
        logps, counts = fk.fused_linear_sequence_logps(h, w, labels, b, cu_seqlens=cu, return_token_counts=True,
                                                       chunk_size=6, vocab_parallel_group=group, **options)
        what = f"fk.fused_linear_sequence_logps vocab-parallel (packed={packed})"
        _close(logps, ref, f"{what} logps")
        assert torch.equal(counts, _counts(labels, cu)), (counts, _counts(labels, cu))
        _loss(logps).backward()
        _close(h.grad, ref_grads[0], f"{what} hidden grad", 1e-5, 1e-5)
        _close(w.grad, ref_grads[1][start:stop], f"{what} weight grad", 1e-5, 1e-5)
        if b is not None:
            _close(b.grad, ref_grads[2][start:stop], f"{what} bias grad", 1e-5, 1e-5)

    # a DTensor weight with vocab_parallel_group is this rank's slice (torch.chunk sizes: 19 and 18)
    mesh = init_device_mesh("cpu", (world,))
    weight = _logits((V, H), 97) / 2
    hidden = _logits((2, 4, H), 98)
    labels = _labels((2, 4), 99)
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = reference.sequence_logps(reference.linear_logits(h64, w64), labels)
    ref_h, ref_w = torch.autograd.grad(_loss(ref), [h64, w64])
    sharded = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    logps = fk.fused_linear_sequence_logps(h, sharded, labels, vocab_parallel_group=group)
    _close(logps, ref, "DTensor weight with vocab_parallel_group: logps")
    _loss(logps).backward()
    _close(h.grad, ref_h, "DTensor weight with vocab_parallel_group: hidden grad", 1e-5, 1e-5)
    _close(sharded.grad.full_tensor(), ref_w, "DTensor weight with vocab_parallel_group: weight grad", 1e-5, 1e-4)

    # sequence-parallel: each rank holds a slice of the time steps and the whole weight
    a, b = _token_split(4, rank, world)
    h = hidden[:, a:b].clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logps, counts = fk.fused_linear_sequence_logps(h, w, labels[:, a:b], return_token_counts=True,
                                                   sequence_parallel_group=group)
    _close(logps, ref, "fk.fused_linear_sequence_logps sequence-parallel logps")
    assert torch.equal(counts, _counts(labels)), (counts, _counts(labels))
    _loss(logps).backward()
    _close(h.grad, ref_h[:, a:b], "fk.fused_linear_sequence_logps sequence-parallel hidden grad", 1e-5, 1e-5)
    torch.distributed.all_reduce(w.grad, group=group)  # SUM over the context group
    _close(w.grad, ref_w, "fk.fused_linear_sequence_logps sequence-parallel weight grad (summed)", 1e-5, 1e-5)

    # memory_budget is refused with vocab_parallel_group (before any communication)
    w = weight[start:stop]
    _raises(ValueError, ["memory_budget"],
            lambda: fk.fused_linear_sequence_logps(hidden, w, labels, memory_budget=1 << 20,
                                                   vocab_parallel_group=group))
    _raises(ValueError, ["memory_budget"],
            lambda: fk.fused_linear_focal_po_loss(hidden, hidden, w, labels, labels, memory_budget=1 << 20,
                                                  vocab_parallel_group=group))


def api_losses(rank, world):
    """fk.focal_po_loss and fk.fused_linear_focal_po_loss with vocab_parallel_group (and focal_po_loss with
    sequence_parallel_group and a loss that uses the token counts): loss and gradients against float64."""
    import focal_kernels as fk
    from focal_kernels import reference

    group = _world()
    start, stop = _slice(rank, world)
    options = dict(beta=0.5, gamma=0.3)
    ref_c, ref_r = torch.tensor([-20.0, -15.5]), torch.tensor([-18.0, -21.0])

    chosen, rejected = _logits((2, 5, V), 101), _logits((2, 4, V), 102)
    chosen_labels, rejected_labels = _labels((2, 5), 103), _labels((2, 4), 104)
    c64, r64 = chosen.double().requires_grad_(True), rejected.double().requires_grad_(True)
    expected, (grad_c, grad_r) = _pair_reference(c64, r64, chosen_labels, rejected_labels, [c64, r64],
                                                 ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, **options)
    # the spec's own FocalPO agrees with preference_loss's
    _close(reference.focal_po_loss(c64, r64, chosen_labels, rejected_labels, ref_c, ref_r, **options).loss,
           expected, "reference.focal_po_loss", 1e-12, 1e-12)
    c = chosen[..., start:stop].clone().requires_grad_(True)
    r = rejected[..., start:stop].clone().requires_grad_(True)
    out = fk.focal_po_loss(c, r, chosen_labels, rejected_labels, ref_c, ref_r, vocab_parallel_group=group,
                           **options)
    _close(out.loss, expected, "fk.focal_po_loss vocab-parallel loss")
    out.loss.backward()
    _close(c.grad, grad_c[..., start:stop], "fk.focal_po_loss vocab-parallel chosen grad", 1e-5, 1e-6)
    _close(r.grad, grad_r[..., start:stop], "fk.focal_po_loss vocab-parallel rejected grad", 1e-5, 1e-6)

    # sequence-parallel, with a loss that needs the (summed) token counts
    a, b = _token_split(5, rank, world)
    a2, b2 = _token_split(4, rank, world)
    expected, (grad_c, grad_r) = _pair_reference(c64, r64, chosen_labels, rejected_labels, [c64, r64],
                                                 loss_type="ipo", beta=0.5)
    c = chosen[:, a:b].clone().requires_grad_(True)
    r = rejected[:, a2:b2].clone().requires_grad_(True)
    out = fk.focal_po_loss(c, r, chosen_labels[:, a:b], rejected_labels[:, a2:b2], loss_type="ipo", beta=0.5,
                           sequence_parallel_group=group)
    _close(out.loss, expected, "fk.focal_po_loss sequence-parallel ipo loss")
    out.loss.backward()
    _close(c.grad, grad_c[:, a:b], "fk.focal_po_loss sequence-parallel chosen grad", 1e-5, 1e-6)
    _close(r.grad, grad_r[:, a2:b2], "fk.focal_po_loss sequence-parallel rejected grad", 1e-5, 1e-6)

    # from hidden states, with a bias
    H = 6
    weight, bias = _logits((V, H), 105) / 2, _logits((V,), 106)
    chosen_hidden, rejected_hidden = _logits((2, 5, H), 107), _logits((2, 4, H), 108)
    leaves = [t.double().requires_grad_(True) for t in (chosen_hidden, rejected_hidden, weight, bias)]
    expected, ref_grads = _pair_reference(reference.linear_logits(leaves[0], leaves[2], leaves[3]),
                                          reference.linear_logits(leaves[1], leaves[2], leaves[3]),
                                          chosen_labels, rejected_labels, leaves, ref_chosen_logps=ref_c,
                                          ref_rejected_logps=ref_r, **options)
    hc, hr = chosen_hidden.clone().requires_grad_(True), rejected_hidden.clone().requires_grad_(True)
    w = weight[start:stop].clone().requires_grad_(True)
    bb = bias[start:stop].clone().requires_grad_(True)
    out = fk.fused_linear_focal_po_loss(hc, hr, w, chosen_labels, rejected_labels, ref_c, ref_r, bias=bb,
                                        chunk_size=8, vocab_parallel_group=group, **options)
    what = "fk.fused_linear_focal_po_loss vocab-parallel"
    _close(out.loss, expected, f"{what} loss")
    out.loss.backward()
    _close(hc.grad, ref_grads[0], f"{what} chosen hidden grad", 1e-5, 1e-5)
    _close(hr.grad, ref_grads[1], f"{what} rejected hidden grad", 1e-5, 1e-5)
    _close(w.grad, ref_grads[2][start:stop], f"{what} weight grad", 1e-5, 1e-5)
    _close(bb.grad, ref_grads[3][start:stop], f"{what} bias grad", 1e-5, 1e-5)


# ------------------------------------------------------------------ both at once: a (context 2) x (vocabulary 2) mesh

def mesh_2x2(rank, world):
    """Vocabulary-parallel inside each context rank, then the per-sequence sums over the context group."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from focal_kernels import reference
    from focal_kernels.logprobs.parallel import (sequence_parallel_sum, vocab_parallel_fused_linear_sequence_logps,
                                                 vocab_parallel_sequence_logps)

    assert world == 4
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "tp"))
    cp, tp = mesh.get_local_rank("cp"), mesh.get_local_rank("tp")
    start, stop = _slice(tp, 2)
    a, b = _token_split(7, cp, 2)

    full = _logits((2, 7, V), 71)
    labels = _labels((2, 7), 72)
    ref, ref_grad = _reference_logits(full, labels)
    local = full[:, a:b, start:stop].clone().requires_grad_(True)
    logps = sequence_parallel_sum(vocab_parallel_sequence_logps(local, labels[:, a:b], group=mesh["tp"]), mesh["cp"])
    _close(logps, ref, "2x2 mesh logps")
    _loss(logps).backward()
    _close(local.grad, ref_grad[:, a:b, start:stop], "2x2 mesh logits grad", 1e-5, 1e-6)

    H = 8
    weight = _logits((V, H), 73) / 2
    hidden = _logits((2, 7, H), 74)
    h64, w64 = hidden.double().requires_grad_(True), weight.double().requires_grad_(True)
    ref = reference.sequence_logps(reference.linear_logits(h64, w64), labels)
    ref_h, ref_w = torch.autograd.grad(_loss(ref), [h64, w64])
    h = hidden[:, a:b].clone().requires_grad_(True)
    w = weight[start:stop].clone().requires_grad_(True)
    logps = sequence_parallel_sum(
        vocab_parallel_fused_linear_sequence_logps(h, w, labels[:, a:b], group=mesh["tp"]), mesh["cp"])
    _close(logps, ref, "2x2 mesh hidden logps")
    _loss(logps).backward()
    _close(h.grad, ref_h[:, a:b], "2x2 mesh hidden grad", 1e-5, 1e-5)
    dist.all_reduce(w.grad, group=mesh.get_group("cp"))  # the weight slice's gradient: SUM over context ranks
    _close(w.grad, ref_w[start:stop], "2x2 mesh weight-slice grad", 1e-5, 1e-5)

    # the same through the public entry points: both group keywords in one call (1-D meshes as the groups)
    import focal_kernels as fk

    ref, ref_grad = _reference_logits(full, labels)
    local = full[:, a:b, start:stop].clone().requires_grad_(True)
    logps, counts = fk.sequence_logps(local, labels[:, a:b], return_token_counts=True, vocab_parallel_group=mesh["tp"],
                                      sequence_parallel_group=mesh["cp"])
    _close(logps, ref, "2x2 mesh fk.sequence_logps logps")
    assert torch.equal(counts, _counts(labels)), (counts, _counts(labels))
    _loss(logps).backward()
    _close(local.grad, ref_grad[:, a:b, start:stop], "2x2 mesh fk.sequence_logps grad", 1e-5, 1e-6)

    ref = reference.sequence_logps(reference.linear_logits(h64, w64), labels)
    h = hidden[:, a:b].clone().requires_grad_(True)
    w = weight[start:stop].clone().requires_grad_(True)
    logps, counts = fk.fused_linear_sequence_logps(h, w, labels[:, a:b], return_token_counts=True,
                                                   vocab_parallel_group=mesh.get_group("tp"),
                                                   sequence_parallel_group=mesh.get_group("cp"))
    _close(logps, ref, "2x2 mesh fk.fused_linear_sequence_logps logps")
    assert torch.equal(counts, _counts(labels)), (counts, _counts(labels))
    _loss(logps).backward()
    _close(h.grad, ref_h[:, a:b], "2x2 mesh fk.fused_linear_sequence_logps hidden grad", 1e-5, 1e-5)
    dist.all_reduce(w.grad, group=mesh.get_group("cp"))
    _close(w.grad, ref_w[start:stop], "2x2 mesh fk.fused_linear_sequence_logps weight-slice grad", 1e-5, 1e-5)

    # a pair loss over both groups: the FocalPO loss of the full sequences
    chosen, rejected = _logits((2, 7, V), 75), _logits((2, 6, V), 76)
    chosen_labels, rejected_labels = labels, _labels((2, 6), 77)
    c64, r64 = chosen.double().requires_grad_(True), rejected.double().requires_grad_(True)
    expected, (grad_c, grad_r) = _pair_reference(c64, r64, chosen_labels, rejected_labels, [c64, r64], beta=0.5,
                                                 gamma=0.3)
    a2, b2 = _token_split(6, cp, 2)
    c = chosen[:, a:b, start:stop].clone().requires_grad_(True)
    r = rejected[:, a2:b2, start:stop].clone().requires_grad_(True)
    out = fk.focal_po_loss(c, r, chosen_labels[:, a:b], rejected_labels[:, a2:b2], beta=0.5, gamma=0.3,
                           vocab_parallel_group=mesh["tp"], sequence_parallel_group=mesh["cp"])
    _close(out.loss, expected, "2x2 mesh fk.focal_po_loss loss")
    out.loss.backward()
    _close(c.grad, grad_c[:, a:b, start:stop], "2x2 mesh fk.focal_po_loss chosen grad", 1e-5, 1e-6)
    _close(r.grad, grad_r[:, a2:b2, start:stop], "2x2 mesh fk.focal_po_loss rejected grad", 1e-5, 1e-6)

    # an error in one rank's own labels: every rank of both groups raises (none waits in a collective), the
    # others naming its global rank
    own = labels[:, a:b].float() if rank == 3 else labels[:, a:b]
    _raises(TypeError if rank == 3 else ValueError, ["int64 or int32"] if rank == 3 else ["global rank 3"],
            lambda: fk.sequence_logps(full[:, a:b, start:stop], own, vocab_parallel_group=mesh["tp"],
                                      sequence_parallel_group=mesh["cp"]))
    bad = labels[:, a:b].clone()
    if rank == 3:
        bad[0, 0] = V
    _raises(ValueError, [], lambda: fk.sequence_logps(full[:, a:b, start:stop], bad, vocab_parallel_group=mesh["tp"],
                                                      sequence_parallel_group=mesh["cp"]))
    # a mismatch inside a vocabulary group of the mesh names the ranks with their global ranks
    words = ["ignore_index must be the same", "(global rank 3)"] if cp == 1 else ["ignore_index must be the same"]
    _raises(ValueError, words,
            lambda: vocab_parallel_sequence_logps(local, labels[:, a:b], -100 - tp, group=mesh["tp"]))
    # what only a sequence-parallel group compares (return_token_counts; the vocabulary's slices, one row more on
    # global rank 3) differing on one rank: every rank of the mesh raises, none is left waiting in a collective
    # (ranks 0 and 1 once returned, their sequence-parallel peers having raised alone)
    _raises(ValueError, ["return_token_counts must be the same"] if cp == 1 else [], lambda: fk.sequence_logps(
        full[:, a:b, start:stop], labels[:, a:b], return_token_counts=rank == 3, vocab_parallel_group=mesh["tp"],
        sequence_parallel_group=mesh["cp"]))
    more = (lambda t: torch.cat([t, t[..., :1, :]], -2)) if rank == 3 else (lambda t: t)
    _raises(ValueError, ["its slices' sizes"], lambda: fk.fused_linear_sequence_logps(
        hidden[:, a:b], more(weight[start:stop]), labels[:, a:b], vocab_parallel_group=mesh["tp"],
        sequence_parallel_group=mesh["cp"]))
    _raises(ValueError, ["its slices' sizes"], lambda: fk.sequence_logps(
        more(full[:, a:b, start:stop].transpose(-1, -2)).transpose(-1, -2), labels[:, a:b],
        vocab_parallel_group=mesh["tp"], sequence_parallel_group=mesh["cp"]))
    # under autocast, dtypes that autocast casts alike (float32 on rank 3, bfloat16 on the others) agree in every
    # group: every rank returns and runs its backward (the sequence-parallel groups compared the dtypes before the
    # cast, so rank 3's group raised and ranks 0 and 2 waited in the backward's all-reduce)
    dtype = torch.float32 if rank == 3 else torch.bfloat16
    h = hidden[:, a:b].to(dtype).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = fk.fused_linear_sequence_logps(h, weight[start:stop].to(dtype), labels[:, a:b],
                                               vocab_parallel_group=mesh["tp"], sequence_parallel_group=mesh["cp"])
    _close(logps.float(), ref, "2x2 mesh under autocast (bfloat16 logits)", 1e-2, 0)
    _loss(logps.float()).backward()
    assert h.grad.dtype == dtype and torch.isfinite(h.grad).all()
    # a two-dimensional mesh is refused naming the argument
    _raises(ValueError, ["vocab_parallel_group", "one-dimensional"],
            lambda: fk.sequence_logps(full[:, a:b, start:stop], labels[:, a:b], vocab_parallel_group=mesh))


def compiled(rank, world):
    """Under torch.compile the calls with a group run their agreement eagerly (a graph break): the eager
    values and gradients, with aot_eager and with inductor (whose code once crashed on, or gave other values
    for, the agreement's int64 digests; its fused float32 arithmetic rounds differently: 1e-5), over changing
    shapes with inductor;
    fullgraph=True and CUDA-graph capture are refused with messages that say why."""
    for backend, tolerance in (("aot_eager", 1e-6), ("inductor", 1e-5)):
        _compiled(rank, world, backend, tolerance, changing_shapes=backend == "inductor")
    _refused_in_capture(rank, world)


def _compiled(rank, world, backend, tolerance, changing_shapes):
    import torch._dynamo

    import focal_kernels as fk

    group = _world()
    start, stop = _slice(rank, world)
    a, b = _token_split(4, rank, world)
    full, labels = _logits((2, 4, V), 91), _labels((2, 4), 92)
    weight, hidden = _logits((V, 8), 93) / 2, _logits((2, 4, 8), 94)

    def vocab(x, h, w):
        return _loss(fk.sequence_logps(x, labels, vocab_parallel_group=group)
                     + fk.fused_linear_sequence_logps(h, w, labels, vocab_parallel_group=group))

    def context(x):
        return _loss(fk.sequence_logps(x, labels[:, a:b], sequence_parallel_group=group))

    for fn, inputs in ((vocab, (full[..., start:stop], hidden, weight[start:stop])), (context, (full[:, a:b],))):
        leaves = [x.clone().requires_grad_(True) for x in inputs]
        expected = fn(*leaves)
        expected_grads = torch.autograd.grad(expected, leaves)
        torch._dynamo.reset()
        actual = torch.compile(fn, backend=backend)(*leaves)
        _close(actual, expected, f"compiled {fn.__name__}", tolerance, tolerance)
        for got, want in zip(torch.autograd.grad(actual, leaves), expected_grads):
            _close(got, want, f"compiled {fn.__name__} gradient", tolerance, tolerance)
        torch._dynamo.reset()
        # torch 2.10's graph_break takes no message: its error names the call only
        reason = (["gathered checks", "fullgraph=True"] if torch.torch_version.TorchVersion(torch.__version__) >= "2.11"
                  else ["torch._dynamo.graph_break()"])
        _raises(Exception, reason, lambda: torch.compile(fn, fullgraph=True, backend=backend)(*leaves))
    if not changing_shapes:
        return
    # Shapes that change between calls (default automatic dynamic shapes: the third call compiles with
    # symbolic B and T); the token log-probs' gradient arrives expanded from the per-sequence sums. Under
    # inductor only: its pipeline traces through aot_autograd as aot_eager does, then lowers with symbolic
    # sizes, which nothing else tests on the vocabulary-parallel hidden path (the loop under both took 13 s each).
    torch._dynamo.reset()
    compiled_hidden = torch.compile(lambda h, w, y: _loss(fk.fused_linear_sequence_logps(
        h, w, y, vocab_parallel_group=group)), backend=backend)
    for seed, (batch, seq_len) in enumerate(((2, 4), (3, 4), (4, 5), (5, 7))):
        h = _logits((batch, seq_len, 8), 95 + seed).requires_grad_(True)
        w = weight[start:stop].clone().requires_grad_(True)
        y = _labels((batch, seq_len), 99 + seed)
        want = _loss(fk.fused_linear_sequence_logps(h, w, y, vocab_parallel_group=group))
        got = compiled_hidden(h, w, y)
        _close(got, want, f"compiled vocab-parallel hidden states, {batch}x{seq_len}", tolerance, tolerance)
        for g, e in zip(torch.autograd.grad(got, (h, w)), torch.autograd.grad(want, (h, w))):
            _close(g, e, f"compiled vocab-parallel hidden states, {batch}x{seq_len}, gradient", tolerance, tolerance)


def _refused_in_capture(rank, world):
    import focal_kernels as fk

    group = _world()
    start, stop = _slice(rank, world)
    full, labels = _logits((2, 4, V), 91), _labels((2, 4), 92)
    capturing, available = torch.cuda.is_current_stream_capturing, torch.cuda.is_available
    torch.cuda.is_current_stream_capturing = torch.cuda.is_available = lambda: True  # as if capturing
    try:
        _raises(RuntimeError, ["cannot be captured in a CUDA graph"],
                lambda: fk.sequence_logps(full[..., start:stop], labels, vocab_parallel_group=group))
    finally:
        torch.cuda.is_current_stream_capturing, torch.cuda.is_available = capturing, available


def saved_copies(rank, world):
    """Activation offloading (`save_on_cpu`, TRL's `activation_offloading`) hands the backward copies of what the
    forward saved. The vocabulary- and sequence-parallel functions run under hooks that do so and poison each
    original as its copy is handed back (a backward that read an input from anywhere else, kept on `ctx` say,
    would read NaN): their log-probs and gradients still match the reference."""
    import focal_kernels
    from focal_kernels.logprobs import parallel

    def unpack(saved):
        original, copy = saved
        if original.is_floating_point():
            with torch.no_grad():
                original.fill_(math.nan)
        return copy

    def offloaded(fn):
        def call(*args, **kwargs):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: (t.detach(), t.detach().clone()), unpack):
                return fn(*args, **kwargs)
        return call

    # the vocabulary-parallel functions; the sequence-parallel scenarios' per-rank log-probs and their sum
    patched = [(parallel, name) for name in ("vocab_parallel_sequence_logps",
                                             "vocab_parallel_fused_linear_sequence_logps", "sequence_parallel_sum")]
    patched += [(focal_kernels, name) for name in ("sequence_logps", "fused_linear_sequence_logps")]
    originals = [(module, name, getattr(module, name)) for module, name in patched]
    try:
        for module, name, fn in originals:
            setattr(module, name, offloaded(fn))
        for scenario in (vp_logits_packed, vp_hidden_padded, sp_logits, sp_hidden):
            scenario(rank, world)
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)


SCENARIOS = {fn.__name__: fn for fn in (vp_logits_padded, vp_logits_packed, vp_logits_bf16, vp_hidden_padded,
                                        vp_hidden_tokens,
                                        vp_hidden_packed, dtensor, sp_logits, sp_hidden, errors, agreement,
                                        api_logits, api_hidden, api_losses, mesh_2x2, compiled,
                                        modes_and_dtypes, saved_copies)}
