"""Batches of tokenized pairs: shuffling by seed and the [chosen; rejected] collation."""

from __future__ import annotations

import random

import torch

from preftune.tokenization import TokenizedPair


def collate(pairs: list[TokenizedPair], pad_token_id: int) -> dict[str, torch.Tensor]:
    """B pairs -> input_ids, attention_mask, completion_mask, each (2B, T), right-padded.

    Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected (the convention of
    `logps.get_batch_logps`). T is the longest sequence in this batch, not cutoff_len.
    """
    seqs = [(p.chosen_ids, p.chosen_start) for p in pairs] + [(p.rejected_ids, p.rejected_start) for p in pairs]
    width = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (ids, start) in enumerate(seqs):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        completion_mask[row, start:len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Index batches for one epoch; the order depends only on (seed, epoch), so a run is reproducible."""
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]
