"""Worker processes for tests/test_fsdp2.py: a tiny language model sharded with FSDP2 (`fully_shard`, per module
then the root) over a 2-process gloo group on the CPU, each rank scoring different data.

The lm_head's weight and bias are DTensors sharded on dimension 0 outside the model's forward; inside an
FSDP-wrapped module's forward they are the all-gathered plain tensors. Both ways of calling focal_kernels are
checked against a single-process float64 copy of the model: the log-probs of each rank's own data, and every
parameter's gradient, which FSDP averages over the data-parallel ranks (reduce-scatter with averaging), so the
reference is the gradient of (1 / W) Σ_r loss(data of rank r).

As in dist_workers.py, nothing imports triton at module level: `run` sets TRITON_INTERPRET=1 first and then
switches it per scenario ("interpret": the Triton kernels through the interpreter, "plain": the PyTorch path).
"""

from __future__ import annotations


import torch

V, H, B, T = 11, 6, 2, 5  # V odd: the two shards of dimension 0 differ in size (6 and 5 rows)
UNSUPPORTED = "FULLY_SHARD_UNSUPPORTED"  # marks an error raised by fully_shard itself (the parent then skips)


def run(rank, world, port, scenarios):
    from dist_workers import run_group

    def finish():
        if FAILURES:
            raise AssertionError(f"rank {rank}: {len(FAILURES)} mismatch(es):\n\n" + "\n\n".join(FAILURES))

    run_group(rank, world, port, scenarios, lambda name, mode: SCENARIOS[name](rank, world, f"{name} ({mode})"),
              finish)


# ------------------------------------------------------------------ the model

class FkHead(torch.nn.Module):
    """An lm_head whose forward is the focal_kernels call: under FSDP2, self.weight / self.bias are the
    all-gathered plain tensors here, and their gradients are reduce-scattered by FSDP."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(V, H))
        self.bias = torch.nn.Parameter(torch.empty(V))

    def forward(self, hidden, labels):
        import focal_kernels as fk

        assert not _is_dtensor(self.weight), "FSDP2 should have all-gathered the weight inside forward"
        return fk.fused_linear_sequence_logps(hidden, self.weight, labels, bias=self.bias, chunk_size=4)


class TinyLM(torch.nn.Module):
    def __init__(self, head_class):
        super().__init__()
        self.embed = torch.nn.Embedding(V, H)
        self.body = torch.nn.Linear(H, H)
        self.lm_head = head_class()

    def forward(self, input_ids, labels=None):
        hidden = torch.tanh(self.body(self.embed(input_ids)))
        if labels is None:
            return hidden  # the backbone only: the caller applies the lm_head
        return self.lm_head(hidden, labels)


def _is_dtensor(value):
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _build(head_class, dtype=torch.float32):
    """The same initial parameters on every rank (a fixed seed), in `dtype`."""
    generator = torch.Generator().manual_seed(1234)
    model = TinyLM(head_class)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64) * 0.7)
    return model.to(dtype)


def _shard(model, world, modules=("embed", "body", "lm_head")):
    """fully_shard on each of `modules`, then on the root (whose group holds the parameters of the others)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    try:
        for name in modules:
            fully_shard(getattr(model, name), mesh=mesh)
        fully_shard(model, mesh=mesh)
    except Exception as exc:  # noqa: BLE001 (reported to the parent, which skips on exactly this marker)
        raise RuntimeError(f"{UNSUPPORTED}: torch.distributed.fsdp.fully_shard failed on CPU/gloo: "
                           f"{type(exc).__name__}: {exc}") from exc
    return model


def _data(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    input_ids = torch.randint(0, V, (B, T), generator=generator)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, -1] = -100
    labels[torch.rand((B, T), generator=generator) < 0.25] = -100
    return input_ids, labels


def _loss(logps):
    weights = torch.linspace(0.5, 1.5, logps.shape[0], dtype=torch.float64)
    return (weights * logps.double()).sum() + 0.05 * (logps.double() ** 2).sum()


FAILURES = []  # mismatches, raised together once every scenario has run (see _close)


