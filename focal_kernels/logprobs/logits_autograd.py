"""Autograd wiring of the logits path.

    TokenLogpsFromLogits: logits (B, T, V), labels (B, T)  →  token log-probs (B, T), 0 at ignored tokens
        forward  token_logps kernel: one pass over each scored row; saves the row max and log-sum-exp (O(B·T))
        backward logits_grad kernel with g[b, t], the incoming gradient of each token's log-prob (a padded
                 sequence's gradient arrives broadcast over its tokens with time stride 0: no copy)
    PairSequenceLogps: padded chosen and rejected logits → their per-sequence log-probs (B,) and (B,), with
        one launch of each kernel for both sides: token_logps, then segment_sum, forward; logits_grad
        backward, reading each sequence's gradient broadcast over its tokens (time stride 0)

Only the logits the kernels read (the caller's tensors; a copy only where logits._kernel_ready made one: a
last stride other than 1, or batch-minor logits under torch.compile) and O(B·T) values are saved.
"""

from __future__ import annotations

import torch

from ..first_order import first_order_only
from . import ops


def _places(logits, inplace_backward):
    """Under torch.compile with inplace_backward, where the forward read the logits (ops.storage_places): the
    compiled in-place backward writes there (see ops._at_recorded_place). None otherwise."""
    return ops.storage_places(logits) if inplace_backward and torch.compiler.is_compiling() else None


def _logits_grads(ctx, logits, labels, row_max, log_sum_exp, grad_scales, places):
    """The logits' gradients, fresh tensors or (inplace_backward) written over the logits themselves."""
    if not ctx.inplace_backward:
        return ops.logits_grad(logits, labels, row_max, log_sum_exp, grad_scales, ctx.ignore_index, 0)
    ops.logits_grad_inplace(logits, labels, row_max, log_sum_exp, grad_scales, ctx.ignore_index, 0, places)
    if not torch.compiler.is_compiling():
        # Tell autograd the logits changed, so that any other op that saved them fails loudly in its
        # backward instead of reading the gradient as if it were the logits.
        for part in logits:
            torch.autograd.graph.increment_version(part)
    return [part.detach() for part in logits]  # the logits' storage, without their autograd history


class TokenLogpsFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, inplace_backward):
        token_logps, row_max, log_sum_exp = ops.token_logps([logits], [labels], ignore_index, 0, False)
        ctx.save_for_backward(logits, labels, row_max, log_sum_exp, _places([logits], inplace_backward))
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        return token_logps

    @staticmethod
    @first_order_only
    def backward(ctx, grad_tokens):
        logits, labels, row_max, log_sum_exp, places = ctx.saved_tensors
        (grad,) = _logits_grads(ctx, [logits], [labels], row_max, log_sum_exp, [grad_tokens.to(row_max.dtype)],
                                places)
        return grad, None, None, None


class PairSequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen_logits, rejected_logits, chosen_labels, rejected_labels, ignore_index,
                inplace_backward):
        logits, labels = [chosen_logits, rejected_logits], [chosen_labels, rejected_labels]
        token_logps, row_max, log_sum_exp = ops.token_logps(logits, labels, ignore_index, 0, False)
        chosen_logps, rejected_logps = ops.segment_sum(token_logps, None, [part.shape[0] for part in labels],
                                                       [part.shape[1] for part in labels])
        ctx.save_for_backward(*logits, *labels, row_max, log_sum_exp, _places(logits, inplace_backward))
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        return chosen_logps, rejected_logps

    @staticmethod
    @first_order_only
    def backward(ctx, grad_chosen, grad_rejected):
        chosen_logits, rejected_logits, chosen_labels, rejected_labels, row_max, log_sum_exp, places = ctx.saved_tensors
        logits, labels = [chosen_logits, rejected_logits], [chosen_labels, rejected_labels]
        # Each sequence's gradient, broadcast over its tokens with time stride 0 (autograd passes zeros for an
        # output that was not used).
        scales = [grad.to(row_max.dtype)[:, None].expand(part.shape) for grad, part in
                  zip((grad_chosen, grad_rejected), labels)]
        wanted = [i for i in (0, 1) if ctx.needs_input_grad[i]]
        if len(wanted) == 2:  # both sides in one launch
            return *_logits_grads(ctx, logits, labels, row_max, log_sum_exp, scales, places), None, None, None, None
        grads = [None, None]
        first_rows = chosen_labels.numel()
        for i in wanted:  # one side only: the other side's logits are neither read for this nor written
            rows = slice(0, first_rows) if i == 0 else slice(first_rows, None)
            (grads[i],) = _logits_grads(ctx, [logits[i]], [labels[i]], row_max[rows], log_sum_exp[rows],
                                        [scales[i]], None if places is None else places[i:i + 1])
        return *grads, None, None, None, None
