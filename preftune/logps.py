"""Sequence log-probs of completions: the one function every loss and metric is built on.

Batch convention (made once, in `batching.collate`): a batch of B pairs is one tensor of 2B
rows, the B prompt+chosen sequences first and the B prompt+rejected after, right-padded, so
chosen and rejected share one forward pass; `logps[:B]` are chosen, `logps[B:]` rejected.
Padding-free (`batching.collate_packed`): the same 2B sequences in the same order back to back in
one row, `position_ids` restarting at 0 for each and `sequence_lengths` (2B,) saying where each
ends; attention stays within a sequence (transformers builds the mask from the position ids, or
flash-attn runs varlen), and the outputs are the same (2B,) tensors.
Prefix sharing (`batching.collate_shared`): one row per pair, [prompt | chosen | rejected], a 4D
attention mask that keeps each completion to the prompt and itself, and `score_index` / `score_rows`
naming the scored positions; again the same (2B,) outputs.

Memory: the LM head is applied only at completion positions, `chunk_size` tokens at a time,
and where the batch's (tokens, vocab) fp32 logits would take more than KEEP_LOGITS_BYTES, each
chunk's are recomputed in backward instead of stored, so they never exist at once. Below that
they are kept: the recompute is one more LM-head matmul per chunk, about 15% of a step on the CPU
benchmark, for memory that small batches do not need (benchmarks/RESULTS.md).

Mixture-of-experts models (router_aux_loss_coef, `router_aux_loss`): the backbone's router logits of the same pass
give the model's load-balancing loss (`BatchLogps.aux_loss`), as its own forward computes it.

enable_liger_kernel (`fused_dpo_logps`): while training, the LM head and the DPO loss run instead
through Liger's fused linear DPO loss (the liger-kernel package), which computes the gradient in
the forward pass a few pairs at a time; the same numbers.

Sequence parallelism (sequence_parallel_size, DeepSpeed's Ulysses attention: engines/zero.py
`use_ulysses`): the processes of a group each run a contiguous slice of every row through the model
(`sequence_slice`), their attention exchanging slices for heads; each sums its slice's scored tokens,
and the partial sums are added up over the group (differentiably), so every process holds the whole
sequences' (2B,) log-probs and lengths. The split is set once per process, as the attention it goes with.

Vision-language models (vision.py): a batch with images also holds the image processor's tensors
(`MEDIA_KEYS`: pixel_values, ...), for its B pairs' images once, in pair order (a pair's chosen and rejected rows
hold the same images); the pass encodes each image once and runs the model's whole multimodal backbone
(`multimodal_backbone`) with those features placed at the image tokens of both rows (`_rows_media`), all of
them prompt tokens and so never scored. A batch without images runs the language model alone, as for text.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


# The fp32 logits of a batch up to this size are kept for the backward pass (module docstring); beyond
# it each chunk's are recomputed there. A GPU batch of 8192 completion tokens over Qwen's 151936-word
# vocabulary would keep 5 GB: it recomputes; the CPU benchmark's 2,400 x 16384 (150 MiB) keeps them.
KEEP_LOGITS_BYTES = 256 * 2**20


class BatchLogps(NamedTuple):
    """What `get_batch_logps` returns for a batch of R rows (R = 2B for B pairs)."""
    logps: torch.Tensor  # (R,) summed completion log-probs
    lengths: torch.Tensor  # (R,) completion token counts
    hidden: torch.Tensor | None = None  # (N, H) detached hidden states at the N scored positions (return_hidden)
    wpo_weights: torch.Tensor | None = None  # (R,) WPO's per-sequence weights, detached (wpo)
    fused_loss: torch.Tensor | None = None  # () Liger's loss, the mean over the B pairs, with its gradient (fused)
    # (token_stats) per scored token, detached: the mean of its logits over the vocabulary, (N,), the entropy
    # of its next-token distribution, (N,), and the sequence it belongs to, (N,) (TRL's logits/* and entropy)
    mean_logits: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None  # () a mixture-of-experts model's load-balancing loss, with its gradient (router_aux)
    aux_loss_coef: float = 0.0  # its weight in the objective (`LogpsModule.router_aux_loss_coef`)


class FusedDPO(NamedTuple):
    """enable_liger_kernel: which of Liger's DPO losses `fused_dpo_logps` computes, with its hyperparameters
    (Liger's names are preftune's pref_loss names for the losses it has; the config says which: config/names.py)."""
    loss_type: str
    beta: float
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05


# The image processors' outputs a batch with images carries (vision.collate_vision): what the multimodal backbone
# takes beside input_ids (LLaVA: pixel_values; LLaVA-NeXT: image_sizes; Qwen2-VL: image_grid_thw, mm_token_type_ids;
# Gemma 3: token_type_ids)
MEDIA_KEYS = ("pixel_values", "image_sizes", "image_grid_thw", "mm_token_type_ids", "token_type_ids")
ROW_KEYS = ("mm_token_type_ids", "token_type_ids")  # of those, the ones given per row (R, T), not per image
# A batch without images under a lockstep engine (FSDP2, ZeRO-3) carries a blank image's tensors under this prefix
# (vision.collate_vision): its features are computed and added times 0, so every process runs the vision part.
IDLE = "idle_"
# a batch whose rows each hold their own images, in row order (kto's examples: vision.collate_vision_unpaired), not
# a pair's images once for its two rows
OWN_IMAGES = "own_images"


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """The tensors of a collated batch that `get_batch_logps` reads: padded rows, or one packed row
    (and `media`, the image tensors of a batch with images)."""
    media = {k: batch[k] for k in MEDIA_KEYS if k in batch}
    if media and batch.get(OWN_IMAGES):
        media[OWN_IMAGES] = True
    idle = {k[len(IDLE):]: v for k, v in batch.items() if k.startswith(IDLE)}
    if idle:  # a batch without images under a lockstep engine: the vision part runs on a blank image (vision.py)
        media = {"idle": idle, OWN_IMAGES: bool(batch.get(OWN_IMAGES))}
    if "score_index" in batch:  # prefix sharing (not with images: vision.check_config)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "completion_mask": None,
                  "position_ids": batch["position_ids"], "score_index": batch["score_index"],
                  "score_rows": batch["score_rows"]}
    elif "position_ids" not in batch:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    else:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": None, "completion_mask": batch["completion_mask"],
                  "position_ids": batch["position_ids"], "sequence_lengths": batch["sequence_lengths"]}
    return {**inputs, "media": media} if media else inputs


class SequenceSplit(NamedTuple):
    """Sequence parallelism, as the engine hands it in (engines/zero.py `use_ulysses`): this process runs slice
    `part` of `parts` of every row, and `total` adds a per-sequence tensor up over the group's slices (with its
    gradient: its backward adds the group's gradients up, so each slice's tokens get theirs)."""
    part: int
    parts: int
    total: Callable[[torch.Tensor], torch.Tensor]


# Set once per process (`split_sequences`), as the attention that needs the split: DeepSpeed's Ulysses attention
# replaces the model's attention function for the whole process. None: whole rows.
_split: SequenceSplit | None = None


def split_sequences(split: SequenceSplit | None) -> None:
    """Every pass of this process from now on runs its slice of each row (`get_batch_logps`)."""
    global _split
    _split = split


def sequence_slice(input_ids: torch.Tensor, completion_mask: torch.Tensor, part: int, parts: int):
    """Slice `part` of `parts` of each of R rows, contiguous: input_ids, position_ids, targets and their score
    mask, (R, W / parts) each, W = T rounded up to a multiple of parts (padded at the right, where padding
    already is: only padding follows it, so no real token sees it). The targets are shifted before the split,
    targets[t] = input_ids[t + 1], since a slice's last token predicts the next slice's first. Positions count
    from 0 over the whole row: the split attention gathers them to mask causally."""
    R, T = input_ids.shape
    W = -(-T // parts) * parts
    targets = F.pad(input_ids[:, 1:], (0, W - T + 1))  # (R, W)
    score = F.pad(completion_mask[:, 1:], (0, W - T + 1))
    input_ids = F.pad(input_ids, (0, W - T))
    position_ids = torch.arange(W, device=input_ids.device).expand(R, W)
    piece = slice(part * W // parts, (part + 1) * W // parts)
    return input_ids[:, piece], position_ids[:, piece], targets[:, piece], score[:, piece]


def _logits(lm_head: torch.nn.Module, hidden: torch.Tensor, softcap: float | None,
            call_head: bool = False) -> torch.Tensor:
    """(N, V) float32 logits. call_head: the weight may be read only by calling the module (an engine that
    holds it partitioned gathers it for the call: `LogpsModule.call_head`)."""
    low_precision = lm_head.weight.dtype != torch.float32 or torch.is_autocast_enabled("cpu")
    if hidden.device.type == "cpu" and low_precision and not call_head:
        # CPUs without native bf16 matmul run the bf16 LM-head backward 100x slower than fp32
        # (measured in benchmarks/); the head is one matmul, so do it in fp32 there
        with torch.autocast("cpu", enabled=False):
            logits = F.linear(hidden.float(), lm_head.weight.float(),
                              None if lm_head.bias is None else lm_head.bias.float())
    else:
        logits = lm_head(hidden).float()  # (N, V); fp32 for a stable logsumexp under bf16/fp16
    if softcap is not None:  # Gemma-2 style final logit soft-capping
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _lm_head_logps(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                   softcap: float | None, wpo: bool = False, call_head: bool = False, token_stats: bool = False):
    """log p(target) for each row of hidden: (N, H), (N,) -> (N,). With wpo or token_stats, a tuple of
    it and three detached (N,) tensors or None: with wpo log sum_v p_v^2, the log-prob of the token the
    policy itself would most likely agree on (WPO's normaliser); with token_stats the mean logit over
    the vocabulary and the entropy -sum_v p_v log p_v = log Z - sum_v p_v z_v, from the same logits
    (elementwise passes over them: cheap beside the LM head's matmul)."""
    logits = _logits(lm_head, hidden, softcap, call_head)
    log_z = torch.logsumexp(logits, dim=-1)
    logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_z
    if not (wpo or token_stats):
        return logps
    with torch.no_grad():
        log_sum_sq = torch.logsumexp(2 * logits, dim=-1) - 2 * log_z if wpo else None
        mean_logits = logits.mean(dim=-1) if token_stats else None
        entropy = log_z - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1) if token_stats else None
    return logps, log_sum_sq, mean_logits, entropy


def router_aux_loss(model, router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor:
    """A mixture-of-experts model's load-balancing loss (Switch Transformer, Fedus et al. 2021,
    https://arxiv.org/abs/2101.03961, Eqs. 4-6: experts x sum_e (share of the top-k assignments to e) x (mean
    router probability of e), over every layer's tokens), computed by the function the model's own transformers
    module defines, with the arguments its forward passes it, so that it is the model's `aux_loss`: each layer's
    router logits ((rows x T), experts), the model's top-k and the attention mask that keeps padding out (None:
    every token counts, as in one packed row). ()."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the transformers model
    module = next(sys.modules[c.__module__] for c in type(base).__mro__
                  if hasattr(sys.modules[c.__module__], "load_balancing_loss_func"))
    top_k = getattr(base, "num_experts_per_tok", None) or base.config.get_text_config().num_experts_per_tok
    return module.load_balancing_loss_func(tuple(router_logits), router_logits[0].size(-1), top_k, attention_mask)


def multimodal_backbone(model) -> torch.nn.Module:
    """A vision-language model's backbone (vision tower, projector, language model: LlavaModel, ...), which
    takes the image tensors; its get_decoder() is the language model alone. AdapterReference has its own."""
    if hasattr(model, "multimodal_backbone"):
        return model.multimodal_backbone()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the transformers model
    return base.model


def _backbone(model, router_aux: bool = False, media: dict | None = None, **inputs):
    """The backbone's last hidden states, and with router_aux its router logits (mixture-of-experts models:
    the `aux_loss` of the model's own forward is made from them, and its LM head is not run here), else None.
    media: a batch's image tensors, for a vision-language model's whole backbone."""
    # transformers models and peft models have a decoder; so does AdapterReference
    inputs.update(use_cache=False, **({"output_router_logits": True} if router_aux else {}))
    idle = (media or {}).get("idle")
    if idle is not None:
        out = _blank_image_call(multimodal_backbone(model), idle, inputs, bool(media.get(OWN_IMAGES)))
    else:
        backbone = multimodal_backbone(model) if media else model.get_decoder()
        out = backbone(**inputs, **(_rows_media(backbone, media) if media else {}))
    return out.last_hidden_state, out.router_logits if router_aux else None


def _blank_image_call(backbone, idle: dict, inputs: dict, own_images: bool = False):
    """The backbone's output for rows without images, under a lockstep engine (FSDP2, ZeRO-3) that needs the
    vision part run on every process: a blank image's features (`idle`: its image processor's tensors), times 0,
    join the token embeddings (the same numbers; zero gradients for the vision part from this process).
    A sharded vision tower gathers its weights, and reduces their gradients, only if every process runs it in the
    same order: ZeRO-3 records the order of module calls, forward and backward, and gathers (and prefetches) by
    it, so this runs as the backbone's own forward does, inside the backbone's call (its hooks fire as with
    images): the token embeddings, the vision tower and projector, the language model. The features join the
    embeddings as the backbone's image features do, after them, so the backward also reaches the vision part
    first and the token embeddings last. pooler_output: the features the model places at its image tokens,
    projector included (the rest of the vision output, CLIP's pooled CLS, gets no gradient on the other processes
    either)."""
    inner = getattr(backbone, "module", backbone)  # (the adapter-off reference's backbone: adapters._UnderContext)
    # where rows with images get their features before the backbone's call (_rows_media: a pair batch, a backbone
    # that takes mm_encoder_outputs), the blank image's are made there too, so both orders of module calls stay the
    # same; rows with their own images (kto, sft) are encoded inside the call
    early = not own_images and _takes_encoder_outputs(backbone)
    early_features = backbone.get_image_features(**idle, return_dict=True).pooler_output if early else None

    def forward(input_ids, **rest):
        embeds = inner.get_input_embeddings()(input_ids)  # (R, T, H)
        features = early_features if early else inner.get_image_features(**idle, return_dict=True).pooler_output
        embeds = embeds + 0.0 * sum(t.float().sum() for t in _tensors(features)).to(embeds.dtype)
        return inner.get_decoder()(inputs_embeds=embeds, **rest)

    inner.forward = forward  # for this call only: the instance's attribute shadows the class's forward
    try:
        return backbone(**inputs)
    finally:
        del inner.forward


def _rows_media(backbone, media: dict) -> dict:
    """What the multimodal backbone takes for the images of a batch's 2B rows, given `media`, the image tensors of
    its B pairs' images once (vision.collate_vision): the rejected rows hold the chosen rows' images, in the same
    order, so each image is encoded once and its features placed in both rows, through the backbone's
    `mm_encoder_outputs` (transformers 5's precomputed encoder outputs; a model computes them itself from
    pixel_values otherwise). The same numbers as encoding each row's images (the features are the same
    tensors; their gradient is the sum over both rows, as the two encodings' would add up), with half the
    vision tower's work. A backbone without `mm_encoder_outputs` gets every row's images, each encoded twice.
    Per-image tensors (image_grid_thw: Qwen2-VL's M-RoPE places each row's image tokens by it) are given for
    every row's images."""
    if media.get(OWN_IMAGES):  # each row its own images, in row order: as the backbone takes them
        return {k: v for k, v in media.items() if k != OWN_IMAGES}
    images = {k: v for k, v in media.items() if k not in ROW_KEYS}  # per image
    rows = {**media, **{k: torch.cat((v, v)) for k, v in images.items()}}  # [chosen rows' images; rejected rows']
    if not _takes_encoder_outputs(backbone):
        return rows
    features = backbone.get_image_features(**images, return_dict=True)
    pooled = features.pooler_output  # per image: a tuple or list of (tokens, H), or one (images, tokens, H) tensor
    features.pooler_output = torch.cat((pooled, pooled)) if isinstance(pooled, torch.Tensor) else [*pooled, *pooled]
    del rows["pixel_values"]  # (a backbone takes pixel_values or mm_encoder_outputs, not both)
    return {**rows, "mm_encoder_outputs": {"image": features}}


@functools.cache
def _forward_takes_encoder_outputs(cls) -> bool:
    return "mm_encoder_outputs" in inspect.signature(cls.forward).parameters


def _takes_encoder_outputs(backbone) -> bool:
    """Whether a multimodal backbone takes precomputed image features (`mm_encoder_outputs`); an adapter
    reference's backbone (adapters._UnderContext) is asked about the one it wraps."""
    return _forward_takes_encoder_outputs(type(getattr(backbone, "module", backbone)))


def _tensors(out) -> list[torch.Tensor]:
    """The tensors of a model output (a tensor, a tuple or list of them, or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if hasattr(out, "values") else out if isinstance(out, (tuple, list)) else []
    return [t for v in values for t in _tensors(v)]


def _completion_hidden(model, input_ids, attention_mask, completion_mask, position_ids=None, router_aux=False,
                       targets=None, media=None):
    """Backbone hidden states at the positions that predict a completion token (and the router's logits, with
    router_aux). targets: already shifted (a sequence-parallel slice, `sequence_slice`), completion_mask then
    their score mask. media: a vision-language model's image tensors."""
    hidden, router_logits = _backbone(model, router_aux, media, input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids)
    if targets is not None:
        score = completion_mask.bool()  # (R, W/S)
        return hidden[score], targets[score], score, router_logits
    # position t predicts token t+1: shift the mask and the targets left by one. Packed, the last token
    # of a sequence "predicts" the next sequence's first token, a prompt token, never scored
    score = completion_mask[:, 1:].bool()  # (R, T-1): 2B padded rows, or one packed row
    return hidden[:, :-1][score], input_ids[:, 1:][score], score, router_logits  # (N, H), (N,), (R, T-1)


def _shared_hidden(model, input_ids, attention_mask, position_ids, score_index):
    """Prefix sharing: the backbone over [prompt | chosen | rejected] rows under their 4D mask (bool,
    True = attend: sdpa reads it so; eager adds it, so it becomes 0 / -inf), and the hidden states and
    targets at the scored positions, (N, H), (N,)."""
    if getattr(model.config, "_attn_implementation", "sdpa") == "eager":
        attention_mask = torch.zeros(attention_mask.shape, device=attention_mask.device).masked_fill(
            ~attention_mask, torch.finfo(torch.float32).min)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state
    return hidden.reshape(-1, hidden.size(-1))[score_index[0]], input_ids.reshape(-1)[score_index[1]]


def _scored_sequences(score: torch.Tensor, sequence_lengths: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The sequence each scored token belongs to, (N,), in order, and the number of sequences."""
    if sequence_lengths is None:  # padded: a sequence per row
        return score.nonzero()[:, 0], score.size(0)
    # packed: token t+1 (predicted at t) belongs to sequence `owner[t + 1]`; output_size avoids a device sync
    owner = torch.repeat_interleave(torch.arange(sequence_lengths.size(0), device=score.device), sequence_lengths,
                                    output_size=score.size(1) + 1)
    return owner[1:][score[0]], sequence_lengths.size(0)


def _softcap(model) -> float | None:
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None)


def ld_token_weights(rows: torch.Tensor, lengths: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's per-token weights (Liu et al. 2024, https://arxiv.org/abs/2409.06411, Eq. 9), (N,):
    1 on the first l_p = min(|y_w|, |y_l|) completion tokens of both sequences of a pair (the length
    they share), ld_alpha on the longer completion's tokens beyond them, as TRL 1.16's `ld_alpha`.
    rows: (N,) the sequence of each scored token, grouped in sequence order ([chosen; rejected]);
    lengths: (2B,) completion tokens per sequence."""
    first = torch.cumsum(lengths, 0) - lengths  # (2B,) where each sequence's tokens start among the N
    position = torch.arange(rows.size(0), device=rows.device) - first[rows] + 1  # 1-based within its sequence
    B = lengths.size(0) // 2
    shared = torch.minimum(lengths[:B], lengths[B:]).repeat(2)  # (2B,)
    ones = torch.ones(rows.size(0), dtype=torch.float32, device=rows.device)
    return torch.where(position <= shared[rows], ones, ld_alpha * ones)


def get_batch_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, completion_mask: torch.Tensor,
                    chunk_size: int = 1024, return_hidden: bool = False, ld_alpha: float | None = None,
                    wpo: bool = False, position_ids: torch.Tensor | None = None,
                    sequence_lengths: torch.Tensor | None = None, score_index: torch.Tensor | None = None,
                    score_rows: torch.Tensor | None = None, call_head: bool = False, token_stats: bool = False,
                    router_aux: bool = False, media: dict[str, torch.Tensor] | None = None):
    """Summed completion log-probs and completion lengths, each (2B,), for a collated batch.

    input_ids, attention_mask, completion_mask: (2B, T); completion_mask is 1 on completion tokens.
    Packed (padding-free): input_ids, position_ids, completion_mask (1, N_tokens), attention_mask
    None, sequence_lengths (2B,) (module docstring). Prefix sharing: input_ids, position_ids (B, L), a
    4D attention_mask (B, 1, L, L), score_index (2, N), score_rows (N,), completion_mask None.
    With return_hidden, also the detached hidden states at the scored positions, (N, H), which
    `completion_kl` turns into the KL to the reference without another forward pass.
    With ld_alpha (LD-DPO), each pair's tokens beyond the shorter completion's length count ld_alpha
    times in the sum (`ld_token_weights`); the lengths stay the full ones.
    With wpo, last also WPO's per-sequence weights (2B,), detached (Zhou et al. 2024,
    https://arxiv.org/abs/2406.11827, Eq. 2, as TRL 1.16's `use_weighting`): the policy's own
    probability of the completion, per token, relative to its next-token distribution,

        w(y|x) = exp( (1/|y|) sum_t [log p(y_t) - log sum_v p(v)^2] )

    computed from the same chunked LM head (log sum p^2 = logsumexp(2 logits) - 2 logsumexp(logits)).
    call_head: the LM head's weight is read only by calling the module (`LogpsModule.call_head`).
    With token_stats, also each scored token's mean logit and entropy, and its sequence, (N,) each
    (TRL's logits/chosen, logits/rejected and entropy metrics).
    router_aux (a mixture-of-experts model): also its load-balancing loss over every token of the pass, prompts and
    both completions, as the model's own forward computes it (`router_aux_loss`); padded rows and packed ones
    count the same tokens (prefix sharing, which runs a prompt once for two sequences, is refused with it).
    Sequence parallelism (`split_sequences`; padded rows only): this process runs its slice of the rows
    (`sequence_slice`), and the log-probs, lengths and WPO's sums are the slices' totals (module docstring);
    hidden and the token stats are of its slice's tokens.
    media: a vision-language model's image tensors for the pairs' images, once (module docstring), padded rows.
    Returns a `BatchLogps`; hidden, wpo_weights, the token stats and aux_loss are None unless asked for.
    """
    aux_loss = targets = None
    if _split is not None:  # (the config refuses the packed and shared layouts with it)
        input_ids, position_ids, targets, completion_mask = sequence_slice(input_ids, completion_mask, _split.part,
                                                                           _split.parts)
        attention_mask = None  # the attention masks causally by the gathered positions
    if score_index is not None:
        hidden, targets = _shared_hidden(model, input_ids, attention_mask, position_ids, score_index)
    else:
        hidden, targets, score, router_logits = _completion_hidden(model, input_ids, attention_mask, completion_mask,
                                                                   position_ids, router_aux, targets, media)
        if router_aux:
            aux_loss = router_aux_loss(model, router_logits, attention_mask)  # packed: no mask, no padding
    lm_head, softcap = model.get_output_embeddings(), _softcap(model)
    vocab = getattr(lm_head, "out_features", None) or lm_head.weight.shape[0]  # (out_features: the weight may be partitioned)
    recompute = torch.is_grad_enabled() and hidden.requires_grad and hidden.size(0) * vocab * 4 > KEEP_LOGITS_BYTES
    pieces = []
    for i in range(0, hidden.size(0), chunk_size):
        h, t = hidden[i:i + chunk_size], targets[i:i + chunk_size]
        if recompute:
            pieces.append(checkpoint(_lm_head_logps, lm_head, h, t, softcap, wpo, call_head, token_stats,
                                     use_reentrant=False))
        else:
            pieces.append(_lm_head_logps(lm_head, h, t, softcap, wpo, call_head, token_stats))
    empty = hidden.new_zeros(0, dtype=torch.float32)
    log_sum_sq = mean_logits = entropy = None  # (N,) each, where asked for
    if wpo or token_stats:
        columns = list(zip(*pieces)) if pieces else [()] * 4  # logps, log_sum_sq, mean_logits, entropy per chunk
        log_sum_sq, mean_logits, entropy = ((torch.cat(col) if col else empty) if asked else None
                                            for col, asked in zip(columns[1:], (wpo, token_stats, token_stats)))
        pieces = list(columns[0])
    token_logps = torch.cat(pieces) if pieces else empty  # (N,)
    if score_index is not None:  # prefix sharing: B rows hold 2B sequences
        rows, n = score_rows, 2 * input_ids.size(0)
        lengths = torch.bincount(rows, minlength=n)
    else:
        rows, n = _scored_sequences(score, sequence_lengths)  # the sequence each scored token belongs to, (N,)
        lengths = score.sum(dim=1) if sequence_lengths is None else torch.bincount(rows, minlength=n)  # (2B,)
    weighted = token_logps if ld_alpha is None else token_logps * ld_token_weights(rows, lengths, ld_alpha)
    logps = token_logps.new_zeros(n).index_add(0, rows, weighted)  # (2B,)
    if _split is not None:  # each process's slice's sums -> the whole sequences', on every process
        logps, lengths = _split.total(logps), _split.total(lengths)
    wpo_weights = None
    if wpo:
        aligned = token_logps.new_zeros(n).index_add(0, rows, token_logps.detach() - log_sum_sq)  # (2B,)
        mean_aligned = (aligned if _split is None else _split.total(aligned)) / lengths.clamp(min=1)
        wpo_weights = torch.exp(mean_aligned)
    return BatchLogps(logps, lengths, hidden.detach() if return_hidden else None, wpo_weights, None, mean_logits,
                      entropy, rows if token_stats else None, aux_loss=aux_loss)


@torch.no_grad()
def completion_kl(policy, reference, policy_hidden: torch.Tensor, reference_hidden: torch.Tensor,
                  chunk_size: int = 1024, max_tokens: int | None = None,
                  call_head: bool = False) -> tuple[torch.Tensor, int]:
    """Exact per-token KL(pi_theta || pi_ref), summed over the vocabulary, at completion positions.

    policy_hidden, reference_hidden: (N, H) from `get_batch_logps(..., return_hidden=True)`.
    Returns (sum of per-token KL, number of tokens). This is the KL of the next-token
    distributions along the dataset's chosen and rejected completions (teacher-forced), not
    the sequence-level KL under samples from the policy: a cheap, exact measure of drift.
    `max_tokens` scores an evenly spaced subset (training logs), None scores all (evaluation).
    call_head: as `get_batch_logps`'s.
    """
    if max_tokens is not None and policy_hidden.size(0) > max_tokens:
        keep = torch.linspace(0, policy_hidden.size(0) - 1, max_tokens, device=policy_hidden.device).long()
        policy_hidden, reference_hidden = policy_hidden[keep], reference_hidden[keep]
    head_pol, head_ref = policy.get_output_embeddings(), reference.get_output_embeddings()
    total = torch.zeros((), dtype=torch.float32, device=policy_hidden.device)
    for i in range(0, policy_hidden.size(0), chunk_size):
        lp = F.log_softmax(_logits(head_pol, policy_hidden[i:i + chunk_size], _softcap(policy), call_head), dim=-1)
        lq = F.log_softmax(_logits(head_ref, reference_hidden[i:i + chunk_size], _softcap(reference), call_head),
                           dim=-1)
        total += (lp.exp() * (lp - lq)).sum()
    if _split is None:
        return total, policy_hidden.size(0)
    # sequence parallelism: the hidden states are this process's slice's; the KL is the whole sequences'
    total, scored = _split.total(torch.stack([total, total.new_tensor(policy_hidden.size(0))]))
    return total, int(scored)


def kl_metrics(kl_sum: float, scored_tokens: int, lengths: torch.Tensor) -> dict[str, tuple[float, int]]:
    """The KL of a batch's completions (`completion_kl`'s sum over `scored_tokens` of their tokens;
    `lengths`: (S,) the completion lengths) as the (sum, count) pairs the loop and the evaluator pool:

        kl_per_token     nats per completion token: sum / scored tokens
        kl_per_sequence  nats per completion: the sum of the per-token KL over a completion's tokens,
                         averaged over the S completions: sum / S when every token is scored

    e.g. per-token KLs summing to 0.52 over completions of 3 and 1 tokens: 0.13 per token, 0.26 per
    sequence (0.13 x the mean length 2). With a subset of the tokens scored (`max_tokens`), the
    per-sequence sum is the subset's per-token mean times the completions' tokens, an estimate."""
    tokens = int(lengths.sum())
    per_sequence = kl_sum * tokens / scored_tokens if scored_tokens else 0.0
    return {"kl_per_token": (kl_sum, scored_tokens), "kl_per_sequence": (per_sequence, lengths.numel())}


@functools.cache
def _liger_dpo():
    """Liger's fused linear DPO loss with the reference's summed log-probs given as tensors, (b,) chosen
    and (b,) rejected, for one call of b pairs: Liger's own class takes the reference's hidden states
    and LM head instead, which a precomputed reference does not have. Its loss function reads
    `ref_chosen_logps` / `ref_rejected_logps` when no reference model is given; they reach it for the
    whole call, so a call is one Liger chunk (chunk_size = b) and `fused_dpo_logps` loops over chunks."""
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction
    from liger_kernel.chunked_loss.fused_linear_preference import LigerFusedLinearPreferenceBase

    class GivenReferenceDPO(LigerFusedLinearDPOFunction):
        @classmethod
        def forward(cls, ctx, hidden, weight, targets, bias, reference_chosen_logps, reference_rejected_logps,
                    loss: FusedDPO, compiled: bool):
            return LigerFusedLinearPreferenceBase.forward(
                cls=cls, ctx=ctx, _input=hidden, weight=weight, target=targets, bias=bias,
                chunk_size=targets.size(0) // 2, ignore_index=IGNORE, beta=loss.beta, compute_nll_loss=False,
                compiled=compiled, use_ref_model=False, average_log_prob=False, loss_type=loss.loss_type,
                label_smoothing=loss.label_smoothing, discopop_tau=loss.discopop_tau,
                ref_chosen_logps=reference_chosen_logps, ref_rejected_logps=reference_rejected_logps)

        @staticmethod
        def backward(ctx, *grad_output):
            # Liger's: the gradients computed in forward, times the loss's incoming gradient
            grads = LigerFusedLinearPreferenceBase.backward(ctx, grad_output)[:4]  # hidden, weight, targets, bias
            return *grads, None, None, None, None

    return GivenReferenceDPO


IGNORE = -100  # Liger's ignore_index: target positions that are not completion tokens


def fused_dpo_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                    reference_logps: torch.Tensor, loss: FusedDPO, chunk_size: int = 1024,
                    return_hidden: bool = False, router_aux: bool = False) -> BatchLogps:
    """enable_liger_kernel: the policy's summed log-probs (2B,), detached, and its DPO loss through Liger's
    fused linear DPO loss, from the backbone's last hidden states and the LM head's weight, given the
    reference's log-probs (2B,) (a live pass or precomputed). Padded rows only (the config refuses the
    other layouts). Liger projects whole rows, prompt and padding included, computes the gradient of the
    hidden states and the LM head in this forward pass, and keeps only that: the (rows, T, vocab)
    logits of b pairs exist at once, b = chunk_size // (2 T) (at least 1), so logps_chunk_size bounds the
    logits memory as in `get_batch_logps`. Returns a `BatchLogps` with `fused_loss`, the loss's mean
    over the B pairs; its backward passes Liger's gradients on, scaled as every loss is. router_aux: also the
    load-balancing loss of a mixture-of-experts model, as `get_batch_logps`'s."""
    hidden, router_logits = _backbone(model, router_aux, input_ids=input_ids, attention_mask=attention_mask)
    hidden = hidden[:, :-1]  # (2B, T-1, H): t predicts t+1
    score = completion_mask[:, 1:].bool()  # (2B, T-1)
    targets = input_ids[:, 1:].masked_fill(~score, IGNORE)  # (2B, T-1)
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, lm_head.bias
    cpu = hidden.device.type == "cpu"
    if cpu:  # as `_logits`: fp32 on a CPU, whose bf16 matmul backward is slow (a no-op for fp32 weights)
        hidden, weight, bias = hidden.float(), weight.float(), None if bias is None else bias.float()
    B = input_ids.size(0) // 2
    pairs = max(1, chunk_size // (2 * targets.size(1)))
    compiled = not cpu  # Liger's default; compiling its chunk costs about 10 s per shape on a CPU
    function = _liger_dpo()
    total, chosen, rejected = hidden.new_zeros((), dtype=torch.float32), [], []
    with torch.autocast("cpu", enabled=False) if cpu else contextlib.nullcontext():
        for i in range(0, B, pairs):
            j = min(i + pairs, B)
            rows = torch.cat((torch.arange(i, j, device=hidden.device),
                              torch.arange(B + i, B + j, device=hidden.device)))  # b chosen, then their b rejected
            chunk_loss, aux = function.apply(hidden[rows], weight, targets[rows], bias, reference_logps[i:j],
                                             reference_logps[B + i:B + j], loss, compiled)
            total = total + chunk_loss * ((j - i) / B)  # Liger's loss is the chunk's mean over its b pairs
            chosen.append(aux[0])
            rejected.append(aux[1])
    logps = torch.cat(chosen + rejected).detach()  # (2B,) [chosen; rejected]
    kept = hidden[score].detach() if return_hidden else None  # (N, H), in `get_batch_logps`'s order
    aux_loss = router_aux_loss(model, router_logits, attention_mask) if router_aux else None
    return BatchLogps(logps, score.sum(dim=1), kept, None, total, aux_loss=aux_loss)


class LogpsModule(torch.nn.Module):
    """A model seen through `get_batch_logps` as one module whose forward is the whole log-prob pass, LM
    head included, so that an engine's wrapper around it (engines/) sees all of it: DDP synchronises
    every gradient, FSDP2 gathers the embeddings and the LM head for the pass, DeepSpeed runs it. The
    policy is trained through one; a sharded reference is run through another.

    call_head: the LM head is applied by calling it, never by reading its weight (which the CPU's float32
    head otherwise does): for an engine that holds the weight partitioned and gathers it only inside the
    module's call. The engine that prepares this module says so (engines/).

    router_aux_loss_coef (a mixture-of-experts policy: `models.router_aux_coef`, 0 otherwise): every pass also
    returns the model's load-balancing loss and this weight of it (`BatchLogps.aux_loss`, `aux_loss_coef`), which
    the step adds to the loss (`step.add_router_aux`). A reference is run without it."""

    def __init__(self, model, chunk_size: int, call_head: bool = False, router_aux_loss_coef: float = 0.0):
        super().__init__()
        self.model, self.chunk_size, self.call_head = model, chunk_size, call_head
        self.router_aux_loss_coef = router_aux_loss_coef

    def forward(self, input_ids, attention_mask, completion_mask, return_hidden=False, ld_alpha=None, wpo=False,
                position_ids=None, sequence_lengths=None, score_index=None, score_rows=None, fused=None,
                reference_logps=None, token_stats=False, media=None):
        router_aux = self.router_aux_loss_coef > 0
        if fused is not None:  # enable_liger_kernel, while training
            out = fused_dpo_logps(self.model, input_ids, attention_mask, completion_mask, reference_logps, fused,
                                  self.chunk_size, return_hidden, router_aux)
        else:
            out = get_batch_logps(self.model, input_ids, attention_mask, completion_mask, self.chunk_size,
                                  return_hidden=return_hidden, ld_alpha=ld_alpha, wpo=wpo, position_ids=position_ids,
                                  sequence_lengths=sequence_lengths, score_index=score_index, score_rows=score_rows,
                                  call_head=self.call_head, token_stats=token_stats, router_aux=router_aux,
                                  media=media)
        return out._replace(aux_loss_coef=self.router_aux_loss_coef) if router_aux else out