def _close(actual, expected, what, rtol=1e-5, atol=1e-5):
    """Records a mismatch instead of raising: every rank then still runs every collective of every scenario
    (a rank that stopped early would leave the others waiting), and one run reports all the mismatches."""
    try:
        torch.testing.assert_close(actual.detach().double(), expected.detach().double(), rtol=rtol, atol=atol,
                                   msg=lambda m: f"{what}: {m}")
    except AssertionError as exc:
        FAILURES.append(str(exc))


def _reference(world, head_class, pair=False):
    """float64, one process: per rank, its log-probs (or pair loss); the gradient of the mean over the ranks of
    their losses, by parameter name (what FSDP's averaging gives); and each rank's own gradient."""
    from focal_kernels import preference_loss, reference

    per_rank, grads = [], []
    for rank in range(world):
        model = _build(head_class, torch.float64)
        input_ids, labels = _data(rank)
        hidden = model(input_ids)
        logits = reference.linear_logits(hidden, model.lm_head.weight, model.lm_head.bias)
        logps = reference.sequence_logps(logits, labels)
        if pair:
            out = preference_loss(logps[0::2], logps[1::2], loss_type="focal", beta=0.5, gamma=0.3)
            per_rank.append(out.loss.detach())
            out.loss.backward()
        else:
            per_rank.append(logps.detach())
            _loss(logps).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    mean = {name: sum(g[name] for g in grads) / world for name in grads[0]}
    return per_rank, mean, grads


def _diagnosis(gathered, rank_grads, world):
    """A hint for a wrong sharded gradient: whether each rank's shard holds only its own rank's (unreduced)
    gradient, which is what a full_tensor() whose backward does no reduction over the data-parallel ranks gives."""
    rows = [chunk.shape[0] for chunk in torch.chunk(gathered, world)]
    own = torch.cat([g.split(rows)[r] for r, g in enumerate(rank_grads)])
    if torch.allclose(gathered.double(), own, rtol=1e-5, atol=1e-5):
        return (" [each rank's shard holds its own rank's unreduced gradient rows: the gradient was not averaged "
                "over the data-parallel ranks]")
    return ""


def _check_grads(model, ref_grads, rank_grads, world, what):
    """Every parameter's sharded gradient, gathered, against the float64 mean over the ranks."""
    for name, parameter in model.named_parameters():
        assert _is_dtensor(parameter), f"{what}: {name} is not a sharded DTensor after backward"
        assert parameter.grad is not None, f"{what}: {name} has no gradient"
        assert _is_dtensor(parameter.grad), f"{what}: {name}.grad is a {type(parameter.grad).__name__}"
        gathered = parameter.grad.full_tensor()
        hint = _diagnosis(gathered, [g[name] for g in rank_grads], world)
        _close(gathered, ref_grads[name], f"{what}: gradient of {name}{hint}")


# ------------------------------------------------------------------ scenarios

class PlainHead(torch.nn.Linear):
    def __init__(self):
        super().__init__(H, V)


def outside_forward(rank, world, what):
    """The loss computed after the model's forward, from model.lm_head.weight / .bias as FSDP2 leaves them:
    DTensor shards (dimension 0), which focal_kernels gathers with full_tensor()."""
    import focal_kernels as fk

    ref_logps, ref_grads, rank_grads = _reference(world, PlainHead)
    model = _shard(_build(PlainHead), world)
    input_ids, labels = _data(rank)
    hidden = model(input_ids)
    weight, bias = model.lm_head.weight, model.lm_head.bias
    assert _is_dtensor(weight) and _is_dtensor(bias), (type(weight), type(bias))
    assert weight.to_local().shape[0] == (6 if rank == 0 else 5), weight.to_local().shape
    logps = fk.fused_linear_sequence_logps(hidden, weight, labels, bias=bias, chunk_size=4)
    assert not _is_dtensor(logps), type(logps)
    _close(logps, ref_logps[rank], f"{what}: log-probs")
    _loss(logps).backward()
    _check_grads(model, ref_grads, rank_grads, world, what)


