"""Autograd wiring: two Functions that compose into the FocalPO loss.

    SequenceLogps:  logits (B, T, V), labels  →  logps (B,)
        forward  token_logps kernel (saves row max and log-sum-exp, O(B·T)) + sequence_sum kernel
        backward grad_scale = incoming (B,) gradient → logits_grad kernel
    FocalPOPairLoss: chosen_logps, rejected_logps (B,), refs  →  per-pair loss (B,)
        forward  pair-loss kernel, which also writes dℓ/dlogp per sequence
        backward incoming gradient × those derivatives

Because the per-sequence log-probs are ordinary autograd outputs, a gradient that reaches them from the
loss and one from any other term (an added NLL, say) are summed by autograd before the single logits
backward runs. Only the logits themselves (the caller's tensor, not a copy) and O(B·T) values are saved.
"""

from __future__ import annotations

import torch

from .kernels.logits_grad import logits_grad
from .kernels.pair_loss import focal_po_pair_loss
from .kernels.sequence_sum import sequence_sum
from .kernels.token_logps import token_logps_and_lse


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
    def backward(ctx, grad_logps):
        logits, labels, row_max, log_sum_exp = ctx.saved_tensors
        grad_scale = grad_logps.to(row_max.dtype)
        out = logits if ctx.inplace_backward else None
        grad_logits = logits_grad(logits, labels, row_max, log_sum_exp, grad_scale, ctx.ignore_index, out=out)
        return grad_logits, None, None, None


class FocalPOPairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                beta, gamma, detach_focal_weight):
        loss, dloss_dchosen, dloss_drejected = focal_po_pair_loss(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
            beta=beta, gamma=gamma, detach_focal_weight=detach_focal_weight)
        ctx.save_for_backward(dloss_dchosen, dloss_drejected)
        ctx.ref_dtypes = (None if ref_chosen_logps is None else ref_chosen_logps.dtype,
                          None if ref_rejected_logps is None else ref_rejected_logps.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
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
