"""The DPO training loop: one explicit loop on `accelerate`, top to bottom.

    preftune train config.yaml          # or: from preftune.train import train; train(cfg)

`train()` prepares data, models and optimizer, then runs `for step in range(...)`, with
evaluation, logging, early stopping and checkpoints as `if step % N == 0` blocks calling the
functions below it. Multi-process runs are the same loop: accelerate wraps the policy.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import time

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from preftune import checkpoints
from preftune.batching import collate, collate_unpaired, epoch_batches
from preftune.config import TrainConfig
from preftune.data import load_pairs
from preftune.errors import ConfigError, DataError
from preftune.logps import completion_kl, get_batch_logps
from preftune.losses import LOSSES, REFERENCE_FREE, UNPAIRED_LOSSES, bco_shifted_loss, chosen_nll
from preftune.models import check_vocabulary, load_policy_and_reference, load_tokenizer
from preftune.reference import precompute_reference_logps, reference_logps_of
from preftune.report import MetricsLog
from preftune.cache import tokenize_cached
from preftune.tokenization import TokenizeReport, tokenize_examples

log = logging.getLogger("preftune")

KL_TRAIN_TOKENS = 512  # training rows estimate the KL on this many completion tokens of the last micro-batch
# Test-only: seconds to sleep after each optimizer step, so tests/test_resume.py can kill a run mid-epoch.
_TEST_STEP_SLEEP = float(os.environ.get("PREFTUNE_TEST_STEP_SLEEP", 0))


class PolicyLogps(torch.nn.Module):
    """The policy seen through `get_batch_logps`, so that a distributed wrapper (DDP) around this
    module sees the whole forward, LM head included, and synchronises every gradient."""

    def __init__(self, model, chunk_size: int):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, input_ids, attention_mask, completion_mask, return_hidden=False, ld_alpha=None, wpo=False):
        return get_batch_logps(self.model, input_ids, attention_mask, completion_mask, self.chunk_size,
                               return_hidden=return_hidden, ld_alpha=ld_alpha, wpo=wpo)


def preference_step(policy, reference, batch, loss_fn, beta, chunk_size, kl=False, kl_max_tokens=None,
                    ld_alpha=None, use_weighting=False, reference_logps=None):
    """Per-pair losses and the statistics logged for them, for one collated batch of B pairs.

    `loss_fn` is a function of `preftune.losses` with its hyperparameters beyond beta already
    bound (`configured_loss(cfg)`; a bare `LOSSES[name]` uses the functions' defaults, and
    exo_pair has no default label_smoothing).

    `reference` is None for a reference-free loss (simpo, orpo): no reference forward, the loss
    gets None for the reference log-probs, and there is no KL to compute.

    `reference_logps` (2B,), log pi_ref of the batch's [chosen; rejected] rows precomputed by
    `preftune.reference` (precompute_ref_log_probs), replaces the reference forward; `reference`
    is then None, so there is no KL either.

    With kl=True (and a reference) also returns (sum of per-token KL to the reference, token
    count), computed from the hidden states both forward passes already produced; otherwise None.

    ld_alpha (LD-DPO) down-weights, in policy and reference log-probs alike, each pair's tokens beyond
    its shorter completion; use_weighting (WPO) multiplies each pair's loss by the policy's detached
    weights w(y_w|x) * w(y_l|x) (`get_batch_logps`), the whole objective of `loss_fn` included, as TRL
    weighs every loss of its list.
    """
    kl = kl and reference is not None
    policy_out = policy(**batch, return_hidden=kl, ld_alpha=ld_alpha, wpo=use_weighting)
    policy_logps, lengths = policy_out[:2]  # (2B,), (2B,)
    B = policy_logps.size(0) // 2
    policy_chosen_logps, policy_rejected_logps = policy_logps[:B], policy_logps[B:]
    reference_chosen_logps = reference_rejected_logps = None
    if reference_logps is not None:
        reference_logps = reference_logps.to(policy_logps.device)
        reference_chosen_logps, reference_rejected_logps = reference_logps[:B], reference_logps[B:]
    elif reference is not None:
        with torch.no_grad():
            reference_out = get_batch_logps(reference, chunk_size=chunk_size, return_hidden=kl, ld_alpha=ld_alpha,
                                            **batch)
        reference_chosen_logps, reference_rejected_logps = reference_out[0][:B], reference_out[0][B:]
    losses, chosen_rewards, rejected_rewards = loss_fn(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta, lengths[:B], lengths[B:])
    if use_weighting:
        losses = losses * policy_out[-1][:B] * policy_out[-1][B:]  # WPO, Eq. 2: the pair's weight
    # A tie (policy == reference on this pair, as at step 0) counts as half right: the implicit
    # reward model is then guessing, and chance for a pair is 50% (TRL counts it as wrong).
    accuracies = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
    stats = {
        "loss": losses.detach(),
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": accuracies,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_chosen_logps.detach(),  # summed over completion tokens
        "logps/rejected": policy_rejected_logps.detach(),
        "nll_loss": chosen_nll(policy_chosen_logps.detach(), lengths[:B]),  # per chosen token, TRL's CPO/ORPO name
    }
    kl_stats = None
    if kl:
        kl_stats = completion_kl(_unwrap(policy).model, reference, policy_out[2], reference_out[2], chunk_size,
                                 kl_max_tokens)
    return losses, stats, kl_stats


def kto_step(policy, reference, batch, loss_fn, beta, chunk_size, kl=False, kl_max_tokens=None):
    """Per-example KTO losses and statistics for one batch of `collate_unpaired` (B examples and B
    mismatched KL rows), as `preference_step` for pairs: `loss_fn` is `losses.kto_loss` with its
    weights bound. The KL rows only give KTO's detached baseline z_ref, so the policy scores them
    without gradients. Statistics per example: rewards/chosen and logps/chosen over the desirable
    examples, */rejected over the undesirable ones (absent when the batch has none), z_ref (TRL's
    `kl`); no rewards/accuracies or margins, which need pairs.
    """
    keys = ("input_ids", "attention_mask", "completion_mask")
    examples, mismatched = {k: batch[k] for k in keys}, {k: batch[f"kl_{k}"] for k in keys}
    labels = batch["labels"]  # (B,) bool, True = desirable
    kl = kl and reference is not None
    policy_out = policy(**examples, return_hidden=kl)
    policy_logps, lengths = policy_out[:2]  # (B,), (B,)
    with torch.no_grad():
        policy_kl_logps = policy(**mismatched)[0]
        reference_out = get_batch_logps(reference, chunk_size=chunk_size, return_hidden=kl, **examples)
        reference_kl_logps = get_batch_logps(reference, chunk_size=chunk_size, **mismatched)[0]
    losses, rewards, z_ref = loss_fn(policy_logps, reference_out[0], policy_kl_logps, reference_kl_logps, labels, beta)
    stats = {"loss": losses.detach(), "z_ref": z_ref.expand(len(labels))}
    for side, mask in (("chosen", labels), ("rejected", ~labels)):
        if mask.any():
            stats[f"rewards/{side}"] = rewards[mask]
            stats[f"logps/{side}"] = policy_logps.detach()[mask]  # summed over completion tokens
    if labels.any():
        stats["nll_loss"] = chosen_nll(policy_logps.detach()[labels], lengths[labels])
    kl_stats = None
    if kl:
        kl_stats = completion_kl(_unwrap(policy).model, reference, policy_out[2], reference_out[2], chunk_size,
                                 kl_max_tokens)
    return losses, stats, kl_stats


def step_functions(cfg: TrainConfig):
    """(collate, step) for cfg's data: unpaired examples and `kto_step` for kto, else pairs and
    `preference_step` (with ld_alpha and use_weighting bound)."""
    if cfg.is_kto:
        return collate_unpaired, kto_step
    return collate, functools.partial(preference_step, ld_alpha=cfg.ld_alpha, use_weighting=cfg.use_weighting)


def precomputed(cfg: TrainConfig, items) -> dict:
    """The step function's `reference_logps` for a batch when precompute_ref_log_probs is on, else
    nothing (kto takes none: config validation refuses precompute_ref_log_probs with it)."""
    return {"reference_logps": reference_logps_of(items)} if cfg.precompute_ref_log_probs else {}


def configured_loss(cfg: TrainConfig):
    """The objective `cfg` names, with the signature of a single loss: the loss function(s) of
    `pref_loss`, each with its hyperparameters beyond beta (label_smoothing, discopop_tau, simpo_gamma)
    bound from the config; several are summed with `loss_weights` (default 1.0 each), per pair, so
    the mean over pairs is sum_k w_k * mean(loss_k) as in TRL; plus pref_ftx * chosen_nll
    (LLaMA-Factory's SFT term) when pref_ftx > 0.

    pref_bco_weight = w > 0 mixes in BCO with its reward shift as LLaMA-Factory does:
    (loss + w * bco) / (1 + w), before pref_ftx. The shift delta is the running mean, over the calls
    of this objective, of each micro-batch's mean reward beta * (r_w, r_l), this call's included; a
    training run keeps one, each evaluation pass starts its own (LLaMA-Factory shares one between
    training and evaluation), and with several processes each keeps its own (LLaMA-Factory gathers).

    Rewards come from the first loss in the list that uses the reference (DPO's implicit rewards),
    else from the first loss. With aot/aot_unpaired in a sum, per-pair values mix sorted and pair
    order; only their mean (the training loss) is meaningful then.
    """
    names = cfg.pref_losses
    if cfg.is_kto:  # unpaired: kto_step's signature, alone (the config refuses combinations)
        return functools.partial(UNPAIRED_LOSSES["kto"], **cfg.loss_kwargs("kto"))
    weights = cfg.loss_weights or [1.0] * len(names)
    loss_fns = [functools.partial(LOSSES[name], **cfg.loss_kwargs(name)) for name in names]
    if len(loss_fns) == 1 and weights[0] == 1.0 and cfg.pref_ftx == 0 and cfg.pref_bco_weight == 0:
        return loss_fns[0]
    rewards_from = next((k for k, name in enumerate(names) if name not in REFERENCE_FREE), 0)
    bco_shift = {"mean": 0.0, "count": 0}  # the running mean delta of pref_bco_weight

    def objective(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                  beta, chosen_lengths, rejected_lengths):
        total = 0.0
        for k, (loss_fn, weight) in enumerate(zip(loss_fns, weights)):
            losses, chosen_rewards, rejected_rewards = loss_fn(
                policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                beta, chosen_lengths, rejected_lengths)
            total = total + weight * losses
            if k == rewards_from:
                rewards = chosen_rewards, rejected_rewards
        if cfg.pref_bco_weight:
            batch_reward = beta * torch.cat((policy_chosen_logps - reference_chosen_logps,
                                             policy_rejected_logps - reference_rejected_logps)).mean().item()
            bco_shift["count"] += 1
            bco_shift["mean"] += (batch_reward - bco_shift["mean"]) / bco_shift["count"]
            bco = bco_shifted_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
                                   reference_rejected_logps, beta, bco_shift["mean"])
            total = (total + cfg.pref_bco_weight * bco) / (1 + cfg.pref_bco_weight)
        if cfg.pref_ftx:
            total = total + cfg.pref_ftx * chosen_nll(policy_chosen_logps, chosen_lengths)
        return total, *rewards

    objective.state = bco_shift  # saved in checkpoints, so a resumed run continues the running shift
    return objective


def _unwrap(module):
    return getattr(module, "module", module)  # DistributedDataParallel keeps the wrapped module here


@torch.no_grad()
def evaluate(policy, reference, pairs, cfg, pad_id, accelerator) -> dict[str, float]:
    """Mean of every statistic over the validation pairs, plus the per-token KL to the reference
    (absent, not 0, without a reference)."""
    wrapper = accelerator.unwrap_model(policy)  # no gradients here, so no distributed wrapper needed
    wrapper.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # values per statistic: the pairs, or for kto the examples of its side
    kl_sum, kl_tokens = 0.0, 0
    loss_fn = configured_loss(cfg)
    collate_fn, step_fn = step_functions(cfg)
    for idx in epoch_batches(len(pairs), cfg.eval_batch_size, cfg.seed, 0, shuffle=False):
        batch_items = [pairs[i] for i in idx]
        batch = {k: v.to(accelerator.device) for k, v in collate_fn(batch_items, pad_id).items()}
        with accelerator.autocast():
            _, stats, kl = step_fn(wrapper, reference, batch, loss_fn, cfg.pref_beta, cfg.logps_chunk_size, kl=True,
                                   **precomputed(cfg, batch_items))
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value.float().sum().item()
            counts[key] = counts.get(key, 0) + value.numel()
        if kl is not None:
            kl_sum, kl_tokens = kl_sum + kl[0].item(), kl_tokens + kl[1]
    wrapper.train()
    out = {f"eval_{k}": v / counts[k] for k, v in sums.items()}
    if reference is not None:
        out["eval_kl"] = kl_sum / max(kl_tokens, 1)
    return out


def _param_groups(model, weight_decay):
    # no decay on biases and norm weights (1-D tensors), as in most LM recipes
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: TrainConfig) -> dict:
    start_time = time.time()
    set_seed(cfg.seed)
    resume_from = checkpoints.resume_dir(cfg)  # before any loading: a bad path fails at once
    checkpoints.check_output_dir(cfg, resuming=resume_from is not None)
    # --- data ----------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    train_pairs, val_pairs, data_report = load_pairs(cfg)
    tok_report = TokenizeReport()
    if cfg.is_kto:  # unpaired examples, pairs split in two; not cached (the cache stores pairs)
        train_tok, val_tok = (tokenize_examples(tokenizer, part, cfg.cutoff_len, cfg.template, tok_report,
                                                cfg.truncation_mode, cfg.max_prompt_length)
                              for part in (train_pairs, val_pairs))
    else:
        train_tok = tokenize_cached(tokenizer, train_pairs, cfg, tok_report)
        val_tok = tokenize_cached(tokenizer, val_pairs, cfg, tok_report)
    unit = "examples" if cfg.is_kto else "pairs"
    log.info("data: %d train %s, %d validation %s, %d truncated to cutoff_len=%d, %d dropped (no completion "
             "token fits), %d skipped", len(train_tok), unit, len(val_tok), unit, tok_report.truncated,
             cfg.cutoff_len, tok_report.dropped, data_report.skipped_empty + data_report.skipped_identical)
    if not train_tok:
        raise DataError(f"every training {unit[:-1]} was dropped: none fits cutoff_len={cfg.cutoff_len}; raise it")

    # --- models and optimizer ------------------------------------------------------------
    # accelerate keeps its state per process; a second train() in one process (a sweep, the
    # tests) may ask for another precision, so the mixed-precision part is reset, not the
    # distributed one
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    except ValueError as e:  # e.g. fp16 where the hardware has no fp16 support
        raise ConfigError(f"mixed precision '{cfg.mixed_precision}': {str(e).splitlines()[0]}") from None
    if cfg.precompute_ref_log_probs:  # the reference runs (or its cache is read) and is freed before the policy loads
        precompute_reference_logps(cfg, {"train": train_tok, "validation": val_tok}, tokenizer.pad_token_id,
                                   accelerator, tokenizer)
    model, reference = load_policy_and_reference(
        cfg, with_reference=cfg.uses_reference and not cfg.precompute_ref_log_probs)
    check_vocabulary(model, tokenizer, "model_name_or_path",
                     "the tokenizer has tokens the model has no embedding for; resize the model's embeddings")
    if isinstance(reference, torch.nn.Module):  # a separately loaded one (an adapter-off policy is checked above)
        check_vocabulary(reference, tokenizer, "ref_model" if cfg.ref_model else "the reference copy")
    model.train()
    policy = PolicyLogps(model, cfg.logps_chunk_size)
    optimizer = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
    micro_per_epoch = math.ceil(len(train_tok) / cfg.per_device_train_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if isinstance(reference, torch.nn.Module):  # not a LoRA policy's AdapterReference: that is the policy itself
        reference = accelerator.prepare_model(reference, evaluation_mode=True)
    loss_fn = configured_loss(cfg)
    collate_fn, step_fn = step_functions(cfg)
    pad_id = tokenizer.pad_token_id
    eval_every = steps_per_epoch if cfg.eval_strategy == "epoch" else cfg.eval_steps or steps_per_epoch
    do_eval = bool(val_tok) and cfg.eval_strategy != "no"

    def micro_batches(epoch=0, start=0):  # endless stream of (epoch position, batch); epochs reshuffle by seed
        while True:
            for i, idx in enumerate(epoch_batches(len(train_tok), cfg.per_device_train_batch_size, cfg.seed, epoch)):
                if i >= start:
                    yield epoch + (i + 1) / micro_per_epoch, [train_tok[j] for j in idx]
            epoch, start = epoch + 1, 0

    metrics = MetricsLog(cfg)
    metrics.data = {**vars(data_report), "truncated": tok_report.truncated, "dropped": tok_report.dropped,
                    "boundary_merges": tok_report.boundary_merges}
    if do_eval and resume_from is None:  # the baseline: where the reference itself stands
        metrics.log({"step": 0, "epoch": 0.0, **evaluate(policy, reference, val_tok, cfg, pad_id, accelerator)})
    best_loss, best_step, evals_without_gain, stopped_early = math.inf, None, 0, False
    running: dict[str, list[torch.Tensor]] = {}
    tokens, train_seconds = 0, 0.0  # throughput counts training time only, not logging or evaluation
    step = 0
    if resume_from is not None:  # the same state as the uninterrupted run had after `step`
        state = checkpoints.load_checkpoint(resume_from, accelerator, policy, optimizer, scheduler, cfg)
        step, running, tokens, train_seconds = state["step"], state["running"], state["tokens"], state["train_seconds"]
        best_loss = math.inf if state["best_loss"] is None else state["best_loss"]
        best_step, evals_without_gain = state["best_step"], state["evals_without_gain"]
        checkpoints.check_best_model(cfg, best_step, step)
        metrics.history = state["log_history"]
        metrics.resumed_from = {"checkpoint": str(resume_from), "step": step}
        if hasattr(loss_fn, "state"):
            loss_fn.state.update(state["loss_state"])
        log.info("resumed from %s at step %d", resume_from, step)
    # the data position: order depends only on (seed, epoch), so micro-batches consumed say where we are
    stream = micro_batches(*divmod(step * cfg.gradient_accumulation_steps, micro_per_epoch))
    bar = tqdm(total=total_steps, initial=step, desc="dpo",
               disable=not cfg.progress_bar or not accelerator.is_main_process)

    # --- the loop ------------------------------------------------------------------------
    for step in range(step + 1, total_steps + 1):
        step_start = time.time()
        micro = [next(stream) for _ in range(cfg.gradient_accumulation_steps)]
        epoch = micro[-1][0]
        step_pairs = sum(len(pairs) for _, pairs in micro)
        log_now = step % cfg.logging_steps == 0 or step == total_steps
        for k, (_, pairs) in enumerate(micro):
            batch = collate_fn(pairs, pad_id)
            tokens += int(batch["attention_mask"].sum())  # counted on the CPU copy: no device sync
            batch = {key: v.to(accelerator.device) for key, v in batch.items()}
            last = k == len(micro) - 1
            # gradients are synchronised across processes only on the step's last micro-batch
            sync = contextlib.nullcontext() if last else accelerator.no_sync(policy)
            with sync, accelerator.autocast():
                losses, stats, kl = step_fn(policy, reference, batch, loss_fn, cfg.pref_beta,
                                            cfg.logps_chunk_size, kl=log_now and last,
                                            kl_max_tokens=KL_TRAIN_TOKENS, **precomputed(cfg, pairs))
                accelerator.backward(losses.sum() / step_pairs)  # mean over the step's pairs
            for key, value in stats.items():
                running.setdefault(key, []).append(value)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or math.inf)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.time() - step_start
        bar.update(1)

        if log_now:
            row = {"step": step, "epoch": round(epoch, 4)}
            row.update({k: torch.cat(v).float().mean().item() for k, v in running.items()})
            row["tokens_per_second"] = tokens / max(train_seconds, 1e-9)
            if kl is not None:  # no reference, no KL: the column is absent, not 0
                row["kl"] = kl[0].item() / max(kl[1], 1)
            row["grad_norm"] = float(grad_norm)
            row["learning_rate"] = scheduler.get_last_lr()[0]
            metrics.log(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', math.nan):.2f}")
            running, tokens, train_seconds = {}, 0, 0.0

        if do_eval and (step % eval_every == 0 or step == total_steps):
            row = {"step": step, "epoch": round(epoch, 4),
                   **evaluate(policy, reference, val_tok, cfg, pad_id, accelerator)}
            metrics.log(row)
            if row["eval_loss"] < best_loss:
                best_loss, evals_without_gain = row["eval_loss"], 0
                if cfg.early_stopping_patience:
                    best_step = step
                    checkpoints.save_model(accelerator.unwrap_model(policy).model, tokenizer,
                                           checkpoints.best_dir(cfg), step)
            else:
                evals_without_gain += 1
                if cfg.early_stopping_patience and evals_without_gain >= cfg.early_stopping_patience:
                    log.info("early stopping at step %d: eval loss has not improved for %d evaluations",
                             step, evals_without_gain)
                    stopped_early = True
                    break

        if cfg.save_steps and step % cfg.save_steps == 0:
            epoch_index, micro_index = divmod(step * cfg.gradient_accumulation_steps, micro_per_epoch)
            loop_state = {"epoch": epoch_index, "micro_batch": micro_index, "tokens": tokens,
                          "train_seconds": train_seconds, "best_loss": None if best_loss == math.inf else best_loss,
                          "best_step": best_step, "evals_without_gain": evals_without_gain,
                          "loss_state": getattr(loss_fn, "state", None), "log_history": metrics.history}
            checkpoints.save_checkpoint(accelerator, policy, optimizer, scheduler, tokenizer, cfg, step, loop_state,
                                        running)
        if _TEST_STEP_SLEEP:
            time.sleep(_TEST_STEP_SLEEP)
    bar.close()

    # --- outputs -------------------------------------------------------------------------
    final = accelerator.unwrap_model(policy).model
    if best_step is not None and best_step != step:
        checkpoints.load_best_into(final, cfg)  # the model we keep is the best one seen
    summary: dict = {}
    if accelerator.is_main_process:
        checkpoints.save_final(final, tokenizer, cfg)
        summary = metrics.finish(total_steps=total_steps, steps_done=step, stopped_early=stopped_early,
                                 best_step=best_step, elapsed=time.time() - start_time)
    accelerator.wait_for_everyone()
    return summary
