"""Each loss against values computed by hand."""

import inspect
import math

import pytest
import torch

from preftune import config, losses
from preftune.step import configured_loss

# Two pairs. Pair 0: the policy moved toward chosen (log-ratio +1) and away from rejected (-1).
# Pair 1: the other way round. Completion lengths 2 (chosen) and 4 (rejected).
POLICY_CHOSEN = torch.tensor([-10.0, -12.0])
POLICY_REJECTED = torch.tensor([-12.0, -10.0])
REFERENCE_CHOSEN = torch.tensor([-11.0, -11.0])
REFERENCE_REJECTED = torch.tensor([-11.0, -11.0])
CHOSEN_LENGTHS = torch.tensor([2, 2])
REJECTED_LENGTHS = torch.tensor([4, 4])


def run(name, beta, **hyperparameters):
    return losses.LOSSES[name](POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, beta,
                               CHOSEN_LENGTHS, REJECTED_LENGTHS, **hyperparameters)


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


# A value for every hyperparameter beyond beta, passed to the losses that take it.
HYPERPARAMETERS = {"label_smoothing": 0.1, "discopop_tau": 0.05, "simpo_gamma": 0.5, "f_divergence_type": "reverse_kl",
                   "f_alpha_divergence_coef": 0.5, "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.0}


def test_gradients_push_chosen_up_and_rejected_down():
    # apo_down is built to lower the chosen likelihood too (for chosen answers worse than the
    # model's own): d loss / d r_w = beta * (sigmoid'(beta r_w) - sigmoid'(beta h)) > 0 here.
    # sft does not touch rejected (its gradient there is 0).
    excluded = {"apo_down", "sft"}
    for name in losses.LOSSES.keys() - excluded:
        policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
        policy_rejected = POLICY_REJECTED.clone().requires_grad_()
        hyperparameters = {key: HYPERPARAMETERS[key] for key in losses.loss_options(name)}
        loss, _, _ = losses.LOSSES[name](policy_chosen, policy_rejected, REFERENCE_CHOSEN, REFERENCE_REJECTED, 0.1,
                                         CHOSEN_LENGTHS, REJECTED_LENGTHS, **hyperparameters)
        loss.sum().backward()
        assert (policy_chosen.grad < 0).all(), name  # descending the loss raises log pi(chosen)
        assert (policy_rejected.grad > 0).all(), name


def test_apo_down_lowers_both_likelihoods_rejected_more():
    """Why apo_down is excluded above: its gradient lowers log pi(chosen) too, and log pi(rejected)."""
    policy_chosen = POLICY_CHOSEN.clone().requires_grad_()
    policy_rejected = POLICY_REJECTED.clone().requires_grad_()
    loss, _, _ = losses.apo_down_loss(policy_chosen, policy_rejected, REFERENCE_CHOSEN, REFERENCE_REJECTED, 0.1,
                                      CHOSEN_LENGTHS, REJECTED_LENGTHS)
    loss.sum().backward()
    assert (policy_chosen.grad > 0).all() and (policy_rejected.grad > 0).all()


def test_config_knows_exactly_the_implemented_losses():
    assert set(config.LOSS_NAMES) == set(losses.LOSSES) | set(losses.UNPAIRED_LOSSES)


def test_config_binds_exactly_the_keyword_parameters_each_loss_takes():
    """A loss's keyword-only parameters are config keys, and the config binds exactly those, with its values."""
    cfg = config.TrainConfig()
    for name, fn in {**losses.LOSSES, **losses.UNPAIRED_LOSSES}.items():
        keyword_only = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
        assert losses.loss_options(name) == tuple(keyword_only), name
        assert set(keyword_only) <= set(HYPERPARAMETERS) and set(keyword_only) <= set(cfg.to_dict())
        assert cfg.loss_options(name) == {key: cfg.to_dict()[key] for key in keyword_only}, name


def test_configured_loss_binds_the_config_values():
    cfg = config.from_dict({"pref_loss": "sigmoid", "label_smoothing": 0.1})
    assert cfg.loss_options("sigmoid") == {"label_smoothing": 0.1, "f_divergence_type": "reverse_kl",
                                          "f_alpha_divergence_coef": 0.5}
    loss, _, _ = configured_loss(cfg)(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, 0.1,
                                      CHOSEN_LENGTHS, REJECTED_LENGTHS)
    assert loss.tolist() == pytest.approx([0.6181388693, 0.7781388693], abs=1e-7)  # cDPO, see below
    cfg = config.from_dict({"pref_loss": "discopop", "discopop_tau": 0.5})
    assert cfg.loss_options("discopop") == {"discopop_tau": 0.5, "f_divergence_type": "reverse_kl",
                                            "f_alpha_divergence_coef": 0.5}
    assert config.from_dict({"pref_loss": "nca_pair"}).loss_options("nca_pair") == {}


def test_sigmoid_with_label_smoothing_is_cdpo():
    """cDPO, eps = 0.1, beta = 0.1, z = beta * h = (0.2, -0.2). Since log sigmoid(-z) = log sigmoid(z) - z,
    -(1 - eps) log sigmoid(z) - eps log sigmoid(-z) = -log sigmoid(z) + eps * z:
    loss_0 = 0.5981388693 + 0.1 * 0.2 = 0.6181388693
    loss_1 = 0.7981388693 - 0.1 * 0.2 = 0.7781388693
    TRL 1.16's sigmoid ignores label_smoothing (it would give the eps = 0 values); we apply it on
    purpose (tests/test_loss_parity.py pins that difference). Rewards do not change."""
    loss, chosen_rewards, rejected_rewards = run("sigmoid", 0.1, label_smoothing=0.1)
    assert loss.tolist() == pytest.approx([0.6181388693, 0.7781388693], abs=1e-7)
    assert chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    assert rejected_rewards.tolist() == pytest.approx([-0.1, 0.1])
    assert run("sigmoid", 0.1, label_smoothing=0.0)[0].tolist() == pytest.approx([0.5981388693, 0.7981388693])


def test_robust_by_hand():
    """eps = 0.1, beta = 0.1, z = (0.2, -0.2). With log sigmoid(-z) = log sigmoid(z) - z:
    [-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)] / (1 - 2 eps) = -log sigmoid(z) - eps * z / (1 - 2 eps)
    loss_0 = 0.5981388693 - 0.1 * 0.2 / 0.8 = 0.5731388693
    loss_1 = 0.7981388693 + 0.025 = 0.8231388693.  eps = 0 is DPO."""
    loss, chosen_rewards, _ = run("robust", 0.1, label_smoothing=0.1)
    assert loss.tolist() == pytest.approx([0.5731388693, 0.8231388693], abs=1e-7)
    assert chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    assert run("robust", 0.1)[0].tolist() == pytest.approx(run("sigmoid", 0.1)[0].tolist())


def test_exo_pair_by_hand():
    """beta = ln(3) / 2, so beta * h = +-ln 3 and q = (sigmoid(ln 3), sigmoid(-ln 3)) = (3/4, 1/4) for pair 0,
    (1/4, 3/4) for pair 1. eps = 1/4: p = (3/4, 1/4).
    loss_0 = KL(q || p) = 0 (q = p).
    loss_1 = 1/4 ln((1/4) / (3/4)) + 3/4 ln((3/4) / (1/4)) = (3/4 - 1/4) ln 3 = ln(3) / 2 = 0.5493061443."""
    loss, _, _ = run("exo_pair", math.log(3) / 2, label_smoothing=0.25)
    assert loss.tolist() == pytest.approx([0.0, 0.5493061443], abs=1e-6)


def test_nca_pair_by_hand():
    """beta = 0.1: beta r_w = (0.1, -0.1), beta r_l = (-0.1, 0.1). With softplus(x) = log(1 + e^x) = -log sigmoid(-x),
    softplus(-0.1) = 0.6443966601, softplus(0.1) = 0.7443966601:
    loss_0 = softplus(-0.1) + 0.5 softplus(0.1) + 0.5 softplus(-0.1) = 0.9665949901 + 0.3721983300 = 1.3387933201
    loss_1 = softplus(0.1) + 0.5 softplus(-0.1) + 0.5 softplus(0.1) = 1.1165949901 + 0.3221983300 = 1.4387933201"""
    loss, _, _ = run("nca_pair", 0.1)
    assert loss.tolist() == pytest.approx([1.3387933201, 1.4387933201], abs=1e-6)  # float32


def test_bco_pair_by_hand():
    """beta = 0.1: loss = softplus(-beta r_w) + softplus(beta r_l)
    loss_0 = 2 softplus(-0.1) = 1.2887933201;  loss_1 = 2 softplus(0.1) = 1.4887933201"""
    loss, _, _ = run("bco_pair", 0.1)
    assert loss.tolist() == pytest.approx([1.2887933201, 1.4887933201], abs=1e-6)  # float32


def test_sppo_hard_by_hand():
    """beta = 0.5: targets +-1/(2 beta) = +-1.
    pair 0: (1 - 1)^2 + (-1 + 1)^2 = 0;  pair 1: (-1 - 1)^2 + (1 + 1)^2 = 8"""
    loss, _, _ = run("sppo_hard", 0.5)
    assert loss.tolist() == pytest.approx([0.0, 8.0])


def test_aot_by_hand():
    """Policy gaps log pi(y_w) - log pi(y_l) = (2, -2), reference gaps (0, 0).
    Sorted: (-2, 2) - (0, 0) = (-2, 2); beta = 0.1, z = (-0.2, 0.2):
    losses (sorted order) = (softplus(0.2), softplus(-0.2)) = (0.7981388693, 0.5981388693).
    With eps = 0.1: -log sigmoid(z) + eps z = (0.7981388693 - 0.02, 0.5981388693 + 0.02).
    Rewards stay per pair: chosen (0.1, -0.1)."""
    loss, chosen_rewards, _ = run("aot", 0.1)
    assert loss.tolist() == pytest.approx([0.7981388693, 0.5981388693], abs=1e-7)
    assert chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    loss, _, _ = run("aot", 0.1, label_smoothing=0.1)
    assert loss.tolist() == pytest.approx([0.7781388693, 0.6181388693], abs=1e-7)


def test_aot_unpaired_by_hand():
    """r_w = (1, -1) sorted (-1, 1); r_l = (-1, 1) sorted (-1, 1): the batch's chosen and rejected
    log-ratios have the same distribution, so d = (0, 0) and each loss is -log sigmoid(0) = ln 2 = 0.6931471806
    (paired DPO would give 0.598 and 0.798)."""
    loss, _, _ = run("aot_unpaired", 0.1)
    assert loss.tolist() == pytest.approx([math.log(2)] * 2, abs=1e-7)


def test_apo_zero_by_hand():
    """beta = 0.1, sigmoid(0.1) = 0.5249791875:
    loss_0 = 1 - sigmoid(0.1) + sigmoid(-0.1) = 2 * 0.4750208125 = 0.9500416250
    loss_1 = 1 - sigmoid(-0.1) + sigmoid(0.1) = 2 * 0.5249791875 = 1.0499583750"""
    loss, _, _ = run("apo_zero", 0.1)
    assert loss.tolist() == pytest.approx([0.9500416250, 1.0499583750], abs=1e-7)


def test_apo_down_by_hand():
    """beta = 0.1, sigmoid(0.1) = 0.5249791875, sigmoid(0.2) = 0.5498339973:
    loss_0 = sigmoid(0.1) + 1 - sigmoid(0.2) = 0.9751451902
    loss_1 = sigmoid(-0.1) + 1 - sigmoid(-0.2) = 0.4750208125 + 1 - 0.4501660027 = 1.0248548098"""
    loss, _, _ = run("apo_down", 0.1)
    assert loss.tolist() == pytest.approx([0.9751451902, 1.0248548098], abs=1e-7)


def test_discopop_by_hand():
    """beta = 0.1, tau = 0.05, z = (0.2, -0.2), w = sigmoid(z / tau) = sigmoid(+-4) = (0.9820137900, 0.0179862100).
    loss_0 = (1 - w) softplus(-0.2) + w e^-0.2 = 0.01798621 * 0.5981388694 + 0.98201379 * 0.8187307531 = 0.8147631411
    loss_1 = (1 - w) softplus(0.2) + w e^0.2 = 0.98201379 * 0.7981388694 + 0.01798621 * 1.2214027582 = 0.8057517826"""
    loss, _, _ = run("discopop", 0.1, discopop_tau=0.05)
    assert loss.tolist() == pytest.approx([0.8147631411, 0.8057517826], abs=1e-7)
    assert run("discopop", 0.1)[0].tolist() == loss.tolist()  # 0.05 is the default


def test_sigmoid_norm_by_hand():
    """Length-averaged margins as for IPO: +0.75 and -0.75; beta = 1:
    loss_0 = softplus(-0.75) = 0.3868710061;  loss_1 = softplus(0.75) = 1.1368710061.
    Rewards stay summed: chosen (1, -1)."""
    loss, chosen_rewards, _ = run("sigmoid_norm", 1.0)
    assert loss.tolist() == pytest.approx([0.3868710061, 1.1368710061], abs=1e-7)
    assert chosen_rewards.tolist() == pytest.approx([1.0, -1.0])


def test_simpo_by_hand():
    """Reference-free; length-averaged log-probs. Chosen -2 over 2 tokens (average -1), rejected -6 over 3
    tokens (average -2). beta = 2, gamma = 0.5: beta * (-1 - (-2)) - gamma = 1.5;
    loss = -log sigmoid(1.5) = log(1 + e^-1.5) = 0.2014132779. gamma = 0: log(1 + e^-2) = 0.1269280110.
    Rewards beta * average log-prob: chosen -2, rejected -4. The reference tensors are not used (None)."""
    chosen, rejected, lengths = torch.tensor([-2.0]), torch.tensor([-6.0]), (torch.tensor([2]), torch.tensor([3]))
    loss, chosen_rewards, rejected_rewards = losses.simpo_loss(chosen, rejected, None, None, 2.0, *lengths,
                                                               simpo_gamma=0.5)
    assert loss.item() == pytest.approx(0.2014132779, abs=1e-7)
    assert (chosen_rewards.item(), rejected_rewards.item()) == (-2.0, -4.0)
    loss, _, _ = losses.simpo_loss(chosen, rejected, None, None, 2.0, *lengths, simpo_gamma=0.0)
    assert loss.item() == pytest.approx(0.1269280110, abs=1e-7)


def test_orpo_by_hand():
    """Reference-free; length-averaged log-probs a. Chosen: a_w = ln(1/2) (2 tokens), odds = (1/2)/(1/2) = 1,
    log odds 0. Rejected: a_l = ln(1/5) (3 tokens), odds = (1/5)/(4/5) = 1/4, log odds -ln 4.
    Odds-ratio term: -log sigmoid(0 - (-ln 4)) = -log(4/5) = ln(5/4) = 0.2231435513.
    beta = 0.1: loss = -a_w + 0.1 * ln(5/4) = 0.6931471806 + 0.0223143551 = 0.7154615357.
    Rewards beta * a: chosen 0.1 ln(1/2) = -0.0693147181, rejected 0.1 ln(1/5) = -0.1609437912."""
    chosen, rejected = torch.tensor([2 * math.log(0.5)]), torch.tensor([3 * math.log(0.2)])
    loss, chosen_rewards, rejected_rewards = losses.orpo_loss(chosen, rejected, None, None, 0.1,
                                                              torch.tensor([2]), torch.tensor([3]))
    assert loss.item() == pytest.approx(0.7154615357, abs=1e-6)
    assert chosen_rewards.item() == pytest.approx(-0.0693147181) and rejected_rewards.item() == pytest.approx(-0.1609437912)


def test_reference_free_losses_ignore_the_reference():
    for name in losses.REFERENCE_FREE:
        with_reference = run(name, 0.5)
        without = losses.LOSSES[name](POLICY_CHOSEN, POLICY_REJECTED, None, None, 0.5, CHOSEN_LENGTHS, REJECTED_LENGTHS)
        assert all(torch.equal(a, b) for a, b in zip(with_reference, without)), name


def test_config_knows_the_reference_free_losses():
    for name in losses.LOSSES:
        assert config.from_dict({"pref_loss": name, "label_smoothing": 0.1 if name == "exo_pair" else 0.0}) \
            .uses_reference == (name not in losses.REFERENCE_FREE), name


def test_pref_ftx_adds_the_chosen_nll_per_token():
    """pref_ftx = 0.5 on sigmoid, beta = 0.1. Chosen NLL per token: 10 / 2 = 5 (pair 0), 12 / 2 = 6 (pair 1).
    loss_0 = 0.5981388693 + 0.5 * 5 = 3.0981388693;  loss_1 = 0.7981388693 + 0.5 * 6 = 3.7981388693.
    Rewards unchanged. On orpo (already holding one chosen NLL) it adds a second, as in LLaMA-Factory."""
    cfg = config.from_dict({"pref_loss": "sigmoid", "pref_ftx": 0.5})
    loss, chosen_rewards, _ = configured_loss(cfg)(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN,
                                                   REFERENCE_REJECTED, 0.1, CHOSEN_LENGTHS, REJECTED_LENGTHS)
    assert loss.tolist() == pytest.approx([3.0981388693, 3.7981388693], abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    assert losses.chosen_nll(POLICY_CHOSEN, CHOSEN_LENGTHS).tolist() == [5.0, 6.0]
    orpo = configured_loss(config.from_dict({"pref_loss": "orpo", "pref_ftx": 1.0}))
    plain = configured_loss(config.from_dict({"pref_loss": "orpo"}))
    args = (POLICY_CHOSEN, POLICY_REJECTED, None, None, 0.1, CHOSEN_LENGTHS, REJECTED_LENGTHS)
    assert (orpo(*args)[0] - plain(*args)[0]).tolist() == pytest.approx([5.0, 6.0])


def test_sft_by_hand():
    """TRL's sft: the chosen NLL averaged over all chosen tokens of the batch, the same for every pair:
    (10 + 12) / (2 + 2) = 5.5 (pref_ftx's per-pair average would give 5 and 6). Rewards beta * average
    log-prob: beta = 0.1, chosen (-0.5, -0.6)."""
    loss, chosen_rewards, _ = losses.sft_loss(POLICY_CHOSEN, POLICY_REJECTED, None, None, 0.1, CHOSEN_LENGTHS,
                                              REJECTED_LENGTHS)
    assert loss.tolist() == [5.5, 5.5]
    assert chosen_rewards.tolist() == pytest.approx([-0.5, -0.6])


def test_combined_losses_by_hand():
    """pref_loss [sigmoid, sft], loss_weights [1, 0.5], beta = 0.1: sigmoid (0.5981388693, 0.7981388693)
    + 0.5 * sft (5.5, 5.5) = (3.3481388693, 3.5481388693). Rewards are DPO's (sigmoid uses the reference;
    sft does not): chosen (0.1, -0.1). With pref_ftx = 1 also + (5, 6)."""
    args = (POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, 0.1, CHOSEN_LENGTHS, REJECTED_LENGTHS)
    cfg = config.from_dict({"pref_loss": ["sigmoid", "sft"], "loss_weights": [1, 0.5]})
    loss, chosen_rewards, _ = configured_loss(cfg)(*args)
    assert loss.tolist() == pytest.approx([3.3481388693, 3.5481388693], abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    cfg = config.from_dict({"pref_loss": "sigmoid,sft", "loss_weights": "1,0.5", "pref_ftx": 1.0})
    assert configured_loss(cfg)(*args)[0].tolist() == pytest.approx([8.3481388693, 9.5481388693], abs=1e-6)
    assert cfg.uses_reference and not config.from_dict({"pref_loss": "simpo,sft"}).uses_reference


def test_kto_pair_by_hand():
    """LLaMA-Factory's kto_pair. r_w = (2, 0), r_l = (0, 2): z_w = max(0, mean r_w) = 1, z_l = 1; beta = 1.
    pair 0: 1/2 [(1 - sigmoid(2 - 1)) + (1 - sigmoid(1 - 0))] = 1 - sigmoid(1) = 0.2689414214
    pair 1: 1/2 [(1 - sigmoid(0 - 1)) + (1 - sigmoid(1 - 2))] = sigmoid(1) = 0.7310585786
    With r_w = (-2, 0) the mean -1 is clamped: z_w = 0, so pair 0's rejected term is 1 - sigmoid(0 - 0) = 0.5
    and its chosen term 1 - sigmoid(-2 - 1) = 0.9525741268: loss 0.7262870634. Rewards DPO's: chosen (-2, 0)."""
    zero = torch.zeros(2)
    loss, _, _ = losses.kto_pair_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0]), zero, zero, 1.0,
                                      CHOSEN_LENGTHS, REJECTED_LENGTHS)
    assert loss.tolist() == pytest.approx([0.2689414214, 0.7310585786], abs=1e-7)
    loss, chosen_rewards, _ = losses.kto_pair_loss(torch.tensor([-2.0, 0.0]), torch.tensor([0.0, 2.0]), zero, zero,
                                                   1.0, CHOSEN_LENGTHS, REJECTED_LENGTHS)
    assert loss[0].item() == pytest.approx(0.7262870634, abs=1e-7)
    assert chosen_rewards.tolist() == [-2.0, 0.0]