def outside_forward_root_group(rank, world, what):
    """As `outside_forward`, with the lm_head left in the root's FSDP group (as Hugging Face / TRL wrap a causal
    LM: per decoder layer, then the root holding the embedding, final norm and lm_head)."""
    import focal_kernels as fk

    ref_logps, ref_grads, rank_grads = _reference(world, PlainHead)
    model = _shard(_build(PlainHead), world, modules=("body",))
    input_ids, labels = _data(rank)
    hidden = model(input_ids)
    weight, bias = model.lm_head.weight, model.lm_head.bias  # plain tensors here: the root (torch 2.13) keeps
    # its parameters unsharded after its forward, and reduce-scatters their gradients after the backward
    logps = fk.fused_linear_sequence_logps(hidden, weight, labels, bias=bias, chunk_size=4)
    _close(logps, ref_logps[rank], f"{what}: log-probs")
    _loss(logps).backward()
    _check_grads(model, ref_grads, rank_grads, world, what)


def inside_forward(rank, world, what):
    """The loss computed inside the FSDP-wrapped head's forward, where its parameters are all-gathered."""
    ref_logps, ref_grads, rank_grads = _reference(world, FkHead)
    model = _shard(_build(FkHead), world)
    input_ids, labels = _data(rank)
    logps = model(input_ids, labels)
    _close(logps, ref_logps[rank], f"{what}: log-probs")
    _loss(logps).backward()
    _check_grads(model, ref_grads, rank_grads, world, what)


def outside_forward_pair_loss(rank, world, what):
    """fk.fused_linear_focal_po_loss (chosen and rejected in one pass) with the DTensor lm_head."""
    import focal_kernels as fk

    ref_losses, ref_grads, rank_grads = _reference(world, PlainHead, pair=True)
    model = _shard(_build(PlainHead), world)
    input_ids, labels = _data(rank)
    hidden = model(input_ids)
    out = fk.fused_linear_focal_po_loss(hidden[0::2], hidden[1::2], model.lm_head.weight, labels[0::2],
                                        labels[1::2], bias=model.lm_head.bias, beta=0.5, gamma=0.3)
    _close(out.loss, ref_losses[rank], f"{what}: loss")
    out.loss.backward()
    _check_grads(model, ref_grads, rank_grads, world, what)


def compiled_pair_loss(rank, world, what):
    """`outside_forward_pair_loss` in a step compiled with inductor, twice (the second call runs the compiled
    code): the gradient that flows back to the DTensor shards is still averaged over the ranks (torch 2.11
    had doubled it, see linear.gathered). Each rank gets its own inductor cache directory, as the README
    advises: with one shared cache, PyTorch's (2.13) FX graph cache keys a DTensor input by its global shape,
    so that on a later run rank 1 (5 rows) loads the code compiled for rank 0's 6-row shard and fails an
    assert_size_stride (plain PyTorch too). Before torch 2.13, with dynamic=False: 2.11's inductor fails
    to compile the gather's backward with symbolic sizes (plain PyTorch's full_tensor too)."""
    import os
    import shutil
    import tempfile

    import torch._dynamo

    import focal_kernels as fk

    cache = tempfile.mkdtemp(prefix=f"fk-inductor-rank{rank}-")
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        torch._dynamo.reset()
        ref_losses, ref_grads, rank_grads = _reference(world, PlainHead, pair=True)
        model = _shard(_build(PlainHead), world)
        input_ids, labels = _data(rank)

        dynamic = False if torch.torch_version.TorchVersion(torch.__version__) < "2.13" else None

        @torch.compile(backend="inductor", dynamic=dynamic)
        def step(input_ids, labels):
            hidden = model(input_ids)
            return fk.fused_linear_focal_po_loss(hidden[0::2], hidden[1::2], model.lm_head.weight, labels[0::2],
                                                 labels[1::2], bias=model.lm_head.bias, beta=0.5, gamma=0.3).loss

        for call in range(2):
            model.zero_grad(set_to_none=True)
            loss = step(input_ids, labels)
            _close(loss, ref_losses[rank], f"{what}, call {call}: loss")
            loss.backward()
            _check_grads(model, ref_grads, rank_grads, world, f"{what}, call {call}")
    finally:
        torch._dynamo.reset()
        if saved is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
        shutil.rmtree(cache, ignore_errors=True)


SCENARIOS = {fn.__name__: fn for fn in (outside_forward, outside_forward_root_group, inside_forward,
                                        outside_forward_pair_loss, compiled_pair_loss)}
