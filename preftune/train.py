"""The training loop: set-up, then one explicit `for step in range(...)`, top to bottom.

    preftune train config.yaml          # or: from preftune.train import train; train(cfg)

`train()` prepares data, models and optimizer, then runs the loop, with evaluation, logging,
early stopping and checkpoints as `if` blocks calling other modules: what a step computes is
`step.py`'s (one of `OBJECTIVES`), what the reference is `reference.py`'s, how a dataset is scored
`evaluate.py`'s, how a checkpoint is written `checkpoints.py`'s.

Several processes run the same loop (docs/distributed.md): each trains on its share of every global
micro-batch, metrics are pooled, only the main process writes files. A non-finite step stops the run
(or is skipped, skip_nonfinite_steps) and SIGINT/SIGTERM stop it after the step: `runtime.py`'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from preftune import checkpoints, hub, runtime, sharding
from preftune.batching import epoch_batches
from preftune.config import TrainConfig
from preftune.data import load_eval_sets, load_pairs
from preftune.errors import DataError
from preftune.evaluate import evaluate, training_row
from preftune.generate import sample_texts
from preftune.models import check_attention, load_tokenizer
from preftune.optim import make_optimizer, make_scheduler
from preftune.reference import describe_precision, load_models
from preftune.report import MetricsLog
from preftune.step import OBJECTIVES, PolicyLogps
from preftune.tokenization import TokenizeReport, describe_rendering, rendering_text
from preftune.tracking import tracker_names

log = logging.getLogger("preftune")

KL_TRAIN_TOKENS = 512  # training rows estimate the KL on this many completion tokens of the last micro-batch


def train(cfg: TrainConfig) -> dict:
    with runtime.StopSignals() as stop:  # SIGINT/SIGTERM: the loop stops after its step, cleanly
        return run(cfg, stop)


def run(cfg: TrainConfig, stop: runtime.StopSignals) -> dict:
    start_time = time.time()
    set_seed(cfg.seed)
    resume_from = checkpoints.resume_dir(cfg)  # before any loading: a bad path or a changed run fails at once
    checkpoints.check_output_dir(cfg, resuming=resume_from is not None)
    check_attention(cfg)  # a missing flash-attn package fails now, not after tokenizing the data
    runtime.check_hardware(cfg)  # fp16 without a GPU: refused, not silently inert
    tracker_names(cfg)  # and so is a report_to tracker that is not installed
    objective = OBJECTIVES[cfg.objective]
    step_fn = objective(cfg)

    # --- data ----------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    train_examples, val_examples, data_report = load_pairs(cfg)
    tok_report = TokenizeReport()
    train_items = objective.tokenize(tokenizer, train_examples, cfg, tok_report)
    # the validation set, then any further named eval sets (eval_dataset as a mapping): name -> items
    eval_items = {name: objective.tokenize(tokenizer, examples, cfg, tok_report)
                  for name, examples in {"validation": val_examples, **load_eval_sets(cfg, data_report)}.items()}
    val_items = eval_items["validation"]
    fingerprint = runtime.data_fingerprint(train_items, eval_items)  # a resume on other data is refused
    unit = objective.unit
    log.info("data: %d train %s, %d validation %s, %d truncated to cutoff_len=%d, %d dropped (no completion "
             "token fits), %d skipped", len(train_items), unit, len(val_items), unit, tok_report.truncated,
             cfg.cutoff_len, tok_report.dropped, data_report.skipped_identical)
    rendering = describe_rendering(tokenizer, cfg.template, train_examples)  # said once, and in summary.json
    log.info("rendering: %s", rendering_text(rendering))
    if not train_items:
        raise DataError(f"every training {unit[:-1]} was dropped: none fits cutoff_len={cfg.cutoff_len}; raise it")

    # --- models and optimizer ------------------------------------------------------------
    accelerator = runtime.make_accelerator(cfg)
    if accelerator.is_main_process:  # push_to_hub: a login or repo problem stops the run now, not at the end
        hub.create_repo(cfg)
    if not accelerator.is_main_process:
        log.setLevel(logging.WARNING)  # one log: the main process's
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.per_device_train_batch_size * world  # items of one micro-batch, over all processes
    sharded = sharding.active(cfg)  # FSDP2 or DeepSpeed ZeRO (docs/distributed.md), else DDP through accelerate
    sharding.check(cfg, sharded)
    model, reference = load_models(cfg, tokenizer, accelerator, {"train": train_items, **eval_items})
    metrics = MetricsLog(cfg, accelerator)
    guard = runtime.NonFiniteGuard(cfg, accelerator, metrics)
    metrics.describe_setup(accelerator, global_batch, unit, reference.description,
                           describe_precision(model, reference, cfg))
    model.train()
    policy = PolicyLogps(model, cfg.logps_chunk_size)
    if sharded and sharded["engine"] == "fsdp":  # before the optimizer, which must hold the sharded parameters
        sharding.shard(policy, sharded, accelerator.device, cfg.mixed_precision)
        sharding.share_policy_passes(reference, policy)
    optimizer = make_optimizer(model, cfg)
    micro_per_epoch = math.ceil(len(train_items) / global_batch)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    metrics.planned_steps = total_steps
    policy, optimizer = sharding.prepare(accelerator, policy, optimizer, sharded)
    scheduler = make_scheduler(optimizer, cfg, total_steps)  # on the groups the (ZeRO) optimizer steps with
    pad_id = tokenizer.pad_token_id
    train_reference = reference.on("train")
    eval_every = steps_per_epoch if cfg.eval_strategy == "epoch" else cfg.eval_steps or steps_per_epoch
    do_eval = bool(val_items) and cfg.eval_strategy != "no"

    def evaluation(step: int) -> dict:  # fresh steps: an evaluation pass keeps no loss state of training's
        row = {}
        for name, items in eval_items.items():  # eval_* for the validation set, eval_<name>_* for the others
            row.update(evaluate(objective(cfg), policy, reference.on(name), items, cfg.eval_batch_size, pad_id,
                                accelerator, prefix="eval_" if name == "validation" else f"eval_{name}_"))
        if cfg.generate_during_eval and accelerator.is_main_process:  # what the policy writes now
            prompts = val_examples[:cfg.generate_during_eval]
            row.update(metrics.log_completions(step, prompts, sample_texts(model, tokenizer, prompts, cfg,
                                                                           accelerator.device)))
        return row

    lengths = [objective.length(item) for item in train_items] if cfg.group_by_length else None  # in tokens

    def micro_batches(epoch=0, start=0):  # endless stream of (epoch position, global batch); epochs reshuffle by seed
        while True:
            for i, idx in enumerate(epoch_batches(len(train_items), global_batch, cfg.seed, epoch, lengths=lengths)):
                if i >= start:
                    yield epoch + (i + 1) / micro_per_epoch, idx
            epoch, start = epoch + 1, 0

    metrics.data = {**vars(data_report), "truncated": tok_report.truncated, "dropped": tok_report.dropped,
                    "boundary_merges": tok_report.boundary_merges, "rendering": rendering}
    if do_eval and resume_from is None:  # the baseline: where the reference itself stands
        metrics.log({"step": 0, "epoch": 0.0, **evaluation(0)})
    best, stopped_early = checkpoints.BestModel(cfg), False
    running: dict[str, list[torch.Tensor]] = {}
    tokens, train_seconds = 0, 0.0  # throughput counts training time only, not logging or evaluation
    step = 0
    if resume_from is not None:  # the same state as the uninterrupted run had after `step`
        state = checkpoints.load_checkpoint(resume_from, accelerator, policy, optimizer, scheduler, cfg, fingerprint)
        step, running, tokens, train_seconds = state["step"], state["running"], state["tokens"], state["train_seconds"]
        best.load_state_dict(state)
        checkpoints.check_best_model(cfg, best.step, step)
        metrics.resume(state, resume_from)
        step_fn.load_state_dict(state["loss_state"])
        log.info("resumed from %s at step %d", resume_from, step)
    # the data position: order depends only on (seed, epoch), so micro-batches consumed say where we are
    stream = micro_batches(*divmod(step * cfg.gradient_accumulation_steps, micro_per_epoch))
    bar = tqdm(total=total_steps, initial=step, desc=cfg.objective,
               disable=not cfg.progress_bar or not accelerator.is_main_process)

    def checkpoint(step: int) -> None:  # everything the loop needs to continue after `step`
        epoch_index, micro_index = divmod(step * cfg.gradient_accumulation_steps, micro_per_epoch)
        loop_state = {"epoch": epoch_index, "micro_batch": micro_index, "tokens": tokens,
                      "train_seconds": train_seconds, **best.state_dict(),
                      "loss_state": step_fn.state_dict(), "log_history": metrics.history,
                      "nonfinite_steps_skipped": guard.skipped, "data_fingerprint": fingerprint}
        checkpoints.save_checkpoint(accelerator, policy, optimizer, scheduler, tokenizer, cfg, step, loop_state,
                                    running)
    stop.armed = True

    # --- the loop ------------------------------------------------------------------------
    for step in range(step + 1, total_steps + 1):
        step_start = time.time()
        micro = [next(stream) for _ in range(cfg.gradient_accumulation_steps)]
        epoch = micro[-1][0]
        step_items = sum(len(idx) for _, idx in micro)  # over all processes
        log_now = step % cfg.logging_steps == 0 or step == total_steps
        step_stats, finite = {}, True  # this step's statistics join `running` once the step is known finite
        for k, (_, idx) in enumerate(micro):
            mine = idx[rank * len(idx) // world:(rank + 1) * len(idx) // world]  # this process's share
            # DDP averages the processes' gradients, hence x world: the step's loss is the mean over its items
            scale = world
            if not mine:  # fewer items than processes (an epoch's last batch): a share that counts for nothing
                mine, scale = idx[:1], 0  # keeps this process in the gradient synchronisation
            tokens += sum(objective.length(train_items[j]) for j in mine) if scale else 0
            batch = step_fn.collate([train_items[j] for j in mine], pad_id, mine)
            batch = {key: v.to(accelerator.device) for key, v in batch.items()}
            last = k == len(micro) - 1
            # gradients are synchronised across processes only on the step's last micro-batch
            sync = contextlib.nullcontext() if last else accelerator.no_sync(policy)
            with sync:
                with accelerator.autocast():
                    # (sharded, every process computes the KL: it gathers weights; an empty share's is not counted)
                    out = step_fn(policy, train_reference, batch,
                                  kl=log_now and last and (scale > 0 or bool(sharded)), kl_max_tokens=KL_TRAIN_TOKENS)
                # backward outside autocast (torch.autocast's docs): each backward op runs in its forward op's dtype;
                # inside, the CPU's fp32 LM head's backward went bf16, ~50x slower without fast bf16 (RESULTS.md)
                sharding.backward(accelerator, policy, out.losses.sum() * scale / step_items, last, sharded)
            finite = finite & torch.isfinite(out.losses.detach()).all()
            if scale:
                for key, value in out.stats.items():
                    step_stats.setdefault(key, []).append(value)
        if sharded and sharded["engine"] == "deepspeed":  # its step (next line) updates: the loss is checked first
            guard.check(step, finite, 0.0)
        grad_norm = sharding.clip_and_norm(accelerator, policy, model, cfg.max_grad_norm, sharded)
        skipped = guard.check(step, finite, grad_norm)  # non-finite: raises, or (skip_nonfinite_steps) skips
        if skipped:
            guard.skip(optimizer)
        else:
            optimizer.step()
            scheduler.step()
            for key, values in step_stats.items():
                running.setdefault(key, []).extend(values)
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.time() - step_start
        bar.update(1)

        if log_now and not skipped:  # means over every process's items since the last row
            row = {"step": step, "epoch": round(epoch, 4),  # (an empty share's KL, sharded, is not counted)
                   **training_row(running, tokens, train_seconds, out.kl if scale else None, accelerator)}
            row["grad_norm"] = float(grad_norm)
            row["learning_rate"] = scheduler.get_last_lr()[0]
            metrics.log(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', math.nan):.2f}")
            running, tokens, train_seconds = {}, 0, 0.0

        if do_eval and (step % eval_every == 0 or step == total_steps):
            row = {"step": step, "epoch": round(epoch, 4), **evaluation(step)}
            metrics.log(row)
            if best.update(row, step, accelerator, model, tokenizer, sharded):  # early stopping
                stopped_early = True
                break

        saved = checkpoints.save_now(cfg, step, steps_per_epoch)
        if saved:
            checkpoint(step)
        if step < total_steps and stop.requested(accelerator):  # after the step's logging, evaluation, checkpoint
            stop.stop(step, checkpoint if cfg.saves_checkpoints and not saved else None, metrics, cfg, accelerator)
    bar.close()

    # --- outputs -------------------------------------------------------------------------
    final = accelerator.unwrap_model(policy).model
    if best.step is not None and best.step != step:
        checkpoints.load_best_into(final, cfg)  # the model we keep is the best one seen
    guard.check_weights(final, step)  # never a final model with NaN or infinite weights
    summary: dict = {}
    weights = sharding.full_state_dict(final, loaded_dtypes=True) if sharded else None
    if accelerator.is_main_process:
        checkpoints.save_final(final, tokenizer, cfg, weights)
        summary = metrics.finish(total_steps=total_steps, steps_done=step, stopped_early=stopped_early,
                                 best=best, elapsed=time.time() - start_time)
        hub.push_final(cfg)
    accelerator.wait_for_everyone()
    return summary