def test_pref_bco_weight_mixes_in_bco_with_a_running_reward_shift():
    """LLaMA-Factory's pref_bco_weight w = 0.5 on sigmoid, beta = 0.1: loss = (sigmoid + w * bco) / (1 + w),
    bco = -log sigmoid(beta r_w - delta) - log sigmoid(-(beta r_l - delta)), delta the running mean of
    the calls' batch-mean rewards.
    Call 1 (the fixture): rewards (0.1, -0.1, -0.1, 0.1), mean 0, delta 0: bco = bco_pair = (1.2887933201, 1.4887933201);
      loss = ((0.5981388693 + 0.6443966601) / 1.5, (0.7981388693 + 0.7443966601) / 1.5) = (0.8283570196, 1.0283570196).
    Call 2: r_w = (2, 0), r_l = (0, 0): rewards mean 0.05, delta = (0 + 0.05) / 2 = 0.025;
      pair 0: sigmoid softplus(-0.2) = 0.5981388694, bco softplus(-0.175) + softplus(-0.025) = 1.2901957342 -> 0.8288244910
      pair 1: sigmoid ln 2 = 0.6931471806, bco softplus(0.025) + softplus(-0.025) = 1.3864506071 -> 0.9242483227"""
    objective = configured_loss(config.from_dict({"pref_loss": "sigmoid", "pref_bco_weight": 0.5}))
    loss, chosen_rewards, _ = objective(POLICY_CHOSEN, POLICY_REJECTED, REFERENCE_CHOSEN, REFERENCE_REJECTED, 0.1,
                                        CHOSEN_LENGTHS, REJECTED_LENGTHS)
    assert loss.tolist() == pytest.approx([0.8283570196, 1.0283570196], abs=1e-6)
    assert chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    zero = torch.zeros(2)
    resumed = configured_loss(config.from_dict({"pref_loss": "sigmoid", "pref_bco_weight": 0.5}))
    resumed.load_state_dict(objective.state_dict())  # as a checkpoint carries it to a resumed run
    loss, _, _ = objective(torch.tensor([2.0, 0.0]), zero, zero, zero, 0.1, CHOSEN_LENGTHS, REJECTED_LENGTHS)
    assert loss.tolist() == pytest.approx([0.8288244910, 0.9242483227], abs=1e-6)
    assert resumed(torch.tensor([2.0, 0.0]), zero, zero, zero, 0.1, CHOSEN_LENGTHS, REJECTED_LENGTHS)[0].tolist() \
        == loss.tolist()  # the running shift continued, not restarted (delta 0.05 would give other numbers)


