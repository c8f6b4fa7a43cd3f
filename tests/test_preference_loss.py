"""preference_loss: every loss type against an independent float64 reference of TRL 1.16's formula and
against TRL's own DPOTrainer._compute_loss / CPOTrainer.cpo_loss (run on a stand-in trainer, no model)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from focal_kernels.losses import LOSS_TYPES, PreferenceLoss, preference_loss
from focal_kernels.losses.batch import spec_of
from focal_kernels.output import PreferenceLossOutput

TRL_DPO_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                 "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
ALL_TYPES = TRL_DPO_TYPES + ["focal", "simpo"]
F_DIVERGENCES = ["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"]
F_DIVERGENCE_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "focal"}
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.05, "aot_unpaired": 0.05, "simpo": 0.1}
METRIC_NAMES = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected"}
F64 = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------
# The independent float64 reference: TRL's formulas, one readable expression each.
# ---------------------------------------------------------------------------------------------------------

def f_score(u, kind, alpha=0.5):
    t = torch.exp(u)
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        return 1 - 1 / t
    if kind == "js_divergence":
        return torch.log(2 * t / (t + 1))
    if abs(alpha - 1) < 1e-6:
        return u
    return (t ** (alpha - 1) - 1) / (alpha - 1)


def reference_loss(name, c, r, rc=None, rr=None, nc=None, nr=None, *, beta=0.1, gamma=0.05, ls=0.0,
                   simpo_gamma=0.5, tau=0.05, fdiv="reverse_kl", alpha=0.5):
    """(B,) per-pair loss, float64, written from TRL's source with plain expressions."""
    rc = torch.zeros_like(c) if rc is None else rc
    rr = torch.zeros_like(r) if rr is None else rr
    sig = torch.sigmoid

    def logsig(x):
        return torch.log(torch.sigmoid(x))

    lc, lr = c - rc, r - rr
    sc, sr = f_score(lc, fdiv, alpha), f_score(lr, fdiv, alpha)
    z = beta * (sc - sr)
    if name == "sigmoid":
        return -logsig(z)
    if name == "focal":
        return -sig(z) ** gamma * torch.log(sig(z))
    if name == "hinge":
        return torch.clamp(1 - z, min=0)
    if name == "ipo":
        return (sc / nc.clamp(min=1) - sr / nr.clamp(min=1) - 1 / (2 * beta)) ** 2
    if name == "exo_pair":
        return sig(z) * (logsig(z) - math.log(1 - ls)) + sig(-z) * (logsig(-z) - math.log(ls))
    if name == "nca_pair":
        return -logsig(beta * lc) - 0.5 * logsig(-beta * lc) - 0.5 * logsig(-beta * lr)
    if name == "robust":
        return ((1 - ls) * -logsig(z) - ls * -logsig(-z)) / (1 - 2 * ls)
    if name == "bco_pair":
        return -logsig(beta * lc) - logsig(-beta * lr)
    if name == "sppo_hard":
        return (lc - 1 / (2 * beta)) ** 2 + (lr + 1 / (2 * beta)) ** 2
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            d = torch.sort(c - r).values - torch.sort(rc - rr).values
        else:
            d = torch.sort(lc).values - torch.sort(lr).values
        return -(1 - ls) * logsig(beta * d) - ls * logsig(-beta * d)
    if name == "apo_zero":
        return (1 - sig(beta * lc)) + sig(beta * lr)
    if name == "apo_down":
        return sig(beta * lc) + (1 - sig(beta * (lc - lr)))
    if name == "discopop":
        m = sig(z / tau)
        return -logsig(z) * (1 - m) + torch.exp(-z) * m
    if name == "sft":
        return (-c.sum() / nc.sum()).expand(c.shape[0])
    if name == "sigmoid_norm":
        return -logsig(beta * (sc / nc.clamp(min=1) - sr / nr.clamp(min=1)))
    if name == "simpo":
        x = c / nc - r / nr - simpo_gamma / beta
        return -(1 - ls) * logsig(beta * x) - ls * logsig(-beta * x)
    raise AssertionError(name)


def make_inputs(batch=6, dtype=torch.float64, scale=4.0):
    """Log-probs with a spread like summed token log-probs, references near them, and token counts."""
    c = (-20 + scale * torch.randn(batch, dtype=torch.float64)).to(dtype).requires_grad_()
    r = (-22 + scale * torch.randn(batch, dtype=torch.float64)).to(dtype).requires_grad_()
    rc = (c.detach().double() + torch.randn(batch, dtype=torch.float64)).to(dtype).requires_grad_()
    rr = (r.detach().double() + torch.randn(batch, dtype=torch.float64)).to(dtype).requires_grad_()
    nc = torch.randint(1, 30, (batch,))
    nr = torch.randint(1, 30, (batch,))
    nc[0] = 0  # a sequence with no scored tokens (the clamp in ipo / sigmoid_norm)
    return c, r, rc, rr, nc, nr


def counts_for(name, nc, nr):
    """simpo divides by the raw count (no clamp, as TRL): give it non-zero counts."""
    return (nc.clamp(min=1), nr.clamp(min=1)) if name == "simpo" else (nc, nr)


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True)


def assert_all_close(actual, expected, **tol):
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **(tol or F64))


# ---------------------------------------------------------------------------------------------------------
# Each loss type against the reference: values and gradients, with and without reference log-probs.
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,with_ref", [(name, with_ref) for name in ALL_TYPES for with_ref in (True, False)
                                            if not (name == "simpo" and with_ref)])   # simpo: reference-free
def test_each_loss_type_matches_reference(name, with_ref):
    c, r, rc, rr, nc, nr = make_inputs()
    nc, nr = counts_for(name, nc, nr)
    refs = (rc, rr) if with_ref else (None, None)
    ls = SMOOTHING.get(name, 0.0)
    owned = {"focal": dict(gamma=0.2), "simpo": dict(simpo_gamma=0.7), "discopop": dict(discopop_tau=0.1)}
    options = dict(beta=0.3, **owned.get(name, {}))
    out = preference_loss(c, r, *refs, loss_type=name, label_smoothing=ls, chosen_token_counts=nc,
                          rejected_token_counts=nr, reduction="none", **options)
    expected = reference_loss(name, c, r, *refs, nc.double(), nr.double(), beta=0.3, gamma=0.2, ls=ls,
                              simpo_gamma=0.7, tau=0.1)
    torch.testing.assert_close(out.loss, expected, **F64)
    wrt = (c, r, rc, rr) if with_ref else (c, r)
    probe = torch.randn_like(expected)  # a random cotangent checks the whole Jacobian-vector product
    assert_all_close(grads((out.loss * probe).sum(), wrt), grads((expected * probe).sum(), wrt))


