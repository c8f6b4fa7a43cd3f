"""Argument checks for `preference_loss`. They read Python numbers, shapes, dtypes and devices, never the
values inside a tensor, so they cost no host-device synchronization and trace cleanly under torch.compile.
"""

from __future__ import annotations

from numbers import Real

import torch

from ..checks import check_flag, is_dtensor, refuse_dtensor
from .batch import LossOptions, spec_of
from .divergence import F_DIVERGENCE_TYPES
from .pairwise import LOSS_TYPES

REDUCTIONS = ("mean", "sum", "none")


def _number(name: str, value) -> float:
    """A finite Python real (not a bool, not a tensor), as a float."""
    if isinstance(value, bool) or not isinstance(value, Real) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a Python int or float, got {type(value).__name__}")
    # x − x == 0 exactly for finite x (NaN and ±inf give NaN): a plain comparison, which torch.compile
    # guards on where math.isfinite would break the graph for a symbolic float.
    if not value - value == 0:
        raise ValueError(f"{name} must be finite, got {value}")
    if isinstance(value, int) and not -_FLOAT_MAX <= value <= _FLOAT_MAX:  # a Python int has no bound
        raise ValueError(f"{name} must be a finite float, got an int of {value.bit_length()} bits, beyond "
                         "float64's range")
    return value


_FLOAT_MAX = 1.7976931348623157e308


def resolve_loss_types(loss_type, loss_weights) -> tuple:
    """(names, weights): `loss_type` as a tuple of known names, `loss_weights` as floats (default 1.0 each)."""
    names = (loss_type,) if isinstance(loss_type, str) else loss_type
    if not isinstance(names, (list, tuple)) or not all(isinstance(name, str) for name in names):
        raise TypeError(f"loss_type must be a loss name or a list of loss names, got {loss_type!r}")
    if len(names) == 0:
        raise ValueError("loss_type must name at least one loss type")
    unknown = [name for name in names if name not in LOSS_TYPES]
    if unknown:
        raise ValueError(f"Unknown loss_type {unknown}; valid loss types are {sorted(LOSS_TYPES)}")
    if loss_weights is None:
        return tuple(names), (1.0,) * len(names)
    if not isinstance(loss_weights, (list, tuple)):
        raise TypeError(f"loss_weights must be a list of floats, got {type(loss_weights).__name__}")
    if len(loss_weights) != len(names):
        raise ValueError(f"loss_weights must have one weight per loss type: got {len(loss_weights)} weights for "
                         f"{len(names)} loss types {list(names)}")
    return tuple(names), tuple(_number(f"loss_weights[{i}]", w) for i, w in enumerate(loss_weights))


