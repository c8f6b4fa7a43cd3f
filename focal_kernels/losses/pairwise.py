"""One small function per loss type: (PairBatch, LossOptions) → (B,) per-pair loss, before any weighting.

The formulas are TRL 1.16's `DPOTrainer._compute_loss` (and `CPOTrainer.cpo_loss` for SimPO), written
with the same quantities. Notation: z = β·Δs with Δs = s_c − s_r the difference of the (f-divergence)
scores; r_c = β·(logp_c − ref_c), r_r = β·(logp_r − ref_r) the implicit rewards; ε = label_smoothing;
n_c, n_r the scored-token counts; σ the logistic function.

To add a loss: write a function here, mark it with `@loss_spec(...)`, add it to `LOSS_TYPES`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .batch import LossOptions, PairBatch, loss_spec


def delta_score(p: PairBatch) -> torch.Tensor:
    """Δs = s_c − s_r (`PairBatch.delta_score`, written out: torch 2.10's dynamo does not trace a NamedTuple's
    properties)."""
    return p.chosen_scores - p.rejected_scores


def _per_token(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """TRL's length normalization for ipo / sigmoid_norm: divide by the token count, at least 1."""
    return scores / counts.clamp(min=1.0)


def _smoothed_logistic(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """−(1 − ε)·log σ(x) − ε·log σ(−x): conservative DPO / cDPO; ε = 0 is −log σ(x) (the ε term left out,
    not multiplied by 0: at x = +inf that would be 0·inf = NaN)."""
    return _weighted_sum((1 - eps, -F.logsigmoid(logits)), (eps, -F.logsigmoid(-logits)))


def _weighted_sum(*terms) -> torch.Tensor:
    """Σ w·t over the (w, t) whose Python weight w is not 0: a term weighted 0 is left out, so that an
    infinite t (log σ at an infinite margin) gives no 0·inf = NaN."""
    kept = [weight * term for weight, term in terms if weight != 0]
    return sum(kept[1:], kept[0]) if kept else terms[0][1] * 0


def _sigmoid_log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """σ(x)·log σ(x), and its limit 0 (gradient 0) at x = −inf, where the product is 0·(−inf) = NaN."""
    at_limit = x == -torch.inf
    safe = torch.where(at_limit, 0.0, x)
    return torch.where(at_limit, 0.0, torch.sigmoid(safe) * F.logsigmoid(safe))


@loss_spec(f_divergence=True)
def sigmoid(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """DPO (Rafailov et al., 2023): ℓ = −log σ(z)."""
    return -F.logsigmoid(o.beta * delta_score(p))


@loss_spec(f_divergence=True)
def focal(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """FocalPO (Liu et al., ACL 2025): ℓ = −p^γ · log p, p = σ(z); γ = 0 is `sigmoid`.

    log p = log σ(z) keeps |z| = 1e4 finite; p^γ = exp(γ · log p). detach_focal_weight=True makes p^γ a
    constant in the backward. Not in TRL; takes the f-divergence scores like `sigmoid` (see the README).
    """
    log_p = F.logsigmoid(o.beta * delta_score(p))
    if o.gamma == 0:  # exactly `sigmoid`, also where log p = −inf (exp(0 · −inf) would be NaN)
        return -log_p
    # p^γ · log p → 0 as p → 0 (γ > 0), and so does its gradient: where log p = −inf the limit 0 is taken, and
    # the unselected branch is computed at log p = 0, so that its backward gives 0 there, not 0 · inf = NaN.
    at_limit = log_p == -torch.inf
    safe_log_p = torch.where(at_limit, 0.0, log_p)
    focal_weight = torch.exp(o.gamma * safe_log_p)
    if o.detach_focal_weight:
        focal_weight = focal_weight.detach()
    return torch.where(at_limit, 0.0, -focal_weight * safe_log_p)


@loss_spec(f_divergence=True)
def hinge(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """SLiC (Zhao et al., 2023): ℓ = max(0, 1 − z). relu passes a finite gradient to a NaN margin; the
    factor (1, or NaN where the margin is NaN) makes it NaN, and changes nothing else (±inf included)."""
    margin = 1 - o.beta * delta_score(p)
    nan_through = torch.where(margin.isnan(), margin, 1.0).detach()
    return torch.relu(margin) * nan_through


@loss_spec(f_divergence=True, token_counts=("chosen", "rejected"))
def ipo(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """IPO (Azar et al., 2023, Eq. 17), length-normalized as TRL does:
    ℓ = (s_c / max(n_c, 1) − s_r / max(n_r, 1) − 1/(2β))²."""
    delta = _per_token(p.chosen_scores, p.chosen_token_counts) - _per_token(p.rejected_scores,
                                                                           p.rejected_token_counts)
    return (delta - 1 / (2 * o.beta)) ** 2


@loss_spec(f_divergence=True, label_smoothing=True)
def exo_pair(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """EXO-pref (Ji et al., 2024, Eq. 16), K = 2, 0 < ε < 1:
    ℓ = σ(z)·(log σ(z) − log(1 − ε)) + σ(−z)·(log σ(−z) − log ε)."""
    z = o.beta * delta_score(p)
    eps = o.label_smoothing
    # σ(±z)·log σ(±z) with its limit 0 at z = ∓inf (the product alone is 0·(−inf) = NaN there)
    return (_sigmoid_log_sigmoid(z) - torch.sigmoid(z) * math.log1p(-eps)
            + _sigmoid_log_sigmoid(-z) - torch.sigmoid(-z) * math.log(eps))


@loss_spec()
def nca_pair(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """NCA (Chen et al., 2024): ℓ = −log σ(r_c) − ½·log σ(−r_c) − ½·log σ(−r_r)."""
    r_c, r_r = o.beta * p.chosen_logratios, o.beta * p.rejected_logratios
    return -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)


@loss_spec(f_divergence=True, label_smoothing=True)
def robust(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """Robust DPO (Chowdhury et al., 2024), ε = flip probability in [0, ½):
    ℓ = (−(1 − ε)·log σ(z) + ε·log σ(−z)) / (1 − 2ε)."""
    z = o.beta * delta_score(p)
    eps = o.label_smoothing
    return _weighted_sum((1 - eps, -F.logsigmoid(z)), (eps, F.logsigmoid(-z))) / (1 - 2 * eps)


@loss_spec()
def bco_pair(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """BCO, paired (Jung et al., 2024), as TRL 1.16 computes it, with no running-mean shift:
    ℓ = −log σ(r_c) − log σ(−r_r)."""
    return -F.logsigmoid(o.beta * p.chosen_logratios) - F.logsigmoid(-o.beta * p.rejected_logratios)


@loss_spec()
def sppo_hard(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """SPPO, hard labels (Wu et al., 2024, Eq. 4.7 with P = 1 / 0):
    ℓ = (log-ratio_c − 1/(2β))² + (log-ratio_r + 1/(2β))²."""
    return (p.chosen_logratios - 0.5 / o.beta) ** 2 + (p.rejected_logratios + 0.5 / o.beta) ** 2


@loss_spec(label_smoothing=True, per_pair=False, pair_weights=False)
def aot(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """AOT, paired (Melnyk et al., 2024): δ = sort(logp_c − logp_r) − sort(ref_c − ref_r) over the batch,
    ℓ = −(1 − ε)·log σ(βδ) − ε·log σ(−βδ). Entry i belongs to the i-th smallest margin, not to pair i."""
    policy_sorted, _ = torch.sort(p.chosen_logps - p.rejected_logps, dim=0)
    ref_sorted, _ = torch.sort(p.ref_chosen_logps - p.ref_rejected_logps, dim=0)
    return _smoothed_logistic(o.beta * (policy_sorted - ref_sorted), o.label_smoothing)


@loss_spec(label_smoothing=True, per_pair=False, pair_weights=False)
def aot_unpaired(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al., 2024): δ = sort(log-ratio_c) − sort(log-ratio_r) over the batch,
    ℓ = −(1 − ε)·log σ(βδ) − ε·log σ(−βδ). Entry i belongs to the i-th smallest log-ratios."""
    chosen_sorted, _ = torch.sort(p.chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(p.rejected_logratios, dim=0)
    return _smoothed_logistic(o.beta * (chosen_sorted - rejected_sorted), o.label_smoothing)


@loss_spec()
def apo_zero(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al., 2024, Eq. 7): ℓ = 1 − σ(r_c) + σ(r_r)."""
    return 1 - torch.sigmoid(o.beta * p.chosen_logratios) + torch.sigmoid(o.beta * p.rejected_logratios)


@loss_spec()
def apo_down(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al., 2024, Eq. 8): ℓ = σ(r_c) + 1 − σ(r_c − r_r)."""
    return (torch.sigmoid(o.beta * p.chosen_logratios)
            + 1 - torch.sigmoid(o.beta * (p.chosen_logratios - p.rejected_logratios)))


@loss_spec(f_divergence=True)
def discopop(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """DiscoPOP / log-ratio modulated loss (Chu et al., 2024, Eq. 5), m = σ(z/τ):
    ℓ = −log σ(z)·(1 − m) + e^(−z)·m.

    e^(−z)·m is evaluated as exp(−z + log σ(z/τ)): the same number where TRL's product is finite, and
    finite (not inf·0 = NaN) for very negative z when τ < 1. At z = −inf the loss is +inf (its first term;
    the second is (−inf) + inf there, and left out) with the first term's gradient.
    """
    z = o.beta * delta_score(p)
    # at z = −inf: m = 0 (taken as the constant, whose derivative log σ(z)·m' would be −inf·0), and the
    # second term is left out
    at_minus_inf = z == -torch.inf
    safe = torch.where(at_minus_inf, 0.0, z)
    modulation = torch.where(at_minus_inf, 0.0, torch.sigmoid(safe / o.discopop_tau))
    exp_term = torch.where(at_minus_inf, 0.0, torch.exp(F.logsigmoid(safe / o.discopop_tau) - safe))
    return -F.logsigmoid(z) * (1 - modulation) + exp_term


@loss_spec(f_divergence=True, token_counts=("chosen",), per_pair=False)
def sft(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """SFT (NLL) on the chosen sequences, a token mean over the whole batch: ℓ = −Σ_i logp_c,i / Σ_i n_c,i,
    repeated for every pair (as TRL does; its mean is the batch loss). Reads neither β nor the scores."""
    batch_loss = -p.chosen_logps.sum() / p.chosen_token_counts.sum()
    return batch_loss.expand(p.chosen_logps.shape[0])


@loss_spec(f_divergence=True, token_counts=("chosen", "rejected"))
def sigmoid_norm(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """Length-normalized DPO (as in TRL): ℓ = −log σ(β·(s_c / max(n_c, 1) − s_r / max(n_r, 1)))."""
    delta = _per_token(p.chosen_scores, p.chosen_token_counts) - _per_token(p.rejected_scores,
                                                                           p.rejected_token_counts)
    return -F.logsigmoid(o.beta * delta)


@loss_spec(label_smoothing=True, token_counts=("chosen", "rejected"), reference_free=True)
def simpo(p: PairBatch, o: LossOptions) -> torch.Tensor:
    """SimPO (Meng et al., 2024) as TRL's CPOTrainer computes it (cpo_alpha = 0, no NLL term), on average
    log-probs a = logp / n (no clamp, as TRL): x = a_c − a_r − γ_SimPO/β,
    ℓ = −(1 − ε)·log σ(βx) − ε·log σ(−βx)."""
    logits = (p.chosen_logps / p.chosen_token_counts - p.rejected_logps / p.rejected_token_counts
              - o.simpo_gamma / o.beta)
    return _smoothed_logistic(o.beta * logits, o.label_smoothing)


LOSS_TYPES = {
    "sigmoid": sigmoid,
    "hinge": hinge,
    "ipo": ipo,
    "exo_pair": exo_pair,
    "nca_pair": nca_pair,
    "robust": robust,
    "bco_pair": bco_pair,
    "sppo_hard": sppo_hard,
    "aot": aot,
    "aot_unpaired": aot_unpaired,
    "apo_zero": apo_zero,
    "apo_down": apo_down,
    "discopop": discopop,
    "sft": sft,
    "sigmoid_norm": sigmoid_norm,
    "focal": focal,
    "simpo": simpo,
}
