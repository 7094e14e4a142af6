"""The one pair scorer: everything that runs a model over a list of examples and measures it.

    evaluate(step, policy_logps, reference, val_items, batch_size, pad_id, engine)  # eval_* metrics
    logps, lengths = pair_logps(LogpsModule(model, chunk_size), pairs, pad_id, batch_size)   # (N, 2) each
    accuracy(chosen_rewards, rejected_rewards)                                     # ties count half

Training's evaluation, `preftune export`'s quality check and the reference precompute all score
through these, in the same batch order (the items in order, `batch_size` at a time). With several
processes, `evaluate` gives each process every N-th batch and pools the sums (`pooled`), so each
item is counted once whatever the count, and every process returns the same numbers. `engine` is the
run's (engines/): its processes, device and precision.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from preftune.batching import collate, collate_chosen, epoch_batches
from preftune.logps import MEDIA_KEYS, get_batch_logps


def accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """(B,) 1 where the implicit reward (or score) prefers chosen, 0 where rejected, 0.5 on a tie.

    A tie (policy == reference on this pair, as at step 0) counts as half right: the implicit reward
    model is then guessing, and chance for a pair is 50% (TRL counts it as wrong)."""
    return (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()


def ordered_batches(items: list, batch_size: int, collate_fn, pad_id: int, device=None, shard=(0, 1)):
    """(positions, collated batch) over `items` in order, `batch_size` at a time, on `device`;
    shard = (k, n): only batches k, k + n, k + 2n, ... (process k of n)."""
    for idx in epoch_batches(len(items), batch_size, 0, 0, shuffle=False)[shard[0]::shard[1]]:
        batch = collate_fn([items[i] for i in idx], pad_id, idx)
        yield idx, batch if device is None else {k: v.to(device) for k, v in batch.items()}


def pooled(sums: dict[str, float], counts: dict[str, int], engine) -> tuple[dict[str, float], dict[str, int]]:
    """Every process's per-statistic sums and counts, added up key by key (a statistic that only some
    processes have, such as kto's rewards/rejected, counts where it is). One process: as given."""
    if engine.world == 1:
        return sums, counts
    total_sums: dict[str, float] = {}
    total_counts: dict[str, int] = {}
    for part_sums, part_counts in gather_object([(sums, counts)]):  # in process order: every process adds alike
        for key, value in part_sums.items():
            total_sums[key] = total_sums.get(key, 0.0) + value
            total_counts[key] = total_counts.get(key, 0) + part_counts[key]
    return total_sums, total_counts


def training_row(running: dict[str, list[torch.Tensor]], tokens: int, train_seconds: float, kl, engine) -> dict:
    """A training log row: the mean of each statistic over every process's items since the last row
    (`running`: statistic -> per-micro-batch tensors), the KL of the last micro-batch (`StepOutput.kl`:
    kl_per_token and kl_per_sequence; absent, not 0, without a reference) and the throughput in tokens
    per second of training time."""
    sums = {k: torch.cat(v).float().sum().item() for k, v in running.items()}
    counts = {k: sum(t.numel() for t in v) for k, v in running.items()}
    for key, (value, n) in (kl or {}).items():
        sums[key], counts[key] = value, n
    sums, counts = pooled({**sums, "tokens": float(tokens)}, {**counts, "tokens": 1}, engine)
    row = {k: sums[k] / max(counts[k], 1) for k in sums if k != "tokens"}
    copies = engine.world // engine.data_shard[1]  # sequence parallelism: each item counted by its group's processes
    row["tokens_per_second"] = sums["tokens"] / copies / max(train_seconds, 1e-9)
    return row


