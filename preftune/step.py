"""One step of an objective: a collated batch in, per-example losses and the TRL-named statistics out.

    step = STEPS[cfg.objective](cfg, engine)            # dpo: preference pairs; kto: unpaired examples; sft; rm
    module = step.module(policy, cfg)                   # the policy's pass, for the engine to wrap
    items = step.tokenize(tokenizer, examples, cfg, report)
    batch = step.collate(items, pad_id, index)
    out = step(policy_logps, reference, batch, kl=True)  # StepOutput(losses, stats, kl)

The training loop and the evaluator see only this interface: how an objective tokenizes its data,
collates it, scores it under the policy and the reference and turns that into a loss is its own
business. A step's loss may keep running state (BCO's reward shift); `state_dict` /
`load_state_dict` carry it through checkpoints. A new objective is one more class and one more entry
of `STEPS`. The run's engine (engines/) is handed in for the KL: it finds the log-prob module inside its
wrapper and gathers the LM heads of sharded models (None: one process, nothing wrapped or sharded).

kl=True asks for what a logged row adds to the loss's statistics, on the batches the loop logs (the
logging step's last micro-batch; every evaluation batch): the KL to the reference, and TRL's
logits/chosen, logits/rejected and entropy (`token_stats`; the extra passes over the logits cost
about a quarter of the LM head's time on the CPU, so not every micro-batch pays them).
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch

from preftune.batching import collate, collate_chosen, collate_packed, collate_shared, collate_unpaired
from preftune.cache import tokenize_cached, tokenize_vision_cached
from preftune.evaluate import accuracy
from preftune.logps import (  # noqa: F401 (LogpsModule: imported from here)
    IDLE, MEDIA_KEYS, OWN_IMAGES, ROW_KEYS, FusedDPO, LogpsModule, completion_kl, kl_metrics, model_inputs)
from preftune.losses import UNPAIRED_LOSSES, CombinedLoss, chosen_nll, reward_model_loss
from preftune.models import router_aux_coef
from preftune.reward_model import RewardModule
from preftune.tokenization import tokenize_examples
from preftune.vision import (collate_vision, collate_vision_chosen, collate_vision_unpaired, is_processor,
                             tokenize_vision_examples)

ROWS = ("input_ids", "attention_mask", "completion_mask")  # what a forward pass reads of a padded batch


class StepOutput(NamedTuple):
    losses: torch.Tensor  # (B,) per pair (dpo) or per example (kto), unreduced
    stats: dict[str, torch.Tensor]  # TRL metric name -> its per-pair (per-example) values; the loop averages
    # KL to the reference when asked and possible: kl_per_token -> (sum, tokens), kl_per_sequence -> (sum, completions)
    kl: dict[str, tuple[float, int]] | None


def configured_loss(cfg):
    """The loss of cfg's objective with every hyperparameter beyond beta bound from the config:
    a `losses.CombinedLoss` (pref_loss, loss_weights, pref_ftx, pref_bco_weight) for pairs, `kto_loss`
    with its weights for kto."""
    if cfg.is_kto:  # unpaired: its own signature, alone (the config refuses combinations)
        return functools.partial(UNPAIRED_LOSSES["kto"], **cfg.loss_options("kto"))
    return CombinedLoss(cfg.pref_losses, cfg.loss_weights, {name: cfg.loss_options(name) for name in cfg.pref_losses},
                     pref_ftx=cfg.pref_ftx, pref_bco_weight=cfg.pref_bco_weight)


def logps_module(policy, cfg) -> LogpsModule:
    """The policy's whole log-prob pass as one module, for the engine to wrap, shard or run; a mixture-of-experts
    policy's passes also give its load-balancing loss, weighted as set or by the model's own coefficient."""
    return LogpsModule(policy, cfg.logps_chunk_size, router_aux_loss_coef=router_aux_coef(cfg, policy))


def add_router_aux(losses: torch.Tensor, stats: dict, out) -> torch.Tensor:
    """A mixture-of-experts policy (router_aux_loss_coef, resolved against the model by `models.router_aux_coef`):
    losses (B,) + coef x the load-balancing loss of the pass that scored them (`out.aux_loss`, (), with its
    weight coef = `out.aux_loss_coef`; `LogpsModule` returns them where the coefficient is not 0), the same
    for every item, so that the mean over the items, the loop's loss, is TRL 1.16's loss + coef x aux_loss; the
    loss itself is logged as `aux_loss`, TRL's name. The statistics' `loss` then includes the term, as TRL's."""
    stats["aux_loss"] = out.aux_loss.detach().expand(losses.size(0))
    return losses + out.aux_loss_coef * out.aux_loss