@pytest.mark.parametrize("f_divergence_type,coef,expected", [
    ("reverse_kl", 0.5, [0.1269280110, 2.1269280110]),
    ("forward_kl", 0.5, [0.0910564132, 2.4414588005]),
    ("js_divergence", 0.5, [0.3132616875, 1.3132616875]),
    ("alpha_divergence", 0.5, [0.1172353857, 2.2016166077]),
    ("alpha_divergence", 1.0, [0.1269280110, 2.1269280110]),
])
def test_f_divergence_sigmoid_by_hand(f_divergence_type, coef, expected):
    """f-DPO, beta = 1; pair 0 has r_w = 1, r_l = -1, pair 1 the reverse; loss = softplus(-h_f).
    reverse_kl: h = 2, softplus(-2) = 0.1269280110 (DPO), softplus(2) = 2 + 0.1269280110.
    forward_kl, f'(t) = 1 - 1/t: h = (1 - e^-1) - (1 - e) = 2 sinh 1 = 2.3504023873, softplus(-h) = 0.0910564132.
    js_divergence, f'(t) = log 2 + log sigmoid(log t): h = log sigmoid(1) - log sigmoid(-1) = 1, softplus(-1) = 0.3132616875.
    alpha_divergence, alpha = 0.5, f'(t) = (t^-0.5 - 1)/(-0.5): h = 2(1 - e^-0.5) - 2(1 - e^0.5) = 2.0843812220,
    softplus(-h) = 0.1172353857; alpha = 1 is the log t limit, DPO. Pair 1: softplus(h) = h + softplus(-h)."""
    loss, chosen_rewards, _ = run("sigmoid", 1.0, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef)
    assert loss.tolist() == pytest.approx(expected, abs=1e-6)
    assert chosen_rewards.tolist() == [1.0, -1.0]  # DPO's rewards whatever the divergence


