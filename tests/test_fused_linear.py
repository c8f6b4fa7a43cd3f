"""The logit-free path (hidden states + lm_head weight) against the float64 reference on materialized logits."""

import math

import pytest
import torch
from conftest import DEVICE
from helpers import poison_empty
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import focal_kernels as fk
from focal_kernels import backend, checks
from focal_kernels.logprobs import scored_rows, vocab_chunks
from focal_kernels import FusedLinearFocalPOLoss, fused_linear_focal_po_loss, fused_linear_sequence_logps
from focal_kernels.logprobs.vocab_chunks import default_chunk_size

IGNORE = -100

# (loss and log-probs atol, gradient tolerance relative to the largest reference gradient entry)
# The chunk GEMMs round the logits to the inputs' dtype (as a model's lm_head would), the reference does not:
# half-precision errors are dominated by that rounding (about 5e-3 relative for bfloat16).
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 2e-6),
    torch.float16: (5e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def make_inputs(batch=2, seq_len=5, rejected_len=4, hidden_size=16, vocab=37, dtype=torch.float32,
                bias=True, ref=True, device=DEVICE):
    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype).requires_grad_()

    chosen_labels = torch.randint(0, vocab, (batch, seq_len), device=device)
    rejected_labels = torch.randint(0, vocab, (batch, rejected_len), device=device)
    chosen_labels[:, :1] = IGNORE  # a prompt token (none at T = 0)
    rejected_labels[-1, -1] = IGNORE
    return dict(
        chosen_hidden=leaf(batch, seq_len, hidden_size),
        rejected_hidden=leaf(batch, rejected_len, hidden_size),
        weight=leaf(vocab, hidden_size, scale=hidden_size ** -0.5),
        bias=leaf(vocab, scale=0.5) if bias else None,
        chosen_labels=chosen_labels,
        rejected_labels=rejected_labels,
        ref_chosen_logps=(-20 * torch.rand(batch, device=device)) if ref else None,
        ref_rejected_logps=(-20 * torch.rand(batch, device=device)) if ref else None,
    )


def differentiable(inputs):
    return [inputs[name] for name in ("chosen_hidden", "rejected_hidden", "weight", "bias")
            if inputs[name] is not None]


def fused(inputs, **options):
    return fused_linear_focal_po_loss(
        inputs["chosen_hidden"], inputs["rejected_hidden"], inputs["weight"],
        inputs["chosen_labels"], inputs["rejected_labels"], inputs["ref_chosen_logps"],
        inputs["ref_rejected_logps"], bias=inputs["bias"], **options)


def reference(inputs, **options):
    """fk.reference.focal_po_loss on float64 logits hidden @ W.T + bias, materialized."""
    chosen, rejected, weight = (inputs[k].detach().double().requires_grad_()
                                for k in ("chosen_hidden", "rejected_hidden", "weight"))
    bias = None if inputs["bias"] is None else inputs["bias"].detach().double().requires_grad_()

    def logits(hidden):
        return hidden @ weight.T + (0 if bias is None else bias)

    out = fk.reference.focal_po_loss(logits(chosen), logits(rejected), inputs["chosen_labels"],
                                     inputs["rejected_labels"], inputs["ref_chosen_logps"],
                                     inputs["ref_rejected_logps"], **options)
    leaves = [chosen, rejected, weight] + ([] if bias is None else [bias])
    return out, leaves