@pytest.mark.parametrize("fdiv", F_DIVERGENCES[1:])
@pytest.mark.parametrize("name", sorted(F_DIVERGENCE_TYPES))
def test_f_divergences_match_reference(name, fdiv):
    c, r, rc, rr, nc, nr = make_inputs()
    ls = SMOOTHING.get(name, 0.0)
    out = preference_loss(c, r, rc, rr, loss_type=name, label_smoothing=ls, f_divergence_type=fdiv,
                          chosen_token_counts=nc, rejected_token_counts=nr, reduction="sum",
                          **(dict(f_alpha_divergence_coef=0.3) if fdiv == "alpha_divergence" else {}),
                          **(dict(gamma=0.2) if name == "focal" else {}))
    expected = reference_loss(name, c, r, rc, rr, nc.double(), nr.double(), ls=ls, gamma=0.2, fdiv=fdiv,
                              alpha=0.3).sum()
    torch.testing.assert_close(out.loss, expected, **F64)
    assert_all_close(grads(out.loss, (c, r, rc, rr)), grads(expected, (c, r, rc, rr)))


def test_alpha_divergence_limits():
    """α = 1 is reverse_kl (TRL's fallback); α = 0 is forward_kl; the exponent is clamped at 80 as TRL does."""
    c, r, rc, rr, _, _ = make_inputs()
    base = preference_loss(c, r, rc, rr, loss_type="sigmoid").loss
    at_one = preference_loss(c, r, rc, rr, loss_type="sigmoid", f_divergence_type="alpha_divergence",
                             f_alpha_divergence_coef=1.0).loss
    torch.testing.assert_close(at_one, base, rtol=0, atol=0)
    at_zero = preference_loss(c, r, rc, rr, loss_type="sigmoid", f_divergence_type="alpha_divergence",
                              f_alpha_divergence_coef=0.0).loss
    forward = preference_loss(c, r, rc, rr, loss_type="sigmoid", f_divergence_type="forward_kl").loss
    torch.testing.assert_close(at_zero, forward, **F64)
    big = torch.tensor([500.0], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    out = preference_loss(big, zero, zero, zero, loss_type="sigmoid", f_divergence_type="alpha_divergence",
                          f_alpha_divergence_coef=2.0, beta=1.0)
    expected = -torch.nn.functional.logsigmoid(torch.tensor(math.exp(80.0) - 1.0, dtype=torch.float64))
    torch.testing.assert_close(out.loss, expected)


# ---------------------------------------------------------------------------------------------------------
# TRL's own code: DPOTrainer._compute_loss on a stand-in trainer whose "model" returns given per-token
# log-probs, and CPOTrainer.cpo_loss for SimPO.
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trl_trainers():
    pytest.importorskip("trl")
    dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    return dpo.DPOTrainer, cpo.CPOTrainer


def trl_dpo_loss(dpo_trainer, per_token, completion_mask, ref_c, ref_r, loss_types, *, loss_weights=None,
                 beta=0.1, ls=0.0, fdiv="reverse_kl", alpha=0.5, tau=0.05, log_sum_sq_probs=None):
    """TRL's DPOTrainer._compute_loss, unmodified, on per_token (2B, T) = [chosen; rejected] log-probs."""
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros_like(per_token),
                              mean_logits=torch.zeros_like(per_token),
                              is_top1=torch.zeros_like(per_token, dtype=torch.bool),
                              log_sum_sq_probs=log_sum_sq_probs)

    def model(**kwargs):
        return outputs

    model.training = False
    accelerator = SimpleNamespace(device=per_token.device, gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer = SimpleNamespace(
        model=model, accelerator=accelerator, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        beta=beta, loss_types=list(loss_types), loss_weights=loss_weights or [1.0] * len(loss_types),
        f_divergence_type=fdiv, f_alpha_divergence_coef=alpha, label_smoothing=ls,
        use_weighting=log_sum_sq_probs is not None, args=SimpleNamespace(discopop_tau=tau),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    rows, width = per_token.shape
    inputs = {"input_ids": torch.zeros(rows, width + 1, dtype=torch.long), "completion_mask": completion_mask,
              "attention_mask": torch.ones(rows, width + 1, dtype=torch.long),
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    loss = dpo_trainer._compute_loss(trainer, model, inputs, False)
    return loss, {key: values[0] for key, values in trainer._metrics["eval"].items()}


def token_batch(batch=5, width=7, dtype=torch.float64):
    """Per-token log-probs (zero off the completion), the completion mask (prompt first), references."""
    completion_mask = (torch.rand(2 * batch, width + 1) < 0.7).long()
    completion_mask[:, 0] = 0   # the first token is prompt: TRL's ipo / sigmoid_norm count the unshifted mask
    completion_mask[:, 1] = 1
    per_token = (-3 * torch.rand(2 * batch, width, dtype=torch.float64) * completion_mask[:, 1:]).to(dtype)
    per_token.requires_grad_()
    ref = (per_token.detach().sum(1) + torch.randn(2 * batch, dtype=torch.float64)).to(dtype).requires_grad_()
    return per_token, completion_mask, ref[:batch], ref[batch:]


def ours_from_tokens(per_token, completion_mask, ref_c, ref_r, loss_types, **options):
    batch = ref_c.shape[0]
    logps = per_token.sum(1)
    counts = completion_mask[:, 1:].sum(1)
    return preference_loss(logps[:batch], logps[batch:], ref_c, ref_r, loss_type=loss_types,
                           chosen_token_counts=counts[:batch], rejected_token_counts=counts[batch:], **options)


def scored_grads(loss, per_token, completion_mask, ref_c, ref_r):
    """Gradients w.r.t. the scored tokens' log-probs (TRL's sft indexes them; off-completion entries are 0
    and never reach a model) and the reference log-probs."""
    g_tokens, g_c, g_r = grads(loss, (per_token, ref_c, ref_r))
    return g_tokens * completion_mask[:, 1:], g_c, g_r


TRL_CASES = ([(name, "reverse_kl") for name in TRL_DPO_TYPES]
             + [("sigmoid", fdiv) for fdiv in F_DIVERGENCES[1:]] + [("ipo", "js_divergence"),
                                                                    ("discopop", "forward_kl")])


@pytest.mark.parametrize("name,fdiv", TRL_CASES)
def test_matches_trl_dpo_trainer(trl_trainers, name, fdiv):
    # TRL's alpha-divergence clamp table has no float64 entry: compare that one in float32.
    dtype = torch.float32 if fdiv == "alpha_divergence" else torch.float64
    per_token, mask, ref_c, ref_r = token_batch(dtype=dtype)
    ls = SMOOTHING.get(name, 0.0)
    trl_loss, trl_metrics = trl_dpo_loss(trl_trainers[0], per_token, mask, ref_c, ref_r, [name], beta=0.2, ls=ls,
                                         fdiv=fdiv)
    out = ours_from_tokens(per_token, mask, ref_c, ref_r, name, beta=0.2, label_smoothing=ls, f_divergence_type=fdiv)
    # TRL's exo_pair builds ε as a float32 tensor, so its log ε and log(1 − ε) carry float32 rounding.
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 or name == "exo_pair" else F64
    torch.testing.assert_close(out.loss, trl_loss, **tol)
    assert_all_close(scored_grads(out.loss, per_token, mask, ref_c, ref_r),
                     scored_grads(trl_loss, per_token, mask, ref_c, ref_r), **tol)
    for key, value in trl_metrics.items():
        if key in METRIC_NAMES:
            assert out.metrics[key].item() == pytest.approx(value, rel=1e-6, abs=1e-9), key


@pytest.mark.parametrize("weighting", [False, True], ids=["plain", "use_weighting"])
def test_weighted_combination_matches_trl(trl_trainers, weighting):
    per_token, mask, ref_c, ref_r = token_batch()
    types, weights = ["sigmoid", "ipo", "sft", "bco_pair", "sigmoid_norm"], [0.8, 0.2, 1.0, 0.5, 0.3]
    log_sum_sq = pair_weights = None
    if weighting:
        # TRL 1.16 crashes on sft with use_weighting (an in-place multiply of its expanded batch loss), so the
        # weighted comparison leaves sft out; test_pair_weights covers sft with pair_weights.
        types, weights = types[:2] + types[3:], weights[:2] + weights[3:]
        # TRL's WPO weights: exp(mean over completion of (logp − log Σ p²)), computed without gradient.
        log_sum_sq = -torch.rand_like(per_token.detach())
        shifted = mask[:, 1:]
        mean_logps = ((per_token.detach() - log_sum_sq) * shifted).sum(1) / shifted.sum(1).clamp_min(1)
        w = torch.exp(mean_logps)
        pair_weights = w[:5] * w[5:]
    trl_loss, _ = trl_dpo_loss(trl_trainers[0], per_token, mask, ref_c, ref_r, types, loss_weights=weights,
                               log_sum_sq_probs=log_sum_sq)
    out = ours_from_tokens(per_token, mask, ref_c, ref_r, types, loss_weights=weights, pair_weights=pair_weights)
    torch.testing.assert_close(out.loss, trl_loss, **F64)
    assert_all_close(scored_grads(out.loss, per_token, mask, ref_c, ref_r),
                     scored_grads(trl_loss, per_token, mask, ref_c, ref_r))


@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_simpo_matches_trl_cpo_loss(trl_trainers, ls):
    """CPOTrainer.cpo_loss with loss_type="simpo" on average log-probs; loss = mean (cpo_alpha = 0: no NLL)."""
    c, r, _, _, nc, nr = make_inputs()
    nc, nr = counts_for("simpo", nc, nr)
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.7, beta=2.0, label_smoothing=ls,
                              accelerator=SimpleNamespace(device=c.device))
    trl_losses, trl_chosen_rewards, _ = trl_trainers[1].cpo_loss(trainer, c / nc, r / nr)
    out = preference_loss(c, r, loss_type="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=ls,
                          chosen_token_counts=nc, rejected_token_counts=nr)
    torch.testing.assert_close(out.loss, trl_losses.mean(), **F64)
    assert_all_close(grads(out.loss, (c, r)), grads(trl_losses.mean(), (c, r)))
    # Rewards here are β·logp (summed), the same definition for every loss type; TRL's CPO logs β·(logp / n).
    torch.testing.assert_close(out.chosen_rewards, 2.0 * c.detach())
    torch.testing.assert_close(trl_chosen_rewards, 2.0 * c.detach() / nc)


# ---------------------------------------------------------------------------------------------------------
# Combination, reductions, pair weights.
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weighted_list_and_reductions(reduction):
    c, r, rc, rr, nc, nr = make_inputs()
    types, weights = ["focal", "ipo", "sft", "aot", "robust"], [2.0, 0.5, 0.1, 1.0, -0.3]
    out = preference_loss(c, r, rc, rr, loss_type=types, loss_weights=weights, label_smoothing=0.1,
                          chosen_token_counts=nc, rejected_token_counts=nr, reduction=reduction)
    reduce = {"mean": torch.mean, "sum": torch.sum, "none": lambda x: x}[reduction]
    expected = sum(w * reduce(reference_loss(t, c, r, rc, rr, nc.double(), nr.double(), ls=0.1))
                   for t, w in zip(types, weights))
    torch.testing.assert_close(out.loss, expected, **F64)
    assert out.loss.shape == ((6,) if reduction == "none" else ())
    probe = torch.randn_like(expected)
    assert_all_close(grads((out.loss * probe).sum(), (c, r, rc, rr)), grads((expected * probe).sum(), (c, r, rc, rr)))


def test_default_weights_are_one_and_single_name_equals_list():
    c, r, rc, rr, nc, nr = make_inputs()
    both = preference_loss(c, r, rc, rr, loss_type=["sigmoid", "hinge"]).loss
    separate = (preference_loss(c, r, rc, rr, loss_type="sigmoid").loss
                + preference_loss(c, r, rc, rr, loss_type=("hinge",)).loss)
    torch.testing.assert_close(both, separate, **F64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_pair_weights(reduction):
    c, r, rc, rr, nc, nr = make_inputs()
    pw = torch.rand(6, dtype=torch.float64, requires_grad=True)
    types, weights = ["sigmoid", "sft", "nca_pair"], [1.0, 0.5, 2.0]
    out = preference_loss(c, r, rc, rr, loss_type=types, loss_weights=weights, pair_weights=pw,
                          chosen_token_counts=nc, reduction=reduction)
    reduce = {"mean": torch.mean, "sum": torch.sum, "none": lambda x: x}[reduction]
    expected = sum(w * reduce(pw * reference_loss(t, c, r, rc, rr, nc.double())) for t, w in zip(types, weights))
    torch.testing.assert_close(out.loss, expected, **F64)
    probe = torch.randn_like(expected)
    assert_all_close(grads((out.loss * probe).sum(), (c, r, pw)), grads((expected * probe).sum(), (c, r, pw)))
    # sft is a batch-level loss: weighting it multiplies the batch NLL by mean(pair_weights), as in TRL.
    sft = preference_loss(c, r, loss_type="sft", pair_weights=pw, chosen_token_counts=nc).loss
    torch.testing.assert_close(sft, (-c.sum() / nc.sum()) * pw.mean(), **F64)


def test_reduction_none_entries_are_pairs():
    """Per-pair types: entry i depends on pair i only; aot sorts (entry i is not pair i); sft repeats."""
    c, r, rc, rr, nc, nr = make_inputs()
    for name in ALL_TYPES:
        nci, nri = counts_for(name, nc, nr)
        refs = () if name == "simpo" else (rc, rr)
        kwargs = dict(loss_type=name, label_smoothing=SMOOTHING.get(name, 0.0), chosen_token_counts=nci,
                      rejected_token_counts=nri, reduction="none")
        full = preference_loss(c, r, *refs, **kwargs).loss
        if spec_of(LOSS_TYPES[name])["per_pair"]:
            one = preference_loss(c[2:3], r[2:3], *(t[2:3] for t in refs), **{**kwargs,
                                  "chosen_token_counts": nci[2:3], "rejected_token_counts": nri[2:3]}).loss
            torch.testing.assert_close(full[2:3], one, **F64)
        else:
            assert name in ("aot", "aot_unpaired", "sft")
    sft = preference_loss(c, r, loss_type="sft", chosen_token_counts=nc, reduction="none").loss
    assert torch.equal(sft, sft[:1].expand(6))


# ---------------------------------------------------------------------------------------------------------
# FocalPO specifics, extreme margins, NaN, dtypes.
# ---------------------------------------------------------------------------------------------------------

def test_focal_gamma_zero_is_sigmoid_under_every_f_divergence():
    c, r, rc, rr, _, _ = make_inputs()
    for fdiv in F_DIVERGENCES:
        focal = preference_loss(c, r, rc, rr, loss_type="focal", gamma=0.0, f_divergence_type=fdiv).loss
        dpo = preference_loss(c, r, rc, rr, loss_type="sigmoid", f_divergence_type=fdiv).loss
        torch.testing.assert_close(focal, dpo, **F64)


@pytest.mark.parametrize("detach", [False, True])
def test_focal_gradient_formula(detach):
    """dℓ/dz = −p^γ(1 − p)(1 + γ log p); with detach_focal_weight, −p^γ(1 − p)."""
    c, r, _, _, _, _ = make_inputs()
    beta, gamma = 0.3, 0.4
    out = preference_loss(c, r, loss_type="focal", beta=beta, gamma=gamma, detach_focal_weight=detach,
                          reduction="sum")
    g_c, g_r = grads(out.loss, (c, r))
    p = torch.sigmoid(beta * (c - r)).detach()
    dz = -p ** gamma * (1 - p) * (1 if detach else 1 + gamma * torch.log(p))
    torch.testing.assert_close(g_c, beta * dz, **F64)
    torch.testing.assert_close(g_r, -beta * dz, **F64)
    plain = preference_loss(c, r, loss_type="focal", beta=beta, gamma=gamma, reduction="sum").loss
    torch.testing.assert_close(out.loss, plain, rtol=0, atol=0)  # detaching changes gradients only


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_extreme_margins_stay_finite(sign, dtype):
    """|z| = 1e4 (β = 0.1, margin 1e5): every loss and gradient finite (all formulas are finite there)."""
    c = torch.full((3,), sign * 5e4, dtype=dtype, requires_grad=True)
    r = torch.full((3,), -sign * 5e4, dtype=dtype, requires_grad=True)
    zero = torch.zeros(3, dtype=dtype)
    ones = torch.ones(3)
    for name in ALL_TYPES:
        refs = () if name == "simpo" else (zero, zero)
        out = preference_loss(c, r, *refs, loss_type=name, label_smoothing=SMOOTHING.get(name, 0.0), beta=0.1,
                              chosen_token_counts=ones, rejected_token_counts=ones)
        assert torch.isfinite(out.loss), name
        assert all(torch.isfinite(g).all() for g in grads(out.loss, (c, r))), name
    sigmoid = preference_loss(c, r, loss_type="sigmoid").loss
    focal = preference_loss(c, r, loss_type="focal", gamma=0.05).loss
    if sign > 0:
        assert sigmoid.item() == 0.0 and focal.item() == 0.0
    else:
        assert sigmoid.item() == pytest.approx(1e4) and 0.0 <= focal.item() < 1e-100


def test_discopop_is_finite_where_the_product_form_overflows():
    """TRL's e^(−z)·σ(z/τ) is inf·0 = NaN for very negative z; the same value is computed stably here."""
    c = torch.tensor([-2000.0, -3.0, 4.0], requires_grad=True)
    r = torch.zeros(3)
    out = preference_loss(c, r, loss_type="discopop", beta=1.0, reduction="none")
    assert torch.isfinite(out.loss).all() and torch.isfinite(grads(out.loss.sum(), (c,))[0]).all()
    torch.testing.assert_close(out.loss[1:], reference_loss("discopop", c.double(), r.double(), beta=1.0)[1:].float())
    assert out.loss[0].item() == pytest.approx(2000.0)


@pytest.mark.parametrize("f_divergence_type", F_DIVERGENCES)
def test_nan_in_nan_out(f_divergence_type):
    """A NaN log-prob gives a NaN loss, and a NaN gradient for its pair, under every f-divergence (hinge's relu,
    and the clamps of forward_kl's and alpha_divergence's exponents, gave it a finite one); sft is linear in
    the log-probs, so its gradient does not depend on them."""
    c, r, rc, rr, nc, nr = make_inputs()
    c = c.detach().clone()
    c[1] = float("nan")
    c.requires_grad_(True)
    for name in ALL_TYPES:
        if f_divergence_type != "reverse_kl" and name not in F_DIVERGENCE_TYPES:
            continue
        refs = () if name == "simpo" else (rc, rr)
        nci, nri = counts_for(name, nc, nr)
        out = preference_loss(c, r, *refs, loss_type=name, label_smoothing=SMOOTHING.get(name, 0.0),
                              chosen_token_counts=nci, rejected_token_counts=nri, f_divergence_type=f_divergence_type,
                              f_alpha_divergence_coef=0.3 if f_divergence_type == "alpha_divergence" else 0.5)
        assert torch.isnan(out.loss), name
        grad = grads(out.loss, (c,))[0]
        assert torch.isnan(grad[1]) != (name == "sft"), (name, grad)
        assert torch.isfinite(grad[[0, 2, 3, 4, 5]]).all(), (name, grad)
    per_pair = preference_loss(c, r, rc, rr, reduction="none", f_divergence_type=f_divergence_type).loss
    assert torch.isnan(per_pair[1]) and torch.isfinite(per_pair[[0, 2, 3, 4, 5]]).all()


def test_empty_batch_sums_to_zero():
    """B = 0 (a rank's empty share of a batch): "sum" gives 0 and "none" an empty tensor, with gradients;
    "mean" would be NaN and raises (test_errors)."""
    c, r = torch.zeros(0, requires_grad=True), torch.zeros(0)
    for name in ("sigmoid", "focal", "ipo", "aot"):
        counts = dict(chosen_token_counts=torch.ones(0), rejected_token_counts=torch.ones(0))
        out = preference_loss(c, r, r, r, loss_type=name, reduction="sum", **counts)
        assert out.loss.item() == 0 and grads(out.loss, (c,))[0].shape == (0,)
        assert preference_loss(c, r, r, r, loss_type=name, reduction="none", **counts).loss.shape == (0,)


@pytest.mark.parametrize("dtype,expected", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                            (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_compute_dtype(dtype, expected):
    c, r, rc, rr, nc, nr = make_inputs(dtype=dtype)
    out = preference_loss(c, r, rc, rr, loss_type=["focal", "ipo"], chosen_token_counts=nc,
                          rejected_token_counts=nr)
    assert out.loss.dtype == expected and out.chosen_rewards.dtype == expected
    assert all(v.dtype == expected for v in out.metrics.values())
    g_c, g_rc = grads(out.loss, (c, rc))
    assert g_c.dtype == dtype and g_rc.dtype == dtype
    c32, r32, rc32, rr32 = (t.detach().double() for t in (c, r, rc, rr))
    expected_loss = (reference_loss("focal", c32, r32, rc32, rr32).mean()
                     + reference_loss("ipo", c32, r32, rc32, rr32, nc.double(), nr.double()).mean())
    torch.testing.assert_close(out.loss.double(), expected_loss, rtol=1e-5, atol=1e-5)


def test_mixed_dtypes_compute_in_the_widest():
    c, r, rc, rr, _, _ = make_inputs()
    out = preference_loss(c.bfloat16(), r.bfloat16(), rc.float(), rr.float())
    assert out.loss.dtype == torch.float32
    out = preference_loss(c.float(), r.float(), rc, rr)
    assert out.loss.dtype == torch.float64


# ---------------------------------------------------------------------------------------------------------
# Outputs: inputs returned, rewards, metrics.
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_ref", [True, False])
def test_outputs_rewards_and_metrics(with_ref):
    c, r, rc, rr, _, _ = make_inputs()
    refs = (rc, rr) if with_ref else (None, None)
    out = preference_loss(c, r, *refs, loss_type="sigmoid", beta=0.25, f_divergence_type="js_divergence")
    assert isinstance(out, PreferenceLossOutput) and out._fields[-1] == "metrics"
    assert out.chosen_logps is c and out.rejected_logps is r
    grads(out.loss, (out.chosen_logps, out.rejected_logps))
    chosen_rewards = 0.25 * (c - (rc if with_ref else 0)).detach()     # log-ratios: no f-divergence
    rejected_rewards = 0.25 * (r - (rr if with_ref else 0)).detach()
    torch.testing.assert_close(out.chosen_rewards, chosen_rewards, **F64)
    torch.testing.assert_close(out.rejected_rewards, rejected_rewards, **F64)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad
    expected = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": c.detach().mean(),
        "logps/rejected": r.detach().mean(),
    }
    assert set(out.metrics) == set(expected)
    for key, value in out.metrics.items():
        assert value.dim() == 0 and not value.requires_grad, key
        torch.testing.assert_close(value, expected[key], **F64)


def test_no_host_sync_on_meta_tensors():
    """Meta tensors hold no data: any .item(), bool(tensor) or value-dependent branch would raise."""
    batch = 4

    def meta(**kw):
        return torch.empty(batch, device="meta", **kw)

    for name in ALL_TYPES:
        for reduction in ("mean", "sum", "none"):
            c, r = meta(requires_grad=True), meta(dtype=torch.bfloat16)
            refs = () if name == "simpo" else (meta(), meta())
            out = preference_loss(c, r, *refs, loss_type=[name, "sigmoid"], loss_weights=[0.5, 1.0],
                                  label_smoothing=SMOOTHING.get(name, 0.0), chosen_token_counts=meta(),
                                  rejected_token_counts=meta(dtype=torch.long),
                                  pair_weights=None if name.startswith("aot") else meta(), reduction=reduction)
            assert out.loss.device.type == "meta" and all(v.device.type == "meta" for v in out.metrics.values())
            grads(out.loss.sum(), (c,))


# ---------------------------------------------------------------------------------------------------------
# Errors.
# ---------------------------------------------------------------------------------------------------------

def _tensors():
    c, r, rc, rr, nc, nr = make_inputs(batch=3)
    return dict(chosen_logps=c, rejected_logps=r, ref_chosen_logps=rc, ref_rejected_logps=rr), nc, nr


ERROR_CASES = [
    (dict(loss_type="dpo"), ValueError, "valid loss types are"),
    (dict(loss_type=["sigmoid", "kto"]), ValueError, r"Unknown loss_type \['kto'\]"),
    (dict(loss_type=[]), ValueError, "at least one"),
    (dict(loss_type=3), TypeError, "loss_type"),
    (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), ValueError, "loss_weights"),
    (dict(loss_weights=["1"]), TypeError, r"loss_weights\[0\]"),
    (dict(loss_weights=1.0), TypeError, "loss_weights"),
    (dict(loss_type="robust", label_smoothing=0.5), ValueError, "robust"),
    (dict(loss_type="exo_pair"), ValueError, "exo_pair"),
    (dict(loss_type="exo_pair", label_smoothing=1.0), ValueError, "exo_pair"),
    (dict(label_smoothing=0.1), ValueError, "label_smoothing"),
    (dict(loss_type=["sigmoid", "hinge"], label_smoothing=0.1), ValueError, "conservative DPO's smoothing"),
    (dict(loss_type="hinge", label_smoothing=0.1), ValueError, r"use it\. Set label_smoothing=0\.0"),
    (dict(loss_type="aot", label_smoothing=1.5), ValueError, "label_smoothing"),
    (dict(loss_type="nca_pair", f_divergence_type="forward_kl"), ValueError, "f_divergence_type"),
    (dict(loss_type=["sigmoid", "aot"], f_divergence_type="js_divergence"), ValueError, r"\['aot'\]"),
    (dict(loss_type="simpo", f_divergence_type="js_divergence", ref_chosen_logps=None, ref_rejected_logps=None),
     ValueError, "f_divergence_type"),
    (dict(f_divergence_type="kl"), ValueError, "f_divergence_type"),
    (dict(f_alpha_divergence_coef="0.5"), TypeError, "f_alpha_divergence_coef"),
    (dict(loss_type="ipo"), ValueError, "chosen_token_counts"),
    (dict(loss_type="sigmoid_norm", chosen_token_counts="nc"), ValueError, "rejected_token_counts"),
    (dict(loss_type="sft"), ValueError, "chosen_token_counts"),
    (dict(loss_type="simpo", ref_chosen_logps=None, ref_rejected_logps=None), ValueError, "chosen_token_counts"),
    (dict(loss_type="simpo", chosen_token_counts="nc", rejected_token_counts="nr"), ValueError, "reference-free"),
    (dict(ref_rejected_logps=None), ValueError, "ref_chosen_logps was given but ref_rejected_logps"),
    (dict(ref_chosen_logps=None), ValueError, "ref_rejected_logps was given but ref_chosen_logps"),
    (dict(beta=0.0), ValueError, "beta"),
    (dict(beta=-1), ValueError, "beta"),
    (dict(beta=float("nan")), ValueError, "beta"),
    (dict(beta=float("inf")), ValueError, "beta"),
    (dict(beta=torch.tensor(0.1)), TypeError, "beta"),
    (dict(beta=True), TypeError, "beta"),
    (dict(gamma=-0.1), ValueError, "gamma"),
    (dict(discopop_tau=0.0), ValueError, "discopop_tau"),
    (dict(simpo_gamma=None), TypeError, "simpo_gamma"),
    (dict(reduction="avg"), ValueError, "reduction"),
    (dict(reduction=None), ValueError, "reduction"),
    (dict(detach_focal_weight=1), TypeError, "detach_focal_weight"),
    (dict(detach_focal_weight=torch.tensor(True)), TypeError, "detach_focal_weight"),
    (dict(detach_focal_weight=np.bool_(True)), TypeError, r"a Python bool\), got .*numpy"),
    (dict(chosen_logps=torch.zeros(0), rejected_logps=torch.zeros(0), ref_chosen_logps=torch.zeros(0),
          ref_rejected_logps=torch.zeros(0)), ValueError, r"no pairs \(B = 0\): reduction='mean'"),
    (dict(chosen_logps=[1.0, 2.0, 3.0]), TypeError, "chosen_logps"),
    (dict(chosen_logps=torch.zeros(3, dtype=torch.long)), TypeError, "chosen_logps"),
    (dict(chosen_logps=torch.zeros(3, 1)), ValueError, "chosen_logps"),
    (dict(rejected_logps=torch.zeros(4)), ValueError, "rejected_logps"),
    (dict(rejected_logps=torch.zeros(3, dtype=torch.int32)), TypeError, "rejected_logps"),
    (dict(ref_chosen_logps=torch.zeros(3, device="meta")), ValueError, "ref_chosen_logps"),
    (dict(ref_rejected_logps=torch.zeros(2)), ValueError, "ref_rejected_logps"),
    (dict(chosen_token_counts=torch.ones(3, dtype=torch.bool)), TypeError, "chosen_token_counts"),
    (dict(rejected_token_counts=torch.ones(2)), ValueError, "rejected_token_counts"),
    (dict(pair_weights=torch.ones(3, dtype=torch.long)), TypeError, "pair_weights"),
    (dict(pair_weights=torch.ones(3, device="meta")), ValueError, "pair_weights"),
    (dict(loss_type="aot", pair_weights=torch.ones(3)), ValueError, "pair_weights"),
]


@pytest.mark.parametrize("kwargs,error,match", ERROR_CASES, ids=[f"{i}-{c[2][:24]}" for i, c in
                                                                 enumerate(ERROR_CASES)])
def test_errors(kwargs, error, match):
    tensors, nc, nr = _tensors()
    kwargs = {key: {"nc": nc, "nr": nr}.get(value, value) if isinstance(value, str) and key.endswith("counts")
              else value for key, value in kwargs.items()}
    kwargs = {**tensors, **kwargs}
    with pytest.raises(error, match=match):
        preference_loss(**kwargs)


def test_module_checks_options_at_construction():
    with pytest.raises(ValueError, match="beta"):
        PreferenceLoss(beta=0.0)
    with pytest.raises(ValueError, match="valid loss types"):
        PreferenceLoss(loss_type="nope")
    with pytest.raises(ValueError, match="f_divergence_type"):
        PreferenceLoss(loss_type="aot", f_divergence_type="forward_kl")
    with pytest.raises(TypeError, match="pass it at each call"):
        PreferenceLoss(pair_weights=torch.ones(2))
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['bta'\]"):
        PreferenceLoss(bta=0.2)


def test_reference_free_type_beside_reference_based_types():
    """["sigmoid", "simpo"] with references: sigmoid reads them, simpo ignores them (as the trainer computes
    it); simpo alone refuses them (they would be ignored)."""
    c, r, rc, rr, nc, nr = make_inputs()
    counts = dict(chosen_token_counts=nc, rejected_token_counts=nr, reduction="none")
    mixed = preference_loss(c, r, rc, rr, loss_type=["sigmoid", "simpo"], loss_weights=[1.0, 0.5], **counts).loss
    expected = (preference_loss(c, r, rc, rr, loss_type="sigmoid", **counts).loss
                + 0.5 * preference_loss(c, r, loss_type="simpo", **counts).loss)
    torch.testing.assert_close(mixed, expected, **F64)
    with pytest.raises(ValueError, match="reference-free"):
        preference_loss(c, r, rc, rr, loss_type="simpo", **counts)


def test_module_options_are_attributes():
    """As PyTorch's losses keep `reduction`: an attribute changed after construction is used (and checked)."""
    c, r, rc, rr, _, _ = make_inputs()
    module = PreferenceLoss(beta=0.1)
    assert module.reduction == "mean" and module.beta == 0.1 and module.loss_type == ["focal"]
    module.beta, module.reduction = 0.5, "none"
    torch.testing.assert_close(module(c, r, rc, rr).loss,
                               preference_loss(c, r, rc, rr, beta=0.5, reduction="none").loss, **F64)
    module.beta = -1.0
    with pytest.raises(ValueError, match="beta"):
        module(c, r, rc, rr)
    # loss_weights not given stays None: a loss_type changed later gets equal weights (it raised about
    # loss_weights, which the constructor had filled in as [1.0])
    module = PreferenceLoss(loss_type="sigmoid")
    assert module.loss_weights is None
    module.loss_type = ["sigmoid", "hinge"]
    torch.testing.assert_close(module(c, r, rc, rr).loss,
                               preference_loss(c, r, rc, rr, loss_type=["sigmoid", "hinge"]).loss, **F64)
    # a module pickled by 0.2.0 (its options in one dict attribute) still loads and computes the same
    state = PreferenceLoss(beta=0.3, reduction="sum").__getstate__()
    state["options"] = {name: state.pop(name) for name in PreferenceLoss._OPTION_NAMES}
    old = PreferenceLoss.__new__(PreferenceLoss)
    old.__setstate__(state)
    torch.testing.assert_close(old(c, r, rc, rr).loss, preference_loss(c, r, rc, rr, beta=0.3, reduction="sum").loss,
                               **F64)


# ---------------------------------------------------------------------------------------------------------
# gradcheck, module form, extensibility, torch.compile.
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,options", [
    ("focal", dict(gamma=0.3)),
    ("discopop", dict(discopop_tau=0.5)),
    ("exo_pair", dict(label_smoothing=0.01)),
    ("ipo", dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.4)),
    ("aot", dict(label_smoothing=0.1)),
    ("simpo", dict(label_smoothing=0.1)),
])
def test_gradcheck(name, options):
    c, r, rc, rr, nc, nr = make_inputs(batch=4, scale=2.0)
    nc, nr = counts_for(name, nc, nr)
    refs = () if name == "simpo" else (rc, rr)

    def fn(*tensors):
        return preference_loss(*tensors, loss_type=name, beta=0.5, chosen_token_counts=nc,
                               rejected_token_counts=nr, reduction="none", **options).loss

    assert torch.autograd.gradcheck(fn, (c, r, *refs))