# The options' defaults (those of `preference_loss`'s signature; a test compares them): an option that no
# selected loss type reads must keep its default, or it would be silently ignored.
OPTION_DEFAULTS = {"gamma": 0.05, "detach_focal_weight": False, "label_smoothing": 0.0, "simpo_gamma": 0.5,
                   "discopop_tau": 0.05, "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5}
_OWNERS = {"gamma": "focal", "detach_focal_weight": "focal", "simpo_gamma": "simpo", "discopop_tau": "discopop"}


def reads_option(option, names, f_divergence_type="reverse_kl") -> bool:
    """Whether the loss types `names` read `option` (a name in OPTION_DEFAULTS): label_smoothing those marked
    for it, f_alpha_divergence_coef the alpha divergence, one type's own option that type, the rest all."""
    if option == "label_smoothing":
        return any(spec_of(LOSS_TYPES[name])["label_smoothing"] for name in names)
    if option == "f_alpha_divergence_coef":
        return f_divergence_type == "alpha_divergence"
    return option not in _OWNERS or _OWNERS[option] in names


def check_options(names, *, beta, gamma, detach_focal_weight, label_smoothing, simpo_gamma, discopop_tau,
                  f_divergence_type, f_alpha_divergence_coef, reduction) -> LossOptions:
    """Check the non-tensor options against the selected loss types; return them as `LossOptions`."""
    beta = _number("beta", beta)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    gamma = _number("gamma", gamma)
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    check_flag(detach_focal_weight, "detach_focal_weight")
    simpo_gamma = _number("simpo_gamma", simpo_gamma)
    discopop_tau = _number("discopop_tau", discopop_tau)
    if discopop_tau <= 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    _number("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")

    specs = {name: spec_of(LOSS_TYPES[name]) for name in names}
    label_smoothing = _number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if label_smoothing != 0.0 and not reads_option("label_smoothing", names):
        users = sorted(name for name, fn in LOSS_TYPES.items() if spec_of(fn)["label_smoothing"])
        # Older TRL smoothed its sigmoid loss (conservative DPO); TRL 1.16's does not, and neither does fk's.
        cdpo = (" (conservative DPO's smoothing of 'sigmoid' is not among them, as in TRL 1.16)"
                if {"sigmoid", "focal"} & set(names) else "")
        raise ValueError(f"label_smoothing={label_smoothing} is read by none of the loss types {list(names)}; "
                         f"only {users} use it{cdpo}. Set label_smoothing=0.0")
    if "robust" in names and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for the 'robust' loss, got {label_smoothing}")
    if "exo_pair" in names and not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in (0, 1) for the 'exo_pair' loss (the EXO paper "
                         f"recommends 1e-3), got {label_smoothing}")

    given = dict(gamma=gamma, detach_focal_weight=detach_focal_weight, simpo_gamma=simpo_gamma,
                 discopop_tau=discopop_tau)
    for option, owner in _OWNERS.items():
        if given[option] != OPTION_DEFAULTS[option] and not reads_option(option, names):
            raise ValueError(f"{option}={given[option]!r} is read only by the {owner!r} loss type, which is not "
                             f"among {list(names)}; leave it at its default ({OPTION_DEFAULTS[option]!r})")

    if not isinstance(f_divergence_type, str) or f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCE_TYPES)}, got {f_divergence_type!r}")
    if f_divergence_type != "reverse_kl":
        refused = [name for name, spec in specs.items() if not spec["f_divergence"]]
        if refused:
            allowed = sorted(name for name, fn in LOSS_TYPES.items() if spec_of(fn)["f_divergence"])
            raise ValueError(f"f_divergence_type={f_divergence_type!r} is not supported by the loss types "
                             f"{refused}; it is supported by {allowed}. Use f_divergence_type='reverse_kl'")
    alpha_default = OPTION_DEFAULTS["f_alpha_divergence_coef"]
    if float(f_alpha_divergence_coef) != alpha_default and not reads_option("f_alpha_divergence_coef", names,
                                                                             f_divergence_type):
        raise ValueError(f"f_alpha_divergence_coef={f_alpha_divergence_coef!r} is read only with "
                         f"f_divergence_type='alpha_divergence', got {f_divergence_type!r}; leave it at "
                         f"{alpha_default}")
    return LossOptions(beta=beta, gamma=gamma, detach_focal_weight=detach_focal_weight,
                       label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, discopop_tau=discopop_tau)


def _same_kind(name: str, tensor, like: torch.Tensor) -> None:
    """DTensors or plain tensors, not both: PyTorch refuses to mix them deep inside the arithmetic. (All
    DTensors, replicated log-probs say, compute a DTensor loss.)"""
    if is_dtensor(tensor) != is_dtensor(like):
        dtensor, plain = (name, "chosen_logps") if is_dtensor(tensor) else ("chosen_logps", name)
        raise TypeError(f"{dtensor} is a DTensor but {plain} is not: pass DTensors for all of the log-probs, "
                        "reference log-probs, counts and pair weights, or plain tensors for all (.to_local() "
                        "or .full_tensor())")