def assert_matches_reference(inputs, dtype, *, chunk_size, **options):
    value_atol, grad_rtol = TOLERANCES[dtype]
    out = fused(inputs, chunk_size=chunk_size, **options)
    expected, leaves = reference(inputs, **options)
    for name in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        got, want = getattr(out, name), getattr(expected, name)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        torch.testing.assert_close(got.double(), want, atol=value_atol, rtol=value_atol, msg=name)

    # The loss plus an extra term on the log-probs (an NLL, say): both gradients must arrive.
    def objective(result):
        extra = 1e-2 * result.chosen_logps.sum() - 3e-3 * result.rejected_logps.sum()
        return result.loss.sum() + extra

    grads = torch.autograd.grad(objective(out), differentiable(inputs))
    expected_grads = torch.autograd.grad(objective(expected), leaves)
    for got, want in zip(grads, expected_grads):
        assert got.dtype == dtype
        tol = grad_rtol * max(want.abs().max().item() if want.numel() else 0.0, 1e-3)  # (T = 0: none)
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias, ref", [(True, True), (False, False)])
def test_matches_reference(dtype, bias, ref):
    inputs = make_inputs(dtype=dtype, bias=bias, ref=ref)
    assert_matches_reference(inputs, dtype, chunk_size=8)  # 37 = 4·8 + 5: a ragged last chunk


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_sequences_of_no_tokens(dtype):
    """Padded T = 0 chosen hidden states beside T = 1 rejected ones: log-prob 0, an empty gradient."""
    inputs = make_inputs(dtype=dtype, seq_len=0, rejected_len=1)
    assert inputs["chosen_hidden"].shape == (2, 0, 16)
    assert_matches_reference(inputs, dtype, chunk_size=8)
    chosen_logps = fused(inputs).chosen_logps
    assert torch.equal(chosen_logps, torch.zeros_like(chosen_logps))


@pytest.mark.parametrize("chunk_size", [1, 3, 36, 37, 64, None])
def test_chunk_sizes(chunk_size):
    inputs = make_inputs(vocab=11 if chunk_size == 1 else 37, dtype=torch.float64, seq_len=3, rejected_len=2)
    assert_matches_reference(inputs, torch.float64, chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("gamma, detach_focal_weight", [(0.0, False), (0.5, True)])
def test_options(reduction, gamma, detach_focal_weight):
    inputs = make_inputs(dtype=torch.float64, seq_len=3, rejected_len=3)
    assert_matches_reference(inputs, torch.float64, chunk_size=16, beta=0.5, gamma=gamma, reduction=reduction,
                             detach_focal_weight=detach_focal_weight)


def test_gradcheck():
    inputs = make_inputs(batch=2, seq_len=3, rejected_len=2, hidden_size=3, vocab=7, dtype=torch.float64)
    labels_and_refs = {k: inputs[k] for k in ("chosen_labels", "rejected_labels",
                                               "ref_chosen_logps", "ref_rejected_logps")}

    def loss(chosen_hidden, rejected_hidden, weight, bias):
        return fused(dict(labels_and_refs, chosen_hidden=chosen_hidden, rejected_hidden=rejected_hidden,
                          weight=weight, bias=bias), chunk_size=3, gamma=0.5).loss

    assert torch.autograd.gradcheck(loss, differentiable(inputs), fast_mode=True)


def test_sequence_logps_alone():
    """The (B,) log-probs on their own, from a shifted (non-contiguous) hidden view and int32 labels."""
    batch, seq_len, hidden_size, vocab = 3, 5, 8, 29
    states = torch.randn(batch, seq_len + 1, hidden_size, dtype=torch.float64, device=DEVICE, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, device=DEVICE, requires_grad=True)
    bias = torch.randn(vocab, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq_len + 1), device=DEVICE, dtype=torch.int32)
    labels[1, :3] = IGNORE
    hidden, targets = states[:, :-1], labels[:, 1:]
    assert not hidden.is_contiguous()

    logps = fused_linear_sequence_logps(hidden, weight, targets, bias=bias, chunk_size=6)
    expected = fk.reference.sequence_logps(hidden @ weight.T + bias, targets)
    torch.testing.assert_close(logps, expected, atol=1e-12, rtol=1e-12)

    upstream = torch.randn(batch, dtype=torch.float64, device=DEVICE)
    grads = torch.autograd.grad(logps, (states, weight, bias), upstream)
    expected_grads = torch.autograd.grad(expected, (states, weight, bias), upstream)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_ignored_tokens():
    """An all-ignored sequence has logp 0 and zero gradient; ignored positions' hidden states are never read."""
    inputs = make_inputs(batch=3, dtype=torch.float64, seq_len=4, rejected_len=3)
    inputs["chosen_labels"][1] = IGNORE
    inputs["rejected_labels"][2] = IGNORE
    assert_matches_reference(inputs, torch.float64, chunk_size=10)

    out = fused(inputs, chunk_size=10)
    assert out.chosen_logps[1].item() == 0.0 and out.rejected_logps[2].item() == 0.0
    grad_chosen, grad_rejected = torch.autograd.grad(out.loss, (inputs["chosen_hidden"], inputs["rejected_hidden"]))
    assert not grad_chosen[1].any() and not grad_rejected[2].any()
    assert not grad_chosen[:, 0].any()  # the prompt positions

    # Poisoning every ignored position changes nothing, bit for bit.
    poisoned = dict(inputs)
    for side in ("chosen", "rejected"):
        hidden = inputs[f"{side}_hidden"].detach().clone()
        hidden[inputs[f"{side}_labels"] == IGNORE] = math.nan
        poisoned[f"{side}_hidden"] = hidden.requires_grad_()
    again = fused(poisoned, chunk_size=10)
    assert torch.equal(again.loss, out.loss)
    assert all(torch.equal(a, b) for a, b in zip(
        torch.autograd.grad(again.loss, differentiable(poisoned)),
        torch.autograd.grad(fused(inputs, chunk_size=10).loss, differentiable(inputs))))


