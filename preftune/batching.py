"""Batches of tokenized pairs: shuffling by seed and the [chosen; rejected] collation, padded or
packed (padding-free)."""

from __future__ import annotations

import random

import torch

from preftune.tokenization import TokenizedExample, TokenizedPair, prompt_key


def collate(pairs: list[TokenizedPair], pad_token_id: int, index: list[int] | None = None,
            multiple: int | None = None) -> dict[str, torch.Tensor]:
    """B pairs -> input_ids, attention_mask, completion_mask, each (2B, T), right-padded.

    Rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected (the convention of
    `logps.get_batch_logps`). T is the longest sequence in this batch, not cutoff_len, rounded up to
    a multiple of `multiple` (pad_to_multiple_of) when given.
    With `index` (the pairs' positions in their split), also index (B,): a precomputed
    reference (`reference.Reference`) looks its log-probs up by it. Pairs with a `margin` (stage: rm)
    add margin (B,) float32, 0 for a pair without one.
    """
    seqs = [(p.chosen_ids, p.chosen_start) for p in pairs] + [(p.rejected_ids, p.rejected_start) for p in pairs]
    batch = _with_index(_pad(seqs, pad_token_id, multiple=multiple), index)
    if any(p.margin is not None for p in pairs):  # stage: rm's `margin` column, (B,); a pair without one: 0
        batch["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
    return batch


def round_up(width: int, multiple: int | None) -> int:
    """pad_to_multiple_of: `width` rounded up to a multiple of `multiple` (None: unchanged)."""
    return -(-width // multiple) * multiple if multiple else width


def _with_index(batch: dict[str, torch.Tensor], index: list[int] | None) -> dict[str, torch.Tensor]:
    if index is not None:
        batch["index"] = torch.tensor(index, dtype=torch.long)
    return batch


def collate_chosen(pairs: list[TokenizedPair], pad_token_id: int, index: list[int] | None = None,
                   padding_free: bool = False, multiple: int | None = None) -> dict[str, torch.Tensor]:
    """B pairs -> their B prompt+chosen sequences (SFT: the chosen side is the example), padded as
    `collate` pads (B, T), or packed as `collate_packed` packs (1, N) with padding_free."""
    seqs = [(p.chosen_ids, p.chosen_start) for p in pairs]
    return _with_index(_packed(seqs) if padding_free else _pad(seqs, pad_token_id, multiple=multiple), index)


def collate_packed(pairs: list[TokenizedPair], pad_token_id: int, index: list[int] | None = None) -> dict[str, torch.Tensor]:
    """B pairs -> the same 2B sequences as `collate`, in the same order, back to back in one row:
    input_ids, position_ids (0, 1, ... within each sequence), completion_mask, each (1, N) for N
    tokens in all, and sequence_lengths (2B,). No padding: no compute is spent on pad tokens, and
    attention stays within each sequence through its position ids (`logps` module docstring).
    pad_token_id is not needed; the argument keeps one signature for every collate function."""
    seqs = [(p.chosen_ids, p.chosen_start) for p in pairs] + [(p.rejected_ids, p.rejected_start) for p in pairs]
    return _with_index(_packed(seqs), index)


def collate_shared(pairs: list[TokenizedPair], pad_token_id: int,
                   index: list[int] | None = None, multiple: int | None = None) -> dict[str, torch.Tensor]:
    """B pairs -> one row per pair, [shared prompt | chosen tail | rejected tail] (prefix sharing): the
    prompt is run once for both completions. The shared part is the longest common prefix of the two
    sequences within the prompt (the whole prompt unless the tokenizer merged across the boundary
    differently), each tail is the rest of its sequence. Each tail attends to the shared part and to
    itself, never to the other tail, and its position ids continue from the shared part, so every
    token sees exactly what it sees in its own sequence: the same log-probs as `collate`.

        input_ids, position_ids (B, L); attention_mask (B, 1, L, L) bool, True where a token may attend
        score_index (2, N): for each scored completion token, the flat (B * L) position whose hidden
            state predicts it and the flat position of the token itself, grouped by sequence in the
            order of `collate`'s 2B rows ([chosen of each pair; rejected of each pair])
        score_rows (N,): that sequence, 0 .. 2B-1
    """
    layouts, width = [], 0
    for p in pairs:
        k = 0
        limit = min(p.chosen_start, p.rejected_start)
        while k < limit and p.chosen_ids[k] == p.rejected_ids[k]:
            k += 1
        layouts.append((k, p.chosen_ids[k:], p.rejected_ids[k:]))
        width = max(width, len(p.chosen_ids) + len(p.rejected_ids) - k)
    width = round_up(width, multiple)
    B = len(pairs)
    input_ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    segment = torch.full((B, width), 3, dtype=torch.long)  # 0 shared, 1 chosen tail, 2 rejected tail, 3 padding
    scored: list[list[tuple[int, int]]] = [[] for _ in range(2 * B)]  # per sequence: (predicting, target) flat
    for b, (p, (k, chosen_tail, rejected_tail)) in enumerate(zip(pairs, layouts)):
        c, r = len(chosen_tail), len(rejected_tail)
        row = p.chosen_ids[:k] + chosen_tail + rejected_tail
        input_ids[b, :len(row)] = torch.tensor(row)
        position_ids[b, :len(row)] = torch.tensor(list(range(k + c)) + list(range(k, k + r)))
        segment[b, :k], segment[b, k:k + c], segment[b, k + c:k + c + r] = 0, 1, 2
        # sequence position j of chosen sits at row index j; of rejected at j below k, else k + c + (j - k)
        at_rejected = lambda j: j if j < k else c + j  # noqa: E731
        base = b * width
        scored[b] = [(base + j - 1, base + j) for j in range(p.chosen_start, len(p.chosen_ids))]
        scored[B + b] = [(base + at_rejected(j - 1), base + at_rejected(j))
                         for j in range(p.rejected_start, len(p.rejected_ids))]
    i = torch.arange(width)
    causal = i[None, :] <= i[:, None]  # (L, L)
    visible = (segment[:, None, :] == 0) | (segment[:, None, :] == segment[:, :, None])  # (B, L, L)
    attention_mask = (causal & visible) | torch.eye(width, dtype=torch.bool)  # padding attends to itself only
    flat = [pair for seq in scored for pair in seq]
    return _with_index({
        "input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask[:, None],
        "score_index": torch.tensor(flat, dtype=torch.long).reshape(-1, 2).T.contiguous(),
        "score_rows": torch.tensor([s for s, seq in enumerate(scored) for _ in seq], dtype=torch.long),
    }, index)


def _packed(seqs: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """(ids, completion start) sequences -> one row: input_ids, position_ids, completion_mask (1, N),
    sequence_lengths (sequences,)."""
    return {
        "input_ids": torch.tensor([[t for ids, _ in seqs for t in ids]]),
        "position_ids": torch.tensor([[i for ids, _ in seqs for i in range(len(ids))]]),
        "completion_mask": torch.tensor([[int(i >= start) for ids, start in seqs for i in range(len(ids))]]),
        "sequence_lengths": torch.tensor([len(ids) for ids, _ in seqs]),
    }


def _pad(seqs: list[tuple[list[int], int]], pad_token_id: int, width: int | None = None,
         multiple: int | None = None) -> dict[str, torch.Tensor]:
    """(ids, completion start) rows -> input_ids, attention_mask, completion_mask, right-padded to width
    (default: the longest row, rounded up to `multiple`)."""
    width = width or round_up(max(len(ids) for ids, _ in seqs), multiple)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (ids, start) in enumerate(seqs):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        completion_mask[row, start:len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def collate_unpaired(examples: list[TokenizedExample], pad_token_id: int,
                     index: list[int] | None = None, multiple: int | None = None,
                     cut_kl: bool = True) -> dict[str, torch.Tensor]:
    """B unpaired (KTO) examples -> input_ids, attention_mask, completion_mask (B, T), labels (B,) bool,
    and kl_input_ids, kl_attention_mask, kl_completion_mask (B, T): the mismatched pairs of KTO's KL
    baseline, example i's prompt with the completion of the nearest earlier example (cyclically) whose
    prompt differs: TRL's rotation by one within the batch when neighbours differ, as they do in
    shuffled data. Skipping same-prompt neighbours matters for pairs split in two, whose halves sit
    side by side in evaluation order: the rotation would score a prompt's own other answer, which is
    not a mismatched pair. A batch with a single prompt (per_device_train_batch_size: 1, as LLaMA-Factory's
    KTO example; a trailing batch of one) takes each example's `kl_completion`, its neighbour's in the data
    (LLaMA-Factory's mismatched pairs), and only without one falls back to the rotation. KL rows are cut
    to T tokens so they cost no more than the batch, as TRL's text path; `cut_kl=False` keeps them whole (padded
    to their own longest), as TRL's vision path. `index` and `multiple` as for `collate`.
    """
    longest = max(len(e.ids) for e in examples)
    width = round_up(longest, multiple)
    out = _pad([(e.ids, e.start) for e in examples], pad_token_id, width)
    prompts = [prompt_key(e) for e in examples]  # (ids, images)

    def partner(i: int) -> list[int]:
        for back in range(1, len(examples)):
            if prompts[i - back] != prompts[i]:
                other = examples[i - back]
                return other.ids[other.start:]
        if examples[i].kl_completion is not None:
            return examples[i].kl_completion
        other = examples[i - 1]
        return other.ids[other.start:]

    mismatched = []
    for i, e in enumerate(examples):
        ids = e.ids[:e.start] + partner(i)
        mismatched.append((ids[:longest] if cut_kl else ids, e.start))  # cut as without multiple
    kl_width = width if cut_kl else round_up(max(len(ids) for ids, _ in mismatched), multiple)
    out.update({f"kl_{k}": v for k, v in _pad(mismatched, pad_token_id, kl_width).items()})
    out["labels"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
    return _with_index(out, index)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
                  lengths: list[int] | None = None) -> list[list[int]]:
    """Index batches for one epoch; the order depends only on (seed, epoch), so a run is reproducible.

    With `lengths` (group_by_length), the shuffled order is cut into mega-batches of
    GROUP_MEGABATCH batches, each sorted longest first, so that a batch holds items of similar length
    (less padding) while batches still come in random order, as transformers' LengthGroupedSampler."""
    order = list(range(n))
    rng = random.Random(seed * 1_000_003 + epoch)
    if shuffle:
        rng.shuffle(order)
    if lengths is not None:
        size = GROUP_MEGABATCH * batch_size
        order = [i for k in range(0, n, size) for i in sorted(order[k:k + size], key=lambda i: -lengths[i])]
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


GROUP_MEGABATCH = 50  # batches per length-sorted group (transformers' LengthGroupedSampler uses 50 too)