def test_module_form_matches_function():
    c, r, rc, rr, nc, nr = make_inputs()
    options = dict(loss_type=["focal", "sft"], loss_weights=[1.0, 0.1], beta=0.2, gamma=0.1, reduction="sum")
    module = PreferenceLoss(**options)
    assert isinstance(module, torch.nn.Module) and len(module.state_dict()) == 0   # no state, bco_pair included
    assert "loss_type=['focal', 'sft']" in repr(module)
    pw = torch.rand(6, dtype=torch.float64)
    out = module(c, r, rc, rr, chosen_token_counts=nc, pair_weights=pw)
    expected = preference_loss(c, r, rc, rr, chosen_token_counts=nc, pair_weights=pw, **options)
    assert torch.equal(out.loss, expected.loss)
    assert all(torch.equal(out.metrics[k], expected.metrics[k]) for k in expected.metrics)
    bco = PreferenceLoss(loss_type="bco_pair")
    assert torch.equal(bco(c, r, rc, rr).loss, bco(c, r, rc, rr).loss)   # stateless: same batch, same loss


def test_a_new_loss_is_one_function_and_one_entry(monkeypatch):
    def squared_margin(pairs, options):
        """ℓ = (β·Δs)²"""
        return (options.beta * pairs.delta_score) ** 2

    monkeypatch.setitem(LOSS_TYPES, "squared_margin", squared_margin)
    c, r, rc, rr, _, _ = make_inputs()
    out = preference_loss(c, r, rc, rr, loss_type=["squared_margin", "sigmoid"], beta=0.2)
    expected = ((0.2 * ((c - rc) - (r - rr))) ** 2).mean() + reference_loss("sigmoid", c, r, rc, rr, beta=0.2).mean()
    torch.testing.assert_close(out.loss, expected, **F64)
    with pytest.raises(ValueError, match="f_divergence_type"):   # unmarked: refuses f-divergences by default
        preference_loss(c, r, loss_type="squared_margin", f_divergence_type="forward_kl")