@pytest.mark.parametrize("where", ["hidden", "weight", "bias"])
def test_nan_in_gives_nan_out(where):
    """A NaN in a scored token's hidden state makes that sequence's log-prob NaN (its neighbours stay finite);
    a NaN in the weight or bias reaches every scored token. Never silently finite."""
    inputs = make_inputs(dtype=torch.float32, seq_len=4, rejected_len=3)
    with torch.no_grad():
        if where == "hidden":
            inputs["chosen_hidden"][1, 2, 5] = math.nan  # make_inputs ignores only position 0 of chosen
        else:
            inputs[where].view(-1)[7] = math.nan
    out = fused(inputs, chunk_size=8)
    assert torch.isnan(out.loss)
    if where == "hidden":
        assert torch.isnan(out.chosen_logps[1]) and torch.isfinite(out.chosen_logps[0])
        assert torch.isfinite(out.rejected_logps).all()
    else:
        assert torch.isnan(out.chosen_logps).all() and torch.isnan(out.rejected_logps).all()
    for grad in torch.autograd.grad(out.loss, differentiable(inputs)):
        assert torch.isnan(grad).any()


def test_everything_ignored():
    inputs = make_inputs(dtype=torch.float64, ref=False, seq_len=3, rejected_len=2)
    inputs["chosen_labels"].fill_(IGNORE)
    inputs["rejected_labels"].fill_(IGNORE)
    out = fused(inputs, chunk_size=5, gamma=0.0)
    assert not out.chosen_logps.any() and not out.rejected_logps.any()
    torch.testing.assert_close(out.loss, torch.tensor(math.log(2.0), dtype=torch.float64, device=DEVICE))
    for grad in torch.autograd.grad(out.loss, differentiable(inputs)):
        assert not grad.any()


def test_frozen_weight_and_single_group_gradients():
    """Only the inputs that need a gradient get one (a frozen lm_head, no bias gradient)."""
    inputs = make_inputs(dtype=torch.float64, seq_len=3, rejected_len=3)
    inputs["weight"].requires_grad_(False)
    inputs["bias"].requires_grad_(False)
    out = fused(inputs, chunk_size=16)
    expected, leaves = reference(inputs)
    grads = torch.autograd.grad(out.loss, (inputs["chosen_hidden"], inputs["rejected_hidden"]))
    expected_grads = torch.autograd.grad(expected.loss, leaves[:2])
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_views_and_odd_inputs(dtype):
    """Strided views of every input (a shifted chosen view; a rejected side with T = 1 read from an
    interleaved layout, stride(-1) != 1; a weight stored transposed, as a tied embedding may be; a strided bias), int32
    labels and a non-default ignore_index."""
    batch, seq_len, hidden_size, vocab, ignore = 2, 4, 16, 37, -1
    inputs = make_inputs(batch=batch, seq_len=seq_len, rejected_len=1, hidden_size=hidden_size, vocab=vocab,
                         dtype=dtype)

    def view(tensor, make):
        return make(tensor.detach().clone()).requires_grad_()

    chosen_states = view(inputs["chosen_hidden"], lambda t: torch.cat([t, t[:, :1]], dim=1))
    inputs["chosen_hidden"] = chosen_states[:, :-1]
    inputs["rejected_hidden"] = view(inputs["rejected_hidden"], lambda t: torch.stack([t, t], dim=-1))[..., 0]
    inputs["weight"] = view(inputs["weight"], lambda t: t.t().contiguous()).t()
    inputs["bias"] = view(inputs["bias"], lambda t: torch.stack([t, t], dim=1)).select(1, 0)
    for side in ("chosen", "rejected"):
        labels = inputs[f"{side}_labels"]
        inputs[f"{side}_labels"] = torch.where(labels == IGNORE, ignore, labels).to(torch.int32)
    assert not inputs["chosen_hidden"].is_contiguous() and inputs["rejected_hidden"].stride(-1) != 1
    assert not inputs["weight"].is_contiguous() and not inputs["bias"].is_contiguous()
    assert (inputs["chosen_labels"] == ignore).any()
    assert_matches_reference(inputs, dtype, chunk_size=8, ignore_index=ignore)


