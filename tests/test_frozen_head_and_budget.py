"""The hidden-state path's GEMM-saving modes against the float64 reference and against the default path:
a frozen lm_head (2 GEMMs: d logp / d hidden accumulated in the forward walk with online rescaling) and
memory_budget (chunks of logits kept from the forward instead of recomputed)."""

import pytest
import torch
from conftest import DEVICE
from helpers import poison_empty

import focal_kernels as fk
from focal_kernels import backend
from focal_kernels.logprobs import vocab_chunks

TRANSFORMS = [{}, dict(logit_softcap=2.5, logit_scale=1.3, temperature=0.7)]
# Values and hidden-state gradients against float64: (atol for log-probs, atol relative to the largest gradient).
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.float16: (5e-3, 5e-3),
       torch.bfloat16: (6e-2, 3e-2)}


def _inputs(dtype, *, batch=2, seq_len=6, hidden=8, vocab=53, scale=1.0, bias=False):
    hidden_states = (torch.randn(batch, seq_len, hidden, dtype=torch.float64) * scale).to(DEVICE, dtype)
    weight = torch.randn(vocab, hidden, dtype=torch.float64).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, (batch, seq_len), device=DEVICE)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    b = torch.randn(vocab, dtype=torch.float64).to(DEVICE, dtype) if bias else None
    return hidden_states.requires_grad_(True), weight, labels, b


def _reference(hidden, weight, labels, bias, upstream, **transform):
    h64 = hidden.detach().double().requires_grad_(True)
    logits = fk.reference.linear_logits(h64, weight.double(), None if bias is None else bias.double(), **transform)
    logps = fk.reference.sequence_logps(logits, labels)
    (grad,) = torch.autograd.grad((logps * upstream).sum(), [h64])
    return logps, grad


def _logit_rounding(logits64, labels, dtype, cu_seqlens=None):
    """How far a half-precision lm_head GEMM's rounding of its logits (half an ulp each) may move a sequence's
    log-prob: the label's logit and the log-sum-exp (by at most the largest logit's change) per scored token.
    The kernels agree with float64 on the rounded logits to ~1e-6; this is what the dtype itself allows."""
    if dtype not in (torch.float16, torch.bfloat16):
        return 0.0
    scored = labels != -100
    label_logits = logits64.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).abs()
    per_token = torch.finfo(dtype).eps / 2 * (label_logits + logits64.abs().amax(-1)) * scored
    return fk.reference.segment_sums(per_token, cu_seqlens).max().item()


def _close(actual, expected, atol, what):
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=0, atol=atol,
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_matches_reference(dtype, transform, bias):
    hidden, weight, labels, b = _inputs(dtype, bias=bias)
    assert not weight.requires_grad
    upstream = torch.rand(hidden.shape[0], dtype=torch.float64, device=DEVICE)
    logps = fk.fused_linear_sequence_logps(hidden, weight, labels, b, chunk_size=16, **transform)
    (grad,) = torch.autograd.grad((logps.double() * upstream).sum(), [hidden])
    expected, expected_grad = _reference(hidden, weight, labels, b, upstream, **transform)
    value_tol, grad_tol = TOL[dtype]
    # plus the half-precision GEMM's rounding of the raw logits, through the transform's slope (at most
    # logit_scale / temperature): a fixed 5e-3 failed in float16 on other inputs (FK_TEST_SEED=c)
    raw = fk.reference.linear_logits(hidden.detach().double(), weight.double(), None if b is None else b.double())
    slope = transform.get("logit_scale", 1.0) / transform.get("temperature", 1.0)
    _close(logps, expected, value_tol + slope * _logit_rounding(raw, labels, dtype), "log-probs")
    assert grad.dtype == dtype
    _close(grad, expected_grad, grad_tol * expected_grad.abs().max().item(), "hidden gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_frozen_head_equals_trainable_path(dtype):
    """Same log-probs bit for bit (same forward), and the hidden gradient of the one-pass accumulation equals
    the two-pass backward's up to rounding."""
    hidden, weight, labels, _ = _inputs(dtype, vocab=97)
    frozen = fk.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=32)
    (grad_frozen,) = torch.autograd.grad(frozen.sum(), [hidden])
    trainable_weight = weight.clone().requires_grad_(True)
    two_pass = fk.fused_linear_sequence_logps(hidden, trainable_weight, labels, chunk_size=32)
    (grad_two_pass,) = torch.autograd.grad(two_pass.sum(), [hidden])
    assert torch.equal(frozen, two_pass)
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    _close(grad_frozen, grad_two_pass, tol * grad_two_pass.abs().max().item(), "frozen vs two-pass")


