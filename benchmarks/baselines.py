"""The implementations timed side by side, all computing the same FocalPO loss from the same inputs.

    ours            focal_kernels.focal_po_loss
    ours (inplace)  the same with inplace_backward=True (the gradient overwrites the logits)
    ours (no label check)  the same with validate_labels=False (no label read-back, no device sync)
    ours (unaligned rows)  the same on logits one element off 16-byte alignment (what row peeling gains)
    seqlogps padded fk.sequence_logps on each side's (B, T, V) logits, then the same loss in torch
    seqlogps packed the same tokens laid out packed: (B·T, V) logits with cu_seqlens (no copy); with
                    "seqlogps padded" it shows what the packed layout costs at equal scored tokens
    eager           what trainers write today: .float(), log_softmax, gather, masked sum, loss in torch
    torch.compile   that same function under torch.compile
    trl             trl.trainer.utils.selective_log_softmax → the same masked sum and loss
    liger           Liger-Kernel cross-entropy, reduction="none" → the same sum and loss

Each is an impls.Impl: `loss(inputs) -> scalar tensor`. `overwrites_inputs` marks the ones that write into the
logits (ours in place in its backward, Liger in its forward): the runner hands them a private copy
refilled before every timed call, so the shared input sets stay intact.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .environment import import_baseline
from .impls import Impl
from .inputs import IGNORE_INDEX, InputSet

BETA = 0.1
GAMMA = 0.05


def focal_po_from_logps(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, gamma):
    """Mean over pairs of −p^γ·log p, p = σ(β·((logp_c − ref_c) − (logp_r − ref_r))), in torch."""
    z = beta * ((chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps))
    log_p = F.logsigmoid(z)
    return (-torch.exp(gamma * log_p) * log_p).mean()


def eager_sequence_logps(logits, labels):
    """Σ over scored tokens of log_softmax(logits.float())[label], the usual trainer code."""
    logprobs = logits.float().log_softmax(dim=-1)
    scored = labels != IGNORE_INDEX
    picked = torch.gather(logprobs, 2, labels.masked_fill(~scored, 0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1)


def eager_focal_po_loss(chosen_logits, rejected_logits, chosen_labels, rejected_labels,
                        ref_chosen_logps, ref_rejected_logps):
    return focal_po_from_logps(eager_sequence_logps(chosen_logits, chosen_labels),
                               eager_sequence_logps(rejected_logits, rejected_labels),
                               ref_chosen_logps, ref_rejected_logps, BETA, GAMMA)


def _args(x: InputSet):
    return (x.chosen_logits, x.rejected_logits, x.chosen_labels, x.rejected_labels,
            x.ref_chosen_logps, x.ref_rejected_logps)


class _Alias(torch.autograd.Function):
    """The identity as an op: a non-leaf output sharing the leaf's storage (no copy; gradients pass through)."""

    @staticmethod
    def forward(ctx, x):
        return x.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad


class Ours(Impl):
    key = name = "ours"
    inplace_backward = False
    validate_labels = True

    def __init__(self):
        import focal_kernels

        self._focal_po_loss = focal_kernels.focal_po_loss

    def loss(self, x):
        logits = (x.chosen_logits, x.rejected_logits)
        if self.inplace_backward:  # in training the logits are the lm_head's output, not a leaf (inplace_backward
            logits = tuple(_Alias.apply(t) for t in logits)  # refuses a leaf, or a view of one): an op's output
        return self._focal_po_loss(*logits, *_args(x)[2:], beta=BETA, gamma=GAMMA, ignore_index=IGNORE_INDEX,
                                   inplace_backward=self.inplace_backward, validate_labels=self.validate_labels).loss


class OursInplace(Ours):
    """The gradient overwrites the logits (a private copy, refilled before every timed call)."""

    key, name = "inplace", "ours (inplace)"
    inplace_backward = True
    overwrites_inputs = True


class OursNoLabelCheck(Ours):
    key, name = "novalidate", "ours (no label check)"
    validate_labels = False
    note = "validate_labels=False"


def _off_boundary(logits: torch.Tensor) -> torch.Tensor:
    """A copy of logits whose storage starts one element past a 16-byte boundary (a leaf that requires grad)."""
    storage = torch.empty(logits.numel() + 1, dtype=logits.dtype, device=logits.device)
    copy = storage[1:].view(logits.shape)
    copy.copy_(logits.detach())
    return copy.requires_grad_(True)


class OursUnaligned(Ours):
    """The logits copied (untimed) to an address one element off a 16-byte boundary: no row can be aligned,
    so the kernels run the single-element accesses that rows off boundaries got before the peeling of
    focal_kernels/kernels/row_alignment.py. Beside "ours" at an odd V it measures what the peeling gains."""

    key, name = "unaligned", "ours (unaligned rows)"
    note = "logits one element off 16-byte alignment: single-element accesses"

    def inputs(self, x):
        return dataclasses.replace(x, chosen_logits=_off_boundary(x.chosen_logits),
                                   rejected_logits=_off_boundary(x.rejected_logits))


class SequenceLogpsPadded(Impl):
    """fk.sequence_logps per side on the padded (B, T, V) logits, then the FocalPO loss in torch."""

    key, name = "padded", "seqlogps padded"
    packed = False

    def __init__(self):
        import focal_kernels

        self._sequence_logps = focal_kernels.sequence_logps
        self._cu_seqlens = {}

    def _side(self, logits, labels):
        if not self.packed:
            return self._sequence_logps(logits, labels, IGNORE_INDEX)
        batch, seq_len, vocab = logits.shape  # every sequence is full length: packing is a view
        # A trainer's collator builds cu_seqlens with the batch: made once per shape (at the untimed warm-up
        # call), not inside the timed ones.
        key = (batch, seq_len, logits.device)
        if key not in self._cu_seqlens:
            self._cu_seqlens[key] = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32,
                                                 device=logits.device)
        cu_seqlens = self._cu_seqlens[key]
        return self._sequence_logps(logits.view(batch * seq_len, vocab), labels.reshape(-1), IGNORE_INDEX,
                                    cu_seqlens=cu_seqlens)

    def loss(self, x):
        return focal_po_from_logps(self._side(x.chosen_logits, x.chosen_labels),
                                   self._side(x.rejected_logits, x.rejected_labels),
                                   x.ref_chosen_logps, x.ref_rejected_logps, BETA, GAMMA)


