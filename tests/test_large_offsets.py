"""Logits whose element offsets pass 2^31 must be indexed with int64, in the logits path, in the
hidden-state path's chunk kernels and in the ranks' hidden-state digest (run in a subprocess: an int32
overflow in the interpreter is a segfault, which must fail this test rather than kill the test run)."""

import os
import subprocess
import sys
import textwrap

from helpers import subprocess_env

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import focal_kernels as fk

    device = sys.argv[1]
    vocab = 1000
    # Strides that fit in int32 but whose products with the batch / time index do not.
    stride_b, stride_t = 2**30 + 2**29 + 16, 2**29 + 4  # rows do not overlap
    storage = torch.empty(2 * stride_b + 2 * stride_t + vocab, dtype=torch.bfloat16, device=device)
    view = storage.as_strided((3, 3, vocab), (stride_b, stride_t, 1))
    view.copy_(torch.randn(3, 3, vocab, device=device) * 3)
    labels = torch.tensor([[3, vocab - 1, 5], [-100, 17, 0], [1, 2, vocab - 2]], device=device)
    leaf = view.detach().requires_grad_(True)
    logps = fk.sequence_logps(leaf, labels)
    (grad,) = torch.autograd.grad(logps.sum(), [leaf])
    dense = view.detach().double().clone().requires_grad_(True)
    expected = fk.reference.sequence_logps(dense, labels)
    (expected_grad,) = torch.autograd.grad(expected.sum(), [dense])
    torch.testing.assert_close(logps.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1.6e-2, atol=1e-5)
    # In place: the gradient is written through the same int64 strides into the storage.
    class Alias(torch.autograd.Function):  # an op's output sharing the leaf's storage (a view of a leaf is refused)
        forward = staticmethod(lambda ctx, x: x.detach())
        backward = staticmethod(lambda ctx, grad: grad)

    inplace_leaf = view.detach().requires_grad_(True)
    logps_again = fk.sequence_logps(Alias.apply(inplace_leaf), labels, inplace_backward=True)
    torch.testing.assert_close(logps_again, logps, rtol=0, atol=0)
    (inplace_grad,) = torch.autograd.grad(logps_again.sum(), [inplace_leaf])
    assert inplace_grad.data_ptr() == view.data_ptr()
    torch.testing.assert_close(view.double(), grad.double(), rtol=0, atol=0)
    # Chosen and rejected in one launch: a second grid in the same storage (rows right after the first's).
    view.copy_(grad)
    rejected = storage.as_strided((3, 2, vocab), (stride_b, stride_t, 1), vocab)
    rejected.copy_(torch.randn(3, 2, vocab, device=device) * 3)
    leaves = [view.detach().requires_grad_(True), rejected.detach().requires_grad_(True)]
    out = fk.focal_po_loss(*leaves, labels, labels[:, 1:], beta=0.5)
    grads = torch.autograd.grad(out.loss, leaves)
    dense = [x.detach().double().clone().requires_grad_(True) for x in leaves]
    expected = fk.reference.focal_po_loss(*dense, labels, labels[:, 1:], beta=0.5)
    expected_grads = torch.autograd.grad(expected.loss, dense)
    torch.testing.assert_close(out.chosen_logps.double(), expected.chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected_logps.double(), expected.rejected_logps, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got.double(), want, rtol=1.6e-2, atol=1e-5)
    print("ok")
""")


CHUNK_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from focal_kernels.logprobs import chunk_kernels
    from focal_kernels.kernels.chunk_lse_update import chunk_lse_update
    from focal_kernels.kernels.chunk_logits_grad import chunk_logits_grad_

    device = sys.argv[1]
    width, vocab_start = 700, 300
    # The hidden-state path's chunk kernels with a row stride whose product with the row index passes 2^31.
    stride = 2**30 + 16
    storage = torch.empty(2 * stride + width, dtype=torch.bfloat16, device=device)
    chunk = storage.as_strided((3, width), (stride, 1))
    chunk.copy_(torch.randn(3, width, device=device) * 3)
    labels = torch.tensor([310, 999, 5], device=device)  # the last one falls outside this chunk

    def state():
        return {"max": torch.full((3,), 0.5, device=device), "sum": torch.full((3,), 2.0, device=device),
                "target": torch.full((3,), -7.0, device=device), "wsum": torch.full((3,), 0.3, device=device),
                "sqsum": torch.full((3,), 1.5, device=device), "xsum": torch.full((3,), 4.0, device=device),
                "before": torch.full((3,), -1.0, device=device)}

    got, want = state(), state()
    chunk_lse_update(chunk, labels, vocab_start, got, None)
    chunk_kernels.chunk_lse_update_torch(chunk.clone(), labels, vocab_start, want, None)
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5)

    row_max, log_sum_exp = torch.randn(3, device=device) + 3, torch.rand(3, device=device) + 3
    grad_scale = torch.randn(3, device=device)
    expected = chunk_kernels.chunk_logits_grad_torch(chunk.clone(), labels, vocab_start, row_max, log_sum_exp,
                                                     grad_scale)
    result = chunk_logits_grad_(chunk, labels, vocab_start, row_max, log_sum_exp, grad_scale)
    assert result.data_ptr() == chunk.data_ptr()
    torch.testing.assert_close(chunk.float(), expected.float(), rtol=1.6e-2, atol=1e-6)

    # The vocabulary-parallel ranks' hidden-state digest reads through the same kind of strides.
    from focal_kernels.logprobs.agreement import hidden_digest
    hidden = storage.as_strided((3, 1, width), (stride, width, 1))  # the last row past 2^31
    assert int(hidden_digest(hidden)) == int(hidden_digest(hidden.contiguous()))
    print("ok")
""")


def run_script(script, device):
    env = subprocess_env(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", script, device], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip().endswith("ok")


def test_offsets_past_int32(device):
    run_script(SCRIPT, device)


def test_chunk_kernel_offsets_past_int32(device):
    run_script(CHUNK_SCRIPT, device)
