"""Experiment 2: on a single preference pair DPO over-fits, IPO does not.

With one pair and no noise, DPO's loss -log sigmoid(beta * h) only reaches 0 as the margin h
goes to infinity, so training keeps pushing log pi(rejected) down: the rejected completion's
probability goes toward zero whatever beta is (a smaller beta only slows it down). IPO's
squared loss (h_avg - 1/(2 beta))^2 has its minimum at a finite, beta-dependent margin, so the
policy settles at h_avg = 1/(2 beta) and stays near the reference.

    python examples/dpo_vs_ipo_one_pair.py
"""

from __future__ import annotations

import copy

import torch

from preftune.batching import collate
from preftune.data import PreferencePair
from preftune.demo import build_model, build_tokenizer
from preftune.logps import get_batch_logps
from preftune.losses import ipo_loss, sigmoid_loss

PAIR = PreferencePair(prompt="How should I learn chess?", chosen=" Start with the basics and practice daily.",
                      rejected=" Whatever, just guess.")


def run(loss_fn, beta: float, steps: int = 150, lr: float = 1e-2, seed: int = 0) -> dict:
    """Train a tiny model on PAIR alone; returns the trajectory of the quantities that matter."""
    from preftune.tokenization import tokenize_pairs

    tokenizer = build_tokenizer([PAIR.prompt, PAIR.chosen, PAIR.rejected] * 20, vocab_size=300)
    tokenizer.chat_template = None
    batch = collate(tokenize_pairs(tokenizer, [PAIR], 64, None), tokenizer.pad_token_id)
    policy = build_model(len(tokenizer), seed=seed, hidden=32, layers=2)
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        reference_logps, lengths = get_batch_logps(reference, **batch)[:2]
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    rejected_logps, margins_avg = [], []
    for _ in range(steps):
        policy_logps = get_batch_logps(policy, **batch).logps
        losses, _, _ = loss_fn(policy_logps[:1], policy_logps[1:], reference_logps[:1], reference_logps[1:], beta,
                               lengths[:1], lengths[1:])
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
        ratios = (policy_logps - reference_logps).detach() / lengths
        rejected_logps.append(policy_logps[1].item())
        margins_avg.append((ratios[0] - ratios[1]).item())
    return {"reference_rejected_logp": reference_logps[1].item(), "rejected_logps": rejected_logps,
            "margins_avg": margins_avg, "target_avg_margin": 1 / (2 * beta)}


if __name__ == "__main__":
    for name, fn in (("DPO", sigmoid_loss), ("IPO", ipo_loss)):
        for beta in (0.1, 1.0):
            r = run(fn, beta)
            print(f"{name} beta={beta}: log p(rejected) {r['reference_rejected_logp']:.1f} -> "
                  f"{r['rejected_logps'][-1]:.1f}; per-token margin {r['margins_avg'][-1]:.2f}"
                  + (f" (IPO target {r['target_avg_margin']:.2f})" if name == "IPO" else ""))
