"""torch.compile(fullgraph=True) over the log-prob primitive and a preference loss: one graph, eager results,
no recompilation when only label values / the mask change; both the kernels (interpreted) and the PyTorch
path. Plus gradients w.r.t. the returned log-probs and the late-TRITON_INTERPRET error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import partial

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
from conftest import DEVICE
from helpers import assert_close

import focal_kernels as fk

IGNORE = -100
VOCAB = 37
HIDDEN = 8


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch (its frame counts are its own) and leaves no cache behind. On a GPU the
    tests' tensors are made there (the default device), so the compiled Triton kernels are what is traced."""
    torch._dynamo.reset()
    if DEVICE != "cpu":
        torch.set_default_device(DEVICE)
    yield
    if DEVICE != "cpu":
        torch.set_default_device(None)
    torch._dynamo.reset()


def masks(shape):
    """Label masks of one shape: nothing ignored, a prompt, a random pattern, a fully ignored sequence."""
    none = torch.zeros(shape, dtype=torch.bool)
    prompt = none.clone()
    prompt[:, :2] = True
    scattered = torch.rand(shape) < 0.4
    whole = scattered.clone()
    whole[0] = True
    return [none, prompt, scattered, whole]


def logits_step(logits, labels, ref_c, ref_r):
    logps, counts = fk.sequence_logps(logits, labels, return_token_counts=True)
    out = fk.preference_loss(logps[0::2], logps[1::2], ref_c, ref_r, loss_type=["focal", "ipo"], beta=0.1,
                             gamma=0.5, chosen_token_counts=counts[0::2].clamp(min=1),
                             rejected_token_counts=counts[1::2].clamp(min=1))
    return out.loss, logps, counts


def test_compiled_logits_step_matches_eager_without_recompiling(path):
    batch, seq_len = 4, 6
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(logits_step, fullgraph=True, backend=counter)
    values = torch.randn(batch, seq_len, VOCAB, dtype=torch.float64) * 3
    ref_c, ref_r = -torch.rand(2) * 10, -torch.rand(2) * 10
    for mask in masks((batch, seq_len)):
        labels = torch.randint(0, VOCAB, (batch, seq_len))
        labels[mask] = IGNORE
        results = []
        for fn in (compiled, logits_step):
            logits = values.float().requires_grad_(True)
            loss, logps, counts = fn(logits, labels, ref_c, ref_r)
            (grad,) = torch.autograd.grad(loss + 0.01 * logps.sum(), [logits])
            results.append((loss, logps, counts, grad))
        (loss, logps, counts, grad), (e_loss, e_logps, e_counts, e_grad) = results
        assert torch.equal(counts, e_counts) and counts.dtype == torch.int64
        assert counts.tolist() == (labels != IGNORE).sum(1).tolist()
        assert_close(loss, e_loss, (1e-6, 1e-6), "loss")
        assert_close(logps, e_logps, (1e-6, 1e-6), "logps")
        assert_close(grad, e_grad, (1e-6, 1e-7), "grad")
        assert (grad[labels == IGNORE] == 0).all()
        # And the reference, in float64.
        expected = fk.reference.sequence_logps(values, labels)
        assert_close(logps, expected, (2e-5, 2e-5), "logps vs reference")
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for one shape"


def linear_step(hidden, weight, labels, cu_seqlens):
    logps, counts = fk.fused_linear_sequence_logps(hidden, weight, labels, cu_seqlens=cu_seqlens, chunk_size=16,
                                                   return_token_counts=True, logit_softcap=5.0)
    out = fk.preference_loss(logps[0::2], logps[1::2], loss_type="focal", beta=0.2, gamma=0.3)
    return out.loss, logps, counts


def test_compiled_packed_linear_step_matches_eager_without_recompiling(path):
    tokens = 14
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(linear_step, fullgraph=True, backend=counter)
    hidden_values = torch.randn(tokens, HIDDEN, dtype=torch.float64)
    weight_values = torch.randn(VOCAB, HIDDEN, dtype=torch.float64)
    cus = [torch.tensor([0, 3, 7, 7, 14]), torch.tensor([0, 5, 6, 10, 14]), torch.tensor([0, 1, 2, 3, 14])]
    for cu, mask in zip(cus + cus[:1], masks((1, tokens))):
        labels = torch.randint(0, VOCAB, (tokens,))
        labels[mask[0]] = IGNORE
        results = []
        for fn in (compiled, linear_step):
            hidden, weight = hidden_values.float().requires_grad_(True), weight_values.float().requires_grad_(True)
            loss, logps, counts = fn(hidden, weight, labels, cu)
            grads = torch.autograd.grad(loss + 0.01 * logps.sum(), [hidden, weight])
            results.append((loss, logps, counts, *grads))
        (loss, logps, counts, g_h, g_w), (e_loss, e_logps, e_counts, e_h, e_w) = results
        assert torch.equal(counts, e_counts)
        assert_close(loss, e_loss, (1e-5, 1e-6), "loss")
        assert_close(logps, e_logps, (1e-5, 1e-5), "logps")
        assert_close(g_h, e_h, (1e-5, 1e-6), "grad hidden")
        assert_close(g_w, e_w, (1e-5, 1e-6), "grad weight")
        expected = fk.reference.sequence_logps(fk.reference.linear_logits(hidden_values, weight_values,
                                                                          logit_softcap=5.0), labels, IGNORE, cu)
        assert_close(logps, expected, (2e-5, 2e-5), "logps vs reference")
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames for one shape"