def test_frozen_head_at_large_logits():
    """Logits of ±3e4: the online rescaling and the label's own term (1 − p_y from the float32 state) stay exact."""
    hidden, weight, labels, _ = _inputs(torch.float32, scale=3e3)
    upstream = torch.rand(hidden.shape[0], dtype=torch.float64, device=DEVICE)
    logps = fk.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=16)
    (grad,) = torch.autograd.grad((logps.double() * upstream).sum(), [hidden])
    expected, expected_grad = _reference(hidden, weight, labels, None, upstream)
    assert torch.isfinite(grad).all()
    _close(logps, expected, 1e-6 * expected.abs().max().item() + 1e-3, "log-probs")
    _close(grad, expected_grad, 1e-5 * expected_grad.abs().max().item(), "hidden gradient")


def test_frozen_head_saves_gemms(monkeypatch):
    """2 GEMMs per chunk with grad (forward logits + accumulation), 1 under no_grad, none in the backward."""
    hidden, weight, labels, _ = _inputs(torch.float32, vocab=64)
    calls = []
    original_chunk_logits, original_accumulate = vocab_chunks._chunk_logits, vocab_chunks.accumulate_product
    monkeypatch.setattr(vocab_chunks, "_chunk_logits", lambda *a, **k: calls.append("logits") or
                        original_chunk_logits(*a, **k))
    monkeypatch.setattr(vocab_chunks, "accumulate_product", lambda *a: calls.append("acc") or original_accumulate(*a))
    logps = fk.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=16)
    assert calls == ["logits", "acc"] * 4
    calls.clear()
    torch.autograd.grad(logps.sum(), [hidden])
    assert calls == []
    with torch.no_grad():
        fk.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=16)
    assert calls == ["logits"] * 4


@pytest.mark.parametrize("budget_chunks", [0, 2, 100])
def test_memory_budget_keeps_chunks_and_matches(monkeypatch, budget_chunks):
    """Kept chunks are not recomputed in the backward; values and every gradient equal the default path's."""
    dtype = torch.float32
    hidden, weight, labels, bias = _inputs(dtype, vocab=64, bias=True)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    rows = int((labels != -100).sum())
    budget = budget_chunks * rows * 16 * weight.element_size()
    expected = fk.fused_linear_sequence_logps(hidden, weight, labels, bias, chunk_size=16)
    expected_grads = torch.autograd.grad(expected.sum(), [hidden, weight, bias])
    calls = []
    original = vocab_chunks._chunk_logits
    monkeypatch.setattr(vocab_chunks, "_chunk_logits", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    logps = fk.fused_linear_sequence_logps(hidden, weight, labels, bias, chunk_size=16, memory_budget=budget)
    calls.clear()
    grads = torch.autograd.grad(logps.sum(), [hidden, weight, bias], retain_graph=True)
    assert len(calls) == 4 - min(budget_chunks, 4), calls
    assert torch.equal(logps, expected)
    for got, want, name in zip(grads, expected_grads, ("hidden", "weight", "bias")):
        assert torch.equal(got, want), name
    again = torch.autograd.grad(logps.sum(), [hidden, weight, bias])  # the kept chunks survived the first backward
    for got, want in zip(again, expected_grads):
        assert torch.equal(got, want)


def test_memory_budget_counts_a_chunk_wider_than_the_vocabulary(monkeypatch):
    """chunk_size > V is one chunk of V columns: a budget of rows × V logits keeps it (none is recomputed)."""
    hidden, weight, labels, _ = _inputs(torch.float32, vocab=53)
    weight.requires_grad_(True)
    budget = int((labels != -100).sum()) * 53 * weight.element_size()
    expected = fk.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=53)
    expected_grads = torch.autograd.grad(expected.sum(), [hidden, weight])
    calls = []
    original = vocab_chunks._chunk_logits
    monkeypatch.setattr(vocab_chunks, "_chunk_logits", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    logps = fk.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=1000, memory_budget=budget)
    assert calls == [0]
    grads = torch.autograd.grad(logps.sum(), [hidden, weight])
    assert calls == [0], "the backward recomputed the kept chunk"
    assert torch.equal(logps, expected)
    for got, want in zip(grads, expected_grads):
        assert torch.equal(got, want)