def _kl(policy_logps, reference, policy_out, reference_out, max_tokens, engine) -> dict[str, tuple[float, int]]:
    """KL to the reference, per token and per sequence (`kl_metrics`), from the hidden states both forward
    passes already produced; the `engine` makes the LM heads of sharded models whole for it."""
    root = engine.unwrap(policy_logps) if engine is not None else policy_logps  # the `LogpsModule` itself
    with engine.gathered(policy_logps, reference.runner) if engine is not None else contextlib.nullcontext():
        total, scored = completion_kl(root.model, reference.model, policy_out.hidden, reference_out.hidden,
                                      reference.chunk_size, max_tokens, root.call_head)
    return kl_metrics(total.item(), scored, policy_out.lengths)


def token_stats(out, chosen: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's logits/chosen, logits/rejected (the mean logit over the vocabulary) and entropy (of the
    next-token distribution) at the completion tokens, as one value per token, (N,): the loop's mean over
    a statistic's values is then TRL's mean over tokens. chosen: (R,) bool, which sequences are chosen
    (desirable). Absent where the pass gives none (Liger's fused loss never forms the logits)."""
    if out.entropy is None:
        return {}
    chosen = chosen[out.rows]  # (N,)
    return {"logits/chosen": out.mean_logits[chosen], "logits/rejected": out.mean_logits[~chosen],
            "entropy": out.entropy}


class PreferenceStep:
    """dpo: B preference pairs, collated as 2B rows [chosen; rejected], scored in one policy forward.

    `reference.logps` gives the reference's log-probs (a live forward, or precomputed ones; None for a
    reference-free loss, which the loss then ignores). With kl=True, the token statistics
    (`token_stats`), and with a reference model also the KL to the reference from the hidden states
    both passes already produced (`kl_max_tokens`: an evenly spaced subset, for training rows).

    ld_alpha (LD-DPO) down-weights, in policy and reference log-probs alike, each pair's tokens beyond
    its shorter completion; use_weighting (WPO) multiplies each pair's loss by the policy's detached
    weights w(y_w|x) * w(y_l|x) (`get_batch_logps`), the whole objective included, as TRL weighs
    every loss of its list.

    enable_liger_kernel: while training, the reference's log-probs come first and the policy's pass
    runs the LM head and the loss through Liger (`logps.fused_dpo_logps`); evaluation, without
    gradients, keeps the chunked path (the same numbers).

    processor: a vision-language model's (vision.py): pairs are tokenized through it (`tokenize` is given
    it in place of the tokenizer) and each batch carries its rows' image tensors (`vision.collate_vision`).
    """

    unit = "pairs"
    progress = {"acc": "rewards/accuracies"}  # the progress bar's figure beside the loss (train.progress_postfix)
    collate = staticmethod(collate)
    module = staticmethod(logps_module)

    def __init__(self, cfg, engine=None, processor=None):
        self.loss, self.engine = configured_loss(cfg), engine
        self.beta, self.ld_alpha, self.use_weighting = cfg.pref_beta, cfg.ld_alpha, cfg.use_weighting
        # enable_liger_kernel: one of Liger's DPO losses (the config refuses the rest), fused with the LM head
        self.fused = FusedDPO(cfg.pref_losses[0], cfg.pref_beta, cfg.label_smoothing, cfg.discopop_tau) \
            if cfg.enable_liger_kernel else None
        if processor is not None:  # padded or packed rows + image tensors (vision.check_config refuses prefix sharing)
            self.collate = functools.partial(collate_vision, processor=processor, multiple=cfg.pad_to_multiple_of,
                                             packed=cfg.padding_free,
                                             lockstep=bool(engine is not None and engine.lockstep))
        elif cfg.padding_free:  # the same sequences back to back in one row: the same numbers, no padding
            self.collate = collate_packed
        elif cfg.prefix_sharing:  # one row per pair, the prompt run once: the same numbers, fewer tokens
            self.collate = functools.partial(collate_shared, multiple=cfg.pad_to_multiple_of)
        elif cfg.pad_to_multiple_of:  # wider rows, the same numbers
            self.collate = functools.partial(collate, multiple=cfg.pad_to_multiple_of)

    @staticmethod
    def tokenize(tokenizer, pairs, cfg, report):
        if is_processor(tokenizer):  # a vision-language model's processor: its pairs and images cached too
            return tokenize_vision_cached(tokenizer, pairs, cfg, report)
        return tokenize_cached(tokenizer, pairs, cfg, report)

    @staticmethod
    def length(pair) -> int:
        """Tokens of a pair in a batch (group_by_length sorts by it)."""
        return len(pair.chosen_ids) + len(pair.rejected_ids)

    def __call__(self, policy, reference, batch, kl=False, kl_max_tokens=None) -> StepOutput:
        logged, kl = kl, kl and reference.model is not None
        # Liger computes gradients in its forward pass: only worth it (and only used) where there are any
        fused = self.fused if torch.is_grad_enabled() else None
        if fused is not None:  # Liger's loss takes the reference's log-probs: they come first
            reference_out = reference.logps(batch, return_hidden=kl)
            policy_out = policy(**model_inputs(batch), return_hidden=kl, fused=fused,
                                reference_logps=reference_out.logps)
        else:
            policy_out = policy(**model_inputs(batch), return_hidden=kl, ld_alpha=self.ld_alpha,
                                wpo=self.use_weighting, token_stats=logged)
            reference_out = reference.logps(batch, ld_alpha=self.ld_alpha, return_hidden=kl)
        B = policy_out.logps.size(0) // 2
        policy_chosen_logps, policy_rejected_logps = policy_out.logps[:B], policy_out.logps[B:]  # (B,) each
        chosen_lengths, rejected_lengths = policy_out.lengths[:B], policy_out.lengths[B:]
        reference_chosen_logps = reference_rejected_logps = None
        if reference_out is not None:
            reference_chosen_logps, reference_rejected_logps = reference_out.logps[:B], reference_out.logps[B:]
        losses, chosen_rewards, rejected_rewards = self.loss(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
            self.beta, chosen_lengths, rejected_lengths)
        if self.use_weighting:
            losses = losses * policy_out.wpo_weights[:B] * policy_out.wpo_weights[B:]  # WPO, Eq. 2: the pair's weight
        if fused is not None:
            # the values are the loss's on Liger's (detached) log-probs; the gradient is Liger's: its loss is the
            # mean over the B pairs, so summed over them this term carries B x its gradient, the sum's gradient
            losses = losses + (policy_out.fused_loss - policy_out.fused_loss.detach())
        stats = {}
        if policy_out.aux_loss is not None:  # the policy's pass (chosen and rejected together), as TRL's
            losses = add_router_aux(losses, stats, policy_out)
        stats |= {
            "loss": losses.detach(),
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": accuracy(chosen_rewards, rejected_rewards),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": policy_chosen_logps.detach(),  # summed over completion tokens
            "logps/rejected": policy_rejected_logps.detach(),
            "nll_loss": chosen_nll(policy_chosen_logps.detach(), chosen_lengths),  # per chosen token, TRL's CPO/ORPO name
            # completion tokens: the health report's length growth when nothing is sampled (health.py)
            "length/chosen": chosen_lengths.float(), "length/rejected": rejected_lengths.float(),
            **token_stats(policy_out, torch.arange(2 * B, device=policy_out.logps.device) < B),  # [chosen; rejected]
        }
        kl_stats = _kl(policy, reference, policy_out, reference_out, kl_max_tokens,
                       self.engine) if kl else None
        return StepOutput(losses, stats, kl_stats)

    def state_dict(self) -> dict:
        return self.loss.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loss.load_state_dict(state)


class UnpairedStep:
    """kto: B unpaired examples of `collate_unpaired` and their B mismatched KL rows (each prompt
    with another example's completion). The KL rows only give KTO's detached baseline z_ref, so the
    policy scores them without gradients. Statistics per example: rewards/chosen and logps/chosen
    over the desirable examples, */rejected over the undesirable ones (absent when the batch has
    none), z_ref (TRL's `kl`); no rewards/accuracies or margins, which need pairs.
    """

    unit = "examples"
    progress = {"chosen": "rewards/chosen", "rejected": "rewards/rejected"}  # no pairs, so no accuracy
    collate = staticmethod(collate_unpaired)
    module = staticmethod(logps_module)

    def __init__(self, cfg, engine=None, processor=None):
        self.loss, self.beta, self.engine = configured_loss(cfg), cfg.pref_beta, engine
        if processor is not None:  # + each row's image tensors (vision.py)
            self.collate = functools.partial(collate_vision_unpaired, processor=processor,
                                             multiple=cfg.pad_to_multiple_of,
                                             lockstep=bool(engine is not None and engine.lockstep))
        elif cfg.pad_to_multiple_of:
            self.collate = functools.partial(collate_unpaired, multiple=cfg.pad_to_multiple_of)

    @staticmethod
    def tokenize(tokenizer, examples, cfg, report):  # pairs are split in two; not cached (the cache stores pairs)
        if is_processor(tokenizer):  # a vision-language model's processor
            return tokenize_vision_examples(tokenizer, examples, cfg, report)
        return tokenize_examples(tokenizer, examples, cfg.cutoff_len, cfg.template, report, cfg.truncation_mode,
                                 cfg.max_prompt_length, cfg.chat_template_kwargs)

    @staticmethod
    def length(example) -> int:
        return len(example.ids)

    def __call__(self, policy, reference, batch, kl=False, kl_max_tokens=None) -> StepOutput:
        # each example's images for its row and its KL row (the same prompt): vision.collate_vision_unpaired
        media = {k: v for k, v in batch.items() if k in MEDIA_KEYS}
        media = {**media, OWN_IMAGES: True} if media else {}
        idle = {k: v for k, v in batch.items() if k.startswith(IDLE)}  # no image here, under a lockstep engine
        media = {**idle, OWN_IMAGES: True} if idle else media
        examples = {**{k: batch[k] for k in ROWS}, **media}
        mismatched = {**{k: batch[f"kl_{k}"] for k in ROWS}, **media,
                      **{k: batch[f"kl_{k}"] for k in ROW_KEYS if k in media}}
        labels = batch["labels"]  # (B,) bool, True = desirable
        logged, kl = kl, kl and reference.model is not None
        policy_out = policy(**model_inputs(examples), return_hidden=kl, token_stats=logged)
        policy_logps, lengths = policy_out.logps, policy_out.lengths  # (B,), (B,)
        with torch.no_grad():
            policy_kl_logps = policy(**model_inputs(mismatched)).logps
        reference_out = reference.logps(examples, return_hidden=kl)
        reference_kl_logps = reference.logps(mismatched).logps
        losses, rewards, z_ref = self.loss(policy_logps, reference_out.logps, policy_kl_logps, reference_kl_logps,
                                           labels, self.beta)
        stats = {}
        if policy_out.aux_loss is not None:  # the examples' pass (the KL rows' has no gradient), as TRL's
            losses = add_router_aux(losses, stats, policy_out)
        stats |= {"loss": losses.detach(), "z_ref": z_ref.expand(len(labels)), **token_stats(policy_out, labels)}
        for side, mask in (("chosen", labels), ("rejected", ~labels)):
            if mask.any():
                stats[f"rewards/{side}"] = rewards[mask]
                stats[f"logps/{side}"] = policy_logps.detach()[mask]  # summed over completion tokens
                stats[f"length/{side}"] = lengths[mask].float()  # completion tokens
        if labels.any():
            stats["nll_loss"] = chosen_nll(policy_logps.detach()[labels], lengths[labels])
        kl_stats = _kl(policy, reference, policy_out, reference_out, kl_max_tokens,
                       self.engine) if kl else None
        return StepOutput(losses, stats, kl_stats)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass  # kto keeps no state across steps


class SFTStep:
    """sft: B examples (prompt, completion), each the chosen side of a tokenized pair (the data package reads
    every SFT shape into that form), scored in one forward; the loss is the negative log-likelihood of
    the completion tokens, averaged over all completion tokens of the micro-batch as transformers'
    Trainer does (a long completion weighs more than a short one). Each example's share is returned
    as its loss, so that the loop's mean over examples is that token average. No reference: no KL.
    Statistics: loss; the loop's report adds perplexity = exp(loss)."""

    unit = "examples"
    progress = {"ppl": "perplexity"}  # no rewards; MetricsLog.log adds a row's perplexity
    module = staticmethod(logps_module)

    def __init__(self, cfg, engine=None, processor=None):
        self.padding_free = cfg.padding_free  # (no reference, no KL: no engine needed)
        self.multiple = cfg.pad_to_multiple_of
        self.processor = processor  # a VLM's: each row with its own images (vision.collate_vision_chosen)
        self.lockstep = bool(engine is not None and engine.lockstep)  # (a VLM's blank image: vision.py)

    @staticmethod
    def tokenize(tokenizer, pairs, cfg, report):
        if is_processor(tokenizer):  # a vision-language model's processor: cached as pairs are
            return tokenize_vision_cached(tokenizer, pairs, cfg, report)
        return tokenize_cached(tokenizer, pairs, cfg, report)

    def collate(self, pairs, pad_token_id, index=None):
        if self.processor is not None:
            return collate_vision_chosen(pairs, pad_token_id, index, processor=self.processor, multiple=self.multiple,
                                         lockstep=self.lockstep)
        return collate_chosen(pairs, pad_token_id, index, self.padding_free, self.multiple)

    @staticmethod
    def length(pair) -> int:
        return len(pair.chosen_ids)

    def __call__(self, policy, reference, batch, kl=False, kl_max_tokens=None) -> StepOutput:
        inputs = model_inputs(batch)
        if "media" in inputs:  # each row its own images, not a pair's once for two rows
            inputs["media"] = {**inputs["media"], OWN_IMAGES: True}
        out = policy(**inputs)
        B = out.logps.size(0)
        losses = -out.logps * B / out.lengths.sum().clamp(min=1)  # (B,): mean over examples = mean NLL per token
        stats = {}
        if out.aux_loss is not None:
            losses = add_router_aux(losses, stats, out)
        return StepOutput(losses, {**stats, "loss": losses.detach()}, None)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass  # no state across steps


class RewardStep:
    """rm: B preference pairs, collated as 2B rows [chosen; rejected] (`batching.collate`, with each pair's
    `margin` where the data has one), scored in one pass of the reward model (`reward_model.RewardModule`:
    r(x, y) at each row's last non-pad token); the loss is `losses.reward_model_loss`, Bradley-Terry with
    the optional margin and center_rewards_coefficient. No reference: no KL. Statistics under the DPO
    stage's names, so that the report, plots, health report and best-model choice read them alike:
    rewards/chosen and rewards/rejected (the reward model's scores), rewards/margins (TRL's RewardTrainer
    `margin`) and rewards/accuracies (TRL's `accuracy`; a tie counts 0.5 here, 0 in TRL)."""

    unit = "pairs"
    progress = {"acc": "rewards/accuracies"}
    module = staticmethod(lambda policy, cfg: RewardModule(policy))

    def __init__(self, cfg, engine=None, processor=None):  # (processor: a VLM reward model is not built yet)
        self.center_rewards_coefficient = cfg.center_rewards_coefficient  # (no reference, no KL: no engine needed)
        self.multiple = cfg.pad_to_multiple_of

    @staticmethod
    def tokenize(tokenizer, pairs, cfg, report):
        return tokenize_cached(tokenizer, pairs, cfg, report)

    def collate(self, pairs, pad_token_id, index=None):
        return collate(pairs, pad_token_id, index, self.multiple)

    @staticmethod
    def length(pair) -> int:
        return len(pair.chosen_ids) + len(pair.rejected_ids)

    def __call__(self, policy, reference, batch, kl=False, kl_max_tokens=None) -> StepOutput:
        rewards = policy(batch["input_ids"], batch["attention_mask"])  # (2B,) [chosen; rejected]
        B = rewards.size(0) // 2
        chosen_rewards, rejected_rewards = rewards[:B], rewards[B:]  # (B,) each
        losses = reward_model_loss(chosen_rewards, rejected_rewards, batch.get("margin"),
                                   self.center_rewards_coefficient)
        chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
        return StepOutput(losses, {"loss": losses.detach(), "rewards/chosen": chosen_rewards,
                                   "rewards/rejected": rejected_rewards,
                                   "rewards/accuracies": accuracy(chosen_rewards, rejected_rewards),
                                   "rewards/margins": chosen_rewards - rejected_rewards}, None)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass  # no state across steps


# cfg.objective -> the step class; the loop builds one for training and a fresh one per evaluation
STEPS = {"dpo": PreferenceStep, "kto": UnpairedStep, "sft": SFTStep, "rm": RewardStep}
