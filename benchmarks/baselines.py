"""The implementations timed side by side, all computing the same FocalPO loss from the same inputs.

    ours            focal_kernels.focal_po_loss
    ours (inplace)  the same with inplace_backward=True (the gradient overwrites the logits)
    eager           what trainers write today: .float(), log_softmax, gather, masked sum, loss in torch
    torch.compile   that same function under torch.compile
    trl             trl.trainer.utils.selective_log_softmax → the same masked sum and loss
    liger           Liger-Kernel cross-entropy, reduction="none" → the same sum and loss

Each exposes `loss(inputs) -> scalar tensor`. `overwrites_inputs` marks the ones that write into the
logits (ours in place in its backward, Liger in its forward): the runner hands them a private copy
refilled before every timed call, so the shared input sets stay intact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .environment import import_baseline
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


class Implementation:
    name = ""
    is_ours = False
    overwrites_inputs = False

    def unavailable_reason(self, device: torch.device):
        """None when it can run here, else why not (printed once, then skipped)."""
        return None

    def prepare(self, shape) -> None:
        """Called once per shape before the first call."""

    def loss(self, inputs: InputSet) -> torch.Tensor:
        raise NotImplementedError


class Ours(Implementation):
    name = "ours"
    is_ours = True

    def __init__(self, inplace_backward: bool = False):
        import focal_kernels

        self._focal_po_loss = focal_kernels.focal_po_loss
        self._inplace = inplace_backward
        if inplace_backward:
            self.name = "ours (inplace)"
            self.overwrites_inputs = True

    def loss(self, x):
        return self._focal_po_loss(*_args(x), beta=BETA, gamma=GAMMA, ignore_index=IGNORE_INDEX,
                                   inplace_backward=self._inplace).loss


class Eager(Implementation):
    name = "eager"

    def loss(self, x):
        return eager_focal_po_loss(*_args(x))


class Compiled(Implementation):
    """torch.compile of `eager_focal_po_loss`, static shapes, recompiled (after a reset) per shape so that
    the recompile limit never silently sends a shape back to eager."""

    name = "torch.compile"

    def __init__(self):
        self._key = None
        self._fn = None

    def unavailable_reason(self, device):
        if not hasattr(torch, "compile"):
            return f"torch {torch.__version__} has no torch.compile"
        return None

    def prepare(self, shape):
        if shape.compile_key != self._key:
            reset = getattr(getattr(torch, "compiler", None), "reset", None) or torch._dynamo.reset
            reset()
            self._fn = torch.compile(eager_focal_po_loss, dynamic=False)
            self._key = shape.compile_key

    def loss(self, x):
        return self._fn(*_args(x))


class TRLSelectiveLogSoftmax(Implementation):
    name = "trl"

    def __init__(self):
        self._select = None

    def unavailable_reason(self, device):
        self._select, reason = import_baseline("trl.trainer.utils", "selective_log_softmax", device)
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


class LigerCrossEntropy(Implementation):
    """Liger's kernel writes the gradient into its input during the forward. Older releases scale that
    gradient by only the first element of a reduction="none" upstream gradient; the work is the same."""

    name = "liger"
    overwrites_inputs = True

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
BASELINES = {
    "inplace": lambda: Ours(inplace_backward=True),
    "eager": Eager,
    "compile": Compiled,
    "trl": TRLSelectiveLogSoftmax,
    "liger": LigerCrossEntropy,
}


def default_baselines(device: torch.device):
    """All of them; on the CPU, torch.compile is left out (its compile alone would outlast the run)."""
    names = list(BASELINES)
    if device.type != "cuda":
        names.remove("compile")
    return names


def build_implementations(names, device: torch.device):
    """(implementations to run, [(name, reason)] skipped). Ours is always first."""
    runnable, skipped = [Ours()], []
    for name in names:
        impl = BASELINES[name]()
        reason = impl.unavailable_reason(device)
        if reason is None:
            runnable.append(impl)
        else:
            skipped.append((impl.name, reason))
    return runnable, skipped
