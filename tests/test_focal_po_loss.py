"""The fused loss against the float64 reference: values, log-probs, rewards and both logits gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

import focal_kernels as fk
from focal_kernels import backend
from helpers import (ACCUMULATED_TOL, DTYPES, GRAD_TOL, assert_close, compare_with_reference, loss_and_grads,
                     random_labels, random_logits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [2, 37, 1000, 3001])
def test_matches_reference_each_dtype_and_vocab(device, dtype, vocab):
    chosen = random_logits(2, 5, vocab, dtype, device)
    rejected = random_logits(2, 3, vocab, dtype, device)
    compare_with_reference(chosen, rejected, random_labels(2, 5, vocab, device), random_labels(2, 3, vocab, device),
                           beta=0.5, gamma=0.05)


@pytest.mark.parametrize("gamma", [0.0, 0.05, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_reference", [False, True])
def test_gamma_reduction_reference_logps(device, gamma, reduction, with_reference):
    vocab = 513
    chosen, rejected = random_logits(3, 4, vocab, torch.float32, device), random_logits(3, 6, vocab, torch.float32,
                                                                                          device)
    ref_c = ref_r = None
    if with_reference:
        ref_c = -30 * torch.rand(3, device=device)
        ref_r = -30 * torch.rand(3, device=device)
    out = compare_with_reference(chosen, rejected, random_labels(3, 4, vocab, device),
                                 random_labels(3, 6, vocab, device), ref_c, ref_r,
                                 beta=0.3, gamma=gamma, reduction=reduction)
    assert out.loss.shape == (() if reduction != "none" else (3,))


@pytest.mark.parametrize("detach", [False, True])
def test_detach_focal_weight(device, detach):
    vocab = 100
    chosen, rejected = random_logits(2, 4, vocab, torch.float64, device), random_logits(2, 4, vocab, torch.float64,
                                                                                          device)
    labels_c, labels_r = random_labels(2, 4, vocab, device), random_labels(2, 4, vocab, device)
    compare_with_reference(chosen, rejected, labels_c, labels_r, beta=0.05, gamma=2.0, detach_focal_weight=detach)
    # The two options give the same loss but different gradients (γ > 0).
    out_a, g_attached, _ = loss_and_grads(fk.focal_po_loss, chosen, rejected, labels_c, labels_r, beta=0.05, gamma=2.0)
    out_d, g_detached, _ = loss_and_grads(fk.focal_po_loss, chosen, rejected, labels_c, labels_r, beta=0.05,
                                          gamma=2.0, detach_focal_weight=True)
    assert torch.equal(out_a.loss, out_d.loss)
    assert (g_attached - g_detached).abs().max() > 1e-3 * g_attached.abs().max()


def test_single_token_and_all_ignored_rows(device):
    vocab = 77
    chosen = random_logits(3, 1, vocab, torch.float32, device)
    rejected = random_logits(3, 1, vocab, torch.float32, device)
    labels_c = random_labels(3, 1, vocab, device, ignored_fraction=0.0)
    labels_r = random_labels(3, 1, vocab, device, ignored_fraction=0.0)
    labels_c[1] = -100  # the chosen sequence of pair 1 has no scored token
    out = compare_with_reference(chosen, rejected, labels_c, labels_r, beta=0.1, gamma=0.05)
    assert out.chosen_logps[1].item() == 0.0


def test_fully_ignored_sequences_have_zero_logp_and_zero_grad(device):
    vocab = 300
    chosen = random_logits(2, 4, vocab, torch.bfloat16, device)
    rejected = random_logits(2, 4, vocab, torch.bfloat16, device)
    ignored = torch.full((2, 4), -100, dtype=torch.int64, device=device)
    out, grad_c, grad_r = loss_and_grads(fk.focal_po_loss, chosen, rejected, ignored, ignored)
    assert torch.equal(out.chosen_logps, torch.zeros(2, device=device))
    assert torch.equal(out.rejected_logps, torch.zeros(2, device=device))
    expected = -math.log(0.5) * 0.5 ** 0.05  # z = 0: p = 1/2
    assert torch.isfinite(out.loss) and abs(out.loss.item() - expected) < 1e-6
    assert torch.equal(grad_c, torch.zeros_like(grad_c)) and torch.equal(grad_r, torch.zeros_like(grad_r))


@pytest.mark.parametrize("ignore_index", [-1, 7])
def test_non_default_ignore_index(device, ignore_index):
    """ignore_index may be a valid vocabulary id: tokens with that label are then not scored."""
    vocab = 50
    chosen, rejected = random_logits(2, 6, vocab, torch.float32, device), random_logits(2, 6, vocab, torch.float32,
                                                                                          device)
    labels_c = random_labels(2, 6, vocab, device, ignore_index=ignore_index)
    labels_r = random_labels(2, 6, vocab, device, ignore_index=ignore_index)
    labels_c[0, 0] = ignore_index
    compare_with_reference(chosen, rejected, labels_c, labels_r, ignore_index=ignore_index)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_views(device, dtype):
    """HF-style shift: logits[:, :-1] with labels[:, 1:] (read in place); strided labels too; a batch stride
    that is not T·V; a vocabulary stride of 2 (copied once)."""
    vocab = 1111
    chosen = random_logits(2, 5, vocab, dtype, device, extra_time=1)
    rejected = random_logits(2, 4, vocab, dtype, device, extra_time=1)
    assert not chosen.is_contiguous()
    labels_c = random_labels(2, 6, vocab, device)[:, 1:]
    labels_r = random_labels(2, 5, vocab, device)[:, 1:]
    compare_with_reference(chosen, rejected, labels_c, labels_r, beta=0.2)
    # A view whose batch stride is not T·V (a slice over the vocabulary-major buffer) works too.
    wide = random_logits(2, 4, vocab + 5, dtype, device)[:, :, :vocab]
    compare_with_reference(wide, rejected, random_labels(2, 4, vocab, device), labels_r)
    interleaved = random_logits(2, 4, 2 * vocab, dtype, device)[:, :, ::2]
    assert interleaved.stride(-1) == 2
    compare_with_reference(interleaved, rejected, random_labels(2, 4, vocab, device), labels_r)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sequences_of_no_tokens(device, dtype):
    """Padded T = 0 on one side (a shifted view) and T = 1 on the other, against float64: log-prob 0 and an
    empty gradient there; inplace_backward gives the same gradients, in every dtype (its tests covered
    float32 and bfloat16)."""
    vocab = 37
    chosen = random_logits(2, 0, vocab, dtype, device, extra_time=1)  # (2, 0, V)
    rejected = random_logits(2, 1, vocab, dtype, device)
    labels_c, labels_r = random_labels(2, 0, vocab, device), random_labels(2, 1, vocab, device)
    out = compare_with_reference(chosen, rejected, labels_c, labels_r)
    assert torch.equal(out.chosen_logps, torch.zeros_like(out.chosen_logps))
    _, expected_c, expected_r = loss_and_grads(fk.focal_po_loss, chosen, rejected, labels_c, labels_r)
    base_c, base_r = (t.detach().clone().requires_grad_(True) for t in (chosen, rejected))
    out = fk.focal_po_loss(base_c * 1, base_r * 1, labels_c, labels_r, inplace_backward=True)
    total = out.loss + 0.01 * out.chosen_logps.sum() - 0.02 * out.rejected_logps.sum()
    grad_c, grad_r = torch.autograd.grad(total, [base_c, base_r])
    assert grad_c.shape == (2, 0, vocab)
    assert torch.equal(grad_c, expected_c) and torch.equal(grad_r, expected_r)


def test_copy_warning_names_the_callers_line(device):
    """The one-time copy of logits with a vocabulary stride warns at the user's line, whichever entry point
    (and however many library frames) led there."""
    vocab = 50
    chosen = random_logits(2, 3, 2 * vocab, torch.float32, device)[:, :, ::2]
    rejected = random_logits(2, 3, vocab, torch.float32, device)
    labels = random_labels(2, 3, vocab, device)
    for call in (lambda: fk.sequence_logps(chosen, labels), lambda: fk.focal_po_loss(chosen, rejected, labels, labels),
                 lambda: fk.sequence_logps(chosen.reshape(6, vocab), labels.reshape(6),
                                           cu_seqlens=torch.tensor([0, 2, 6], device=device))):
        with pytest.warns(UserWarning, match="last-dimension stride") as record:
            call()
        ours = [warning.filename for warning in record if "last-dimension stride" in str(warning.message)]
        assert ours == [__file__]  # (Triton 3.6's interpreter adds NumPy deprecation warnings of its own)
    # a caller whose module name is not a string (exec with such globals): no error from finding its frame
    # (Python itself then drops a warning attributed to such a frame)
    scope = {"fk": fk, "chosen": chosen, "labels": labels, "__name__": None}
    exec("out = fk.sequence_logps(chosen, labels)", scope)
    assert torch.isfinite(scope["out"]).all()


def test_int32_labels(device):
    vocab = 99
    chosen, rejected = random_logits(2, 3, vocab, torch.float32, device), random_logits(2, 3, vocab, torch.float32,
                                                                                          device)
    compare_with_reference(chosen, rejected, random_labels(2, 3, vocab, device, dtype=torch.int32),
                           random_labels(2, 3, vocab, device, dtype=torch.int32))
    compare_with_reference(chosen, rejected, random_labels(2, 3, vocab, device, dtype=torch.int32),
                           random_labels(2, 3, vocab, device))  # int32 chosen beside int64 rejected


def test_gamma_zero_is_dpo(device):
    vocab = 400
    chosen, rejected = random_logits(4, 5, vocab, torch.float32, device), random_logits(4, 5, vocab, torch.float32,
                                                                                          device)
    labels_c, labels_r = random_labels(4, 5, vocab, device), random_labels(4, 5, vocab, device)
    ref_c, ref_r = -20 * torch.rand(4, device=device), -20 * torch.rand(4, device=device)
    out = fk.focal_po_loss(chosen, rejected, labels_c, labels_r, ref_c, ref_r, beta=0.1, gamma=0.0)
    dpo = -F.logsigmoid(0.1 * ((out.chosen_logps - ref_c) - (out.rejected_logps - ref_r))).mean()
    assert_close(out.loss, dpo, (1e-6, 1e-6), "DPO loss")


def test_gradient_through_logps_only(device):
    """An NLL term on out.chosen_logps alone must reach the chosen logits."""
    vocab = 200
    chosen = random_logits(2, 4, vocab, torch.float64, device).requires_grad_(True)
    rejected = random_logits(2, 4, vocab, torch.float64, device).requires_grad_(True)
    labels_c, labels_r = random_labels(2, 4, vocab, device), random_labels(2, 4, vocab, device)
    out = fk.focal_po_loss(chosen, rejected, labels_c, labels_r)
    (grad,) = torch.autograd.grad(-out.chosen_logps.sum(), [chosen])
    chosen_ref = chosen.detach().clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(-fk.reference.sequence_logps(chosen_ref, labels_c).sum(), [chosen_ref])
    assert_close(grad, grad_ref, GRAD_TOL[torch.float64], "NLL gradient")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extreme_logit_spread(device, dtype):
    """Logits of ±3e4: the online logsumexp must neither overflow nor lose the target."""
    vocab = 1500
    chosen = random_logits(2, 3, vocab, dtype, device, scale=1e4).clamp(-3e4, 3e4)
    rejected = random_logits(2, 3, vocab, dtype, device, scale=1e4).clamp(-3e4, 3e4)
    labels_c, labels_r = random_labels(2, 3, vocab, device), random_labels(2, 3, vocab, device)
    labels_c[0, 0] = int(chosen[0, 0].float().argmax())
    out = compare_with_reference(chosen, rejected, labels_c, labels_r, beta=1e-4)
    assert torch.isfinite(out.chosen_logps).all() and torch.isfinite(out.loss)


def test_huge_margin_stays_finite(device):
    """|z| up to 1e4: logsigmoid-based loss and gradient stay finite for every γ."""
    vocab = 64
    chosen = random_logits(2, 2, vocab, torch.float32, device)
    rejected = random_logits(2, 2, vocab, torch.float32, device)
    labels = random_labels(2, 2, vocab, device, ignored_fraction=0.0)
    for gamma in (0.0, 0.05, 2.0):
        for ref_shift in (1e5, -1e5):
            ref_c = torch.tensor([ref_shift, -ref_shift], device=device)
            out, grad_c, grad_r = loss_and_grads(fk.focal_po_loss, chosen, rejected, labels, labels,
                                                 ref_c, torch.zeros(2, device=device), beta=0.1, gamma=gamma,
                                                 reduction="none", upstream=torch.ones(2, device=device))
            ref = fk.reference.focal_po_loss(chosen.double(), rejected.double(), labels, labels, ref_c.double(),
                                             torch.zeros(2, dtype=torch.float64, device=device), beta=0.1,
                                             gamma=gamma, reduction="none")
            assert torch.isfinite(out.loss).all() and torch.isfinite(grad_c).all() and torch.isfinite(grad_r).all()
            assert_close(out.loss, ref.loss, (1e-5, 1e-6), f"loss at |z|=1e4, gamma={gamma}")


def test_nan_logits_give_nan_loss(device):
    vocab = 100
    chosen, rejected = random_logits(2, 3, vocab, torch.float32, device), random_logits(2, 3, vocab, torch.float32,
                                                                                          device)
    labels = random_labels(2, 3, vocab, device, ignored_fraction=0.0)
    chosen[1, 2, 17] = float("nan")
    out = fk.focal_po_loss(chosen, rejected, labels, labels)
    assert torch.isnan(out.loss)
    assert torch.isnan(out.chosen_logps[1]) and torch.isfinite(out.chosen_logps[0])


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "plain-cpu"])
def test_nan_in_an_ignored_token_is_not_read(device, kernels, monkeypatch):
    if not kernels:
        if device != "cpu":
            pytest.skip("the plain-PyTorch path runs only for CPU tensors")
        monkeypatch.setattr(backend, "use_triton", lambda tensor: False)
    vocab = 100
    chosen, rejected = random_logits(2, 3, vocab, torch.float32, device), random_logits(2, 3, vocab, torch.float32,
                                                                                          device)
    labels = random_labels(2, 3, vocab, device, ignored_fraction=0.0)
    labels[1, 2] = -100
    chosen[1, 2, :] = float("nan")
    out, grad_c, _ = loss_and_grads(fk.focal_po_loss, chosen, rejected, labels, labels)
    assert torch.isfinite(out.loss) and torch.isfinite(grad_c).all()
    assert torch.equal(grad_c[1, 2], torch.zeros_like(grad_c[1, 2]))


def test_sequence_logps_matches_reference(device):
    vocab = 2049
    for dtype in DTYPES:
        logits = random_logits(3, 4, vocab, dtype, device, extra_time=1)
        labels = random_labels(3, 4, vocab, device)
        logps = fk.sequence_logps(logits, labels)
        assert logps.shape == (3,)
        assert_close(logps, fk.reference.sequence_logps(logits.double(), labels), ACCUMULATED_TOL[dtype], str(dtype))
    with torch.no_grad():  # the reference-model use
        assert not fk.sequence_logps(logits, labels).requires_grad


def test_module_options_changed_after_construction_take_effect(device):
    """An option not given to the constructor, set as an attribute later, is used (it was ignored)."""
    vocab = 53
    chosen, rejected = random_logits(2, 3, vocab, torch.float64, device), random_logits(2, 3, vocab, torch.float64,
                                                                                          device)
    labels_c, labels_r = random_labels(2, 3, vocab, device), random_labels(2, 3, vocab, device)
    for change in (dict(loss_type="ipo"), dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
                   dict(detach_focal_weight=True, gamma=2.0), dict(label_smoothing=0.1, loss_type="robust")):
        module = fk.FocalPOLoss()
        for name, value in change.items():
            setattr(module, name, value)
        expected = fk.focal_po_loss(chosen, rejected, labels_c, labels_r, **change).loss
        assert torch.equal(module(chosen, rejected, labels_c, labels_r).loss, expected), change
        assert not torch.equal(expected, fk.focal_po_loss(chosen, rejected, labels_c, labels_r).loss), change


def test_module_matches_functional(device):
    vocab = 321
    chosen, rejected = random_logits(2, 3, vocab, torch.float32, device), random_logits(2, 3, vocab, torch.float32,
                                                                                          device)
    labels_c, labels_r = random_labels(2, 3, vocab, device), random_labels(2, 3, vocab, device)
    module = fk.FocalPOLoss(beta=0.2, gamma=1.0, reduction="sum")
    assert "gamma=1.0" in repr(module) and module.reduction == "sum"
    a = module(chosen, rejected, labels_c, labels_r)
    b = fk.focal_po_loss(chosen, rejected, labels_c, labels_r, beta=0.2, gamma=1.0, reduction="sum")
    for x, y in zip(a[:5], b[:5]):
        assert torch.equal(x, y)
    assert a.metrics.keys() == b.metrics.keys()
    # pair_weights: a per-batch tensor, given at each call (refused as a construction option)
    weights = torch.tensor([0.5, 2.0], device=device)
    a = module(chosen, rejected, labels_c, labels_r, pair_weights=weights)
    b = fk.focal_po_loss(chosen, rejected, labels_c, labels_r, beta=0.2, gamma=1.0, reduction="sum",
                         pair_weights=weights)
    assert torch.equal(a.loss, b.loss)
    with pytest.raises(TypeError, match="pair_weights is a per-batch"):
        fk.FocalPOLoss(pair_weights=weights)


def test_inplace_backward_gives_equal_gradients(device):
    vocab = 700
    for dtype in (torch.float32, torch.bfloat16):
        chosen = random_logits(2, 4, vocab, dtype, device, extra_time=1)
        rejected = random_logits(2, 3, vocab, dtype, device)
        labels_c, labels_r = random_labels(2, 4, vocab, device), random_labels(2, 3, vocab, device)
        _, expected_c, expected_r = loss_and_grads(fk.focal_po_loss, chosen, rejected, labels_c, labels_r)
        # Logits produced by an op (as from lm_head), so the in-place gradient lands in that op's output.
        base_c = chosen.detach().clone().requires_grad_(True)
        base_r = rejected.detach().clone().requires_grad_(True)
        logits_c, logits_r = base_c * 1, base_r * 1
        out = fk.focal_po_loss(logits_c[:, :4], logits_r, labels_c, labels_r, inplace_backward=True)
        total = out.loss + 0.01 * out.chosen_logps.sum() - 0.02 * out.rejected_logps.sum()
        grad_c, grad_r = torch.autograd.grad(total, [base_c, base_r])
        assert torch.equal(grad_c, expected_c) and torch.equal(grad_r, expected_r)
        assert torch.equal(logits_r.detach(), grad_r), "the gradient was not written into the logits' storage"
        assert not grad_c.requires_grad and not grad_r.requires_grad


def test_inplace_backward_with_sides_interleaved_in_one_tensor(device):
    """Chosen and rejected as the two halves of each sequence of one (B, T + T2, V) tensor: their rows
    alternate in memory but share none, so the in-place gradient is allowed and exact."""
    vocab = 301
    joint = random_logits(3, 9, vocab, torch.float32, device)
    labels_c, labels_r = random_labels(3, 4, vocab, device), random_labels(3, 5, vocab, device)

    def gradient(inplace_backward):
        base = joint.detach().clone().requires_grad_(True)
        logits = base * 1
        out = fk.focal_po_loss(logits[:, :4], logits[:, 4:], labels_c, labels_r, inplace_backward=inplace_backward)
        total = out.loss + 0.01 * out.chosen_logps.sum() - 0.02 * out.rejected_logps.sum()
        return torch.autograd.grad(total, [base])[0]

    # Against the out-of-place gradient of the same views (rows at the same 16-byte offsets, so the same
    # reduction order: kernels/row_alignment.py), and the float64 reference.
    grad = gradient(inplace_backward=True)
    assert torch.equal(grad, gradient(inplace_backward=False))
    _, expected_c, expected_r = loss_and_grads(fk.reference.focal_po_loss, joint[:, :4].double(),
                                               joint[:, 4:].double(), labels_c, labels_r)
    torch.testing.assert_close(grad, torch.cat([expected_c, expected_r], dim=1).float(), rtol=1e-5, atol=1e-6)


def test_torch_path_on_plain_cpu_matches_kernels(monkeypatch, device):
    """Without the interpreter, CPU tensors take the PyTorch path: same results, same output types as the
    kernels' (on the test device: the GPU, or the CPU through the interpreter)."""
    vocab = 150
    inputs = [random_logits(2, 3, vocab, torch.bfloat16, device), random_logits(2, 3, vocab, torch.bfloat16, device),
              random_labels(2, 3, vocab, device), random_labels(2, 3, vocab, device)]
    kernel_out, kernel_gc, kernel_gr = loss_and_grads(fk.focal_po_loss, *inputs)
    monkeypatch.setattr(backend, "use_triton", lambda tensor: False)
    torch_out, torch_gc, torch_gr = loss_and_grads(fk.focal_po_loss, *(t.cpu() for t in inputs))
    kernel_out = kernel_out._replace(**{name: getattr(kernel_out, name).cpu() for name in kernel_out._fields[:5]})
    kernel_gc, kernel_gr = kernel_gc.cpu(), kernel_gr.cpu()
    for name in kernel_out._fields[:5]:
        assert getattr(torch_out, name).dtype == getattr(kernel_out, name).dtype
        assert_close(getattr(torch_out, name), getattr(kernel_out, name), (1e-5, 1e-6), name)
    assert torch_gc.dtype == torch.bfloat16
    assert_close(torch_gc, kernel_gc, (1.6e-2, 1e-5), "grad chosen")
    assert_close(torch_gr, kernel_gr, (1.6e-2, 1e-5), "grad rejected")


