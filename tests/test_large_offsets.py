"""Logits whose element offsets pass 2^31 must be indexed with int64 (run in a subprocess: an int32
overflow in the interpreter is a segfault, which must fail this test rather than kill the test run)."""

import os
import subprocess
import sys
import textwrap

import torch

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
    inplace_leaf = view.detach().requires_grad_(True)
    logps_again = fk.sequence_logps(inplace_leaf, labels, inplace_backward=True)
    torch.testing.assert_close(logps_again, logps, rtol=0, atol=0)
    (inplace_grad,) = torch.autograd.grad(logps_again.sum(), [inplace_leaf])
    assert inplace_grad.data_ptr() == view.data_ptr()
    torch.testing.assert_close(view.double(), grad.double(), rtol=0, atol=0)
    print("ok")
""")


def test_offsets_past_int32(device, tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, device], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip().endswith("ok")