class SequenceLogpsPacked(SequenceLogpsPadded):
    key, name = "packed", "seqlogps packed"
    packed = True
    note = "the same tokens packed: (B·T, V) with cu_seqlens"


class Eager(Impl):
    key = name = "eager"

    def loss(self, x):
        return eager_focal_po_loss(*_args(x))


class Compiled(Impl):
    """torch.compile of `eager_focal_po_loss`, static shapes, recompiled (after a reset) per shape so that
    the recompile limit never silently sends a shape back to eager."""

    key, name = "compile", "torch.compile"

    def __init__(self):
        self._key = None
        self._fn = None

    def unavailable_reason(self, device):
        if not hasattr(torch, "compile"):
            return f"torch {torch.__version__} has no torch.compile"
        return None

    def prepare(self, shape, earlier_rows):
        if shape.compile_key != self._key:
            reset = getattr(getattr(torch, "compiler", None), "reset", None) or torch._dynamo.reset
            reset()
            self._fn = torch.compile(eager_focal_po_loss, dynamic=False)
            self._key = shape.compile_key

    def loss(self, x):
        return self._fn(*_args(x))


class TRLSelectiveLogSoftmax(Impl):
    key = name = "trl"

    def __init__(self):
        self._select = None

    def unavailable_reason(self, device):
        self._select, reason = import_baseline("trl.trainer.utils", "selective_log_softmax", device)
        if device.type != "cuda":  # its plain-PyTorch fallback returns bf16 token log-probs (its kernel: 2e-5)
            self.loss_tolerance = 1e-2
        return reason

    def _sequence_logps(self, logits, labels):
        scored = labels != IGNORE_INDEX
        try:  # TRL >= 1.x: row_mask skips the ignored rows' logits, as DPOTrainer uses it
            per_token = self._select(logits, labels.masked_fill(~scored, 0), row_mask=scored)
        except TypeError:  # older TRL: no row_mask
            per_token = self._select(logits, labels.masked_fill(~scored, 0))
        return (per_token.float() * scored).sum(-1)

    def loss(self, x):
        return focal_po_from_logps(self._sequence_logps(x.chosen_logits, x.chosen_labels),
                                   self._sequence_logps(x.rejected_logits, x.rejected_labels),
                                   x.ref_chosen_logps, x.ref_rejected_logps, BETA, GAMMA)


class LigerCrossEntropy(Impl):
    """Liger's kernel writes the gradient into its input during the forward. Older releases scale that
    gradient by only the first element of a reduction="none" upstream gradient; the work is the same (their
    fp32 rows' gradients are flagged as differing from ours')."""

    key = name = "liger"
    overwrites_inputs = True
    gradient_in_forward = True

    def prepare(self, shape, earlier_rows):
        # Its reduction="none" losses come back in the logits' dtype: bf16-rounded per token, then summed
        # (0.3-0.7% from ours' at 16K tokens on the H200, more with fewer pairs), so only fp32 compares. The
        # gradient's per-pair scale comes from that rounded loss too (a simulation put its digest ~2% off at
        # 1 pair); in fp32 it is compared, and older releases (one scale for every row) are flagged there.
        bf16 = shape.dtype_name == "bf16"
        self.loss_tolerance, self.grad_tolerance = (None, None) if bf16 else (1e-3, 2e-2)
        self.note = "bf16 per-token losses: loss and gradients not compared" if bf16 else ""

    def __init__(self):
        self._cross_entropy = None

    def unavailable_reason(self, device):
        self._cross_entropy, reason = import_baseline("liger_kernel.transformers.functional", "liger_cross_entropy",
                                                      device, needs_gpu=True)
        return reason

    def _sequence_logps(self, logits, labels):
        pairs, seq_len, vocab = logits.shape
        nll = self._cross_entropy(logits.view(-1, vocab), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                                  reduction="none")
        if isinstance(nll, (tuple, list)):
            nll = nll[0]
        elif hasattr(nll, "loss"):
            nll = nll.loss
        return -nll.float().view(pairs, seq_len).sum(-1)  # ignored tokens have loss 0

    def loss(self, x):
        return focal_po_from_logps(self._sequence_logps(x.chosen_logits, x.chosen_labels),
                                   self._sequence_logps(x.rejected_logits, x.rejected_labels),
                                   x.ref_chosen_logps, x.ref_rejected_logps, BETA, GAMMA)


# Baseline names accepted by --baselines, in the order they run. Ours always runs first; the ones
# that overwrite inputs work on private copies, so order does not change what the others see.
BASELINES = {cls.key: cls for cls in (Ours, OursInplace, OursNoLabelCheck, OursUnaligned, SequenceLogpsPadded,
                                      SequenceLogpsPacked, Eager, Compiled, TRLSelectiveLogSoftmax, LigerCrossEntropy)}


def default_baselines(device: torch.device):
    """All of them; on the CPU, torch.compile is left out (its compile alone would outlast the run)."""
    names = [k for k in BASELINES if k != "ours"]  # ours always runs
    if device.type != "cuda":
        names.remove("compile")
    return names