def test_every_output_element_is_written(monkeypatch):
    """torch.empty poisoned with NaN: the outputs and gradients are bit for bit those of a clean run."""
    inputs = make_inputs(batch=3, dtype=torch.float32, seq_len=5, rejected_len=4)
    inputs["chosen_labels"][2] = IGNORE  # a sequence with nothing scored, and gaps in the others

    def run():
        out = fused(inputs, chunk_size=8)
        extra = out.chosen_logps.sum() - out.rejected_logps.sum()
        return [out.loss, out.chosen_logps, out.rejected_logps,
                *torch.autograd.grad(out.loss + extra, differentiable(inputs))]

    clean = run()
    poison_empty(monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(run(), clean))


def test_autocast():
    """Under autocast the GEMMs run in the autocast dtype, as a model's lm_head would: the same results as
    casting the inputs by hand, gradients in the inputs' own dtype, whether the backward runs inside the
    autocast region or after it. A bfloat16 hidden state with a float32 weight is fine there."""
    inputs = make_inputs(dtype=torch.float32)
    cast = {k: v.detach().to(torch.bfloat16).requires_grad_() if k in ("chosen_hidden", "rejected_hidden",
                                                                         "weight", "bias") else v
            for k, v in inputs.items()}
    expected = fused(cast, chunk_size=8)
    expected_grads = torch.autograd.grad(expected.loss, differentiable(cast))

    for backward_inside in (False, True):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = fused(inputs, chunk_size=8)
            if backward_inside:
                grads = torch.autograd.grad(out.loss, differentiable(inputs))
        if not backward_inside:
            grads = torch.autograd.grad(out.loss, differentiable(inputs))
        assert torch.equal(out.chosen_logps, expected.chosen_logps)
        torch.testing.assert_close(out.loss, expected.loss, rtol=1e-6, atol=1e-6)
        for got, want in zip(grads, expected_grads):
            assert got.dtype == torch.float32
            assert torch.equal(got, want.float())

    # A forward outside autocast whose backward runs inside it: the recomputed GEMMs stay in float32.
    plain = fused(inputs, chunk_size=8)
    plain_grads = torch.autograd.grad(plain.loss, differentiable(inputs), retain_graph=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(plain.loss, differentiable(inputs)),
                                                     plain_grads))

    mixed = dict(inputs, chosen_hidden=cast["chosen_hidden"], rejected_hidden=cast["rejected_hidden"])
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert torch.equal(fused(mixed, chunk_size=8).chosen_logps, expected.chosen_logps)
        logps = fused_linear_sequence_logps(inputs["chosen_hidden"], inputs["weight"], inputs["chosen_labels"],
                                            bias=inputs["bias"], chunk_size=8)
    assert torch.equal(logps, fused_linear_sequence_logps(cast["chosen_hidden"], cast["weight"],
                                                          inputs["chosen_labels"], bias=cast["bias"], chunk_size=8))
    with torch.autocast(DEVICE, dtype=torch.bfloat16), pytest.raises(TypeError, match="after casting to the autocast"):
        fused(dict(inputs, chosen_hidden=inputs["chosen_hidden"].double()), chunk_size=8)


