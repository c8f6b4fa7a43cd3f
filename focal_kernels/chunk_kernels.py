"""The hidden-state path's two per-chunk operations: the Triton kernels, or their PyTorch twins.

chunk_lse_update (kernels/chunk_lse_update.py) folds one chunk of logits into each token's running max, sum
of exponentials and label logit; chunk_logits_grad (kernels/chunk_logits_grad.py) overwrites a recomputed
chunk with its gradient. Without Triton (a CPU without TRITON_INTERPRET=1) the twins below do the same in
PyTorch with chunk-sized temporaries: the same memory bound, the same results up to rounding.
"""

from __future__ import annotations

import math

import torch


def chunk_kernels(use_triton):
    """(chunk_lse_update, chunk_logits_grad_, sequence_sum): the Triton kernels, imported on first use so that
    importing focal_kernels does not import triton (see backend.py), or their PyTorch twins."""
    if not use_triton:
        return chunk_lse_update_torch, chunk_logits_grad_torch, lambda token_logps: token_logps.sum(dim=1)
    from .kernels.chunk_logits_grad import chunk_logits_grad_
    from .kernels.chunk_lse_update import chunk_lse_update
    from .kernels.sequence_sum import sequence_sum

    return chunk_lse_update, chunk_logits_grad_, sequence_sum


def chunk_lse_update_torch(logits_chunk, labels, vocab_start, running_max, running_sum, target_logits):
    """PyTorch twin of kernels.chunk_lse_update (chunk-sized temporaries)."""
    if logits_chunk.shape[0] == 0:
        return
    x = logits_chunk.to(running_sum.dtype)
    new_max = torch.maximum(running_max, x.amax(dim=1))
    safe_max = torch.where(new_max == -math.inf, torch.zeros_like(new_max), new_max)
    running_sum.mul_(torch.exp(running_max - safe_max)).add_(torch.exp(x - safe_max[:, None]).sum(dim=1))
    running_max.copy_(new_max)
    local_label = labels - vocab_start
    in_chunk = (local_label >= 0) & (local_label < x.shape[1])
    picked = x.gather(1, local_label.clamp(0, x.shape[1] - 1)[:, None]).squeeze(1)
    target_logits.copy_(torch.where(in_chunk, picked, target_logits))


def chunk_logits_grad_torch(logits_chunk, labels, vocab_start, row_max, log_sum_exp, grad_scale):
    """PyTorch twin of kernels.chunk_logits_grad (chunk-sized temporaries)."""
    x = logits_chunk.to(log_sum_exp.dtype)
    columns = torch.arange(vocab_start, vocab_start + x.shape[1], device=x.device)
    one_hot = (columns[None, :] == labels[:, None]).to(x.dtype)
    probs = torch.exp((x - row_max[:, None]) - log_sum_exp[:, None])
    logits_chunk.copy_(grad_scale[:, None] * (one_hot - probs))
    return logits_chunk
