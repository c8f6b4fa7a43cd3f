"""The hidden-state path's logit transform (scale, soft-cap, temperature), its per-token statistics, and the
options read from Hugging Face configs, against the float64 reference on materialized logits."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICE
from helpers import assert_close

import focal_kernels as fk

IGNORE = -100
VOCAB = 37
HIDDEN = 12

TRANSFORMS = {
    "softcap": dict(logit_softcap=2.5),
    "scale": dict(logit_scale=0.37),
    "temperature": dict(temperature=0.7),
    "all": dict(logit_softcap=4.0, logit_scale=1.9, temperature=1.3),
}
# (value tolerance, gradient tolerance relative to the largest reference gradient entry)
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (3e-5, 3e-5), torch.bfloat16: (1e-1, 5e-2)}




def inputs(batch, seq_len, dtype, vocab=VOCAB, hidden=HIDDEN, scale=3.0):
    h = torch.randn(batch, seq_len, hidden, dtype=torch.float64).to(DEVICE, dtype)
    w = (torch.randn(vocab, hidden, dtype=torch.float64) * scale * hidden ** -0.5).to(DEVICE, dtype)
    b = (torch.randn(vocab, dtype=torch.float64) * 0.5).to(DEVICE, dtype)
    labels = torch.randint(0, vocab, (batch, seq_len), device=DEVICE)
    labels[torch.rand(batch, seq_len, device=DEVICE) < 0.3] = IGNORE
    labels[0, 0] = IGNORE
    labels[-1, -1] = 3
    return h, w, b, labels


def grads_of(fn, tensors, upstream):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*leaves)
    return out, torch.autograd.grad((out * upstream.to(out.dtype)).sum(), leaves)


def reference_sequence(h, w, b, labels, transform, cu_seqlens=None):
    logits = fk.reference.linear_logits(h, w, b, **transform)
    return fk.reference.sequence_logps(logits, labels, IGNORE, cu_seqlens)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_sequence_logps_with_transform_match_reference(path, name, dtype):
    transform = TRANSFORMS[name]
    h, w, b, labels = inputs(3, 5, dtype)
    upstream = torch.rand(3, dtype=torch.float64, device=DEVICE) + 0.5
    got, got_grads = grads_of(lambda *t: fk.fused_linear_sequence_logps(t[0], t[1], labels, t[2], chunk_size=8,
                                                                        **transform), (h, w, b), upstream)
    expected, expected_grads = grads_of(lambda *t: reference_sequence(*t[:3], labels, transform),
                                        (h.double(), w.double(), b.double()), upstream)
    identity, _ = grads_of(lambda *t: reference_sequence(*t[:3], labels, {}), (h.double(), w.double(), b.double()),
                           upstream)
    assert (identity - expected).abs().max() > 1e-2, "the transform must matter for this test to mean anything"
    value_tol, grad_tol = TOL[dtype]
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(got, expected, (value_tol, value_tol), f"{name} logps")
    for what, g, e in zip(("hidden", "weight", "bias"), got_grads, expected_grads):
        assert g.dtype == dtype
        assert_close(g, e, (grad_tol, grad_tol * e.abs().max().item()), f"{name} grad {what}")

    # Packed, the same tokens: equal to the padded result.
    cu = torch.arange(4, device=DEVICE) * 5
    packed = fk.fused_linear_sequence_logps(h.reshape(15, HIDDEN), w, labels.reshape(15), b, cu_seqlens=cu,
                                            chunk_size=8, **transform)
    assert_close(packed, got, (value_tol, value_tol), f"{name} packed")


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_token_logps_with_transform_match_reference(path, name):
    transform = TRANSFORMS[name]
    h, w, b, labels = inputs(2, 4, torch.float64)
    upstream = torch.rand(2, 4, dtype=torch.float64, device=DEVICE)
    got, got_grads = grads_of(
        lambda *t: fk.fused_linear_token_logps(t[0], t[1], labels, t[2], chunk_size=16, **transform).log_probs,
        (h, w, b), upstream)
    expected, expected_grads = grads_of(
        lambda *t: fk.reference.token_logps(fk.reference.linear_logits(*t, **transform), labels, IGNORE),
        (h, w, b), upstream)
    assert got.shape == labels.shape
    assert (got[labels == IGNORE] == 0).all()
    assert_close(got, expected, (1e-10, 1e-10), "token log-probs")
    for g, e in zip(got_grads, expected_grads):
        assert_close(g, e, (1e-10, 1e-10), "token grads")


@pytest.mark.parametrize("logit_size", [1e-2, 10.0], ids=["far_below_cap", "around_tanh_switch"])
def test_softcap_keeps_float32_precision(path, logit_size):
    """Soft-capped logits far below the cap keep float32's relative precision (before: tanh as 2·σ(2u) − 1
    lost it, a mean logit of 1e-2 off by 2.5e-4 relative at cap 30), and logits spread over u = z / cap
    around the kernels' switch between their two tanh forms (|u| = 1/4) agree with the reference too."""
    cap = 30.0
    h, w, b, labels = inputs(2, 6, torch.float64, vocab=53, hidden=16, scale=1.0)
    h = h * logit_size
    upstream = torch.rand(2, 6, dtype=torch.float64, device=DEVICE) + 0.5
    leaf = h.float().requires_grad_(True)
    out = fk.fused_linear_token_logps(leaf, w.float(), labels, b.float(), chunk_size=16, logit_softcap=cap,
                                      stats=("mean_logits", "entropy"))
    (out.log_probs.double() * upstream).sum().backward()
    expected, (expected_grad,) = grads_of(
        lambda x: fk.reference.token_logps(fk.reference.linear_logits(x, w, b, logit_softcap=cap), labels, IGNORE),
        (h,), upstream)
    logits = fk.reference.linear_logits(h, w, b, logit_softcap=cap)
    stats = fk.reference.token_stats(logits, labels, IGNORE)
    scored = labels != IGNORE
    # a mean of signed logits: its error measured against their mean size
    size = logits.abs().mean(-1)[scored]
    assert ((out.mean_logits[scored] - stats["mean_logits"][scored]).abs() <= 1e-6 * size).all(), "mean logits"
    noise = 1e-7 * logits.abs().max().item()  # float32 raw logits (GEMM) carry this much already
    # Around the switch, tanh's exp and division add their rounding; with a GPU's coarser ones
    # (tests/gpu_math.py at 1x) the worst of 20 input draws (FK_TEST_SEED) was 2.4e-6 (gradient) and 3.9e-6
    # (entropy), against 2e-6 allowed before.
    rel = 2e-6 if logit_size < 1 else 8e-6
    assert_close(out.entropy, stats["entropy"], (rel, noise), "entropy")
    assert_close(out.log_probs, expected, (rel, noise), "log-probs")
    assert_close(leaf.grad, expected_grad, (0, rel * expected_grad.abs().max().item()), "hidden gradient")


