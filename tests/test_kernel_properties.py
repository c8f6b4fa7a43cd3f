"""Properties of the kernels beyond matching values: gradcheck, every output element written, determinism,
and what is kept for the backward."""

import numpy as np
import pytest
import torch

import focal_kernels as fk
from focal_kernels.kernels.logits_grad import logits_grad
from focal_kernels.kernels.token_logps import token_logps_and_lse
from helpers import DTYPES, poison_empty, random_labels, random_logits


def test_gradcheck_float64_through_the_kernels(device):
    vocab = 7  # not a power of two; the rejected side one token long (each input element costs two calls)
    chosen = random_logits(2, 3, vocab, torch.float64, device, scale=1.0).requires_grad_(True)
    rejected = random_logits(2, 1, vocab, torch.float64, device, scale=1.0).requires_grad_(True)
    labels_c, labels_r = random_labels(2, 3, vocab, device), random_labels(2, 1, vocab, device, ignored_fraction=0)
    labels_r[1] = -100  # an all-ignored sequence beside a scored one
    ref_c = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    ref_r = torch.randn(2, dtype=torch.float64, device=device, requires_grad=True)
    # (detach_focal_weight=True is not the derivative of the loss by design; the reference tests cover it.)
    # The whole Jacobian for per-pair losses; random projections of it (gradcheck's fast mode: a few calls
    # instead of two per input element through the interpreter) for the reduced ones.
    for gamma, reduction, fast in ((2.0, "none", False), (0.0, "mean", True), (0.05, "sum", True)):
        def fn(c, r, rc, rr):
            out = fk.focal_po_loss(c, r, labels_c, labels_r, rc, rr, beta=0.7, gamma=gamma, reduction=reduction)
            return out.loss, out.chosen_logps, out.rejected_logps
        assert torch.autograd.gradcheck(fn, (chosen, rejected, ref_c, ref_r), eps=1e-6, atol=1e-8, fast_mode=fast)


def test_gradcheck_shifted_view(device):
    vocab = 7
    base = random_logits(2, 3, vocab, torch.float64, device, scale=1.0).requires_grad_(True)
    labels = random_labels(2, 2, vocab, device, ignored_fraction=0)
    labels[1, 0] = -100
    assert torch.autograd.gradcheck(lambda x: fk.sequence_logps(x[:, :-1], labels), (base,), eps=1e-6, atol=1e-8)


