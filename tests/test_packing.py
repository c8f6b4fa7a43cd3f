"""Packed sequences (cu_seqlens, the flash-attention varlen layout) against padded ones and the float64 reference,
for both implementations: the Triton kernels (through the interpreter on a CPU) and the plain-PyTorch path."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from helpers import ACCUMULATED_TOL, DTYPES, GRAD_TOL, assert_close, poison_empty, random_labels, random_logits

import focal_kernels as fk

IGNORE = -100
VOCAB = 37  # not a power of two
HIDDEN = 12

# (value atol / rtol, gradient tolerance relative to the largest gradient entry) of the hidden-state path: its
# GEMMs round the logits to the inputs' dtype (as a model's lm_head does), the float64 reference does not.
LINEAR_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.float16: (2e-2, 1e-2),
              torch.bfloat16: (1e-1, 4e-2)}

# Lengths with an empty sequence first, in the middle and last, a single-token one, and (index 4) one whose
# tokens are all ignored.
LENGTHS = [0, 3, 1, 0, 4, 5, 2, 0]
ALL_IGNORED = (4,)




def make_cu(lengths, dtype=torch.int64):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype, device=DEVICE)


def packed_labels(lengths, vocab, *, all_ignored=ALL_IGNORED, ignored_fraction=0.3, dtype=torch.int64):
    labels = random_labels(1, sum(lengths), vocab, DEVICE, ignored_fraction=ignored_fraction, dtype=dtype)[0]
    cu = make_cu(lengths)
    for s in all_ignored:
        labels[cu[s]:cu[s + 1]] = IGNORE
    return labels


def to_padded(packed, cu, fill):
    """(N, ...) packed rows → (S, T, ...) with T the longest sequence (at least 1), padding set to `fill`."""
    bounds = cu.tolist()
    longest = max([b - a for a, b in zip(bounds, bounds[1:])] + [1])
    out = packed.new_full((len(bounds) - 1, longest, *packed.shape[1:]), fill)
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        out[s, :b - a] = packed[a:b]
    return out


def from_padded(padded, cu):
    """Inverse of to_padded: the (N, ...) rows of each sequence, concatenated."""
    bounds = cu.tolist()
    return torch.cat([padded[s, :b - a] for s, (a, b) in enumerate(zip(bounds, bounds[1:]))])


def assert_grad_close(actual, expected, dtype, what):
    rtol, atol = GRAD_TOL[dtype]
    scale = expected.abs().max().item() or 1.0
    subnormal_step = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert_close(actual, expected, (rtol, atol * scale + 2 * subnormal_step), what)


def logps_and_grad(fn, inputs, upstream, **kwargs):
    """fn(*inputs, **kwargs) per-sequence log-probs, and the gradients of Σ_s upstream_s · logp_s w.r.t. every
    floating input (fresh leaves)."""
    leaves = [t.detach().clone().requires_grad_(True) if t.dtype.is_floating_point else t for t in inputs]
    out = fn(*leaves, **kwargs)
    logps = out[0] if isinstance(out, tuple) else out
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad((logps * upstream.to(logps.dtype)).sum(), wrt)
    return out, grads


# ------------------------------------------------------------------ the logits path

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=str)
def test_packed_logits_equal_padded_and_reference(path, dtype, cu_dtype):
    cu = make_cu(LENGTHS, cu_dtype)
    tokens = int(cu[-1])
    logits = random_logits(1, tokens, VOCAB, dtype, DEVICE)[0]
    labels = packed_labels(LENGTHS, VOCAB)
    upstream = torch.rand(len(LENGTHS), dtype=torch.float64, device=DEVICE) + 0.5

    (packed, counts), (grad_packed,) = logps_and_grad(fk.sequence_logps, [logits, labels], upstream,
                                                      cu_seqlens=cu, return_token_counts=True)
    # Padding rows hold NaN: their labels are ignored, so they must never be read.
    padded_logits = to_padded(logits, cu, float("nan"))
    padded_labels = to_padded(labels, cu, IGNORE)
    (padded, padded_counts), (grad_padded,) = logps_and_grad(fk.sequence_logps, [padded_logits, padded_labels],
                                                             upstream, return_token_counts=True)
    leaf = logits.double().requires_grad_(True)
    expected = fk.reference.sequence_logps(leaf, labels, IGNORE, cu)
    (grad_expected,) = torch.autograd.grad((expected * upstream).sum(), [leaf])

    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert packed.shape == (len(LENGTHS),) and packed.dtype == out_dtype
    assert padded.shape == (len(LENGTHS),) and padded.dtype == out_dtype
    assert_close(packed, expected, ACCUMULATED_TOL[dtype], "packed logps")
    assert_close(padded, expected, ACCUMULATED_TOL[dtype], "padded logps")
    assert_close(packed, padded, ACCUMULATED_TOL[dtype], "packed vs padded")
    for s, length in enumerate(LENGTHS):
        if length == 0 or s in ALL_IGNORED:
            assert packed[s].item() == 0.0, f"sequence {s} has no scored token but log-prob {packed[s].item()}"
    expected_counts = torch.tensor([int((labels[a:b] != IGNORE).sum()) for a, b in zip(cu.tolist(), cu.tolist()[1:])])
    for name, got in (("packed", counts), ("padded", padded_counts)):
        assert got.dtype == torch.int64 and got.shape == (len(LENGTHS),), f"{name} counts {got.dtype} {got.shape}"
        assert torch.equal(got.cpu(), expected_counts), f"{name} counts {got.tolist()} != {expected_counts.tolist()}"

    assert grad_packed.shape == logits.shape
    assert_grad_close(grad_packed, grad_expected, dtype, "packed grad")
    assert_grad_close(from_padded(grad_padded, cu), grad_expected, dtype, "padded grad")
    assert torch.isfinite(grad_padded).all(), "a NaN padding row leaked into the gradient"
    ignored = labels == IGNORE
    assert (grad_packed[ignored] == 0).all(), "ignored tokens must get a zero gradient"


@pytest.mark.parametrize("shape", ["(N,)", "(1,N)"])
def test_packed_accepts_batch_of_one_and_labels_of_both_shapes(path, shape):
    cu = make_cu([2, 5, 1])
    logits = random_logits(1, 8, VOCAB, torch.float32, DEVICE)
    labels = packed_labels([2, 5, 1], VOCAB, all_ignored=())
    lab = labels if shape == "(N,)" else labels[None]
    a = fk.sequence_logps(logits, lab, cu_seqlens=cu)          # (1, N, V)
    b = fk.sequence_logps(logits[0], lab, cu_seqlens=cu)       # (N, V)
    expected = fk.reference.sequence_logps(logits[0].double(), labels, IGNORE, cu)
    assert a.shape == b.shape == (3,)
    assert_close(a, expected, ACCUMULATED_TOL[torch.float32], "(1, N, V)")
    assert_close(b, expected, ACCUMULATED_TOL[torch.float32], "(N, V)")


def test_single_token_sequences_and_t_equal_one(path):
    """Every sequence one token long: packed (N, V) with cu = 0..N, and padded with T = 1."""
    n = 5
    cu = torch.arange(n + 1, device=DEVICE)
    logits = random_logits(1, n, VOCAB, torch.float32, DEVICE)[0]
    labels = random_labels(1, n, VOCAB, DEVICE, ignored_fraction=0.0)[0]
    labels[2] = IGNORE
    packed = fk.sequence_logps(logits, labels, cu_seqlens=cu)
    padded = fk.sequence_logps(logits[:, None], labels[:, None])
    expected = torch.log_softmax(logits.double(), -1).gather(1, labels.clamp(min=0)[:, None])[:, 0]
    expected[2] = 0.0
    assert_close(packed, expected, ACCUMULATED_TOL[torch.float32], "packed")
    assert_close(padded, expected, ACCUMULATED_TOL[torch.float32], "padded T=1")


def test_no_sequences_and_only_empty_sequences(path):
    """cu_seqlens = [0] (S = 0, N = 0) gives an empty result; [0, 0, 0] gives two zeros."""
    logits = torch.randn(0, VOCAB, device=DEVICE)
    labels = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    out, counts = fk.sequence_logps(logits, labels, cu_seqlens=torch.zeros(1, dtype=torch.int64, device=DEVICE),
                                    return_token_counts=True)
    assert out.shape == (0,) and counts.shape == (0,)
    leaf = logits.clone().requires_grad_(True)
    out = fk.sequence_logps(leaf, labels, cu_seqlens=torch.zeros(3, dtype=torch.int32, device=DEVICE))
    assert out.tolist() == [0.0, 0.0]
    (grad,) = torch.autograd.grad(out.sum(), [leaf])
    assert grad.shape == (0, VOCAB)
    h, w, b = (t.requires_grad_(True) for t in linear_inputs(0, torch.float32))
    out, counts = fk.fused_linear_sequence_logps(h, w, labels, b, cu_seqlens=torch.zeros(3, dtype=torch.int64,
                                                                                         device=DEVICE),
                                                 return_token_counts=True)
    assert out.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]
    g_h, g_w, g_b = torch.autograd.grad(out.sum(), [h, w, b])
    assert g_h.shape == (0, HIDDEN) and (g_w == 0).all() and (g_b == 0).all()


def test_gradcheck_packed_logits(path):
    cu = make_cu([0, 2, 1, 3, 0])
    logits = torch.randn(6, 11, dtype=torch.float64, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 11, (6,), device=DEVICE)
    labels[3] = IGNORE
    assert torch.autograd.gradcheck(lambda x: fk.sequence_logps(x, labels, cu_seqlens=cu), (logits,),
                                    fast_mode=True)


@pytest.mark.parametrize("kind", ["int64", "int32"])
def test_cu_seqlens_from_position_ids(path, kind):
    dtype = getattr(torch, kind)
    position_ids = torch.tensor([0, 1, 2, 0, 0, 1, 2, 3, 0, 1], dtype=dtype, device=DEVICE)
    for ids in (position_ids, position_ids[None]):
        cu = fk.cu_seqlens_from_position_ids(ids)
        assert cu.dtype == torch.int32 and cu.device == position_ids.device
        assert cu.tolist() == [0, 3, 4, 8, 10]
    assert fk.cu_seqlens_from_position_ids(torch.zeros(0, dtype=dtype)).tolist() == [0]
    assert fk.cu_seqlens_from_position_ids(torch.zeros(3, dtype=dtype)).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="position"):
        fk.cu_seqlens_from_position_ids(torch.tensor([1, 2, 0, 1], dtype=dtype))
    with pytest.raises(ValueError, match="position_ids"):
        fk.cu_seqlens_from_position_ids(position_ids.view(2, 5))
    with pytest.raises(TypeError, match="position_ids"):
        fk.cu_seqlens_from_position_ids(position_ids.float())

    # End to end: ids packed as a data collator would, labels shifted within sequences, log-probs per sequence.
    input_ids = torch.randint(0, VOCAB, (10,), device=DEVICE)
    cu = fk.cu_seqlens_from_position_ids(position_ids)
    labels = fk.shift_packed_labels(input_ids, cu)
    logits = random_logits(1, 10, VOCAB, torch.float32, DEVICE)[0]
    got = fk.sequence_logps(logits, labels, cu_seqlens=cu)
    bounds = cu.tolist()
    expected = torch.stack([fk.reference.sequence_logps(logits[None, a:b - 1].double(), input_ids[None, a + 1:b])[0]
                            if b - a > 1 else torch.zeros((), dtype=torch.float64, device=DEVICE)
                            for a, b in zip(bounds, bounds[1:])])
    assert_close(got, expected, ACCUMULATED_TOL[torch.float32], "log-probs of position-id packing")


def test_shift_packed_labels_never_crosses_a_boundary():
    lengths = [0, 3, 1, 4, 0, 2, 0]
    cu = make_cu(lengths)
    input_ids = torch.randint(0, 1000, (10,), device=DEVICE)
    own_labels = torch.randint(0, 1000, (10,), device=DEVICE)
    for ignore_index, labels in ((IGNORE, None), (-1, None), (IGNORE, own_labels)):
        source = input_ids if labels is None else labels
        expected = torch.full_like(source, ignore_index)
        bounds = cu.tolist()
        for a, b in zip(bounds, bounds[1:]):
            if b - a > 1:
                expected[a:b - 1] = source[a + 1:b]
        for shape in ((10,), (1, 10)):
            got = fk.shift_packed_labels(input_ids.view(shape), cu, ignore_index,
                                         labels=None if labels is None else labels.view(shape))
            assert got.shape == shape
            assert torch.equal(got.reshape(-1), expected), f"{got.tolist()} != {expected.tolist()}"
        # int32 cu_seqlens and int32 ids
        got = fk.shift_packed_labels(input_ids.int(), cu.int(), ignore_index,
                                     labels=None if labels is None else labels.int())
        assert got.dtype == torch.int32 and torch.equal(got.long(), expected)
    assert fk.shift_packed_labels(torch.zeros(0, dtype=torch.int64), torch.zeros(1, dtype=torch.int64)).shape == (0,)


# ------------------------------------------------------------------ the hidden-state path

def linear_inputs(tokens, dtype, vocab=VOCAB, hidden=HIDDEN):
    h = (torch.randn(tokens, hidden, dtype=torch.float64)).to(DEVICE, dtype)
    w = (torch.randn(vocab, hidden, dtype=torch.float64) * hidden ** -0.5 * 2).to(DEVICE, dtype)
    b = (torch.randn(vocab, dtype=torch.float64) * 0.5).to(DEVICE, dtype)
    return h, w, b


def reference_linear(h, w, b, labels, cu, upstream):
    leaves = [t.double().requires_grad_(True) for t in (h, w, b)]
    logps = fk.reference.sequence_logps(fk.reference.linear_logits(*leaves), labels, IGNORE, cu)
    return logps, torch.autograd.grad((logps * upstream).sum(), leaves)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=str)
def test_packed_hidden_equal_padded_and_reference(path, dtype, cu_dtype):
    cu = make_cu(LENGTHS, cu_dtype)
    tokens = int(cu[-1])
    h, w, b = linear_inputs(tokens, dtype)
    labels = packed_labels(LENGTHS, VOCAB)
    upstream = torch.rand(len(LENGTHS), dtype=torch.float64, device=DEVICE) + 0.5
    (packed, counts), (g_h, g_w, g_b) = logps_and_grad(
        lambda h_, w_, b_, lab: fk.fused_linear_sequence_logps(h_, w_, lab, b_, cu_seqlens=cu, chunk_size=16,
                                                               return_token_counts=True),
        [h, w, b, labels], upstream)
    padded_h, padded_labels = to_padded(h, cu, float("nan")), to_padded(labels, cu, IGNORE)
    (padded, padded_counts), (pg_h, pg_w, pg_b) = logps_and_grad(
        lambda h_, w_, b_, lab: fk.fused_linear_sequence_logps(h_, w_, lab, b_, return_token_counts=True),
        [padded_h, w, b, padded_labels], upstream)
    expected, (e_h, e_w, e_b) = reference_linear(h, w, b, labels, cu, upstream)

    value_tol, grad_tol = LINEAR_TOL[dtype]
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert packed.dtype == padded.dtype == out_dtype and packed.shape == padded.shape == (len(LENGTHS),)
    assert_close(packed, expected, (value_tol, value_tol), "packed logps")
    assert_close(padded, expected, (value_tol, value_tol), "padded logps")
    assert_close(packed, padded, ACCUMULATED_TOL[dtype] if dtype == torch.float64 else (value_tol, value_tol),
                 "packed vs padded")
    assert torch.equal(counts, padded_counts) and counts.dtype == torch.int64
    for s, length in enumerate(LENGTHS):
        if length == 0 or s in ALL_IGNORED:
            assert packed[s].item() == 0.0
    for name, got, want in (("hidden", g_h, e_h), ("padded hidden", from_padded(pg_h, cu), e_h),
                            ("weight", g_w, e_w), ("padded weight", pg_w, e_w), ("bias", g_b, e_b),
                            ("padded bias", pg_b, e_b)):
        assert got.dtype == dtype, f"grad {name}: {got.dtype}"
        scale = want.abs().max().item()
        assert_close(got, want, (grad_tol, grad_tol * scale), f"grad {name}")
    assert torch.isfinite(pg_h).all() and (g_h[labels == IGNORE] == 0).all()


def test_gradcheck_packed_hidden(path):
    cu = make_cu([2, 0, 3, 1])
    h, w, b = (t.requires_grad_(True) for t in linear_inputs(6, torch.float64, vocab=11, hidden=4))
    labels = torch.randint(0, 11, (6,), device=DEVICE)
    labels[1] = IGNORE
    assert torch.autograd.gradcheck(
        lambda h_, w_, b_: fk.fused_linear_sequence_logps(h_, w_, labels, b_, cu_seqlens=cu, chunk_size=4),
        (h, w, b), fast_mode=True)


def test_transposed_hidden_and_shifted_views(path):
    """A transposed (non-contiguous) hidden in packed form and a shifted hidden view in padded form."""
    lengths = [3, 0, 4]
    cu = make_cu(lengths)
    h_t = torch.randn(HIDDEN, 7, dtype=torch.float64, device=DEVICE)
    hidden = h_t.t()  # (N, H), stride (1, N)
    _, w, b = linear_inputs(7, torch.float64)
    labels = packed_labels(lengths, VOCAB, all_ignored=())
    upstream = torch.rand(3, dtype=torch.float64, device=DEVICE)
    got, grads = logps_and_grad(lambda h_, w_, b_: fk.fused_linear_sequence_logps(h_, w_, labels, b_, cu_seqlens=cu),
                                [hidden, w, b], upstream)
    expected, e_grads = reference_linear(hidden, w, b, labels, cu, upstream)
    assert_close(got, expected, (1e-10, 1e-10), "transposed hidden")
    for g, e in zip(grads, e_grads):
        assert_close(g, e, (1e-10, 1e-10), "grad")
    full = torch.randn(2, 6, HIDDEN, dtype=torch.float64, device=DEVICE)
    plabels = random_labels(2, 5, VOCAB, DEVICE)
    got = fk.fused_linear_sequence_logps(full[:, :-1], w, plabels, b)
    expected = fk.reference.sequence_logps(fk.reference.linear_logits(full[:, :-1], w, b), plabels)
    assert_close(got, expected, (1e-10, 1e-10), "shifted hidden view")


# ------------------------------------------------------------------ both paths, odd inputs

def test_logits_views_packed_and_padded(path):
    """logits[:, :-1] (padded) and a shifted (1, N, V) packed view are read in place with the right values."""
    lengths = [2, 4, 0, 3]
    cu = make_cu(lengths)
    full = random_logits(1, 10, VOCAB, torch.float32, DEVICE)
    labels = packed_labels(lengths, VOCAB, all_ignored=())
    got = fk.sequence_logps(full[:, :-1], labels[None], cu_seqlens=cu)
    expected = fk.reference.sequence_logps(full[0, :-1].double(), labels, IGNORE, cu)
    assert_close(got, expected, ACCUMULATED_TOL[torch.float32], "packed shifted view")
    padded_full = random_logits(3, 6, VOCAB, torch.float32, DEVICE)
    plabels = random_labels(3, 5, VOCAB, DEVICE)
    leaf = padded_full.clone().requires_grad_(True)
    got = fk.sequence_logps(leaf[:, :-1], plabels)
    (grad,) = torch.autograd.grad(got.sum(), [leaf])
    ref_leaf = padded_full.double().requires_grad_(True)
    expected = fk.reference.sequence_logps(ref_leaf[:, :-1], plabels)
    (ref_grad,) = torch.autograd.grad(expected.sum(), [ref_leaf])
    assert_close(got, expected, ACCUMULATED_TOL[torch.float32], "padded shifted view")
    assert_grad_close(grad, ref_grad, torch.float32, "grad through the view")
    assert (grad[:, -1] == 0).all()


def test_last_dimension_stride_is_copied_with_a_warning():
    """Triton path only: the kernels need unit-stride rows and say so when they copy."""
    lengths = [3, 2]
    cu = make_cu(lengths)
    logits = torch.randn(VOCAB, 5, device=DEVICE).t()  # (N, V), stride (1, N)
    labels = packed_labels(lengths, VOCAB, all_ignored=())
    with pytest.warns(UserWarning, match="cop"):
        got = fk.sequence_logps(logits, labels, cu_seqlens=cu)
    expected = fk.reference.sequence_logps(logits.double(), labels, IGNORE, cu)
    assert_close(got, expected, ACCUMULATED_TOL[torch.float32], "strided packed logits")
    with pytest.warns(UserWarning, match="cop"):
        got = fk.sequence_logps(logits[None], labels[None])  # padded (1, N, V) too
    assert_close(got, expected.sum()[None], ACCUMULATED_TOL[torch.float32], "strided padded logits")


@pytest.mark.filterwarnings("ignore:logits has a last-dimension stride")
def test_strided_last_dimension_on_the_torch_path(path):
    lengths = [3, 2]
    cu = make_cu(lengths)
    logits = torch.randn(VOCAB, 5, device=DEVICE).t()
    labels = packed_labels(lengths, VOCAB, all_ignored=())
    got = fk.sequence_logps(logits, labels, cu_seqlens=cu)
    assert_close(got, fk.reference.sequence_logps(logits.double(), labels, IGNORE, cu),
                 ACCUMULATED_TOL[torch.float32], "strided")


def test_inplace_backward_on_a_padded_leaf_is_refused():
    logits = torch.randn(1, 5, VOCAB, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, VOCAB, (1, 5), device=DEVICE)
    with pytest.raises(ValueError, match="leaf"):
        fk.sequence_logps(logits, labels, inplace_backward=True)


@pytest.mark.parametrize("shape", ["(N,V)", "(1,N,V)"])
def test_inplace_backward_on_a_packed_leaf_is_refused(shape):
    """The leaf the caller passes must be refused whatever its packed shape (the view made internally to put
    packed tokens on a (1, N) grid is not a leaf, but its storage is the leaf's)."""
    logits = torch.randn(*((5, VOCAB) if shape == "(N,V)" else (1, 5, VOCAB)), device=DEVICE, requires_grad=True)
    before = logits.detach().clone()
    labels = torch.randint(0, VOCAB, (5,), device=DEVICE)
    raised = None
    try:
        out = fk.sequence_logps(logits, labels, cu_seqlens=make_cu([2, 3]), inplace_backward=True)
        torch.autograd.grad(out.sum(), [logits])
    except ValueError as error:
        raised = str(error)
    overwritten = not torch.equal(logits.detach(), before)
    assert raised is not None and "leaf" in raised, \
        f"no ValueError naming the leaf (raised: {raised!r}); leaf overwritten by its gradient: {overwritten}"
    assert not overwritten


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_inplace_backward_gives_the_same_gradient(path, dtype):
    lengths = [0, 3, 1, 4, 2]
    cu = make_cu(lengths)
    base_values = random_logits(1, 10, VOCAB, dtype, DEVICE)[0]
    labels = packed_labels(lengths, VOCAB, all_ignored=(3,))
    upstream = torch.rand(len(lengths), device=DEVICE)
    base = base_values.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((fk.sequence_logps(base * 1, labels, cu_seqlens=cu) * upstream).sum(), [base])
    base = base_values.clone().requires_grad_(True)
    logits = base * 1  # an op's output, as from lm_head
    out = fk.sequence_logps(logits, labels, cu_seqlens=cu, inplace_backward=True)
    (grad,) = torch.autograd.grad((out * upstream).sum(), [base])
    assert torch.equal(grad, expected)
    if path == "triton":
        assert torch.equal(logits.detach(), grad), "the gradient was not written into the logits' storage"


def test_packed_inplace_backward_under_no_grad(path):
    """The leaf check runs on the caller's tensor only: the packed path's own (1, N, V) view of an op's output,
    made under no_grad, is a leaf that requires grad in PyTorch's eyes, and was refused as the caller's leaf.
    The values are those of grad mode, and the logits are left as they were."""
    lengths = [2, 0, 3]
    cu = make_cu(lengths)
    labels = packed_labels(lengths, VOCAB, all_ignored=())
    base = random_logits(1, 5, VOCAB, torch.float32, DEVICE)[0].requires_grad_(True)
    logits = base * 1  # an op's output, requiring grad
    before = logits.detach().clone()
    expected = fk.sequence_logps(logits, labels, cu_seqlens=cu).detach()
    for packed in (logits, logits[None]):
        with torch.no_grad():
            got = fk.sequence_logps(packed, labels, cu_seqlens=cu, inplace_backward=True)
        assert torch.equal(got, expected)
        assert torch.equal(logits.detach(), before)
    with torch.no_grad(), pytest.raises(ValueError, match="inplace_backward=True needs logits whose last"):
        fk.sequence_logps(logits.t().contiguous().t(), labels, cu_seqlens=cu, inplace_backward=True)  # checked


def test_inplace_backward_with_one_column(path):
    """V = 1 (every log-prob 0): a single column's stride is never stepped, so a last stride other than 1 is
    neither refused by inplace_backward nor copied; empty packed logits alike."""
    for tokens in (4, 0):
        base = torch.randn(tokens, 3, device=DEVICE).requires_grad_(True)
        logits = (base * 1).t().contiguous().t()[:, 1:2]  # an op's output, (N, 1) of strides (1, N)
        labels = torch.zeros(tokens, dtype=torch.long, device=DEVICE)
        cu = make_cu([tokens // 2, tokens - tokens // 2])
        out = fk.sequence_logps(logits, labels, cu_seqlens=cu, inplace_backward=True)
        assert torch.equal(out, torch.zeros(2, device=DEVICE))
        (grad,) = torch.autograd.grad(out.sum(), [base])
        assert torch.equal(grad, torch.zeros_like(base))


@pytest.mark.parametrize("which", ["logits", "hidden"])
def test_nan_in_an_ignored_packed_token_does_not_leak(path, which):
    lengths = [3, 0, 4, 2]
    cu = make_cu(lengths)
    labels = packed_labels(lengths, VOCAB, all_ignored=(), ignored_fraction=0.0)
    labels[4] = IGNORE  # second token of sequence 2
    labels[7] = IGNORE  # first token of sequence 3
    upstream = torch.rand(4, dtype=torch.float64, device=DEVICE)
    if which == "logits":
        values = random_logits(1, 9, VOCAB, torch.float32, DEVICE)[0]
        clean = values.clone()
        values[4] = float("nan")
        values[7] = float("inf")
        fn = (lambda x: fk.sequence_logps(x, labels, cu_seqlens=cu))
        inputs = [values]
        clean_inputs = [clean]
    else:
        h, w, b = linear_inputs(9, torch.float32)
        clean = h.clone()
        h[4] = float("nan")
        h[7] = float("inf")
        fn = (lambda x, w_, b_: fk.fused_linear_sequence_logps(x, w_, labels, b_, cu_seqlens=cu))
        inputs, clean_inputs = [h, w, b], [clean, w, b]
    got, grads = logps_and_grad(fn, inputs, upstream)
    expected, expected_grads = logps_and_grad(fn, clean_inputs, upstream)
    assert torch.isfinite(got).all(), got
    assert torch.equal(got, expected)
    for g, e in zip(grads, expected_grads):
        assert torch.isfinite(g).all()
        assert torch.equal(g, e)
    assert (grads[0][4] == 0).all() and (grads[0][7] == 0).all()


@pytest.mark.parametrize("which", ["logits", "hidden"])
def test_out_of_range_label_unvalidated_gives_nan_for_its_sequence_only(path, which):
    lengths = [3, 0, 4, 2]
    cu = make_cu(lengths)
    for bad in (VOCAB, -5, 10**6):
        labels = packed_labels(lengths, VOCAB, all_ignored=(), ignored_fraction=0.0)
        labels[5] = bad  # in sequence 2
        if which == "logits":
            leaves = [random_logits(1, 9, VOCAB, torch.float32, DEVICE)[0].requires_grad_(True)]

            def call(validate, padded=False):
                if padded:
                    return fk.sequence_logps(to_padded(leaves[0], cu, 0.0), to_padded(labels, cu, IGNORE),
                                             validate_labels=validate)
                return fk.sequence_logps(leaves[0], labels, cu_seqlens=cu, validate_labels=validate)
        else:
            leaves = [t.requires_grad_(True) for t in linear_inputs(9, torch.float32)]

            def call(validate, padded=False):
                h, w, b = leaves
                if padded:
                    return fk.fused_linear_sequence_logps(to_padded(h, cu, 0.0), w, to_padded(labels, cu, IGNORE),
                                                          b, validate_labels=validate)
                return fk.fused_linear_sequence_logps(h, w, labels, b, cu_seqlens=cu, validate_labels=validate)

        for padded in (False, True):
            out = call(False, padded)
            assert torch.isnan(out[2]), f"label {bad}: sequence 2 should be NaN, got {out.tolist()}"
            others = torch.cat([out[:2], out[3:]])
            assert torch.isfinite(others).all(), f"label {bad}: {out.tolist()}"
            assert out[1].item() == 0.0
            # The backward runs too; the other sequences' gradients stay finite.
            upstream = torch.tensor([1.0, 1.0, 0.0, 1.0], device=DEVICE)
            grads = torch.autograd.grad(torch.where(upstream > 0, out, 0).sum(), leaves)
            if which == "logits":
                rows = torch.cat([grads[0][:5], grads[0][6:]])
                assert torch.isfinite(rows).all()
            else:
                assert torch.isfinite(grads[0][:3]).all() and torch.isfinite(grads[0][7:]).all()
            with pytest.raises(ValueError, match="labels"):
                call(True, padded)


def test_poisoned_outputs_still_give_correct_packed_results(path, monkeypatch):
    lengths = [0, 3, 1, 4, 0, 2]
    cu = make_cu(lengths)
    logits = random_logits(1, 10, VOCAB, torch.float32, DEVICE)[0]
    labels = packed_labels(lengths, VOCAB, all_ignored=(3,))
    h, w, b = linear_inputs(10, torch.float32)
    upstream = torch.rand(len(lengths), dtype=torch.float64, device=DEVICE)

    def run():
        out, (g,) = logps_and_grad(lambda x: fk.sequence_logps(x, labels, cu_seqlens=cu, return_token_counts=True),
                                   [logits], upstream)
        lin, lin_grads = logps_and_grad(
            lambda *t: fk.fused_linear_sequence_logps(t[0], t[1], labels, t[2], cu_seqlens=cu, chunk_size=8,
                                                      return_token_counts=True), [h, w, b], upstream)
        return [*out, g, *lin, *lin_grads]

    clean = run()
    poison_empty(monkeypatch)
    poisoned = run()
    for k, (a, e) in enumerate(zip(poisoned, clean)):
        assert torch.equal(a, e), f"output {k} differs with poisoned torch.empty"


# ------------------------------------------------------------------ bad cu_seqlens

def bad_cu_cases():
    good = [0, 2, 5]
    return [
        ("float", torch.tensor(good, dtype=torch.float32), TypeError, "int32 or int64"),
        ("meta", torch.tensor(good, device="meta"), ValueError, "device"),
        ("2-D", torch.tensor([good]), ValueError, r"\(S \+ 1,\)"),
        ("empty", torch.zeros(0, dtype=torch.int64), ValueError, r"\(S \+ 1,\)"),
        ("not at 0", torch.tensor([1, 2, 5]), ValueError, "start at 0"),
        ("decreasing", torch.tensor([0, 4, 2, 5]), ValueError, "non-decreasing"),
        ("short end", torch.tensor([0, 2, 4]), ValueError, "end at N"),
        ("long end", torch.tensor([0, 2, 6]), ValueError, "end at N"),
        ("list", [0, 2, 5], TypeError, "cu_seqlens"),
    ]


@pytest.mark.parametrize("case", bad_cu_cases(), ids=lambda c: c[0])
def test_bad_cu_seqlens_raise_clear_errors(case):
    _, cu, error, message = case
    if isinstance(cu, torch.Tensor) and cu.device.type != "meta":
        cu = cu.to(DEVICE)
    logits = torch.randn(5, VOCAB, device=DEVICE)
    labels = torch.randint(0, VOCAB, (5,), device=DEVICE)
    h, w, b = linear_inputs(5, torch.float32)
    with pytest.raises(error, match=message):
        fk.sequence_logps(logits, labels, cu_seqlens=cu)
    with pytest.raises(error, match=message):
        fk.fused_linear_sequence_logps(h, w, labels, b, cu_seqlens=cu)


def test_packed_with_a_real_batch_dimension_is_refused():
    cu = make_cu([2, 3])
    logits = torch.randn(2, 5, VOCAB, device=DEVICE)
    labels = torch.randint(0, VOCAB, (2, 5), device=DEVICE)
    with pytest.raises(ValueError, match=r"\(N, V\) or \(1, N, V\)"):
        fk.sequence_logps(logits, labels, cu_seqlens=cu)
    with pytest.raises(ValueError, match=r"\(N,\) or \(1, N\)"):
        fk.sequence_logps(logits[0], labels, cu_seqlens=cu)  # labels (2, 5) for (5, V) logits
    h = torch.randn(2, 5, HIDDEN, device=DEVICE)
    w = torch.randn(VOCAB, HIDDEN, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(N, H\) or \(1, N, H\)"):
        fk.fused_linear_sequence_logps(h, w, labels, cu_seqlens=cu)
    with pytest.raises(ValueError, match="logits"):
        fk.sequence_logps(logits[0], labels[0])  # (N, V) without cu_seqlens
    # labels of another length: the message counts the caller's tokens, not an internal (1, N) grid
    with pytest.raises(ValueError, match=r"packed labels must have N = 5 tokens, one per row of logits .*got 4"):
        fk.sequence_logps(logits[0], labels[0, :4], cu_seqlens=make_cu([2, 2]))
    with pytest.raises(ValueError, match=r"packed labels must have N = 5 tokens, one per row of hidden .*got 4"):
        fk.fused_linear_sequence_logps(h[0], w, labels[0, :4], cu_seqlens=make_cu([2, 2]))
    with pytest.raises(ValueError, match=rf"one per row of logits \(shape \(1, 5, {VOCAB}\)\), got 4"):
        fk.sequence_logps(logits[:1], labels[0, :4], cu_seqlens=make_cu([2, 2]))  # the shape as passed
    # the per-token hidden path alike: packed (N, H) or (1, N, H) with labels of another length
    with pytest.raises(ValueError, match=r"labels must have N = 5 elements, one per row of hidden \(shape "
                                         rf"\(5, {HIDDEN}\)\), got shape \(2, 2\)"):
        fk.fused_linear_token_logps(h[0], w, labels[:, :2])
    with pytest.raises(ValueError, match=r"labels of shape \(4,\) go with packed hidden .* hidden has shape "
                                         rf"\(1, 5, {HIDDEN}\), so labels must have shape \(5,\) or \(1, 5\)"):
        fk.fused_linear_token_logps(h[:1], w, labels[0, :4])
    with pytest.raises(ValueError, match=r"so labels must have shape \(2, 5\)"):
        fk.fused_linear_token_logps(h, w, labels.reshape(-1))  # (B·T,) labels beside padded (B, T, H) hidden


def test_unvalidated_bad_cu_seqlens_never_read_out_of_bounds(path):
    """With validate_labels=False (as under torch.compile or CUDA graphs) cu_seqlens are not read on the host:
    offsets past N or below 0 are clamped into [0, N] by the segment kernel (and alike on the PyTorch path,
    where an end below N was an IndexError), and the backward gives exactly the gradient of what the forward
    summed (tokens outside every sequence get none)."""
    logits = torch.randn(6, 8, dtype=torch.float64, device=DEVICE)
    labels = torch.randint(0, 8, (6,), device=DEVICE)
    token = fk.reference.token_logps(logits, labels)
    for cu, spans in (([0, 3, 9], [(0, 3), (3, 6)]), ([-4, 3, 6], [(0, 3), (3, 6)]), ([0, 3, 4], [(0, 3), (3, 4)]),
                      ([2, 3, 6], [(2, 3), (3, 6)])):
        leaf = logits.clone().requires_grad_(True)
        logps, counts = fk.sequence_logps(leaf, labels, cu_seqlens=torch.tensor(cu, device=DEVICE),
                                          validate_labels=False,
                                          return_token_counts=True)
        expected = torch.stack([token[a:b].sum() for a, b in spans])
        torch.testing.assert_close(logps, expected)
        assert counts.tolist() == [b - a for a, b in spans], cu  # the counts of the very segments summed
        (grad,) = torch.autograd.grad(logps.sum(), [leaf])
        covered = torch.zeros(6, dtype=torch.bool, device=DEVICE)
        for a, b in spans:
            covered[a:b] = True
        assert (grad[~covered] == 0).all() and (grad[covered].abs().sum(-1) > 0).all(), cu


def test_strided_cu_seqlens(path):
    """A cu_seqlens view with a stride (every other entry of a longer tensor): the segments its values name
    (the kernel read it as if contiguous: the whole pack in the first sequence)."""
    logits, hidden = (torch.randn(7, n, dtype=torch.float64, device=DEVICE) for n in (9, 4))
    weight, labels = torch.randn(9, 4, dtype=torch.float64, device=DEVICE), torch.randint(0, 9, (7,), device=DEVICE)
    strided = torch.tensor([0, 99, 4, 99, 4, 99, 7], device=DEVICE)[::2]
    assert not strided.is_contiguous()
    for cu in (strided, strided.to(torch.int32)):
        expected = fk.reference.sequence_logps(logits, labels, cu_seqlens=cu.contiguous())
        torch.testing.assert_close(fk.sequence_logps(logits, labels, cu_seqlens=cu), expected)
        expected = fk.reference.sequence_logps(fk.reference.linear_logits(hidden, weight), labels,
                                               cu_seqlens=cu.contiguous())
        torch.testing.assert_close(fk.fused_linear_sequence_logps(hidden, weight, labels, cu_seqlens=cu), expected)


def test_shift_packed_labels_validates_its_inputs():
    cu = torch.tensor([0, 2, 5])
    with pytest.raises(TypeError, match="input_ids must be an int32 or int64"):
        fk.shift_packed_labels(torch.zeros(5), cu)
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\) or \(1, N\)"):
        fk.shift_packed_labels(torch.zeros(5, dtype=torch.long), cu, labels=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 or int64"):
        fk.shift_packed_labels(torch.zeros(5, dtype=torch.long), cu.float())
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids, got \(4,\) and \(5,\)"):
        fk.shift_packed_labels(torch.zeros(5, dtype=torch.long), cu, labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        fk.shift_packed_labels(torch.zeros(5, dtype=torch.long), cu, ignore_index=-100.0)
    with pytest.raises(ValueError, match="ignore_index=1099511627776 does not fit in input_ids's dtype int32"):
        fk.shift_packed_labels(torch.zeros(5, dtype=torch.int32), cu, ignore_index=2**40)