STAT_NAMES = ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs")


def check_stats(out, expected, stats, what):
    for stat in stats:
        got, want = getattr(out, stat), expected[stat]
        assert got is not None and got.shape == want.shape, f"{what} {stat}"
        if stat == "is_top1":
            assert got.dtype == torch.bool, f"{what} is_top1 dtype {got.dtype}"
            assert torch.equal(got, want), f"{what} is_top1 {got.tolist()} != {want.tolist()}"
        else:
            assert not got.requires_grad
            assert_close(got, want, (1e-10, 1e-10), f"{what} {stat}")
    for stat in set(STAT_NAMES) - set(stats):
        assert getattr(out, stat) is None, f"{stat} was not requested"


@pytest.mark.parametrize("name", ["identity", "all"])
@pytest.mark.parametrize("chunk_size", [8, 64], ids=["several-chunks", "one-chunk"])
def test_stats_match_reference(path, name, chunk_size):
    transform = TRANSFORMS.get(name, {})
    h, w, b, labels = inputs(2, 6, torch.float64, scale=6.0)
    # Make the label the argmax at some scored tokens, so that is_top1 is True somewhere.
    raw = fk.reference.linear_logits(h, w, b, **transform)
    labels[1, :3] = raw[1, :3].argmax(-1)
    expected = fk.reference.token_stats(raw, labels, IGNORE)
    assert expected["is_top1"].any() and not expected["is_top1"].all()
    out = fk.fused_linear_token_logps(h, w, labels, b, chunk_size=chunk_size, stats=STAT_NAMES, **transform)
    check_stats(out, expected, STAT_NAMES, f"{name}/{chunk_size}")
    assert_close(out.log_probs, fk.reference.token_logps(raw, labels, IGNORE), (1e-10, 1e-10), "log_probs")
    # A subset, in another order, and packed (N, H) input.
    subset = ("log_sum_sq_probs", "is_top1")
    packed = fk.fused_linear_token_logps(h.reshape(12, HIDDEN), w, labels.reshape(12), b, chunk_size=chunk_size,
                                         stats=subset, **transform)
    assert packed.log_probs.shape == (12,)
    check_stats(packed, {k: v.reshape(12) for k, v in expected.items()}, subset, "packed subset")


