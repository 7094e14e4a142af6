"""The two example experiments (examples/) as tests of the losses' behaviour."""

import importlib.util
from pathlib import Path

import pytest
import torch

from preftune.losses import ipo_loss, sigmoid_loss

EXAMPLES = Path(__file__).parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bradley_terry_fit_recovers_the_players_order():
    true, fitted = load("bradley_terry").run()
    assert torch.equal(true.argsort(), fitted.argsort())
    assert (true - fitted).abs().max() < 0.25  # and roughly the strengths themselves


@pytest.fixture(scope="module")
def one_pair():
    return load("dpo_vs_ipo_one_pair")


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_keeps_pushing_the_rejected_completion_down_whatever_beta(one_pair, beta):
    r = one_pair.run(sigmoid_loss, beta)
    margins, rejected = r["margins_avg"], r["rejected_logps"]
    assert rejected[-1] < r["reference_rejected_logp"] - 2  # p(rejected) falls
    assert margins[-1] > margins[len(margins) // 2] > margins[len(margins) // 4]  # still growing: no finite optimum
    assert margins[-1] > r["target_avg_margin"]  # past where IPO would stop


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_ipo_settles_at_its_beta_dependent_margin(one_pair, beta):
    r = one_pair.run(ipo_loss, beta)
    margins = r["margins_avg"]
    assert margins[-1] == pytest.approx(1 / (2 * beta), abs=0.05)
    assert max(margins[-20:]) - min(margins[-20:]) < 0.05  # converged, not drifting