@pytest.mark.parametrize("through_triton", [True, False])
def test_large_logits_keep_their_precision(monkeypatch, through_triton):
    """Logits around 3e4: float32 would round lse = max + log Σ exp by up to 1e-3, and exp(x − lse) with
    it; the backward takes max and log Σ exp apart, so each row's probabilities still sum to 1 and the bias
    gradient (Σ over rows of g·(onehot − p)) sums to 0 within float32 rounding."""
    if not through_triton:
        monkeypatch.setattr(backend, "use_triton", lambda tensor: False)
    inputs = make_inputs(batch=3, dtype=torch.float32, seq_len=6, rejected_len=5, vocab=300, ref=False)
    with torch.no_grad():
        inputs["bias"].add_(30000.0)
    out = fused(inputs, chunk_size=64, reduction="sum", beta=1.0)
    (grad_bias,) = torch.autograd.grad(out.loss, [inputs["bias"]])
    assert torch.isfinite(grad_bias).all()
    assert abs(grad_bias.double().sum().item()) <= 1e-6 * grad_bias.double().abs().sum().item()


def test_mixed_precision_accumulation():
    """acc += a @ b into a float32 buffer from bfloat16 factors: through addmm(out_dtype=float32) where this
    PyTorch and device take it (probed once and remembered), else upcast factors. Either way the product is
    never rounded to bfloat16 before the addition: a product whose bf16 rounding is visible comes out exact."""
    vocab_chunks._MIXED_ADDMM_WORKS.clear()
    a = torch.randn(5, 7, device=DEVICE).to(torch.bfloat16)
    b = torch.randn(7, 3, device=DEVICE).to(torch.bfloat16)
    acc = torch.ones(5, 3, device=DEVICE)
    for _ in range(2):
        vocab_chunks.accumulate_product(acc, a, b)
    expected = 1 + 2 * (a.double() @ b.double())
    torch.testing.assert_close(acc.double(), expected, rtol=1e-6, atol=1e-6)
    rounded = 1 + 2 * (a.double() @ b.double()).to(torch.bfloat16).double()
    assert (rounded - expected).abs().max() > 1e-4, "the inputs should make bf16 rounding visible"
    works = vocab_chunks._MIXED_ADDMM_WORKS
    assert list(works) == [(acc.device.type, torch.bfloat16, torch.float32)]
    if DEVICE == "cpu":
        assert works[("cpu", torch.bfloat16, torch.float32)] is False  # no such kernel on the CPU
    else:  # CUDA from PyTorch 2.10: the float32 accumulation in cuBLAS, not the slower upcast fallback
        assert works[("cuda", torch.bfloat16, torch.float32)] is True


def test_module_options_changed_after_construction_take_effect():
    """Every option of the functional form is an attribute, given at construction or not: one changed later is
    used at the next call (it was ignored unless given to the constructor), or refused there."""
    inputs = make_inputs(dtype=torch.float64, seq_len=3, rejected_len=3)

    def call(module):
        return module(inputs["chosen_hidden"], inputs["rejected_hidden"], inputs["weight"], inputs["chosen_labels"],
                      inputs["rejected_labels"], inputs["ref_chosen_logps"], inputs["ref_rejected_logps"],
                      bias=inputs["bias"]).loss

    changes = [dict(temperature=2.0), dict(logit_softcap=1.0), dict(logit_scale=0.5),
               dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0, 0.25]), dict(loss_type="ipo"),
               dict(gamma=0.7), dict(chunk_size=7)]
    for change in changes:
        module = FusedLinearFocalPOLoss()
        for name, value in change.items():
            setattr(module, name, value)
        expected = fused(inputs, **change).loss
        assert torch.equal(call(module), expected), change
        if "chunk_size" not in change:  # (the chunking changes no value)
            assert not torch.equal(expected, fused(inputs).loss), f"{change} should change the loss"
        assert all(f"{name}=" in repr(module) for name in change)
    module = FusedLinearFocalPOLoss()
    module.temperature = 0.0
    with pytest.raises(ValueError, match="temperature"):
        call(module)
    # a module pickled before every option was an attribute (only the given ones) still computes the same
    state = FusedLinearFocalPOLoss(gamma=0.3).__getstate__()
    for name in ("temperature", "logit_softcap", "loss_type", "validate_labels"):
        del state[name]
    old = FusedLinearFocalPOLoss.__new__(FusedLinearFocalPOLoss)
    old.__setstate__(state)
    assert torch.equal(call(old), fused(inputs, gamma=0.3).loss)


