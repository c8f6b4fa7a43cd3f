"""Autograd wiring of the logits path, and the per-sequence sum both paths share.

    TokenLogpsFromLogits: logits (B, T, V), labels (B, T)  →  token log-probs (B, T), 0 at ignored tokens
        forward  token_logps kernel: one pass over each scored row; saves the row max and log-sum-exp (O(B·T))
        backward logits_grad kernel with g[b, t], the incoming gradient of each token's log-prob (a padded
                 sequence's gradient arrives broadcast over its tokens with time stride 0: no copy)
    SegmentSum: token values (B, T) → per-sequence sums (S,) through the deterministic segment_sum kernel;
        backward broadcasts each sequence's gradient to its tokens (packing.Layout.broadcast)

Only the logits themselves (the caller's tensor, not a copy) and O(B·T) values are saved.
"""

from __future__ import annotations

import torch

from ..first_order import first_order_only
from . import ops
from .packing import Layout


class TokenLogpsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, inplace_backward):
        token_logps, row_max, log_sum_exp = ops.token_logps(logits, labels, ignore_index, 0, False)
        ctx.save_for_backward(logits, labels, row_max, log_sum_exp)
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        return token_logps

    @staticmethod
    @first_order_only
    def backward(ctx, grad_tokens):
        logits, labels, row_max, log_sum_exp = ctx.saved_tensors
        grad_tokens = grad_tokens.to(row_max.dtype)
        if not ctx.inplace_backward:
            return ops.logits_grad(logits, labels, row_max, log_sum_exp, grad_tokens, ctx.ignore_index, 0), \
                None, None, None
        ops.logits_grad_inplace(logits, labels, row_max, log_sum_exp, grad_tokens, ctx.ignore_index, 0)
        if not torch.compiler.is_compiling():
            # Tell autograd the logits changed, so that any other op that saved them fails loudly in its
            # backward instead of reading the gradient as if it were the logits.
            torch.autograd.graph.increment_version(logits)
        return logits.detach(), None, None, None  # the logits' storage, without their autograd history


class SegmentSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_values, offsets, batch, seq_len, packed):
        ctx.save_for_backward(offsets)
        ctx.shape = (batch, seq_len, packed)
        return ops.segment_sum(token_values.reshape(-1), offsets)

    @staticmethod
    def backward(ctx, grad_sums):
        (offsets,) = ctx.saved_tensors
        return Layout(*ctx.shape[:2], offsets, ctx.shape[2]).broadcast(grad_sums), None, None, None, None