LAYOUTS = ("packed", "shifted view", "one token")


def _layout(layout, dtype, vocab=53, hidden=8):
    """(hidden leaf, the tensor passed, labels, cu_seqlens): packed rows with an empty and an all-ignored
    sequence; a causal view [:, :-1] (not contiguous); sequences of one token."""
    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(DEVICE, dtype).requires_grad_(True)

    if layout == "packed":
        cu_seqlens = torch.tensor([0, 4, 4, 7, 12], device=DEVICE)  # the second sequence is empty
        labels = torch.randint(0, vocab, (12,), device=DEVICE)
        labels[4:7] = -100  # the third: every token ignored
        labels[0] = -100
        states = leaf(12, hidden)
        return states, states, labels, cu_seqlens
    seq_len = 5 if layout == "shifted view" else 1
    full = leaf(3, seq_len + 1, hidden)
    labels = torch.randint(0, vocab, (3, seq_len), device=DEVICE)
    labels[1] = -100
    return full, full[:, :-1] if layout == "shifted view" else full[:, :1], labels, None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["frozen", "memory_budget"])
def test_gemm_saving_modes_at_odd_layouts(monkeypatch, mode, layout, dtype):
    """Both modes against float64 at the layouts their first tests left out (packed with empty and all-ignored
    sequences, a non-contiguous view, T = 1), every dtype, with fresh memory poisoned: values, the hidden
    gradient, and for memory_budget (trainable weight and bias) the weight and bias gradients too."""
    poison_empty(monkeypatch)
    vocab = 53
    leaf, states, labels, cu_seqlens = _layout(layout, dtype, vocab)
    weight = torch.randn(vocab, states.shape[-1], dtype=torch.float64).to(DEVICE, dtype)
    bias = torch.randn(vocab, dtype=torch.float64).to(DEVICE, dtype)
    leaves = [leaf]
    options = dict(chunk_size=16, cu_seqlens=cu_seqlens)
    if mode == "memory_budget":
        weight.requires_grad_(True)
        bias.requires_grad_(True)
        leaves += [weight, bias]
        options["memory_budget"] = 2 * int((labels != -100).sum()) * 16 * weight.element_size()  # 2 of 4 chunks
    logps = fk.fused_linear_sequence_logps(states, weight, labels, bias, **options)
    upstream = torch.rand(logps.shape[0], dtype=torch.float64, device=DEVICE) + 0.5
    grads = torch.autograd.grad((logps.double() * upstream).sum(), leaves)

    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    w64, b64 = (leaves64[1], leaves64[2]) if mode == "memory_budget" else (weight.double(), bias.double())
    states64 = leaves64[0] if layout == "packed" else leaves64[0][:, :states.shape[1]]
    logits64 = fk.reference.linear_logits(states64, w64, b64)
    expected = fk.reference.sequence_logps(logits64, labels, -100, cu_seqlens)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), leaves64)
    value_tol, grad_tol = TOL[dtype]
    _close(logps, expected, value_tol + _logit_rounding(logits64.detach(), labels, dtype, cu_seqlens), "log-probs")
    if layout == "packed":
        assert logps[1] == 0 and logps[2] == 0  # the empty and the all-ignored sequence
    for got, want, name in zip(grads, expected_grads, ("hidden", "weight", "bias")):
        assert got.dtype == dtype, name
        _close(got, want, grad_tol * want.abs().max().item(), f"{name} gradient")


def test_memory_budget_validated():
    hidden, weight, labels, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="memory_budget"):
        fk.fused_linear_sequence_logps(hidden, weight, labels, memory_budget=-1)


def test_frozen_head_on_plain_torch_path(monkeypatch):
    monkeypatch.setattr(backend, "use_triton", lambda tensor: False)
    test_frozen_head_matches_reference(torch.float32, TRANSFORMS[1], True)