@pytest.mark.parametrize("loss_type", [["ipo", "sigmoid"], "simpo", "focal"])
def test_fused_entry_points_equal_primitive_then_preference_loss(device, loss_type):
    """The fused losses, with and without a length-normalized loss type (token counts computed only then), give
    what the primitive's log-probs and counts fed to preference_loss give, values and gradients."""
    vocab, hidden_size = 53, 8
    chosen, rejected = random_logits(2, 5, vocab, torch.float64, device), random_logits(2, 4, vocab, torch.float64,
                                                                                          device)
    labels_c, labels_r = random_labels(2, 5, vocab, device), random_labels(2, 4, vocab, device)
    labels_c[:, -1], labels_r[:, -1] = 1, 2  # a scored token each: SimPO's mean log-prob of none is 0 / 0, as in TRL
    refs = (None, None) if loss_type == "simpo" else (torch.randn(2, device=device, dtype=torch.float64),) * 2
    options = dict(loss_type=loss_type, beta=0.3)

    def composed(c, r):
        (lc, nc), (lr, nr) = (fk.sequence_logps(x, y, return_token_counts=True) for x, y in ((c, labels_c),
                                                                                            (r, labels_r)))
        return fk.preference_loss(lc, lr, *refs, chosen_token_counts=nc, rejected_token_counts=nr, **options).loss

    leaves = [chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)]
    fused = fk.focal_po_loss(*leaves, labels_c, labels_r, *refs, **options).loss
    expected = composed(*(x.detach().clone().requires_grad_(True) for x in (chosen, rejected)))
    torch.testing.assert_close(fused, expected)
    got = torch.autograd.grad(fused, leaves)
    leaves2 = [x.detach().clone().requires_grad_(True) for x in (chosen, rejected)]
    want = torch.autograd.grad(composed(*leaves2), leaves2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)

    hc = torch.randn(2, 5, hidden_size, dtype=torch.float64, device=device, requires_grad=True)
    hr = torch.randn(2, 4, hidden_size, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, device=device)
    fused = fk.fused_linear_focal_po_loss(hc, hr, weight, labels_c, labels_r, *refs, **options).loss
    (lc, nc), (lr, nr) = (fk.fused_linear_sequence_logps(h, weight, y, return_token_counts=True)
                          for h, y in ((hc, labels_c), (hr, labels_r)))
    expected = fk.preference_loss(lc, lr, *refs, chosen_token_counts=nc, rejected_token_counts=nr, **options).loss
    torch.testing.assert_close(fused, expected)


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_chosen_and_rejected_share_each_launch(device, monkeypatch, inplace_backward):
    """The logits path launches each kernel once for both sides (token log-probs and per-sequence sums
    forward, the logits' gradient backward), and stays exact when the sides differ: lengths (T = 1 on one
    side), label dtypes, strides, a side whose every token is ignored."""
    if not backend.use_triton(torch.empty(0, device=device)):
        pytest.skip("counts kernel launches")
    from focal_kernels.kernels import logits_grad, segment_sum, token_logps

    launches = []
    for module, name in ((token_logps, "token_logps_and_lse"), (logits_grad, "logits_grad"),
                         (segment_sum, "segment_sum")):
        def counted(*args, _real=getattr(module, name), _name=name, **kwargs):
            launches.append(_name)
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    vocab = 301
    chosen = random_logits(3, 6, vocab, torch.float32, device, extra_time=2)[:, 1:-1]  # a strided view
    rejected = random_logits(3, 1, vocab, torch.float32, device)
    labels_c = random_labels(3, 4, vocab, device, dtype=torch.int32)
    labels_r = random_labels(3, 1, vocab, device, ignored_fraction=0.0)
    labels_r[1] = -100
    if not inplace_backward:
        compare_with_reference(chosen, rejected, labels_c, labels_r, beta=0.4, gamma=0.5)
    else:  # the logits are consumed: pass the output of an op, and compare with the default's gradients
        leaves = [x.detach().clone().requires_grad_(True) for x in (chosen, rejected)]
        want = torch.autograd.grad(fk.focal_po_loss(*leaves, labels_c, labels_r, beta=0.4).loss, leaves)
        launches.clear()
        leaves = [x.detach().clone().requires_grad_(True) for x in (chosen, rejected)]
        loss = fk.focal_po_loss(*(x * 1 for x in leaves), labels_c, labels_r, beta=0.4, inplace_backward=True).loss
        for got, expected in zip(torch.autograd.grad(loss, leaves), want):
            torch.testing.assert_close(got, expected)
    assert launches == ["token_logps_and_lse", "segment_sum", "logits_grad"]


def test_inplace_backward_leaves_a_side_without_grad_untouched(device):
    """Only the side that requires grad gets a gradient: the other side's logits (a plain tensor) are not
    overwritten by inplace_backward, and no gradient is computed for them."""
    vocab = 37
    chosen = random_logits(2, 4, vocab, torch.float32, device).requires_grad_(True)
    rejected = random_logits(2, 3, vocab, torch.float32, device)
    labels_c, labels_r = random_labels(2, 4, vocab, device), random_labels(2, 3, vocab, device)
    kept = rejected.clone()
    expected = torch.autograd.grad(fk.focal_po_loss(chosen, rejected, labels_c, labels_r).loss, [chosen])[0]
    loss = fk.focal_po_loss(chosen * 1, rejected, labels_c, labels_r, inplace_backward=True).loss
    (got,) = torch.autograd.grad(loss, [chosen])
    assert torch.equal(rejected, kept)
    torch.testing.assert_close(got, expected)
