"""Preference-optimization losses on per-sequence log-probs (plain PyTorch, (B,) tensors).

`preference_loss` / `PreferenceLoss` compute TRL 1.16's DPO loss types, FocalPO and SimPO, alone or
combined with `loss_weights`. `LOSS_TYPES` maps each name to one small function (see `pairwise.py`).
"""

from .api import PreferenceLoss, preference_loss
from .batch import LossOptions, PairBatch, loss_spec
from .divergence import F_DIVERGENCE_TYPES
from .pairwise import LOSS_TYPES

__all__ = ["F_DIVERGENCE_TYPES", "LOSS_TYPES", "LossOptions", "PairBatch", "PreferenceLoss", "loss_spec",
           "preference_loss"]