def _check_vector(name: str, tensor, like: torch.Tensor, *, floating: bool) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    _same_kind(name, tensor, like)
    if floating and not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if not floating and (tensor.is_complex() or tensor.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer or floating-point tensor, got {tensor.dtype}")
    if tensor.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)} (like chosen_logps), got {tuple(tensor.shape)}")
    if tensor.device != like.device:
        raise ValueError(f"{name} is on {tensor.device} but chosen_logps is on {like.device}")


def check_reference_logps(ref_chosen_logps, ref_rejected_logps, batch, device, what="logits", like=None):
    """Reference log-probs: both None (reference-free) or floating tensors of shape (B,) on `device`, the
    device of the policy's `what` (the logits or hidden states of the fused losses, the log-probs here).
    Plain tensors, or DTensors where `like` (the policy's log-probs) is one."""
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        given, missing = ("ref_chosen_logps", "ref_rejected_logps") if ref_rejected_logps is None else \
            ("ref_rejected_logps", "ref_chosen_logps")
        raise ValueError(f"{given} was given but {missing} is None: pass both reference log-probs, or neither "
                         "(reference-free)")
    for name, ref in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        if ref is None:
            continue
        if not isinstance(ref, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape ({batch},) or None, got {type(ref).__name__}")
        if like is None:
            refuse_dtensor(ref, name)
        else:
            _same_kind(name, ref, like)
        if not ref.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {ref.dtype}")
        if tuple(ref.shape) != (batch,):
            raise ValueError(f"{name} must have shape (B,) = ({batch},), got {tuple(ref.shape)}")
        if ref.device != device:
            raise ValueError(f"{name} is on {ref.device} but the {what} are on {device}")


def check_tensors(names, *, chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                  chosen_token_counts, rejected_token_counts, pair_weights) -> None:
    """Types, (B,) shapes, devices; which optional tensors the selected loss types need or refuse."""
    if not isinstance(chosen_logps, torch.Tensor):
        raise TypeError(f"chosen_logps must be a torch.Tensor, got {type(chosen_logps).__name__}")
    if not chosen_logps.is_floating_point():
        raise TypeError(f"chosen_logps must be a floating-point tensor, got {chosen_logps.dtype}")
    if chosen_logps.dim() != 1:
        raise ValueError(f"chosen_logps must be a (B,) tensor of per-sequence log-probs, got shape "
                         f"{tuple(chosen_logps.shape)}")
    _check_vector("rejected_logps", rejected_logps, chosen_logps, floating=True)

    check_reference_logps(ref_chosen_logps, ref_rejected_logps, chosen_logps.shape[0], chosen_logps.device,
                          "log-probs (chosen_logps)", like=chosen_logps)
    if ref_chosen_logps is not None and all(spec_of(LOSS_TYPES[name])["reference_free"] for name in names):
        # Only reference-free types, given references: a mistake (they would be ignored). Beside other types
        # they are those types', and a reference-free type ignores them.
        raise ValueError(f"loss type {list(names)} is reference-free: pass ref_chosen_logps=None and "
                         "ref_rejected_logps=None")

    counts = {"chosen": chosen_token_counts, "rejected": rejected_token_counts}
    for side, tensor in counts.items():
        if tensor is not None:
            _check_vector(f"{side}_token_counts", tensor, chosen_logps, floating=False)
    for name in names:
        for side in spec_of(LOSS_TYPES[name])["token_counts"]:
            if counts[side] is None:
                raise ValueError(f"loss type {name!r} is length-normalized and needs {side}_token_counts "
                                 "(the number of scored tokens per sequence)")

    if pair_weights is not None:
        _check_vector("pair_weights", pair_weights, chosen_logps, floating=True)
        refused = [name for name in names if not spec_of(LOSS_TYPES[name])["pair_weights"]]
        if refused:
            raise ValueError(f"pair_weights cannot be used with {refused}: these losses sort the batch, so "
                             "entry i is not pair i (TRL refuses use_weighting with them too)")