def test_kto_by_hand_and_its_baseline_is_detached():
    """beta = 0.5, w_D = 2, w_U = 1. r = (-2 - -3, -4 - -3) = (1, -1), labels (desirable, undesirable).
    KL rows: log-ratios (1, 0), z_ref = max(0, 0.5) = 0.5.
    desirable: 2 (1 - sigmoid(0.5 (1 - 0.5))) = 2 (1 - sigmoid(0.25)) = 2 * 0.4378234991 = 0.8756469982
    undesirable: 1 - sigmoid(0.5 (0.5 - -1)) = 1 - sigmoid(0.75) = 0.3208213008
    rewards beta r = (0.5, -0.5). With KL log-ratios (-1, 0) the mean is negative: z_ref = 0."""
    policy = torch.tensor([-2.0, -4.0], requires_grad=True)
    policy_kl = torch.tensor([-5.0, -6.0], requires_grad=True)
    labels = torch.tensor([True, False])
    loss, rewards, z_ref = losses.kto_loss(policy, torch.tensor([-3.0, -3.0]), policy_kl, torch.tensor([-6.0, -6.0]),
                                           labels, 0.5, kto_chosen_weight=2.0, kto_rejected_weight=1.0)
    assert loss.tolist() == pytest.approx([0.8756469982, 0.3208213008], abs=1e-7)
    assert rewards.tolist() == [0.5, -0.5] and z_ref.item() == 0.5
    loss.sum().backward()
    assert policy_kl.grad is None  # z_ref is a baseline: no gradient through the KL rows
    assert policy.grad[0] < 0 < policy.grad[1]  # desirable up, undesirable down
    _, _, z_ref = losses.kto_loss(policy, torch.tensor([-3.0, -3.0]), policy_kl, torch.tensor([-4.0, -6.0]), labels, 0.5)
    assert z_ref.item() == 0.0
