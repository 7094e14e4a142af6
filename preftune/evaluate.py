"""The one pair scorer: everything that runs a model over a list of examples and measures it.

    evaluate(step, policy, reference, val_items, batch_size, pad_id, accelerator)   # eval_* metrics
    logps, lengths = pair_logps(model, pairs, pad_id, batch_size)                  # (N, 2) each
    accuracy(chosen_rewards, rejected_rewards)                                     # ties count half

Training's evaluation, `preftune export`'s quality check and the reference precompute all score
through these, in the same batch order (the items in order, `batch_size` at a time).
"""

from __future__ import annotations

import contextlib
import math

import torch
from tqdm.auto import tqdm

from preftune.batching import collate, epoch_batches
from preftune.logps import get_batch_logps


def accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """(B,) 1 where the implicit reward (or score) prefers chosen, 0 where rejected, 0.5 on a tie.

    A tie (policy == reference on this pair, as at step 0) counts as half right: the implicit reward
    model is then guessing, and chance for a pair is 50% (TRL counts it as wrong)."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


def ordered_batches(items: list, batch_size: int, collate_fn, pad_id: int, device=None):
    """(positions, collated batch) over `items` in order, `batch_size` at a time, on `device`."""
    for idx in epoch_batches(len(items), batch_size, 0, 0, shuffle=False):
        batch = collate_fn([items[i] for i in idx], pad_id, idx)
        yield idx, batch if device is None else {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def pair_logps(model, pairs: list, pad_id: int, batch_size: int, chunk_size: int = 1024, ld_alpha: float | None = None,
               device=None, autocast=contextlib.nullcontext, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (N, 2) float32, column 0 chosen, column 1 rejected, and the
    completion lengths (N, 2), of N tokenized pairs under `model` (on `device`, inside `autocast()`;
    a progress bar titled `desc` when given)."""
    logps = torch.empty(len(pairs), 2)
    lengths = torch.empty(len(pairs), 2, dtype=torch.long)
    batches = ordered_batches(pairs, batch_size, collate, pad_id, device)
    for idx, batch in tqdm(batches, total=math.ceil(len(pairs) / batch_size), desc=desc, disable=desc is None):
        with autocast():
            out = get_batch_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                  chunk_size, ld_alpha=ld_alpha)
        logps[idx] = out.logps.float().cpu().view(2, len(idx)).T  # rows [chosen; rejected] -> (B, 2)
        lengths[idx] = out.lengths.cpu().view(2, len(idx)).T
    return logps, lengths


@torch.no_grad()
def evaluate(step, policy, reference, items: list, batch_size: int, pad_id: int, accelerator) -> dict[str, float]:
    """Mean of every statistic of `step` (a `step.OBJECTIVES` entry) over `items`, named eval_<statistic>,
    plus eval_kl, the per-token KL to the reference (absent, not 0, where the step computes none: no
    reference model). A statistic's mean is over the values it has: the pairs, or for kto the
    examples of its side."""
    model = accelerator.unwrap_model(policy)  # no gradients here, so no distributed wrapper needed
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    kl_sum, kl_tokens, with_kl = 0.0, 0, False
    for _, batch in ordered_batches(items, batch_size, step.collate, pad_id, accelerator.device):
        with accelerator.autocast():
            out = step(model, reference, batch, kl=True)
        for key, value in out.stats.items():
            sums[key] = sums.get(key, 0.0) + value.float().sum().item()
            counts[key] = counts.get(key, 0) + value.numel()
        if out.kl is not None:
            kl_sum, kl_tokens, with_kl = kl_sum + out.kl[0].item(), kl_tokens + out.kl[1], True
    model.train()
    metrics = {f"eval_{k}": v / counts[k] for k, v in sums.items()}
    if with_kl:
        metrics["eval_kl"] = kl_sum / max(kl_tokens, 1)
    return metrics
