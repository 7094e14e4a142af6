"""Preference losses: pure functions of sequence log-prob tensors.

Every loss takes the same tensors, each of shape (B,) for B preference pairs:

    policy_chosen_logps, policy_rejected_logps        log pi_theta(y|x), summed over completion tokens
    reference_chosen_logps, reference_rejected_logps  log pi_ref(y|x), summed likewise
    chosen_lengths, rejected_lengths                  completion token counts (for length-averaged losses)

and returns `(losses, chosen_rewards, rejected_rewards)`, all (B,), unreduced. For every loss
with a reference the rewards are DPO's implicit rewards beta * (log pi_theta(y|x) - log pi_ref(y|x)),
detached, used for the `rewards/*` metrics whatever the loss. `LOSSES` maps the config's `pref_loss` to the function.
KTO on unpaired examples (`kto_loss`, in `UNPAIRED_LOSSES`) takes per-example tensors instead; see its docstring.

Reference-free losses (`REFERENCE_FREE`: `simpo`, `orpo`, `sft`) take the same positional arguments, so
every loss is called one way, but ignore the two reference tensors: the training loop passes None
for them and never loads a reference model. Their rewards are beta * the policy's length-averaged
log-prob, beta * log pi_theta(y|x) / |y| (as LLaMA-Factory and TRL's CPO/ORPO trainers log them),
since there is no reference to form a log-ratio with.

`chosen_nll` is the per-token NLL of each chosen completion, -log pi_theta(y_w|x) / |y_w|: the SFT
term that `pref_ftx` adds to any loss (`CombinedLoss`), normalised per pair as LLaMA-Factory does, and
the `nll_loss` metric.

Hyperparameters beyond beta are keyword-only parameters named as their config keys
(`label_smoothing`, `discopop_tau`, `simpo_gamma`); a loss declares only those it uses, and
`loss_options(name)` reads them from its signature: the config binds exactly those keys and
refuses a value that the chosen loss would ignore. `CombinedLoss` is what a run optimises: one loss
or a weighted sum of several, plus LLaMA-Factory's pref_ftx and pref_bco_weight terms, with BCO's
running reward shift as explicit state that checkpoints save and restore.

Adding a loss touches this file (the function and its `LOSSES` entry; `REFERENCE_FREE` if it needs
no reference), its name in preftune/config/names.py (config's torch-free copy of these names, kept
equal by tests/test_config.py), its tests (tests/test_losses.py: a hand-computed value;
tests/test_loss_parity.py: the TRL case, where TRL has it) and docs/losses.md. Its keyword-only
hyperparameters must be config keys (a new one is a field of `config.TrainConfig`); nothing else
changes. Notation in the docstrings:

    r_w = log pi(y_w|x) - log pi_ref(y_w|x),  r_l likewise for y_l  (summed log-ratios)
    h = r_w - r_l                                                    (DPO's margin)
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F


def _logratios(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    return policy_chosen_logps - reference_chosen_logps, policy_rejected_logps - reference_rejected_logps


def _per_token(chosen, rejected, chosen_lengths, rejected_lengths):
    """Per-sequence sums (log-probs or log-ratios) -> per-token averages, (B,) each."""
    return chosen / chosen_lengths.clamp(min=1), rejected / rejected_lengths.clamp(min=1)


def _rewards(beta, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    return beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _smoothed_logistic(logits, label_smoothing):
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z): the logistic loss when a share eps of the
    labels is flipped. logsigmoid is stable for large |z|; log(sigmoid()) is not."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def _f_divergence_scores(logratios, f_divergence_type, f_alpha_divergence_coef):
    """f'(t) at t = pi/pi_ref = exp(logratio), the score f-DPO puts where DPO has the log-ratio
    (Wang et al. 2023, "Beyond Reverse KL", https://arxiv.org/abs/2309.16240, Table 1 and Thm. 1)."""
    if f_divergence_type == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":  # f'(t) = log(2t / (1 + t)) = log 2 + log sigmoid(log t)
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence" and abs(f_alpha_divergence_coef - 1) >= 1e-6:
        # f'(t) = (t^(alpha-1) - 1) / (alpha - 1); the exponent clamped so that exp() stays finite in
        # the input's dtype (at 11 for float16, else 80), as TRL
        t = (f_alpha_divergence_coef - 1) * logratios
        clamp = 11.0 if t.dtype == torch.float16 else 80.0
        return (torch.exp(t.float().clamp(max=clamp)) - 1).to(t.dtype) / (f_alpha_divergence_coef - 1)
    return logratios  # reverse_kl, and alpha_divergence's limit alpha -> 1: f'(t) = log t (+1, which cancels)


def _scores(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            f_divergence_type, f_alpha_divergence_coef):
    """(s_w, s_l) = (f'(exp r_w), f'(exp r_l)), (B,) each: what the losses built on DPO's margin use in
    place of (r_w, r_l), h_f = s_w - s_l; (r_w, r_l) themselves under reverse_kl (DPO), as TRL 1.16's
    DPOTrainer computes its `delta_score` before any loss type."""
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    return (_f_divergence_scores(chosen_logratios, f_divergence_type, f_alpha_divergence_coef),
            _f_divergence_scores(rejected_logratios, f_divergence_type, f_alpha_divergence_coef))


def sigmoid_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 beta, chosen_lengths, rejected_lengths, *, label_smoothing=0.0, f_divergence_type="reverse_kl",
                 f_alpha_divergence_coef=0.5):
    """DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, Eq. 7). Summed log-probs.

        loss = -log sigmoid(beta * h)

    With label_smoothing = eps > 0, conservative DPO (cDPO, Mitchell 2023,
    https://ericmitchell.ai/cdpo.pdf), for labels flipped with probability eps:

        loss = -(1 - eps) log sigmoid(beta * h) - eps log sigmoid(-beta * h)

    Deliberate difference from TRL 1.16, whose `sigmoid` ignores label_smoothing: we apply it, as
    TRL did before and as LLaMA-Factory's `dpo_label_smoothing` ("cDPO") expects.

    f-DPO (Wang et al. 2023, https://arxiv.org/abs/2309.16240): DPO's reverse KL regulariser
    replaced by the f-divergence `f_divergence_type` puts f'(pi/pi_ref) where h has the log-ratios,
    h_f = f'(exp r_w) - f'(exp r_l), in the same loss (with cDPO's eps too):

        reverse_kl         f'(t) = log t                      (DPO)
        forward_kl         f'(t) = 1 - 1/t
        js_divergence      f'(t) = log(2t / (1 + t))
        alpha_divergence   f'(t) = (t^(alpha-1) - 1) / (alpha - 1), alpha = f_alpha_divergence_coef

    as TRL 1.16's DPOTrainer. The rewards stay DPO's beta * r. The losses built on DPO's margin take
    f_divergence_type too (hinge, ipo, robust, exo_pair, discopop, sigmoid_norm: those TRL allows it with);
    the config refuses it with the others, which score each completion's own log-ratio, or none.
    """
    chosen_scores, rejected_scores = _scores(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                             reference_rejected_logps, f_divergence_type, f_alpha_divergence_coef)
    losses = _smoothed_logistic(beta * (chosen_scores - rejected_scores), label_smoothing)
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def hinge_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
               beta, chosen_lengths, rejected_lengths, *, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """Hinge loss on the DPO margin (SLiC, Zhao et al. 2023, https://arxiv.org/abs/2305.10425). Summed log-probs.

        loss = max(0, 1 - beta * h)   1/beta is the margin in log-ratio units.

    f_divergence_type: h_f = f'(exp r_w) - f'(exp r_l) in place of h (f-DPO, see `sigmoid_loss`), as TRL 1.16.
    """
    chosen_scores, rejected_scores = _scores(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                             reference_rejected_logps, f_divergence_type, f_alpha_divergence_coef)
    losses = torch.relu(1 - beta * (chosen_scores - rejected_scores))
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, chosen_lengths, rejected_lengths, *, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, Eq. 17; beta is the paper's tau).
    Length-averaged log-probs.

        h_avg = r_w / |y_w| - r_l / |y_l|
        loss = (h_avg - 1 / (2 * beta))^2

    Why averaged: with summed log-probs the squared loss grows with completion length, so one
    beta would mean different things for short and long pairs. TRL and the IPO authors use the
    per-token average, and so do we. The reported rewards stay summed (beta * log-ratio), as in TRL.
    f_divergence_type: the scores f'(exp r) averaged in place of r (f-DPO, see `sigmoid_loss`), as TRL 1.16.
    """
    chosen_scores, rejected_scores = _per_token(
        *_scores(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 f_divergence_type, f_alpha_divergence_coef),
        chosen_lengths, rejected_lengths)
    losses = (chosen_scores - rejected_scores - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def robust_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                beta, chosen_lengths, rejected_lengths, *, label_smoothing=0.0, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """Robust DPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409). Summed log-probs.
    label_smoothing = eps in [0, 0.5) is the probability that a preference label is flipped:

        loss = [-(1 - eps) log sigmoid(beta * h) + eps log sigmoid(-beta * h)] / (1 - 2 eps)

    An unbiased estimate of the clean-label DPO loss under flips (eps = 0 gives DPO). Unlike cDPO,
    whose minimum is at a finite margin (sigmoid(z) = 1 - eps), it keeps falling as the margin grows.

    f_divergence_type: h_f = f'(exp r_w) - f'(exp r_l) in place of h (f-DPO, see `sigmoid_loss`), as TRL 1.16.
    """
    chosen_scores, rejected_scores = _scores(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                             reference_rejected_logps, f_divergence_type, f_alpha_divergence_coef)
    logits = beta * (chosen_scores - rejected_scores)
    losses = (-(1 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)) \
        / (1 - 2 * label_smoothing)
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def exo_pair_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta, chosen_lengths, rejected_lengths, *, label_smoothing, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """EXO for pairs (Ji et al. 2024, https://arxiv.org/abs/2402.00856, Eq. 16 with K = 2). Summed log-probs.
    The reverse KL from the policy's preference distribution q = (sigmoid(beta h), sigmoid(-beta h))
    to the smoothed labels p = (1 - eps, eps), eps = label_smoothing > 0 (the paper suggests 1e-3):

        loss = sigmoid(beta h) [log sigmoid(beta h) - log(1 - eps)] + sigmoid(-beta h) [log sigmoid(-beta h) - log eps]

    eps = 0 would put log 0 in the loss, so it has no default and the config requires eps > 0.

    f_divergence_type: h_f = f'(exp r_w) - f'(exp r_l) in place of h (f-DPO, see `sigmoid_loss`), as TRL 1.16.
    """
    chosen_scores, rejected_scores = _scores(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                             reference_rejected_logps, f_divergence_type, f_alpha_divergence_coef)
    logits = beta * (chosen_scores - rejected_scores)
    eps = torch.tensor(label_smoothing, dtype=logits.dtype, device=logits.device)
    losses = (torch.sigmoid(logits) * (F.logsigmoid(logits) - torch.log1p(-eps))
              + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - torch.log(eps)))
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def nca_pair_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta, chosen_lengths, rejected_lengths):
    """NCA for pairs (Chen et al. 2024, https://arxiv.org/abs/2402.05369, with K = 2). Summed log-probs.
    Each response's own reward beta * r is scored, not only the margin, so the loss pushes the
    chosen likelihood up in absolute terms (DPO only widens the gap):

        loss = -log sigmoid(beta r_w) - 1/2 log sigmoid(-beta r_w) - 1/2 log sigmoid(-beta r_l)
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    chosen, rejected = beta * chosen_logratios, beta * rejected_logratios
    losses = -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def bco_pair_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta, chosen_lengths, rejected_lengths):
    """BCO on pairs (Jung et al. 2024, https://arxiv.org/abs/2404.04656, without the reward
    shift delta, as in TRL 1.16). Summed log-probs. Chosen is classified as good, rejected as bad:

        loss = -log sigmoid(beta r_w) - log sigmoid(-beta r_l)
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    losses = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def sppo_hard_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                   beta, chosen_lengths, rejected_lengths):
    """SPPO, hard-label version (Wu et al. 2024, https://arxiv.org/abs/2405.00675, Eq. 4.7 of
    Algorithm 1 with P = 1 for chosen and 0 for rejected). Summed log-probs. Each log-ratio is
    regressed to its own target, +-1/(2 beta) (the paper's eta = 1/beta):

        loss = (r_w - 1/(2 beta))^2 + (r_l + 1/(2 beta))^2
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    losses = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def aot_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, chosen_lengths, rejected_lengths, *, label_smoothing=0.0):
    """AOT, paired (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882). Summed log-probs.
    Distributional: the policy's log-likelihood gaps g = log pi(y_w|x) - log pi(y_l|x) of the batch
    should dominate the reference's g_ref, which in one dimension means sorted against sorted:

        d_(i) = sort(g)_(i) - sort(g_ref)_(i)
        loss_(i) = -(1 - eps) log sigmoid(beta d_(i)) - eps log sigmoid(-beta d_(i))

    The losses are in sorted order, not pair order, and depend on the whole micro-batch (B = 1 is
    DPO). The rewards are per pair as for every loss.
    """
    logratios_sorted, _ = torch.sort(policy_chosen_logps - policy_rejected_logps, dim=0)
    ref_logratios_sorted, _ = torch.sort(reference_chosen_logps - reference_rejected_logps, dim=0)
    losses = _smoothed_logistic(beta * (logratios_sorted - ref_logratios_sorted), label_smoothing)
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def aot_unpaired_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                      beta, chosen_lengths, rejected_lengths, *, label_smoothing=0.0):
    """AOT, unpaired (Melnyk et al. 2024, https://arxiv.org/abs/2406.05882). Summed log-probs.
    The batch's chosen log-ratios r_w should dominate its rejected log-ratios r_l as distributions,
    sorted against sorted (pairing is not used):

        d_(i) = sort(r_w)_(i) - sort(r_l)_(i)
        loss_(i) = -(1 - eps) log sigmoid(beta d_(i)) - eps log sigmoid(-beta d_(i))

    Losses in sorted order and batch-dependent, as for `aot_loss`.
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
    losses = _smoothed_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def apo_zero_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta, chosen_lengths, rejected_lengths):
    """APO-zero (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266, Eq. 7). Summed log-probs.
    For chosen answers better than the model's own: chosen likelihood up, rejected down.

        loss = (1 - sigmoid(beta r_w)) + sigmoid(beta r_l)
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    losses = 1 - torch.sigmoid(beta * chosen_logratios) + torch.sigmoid(beta * rejected_logratios)
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def apo_down_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta, chosen_lengths, rejected_lengths):
    """APO-down (D'Oosterlinck et al. 2024, https://arxiv.org/abs/2408.06266, Eq. 8). Summed log-probs.
    For chosen answers worse than the model's own: both likelihoods down, rejected more.

        loss = sigmoid(beta r_w) + (1 - sigmoid(beta (r_w - r_l)))
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    losses = torch.sigmoid(beta * chosen_logratios) + 1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def discopop_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta, chosen_lengths, rejected_lengths, *, discopop_tau=0.05, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """DiscoPOP, the log-ratio modulated loss (Lu et al. 2024, https://arxiv.org/abs/2406.08414, Eq. 5).
    Summed log-probs. A blend of the logistic (DPO) and exponential losses, mixed by the margin:

        z = beta * h,  w = sigmoid(z / tau)
        loss = (1 - w) * (-log sigmoid(z)) + w * exp(-z)

    tau = discopop_tau (the paper's and TRL's default 0.05).

    f_divergence_type: h_f = f'(exp r_w) - f'(exp r_l) in place of h (f-DPO, see `sigmoid_loss`), as TRL 1.16.
    """
    chosen_scores, rejected_scores = _scores(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                             reference_rejected_logps, f_divergence_type, f_alpha_divergence_coef)
    logits = beta * (chosen_scores - rejected_scores)
    weight = torch.sigmoid(logits / discopop_tau)
    losses = -F.logsigmoid(logits) * (1 - weight) + torch.exp(-logits) * weight
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def sigmoid_norm_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                      beta, chosen_lengths, rejected_lengths, *, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5):
    """Length-normalized DPO (Tulu 3, Lambert et al. 2024, https://arxiv.org/abs/2411.15124;
    as in SimPO's length normalization, but with the reference). Length-averaged log-probs:

        loss = -log sigmoid(beta * (r_w / |y_w| - r_l / |y_l|))

    beta is per token here, so useful values are larger than for `sigmoid` (Tulu 3 uses 5).
    The reported rewards stay summed, as in TRL.
    f_divergence_type: the scores f'(exp r) averaged in place of r (f-DPO, see `sigmoid_loss`), as TRL 1.16.
    """
    chosen_scores, rejected_scores = _per_token(
        *_scores(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 f_divergence_type, f_alpha_divergence_coef),
        chosen_lengths, rejected_lengths)
    losses = -F.logsigmoid(beta * (chosen_scores - rejected_scores))
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def chosen_nll(policy_chosen_logps, chosen_lengths):
    """-log pi(y_w|x) / |y_w|, (B,): the chosen completion's NLL per token, for each pair."""
    return -policy_chosen_logps / chosen_lengths.clamp(min=1)


def kto_pair_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta, chosen_lengths, rejected_lengths):
    """KTO on pairs, as LLaMA-Factory's `kto_pair` computes it (TRL 0.8-0.9's DPOTrainer, which it calls;
    HALOs/KTO, Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, Eq. 7 with both weights 1).
    Summed log-probs. The KL reference point of each side is estimated on the other side of the
    micro-batch, z_w = max(0, mean_batch r_w) and z_l = max(0, mean_batch r_l):

        loss = 1/2 [(1 - sigmoid(beta (r_w - z_l))) + (1 - sigmoid(beta (z_w - r_l)))]

    TRL returned the 2B chosen and rejected terms side by side; the mean over pairs of this half-sum is
    the same number. As there, gradients flow through z_w and z_l (the KTO paper detaches its
    reference point), and a pair's loss depends on the micro-batch.
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    chosen_kl, rejected_kl = chosen_logratios.mean().clamp(min=0), rejected_logratios.mean().clamp(min=0)
    losses = 0.5 * ((1 - torch.sigmoid(beta * (chosen_logratios - rejected_kl)))
                    + (1 - torch.sigmoid(beta * (chosen_kl - rejected_logratios))))
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def bco_shifted_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                     beta, reward_shift):
    """BCO with its reward shift delta (Jung et al. 2024, https://arxiv.org/abs/2404.04656), the term
    LLaMA-Factory's `pref_bco_weight` mixes into a loss (`CombinedLoss` keeps delta, a running mean of
    the batch-mean rewards). Summed log-probs:

        loss = -log sigmoid(beta r_w - delta) - log sigmoid(-(beta r_l - delta))
    """
    chosen_logratios, rejected_logratios = _logratios(policy_chosen_logps, policy_rejected_logps,
                                                      reference_chosen_logps, reference_rejected_logps)
    return (-F.logsigmoid(beta * chosen_logratios - reward_shift)
            - F.logsigmoid(-(beta * rejected_logratios - reward_shift)))


def simpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
               beta, chosen_lengths, rejected_lengths, *, simpo_gamma=0.5):
    """SimPO (Meng et al. 2024, https://arxiv.org/abs/2405.14734, Eq. 6). Reference-free (the reference
    tensors are ignored; pass None). Length-averaged log-probs, the reward is beta * log pi(y|x) / |y|:

        loss = -log sigmoid(beta * (log pi(y_w)/|y_w| - log pi(y_l)/|y_l|) - gamma)

    gamma = simpo_gamma is the target reward margin in reward units (after beta), as in the paper and
    LLaMA-Factory (which writes it as beta * (diff - gamma / beta); its default 0.5 is ours) and as
    TRL's CPOTrainer with loss_type simpo. The paper's beta is larger
    than DPO's (2 to 10) because it scales a per-token average.
    """
    chosen_avg, rejected_avg = _per_token(policy_chosen_logps, policy_rejected_logps,
                                              chosen_lengths, rejected_lengths)
    losses = -F.logsigmoid(beta * (chosen_avg - rejected_avg) - simpo_gamma)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def orpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
              beta, chosen_lengths, rejected_lengths):
    """ORPO (Hong et al. 2024, https://arxiv.org/abs/2403.07691, Eqs. 6-7). Reference-free (the
    reference tensors are ignored; pass None). Length-averaged log-probs a = log pi(y|x) / |y|, as in
    LLaMA-Factory and TRL's ORPOTrainer; beta is the paper's lambda (paper and TRL: 0.1):

        log odds(y) = a - log(1 - e^a)
        loss = -a_w + beta * (-log sigmoid(log odds(y_w) - log odds(y_l)))

    The first term is the NLL of chosen per token (the SFT part), so ORPO needs no separate SFT stage.
    log(1 - e^a) is computed as log(-expm1(a)), exact also for a near 0.
    """
    chosen_avg, rejected_avg = _per_token(policy_chosen_logps, policy_rejected_logps,
                                              chosen_lengths, rejected_lengths)
    log_odds = (chosen_avg - rejected_avg) - (torch.log(-torch.expm1(chosen_avg)) - torch.log(-torch.expm1(rejected_avg)))
    losses = -chosen_avg - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def sft_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, chosen_lengths, rejected_lengths):
    """SFT on chosen as a loss of its own, TRL's `sft` loss_type (for combinations such as
    `[sigmoid, bco_pair, sft]`). Reference-free (reference tensors ignored). The NLL is averaged over
    all chosen tokens of the micro-batch, as TRL does, and given to every pair, so that the mean over
    pairs is that token average:

        loss_i = -sum_j log pi(y_w,j|x_j) / sum_j |y_w,j|    (the same for every pair i)

    Long completions weigh more than in `pref_ftx`, whose NLL is per token within each pair
    (LLaMA-Factory). Rewards beta * log pi(y|x) / |y|, as for the other reference-free losses.
    """
    nll = -policy_chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)
    chosen_avg, rejected_avg = _per_token(policy_chosen_logps, policy_rejected_logps,
                                              chosen_lengths, rejected_lengths)
    return nll.expand_as(policy_chosen_logps), beta * chosen_avg.detach(), beta * rejected_avg.detach()


def kto_loss(policy_logps, reference_logps, policy_kl_logps, reference_kl_logps, labels, beta, *,
             kto_chosen_weight=1.0, kto_rejected_weight=1.0):
    """KTO (Ethayarajh et al. 2024, https://arxiv.org/abs/2402.01306, Eq. 7), as TRL 1.16's KTOTrainer.
    Summed log-probs. Unpaired: B examples (x, y), each desirable (label True) or undesirable, with
    r = log pi(y|x) - log pi_ref(y|x). The reference point z_ref = KL(pi || pi_ref) is estimated on
    the micro-batch's mismatched pairs (x_i, y'_i) (each prompt with another example's completion),
    clamped at 0 and detached, as in the paper (a baseline, not something to optimise):

        z_ref = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])
        loss = w_D (1 - sigmoid(beta (r - z_ref)))   for a desirable y,   w_D = kto_chosen_weight
        loss = w_U (1 - sigmoid(beta (z_ref - r)))   for an undesirable y, w_U = kto_rejected_weight

    policy_logps, reference_logps, labels: (B,); policy_kl_logps, reference_kl_logps: (B,) for the
    mismatched pairs. Returns (losses, rewards, z_ref): (B,), (B,) in example order, rewards beta * r
    detached, and the scalar z_ref. In `UNPAIRED_LOSSES`, not `LOSSES`: its inputs are unpaired.
    """
    z_ref = (policy_kl_logps - reference_kl_logps).mean().detach().clamp(min=0)
    logratios = policy_logps - reference_logps
    losses = torch.where(labels, kto_chosen_weight * (1 - torch.sigmoid(beta * (logratios - z_ref))),
                         kto_rejected_weight * (1 - torch.sigmoid(beta * (z_ref - logratios))))
    return losses, beta * logratios.detach(), z_ref


def reward_model_loss(chosen_rewards, rejected_rewards, margin=None, center_rewards_coefficient=None):
    """The Bradley-Terry loss of a reward model (stage: rm), as TRL 1.16's RewardTrainer. Not a loss of
    `LOSSES`: it takes the reward model's scores r(x, y), (B,) each, not log-probs. Under Bradley-Terry,
    P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l)) (the model DPO is derived from; Ouyang et al. 2022,
    https://arxiv.org/abs/2203.02155, Eq. 1), so the loss is its negative log-likelihood, per pair:

        loss_i = -log sigmoid(r_w,i - r_l,i - m_i) + c * (r_w,i + r_l,i)^2

    m_i: the pair's `margin` (B,) where the data has one (Llama 2's margin loss, Touvron et al. 2023,
    https://arxiv.org/abs/2307.09288, Eq. 2: pairs labelled as clearly better must be separated by more),
    else 0. c: center_rewards_coefficient (Eisenstein et al. 2023, https://arxiv.org/abs/2312.09244, Eq. 2),
    a pull of the rewards toward mean zero; the mean over the B pairs of c * (r_w + r_l)^2 is TRL's
    c * mean((r_w + r_l)^2). Unset (None) or 0: no term. Returns the (B,) losses, unreduced."""
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    losses = -F.logsigmoid(logits)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses


LOSSES = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "robust": robust_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "kto_pair": kto_pair_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "sft": sft_loss,
}

# Losses of unpaired examples (prompt, completion, label), with their own signature.
UNPAIRED_LOSSES = {"kto": kto_loss}

# Losses that use no reference model: the loop loads none and computes no KL to it.
REFERENCE_FREE = frozenset({"simpo", "orpo", "sft"})


def loss_options(name: str) -> tuple[str, ...]:
    """The config keys loss `name` takes beyond beta: its function's keyword-only parameters."""
    fn = LOSSES.get(name) or UNPAIRED_LOSSES[name]
    return tuple(p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY)


class RunningMean:
    """A mean over the values seen so far, with its state as plain numbers for checkpoints."""

    def __init__(self):
        self.mean, self.count = 0.0, 0

    def update(self, value: float) -> float:
        self.count += 1
        self.mean += (value - self.mean) / self.count
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = state["mean"], state["count"]


class CombinedLoss:
    """What a paired run optimises, called as a single loss is (same arguments, same three outputs):
    the losses `names`, each with its keyword options bound (`options[name]`), summed per pair with
    `weights` (default 1.0 each), so the mean over pairs is sum_k w_k * mean(loss_k) as in TRL; then
    pref_bco_weight = w > 0 mixes in BCO with its reward shift as LLaMA-Factory does,
    (loss + w * bco) / (1 + w); then pref_ftx * chosen_nll (LLaMA-Factory's SFT term) is added.

    BCO's shift delta is the running mean, over the calls of this objective, of each micro-batch's
    mean reward beta * (r_w, r_l), this call's included: a training run keeps one (saved in its
    checkpoints through `state_dict`), each evaluation pass builds its own (LLaMA-Factory
    shares one between training and evaluation), and with several processes each keeps its own
    (LLaMA-Factory gathers).

    Rewards come from the first loss in the list that uses the reference (DPO's implicit rewards),
    else from the first loss. With aot/aot_unpaired in a sum, per-pair values mix sorted and pair
    order; only their mean (the training loss) is meaningful then.
    """

    def __init__(self, names: list[str], weights: list[float] | None = None, options: dict[str, dict] | None = None,
                 pref_ftx: float = 0.0, pref_bco_weight: float = 0.0):
        options = options or {}
        self.loss_fns = [functools.partial(LOSSES[name], **options.get(name, {})) for name in names]
        self.weights = weights or [1.0] * len(names)
        self.rewards_from = next((k for k, name in enumerate(names) if name not in REFERENCE_FREE), 0)
        self.pref_ftx, self.pref_bco_weight = pref_ftx, pref_bco_weight
        self.bco_shift = RunningMean()

    def __call__(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 beta, chosen_lengths, rejected_lengths):
        total = None
        for k, (loss_fn, weight) in enumerate(zip(self.loss_fns, self.weights)):
            losses, chosen_rewards, rejected_rewards = loss_fn(
                policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                beta, chosen_lengths, rejected_lengths)
            term = losses if weight == 1.0 else weight * losses
            total = term if total is None else total + term
            if k == self.rewards_from:
                rewards = chosen_rewards, rejected_rewards
        if self.pref_bco_weight:
            batch_reward = beta * torch.cat((policy_chosen_logps - reference_chosen_logps,
                                             policy_rejected_logps - reference_rejected_logps)).mean().item()
            bco = bco_shifted_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                   reference_rejected_logps, beta, self.bco_shift.update(batch_reward))
            total = (total + self.pref_bco_weight * bco) / (1 + self.pref_bco_weight)
        if self.pref_ftx:
            total = total + self.pref_ftx * chosen_nll(policy_chosen_logps, chosen_lengths)
        return total, *rewards

    def state_dict(self) -> dict:
        return {"bco_shift": self.bco_shift.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.bco_shift.load_state_dict(state["bco_shift"])