def test_module_form():
    inputs = make_inputs(dtype=torch.float64, seq_len=3, rejected_len=3)
    module = FusedLinearFocalPOLoss(beta=0.2, gamma=0.3, reduction="sum", chunk_size=9)
    assert "chunk_size=9" in repr(module)
    out = module(inputs["chosen_hidden"], inputs["rejected_hidden"], inputs["weight"], inputs["chosen_labels"],
                 inputs["rejected_labels"], inputs["ref_chosen_logps"], inputs["ref_rejected_logps"],
                 bias=inputs["bias"])
    direct = fused(inputs, beta=0.2, gamma=0.3, reduction="sum", chunk_size=9)
    assert torch.equal(out.loss, direct.loss)
    assert torch.equal(out.chosen_logps, direct.chosen_logps)
    weights = torch.rand(inputs["chosen_labels"].shape[0], dtype=torch.float64, device=DEVICE)
    out = module(inputs["chosen_hidden"], inputs["rejected_hidden"], inputs["weight"], inputs["chosen_labels"],
                 inputs["rejected_labels"], inputs["ref_chosen_logps"], inputs["ref_rejected_logps"],
                 bias=inputs["bias"], pair_weights=weights)
    assert torch.equal(out.loss, fused(inputs, beta=0.2, gamma=0.3, reduction="sum", chunk_size=9,
                                       pair_weights=weights).loss)
    with pytest.raises(TypeError, match="positional"):  # bias by keyword only, as in the function
        module(inputs["chosen_hidden"], inputs["rejected_hidden"], inputs["weight"], inputs["chosen_labels"],
               inputs["rejected_labels"], inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], inputs["bias"])


def test_deterministic():
    inputs = make_inputs(batch=3, dtype=torch.float32, seq_len=6, rejected_len=4, vocab=53)

    def run():
        out = fused(inputs, chunk_size=16)
        return [out.loss, out.chosen_logps, out.rejected_logps,
                *torch.autograd.grad(out.loss, differentiable(inputs))]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_torch_fallback(monkeypatch):
    """Without Triton the same chunked Function runs PyTorch versions of the two kernels."""
    monkeypatch.setattr(backend, "use_triton", lambda tensor: False)
    for dtype in (torch.float64, torch.float32):
        assert_matches_reference(make_inputs(dtype=dtype), dtype, chunk_size=8)


class LargestAllocation(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any op returns (bytes, not elements: Triton's
    interpreter handles tensors through byte views of them)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in tree_leaves(result):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel() * value.element_size())
        return result


@pytest.mark.parametrize("through_triton", [True, False])
def test_never_materializes_logits(monkeypatch, through_triton):
    """With a small chunk, the largest tensor is the weight's gradient: nothing of B·T·V elements exists."""
    batch, seq_len, rejected_len, hidden_size, vocab = 3, 6, 5, 8, 300
    if not through_triton:
        monkeypatch.setattr(backend, "use_triton", lambda tensor: False)
    inputs = make_inputs(batch=batch, seq_len=seq_len, rejected_len=rejected_len, hidden_size=hidden_size,
                         vocab=vocab, dtype=torch.float32)
    logits_bytes = batch * rejected_len * vocab * 4  # the smaller side's logits: 4500 float32
    weight_bytes = vocab * hidden_size * 4  # 2400 float32, the largest legitimate buffer
    assert weight_bytes < logits_bytes

    with LargestAllocation() as probe:  # the probe does see a materialized logits tensor
        inputs["rejected_hidden"].detach() @ inputs["weight"].detach().T
    assert probe.largest >= logits_bytes

    with LargestAllocation() as recorder:
        out = fused(inputs, chunk_size=16)
        out.loss.backward()
    assert weight_bytes <= recorder.largest < logits_bytes
    assert inputs["weight"].grad is not None and inputs["chosen_hidden"].grad is not None


def peak_live_bytes(fn):
    """(peak bytes of tensors alive at once while fn runs, counting only those it creates; fn's result).

    From the profiler's memory timeline (allocations and frees in order), on the CPU.
    """
    from torch.profiler._memory_profiler import Action  # private: imported here so only these tests depend on it

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        result = fn()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak, result


