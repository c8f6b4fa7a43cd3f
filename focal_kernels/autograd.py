"""Autograd wiring.

    FocalPOFromLogits: chosen/rejected logits and labels, refs  →  per-pair loss, chosen_logps,
                       rejected_logps (all differentiable), chosen_rewards, rejected_rewards (not)
        forward  token_logps kernel per side (saves row max and log-sum-exp, O(B·T)), then one
                 sequence_pair_loss kernel: per-sequence sums, loss, rewards and dℓ/dlogp
        backward grad_scale_b = incoming loss gradient · dℓ/dlogp_b + incoming gradient of logp_b,
                 then one logits_grad kernel per side
    SequenceLogps:  logits (B, T, V), labels  →  logps (B,)          (`sequence_logps`)
    FocalPOPairLoss: chosen_logps, rejected_logps (B,), refs  →  per-pair loss (B,), rewards
        (the hidden-state path's log-probs go through this one; same pair-loss kernel)

A gradient that reaches the log-probs from the loss and one from any other term (an added NLL, say) are
summed before the single logits backward runs. Only the logits themselves (the caller's tensor, not a copy)
and O(B·T) values are saved.
"""

from __future__ import annotations

import torch

from .first_order import first_order_only
from .kernels.logits_grad import logits_grad
from .kernels.sequence_pair_loss import sequence_pair_loss
from .kernels.sequence_sum import sequence_sum
from .kernels.token_logps import token_logps_and_lse


def _dtypes(*tensors):
    """Each tensor's dtype (None for None): the reference log-probs' gradients are returned in them."""
    return tuple(None if t is None else t.dtype for t in tensors)


def _logits_grad(ctx, logits, labels, row_max, log_sum_exp, grad_scale):
    """The logits' gradient, written over the logits themselves when ctx.inplace_backward."""
    if not ctx.inplace_backward:
        return logits_grad(logits, labels, row_max, log_sum_exp, grad_scale, ctx.ignore_index)
    logits_grad(logits, labels, row_max, log_sum_exp, grad_scale, ctx.ignore_index, out=logits)
    # Tell autograd the logits changed, so that any other op that saved them fails loudly in its backward
    # instead of reading the gradient as if it were the logits.
    torch.autograd.graph.increment_version(logits)
    return logits


class FocalPOFromLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen_logits, rejected_logits, chosen_labels, rejected_labels, ref_chosen_logps,
                ref_rejected_logps, beta, gamma, detach_focal_weight, ignore_index, inplace_backward):
        chosen_tokens, chosen_max, chosen_lse = token_logps_and_lse(chosen_logits, chosen_labels, ignore_index)
        rejected_tokens, rejected_max, rejected_lse = token_logps_and_lse(rejected_logits, rejected_labels,
                                                                          ignore_index)
        out = sequence_pair_loss(chosen_tokens, rejected_tokens, ref_chosen_logps, ref_rejected_logps,
                                 beta=beta, gamma=gamma, detach_focal_weight=detach_focal_weight)
        ctx.save_for_backward(chosen_logits, chosen_labels, chosen_max, chosen_lse,
                              rejected_logits, rejected_labels, rejected_max, rejected_lse,
                              out["dloss_dchosen"], out["dloss_drejected"])
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        ctx.ref_dtypes = _dtypes(ref_chosen_logps, ref_rejected_logps)
        ctx.mark_non_differentiable(out["chosen_rewards"], out["rejected_rewards"])
        return (out["loss"], out["chosen_logps"], out["rejected_logps"], out["chosen_rewards"],
                out["rejected_rewards"])

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, grad_chosen_logps, grad_rejected_logps, _grad_chosen_rewards,
                 _grad_rejected_rewards):
        saved = ctx.saved_tensors
        sides = ((*saved[0:4], saved[8], grad_chosen_logps), (*saved[4:8], saved[9], grad_rejected_logps))
        grads = [None] * 11  # one per forward input
        for side, (logits, labels, row_max, log_sum_exp, dloss_dlogps, grad_logps) in enumerate(sides):
            if ctx.needs_input_grad[side]:
                grad_scale = torch.zeros_like(dloss_dlogps) if grad_loss is None else grad_loss * dloss_dlogps
                if grad_logps is not None:
                    grad_scale = grad_scale + grad_logps.to(grad_scale.dtype)
                grads[side] = _logits_grad(ctx, logits, labels, row_max, log_sum_exp, grad_scale)
            if ctx.needs_input_grad[4 + side] and grad_loss is not None:  # d loss / d ref = −d loss / d logp
                grads[4 + side] = (-grad_loss * dloss_dlogps).to(ctx.ref_dtypes[side])
        return tuple(grads)


class SequenceLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, ignore_index, inplace_backward):
        token_logps, row_max, log_sum_exp = token_logps_and_lse(logits, labels, ignore_index)
        logps = sequence_sum(token_logps)
        ctx.save_for_backward(logits, labels, row_max, log_sum_exp)
        ctx.ignore_index = ignore_index
        ctx.inplace_backward = inplace_backward
        return logps

    @staticmethod
    @first_order_only
    def backward(ctx, grad_logps):
        logits, labels, row_max, log_sum_exp = ctx.saved_tensors
        grad_logits = _logits_grad(ctx, logits, labels, row_max, log_sum_exp, grad_logps.to(row_max.dtype))
        return grad_logits, None, None, None


class FocalPOPairLoss(torch.autograd.Function):
    """Per-sequence log-probs summed elsewhere → (per-pair loss, chosen_rewards, rejected_rewards): the same
    sequence_pair_loss kernel, fed rows of length 1."""

    @staticmethod
    def forward(ctx, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta, gamma, detach_focal_weight):
        out = sequence_pair_loss(chosen_logps.detach().contiguous()[:, None],
                                 rejected_logps.detach().contiguous()[:, None], ref_chosen_logps,
                                 ref_rejected_logps, beta=beta, gamma=gamma, detach_focal_weight=detach_focal_weight)
        ctx.save_for_backward(out["dloss_dchosen"], out["dloss_drejected"])
        ctx.ref_dtypes = _dtypes(ref_chosen_logps, ref_rejected_logps)
        ctx.mark_non_differentiable(out["chosen_rewards"], out["rejected_rewards"])
        return out["loss"], out["chosen_rewards"], out["rejected_rewards"]

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, _grad_chosen_rewards, _grad_rejected_rewards):
        dloss_dchosen, dloss_drejected = ctx.saved_tensors
        grad_chosen = grad_loss * dloss_dchosen
        grad_rejected = grad_loss * dloss_drejected
        grad_ref_chosen = grad_ref_rejected = None
        ref_chosen_dtype, ref_rejected_dtype = ctx.ref_dtypes
        if ctx.needs_input_grad[2]:
            grad_ref_chosen = (-grad_chosen).to(ref_chosen_dtype)
        if ctx.needs_input_grad[3]:
            grad_ref_rejected = (-grad_rejected).to(ref_rejected_dtype)
        return grad_chosen, grad_rejected, grad_ref_chosen, grad_ref_rejected, None, None, None