def test_gradcheck_overlapping_windows(device):
    """Logits that overlap themselves (`unfold`'s sliding windows, strides (8, 1, 1)): `empty_like` gives such a
    tensor another innermost dimension, which the gradient kernel once wrote as if its rows had unit stride."""
    vocab = 6
    base = random_logits(1, 2, 8, torch.float64, device, scale=1.0)[0].requires_grad_(True)
    labels = random_labels(2, 3, vocab, device, ignored_fraction=0)
    assert torch.autograd.gradcheck(lambda x: fk.sequence_logps((x * 1).unfold(1, vocab, 1), labels), (base,),
                                    eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_output_element_is_written(device, dtype, monkeypatch):
    vocab = 1234  # not a multiple of any block size
    chosen = random_logits(3, 5, vocab, dtype, device, extra_time=2)
    rejected = random_logits(3, 4, vocab, dtype, device)
    labels_c, labels_r = random_labels(3, 5, vocab, device), random_labels(3, 4, vocab, device)
    labels_c[2] = -100
    labels_r[1, 2:] = -100
    poison_empty(monkeypatch)
    for logits, labels in (([chosen], [labels_c]), ([chosen, rejected], [labels_c, labels_r])):  # one grid, a pair
        token_logps, row_max, log_sum_exp = token_logps_and_lse(logits, labels, -100)
        for t in (token_logps, row_max, log_sum_exp):
            assert not torch.isnan(t).any()
        scales = [torch.randn(3, 1, dtype=row_max.dtype, device=device).expand(part.shape) for part in labels]
        grads = logits_grad(logits, labels, row_max, log_sum_exp, scales, -100)
        assert len(grads) == len(logits)
        assert not any(torch.isnan(grad).any() for grad in grads)
        assert torch.equal(grads[0][2], torch.zeros_like(grads[0][2]))
    assert torch.equal(grads[1][1, 2:], torch.zeros_like(grads[1][1, 2:]))
    from focal_kernels.kernels.segment_sum import segment_sum
    offsets = torch.tensor([0, 0, 3, 4, 4, 7], device=device)  # empty segments included
    (sums,) = segment_sum(torch.randn(7, device=device), offsets)
    assert sums.shape == (5,) and not torch.isnan(sums).any() and sums[0] == 0 and sums[3] == 0
    first, second = segment_sum(torch.randn(3 * 2 + 2 * 0, device=device), None, [3, 2], [2, 0])
    assert first.shape == (3,) and second.shape == (2,) and not torch.isnan(first).any()
    assert torch.equal(second, torch.zeros_like(second))  # empty sequences
    out, = torch.autograd.grad(fk.focal_po_loss(chosen.requires_grad_(True), rejected, labels_c, labels_r).loss,
                               [chosen])
    assert not torch.isnan(out).any()


def test_vocabulary_split_backward_matches_unsplit(device, monkeypatch):
    """Few rows split the vocabulary over programs; the result must not depend on the split."""
    from focal_kernels.kernels import config

    vocab = 20001
    logits = random_logits(1, 2, vocab, torch.float32, device).requires_grad_(True)
    labels = random_labels(1, 2, vocab, device, ignored_fraction=0.0)
    block_v, _, blocks_per_program = config.gradient_config(2, vocab, 4)
    assert blocks_per_program * block_v < vocab, "the default configuration should split this row"
    (split,) = torch.autograd.grad(fk.sequence_logps(logits, labels).sum(), [logits])
    monkeypatch.setattr(config, "_MIN_PROGRAMS", 1)
    block_v, _, blocks_per_program = config.gradient_config(2, vocab, 4)
    assert blocks_per_program * block_v >= vocab
    (unsplit,) = torch.autograd.grad(fk.sequence_logps(logits, labels).sum(), [logits])
    assert torch.equal(split, unsplit)


def test_bitwise_deterministic(device):
    vocab = 3000
    chosen, rejected = random_logits(4, 6, vocab, torch.bfloat16, device), random_logits(4, 5, vocab, torch.bfloat16,
                                                                                          device)
    labels_c, labels_r = random_labels(4, 6, vocab, device), random_labels(4, 5, vocab, device)
    results = []
    for _ in range(2):
        c, r = chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)
        out = fk.focal_po_loss(c, r, labels_c, labels_r, gamma=2.0)
        grads = torch.autograd.grad(out.loss, [c, r])
        results.append((out.loss, out.chosen_logps, out.rejected_logps, *grads))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_no_logits_sized_tensor_saved_for_backward(device):
    """Only the caller's logits themselves may be saved at full size: no copy, no probabilities."""
    batch, seq_len, vocab = 2, 8, 3001
    chosen = random_logits(batch, seq_len, vocab, torch.bfloat16, device, extra_time=1).requires_grad_(False)
    chosen_leaf = chosen.detach().requires_grad_(True)
    rejected = random_logits(batch, seq_len, vocab, torch.bfloat16, device).requires_grad_(True)
    labels_c, labels_r = random_labels(batch, seq_len, vocab, device), random_labels(batch, seq_len, vocab, device)
    logits_size = batch * seq_len * vocab
    input_storages = {chosen_leaf.untyped_storage().data_ptr(), rejected.untyped_storage().data_ptr()}
    saved = []

    def pack(t):
        saved.append((t.numel(), t.untyped_storage().data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fk.focal_po_loss(chosen_leaf, rejected, labels_c, labels_r)
    assert saved, "nothing was saved: the hook did not see the Function"
    for numel, storage in saved:
        assert numel < logits_size or storage in input_storages, f"a tensor of {numel} elements was saved"
    assert sum(n for n, s in saved if s not in input_storages) <= 16 * batch * seq_len
    out.loss.backward()


def _saved_copies_cases(device):
    batch, seq_len, vocab, hidden_size = 2, 5, 37, 8
    labels = random_labels(batch, seq_len, vocab, device)
    flipped = labels.flip(0)
    packed_labels, cu_seqlens = labels.reshape(1, -1), torch.tensor([0, 3, 10], device=device, dtype=torch.int32)
    logits = lambda *shape: random_logits(*shape, vocab, torch.float32, device)  # noqa: E731
    hidden = torch.randn(batch, seq_len, hidden_size, device=device)
    weight = torch.randn(vocab, hidden_size, device=device)
    refs = torch.zeros(batch, device=device), torch.zeros(batch, device=device)
    return {
        "sequence_logps": (lambda x: fk.sequence_logps(x, labels), [logits(batch, seq_len)]),
        # (in-place: logits an op made, as from the lm_head, not a leaf)
        "sequence_logps inplace": (lambda x: fk.sequence_logps(x * 1, labels, inplace_backward=True),
                                   [logits(batch, seq_len)]),
        "sequence_logps packed": (lambda x: fk.sequence_logps(x, packed_labels, cu_seqlens=cu_seqlens),
                                  [logits(1, batch * seq_len)]),
        "focal_po_loss inplace": (lambda c, r: fk.focal_po_loss(c * 1, r * 1, labels, flipped, *refs, reduction="none",
                                                                inplace_backward=True).loss,
                                  [logits(batch, seq_len), logits(batch, seq_len)]),
        "hidden, trainable head": (lambda h, w: fk.fused_linear_token_logps(h, w, labels, stats=("entropy",)).log_probs,
                                   [hidden, weight]),
        "hidden, frozen head": (lambda h: fk.fused_linear_token_logps(h, weight, labels).log_probs, [hidden]),
        "hidden, memory budget": (lambda h, w: fk.fused_linear_token_logps(h, w, labels, chunk_size=16,
                                                                           memory_budget=1 << 20).log_probs,
                                  [hidden, weight]),
        "hidden, packed": (lambda h, w: fk.fused_linear_sequence_logps(h, w, packed_labels, cu_seqlens=cu_seqlens),
                           [hidden.reshape(1, batch * seq_len, -1), weight]),
    }


@pytest.mark.parametrize("case", list(_saved_copies_cases("cpu")))
def test_saved_tensors_may_come_back_as_copies(device, case):
    """Activation offloading (TRL's `activation_offloading`, `torch.autograd.graph.save_on_cpu`) hands the
    backward copies of what the forward saved. Here each original is poisoned as its copy is handed back: a
    backward that read a tensor from anywhere else (kept on `ctx`, say) would read NaN. The log-probs and
    gradients are those of a run without hooks."""
    fn, inputs = _saved_copies_cases(device)[case]

    def unpack(saved):
        original, copy = saved
        if original.is_floating_point():
            with torch.no_grad():
                original.fill_(float("nan"))
        return copy

    def run(offloaded):
        leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
        hooks = ((lambda t: (t.detach(), t.detach().clone()), unpack) if offloaded
                 else (lambda t: t, lambda t: t))
        with torch.autograd.graph.saved_tensors_hooks(*hooks):
            out = fn(*leaves)
        values = out.detach().clone()
        out.backward(torch.linspace(-1, 1, out.numel(), device=device).reshape(out.shape))
        return values, [leaf.grad for leaf in leaves]

    expected, expected_grads = run(False)
    out, grads = run(True)  # second: it poisons what it saved, a frozen head's weight (not a copied leaf) among it
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [37, 48, 16, 5])
def test_forward_main_loop_and_tail(device, monkeypatch, dtype, vocab):
    """Blocks of 16 columns: several unmasked full blocks then a masked tail (37), full blocks only (48), one
    full block (16), a tail only (5); large and -inf logits among them. Matches the reference (on a GPU with
    the kernels compiled for these blocks)."""
    from focal_kernels.kernels import config

    monkeypatch.setattr(config, "_FORWARD_BLOCK_BYTES", 16 * 4)
    monkeypatch.setattr(config, "_HALF_FORWARD_BLOCK_BYTES", 16 * 2)
    assert config.reduction_config(vocab, torch.tensor([], dtype=dtype).element_size())[0] == min(
        16, 1 << (vocab - 1).bit_length())
    logits = random_logits(3, 4, vocab, dtype, device)
    logits[0, 0, vocab // 2] = 3e4   # one lane far above the others
    logits[1, 1, : vocab // 3] = float("-inf")  # whole lanes at -inf
    labels = random_labels(3, 4, vocab, device)
    labels[1, 1] = vocab - 1
    leaf = logits.clone().requires_grad_(True)
    logps = fk.sequence_logps(leaf, labels)
    (grad,) = torch.autograd.grad(logps.sum(), [leaf])
    dense = logits.double().requires_grad_(True)
    expected = fk.reference.sequence_logps(dense, labels)
    (expected_grad,) = torch.autograd.grad(expected.sum(), [dense])
    torch.testing.assert_close(logps.double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1.6e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "causal view", "vocabulary slice", "unaligned base"])
@pytest.mark.parametrize("vocab", [3, 13, 32, 37, 40, 70])
def test_rows_off_16_byte_boundaries(device, monkeypatch, dtype, layout, vocab):
    """Rows that start off 16-byte boundaries are peeled (kernels/row_alignment.py): an unaligned head, an
    aligned body of full blocks and a masked one, an unaligned end; the backward's vocabulary split over
    programs too. Blocks of 16 columns; every element of the gradient written; matches the reference. On a
    GPU the kernels compile with these blocks (a wrong alignment hint would fault there); in the interpreter
    every offset declared aligned is checked."""
    from focal_kernels.kernels import config, logits_grad as grad_module, row_alignment, token_logps

    for name in ("_FORWARD_BLOCK_BYTES", "_HALF_FORWARD_BLOCK_BYTES", "_BACKWARD_BLOCK_BYTES"):
        monkeypatch.setattr(config, name, 16 * torch.tensor([], dtype=dtype).element_size())
    monkeypatch.setattr(config, "_MIN_PROGRAMS", 10**6)  # split every row's vocabulary as far as it goes
    peeled = []

    def needs_peel(grids, block):
        peeled.append(row_alignment.needs_peel(grids, block))
        return peeled[-1]

    monkeypatch.setattr(token_logps, "needs_peel", needs_peel)
    monkeypatch.setattr(grad_module, "needs_peel", needs_peel)
    # Every offset the kernels declare a multiple of ALIGN must be one, masked-off accesses included (the
    # interpreter ignores the hint; a GPU would trust it). The interpreter calls this plain function in place
    # of the helper, with its tensors (numpy-backed handles) and constexprs.
    hints = []

    def aligned_sum(a, b, ALIGN, ALIGNED):
        total = a + b
        if getattr(ALIGNED, "value", ALIGNED):
            values = np.asarray(total.handle.data)
            hints.append(values.size)
            assert (values % getattr(ALIGN, "value", ALIGN) == 0).all(), (values, ALIGN)
        return total

    if device == "cpu":
        monkeypatch.setattr(token_logps, "aligned_sum", aligned_sum)
        monkeypatch.setattr(grad_module, "aligned_sum", aligned_sum)
    poison_empty(monkeypatch)
    wide = vocab + 5 if layout == "vocabulary slice" else vocab
    select = {"contiguous": lambda x: x, "causal view": lambda x: x[:, :4], "unaligned base": lambda x: x[:, 1:],
              "vocabulary slice": lambda x: x[:, :4, :vocab]}[layout]
    base = random_logits(3, 5, wide, dtype, device)
    if layout == "contiguous":
        base = base[:, :4].contiguous()
    select(base)[0, 0, vocab // 2] = 3e4  # one column far above the others
    labels = random_labels(3, 4, vocab, device)
    labels[1, 1], labels[1, 2], labels[2, 0] = 0, vocab - 1, -100  # the first and last columns: head and end
    leaf = base.clone().requires_grad_(True)
    logps = fk.sequence_logps(select(leaf), labels)
    (grad,) = torch.autograd.grad(logps.sum(), [leaf])
    dense = select(base).double().requires_grad_(True)
    expected = fk.reference.sequence_logps(dense, labels)
    (expected_grad,) = torch.autograd.grad(expected.sum(), [dense])
    torch.testing.assert_close(logps.double(), expected, rtol=1e-6, atol=1e-4)
    grad_tol = {torch.bfloat16: 1.6e-2, torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    torch.testing.assert_close(select(grad).double(), expected_grad, rtol=grad_tol, atol=1e-5)
    # Strides the compiler cannot see are multiples of 16 peel, forward and backward (V = 40 in bfloat16 too:
    # its rows are aligned, but only the peeled kernel can say so). A base off a 16-byte boundary cannot be
    # helped and is left alone, nor can blocks narrower than 16 bytes (V = 3 in bfloat16: 4 columns a block).
    align, block = 16 // dtype.itemsize, min(1 << (vocab - 1).bit_length(), 16)
    aligned_base = layout != "unaligned base" or vocab * dtype.itemsize % 16 == 0
    assert peeled == [wide % 16 != 0 and aligned_base and block % align == 0] * 2
    assert bool(hints) == (peeled[0] and device == "cpu")


def test_no_tensor_is_made_on_the_default_device(path):
    """Every tensor the library makes goes on its inputs' device (or the host, for host-side bookkeeping),
    never on torch's default device: with `torch.set_default_device("meta")` (as a user's "cuda" would be)
    each entry point still runs on CPU inputs, forward and backward (before: the interpreter's probe, the
    compiled in-place path's recorded storage places and the overlap check's row offsets took the default
    device)."""
    from focal_kernels.logprobs import ops

    vocab = 37
    logits = torch.randn(2, 5, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (2, 5))
    labels[0, :2] = -100
    hidden, weight = torch.randn(2, 5, 8, requires_grad=True), torch.randn(vocab, 8, requires_grad=True)
    base = torch.randn(4, 5, vocab, requires_grad=True)
    counts = torch.ones(2)
    calls = {
        "padded": lambda: fk.sequence_logps(logits, labels).sum(),
        "packed": lambda: fk.sequence_logps(logits.reshape(10, vocab), labels.reshape(10),
                                            cu_seqlens=torch.tensor([0, 4, 10], device="cpu")).sum(),
        "pair": lambda: fk.focal_po_loss(logits, logits * 2.0, labels, labels, gamma=0.3).loss,
        "in place": lambda: fk.focal_po_loss(*(base * 1.0).split(2), labels, labels, inplace_backward=True).loss,
        "hidden": lambda: fk.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=16).sum(),
        "frozen": lambda: fk.fused_linear_sequence_logps(hidden, weight.detach(), labels, chunk_size=16).sum(),
        "budget": lambda: fk.fused_linear_sequence_logps(hidden, weight, labels, memory_budget=1 << 20).sum(),
        "statistics": lambda: fk.fused_linear_token_logps(hidden, weight, labels, stats=ops.STATS).log_probs.sum(),
        "hidden pair": lambda: fk.fused_linear_focal_po_loss(hidden, hidden * 2.0, weight, labels, labels).loss,
        "losses": lambda: fk.preference_loss(logits.sum((1, 2)), logits.sum((1, 2)) / 2, loss_type=["ipo", "focal"],
                                             chosen_token_counts=counts, rejected_token_counts=counts).loss,
    }
    with torch.device("meta"):
        for name, call in calls.items():
            out = call()
            assert out.device.type == "cpu", name
            out.backward()
        assert ops._storage_places([logits]).device.type == "cpu"