# (statistics, and every token's log-prob, of low-precision inputs: absolute, against float64 of the same inputs)
STATS_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("layout", ["shifted view", "one token"])
@pytest.mark.parametrize("memory_budget", [None, 2**20])
def test_token_logps_and_stats_every_dtype(dtype, layout, memory_budget):
    """fused_linear_token_logps with every statistic, against float64, in every dtype: per-token log-probs and
    their gradients for hidden, weight and bias (those were compared in float64 only), the statistics on a
    non-contiguous causal view or one-token sequences with an all-ignored row, beside memory_budget."""
    seq_len = 5 if layout == "shifted view" else 1
    h, w, b, labels = inputs(3, seq_len + 1, torch.float64, vocab=41, hidden=16)
    labels = labels[:, :seq_len].clone()
    labels[1] = IGNORE
    h_leaf, w_leaf, b_leaf = (t.to(dtype).requires_grad_(True) for t in (h, w, b))
    out = fk.fused_linear_token_logps(h_leaf[:, :seq_len], w_leaf, labels, b_leaf, chunk_size=16, stats=STAT_NAMES,
                                      memory_budget=memory_budget)
    upstream = torch.rand(labels.shape, dtype=torch.float64, device=DEVICE) + 0.5
    grads = torch.autograd.grad((out.log_probs.double() * upstream).sum(), [h_leaf, w_leaf, b_leaf])
    leaves64 = [t.detach().double().requires_grad_(True) for t in (h_leaf, w_leaf, b_leaf)]
    logits = fk.reference.linear_logits(leaves64[0][:, :seq_len], leaves64[1], leaves64[2])
    expected = fk.reference.token_logps(logits, labels, IGNORE)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), leaves64)
    tol = STATS_TOL[dtype]
    assert_close(out.log_probs, expected, (tol, tol), "log-probs")
    for got, want, name in zip(grads, expected_grads, ("hidden", "weight", "bias")):
        assert got.dtype == dtype
        assert_close(got, want, (0, tol * want.abs().max().item()), f"{name} gradient")
    stats = fk.reference.token_stats(logits.detach(), labels, IGNORE)
    for stat in ("entropy", "mean_logits", "log_sum_sq_probs"):
        assert getattr(out, stat).dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_close(getattr(out, stat), stats[stat], (tol, tol), stat)
    assert not out.is_top1[1].any() and not out.entropy[1].any()  # the all-ignored row: False / 0
    if dtype == torch.float64:  # (lower precisions may order near-ties otherwise)
        assert torch.equal(out.is_top1, stats["is_top1"])


