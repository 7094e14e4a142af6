"""Preference losses: pure functions of sequence log-prob tensors.

Every loss takes the same tensors, each of shape (B,) for B preference pairs:

    policy_chosen_logps, policy_rejected_logps        log pi_theta(y|x), summed over completion tokens
    reference_chosen_logps, reference_rejected_logps  log pi_ref(y|x), summed likewise
    chosen_lengths, rejected_lengths                  completion token counts (for length-averaged losses)

and returns `(losses, chosen_rewards, rejected_rewards)`, all (B,), unreduced. The rewards are
DPO's implicit rewards beta * (log pi_theta(y|x) - log pi_ref(y|x)), detached, used for the
`rewards/*` metrics whatever the loss. `LOSSES` maps the config's `pref_loss` to the function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rewards(beta, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return chosen_rewards, rejected_rewards


def sigmoid_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 beta, chosen_lengths, rejected_lengths):
    """DPO (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, Eq. 7). Summed log-probs.

        h = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
        loss = -log sigmoid(beta * h)
    """
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    losses = -F.logsigmoid(beta * h)  # logsigmoid is stable for large |h|; log(sigmoid()) is not
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def hinge_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
               beta, chosen_lengths, rejected_lengths):
    """Hinge loss on the DPO margin (SLiC, Zhao et al. 2023, https://arxiv.org/abs/2305.10425). Summed log-probs.

        loss = max(0, 1 - beta * h)   with h as in `sigmoid_loss`; 1/beta is the margin in log-ratio units.
    """
    h = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)
    losses = torch.relu(1 - beta * h)
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


def ipo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
             beta, chosen_lengths, rejected_lengths):
    """IPO (Azar et al. 2023, https://arxiv.org/abs/2310.12036, Eq. 17; beta is the paper's tau).
    Length-averaged log-probs.

        h_avg = (log pi(y_w|x) - log pi_ref(y_w|x)) / |y_w| - (log pi(y_l|x) - log pi_ref(y_l|x)) / |y_l|
        loss = (h_avg - 1 / (2 * beta))^2

    Why averaged: with summed log-probs the squared loss grows with completion length, so one
    beta would mean different things for short and long pairs. TRL and the IPO authors use the
    per-token average, and so do we. The reported rewards stay summed (beta * log-ratio), as in TRL.
    """
    chosen_logratios = (policy_chosen_logps - reference_chosen_logps) / chosen_lengths.clamp(min=1)
    rejected_logratios = (policy_rejected_logps - reference_rejected_logps) / rejected_lengths.clamp(min=1)
    losses = (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2
    return (losses, *_rewards(beta, policy_chosen_logps, policy_rejected_logps,
                              reference_chosen_logps, reference_rejected_logps))


LOSSES = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
}