@pytest.mark.parametrize("case", ["focal", "sigmoid+sft"])
def test_torch_compile_fullgraph(case):
    torch._dynamo.reset()
    compiled = torch.compile(preference_loss, fullgraph=True, backend="aot_eager")
    c, r, rc, rr, nc, nr = make_inputs(dtype=torch.float32)
    if case == "focal":
        args, kwargs = (c, r, rc, rr), dict(loss_type="focal", beta=0.2, gamma=0.3, detach_focal_weight=True)
    else:
        args = (c, r, rc, rr)
        kwargs = dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.2], chosen_token_counts=nc,
                      pair_weights=torch.rand(6), reduction="none")
    out, expected = compiled(*args, **kwargs), preference_loss(*args, **kwargs)
    torch.testing.assert_close(out.loss, expected.loss)
    probe = torch.randn_like(expected.loss)
    assert_all_close(grads((out.loss * probe).sum(), args), grads((expected.loss * probe).sum(), args),
                     rtol=1e-6, atol=1e-6)
    assert set(out.metrics) == METRIC_NAMES
    for key in METRIC_NAMES:
        torch.testing.assert_close(out.metrics[key], expected.metrics[key])


def test_focal_at_minus_infinite_log_prob():
    """log p = −inf (a −inf log-prob): γ = 0 is exactly sigmoid's +inf; γ > 0 takes the limit p^γ·log p → 0."""
    chosen = torch.tensor([-math.inf, -1.0], dtype=torch.float64)
    rejected = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    dpo = preference_loss(chosen, rejected, loss_type="sigmoid", reduction="none").loss
    focal0 = preference_loss(chosen, rejected, loss_type="focal", gamma=0.0, reduction="none").loss
    assert torch.equal(focal0, dpo) and focal0[0] == math.inf
    focal = preference_loss(chosen, rejected, loss_type="focal", gamma=0.5, reduction="none").loss
    assert focal[0] == 0 and torch.isfinite(focal[1])
    from focal_kernels import reference  # the spec says the same, gradient included
    assert torch.equal(reference.focal_po_pair_loss(chosen, rejected, gamma=0.5), focal)
    assert torch.equal(reference.focal_po_pair_loss(chosen, rejected, gamma=0.0), dpo)
    leaf = chosen.clone().requires_grad_(True)
    (spec_grad,) = torch.autograd.grad(reference.focal_po_pair_loss(leaf, rejected, gamma=0.5).sum(), [leaf])
    assert spec_grad[0] == 0 and torch.isfinite(spec_grad).all()
    # ... and so does its gradient (0 there, not 0 · inf = NaN), the other pair's unchanged.
    leaves = [chosen.clone().requires_grad_(True), rejected.clone().requires_grad_(True)]
    grads = torch.autograd.grad(preference_loss(*leaves, loss_type="focal", gamma=0.5).loss, leaves)
    finite = [x[1:].clone().requires_grad_(True) for x in (chosen, rejected)]
    expected = torch.autograd.grad(preference_loss(*finite, loss_type="focal", gamma=0.5, reduction="sum").loss / 2,
                                   finite)
    for grad, want in zip(grads, expected):
        assert grad[0] == 0 and torch.allclose(grad[1:], want)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_infinite_margins_give_limits_not_nan(sign):
    """A ±inf chosen log-prob: no loss type gives a NaN loss or gradient (TRL's formulas multiply 0 by an
    infinity in exo_pair, discopop and the ε-smoothed losses at ε = 0); the other pairs are unchanged."""
    for name in ALL_TYPES:
        per_pair = spec_of(LOSS_TYPES[name])["per_pair"]
        for eps in sorted({0.0, SMOOTHING.get(name, 0.0)} - ({0.0} if name == "exo_pair" else set())):
            c = torch.tensor([sign * math.inf, -1.0, -2.0], dtype=torch.float64, requires_grad=True)
            r = torch.tensor([-1.5, -1.0, -3.0], dtype=torch.float64, requires_grad=True)
            zero, ones = torch.zeros(3, dtype=torch.float64), torch.ones(3)
            refs = () if name == "simpo" else (zero, zero)
            options = dict(loss_type=name, label_smoothing=eps, reduction="none")
            out = preference_loss(c, r, *refs, chosen_token_counts=ones, rejected_token_counts=ones, **options)
            assert not out.loss.isnan().any(), (name, eps, out.loss)
            assert not any(g.isnan().any() for g in grads(out.loss.sum(), (c, r))), (name, eps)
            if per_pair:
                rest = preference_loss(c[1:], r[1:], *(t[1:] for t in refs), chosen_token_counts=ones[1:],
                                       rejected_token_counts=ones[1:], **options).loss
                torch.testing.assert_close(out.loss[1:], rest, **F64)
    z = torch.tensor([sign * math.inf], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    exo = preference_loss(z, zero, loss_type="exo_pair", label_smoothing=0.1).loss
    # the limit: σ(z)·(log σ(z) − log(1 − ε)) + σ(−z)·(log σ(−z) − log ε) → −log(1 − ε) at +inf, −log ε at −inf
    assert exo.item() == pytest.approx(-math.log(0.9) if sign > 0 else -math.log(0.1))
    discopop = preference_loss(z, zero, loss_type="discopop").loss
    assert discopop.item() == (0.0 if sign > 0 else math.inf)


def test_forward_kl_below_float32_range():
    """forward_kl's score 1 − e^(−u) overflows float32 at u < −88: float32 log-probs still give the float64
    reference's loss (computed in float64, returned in float32)."""
    c, r = torch.tensor([-100.0, -1.0]), torch.tensor([-120.0, -2.0])
    zero = torch.zeros(2)
    out = preference_loss(c, r, zero, zero, loss_type="sigmoid", f_divergence_type="forward_kl", reduction="none")
    want = reference_loss("sigmoid", c.double(), r.double(), zero.double(), zero.double(), fdiv="forward_kl")
    assert out.loss.dtype == torch.float32 and out.chosen_rewards.dtype == torch.float32
    torch.testing.assert_close(out.loss, want.float())
    # past float64's exp range (u < −709.78) the exponent is clamped: no NaN loss or gradient, also when both
    # sides saturate
    for chosen, rejected in ((-1.0, -800.0), (-750.0, -750.0), (-800.0, -801.0)):
        c = torch.tensor([chosen], dtype=torch.float64, requires_grad=True)
        r = torch.tensor([rejected], dtype=torch.float64, requires_grad=True)
        for name in ("sigmoid", "focal", "hinge", "discopop", "exo_pair", "robust", "ipo", "sigmoid_norm"):
            ones = torch.ones(1)
            loss = preference_loss(c, r, loss_type=name, f_divergence_type="forward_kl", chosen_token_counts=ones,
                                   rejected_token_counts=ones, label_smoothing=SMOOTHING.get(name, 0.0)).loss
            # (ipo squares a score difference of ~1e304: +inf, the value's own overflow, not a NaN)
            assert not loss.isnan() and not any(g.isnan().any() for g in grads(loss, (c, r))), (name, c, r)


def test_accuracy_metric_is_nan_for_a_nan_reward():
    c = torch.tensor([float("nan"), 1.0])
    zero = torch.zeros(2)
    assert preference_loss(c, zero, zero, zero).metrics["rewards/accuracies"].isnan()
    assert preference_loss(c[1:], zero[1:]).metrics["rewards/accuracies"].item() == 1.0


def test_huge_int_option_names_the_argument():
    c = torch.zeros(2)
    with pytest.raises(ValueError, match="beta must be a finite float"):
        preference_loss(c, c, beta=10 ** 400)


def test_a_loss_type_weighted_zero_is_left_out():
    """0 · inf = NaN: a type with weight 0 does not make an infinite-margin pair's loss NaN."""
    c, r = torch.tensor([-math.inf, -1.0]), torch.tensor([-2.0, -2.0])
    out = preference_loss(c, r, loss_type=["focal", "sigmoid"], loss_weights=[1.0, 0.0], reduction="none").loss
    torch.testing.assert_close(out, preference_loss(c, r, loss_type="focal", reduction="none").loss)
    leaf = c.clone().requires_grad_(True)
    zero = preference_loss(leaf, r, loss_type=["focal", "sigmoid"], loss_weights=[0.0, 0.0]).loss
    assert zero.item() == 0.0 and zero.requires_grad
    # every weight 0, the types infinite at that pair (sigmoid: +inf) or of infinite derivative (ipo, with a
    # reference at -inf; sppo_hard): still 0, with zero gradients; a NaN log-prob still gives NaN
    counts = torch.tensor([3.0, 2.0])
    ref = (torch.tensor([0.0, -1.0]), torch.tensor([-math.inf, -2.0]))
    for loss_type in ("sigmoid", ["sigmoid", "hinge"], "ipo", "sppo_hard"):
        weights = [0.0] * (1 if isinstance(loss_type, str) else 2)
        r_leaf = r.clone().requires_grad_(True)
        kw = dict(loss_type=loss_type, reduction="none", chosen_token_counts=counts, rejected_token_counts=counts)
        with torch.enable_grad():
            full = preference_loss(leaf, r_leaf, *ref, **kw).loss
            full_grad = torch.autograd.grad(full.sum(), (leaf, r_leaf))
        assert full[0].isinf() or not all(g[0].isfinite() for g in full_grad), loss_type
        out = preference_loss(leaf, r_leaf, *ref, loss_weights=weights, **kw).loss
        assert out.tolist() == [0.0, 0.0]
        grads = torch.autograd.grad(out.sum(), (leaf, r_leaf))
        assert all(g.tolist() == [0.0, 0.0] for g in grads), (loss_type, grads)
        nan = preference_loss(torch.tensor([math.nan, -1.0]), r, *ref, loss_weights=weights, **kw).loss
        assert nan[0].isnan() and nan[1] == 0.0