def test_one_tensor_passed_for_both_sides_compiles_fullgraph():
    """The same labels (or logits, or hidden states) for chosen and rejected: dynamo refused the autograd
    function that takes both sides ("duplicate tensor input"), so fullgraph=True raised; now it matches eager
    mode, gradients included (they accumulate into the one leaf from both sides)."""
    batch, seq_len = 2, 4
    labels = torch.randint(0, VOCAB, (batch, seq_len))
    labels[0, 0] = IGNORE
    logits, other = torch.randn(batch, seq_len, VOCAB), torch.randn(batch, seq_len, VOCAB)
    hidden, weight = torch.randn(batch, seq_len, HIDDEN), torch.randn(VOCAB, HIDDEN)
    cases = {
        "same labels": (fk.focal_po_loss, lambda x, y: (x, y, labels, labels), [logits, other]),
        "same logits": (fk.focal_po_loss, lambda x: (x, x, labels, labels.clone()), [logits]),
        "same labels, hidden": (fk.fused_linear_focal_po_loss, lambda h, w: (h, h * 2, w, labels, labels),
                                [hidden, weight]),
        "same hidden": (fk.fused_linear_focal_po_loss, lambda h, w: (h, h, w, labels, labels.clone()),
                        [hidden, weight]),
    }
    for name, (loss_fn, arguments, leaves) in cases.items():
        def step(*tensors):
            return loss_fn(*arguments(*tensors), beta=0.5).loss

        torch._dynamo.reset()
        eager_leaves = [t.clone().requires_grad_(True) for t in leaves]
        compiled_leaves = [t.clone().requires_grad_(True) for t in leaves]
        expected = step(*eager_leaves)
        got = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled_leaves)
        assert_close(got, expected, (1e-6, 1e-6), name)
        for g, e in zip(torch.autograd.grad(got, compiled_leaves), torch.autograd.grad(expected, eager_leaves)):
            assert_close(g, e, (1e-6, 1e-6), f"{name} gradient")