@torch.no_grad()
def pair_logps(scorer, pairs: list, pad_id: int, batch_size: int, ld_alpha: float | None = None, device=None,
               autocast=contextlib.nullcontext, desc: str | None = None,
               collate_fn=collate) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (N, 2) float32, column 0 chosen, column 1 rejected, and the
    completion lengths (N, 2), of N tokenized pairs under `scorer` (a `logps.LogpsModule`, or what an
    engine made of one; on `device`, inside `autocast()`; a progress bar titled `desc` when given).
    collate_fn: vision pairs' `vision.collate_vision` (with the processor), whose image tensors go along."""
    logps = torch.empty(len(pairs), 2)
    lengths = torch.empty(len(pairs), 2, dtype=torch.long)
    batches = ordered_batches(pairs, batch_size, collate_fn, pad_id, device)
    for idx, batch in tqdm(batches, total=math.ceil(len(pairs) / batch_size), desc=desc, disable=desc is None):
        media = {k: batch[k] for k in MEDIA_KEYS if k in batch}
        with autocast():
            out = scorer(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], ld_alpha=ld_alpha,
                         **({"media": media} if media else {}))
        logps[idx] = out.logps.float().cpu().view(2, len(idx)).T  # rows [chosen; rejected] -> (B, 2)
        lengths[idx] = out.lengths.cpu().view(2, len(idx)).T
    return logps, lengths


@torch.no_grad()
def completion_logps(model, items: list, pad_id: int, batch_size: int, device=None, processor=None) -> torch.Tensor:
    """Summed log-probs (N,) float32 of each item's chosen side (prompt + completion, the completion
    scored): for sampled completions, whose log pi and log pi_ref give a sequence-level KL estimate.
    A vision-language model's items (vision.VisionPair) run with their images through its `processor`, in the
    [chosen; rejected] rows a VLM batch has (`vision.collate_vision`: each pair's images once, for both rows;
    both rows are the item here, the chosen half is kept)."""
    out = torch.empty(len(items))
    if processor is None:
        for idx, batch in ordered_batches(items, batch_size, collate_chosen, pad_id, device):
            out[idx] = get_batch_logps(model, batch["input_ids"], batch["attention_mask"],
                                       batch["completion_mask"]).logps.float().cpu()
        return out
    from preftune.vision import collate_vision

    collate_fn = functools.partial(collate_vision, processor=processor)
    for idx, batch in ordered_batches(items, batch_size, collate_fn, pad_id, device):
        media = {k: batch[k] for k in MEDIA_KEYS if k in batch} or None
        logps = get_batch_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                media=media).logps  # (2B,): [chosen; rejected], the same rows
        out[idx] = logps[:len(idx)].float().cpu()
    return out


@torch.no_grad()
def evaluate(step, policy_logps, reference, items: list, batch_size: int, pad_id: int, engine,
             prefix: str = "eval_") -> dict[str, float]:
    """Mean of every statistic of `step` (a `step.STEPS` entry) over `items`, named <prefix><statistic>,
    plus the KL to the reference, eval_kl_per_token (nats per completion token) and eval_kl_per_sequence
    (nats per completion) (absent, not 0, where the step computes none: no reference model). A
    statistic's mean is over the values it has: the pairs, or for kto the examples of its side; the
    KL's over every scored token, or every completion. Sharded over the processes, batch by batch, and
    pooled."""
    model = engine.unwrap(policy_logps)  # no gradients here, so no distributed wrapper needed
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    shard = engine.data_shard
    for _, batch in ordered_batches(items, batch_size, step.collate, pad_id, engine.device, shard):
        with engine.autocast():
            out = step(model, reference, batch, kl=True)
        values = {key: (value.float().sum().item(), value.numel()) for key, value in out.stats.items()}
        values.update(out.kl or {})  # sums over the batch's tokens and completions: pooled like the rest
        for key, (value, n) in values.items():
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + n
    if engine.lockstep and items:
        # a sharded forward needs every process: one with a batch fewer than the others runs one more,
        # on its first item, and counts nothing of it
        batches = math.ceil(len(items) / batch_size)
        if len(range(shard[0], batches, shard[1])) < math.ceil(batches / shard[1]):
            extra = {k: v.to(engine.device) for k, v in step.collate(items[:1], pad_id, [0]).items()}
            with engine.autocast():
                step(model, reference, extra, kl=True)
    model.train()
    sums, counts = pooled(sums, counts, engine)
    return {f"{prefix}{k}": v / max(counts[k], 1) for k, v in sums.items()}
