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
import time

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from preftune import checkpoints
from preftune.batching import collate, epoch_batches
from preftune.config import TrainConfig
from preftune.data import load_pairs
from preftune.errors import ConfigError
from preftune.logps import completion_kl, get_batch_logps
from preftune.losses import LOSSES, REFERENCE_FREE, bco_shifted_loss, chosen_nll
from preftune.models import load_policy_and_reference, load_tokenizer
from preftune.report import MetricsLog
from preftune.tokenization import TokenizeReport, tokenize_pairs

log = logging.getLogger("preftune")

KL_TRAIN_TOKENS = 512  # training rows estimate the KL on this many completion tokens of the last micro-batch


class PolicyLogps(torch.nn.Module):
    """The policy seen through `get_batch_logps`, so that a distributed wrapper (DDP) around this
    module sees the whole forward, LM head included, and synchronises every gradient."""

    def __init__(self, model, chunk_size: int):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, input_ids, attention_mask, completion_mask, return_hidden=False):
        return get_batch_logps(self.model, input_ids, attention_mask, completion_mask, self.chunk_size,
                               return_hidden=return_hidden)


def preference_step(policy, reference, batch, loss_fn, beta, chunk_size, kl=False, kl_max_tokens=None):
    """Per-pair losses and the statistics logged for them, for one collated batch of B pairs.

    `loss_fn` is a function of `preftune.losses` with its hyperparameters beyond beta already
    bound (`configured_loss(cfg)`; a bare `LOSSES[name]` uses the functions' defaults, and
    exo_pair has no default label_smoothing).

    `reference` is None for a reference-free loss (simpo, orpo): no reference forward, the loss
    gets None for the reference log-probs, and there is no KL to compute.

    With kl=True (and a reference) also returns (sum of per-token KL to the reference, token
    count), computed from the hidden states both forward passes already produced; otherwise None.
    """
    kl = kl and reference is not None
    policy_out = policy(**batch, return_hidden=kl)
    policy_logps, lengths = policy_out[:2]  # (2B,), (2B,)
    B = policy_logps.size(0) // 2
    policy_chosen_logps, policy_rejected_logps = policy_logps[:B], policy_logps[B:]
    reference_chosen_logps = reference_rejected_logps = None
    if reference is not None:
        with torch.no_grad():
            reference_out = get_batch_logps(reference, chunk_size=chunk_size, return_hidden=kl, **batch)
        reference_chosen_logps, reference_rejected_logps = reference_out[0][:B], reference_out[0][B:]
    losses, chosen_rewards, rejected_rewards = loss_fn(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        beta, lengths[:B], lengths[B:])
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
    kl_sum, kl_tokens = 0.0, 0
    loss_fn = configured_loss(cfg)
    for idx in epoch_batches(len(pairs), cfg.eval_batch_size, cfg.seed, 0, shuffle=False):
        batch = {k: v.to(accelerator.device) for k, v in collate([pairs[i] for i in idx], pad_id).items()}
        with accelerator.autocast():
            _, stats, kl = preference_step(wrapper, reference, batch, loss_fn, cfg.pref_beta,
                                           cfg.logps_chunk_size, kl=True)
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value.float().sum().item()
        if kl is not None:
            kl_sum, kl_tokens = kl_sum + kl[0].item(), kl_tokens + kl[1]
    wrapper.train()
    out = {f"eval_{k}": v / len(pairs) for k, v in sums.items()}
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
    # --- data ----------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    train_pairs, val_pairs, data_report = load_pairs(cfg)
    tok_report = TokenizeReport()
    train_tok = tokenize_pairs(tokenizer, train_pairs, cfg.cutoff_len, cfg.template, tok_report)
    val_tok = tokenize_pairs(tokenizer, val_pairs, cfg.cutoff_len, cfg.template, tok_report)
    log.info("data: %d train pairs, %d validation pairs, %d truncated to cutoff_len=%d, %d skipped",
             len(train_tok), len(val_tok), tok_report.truncated, cfg.cutoff_len,
             data_report.skipped_empty + data_report.skipped_identical)

    # --- models and optimizer ------------------------------------------------------------
    # accelerate keeps its state per process; a second train() in one process (a sweep, the
    # tests) may ask for another precision, so the mixed-precision part is reset, not the
    # distributed one
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    except ValueError as e:  # e.g. fp16 where the hardware has no fp16 support
        raise ConfigError(f"mixed precision '{cfg.mixed_precision}': {str(e).splitlines()[0]}") from None
    model, reference = load_policy_and_reference(cfg, with_reference=cfg.uses_reference)
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
    pad_id = tokenizer.pad_token_id
    eval_every = steps_per_epoch if cfg.eval_strategy == "epoch" else cfg.eval_steps or steps_per_epoch
    do_eval = bool(val_tok) and cfg.eval_strategy != "no"

    def micro_batches():  # endless stream of (epoch position, batch); epochs reshuffle by seed
        epoch = 0
        while True:
            for i, idx in enumerate(epoch_batches(len(train_tok), cfg.per_device_train_batch_size, cfg.seed, epoch)):
                yield epoch + (i + 1) / micro_per_epoch, [train_tok[j] for j in idx]
            epoch += 1

    metrics = MetricsLog(cfg)
    metrics.data = {**vars(data_report), "truncated": tok_report.truncated,
                    "boundary_merges": tok_report.boundary_merges}
    if do_eval:  # the baseline: where the reference itself stands
        metrics.log({"step": 0, "epoch": 0.0, **evaluate(policy, reference, val_tok, cfg, pad_id, accelerator)})
    best_loss, best_step, evals_without_gain, stopped_early = math.inf, None, 0, False
    running: dict[str, list[torch.Tensor]] = {}
    tokens, train_seconds = 0, 0.0  # throughput counts training time only, not logging or evaluation
    stream = micro_batches()
    bar = tqdm(total=total_steps, desc="dpo", disable=not cfg.progress_bar or not accelerator.is_main_process)

    # --- the loop ------------------------------------------------------------------------
    for step in range(1, total_steps + 1):
        step_start = time.time()
        micro = [next(stream) for _ in range(cfg.gradient_accumulation_steps)]
        epoch = micro[-1][0]
        step_pairs = sum(len(pairs) for _, pairs in micro)
        log_now = step % cfg.logging_steps == 0 or step == total_steps
        for k, (_, pairs) in enumerate(micro):
            batch = collate(pairs, pad_id)
            tokens += int(batch["attention_mask"].sum())  # counted on the CPU copy: no device sync
            batch = {key: v.to(accelerator.device) for key, v in batch.items()}
            last = k == len(micro) - 1
            # gradients are synchronised across processes only on the step's last micro-batch
            sync = contextlib.nullcontext() if last else accelerator.no_sync(policy)
            with sync, accelerator.autocast():
                losses, stats, kl = preference_step(policy, reference, batch, loss_fn, cfg.pref_beta,
                                                    cfg.logps_chunk_size, kl=log_now and last,
                                                    kl_max_tokens=KL_TRAIN_TOKENS)
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
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['rewards/accuracies']:.2f}")
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
            checkpoints.save_checkpoint(accelerator, policy, tokenizer, cfg, step, metrics)
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
