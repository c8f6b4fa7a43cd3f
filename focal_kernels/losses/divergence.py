"""f-DPO (Wang et al., 2023): the score f'(t) of a log-ratio u = log t = logp − ref, as TRL 1.16 applies it.

    reverse_kl        s = u                                  (standard DPO)
    forward_kl        s = 1 − e^(−u),  exponent clamped at 700 (float64's exp overflows past 709.78;
                      the losses are computed in float64 for this type)
    js_divergence     s = log 2 + log σ(u)
    alpha_divergence  s = (e^((α−1)·u) − 1) / (α − 1),  exponent clamped at 80 as TRL does;
                      |α − 1| < 1e-6 falls back to reverse_kl (the limit)

Only losses built on the chosen − rejected score difference accept a non-default type (see `loss_spec`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# TRL clamps the alpha-divergence exponent at 80 for float32 (11 for float16) so that exp stays finite; it
# has no entry for float64. The scores here are computed in float32 or float64, and use 80 for both.
ALPHA_EXPONENT_MAX = 80.0
# forward_kl's exponent −u, clamped (its gradient 0 beyond) so that e^(−u) and differences of scores stay
# finite: u < −700 is a sequence 1e304 times less likely than under the reference.
FORWARD_KL_EXPONENT_MAX = 700.0


def _capped(exponent: torch.Tensor, cap: float) -> torch.Tensor:
    """min(exponent, cap), with gradient 0 beyond the cap; a NaN stays NaN and keeps a NaN gradient (clamp's
    backward gives it 0)."""
    return torch.where(exponent > cap, cap, exponent)


def f_divergence_scores(logratios: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """The score of each log-ratio under the named f-divergence (name already validated)."""
    if f_divergence_type == "reverse_kl":
        return logratios
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(_capped(-logratios, FORWARD_KL_EXPONENT_MAX))
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    # alpha_divergence
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    exponent = _capped((alpha - 1.0) * logratios, ALPHA_EXPONENT_MAX)
    return (torch.exp(exponent) - 1.0) * (1.0 / (alpha - 1.0))