@pytest.mark.skipif(DEVICE != "cpu", reason="the profiler's memory timeline is read on the CPU")
@pytest.mark.parametrize("prompt_len", [0, 12])
def test_peak_memory_is_the_accumulator_plus_a_chunk(monkeypatch, prompt_len):
    """Besides the weight's gradient, one fwd+bwd holds at most the gathered rows, the float32 (N, H)
    hidden-gradient accumulator and a few chunk-sized tensors at once, or, after the chunk loop, that
    accumulator and the hidden-state gradients; the same whatever the vocabulary. (The PyTorch twins of the
    kernels, whose float32 temporaries are chunk-sized, stand in for Triton: the profiler would count the
    interpreter's own copies.)"""
    monkeypatch.setattr(backend, "use_triton", lambda tensor: False)
    batch, seq_len, hidden_size, chunk = 2, 32, 256, 16
    peaks_besides_weight_grad = []
    for vocab in (512, 2048):
        inputs = make_inputs(batch=batch, seq_len=seq_len, rejected_len=seq_len, hidden_size=hidden_size,
                             vocab=vocab, dtype=torch.float32, bias=False)
        inputs["chosen_labels"][:, :prompt_len] = IGNORE
        inputs["rejected_labels"][:, :prompt_len] = IGNORE
        rows = 2 * batch * (seq_len - prompt_len)
        leaves = differentiable(inputs)
        peak, grads = peak_live_bytes(lambda: torch.autograd.grad(fused(inputs, chunk_size=chunk).loss, leaves))
        *hidden_grads, weight_grad = grads
        gathered = accumulator = rows * hidden_size * 4
        in_loop = gathered + accumulator + 5 * rows * chunk * 4
        after_loop = accumulator + sum(g.numel() * g.element_size() for g in hidden_grads)
        besides = peak - weight_grad.numel() * weight_grad.element_size()
        assert besides <= max(in_loop, after_loop) + 4096, (vocab, besides, in_loop, after_loop)
        peaks_besides_weight_grad.append(besides)
    assert peaks_besides_weight_grad[0] == peaks_besides_weight_grad[1]  # nothing scales with V


