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
    """scenarios: (mode, name) pairs; mode "interpret" runs the Triton kernels through the interpreter,
    "plain" the PyTorch path. The kernels are imported once under TRITON_INTERPRET=1 (it must precede
    `import triton`); the variable is then switched per scenario, which the CPU dispatch reads at every call."""
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET was set"
    os.environ["TRITON_INTERPRET"] = "1"
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
            SCENARIOS[name](rank, world)
            dist.barrier()
    finally:
        dist.destroy_process_group()


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
        _close(sharded.grad.to_local(), torch.chunk(ref_grad, world, dim=2)[rank], f"DTensor {placement} grad",
               1e-10, 1e-12)
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
    # the group still works afterwards
    ref = fk.reference.sequence_logps(full.double(), labels)
    _close(vocab_parallel_sequence_logps(full[..., start:stop], labels, group=group), ref, "after the errors")


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


SCENARIOS = {fn.__name__: fn for fn in (vp_logits_padded, vp_logits_packed, vp_logits_bf16, vp_hidden_padded,
                                        vp_hidden_packed, dtensor, sp_logits, sp_hidden, errors, mesh_2x2)}
