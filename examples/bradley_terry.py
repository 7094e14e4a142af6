"""Experiment 1: the Bradley-Terry model behind DPO recovers players' strengths.

Players have hidden strengths s_i; player i beats j with probability sigmoid(s_i - s_j). From
the match outcomes alone, maximising the likelihood, i.e. minimising -log sigmoid(s_w - s_l)
over (winner, loser) pairs, recovers the order of the players. That loss is exactly preftune's
`sigmoid_loss` (DPO) with beta = 1, zero reference log-probs and the fitted strengths in the
place of the policy's log-probs: DPO fits a Bradley-Terry model whose scores are the implicit
rewards.

    python examples/bradley_terry.py
"""

from __future__ import annotations

import torch

from preftune.losses import sigmoid_loss


def run(strengths=(2.0, 1.0, 0.3, -0.5, -1.5), n_matches: int = 4000, steps: int = 300, seed: int = 0):
    """Simulate matches, fit strengths; returns (true, fitted), both centred to mean 0."""
    g = torch.Generator().manual_seed(seed)
    true = torch.tensor(strengths)
    i = torch.randint(len(true), (n_matches,), generator=g)
    j = (i + torch.randint(1, len(true), (n_matches,), generator=g)) % len(true)  # j != i
    i_wins = torch.rand(n_matches, generator=g) < torch.sigmoid(true[i] - true[j])
    winners, losers = torch.where(i_wins, i, j), torch.where(i_wins, j, i)

    fitted = torch.zeros(len(true), requires_grad=True)
    optimizer = torch.optim.Adam([fitted], lr=0.05)
    zeros, ones = torch.zeros(n_matches), torch.ones(n_matches)
    for _ in range(steps):
        losses, _, _ = sigmoid_loss(fitted[winners], fitted[losers], zeros, zeros, 1.0, ones, ones)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
    fitted = fitted.detach()
    return true - true.mean(), fitted - fitted.mean()


if __name__ == "__main__":
    true, fitted = run()
    for k, (t, f) in enumerate(zip(true.tolist(), fitted.tolist())):
        print(f"player {k}: true strength {t:+.2f}  fitted {f:+.2f}")
    same = torch.equal(true.argsort(), fitted.argsort())
    print("order recovered" if same else "order NOT recovered")