@pytest.mark.parametrize("chunk_size", [8, 64])
def test_stats_with_a_masked_vocabulary(path, chunk_size):
    """−inf logits (a vocabulary masked by a −inf bias): the entropy counts 0 log 0 as 0 and equals the entropy
    over the unmasked columns (it was NaN: 0 · (−inf)); the log-probs, their gradient and the other statistics
    are those of the unmasked vocabulary too."""
    h, w, b, labels = inputs(2, 5, torch.float64, vocab=37, hidden=16)
    masked = torch.arange(37, device=DEVICE) % 3 == 1  # (a masked label id + 1 is not masked, and < 37)
    b = b.masked_fill(masked, -math.inf)
    labels = torch.where(masked[labels.clamp(min=0)] & (labels >= 0), labels + 1, labels)  # no masked labels
    out = fk.fused_linear_token_logps(h, w, labels, b, chunk_size=chunk_size, stats=("entropy", "log_sum_sq_probs"))
    kept = ~masked
    remapped = torch.where(labels >= 0, torch.cumsum(kept, 0)[labels.clamp(min=0)] - 1, labels)
    expected = fk.reference.token_stats(fk.reference.linear_logits(h, w[kept], b[kept]), remapped, IGNORE)
    assert torch.isfinite(out.entropy).all()
    for stat in ("entropy", "log_sum_sq_probs"):
        assert_close(getattr(out, stat), expected[stat], (1e-10, 1e-10), stat)
    # the spec itself gives the same on the masked vocabulary
    spec = fk.reference.token_stats(fk.reference.linear_logits(h, w, b), labels, IGNORE)
    assert_close(spec["entropy"], expected["entropy"], (1e-12, 1e-12), "reference entropy")
    # ... while a NaN logit still gives NaN (NaN in, NaN out), in the kernels and the spec
    h_nan = h.clone()
    h_nan[0, 1] = math.nan
    labels[0, 1] = 2  # scored (an unmasked id)
    nan_entropy = fk.fused_linear_token_logps(h_nan, w, labels, b, chunk_size=chunk_size, stats=("entropy",)).entropy
    assert nan_entropy[0, 1].isnan() and torch.isfinite(nan_entropy[1]).all()
    spec_nan = fk.reference.token_stats(fk.reference.linear_logits(h_nan, w, b), labels, IGNORE)["entropy"]
    assert spec_nan[0, 1].isnan()


@pytest.mark.parametrize("chunk_size", [4, 8, 64], ids=["tie-across-chunks", "tie-across-chunks-8", "one-chunk"])
def test_is_top1_takes_the_first_argmax_on_ties(path, chunk_size):
    """Rows 5 and 9 of the vocabulary give the same, largest logit at every token: a label of 5 is top-1,
    a label of 9 is not (the first argmax wins), whichever chunks they fall in."""
    h = torch.randn(1, 6, HIDDEN, dtype=torch.float64, device=DEVICE) * 0.1
    h[..., 0] = 1.0
    w = torch.randn(VOCAB, HIDDEN, dtype=torch.float64, device=DEVICE) * 0.1
    w[5] = 0.0
    w[9] = 0.0
    w[5, 0] = w[9, 0] = 10.0
    labels = torch.tensor([[5, 9, 5, 9, 0, IGNORE]], device=DEVICE)
    for transform in ({}, TRANSFORMS["all"]):
        raw = fk.reference.linear_logits(h, w, None, **transform)
        assert (raw[..., 5] == raw[..., 9]).all() and (raw.argmax(-1) == 5).all()
        out = fk.fused_linear_token_logps(h, w, labels, chunk_size=chunk_size, stats=("is_top1", "entropy"),
                                          **transform)
        assert out.is_top1.tolist() == [[True, False, True, False, False, False]]
        check_stats(out, fk.reference.token_stats(raw, labels, IGNORE), ("is_top1", "entropy"), "ties")


