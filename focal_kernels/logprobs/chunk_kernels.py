"""The hidden-state path's two per-chunk operations: the Triton kernels, or their PyTorch twins.

chunk_lse_update (kernels/chunk_lse_update.py) folds one chunk of raw logits into each token's running
state; chunk_logits_grad (kernels/chunk_logits_grad.py) overwrites a recomputed chunk with its gradient.
Without Triton (a CPU without TRITON_INTERPRET=1) the twins below do the same in PyTorch with chunk-sized
temporaries: the same memory bound, the same results up to rounding.
"""

from __future__ import annotations

import math

import torch


def chunk_kernels(use_triton):
    """(chunk_lse_update, chunk_logits_grad_): the Triton kernels, imported on first use so that importing
    focal_kernels does not import triton (see backend.py), or their PyTorch twins."""
    if not use_triton:
        return chunk_lse_update_torch, chunk_logits_grad_torch
    from ..kernels.chunk_logits_grad import chunk_logits_grad_
    from ..kernels.chunk_lse_update import chunk_lse_update

    return chunk_lse_update, chunk_logits_grad_


def _transformed(raw, transform):
    """(logits, d logits / d raw or None) in the compute dtype: kernels/logit_transform.py's formula."""
    if transform is None:
        return raw, None
    params, has_softcap = transform
    scale, cap, inv_temperature = params[0], params[1], params[2]
    derivative = (scale * inv_temperature).expand_as(raw)
    if not has_softcap:
        return raw * (scale * inv_temperature), derivative
    tanh = torch.tanh(raw * (scale / cap))
    return tanh * (cap * inv_temperature), derivative * (1 - tanh * tanh)


def chunk_lse_update_torch(logits_chunk, labels, vocab_start, state, transform):
    """PyTorch twin of kernels.chunk_lse_update (chunk-sized temporaries)."""
    if logits_chunk.shape[0] == 0:
        return
    running_max, running_sum = state["max"], state["sum"]
    x, _ = _transformed(logits_chunk.to(running_sum.dtype), transform)
    local_label = labels - vocab_start
    if "xsum" in state:
        state["xsum"].add_(x.sum(dim=1))
    if "before" in state:
        columns = torch.arange(x.shape[1], device=x.device)
        earlier = torch.where(columns[None, :] < local_label[:, None], x, -math.inf)
        torch.maximum(state["before"], earlier.amax(dim=1), out=state["before"])
    new_max = torch.maximum(running_max, x.amax(dim=1))
    safe_max = torch.where(new_max == -math.inf, torch.zeros_like(new_max), new_max)
    rescale = torch.exp(running_max - safe_max)
    shifted = x - safe_max[:, None]
    exps = torch.exp(shifted)
    if "wsum" in state:
        shift = torch.where(running_max == -math.inf, torch.zeros_like(running_max), running_max - safe_max)
        centered = torch.where(x == -math.inf, torch.zeros_like(shifted), shifted)  # 0 log 0 = 0 at −inf logits
        state["wsum"].copy_(rescale * (state["wsum"] + shift * running_sum) + (exps * centered).sum(dim=1))
    if "sqsum" in state:
        state["sqsum"].mul_(rescale * rescale).add_((exps * exps).sum(dim=1))
    running_sum.mul_(rescale).add_(exps.sum(dim=1))
    running_max.copy_(new_max)
    in_chunk = (local_label >= 0) & (local_label < x.shape[1])
    picked = x.gather(1, local_label.clamp(0, x.shape[1] - 1)[:, None]).squeeze(1)
    state["target"].copy_(torch.where(in_chunk, picked, state["target"]))


def chunk_logits_grad_torch(logits_chunk, labels, vocab_start, row_max, log_sum_exp, grad_scale, transform=None):
    """PyTorch twin of kernels.chunk_logits_grad (chunk-sized temporaries)."""
    x, derivative = _transformed(logits_chunk.to(log_sum_exp.dtype), transform)
    columns = torch.arange(vocab_start, vocab_start + x.shape[1], device=x.device)
    one_hot = (columns[None, :] == labels[:, None]).to(x.dtype)
    probs = torch.exp((x - row_max[:, None]) - log_sum_exp[:, None])
    grad = grad_scale[:, None] * (one_hot - probs)
    if derivative is not None:
        grad = grad * derivative
    logits_chunk.copy_(grad)
    return logits_chunk