@pytest.mark.skipif(DEVICE != "cpu", reason="the profiler's memory timeline is read on the CPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_hidden_gradient_scatter_needs_no_full_copy(monkeypatch, dtype):
    """The float32 accumulator becomes the (B, T, H) hidden-state gradient in place: one converting copy when
    no token is ignored, blocks of _SCATTER_ROWS rows otherwise; zeros at the ignored positions."""
    monkeypatch.setattr(scored_rows, "_SCATTER_ROWS", 5)
    batch, seq_len, hidden_size = 3, 16, 64
    for scored in (torch.ones(batch, seq_len, dtype=torch.bool), torch.rand(batch, seq_len) < 0.6):
        index = scored.reshape(-1).nonzero().squeeze(1)
        rows = torch.randn(index.numel(), hidden_size, dtype=torch.float32)
        grad = torch.full((batch, seq_len, hidden_size), float("nan"), dtype=dtype)
        peak, _ = peak_live_bytes(lambda: scored_rows.scatter_rows(grad, index, rows))
        assert peak <= 5 * hidden_size * grad.element_size() + 1024, peak
        expected = torch.zeros(batch * seq_len, hidden_size)
        expected[index] = rows.to(dtype).float()
        assert torch.equal(grad.reshape(-1, hidden_size).float(), expected)


def test_default_chunk_size():
    llama3 = dict(vocab=128256, hidden=4096)
    assert default_chunk_size(16384, element_size=2, **llama3) == 4096  # 128 MiB of bfloat16 logits
    assert default_chunk_size(2048, element_size=2, **llama3) == 32768  # fewer rows: wider, same budget
    assert default_chunk_size(16384, element_size=4, **llama3) == 4096  # never narrower than 4096 ...
    assert default_chunk_size(32768, element_size=2, **llama3) == 4096
    assert default_chunk_size(10**7, element_size=4, **llama3) == 4096
    # ... unless that is over V / 16 (2000 → 7 · 256) or 4 · H / element_size (896 · 2 = 1792 → 1792) ...
    assert default_chunk_size(10**6, 32000, 4096, 2) == 1792
    assert default_chunk_size(10**6, 151936, 896, 2) == 1792
    assert default_chunk_size(10**6, 151936, 896, 8) == 256
    assert default_chunk_size(10**7, 1000, 4096, 2) == 256  # ... and never below 256 ...
    assert default_chunk_size(10, 37, 16, 4) == 37  # ... nor wider than the vocabulary
    assert default_chunk_size(0, 300, 16, 4) == 300


def test_bad_inputs():
    from torch.testing._internal.two_tensor import TwoTensor

    inputs = make_inputs(dtype=torch.float32, seq_len=3, rejected_len=3)

    def call(options=None, **changes):
        return fused(dict(inputs, **changes), **(options or {}))

    weight = inputs["weight"]
    cases = [
        (dict(chosen_hidden=[1.0]), TypeError, "chosen_hidden must be a torch.Tensor"),
        (dict(chosen_hidden=inputs["chosen_hidden"].long()), TypeError,
         "chosen_hidden must be a floating-point tensor \\(float32"),
        (dict(chosen_hidden=inputs["chosen_hidden"].double()), TypeError, "same dtype"),
        (dict(chosen_hidden=inputs["chosen_hidden"][0]), ValueError, r"chosen_hidden must have shape \(B, T, H\)"),
        (dict(rejected_hidden=inputs["rejected_hidden"][..., :5]), ValueError,
         "(hidden size H = 5|same last dimension)"),
        (dict(chosen_hidden=inputs["chosen_hidden"][..., :0]), ValueError, r"non-empty hidden size \(H >= 1\)"),
        (dict(options=dict(ignore_index=2**63)), ValueError, "ignore_index must fit in int64"),
        (dict(rejected_hidden=inputs["rejected_hidden"][:1], rejected_labels=inputs["rejected_labels"][:1]),
         ValueError, "same batch size"),
        (dict(weight=weight[0]), ValueError, r"weight must have shape \(V, H\)"),
        (dict(weight=weight[:0]), ValueError, "non-empty vocabulary"),
        (dict(bias=inputs["bias"][:-1]), ValueError, r"bias must have shape \(V,\)"),
        (dict(bias=inputs["bias"].double()), TypeError, "bias must have the dtype of weight"),
        # a wrapper subclass (TwoTensor, PyTorch's test one; torchao's quantized weights are such): named, not its
        # own "unimplemented operator" error from deep inside
        (dict(weight=TwoTensor(weight, weight)), TypeError, r"weight is a \S*TwoTensor, a tensor subclass"),
        (dict(bias=TwoTensor(inputs["bias"], inputs["bias"])), TypeError, r"bias is a \S*TwoTensor, a tensor"),
        (dict(chosen_labels=inputs["chosen_labels"].float()), TypeError, "chosen_labels must be an int64"),
        (dict(chosen_labels=inputs["chosen_labels"][:, :2]), ValueError, r"chosen_labels must have shape \(B, T\)"),
        (dict(rejected_labels=inputs["rejected_labels"] + 1000), ValueError, r"rejected_labels must be in \[0, 37\)"),
        (dict(ref_chosen_logps=torch.zeros(5, device=DEVICE)), ValueError, "ref_chosen_logps must have shape"),
        (dict(options=dict(chunk_size=0)), ValueError, "chunk_size must be a positive int"),
        (dict(options=dict(chunk_size=2.5)), TypeError, "chunk_size must be a positive int"),
        (dict(options=dict(beta=0.0)), ValueError, "beta must be"),
        (dict(options=dict(reduction="max")), ValueError, "reduction must be"),
        (dict(options=dict(ignore_index=None)), TypeError, "ignore_index must be an int"),
        (dict(options=dict(detach_focal_weight=1)), TypeError, "detach_focal_weight must be (True or False|a bool)"),
        (dict(ref_chosen_logps=torch.zeros(2, device="meta")), ValueError,
         "ref_chosen_logps is on meta but the hidden states are on"),
    ]
    for changes, error, message in cases:
        with pytest.raises(error, match=message):
            call(**changes)
    # a functional collective's pending result is a wrapper subclass too, but a plain tensor once waited for
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    torch.testing.assert_close(call(weight=AsyncCollectiveTensor(weight.clone())), call(), rtol=0, atol=0)

    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_sequence_logps(inputs["chosen_hidden"], weight, inputs["chosen_labels"].clamp(min=0) - 1)
    with pytest.raises(TypeError, match="chunk_size"):
        fused_linear_sequence_logps(inputs["chosen_hidden"], weight, inputs["chosen_labels"], chunk_size=True)
    assert checks.check_chunk_size(None) is None
    np = pytest.importorskip("numpy")
    assert type(checks.check_chunk_size(np.int64(8))) is int  # a NumPy integer is an integer