@pytest.mark.parametrize("poison", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "all-minus-inf"])
def test_is_top1_is_false_where_the_log_softmax_is_undefined(path, poison):
    """A NaN or +inf logit in column 5 (a bias of that value), or every logit −inf: the log-probs are NaN and
    is_top1 is False for labels before, at and after that column, the largest logit's label included
    (torch.argmax would name the first NaN or +inf, or column 0, but the GPU's max may drop a NaN: the kernel
    cannot tell which comes first). The same weights with a finite bias keep their top-1 labels, and so do
    infinite ones under a soft cap, which makes them finite (±cap)."""
    h = torch.randn(1, 6, HIDDEN, dtype=torch.float64, device=DEVICE) * 0.1
    h[..., 0] = 1.0
    w = torch.randn(VOCAB, HIDDEN, dtype=torch.float64, device=DEVICE) * 0.1
    w[[0, 5, 9]] = 0.0
    w[0, 0] = w[9, 0] = 10.0  # columns 0 and 9 tie at the top of the finite row: 0 is its first argmax
    labels = torch.tensor([[0, 4, 5, 9, VOCAB - 1, IGNORE]], device=DEVICE)
    finite = torch.zeros(VOCAB, dtype=torch.float64, device=DEVICE)
    poisoned = finite.clone()
    if poison == -math.inf:
        poisoned[:] = -math.inf
    else:
        poisoned[5] = poison
    for transform in ({}, TRANSFORMS["all"]):
        undefined = math.isnan(poison) or not transform
        for b in (finite, poisoned):
            out = fk.fused_linear_token_logps(h, w, labels, b, chunk_size=4, stats=("is_top1",), **transform)
            expected = fk.reference.token_stats(fk.reference.linear_logits(h, w, b, **transform), labels, IGNORE)
            assert torch.equal(out.is_top1, expected["is_top1"]), (poison, transform, out.is_top1)
            if b is finite:
                assert out.is_top1.tolist() == [[True, False, False, False, False, False]]
            elif undefined:
                assert not out.is_top1.any() and out.log_probs[0, :5].isnan().all(), (poison, transform)
            else:  # soft-capped: +inf is the top logit (column 5), −inf everywhere a tie (column 0 first)
                assert out.is_top1.tolist() == [[poison < 0, False, poison > 0, False, False, False]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("chunk_size", [40, 48, 13], ids=["full-and-tail", "full-only", "tail-only"])
def test_fold_full_blocks_and_tail_with_stats(monkeypatch, dtype, chunk_size):
    """The forward fold (kernels/chunk_lse_update.py) with blocks of 16 columns (8 in float64): chunks of two
    unmasked full blocks and a masked tail (40 of V = 101), full blocks only (48), a tail only (13), each
    vocabulary's last chunk shorter. Exact ties for is_top1 on either side of a block edge (15, 16) and of a
    chunk or block edge (39, 40), labels on those edges; without and with a −inf column (the mean logit then
    −inf); every statistic, the log-probs and the hidden states' gradient against float64."""
    from focal_kernels.kernels import config

    monkeypatch.setattr(config, "_FORWARD_BLOCK_BYTES", 16 * 4)
    monkeypatch.setattr(config, "_HALF_FORWARD_BLOCK_BYTES", 16 * 2)
    vocab, hidden = 101, 8
    h = torch.randn(1, 8, hidden, dtype=torch.float64, device=DEVICE) * 0.1
    h[0, :4, 0] = 1.0  # tokens 0-3: columns 15 and 16 tie at the top
    h[0, 4:, 1] = 1.0  # tokens 4-7: columns 39 and 40
    w = torch.randn(vocab, hidden, dtype=torch.float64, device=DEVICE) * 0.1
    w[[15, 16, 39, 40]] = 0.0
    w[15, 0] = w[16, 0] = w[39, 1] = w[40, 1] = 10.0  # exact products: ties in every dtype
    labels = torch.tensor([[15, 16, 0, IGNORE, 39, 40, 47, vocab - 1]], device=DEVICE)
    h, w = h.to(dtype), w.to(dtype)
    tol = STATS_TOL[dtype]
    for masked in (False, True):
        b = torch.randn(vocab, dtype=torch.float64, device=DEVICE) * 0.1
        b[16], b[40] = b[15], b[39]  # (the ties kept)
        if masked:
            b[70] = -math.inf
        b = b.to(dtype)
        leaf = h.clone().requires_grad_(True)
        out = fk.fused_linear_token_logps(leaf, w, labels, b, chunk_size=chunk_size, stats=STAT_NAMES)
        (grad,) = torch.autograd.grad(out.log_probs.sum(), [leaf])
        dense = h.double().requires_grad_(True)
        raw = fk.reference.linear_logits(dense, w.double(), b.double())
        expected = fk.reference.token_stats(raw.detach(), labels, IGNORE)
        assert out.is_top1.tolist() == [[True, False, False, False, True, False, False, False]], masked
        assert torch.equal(out.is_top1, expected["is_top1"])
        assert torch.isfinite(out.mean_logits).all() != masked
        for stat in ("entropy", "log_sum_sq_probs", "mean_logits"):
            assert_close(getattr(out, stat), expected[stat], (tol, tol), f"{stat} (masked: {masked})")
        logps = fk.reference.token_logps(raw, labels, IGNORE)
        (expected_grad,) = torch.autograd.grad(logps.sum(), [dense])
        assert_close(out.log_probs, logps.detach(), (tol, tol), f"log-probs (masked: {masked})")
        assert_close(grad, expected_grad, (tol, tol), f"hidden gradient (masked: {masked})")


def test_is_top1_is_false_for_a_label_outside_the_vocabulary(path):
    """validate_labels=False: a label outside [0, V) has a NaN log-prob and is nobody's argmax, even where every
    logit is below the 0 its missing logit would read as."""
    h = torch.randn(1, 4, HIDDEN, dtype=torch.float64, device=DEVICE)
    w = torch.randn(VOCAB, HIDDEN, dtype=torch.float64, device=DEVICE) * 0.01
    b = torch.full((VOCAB,), -50.0, dtype=torch.float64, device=DEVICE)  # every logit negative
    labels = torch.tensor([[VOCAB, -3, 2, VOCAB + 7]], device=DEVICE)
    out = fk.fused_linear_token_logps(h, w, labels, b, stats=("is_top1",), validate_labels=False)
    assert out.is_top1.tolist() == [[False, False, out.is_top1[0, 2].item(), False]]
    assert out.log_probs[0, [0, 1, 3]].isnan().all() and torch.isfinite(out.log_probs[0, 2])


def test_stats_in_float32_and_bfloat16(path):
    h, w, b, labels = inputs(2, 5, torch.float32)
    transform = TRANSFORMS["all"]
    expected = fk.reference.token_stats(fk.reference.linear_logits(h.double(), w.double(), b.double(), **transform),
                                        labels, IGNORE)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        out = fk.fused_linear_token_logps(h.to(dtype), w.to(dtype), labels, b.to(dtype), chunk_size=8,
                                          stats=("entropy", "mean_logits", "log_sum_sq_probs"), **transform)
        for stat in ("entropy", "mean_logits", "log_sum_sq_probs"):
            got = getattr(out, stat)
            assert got.dtype == torch.float32
            assert_close(got, expected[stat], (tol, tol), f"{dtype} {stat}")


@pytest.mark.parametrize("options, match", [
    (dict(logit_softcap=0.0), "logit_softcap"),
    (dict(logit_softcap=-1.0), "logit_softcap"),
    (dict(logit_softcap=math.inf), "logit_softcap"),
    (dict(logit_softcap=math.nan), "logit_softcap"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(logit_scale=math.nan), "logit_scale"),
    (dict(logit_scale=0.0), "logit_scale"),
    (dict(logit_scale=math.inf), "logit_scale"),
])
def test_bad_transform_options_raise(options, match):
    h, w, b, labels = inputs(1, 3, torch.float32)
    with pytest.raises(ValueError, match=match):
        fk.fused_linear_sequence_logps(h, w, labels, b, **options)
    with pytest.raises(ValueError, match=match):
        fk.fused_linear_token_logps(h, w, labels, b, **options)


@pytest.mark.parametrize("options, match", [
    (dict(logit_scale=1e39), "logit_scale"),
    (dict(logit_scale=1e-50), "logit_scale"),  # finite and non-zero, but 0 in float32
    (dict(logit_softcap=1e300), "logit_softcap"),
    (dict(temperature=1e-300), "temperature"),
    # each in range, but not the products the kernels form once (a raw logit of 0 became 0 · inf = NaN)
    (dict(logit_scale=1e20, logit_softcap=1e-20), "logit_scale / logit_softcap"),
    (dict(logit_scale=1e30, temperature=1e-10), "logit_scale / temperature"),
    (dict(logit_softcap=1e30, temperature=1e-10), "logit_softcap / temperature"),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_transform_options_beyond_the_compute_dtype_raise(options, match, dtype):
    """The transform of float32 / bfloat16 / float16 weights is computed in float32: an option it cannot hold
    raised PyTorch's overflow error naming no argument, or silently became 0 (a scale of 1e-50); so did a
    product of two options that the kernels form once."""
    h, w, b, labels = inputs(1, 3, dtype)
    with pytest.raises(ValueError, match=match):
        fk.fused_linear_sequence_logps(h, w, labels, b, **options)
    with pytest.raises(ValueError, match=match):
        fk.fused_linear_token_logps(h, w, labels, b, **options)
    fk.fused_linear_sequence_logps(h.double(), w.double(), labels, b.double(), **options)  # float64 holds it


def test_bad_stats_raise():
    h, w, b, labels = inputs(1, 3, torch.float32)
    for stats in (("bogus",), ("entropy", "entropy"), ("entropy", "log_probs")):
        with pytest.raises(ValueError, match="stats"):
            fk.fused_linear_token_logps(h, w, labels, b, stats=stats)
    for stats in (None, 3, iter(("entropy",))):
        with pytest.raises(TypeError, match="stats must be a tuple, list or set"):
            fk.fused_linear_token_logps(h, w, labels, b, stats=stats)
    assert fk.fused_linear_token_logps(h, w, labels, b, stats={"entropy", "is_top1"}).is_top1 is not None


def test_zero3_placeholder_weight_is_refused():
    h, w, _, labels = inputs(1, 3, torch.float32)
    with pytest.raises(ValueError, match="ZeRO-3"):
        fk.fused_linear_sequence_logps(h, torch.empty(0), labels)
    with pytest.raises(ValueError, match="ZeRO-3"):
        fk.fused_linear_token_logps(h, torch.empty(0), labels)
    # gathered for the forward only: ZeRO-3 puts the placeholder back into the same parameter before the backward
    weight = torch.nn.Parameter(w)
    logps = fk.fused_linear_sequence_logps(h, weight, labels)
    weight.data = torch.empty(0)
    with pytest.raises(RuntimeError, match=r"now of shape \(0,\), not \(V, H\): DeepSpeed ZeRO-3 re-partitioned"):
        logps.sum().backward()


# ------------------------------------------------------------------ Hugging Face configs

@pytest.fixture
def transformers():
    """Skips only these tests where transformers is missing (a module-level skip took the kernel tests above
    with it)."""
    return pytest.importorskip("transformers")


def test_logit_options_from_config(transformers):
    from types import SimpleNamespace

    gemma = transformers.Gemma2Config(final_logit_softcapping=3.0)
    assert fk.logit_options_from_config(gemma) == {"logit_softcap": 3.0, "logit_scale": 1.0}
    cohere = transformers.CohereConfig(logit_scale=0.0625)
    assert fk.logit_options_from_config(cohere) == {"logit_softcap": None, "logit_scale": 0.0625}
    assert fk.logit_options_from_config(transformers.LlamaConfig()) == {"logit_softcap": None, "logit_scale": 1.0}
    granite = transformers.GraniteConfig(logits_scaling=8.0)
    assert fk.logit_options_from_config(granite) == {"logit_softcap": None, "logit_scale": 0.125}
    no_cap = transformers.Gemma2Config(final_logit_softcapping=None)
    assert fk.logit_options_from_config(no_cap) == {"logit_softcap": None, "logit_scale": 1.0}
    with pytest.raises(TypeError, match="got a dict"):  # its keys would be missed silently
        fk.logit_options_from_config(gemma.to_dict())
    # the model instead of its config, or no config at all, would silently give the defaults
    with pytest.raises(TypeError, match="pass model.config"):
        fk.logit_options_from_config(torch.nn.Linear(2, 2))
    for wrong in (None, "google/gemma-2-2b", transformers.GenerationConfig(), object(), [gemma]):
        with pytest.raises(TypeError, match="config must be a model config object"):
            fk.logit_options_from_config(wrong)
    # fields that are no usable number raise naming the field (a ZeroDivisionError, a bare float() error, or a
    # negative soft-cap refused later as logit_softcap before)
    for config, field in ((transformers.GraniteConfig(logits_scaling=0), "logits_scaling"),
                          (SimpleNamespace(model_type="granite", logits_scaling="x"), "logits_scaling"),
                          (SimpleNamespace(model_type="cohere", logit_scale=[1.0]), "logit_scale"),
                          (transformers.CohereConfig(logit_scale=math.inf), "logit_scale"),
                          (transformers.Gemma2Config(final_logit_softcapping=-30.0), "final_logit_softcapping")):
        with pytest.raises(ValueError, match=f"{type(config).__name__}.{field} must be a finite"):
            fk.logit_options_from_config(config)


def tiny_gemma2(transformers):
    config = transformers.Gemma2Config(vocab_size=101, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                       final_logit_softcapping=3.0, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    with torch.no_grad():  # a spread of logits large enough for the soft-cap to bend them
        model.lm_head.weight.mul_(40.0)
    return model


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_gemma2_logits_and_hidden_paths_agree(path, layout, transformers):
    model = tiny_gemma2(transformers).to(DEVICE)
    input_ids = torch.randint(0, 101, (2, 9), device=DEVICE)
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True)
    logits, hidden = out.logits, out.hidden_states[-1]
    assert logits.abs().max() > 2.0, "the soft-cap (3.0) should be active"
    labels = input_ids[:, 1:].clone()
    labels[0, :3] = IGNORE  # a prompt
    options = fk.logit_options_from_config(model.config)
    assert options == {"logit_softcap": 3.0, "logit_scale": 1.0}
    weight = model.lm_head.weight.detach()
    if layout == "padded":
        from_logits = fk.sequence_logps(logits[:, :-1], labels)
        from_hidden = fk.fused_linear_sequence_logps(hidden[:, :-1], weight, labels, **options)
    else:
        cu = torch.tensor([0, 8, 16], device=DEVICE)
        from_logits = fk.sequence_logps(logits[:, :-1].reshape(16, -1), labels.reshape(16), cu_seqlens=cu)
        from_hidden = fk.fused_linear_sequence_logps(hidden[:, :-1].reshape(16, -1), weight, labels.reshape(16),
                                                     cu_seqlens=cu, **options)
    assert from_logits.dtype == from_hidden.dtype == torch.float32
    assert_close(from_hidden, from_logits, (1e-4, 1e-4), "hidden path vs model logits")
    # Without the soft-cap the hidden path must disagree (the test would otherwise prove nothing).
    uncapped = fk.fused_linear_sequence_logps(hidden[:, :-1], weight, labels)
    padded_logits = fk.sequence_logps(logits[:, :-1], labels)
    assert (uncapped - padded_logits).abs().max() > 1e-2


def test_logit_options_from_other_configs(transformers):
    """The multipliers TRL's fused head also reads, and a width scaling this cannot reproduce."""
    from types import SimpleNamespace

    assert fk.logit_options_from_config(transformers.FalconH1Config(lm_head_multiplier=0.5))["logit_scale"] == 0.5
    hyperclovax = SimpleNamespace(model_type="hyperclovax", logits_scaling=4.0)
    assert fk.logit_options_from_config(hyperclovax)["logit_scale"] == 4.0
    # (stand-ins for configs of remote code: a model_type is what every config has)
    assert fk.logit_options_from_config(SimpleNamespace(model_type="m", output_multiplier=2.0))["logit_scale"] == 2.0
    with pytest.raises(ValueError, match="dim_model_base"):
        fk.logit_options_from_config(SimpleNamespace(model_type="minicpm", dim_model_base=256, hidden_size=1024))
    # soft-caps under other names, and Inkling's division of the hidden states
    recurrent_gemma = transformers.RecurrentGemmaConfig(logits_soft_cap=7.0)
    assert fk.logit_options_from_config(recurrent_gemma) == {"logit_softcap": 7.0, "logit_scale": 1.0}
    xlstm = SimpleNamespace(model_type="xlstm", output_logit_soft_cap=5.0)
    assert fk.logit_options_from_config(xlstm)["logit_softcap"] == 5.0
    inkling = SimpleNamespace(model_type="inkling", logits_mup_width_multiplier=4.0)
    assert fk.logit_options_from_config(inkling) == {"logit_softcap": None, "logit_scale": 0.25}
