"""Shared test helpers: random inputs and comparison against the float64 reference."""

from __future__ import annotations

import os

import torch

import focal_kernels as fk

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# (rtol, atol) for values computed from inputs of this dtype in the kernels' precision.
# Loss and log-probs are accumulated in float32 (float64), whatever the input dtype.
ACCUMULATED_TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5),
                   torch.bfloat16: (2e-5, 2e-5), torch.float16: (2e-5, 2e-5)}
# Gradients are written in the logits' dtype: one or two ulps of it (the interpreter truncates to bf16);
# atol is relative to the largest gradient element (the 1 − p cancellation at the label).
GRAD_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6),
            torch.bfloat16: (1.6e-2, 1e-5), torch.float16: (2e-3, 1e-6)}


def random_logits(batch, seq_len, vocab, dtype, device, *, scale=3.0, extra_time=0):
    """Logits with a spread like a language model's; extra_time > 0 returns a shifted (non-contiguous) view."""
    full = (torch.randn(batch, seq_len + extra_time, vocab, dtype=torch.float64) * scale).to(dtype).to(device)
    return full[:, :seq_len, :] if extra_time else full


def random_labels(batch, seq_len, vocab, device, *, ignore_index=-100, ignored_fraction=0.3, dtype=torch.int64):
    labels = torch.randint(0, vocab, (batch, seq_len), dtype=dtype)
    labels[torch.rand(batch, seq_len) < ignored_fraction] = ignore_index
    return labels.to(device)


def assert_close(actual, expected, tol, what):
    rtol, atol = tol
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual64.shape == expected64.shape, f"{what}: shape {actual64.shape} != {expected64.shape}"
    torch.testing.assert_close(actual64, expected64, rtol=rtol, atol=atol, equal_nan=False,
                               msg=lambda m: f"{what}: {m}")


def loss_and_grads(fn, chosen_logits, rejected_logits, *args, upstream=None, **kwargs):
    """Run `fn` (fk.focal_po_loss or fk.reference.focal_po_loss) and backward from the loss plus a term on
    both log-probs, so that gradients reaching the logits through `out.*_logps` are checked too."""
    chosen = chosen_logits.detach().clone().requires_grad_(True)
    rejected = rejected_logits.detach().clone().requires_grad_(True)
    out = fn(chosen, rejected, *args, **kwargs)
    loss = out.loss if out.loss.dim() == 0 else (out.loss * upstream).sum()
    total = loss + 0.01 * out.chosen_logps.sum() - 0.02 * out.rejected_logps.sum()
    grad_chosen, grad_rejected = torch.autograd.grad(total, [chosen, rejected])
    return out, grad_chosen, grad_rejected


def compare_with_reference(chosen_logits, rejected_logits, chosen_labels, rejected_labels, ref_c=None, ref_r=None,
                           **options):
    """Run the kernels on the given inputs and the reference on their float64 upcast; compare everything."""
    dtype = chosen_logits.dtype
    batch = chosen_logits.shape[0]
    upstream = torch.rand(batch, dtype=torch.float64, device=chosen_logits.device)
    out, grad_c, grad_r = loss_and_grads(fk.focal_po_loss, chosen_logits, rejected_logits,
                                         chosen_labels, rejected_labels, ref_c, ref_r,
                                         upstream=upstream.to(torch.float64 if dtype == torch.float64
                                                              else torch.float32), **options)
    ref, ref_grad_c, ref_grad_r = loss_and_grads(fk.reference.focal_po_loss, chosen_logits.double(),
                                                 rejected_logits.double(), chosen_labels, rejected_labels,
                                                 None if ref_c is None else ref_c.double(),
                                                 None if ref_r is None else ref_r.double(),
                                                 upstream=upstream, **options)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    for name in ("loss", "chosen_logps", "rejected_logps", "chosen_rewards", "rejected_rewards"):
        actual = getattr(out, name)
        assert actual.dtype == expected_dtype, f"{name} dtype {actual.dtype}, expected {expected_dtype}"
        assert actual.device == chosen_logits.device
        assert_close(actual, getattr(ref, name), ACCUMULATED_TOL[dtype], name)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    ignore_index = options.get("ignore_index", -100)
    for name, actual, expected, logits, labels in (
            ("grad chosen_logits", grad_c, ref_grad_c, chosen_logits, chosen_labels),
            ("grad rejected_logits", grad_r, ref_grad_r, rejected_logits, rejected_labels)):
        assert actual.dtype == dtype, f"{name} dtype {actual.dtype}, expected {dtype}"
        scale = (expected.abs().max().item() if expected.numel() else 0.0) or 1.0  # (T = 0: no elements)
        rtol, atol = GRAD_TOL[dtype]
        # Plus two steps of the dtype's subnormal spacing: float16 gradients below 6e-5 are subnormal.
        subnormal_step = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
        # Plus a few float32 ulps of each token's upstream g: the label's entry g·(p_y − 1) is computed from
        # a float32 p_y, so where p_y is near 1 at every token (V = 2) the whole gradient is a cancellation.
        # A GPU's exp (2 ulp) exceeded the atol relative to the largest element there (tests/gpu_math.py).
        cancellation = 4 * torch.finfo(torch.float32).eps * _token_upstream(logits, labels, expected, ignore_index)
        assert_close(actual, expected, (rtol, atol * scale + 2 * subnormal_step + cancellation), name)
    return out


def _token_upstream(logits, labels, grad, ignore_index):
    """The largest |g| over scored tokens, where the gradient of a token's row of logits (no transform) is
    g·(p − onehot(y)): g = <grad, d> / <d, d> with d = p − onehot(y), in float64."""
    if logits.dtype == torch.float64:  # float64 gradients: no float32 p
        return 0.0
    scored = labels != ignore_index
    if not scored.any():
        return 0.0
    d = logits.detach().double()[scored].softmax(-1)
    d[torch.arange(d.shape[0], device=d.device), labels[scored]] -= 1.0
    g = (grad.detach().double()[scored] * d).sum(-1) / (d * d).sum(-1).clamp(min=1e-300)
    return g.abs().max().item()


def subprocess_env(*paths, **variables):
    """This process's environment for a subprocess, with `variables` set and `paths` ahead on PYTHONPATH."""
    env = dict(os.environ, **variables)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*map(str, paths), env.get("PYTHONPATH")]))
    return env


def poison_empty(monkeypatch):
    """Make every torch.empty / empty_like return NaN-filled (or extreme-valued) memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(-12345)
        return t

    real_new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
    # (the hidden-state path's kept chunks and empty outputs come from Tensor.new_empty)
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: fill(real_new_empty(self, *a, **k)))