def test_grad_of_loss_with_respect_to_returned_logps():
    """out.chosen_logps is the tensor the loss was computed from: autograd.grad(loss, it) works and equals the
    pair loss's own derivative."""
    batch, seq_len = 3, 4
    chosen = torch.randn(batch, seq_len, VOCAB) * 2
    rejected = torch.randn(batch, seq_len + 1, VOCAB) * 2
    labels_c = torch.randint(0, VOCAB, (batch, seq_len))
    labels_r = torch.randint(0, VOCAB, (batch, seq_len + 1))
    labels_c[0, :2] = IGNORE
    hidden_c, hidden_r = torch.randn(batch, seq_len, HIDDEN), torch.randn(batch, seq_len + 1, HIDDEN)
    weight = torch.randn(VOCAB, HIDDEN, requires_grad=True)
    options = dict(beta=0.3, gamma=0.5)
    outs = [fk.focal_po_loss(chosen.requires_grad_(True), rejected.requires_grad_(True), labels_c, labels_r,
                             **options),
            fk.fused_linear_focal_po_loss(hidden_c.requires_grad_(True), hidden_r.requires_grad_(True), weight,
                                          labels_c, labels_r, **options)]
    for out in outs:
        grad_c, grad_r = torch.autograd.grad(out.loss, [out.chosen_logps, out.rejected_logps])
        c = out.chosen_logps.detach().requires_grad_(True)
        r = out.rejected_logps.detach().requires_grad_(True)
        expected = fk.preference_loss(c, r, loss_type="focal", **options)
        assert_close(expected.loss, out.loss, (1e-6, 1e-6), "loss from logps")
        e_c, e_r = torch.autograd.grad(expected.loss, [c, r])
        assert grad_c.abs().max() > 0
        assert_close(grad_c, e_c, (1e-5, 1e-7), "d loss / d chosen_logps")
        assert_close(grad_r, e_r, (1e-5, 1e-7), "d loss / d rejected_logps")


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter check concerns CPU tensors")
def test_importing_does_not_import_triton_or_dynamo():
    """TRITON_INTERPRET=1 may be set after `import focal_kernels` (backend.py; the self-check does): importing
    every module must not import triton, nor torch._dynamo, which imports it (a torch.compiler.disable
    decorator at import time did)."""
    script = textwrap.dedent("""
        import sys
        import focal_kernels, focal_kernels.fused_losses, focal_kernels.logprobs.parallel, focal_kernels.logprobs.ops
        print(sorted(name for name in ("triton", "torch._dynamo") if name in sys.modules))
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", result.stdout


def test_late_triton_interpret_raises_a_clear_error():
    script = textwrap.dedent("""
        import os
        import triton  # imported without the interpreter
        os.environ["TRITON_INTERPRET"] = "1"
        import torch
        import focal_kernels as fk
        try:
            fk.sequence_logps(torch.randn(1, 3, 11), torch.zeros(1, 3, dtype=torch.int64))
        except RuntimeError as error:
            print("RAISED:", error)
        else:
            print("NO ERROR")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RAISED:" in result.stdout, result.stdout + result.stderr[-3000:]
    assert "TRITON_INTERPRET=1" in result.stdout and "after triton" in result.stdout, result.stdout


@pytest.mark.parametrize("primitive", ["logits", "hidden"])
def test_compiled_reference_logps_under_no_grad(path, primitive):
    """The reference model's log-probs: compiled, under torch.no_grad(), padded and packed, nothing requiring
    grad. Must trace as one graph and give eager's values."""
    tokens = 10
    cu = torch.tensor([0, 4, 4, 10])
    labels = torch.randint(0, VOCAB, (tokens,))
    labels[:2] = IGNORE
    if primitive == "logits":
        args = (torch.randn(tokens, VOCAB),)

        def fn(x, lab, cu_seqlens):
            packed = fk.sequence_logps(x, lab, cu_seqlens=cu_seqlens)
            padded = fk.sequence_logps(x.view(2, 5, VOCAB), lab.view(2, 5))
            return packed, padded
    else:
        args = (torch.randn(tokens, HIDDEN), torch.randn(VOCAB, HIDDEN))

        def fn(h, w, lab, cu_seqlens):
            packed = fk.fused_linear_sequence_logps(h, w, lab, cu_seqlens=cu_seqlens, chunk_size=16)
            padded = fk.fused_linear_sequence_logps(h.view(2, 5, HIDDEN), w, lab.view(2, 5), chunk_size=16)
            return packed, padded
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    with torch.no_grad():
        eager = fn(*args, labels, cu)
        got = compiled(*args, labels, cu)
        labels[5] = IGNORE
        again = compiled(*args, labels, cu)
        eager_again = fn(*args, labels, cu)
    for g, e in zip((*got, *again), (*eager, *eager_again)):
        assert_close(g, e, (1e-6, 1e-6), "compiled under no_grad")
    assert counter.frame_count == 1


def test_inductor_with_strided_inputs():
    """The default backend (inductor) plans memory from the operators' fake implementations: with logits
    whose batch stride is smaller than their time stride and a transposed lm_head weight, the compiled step
    must run and match eager (a fake whose strides differ from the kernel's output fails here)."""
    torch._dynamo.reset()

    def step(chosen, rejected, chosen_labels, rejected_labels, hidden, weight, labels, cu_seqlens):
        c, nc = fk.sequence_logps(chosen, chosen_labels, return_token_counts=True)
        r, nr = fk.sequence_logps(rejected, rejected_labels, return_token_counts=True)
        packed = fk.fused_linear_sequence_logps(hidden, weight, labels, cu_seqlens=cu_seqlens, logit_softcap=3.0)
        return fk.preference_loss(c, r, loss_type=["focal", "ipo"], chosen_token_counts=nc,
                                  rejected_token_counts=nr).loss + packed.sum()

    chosen_base = torch.randn(5, 2, 11, requires_grad=True)
    chosen = chosen_base.transpose(0, 1)  # a view: its gradient goes on through the transpose
    rejected = torch.randn(2, 5, 11, requires_grad=True)
    chosen_labels, rejected_labels = torch.randint(0, 11, (2, 5)), torch.randint(0, 11, (2, 5))
    chosen_labels[0, :2] = -100
    hidden = torch.randn(10, 4, requires_grad=True)
    weight = torch.randn(4, 11).t().requires_grad_(True)
    inputs = (chosen, rejected, chosen_labels, rejected_labels, hidden, weight, torch.randint(0, 11, (10,)),
              torch.tensor([0, 4, 10]))
    leaves = [chosen_base, rejected, hidden, weight]
    compiled = torch.compile(step, fullgraph=True)(*inputs)
    got = torch.autograd.grad(compiled, leaves)
    eager = step(*inputs)
    want = torch.autograd.grad(eager, leaves)
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # The log-probs' gradient straight back through the transposed view.
    base = torch.randn(5, 3, 11, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    torch.compile(lambda x, y: fk.sequence_logps(x, y).sum(), fullgraph=True)(base.transpose(0, 1), labels).backward()
    (expected,) = torch.autograd.grad(fk.sequence_logps(base.transpose(0, 1), labels).sum(), [base])
    torch.testing.assert_close(base.grad, expected)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_inplace_backward(backend):
    """inplace_backward=True compiles into one graph (the disjointness check reads no storage pointer while
    tracing) and matches eager; chosen and rejected as interleaved halves of one tensor are allowed, while
    overlapping views, which tracing cannot see, are refused by the in-place operator when it runs."""
    batch, seq_len = 2, 5
    hidden_values = torch.randn(batch, 2 * seq_len, HIDDEN)
    weight_values = torch.randn(VOCAB, HIDDEN)
    labels_c = torch.randint(0, VOCAB, (batch, seq_len))
    labels_r = torch.randint(0, VOCAB, (batch, seq_len))
    labels_c[0, :2] = IGNORE

    def pair(hidden, weight, split, inplace):
        logits = hidden @ weight.t()
        out = fk.focal_po_loss(logits[:, :seq_len], logits[:, split:split + seq_len], labels_c, labels_r,
                               gamma=0.5, inplace_backward=inplace)
        return out.loss + 0.01 * out.chosen_logps.sum()

    def single(hidden, weight, split, inplace):
        logits = hidden @ weight.t()
        return fk.sequence_logps(logits, torch.cat([labels_c, labels_r], 1), inplace_backward=inplace).sum()

    for fn in (pair, single):
        counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
        compiled = torch.compile(fn, fullgraph=True, backend=counter)
        results = []
        for call, inplace in ((compiled, True), (fn, False)):
            hidden, weight = hidden_values.clone().requires_grad_(True), weight_values.clone().requires_grad_(True)
            loss = call(hidden, weight, seq_len, inplace)
            results.append((loss, *torch.autograd.grad(loss, [hidden, weight])))
        for got, want, name in zip(*results, ("loss", "grad hidden", "grad weight")):
            assert_close(got, want, (1e-5, 1e-6), f"{fn.__name__}: {name}")
        assert counter.frame_count == 1

    torch._dynamo.reset()
    compiled = torch.compile(pair, fullgraph=True, backend=backend)
    hidden, weight = hidden_values.clone().requires_grad_(True), weight_values.clone().requires_grad_(True)
    loss = compiled(hidden, weight, seq_len - 1, True)  # the sides share one row per sequence
    with pytest.raises(ValueError, match="chosen_logits and rejected_logits that do not overlap"):
        loss.backward()


@pytest.mark.parametrize("fullgraph", [True, False])
def test_compiled_inplace_backward_never_overwrites_a_leaf_through_a_view(fullgraph):
    """inplace_backward=True under torch.compile, with views: a view of a leaf taken inside the compiled function
    is refused as in eager mode (a check that skipped the base while tracing let it through, and the leaf's
    values became its gradient); a view passed into the compiled function fails to compile (aot_autograd cannot
    read its base); the same view taken inside, from the tensor passed in, compiles and matches eager. The
    tensors passed in are never changed."""
    labels = torch.randint(0, VOCAB, (2, 4))
    labels[1, :2] = IGNORE

    def inside(logits, inplace):
        return fk.sequence_logps(logits[:, :-1], labels, inplace_backward=inplace).sum()

    def passed(logits, inplace):
        return fk.sequence_logps(logits, labels, inplace_backward=inplace).sum()

    def compiled(fn):
        torch._dynamo.reset()
        return torch.compile(fn, fullgraph=fullgraph, backend="aot_eager")

    values = torch.randn(2, 5, VOCAB)
    for fn, make in ((inside, lambda leaf: leaf), (passed, lambda leaf: leaf[:, :-1])):
        leaf = values.clone().requires_grad_(True)
        with pytest.raises(Exception) as raised:
            compiled(fn)(make(leaf), True).backward()
        assert "would overwrite logits, a leaf tensor" in str(raised.value), raised.value
        assert torch.equal(leaf.detach(), values), f"{fn.__name__}: the leaf was overwritten"
    # a view of a non-leaf passed in: never refused as a leaf; it fails to compile (PyTorch 2.10-2.14), or,
    # should a later PyTorch compile it, gives eager's gradient
    leaf = values.clone().requires_grad_(True)
    try:
        got = torch.autograd.grad(compiled(passed)((leaf * 2)[:, :-1], True), leaf)[0]
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        assert "would overwrite" not in str(exc), exc
    else:
        eager_leaf = values.clone().requires_grad_(True)
        want = torch.autograd.grad(passed((eager_leaf * 2)[:, :-1], False), eager_leaf)[0]
        assert_close(got, want, (1e-5, 1e-6), "gradient through a view passed in")
    assert torch.equal(leaf.detach(), values), "the leaf was overwritten"

    grads = []
    for call, inplace in ((compiled(inside), True), (inside, False)):
        leaf = values.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(call(leaf * 2, inplace), leaf)[0])
    assert_close(grads[0], grads[1], (1e-5, 1e-6), "gradient through a view taken inside")


def assert_compiled_matches_eager(fn, compiled, inputs, **tolerance):
    """compiled's output and the gradients of its sum w.r.t. the floating inputs (fresh leaves) equal fn's."""
    results = []
    for f in (fn, compiled):
        leaves = [x.detach().clone().requires_grad_(True) if x.dtype.is_floating_point else x for x in inputs]
        out = f(*leaves)
        results.append((out, *torch.autograd.grad(out.sum(), [x for x in leaves if x.requires_grad])))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("dynamic", [None, True])
def test_compiled_inplace_backward_with_changing_shapes(path, dynamic):
    """inplace_backward=True with symbolic sizes (before: the overlap check sorted SymInts, which dynamo
    cannot trace, so the second shape failed under fullgraph=True); overlapping logits are still refused
    by the kernels' in-place operator when the graph runs (the plain-PyTorch path ignores the flag)."""
    def pair(hidden, weight, chosen_labels, rejected_labels, inplace):
        logits = hidden @ weight.t()
        seq_len = chosen_labels.shape[1]
        return fk.focal_po_loss(logits[:, :seq_len], logits[:, seq_len:], chosen_labels, rejected_labels,
                                gamma=0.5, inplace_backward=inplace).loss

    compiled = torch.compile(partial(pair, inplace=True), fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for batch, seq_len in ((2, 5), (3, 5), (4, 6), (5, 7)):
        labels = [torch.randint(0, VOCAB, (batch, seq_len)) for _ in range(2)]
        labels[0][0, :2] = IGNORE
        inputs = [torch.randn(batch, 2 * seq_len, HIDDEN), torch.randn(VOCAB, HIDDEN), *labels]
        assert_compiled_matches_eager(partial(pair, inplace=False), compiled, inputs, rtol=1e-5, atol=1e-6)

    def expanded(hidden, weight, labels):
        logits = (hidden @ weight.t())[:, :1].expand(-1, labels.shape[1], -1)  # every token one row
        return fk.sequence_logps(logits, labels, inplace_backward=True).sum()

    if path == "torch":
        return
    compiled = torch.compile(expanded, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for batch, seq_len in ((2, 5), (3, 6)):
        hidden = torch.randn(batch, seq_len, HIDDEN, requires_grad=True)
        labels = torch.randint(0, VOCAB, (batch, seq_len))
        with pytest.raises(ValueError, match="do not overlap in memory"):
            compiled(hidden, torch.randn(VOCAB, HIDDEN), labels).backward()


@pytest.mark.parametrize("dynamic", [None, True])
def test_inductor_inplace_backward_at_a_symbolic_offset(dynamic):
    """inplace_backward=True under inductor with logits at a storage offset that depends on a changing size
    (the second half of a batch): inductor passes such a mutated view at offset 0 (seen with torch 2.11, 2.13
    and 2.14.1), which overwrote the first half's rows (gradients off by ~10) and made chosen and rejected
    halves "overlap"; the operator now writes where the forward read, and matches a float64 reference."""
    batch = 2

    def second_half(base, labels):
        logits = base * 2.0
        return fk.sequence_logps(logits[batch:, :-1], labels, inplace_backward=True).sum()

    def halves(base, labels):
        logits = base * 2.0
        return fk.focal_po_loss(logits[:batch, :-1], logits[batch:, :-1], labels[:batch], labels[batch:],
                                gamma=0.5, inplace_backward=True).loss

    def reference(fn, base, labels):  # the same step in float64 through the spec
        base = base.double().requires_grad_(True)
        if fn is second_half:
            loss = fk.reference.sequence_logps((base * 2.0)[batch:, :-1], labels).sum()
        else:
            logits = base * 2.0
            loss = fk.reference.focal_po_loss(logits[:batch, :-1], logits[batch:, :-1], labels[:batch],
                                              labels[batch:], gamma=0.5).loss
        (grad,) = torch.autograd.grad(loss, [base])
        return grad

    for fn in (second_half, halves):
        torch._dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
        for seq_len in (5, 6, 7):
            base = torch.randn(2 * batch, seq_len + 1, VOCAB)
            labels = torch.randint(0, VOCAB, (2 * batch if fn is halves else batch, seq_len))
            leaf = base.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(compiled(leaf, labels), [leaf])
            assert_close(grad, reference(fn, base, labels), (1e-5, 1e-6), f"{fn.__name__}, T = {seq_len}")


def test_inductor_inplace_backward_is_never_silently_wrong():
    """Two more layouts inductor mishandles with sizes that change between calls (torch 2.13): interleaved views
    (logits[0::2, :-1], logits[1::2, :-1]) reach the in-place operator in a copy at offset 0, which it refuses
    (RuntimeError), and packed (N, V) logits fail inside inductor's own pass. Each call either raises or
    matches the float64 reference: never a wrong gradient."""
    def interleaved(base, labels, cu_seqlens):
        logits = base * 2.0
        return fk.focal_po_loss(logits[0::2, :-1], logits[1::2, :-1], labels[0::2], labels[1::2],
                                inplace_backward=True).loss

    def packed(base, labels, cu_seqlens):
        return fk.sequence_logps(base[0] * 2.0, labels[0], cu_seqlens=cu_seqlens, inplace_backward=True).sum()

    def reference(fn, base, labels, cu_seqlens):
        base = base.double().requires_grad_(True)
        if fn is interleaved:
            logits = base * 2.0
            loss = fk.reference.focal_po_loss(logits[0::2, :-1], logits[1::2, :-1], labels[0::2],
                                              labels[1::2]).loss
        else:
            loss = fk.reference.sequence_logps(base[0] * 2.0, labels[0], cu_seqlens=cu_seqlens).sum()
        (grad,) = torch.autograd.grad(loss, [base])
        return grad

    for fn in (interleaved, packed):
        torch._dynamo.reset()
        compiled = torch.compile(fn)
        for seq_len in (5, 6, 7):
            base = torch.randn(4 if fn is interleaved else 1, seq_len + (fn is interleaved), VOCAB)
            labels = torch.randint(0, VOCAB, (4 if fn is interleaved else 1, seq_len))
            cu_seqlens = torch.tensor([0, 2, seq_len])
            leaf = base.clone().requires_grad_(True)
            try:
                (grad,) = torch.autograd.grad(compiled(leaf, labels, cu_seqlens), [leaf])
            except Exception:  # noqa: BLE001 (refused, or inductor's own failure: loud either way)
                if seq_len == 5:  # the first call (static sizes) must work: only the changed sizes may fail
                    raise
                continue
            expected = reference(fn, base, labels, cu_seqlens)
            assert_close(grad, expected, (1e-5, 1e-6), f"{fn.__name__}, T = {seq_len}")


def test_logits_path_with_changing_shapes(path):
    """Padded (B, T) and packed N that change between calls (default dynamic: recompiled with symbolic
    sizes): before, the per-sequence sum kept its sizes on ctx, and the second recompilation's backward failed
    ("does not belong to this Graph")."""
    def padded(x, y):
        return fk.sequence_logps(x, y)

    def packed(x, y, cu):
        return fk.sequence_logps(x, y, cu_seqlens=cu)

    for fn, shapes in ((padded, [(2, 5), (3, 5), (4, 6)]), (packed, [6, 8, 7])):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        for shape in shapes:
            if fn is padded:
                inputs = [torch.randn(*shape, VOCAB), torch.randint(0, VOCAB, shape)]
            else:
                inputs = [torch.randn(shape, VOCAB), torch.randint(0, VOCAB, (shape,)), torch.tensor([0, 2, shape])]
            assert_compiled_matches_eager(fn, compiled, inputs)


def _fused_loss(chosen, rejected, weight, chosen_labels, rejected_labels):
    return fk.fused_linear_focal_po_loss(chosen, rejected, weight, chosen_labels, rejected_labels,
                                         chunk_size=16).loss


def _summed_token_logps(chosen, rejected, weight, chosen_labels, rejected_labels):
    """A reduction of the token log-probs: their gradient arrives expanded, strides (1, 0). The rejected side
    asks for every statistic too (summed beside the log-probs, compared with eager's)."""
    chosen = fk.fused_linear_token_logps(chosen, weight, chosen_labels, chunk_size=16).log_probs.sum(-1)
    rejected = fk.fused_linear_token_logps(rejected, weight, rejected_labels, chunk_size=16,
                                           stats=("entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    return torch.stack([chosen + rejected.log_probs.sum(-1), *(getattr(rejected, name).sum(-1).to(chosen.dtype)
                        for name in ("entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))])


def _sequence_logps(chosen, rejected, weight, chosen_labels, rejected_labels):
    return sum(fk.fused_linear_sequence_logps(hidden, weight, labels, chunk_size=16)
               for hidden, labels in ((chosen, chosen_labels), (rejected, rejected_labels)))


@pytest.mark.parametrize("path, step, dynamic", [
    ("triton", _fused_loss, None), ("torch", _fused_loss, None), ("triton", _summed_token_logps, None),
    ("triton", _sequence_logps, None), ("triton", _fused_loss, True), ("triton", _summed_token_logps, True),
    ("triton", _summed_token_logps, False)], indirect=["path"], ids=lambda x: getattr(x, "__name__", str(x)))
def test_hidden_path_with_changing_shapes(path, step, dynamic):
    """The hidden-state path over changing (B, T): every entry point with default automatic dynamic shapes
    (before: the third compilation's backward failed, dynamo taking T from the stride of an expanded incoming
    gradient; the autograd function's outputs are flat now); dynamic=True (before: math.isfinite in the option
    check could not be traced) for the loss and for the token log-probs with every statistic; dynamic=False
    (one graph per shape) for the latter. (Every pairing once took 18 cases and a fifth of the CPU suite.)
    The hidden path's operators choose kernels or PyTorch when they run, inside the graph dynamo traced (only
    the per-sequence sum is traced differently), so the PyTorch path is compiled once, for the loss."""
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for batch, seq_len in ((2, 3), (3, 3), (4, 2), (3, 5)):
        inputs = [torch.randn(batch, seq_len, HIDDEN), torch.randn(batch, seq_len + 1, HIDDEN),
                  torch.randn(VOCAB, HIDDEN), torch.randint(0, VOCAB, (batch, seq_len)),
                  torch.randint(0, VOCAB, (batch, seq_len + 1))]
        assert_compiled_matches_eager(step, compiled, inputs)


def _budgeted_step(hidden, weight, labels, bias, budget):
    logps = fk.fused_linear_sequence_logps(hidden, weight, labels, bias, chunk_size=16, logit_softcap=3.0,
                                           memory_budget=budget)
    return fk.preference_loss(logps[0::2], logps[1::2], loss_type="focal", beta=0.2, gamma=0.3).loss + \
        0.01 * logps.sum()


def _check_budgeted_step(compiled, mode):
    """compiled(_budgeted_step) over changing (B, T) against eager and the float64 reference, the lm_head
    frozen (mode "frozen") or trainable with memory_budget (a kept-chunk count that depends on the symbolic
    row count: one chunk of four, then all of them); a frozen step under no_grad too."""
    trainable = mode == "budget"
    vocab = 53  # 3 full chunks of 16, and a tail of 5
    # T changes, then B (one pair, then two: the last call has fully scored sequences too)
    for batch, seq_len, budget_chunks in ((2, 4, 1), (2, 7, 4), (4, 3, 1)):
        labels = torch.randint(0, vocab, (batch, seq_len))
        labels[0, :2] = IGNORE
        labels[-1] = IGNORE  # an all-ignored sequence
        # Under compile every token is a row (the eager path gathers the scored ones): the budget in those rows.
        budget = budget_chunks * batch * seq_len * 16 * 4 if trainable else None
        values = [torch.randn(batch, seq_len, HIDDEN, dtype=torch.float64), torch.randn(vocab, HIDDEN,
                  dtype=torch.float64), labels, torch.randn(vocab, dtype=torch.float64), budget]
        results = []
        for fn in (compiled, _budgeted_step, fk.reference):
            if fn is fk.reference:
                leaves = [values[0].clone().requires_grad_(True), values[1].clone().requires_grad_(trainable),
                          labels, values[3].clone().requires_grad_(trainable)]
                logps = fk.reference.sequence_logps(fk.reference.linear_logits(
                    leaves[0], leaves[1], leaves[3], logit_softcap=3.0), labels)
                loss = fk.reference.focal_po_pair_loss(logps[0::2], logps[1::2], beta=0.2,
                                                       gamma=0.3).mean() + 0.01 * logps.sum()
            else:
                leaves = [values[0].float().requires_grad_(True), values[1].float().requires_grad_(trainable),
                          labels, values[3].float().requires_grad_(trainable)]
                loss = fn(*leaves, budget)
            results.append((loss, *torch.autograd.grad(loss, [t for t in leaves if t.requires_grad])))
        (got, *grads), (eager, *eager_grads), (expected, *expected_grads) = results
        assert len(grads) == (3 if trainable else 1)
        assert_close(got, eager, (1e-5, 1e-6), f"{mode}: loss vs eager")
        assert_close(got, expected, (1e-5, 1e-5), f"{mode}: loss vs reference")
        for k, (g, e, x) in enumerate(zip(grads, eager_grads, expected_grads)):
            assert_close(g, e, (1e-5, 1e-6), f"{mode}: gradient {k} vs eager")
            assert_close(g, x, (1e-4, 1e-5), f"{mode}: gradient {k} vs reference")
    if mode == "frozen":
        hidden, weight = torch.randn(2, 5, HIDDEN), torch.randn(vocab, HIDDEN)
        labels = torch.randint(0, vocab, (2, 5))
        with torch.no_grad():
            got = compiled(hidden, weight, labels, None, None)
        assert_close(got, _budgeted_step(hidden, weight, labels, None, None), (1e-5, 1e-6), "no_grad")


@pytest.mark.parametrize("path, mode", [("triton", "frozen"), ("triton", "budget"), ("torch", "budget")],
                         indirect=["path"])
def test_frozen_head_and_memory_budget_with_changing_shapes(path, mode):
    """The hidden-state path's GEMM-saving modes compiled (fullgraph, automatic dynamic shapes) match eager
    and float64; a frozen head's backward graphs hold no GEMM (its gradient was accumulated in the forward),
    a budgeted one's do (the weight's gradient, and the chunks not kept). The PyTorch path once (as above: the
    operators choose it when they run)."""
    from torch._dynamo.backends.common import aot_autograd

    backward_graphs = []

    def record(gm, _inputs):
        backward_graphs.append(str(gm.graph))
        return gm

    _check_budgeted_step(torch.compile(_budgeted_step, fullgraph=True,
                                       backend=aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=record)), mode)
    gemms = ("focal_kernels.linear_backward", "aten.mm", "aten.addmm", "aten.bmm")
    assert len(backward_graphs) >= 2  # a static compilation, then dynamic ones
    assert all(any(op in g for op in gemms) == (mode == "budget") for g in backward_graphs), backward_graphs


@pytest.mark.parametrize("mode", ["frozen", "budget"])
def test_frozen_head_and_memory_budget_under_inductor(mode):
    _check_budgeted_step(torch.compile(_budgeted_step, fullgraph=True), mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_hidden_path_compiles_like_eager(dtype):
    """bfloat16 / float16 hidden states and weights (the compile tests above use float32 and float64): the
    frozen head with statistics, memory_budget, and packed rows with an empty sequence, compiled with
    fullgraph=True, give eager mode's values and gradients."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 6, HIDDEN).to(dtype), torch.randn(VOCAB, HIDDEN).to(dtype)
    labels = torch.randint(0, VOCAB, (2, 5))
    labels[1, :2] = IGNORE
    cu_seqlens = torch.tensor([0, 4, 4, 10])

    def step(h, w):
        frozen = fk.fused_linear_token_logps(h[:, :-1], w.detach(), labels, stats=("entropy", "mean_logits"))
        budget = fk.fused_linear_sequence_logps(h[:, :-1], w, labels, memory_budget=2**20, chunk_size=16)
        packed = fk.fused_linear_sequence_logps(h.reshape(12, HIDDEN)[:10], w, labels.new_zeros(10) + 3,
                                                cu_seqlens=cu_seqlens)
        return (frozen.log_probs.sum() + frozen.entropy.sum() + frozen.mean_logits.sum() + budget.sum()
                + packed.sum())

    leaves = [[t.clone().requires_grad_(True) for t in (hidden, weight)] for _ in range(2)]
    expected = step(*leaves[0])
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves[1])
    assert_close(got, expected, (1e-5, 1e-5), f"{dtype} value")
    for g, e, name in zip(torch.autograd.grad(got, leaves[1]), torch.autograd.grad(expected, leaves[0]),
                          ("hidden", "weight")):
        assert g.dtype == dtype
        assert_close(g, e, (1e-2, 1e-2 * e.abs().max().item()), f"{dtype} {name} gradient")


def test_strided_last_dimension_traces(path):
    """Logits whose last dimension is not contiguous are copied: in eager mode with a warning, under
    torch.compile(fullgraph=True) silently (it cannot trace warnings.warn)."""
    base, labels = torch.randn(2, 4, 2 * VOCAB), torch.randint(0, VOCAB, (2, 4))
    compiled = torch.compile(lambda x, y: fk.sequence_logps(x[..., ::2], y), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(base, labels), fk.reference.sequence_logps(base[..., ::2].double(),
                                                                                   labels).float())
