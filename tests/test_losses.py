"""Each loss against values computed by hand."""

import math

import pytest
import torch

from preftune import config, losses

# Two pairs. Pair 0: the policy moved toward chosen (log-ratio +1) and away from rejected (-1).
# Pair 1: the other way round. Completion lengths 2 (chosen) and 4 (rejected).
POLICY_CHOSEN = torch.tensor([-10.0, -12.0])
POLICY_REJECTED = torch.tensor([-12.0, -10.0])
REFERENCE_CHOSEN = torch.tensor([-11.0, -11.0])
REFERENCE_REJECTED = torch.tensor([-11.0, -11.0])
CHOSEN_LENGTHS = torch.tensor([2, 2])
REJECTED_LENGTHS = torch.tensor([4, 4])


def run(name, beta):
    return losses.LOSSES[name](POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta,
                               CHOSEN_LENGTHS, REJECTED_LENGTHS)


def test_sigmoid_by_hand():
    """h = (+1) - (-1) = 2 for pair 0 and -2 for pair 1; beta = 0.1:
    loss_0 = -log sigmoid(0.2) = log(1 + e^-0.2) = 0.5981388693
    loss_1 = -log sigmoid(-0.2) = log(1 + e^0.2) = 0.7981388693
    rewards: chosen (0.1, -0.1), rejected (-0.1, 0.1)."""
    loss, chosen_rewards, rejected_rewards = run("sigmoid", 0.1)
    assert loss.tolist() == pytest.approx([0.5981388693, 0.7981388693], abs=1e-7)
    assert chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    assert rejected_rewards.tolist() == pytest.approx([-0.1, 0.1])


def test_sigmoid_is_stable_for_large_margins():
    """beta * h = 1000: -log sigmoid(1000) = ~0, and -log sigmoid(-1000) = 1000 (not inf)."""
    big = torch.tensor([500.0, -500.0])
    zero = torch.zeros(2)
    loss, _, _ = losses.sigmoid_loss(big, -big, zero, zero, 1.0, CHOSEN_LENGTHS, REJECTED_LENGTHS)
    assert loss.tolist() == pytest.approx([0.0, 1000.0])


def test_hinge_by_hand():
    """beta = 0.1: max(0, 1 - 0.2) = 0.8 and max(0, 1 + 0.2) = 1.2.
    beta = 1: max(0, 1 - 2) = 0 (margin met) and max(0, 1 + 2) = 3."""
    assert run("hinge", 0.1)[0].tolist() == pytest.approx([0.8, 1.2])
    assert run("hinge", 1.0)[0].tolist() == pytest.approx([0.0, 3.0])


def test_ipo_by_hand():
    """Length-averaged log-ratios. Pair 0: +1/2 - (-1/4) = 0.75; pair 1: -1/2 - 1/4 = -0.75.
    beta = 0.1 -> target 1/(2*0.1) = 5: (0.75 - 5)^2 = 18.0625, (-0.75 - 5)^2 = 33.0625.
    Rewards stay summed: beta * log-ratio = (0.1, -0.1)."""
    loss, chosen_rewards, _ = run("ipo", 0.1)
    assert loss.tolist() == pytest.approx([18.0625, 33.0625])
    assert chosen_rewards.tolist() == pytest.approx([0.1, -0.1])


def test_ipo_minimum_at_target():
    """The IPO loss is zero when the averaged margin equals 1/(2 beta), and DPO's never is."""
    beta = 0.5  # target margin 1.0
    chosen = torch.tensor([-2.0])  # log-ratio +2 over 2 tokens: +1 per token
    loss, _, _ = losses.ipo_loss(chosen, torch.tensor([-4.0]), torch.tensor([-4.0]), torch.tensor([-4.0]), beta,
                                 torch.tensor([2]), torch.tensor([4]))
    assert loss.item() == pytest.approx(0.0)
    loss, _, _ = losses.sigmoid_loss(chosen, torch.tensor([-4.0]), torch.tensor([-4.0]), torch.tensor([-4.0]), beta,
                                     torch.tensor([2]), torch.tensor([4]))
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)))


def test_gradients_push_chosen_up_and_rejected_down():
    for name in losses.LOSSES:
        policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
        policy_rejected = POLICY_REJECTED.clone().requires_grad_()
        loss, _, _ = losses.LOSSES[name](policy_chosen, policy_rejected, REFERENCE_CHOSEN, REFERENCE_REJECTED, 0.1,
                                         CHOSEN_LENGTHS, REJECTED_LENGTHS)
        loss.sum().backward()
        assert (policy_chosen.grad < 0).all(), name  # descending the loss raises log pi(chosen)
        assert (policy_rejected.grad > 0).all(), name


def test_config_knows_exactly_the_implemented_losses():
    assert set(config.LOSSES) == set(losses.LOSSES)
