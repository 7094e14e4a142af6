"""The training loop: set-up, then one explicit `for step in range(...)`, top to bottom.

    preftune train config.yaml          # or: from preftune.train import train; train(cfg)

`train()` prepares data, models and optimizer, then runs the loop, with evaluation, logging,
early stopping and checkpoints as `if` blocks calling other modules: what a step computes is
`step.py`'s (one of `STEPS`), what the reference is `reference.py`'s, how a dataset is scored
`evaluate.py`'s, how a checkpoint is written `checkpoints/`'s, the best model `best.py`'s.

How the processes run it is the engine's (engines/): one process, or several, each training on its
share of every global micro-batch (metrics pooled, only the main process writes files), with the
model whole on each or sharded. The loop reads the same for all of them. A non-finite step stops the
run (or is skipped, skip_nonfinite_steps) and SIGINT/SIGTERM stop it after the step: `runtime.py`'s.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from preftune import checkpoints, final, hub, runtime, vision
from preftune.batching import epoch_batches
from preftune.best import BestModel, check_best_model, load_best_into
from preftune.cache import data_fingerprint
from preftune.config import TrainConfig
from preftune.data import load_eval_sets, load_pairs
from preftune.engines import check_hardware, make_engine
from preftune.errors import DataError
from preftune.evaluate import evaluate, training_row
from preftune.generate import sample_texts
from preftune.models import check_attention, load_tokenizer
from preftune.offload import OffloadActivations
from preftune.optim import make_optimizer, make_scheduler
from preftune.reference import describe_precision, load_models, sync_reference
from preftune.report import MetricsLog
from preftune.saved import model_run_config, with_run_template
from preftune.step import STEPS
from preftune.tokenization import TokenizeReport, describe_rendering, rendering_text
from preftune.tracking import make_trackers, tracker_names

log = logging.getLogger("preftune")

KL_TRAIN_TOKENS = 512  # training rows estimate the KL on this many completion tokens of the last micro-batch


def progress_postfix(row: dict, figures: dict[str, str]) -> dict[str, str]:
    """The progress bar's figures for a logged training row: the loss, and the objective's own (its
    step's `progress`: short name -> metric), those the row has (an unpaired batch may lack a side)."""
    shown = {"loss": f"{row['loss']:.4f}"}
    shown.update({name: f"{row[key]:.3g}" if name == "ppl" else f"{row[key]:.2f}"
                  for name, key in figures.items() if key in row})
    return shown


def train(cfg: TrainConfig) -> dict:
    with runtime.StopSignals() as stop:  # SIGINT/SIGTERM: the loop stops after its step, cleanly
        try:
            return run(cfg, stop)
        except RuntimeError as e:  # another process died or hangs: one line, within ddp_timeout (engines/)
            lost = runtime.lost_process(e, cfg)
            if lost is None:
                raise
            raise lost from None


def run(cfg: TrainConfig, stop: runtime.StopSignals) -> dict:
    start_time = time.time()
    # a model a preftune run wrote is trained in the template it was trained in (as sample and eval read it)
    cfg = with_run_template(cfg, model_run_config(cfg.model_name_or_path))
    set_seed(cfg.seed)
    resume_from = checkpoints.resume_dir(cfg)  # before any loading: a bad path or a changed run fails at once
    checkpoints.check_output_dir(cfg, resuming=resume_from is not None)
    check_attention(cfg)  # a missing flash-attn package fails now, not after tokenizing the data
    check_hardware(cfg)  # fp16 without a GPU: refused, not silently inert
    tracker_names(cfg)  # and so is a report_to tracker that is not installed
    Step = STEPS[cfg.objective]  # what one step computes, for the objective the config names

    # --- data ----------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    processor = vision.load_processor(cfg)  # a vision-language model's, which renders the pairs (vision.py); else None
    train_examples, val_examples, data_report = load_pairs(cfg)
    tok_report = TokenizeReport()
    train_items = Step.tokenize(processor or tokenizer, train_examples, cfg, tok_report)
    # the validation set, then any further named eval sets (eval_dataset as a mapping): name -> items
    eval_items = {name: Step.tokenize(processor or tokenizer, examples, cfg, tok_report)
                  for name, examples in {"validation": val_examples, **load_eval_sets(cfg, data_report)}.items()}
    val_items = eval_items["validation"]
    fingerprint = data_fingerprint(train_items, eval_items)  # a resume on other data is refused
    unit = Step.unit
    log.info("data: %d train %s, %d validation %s, %d truncated to cutoff_len=%d, %d dropped (no completion "
             "token fits), %d skipped", len(train_items), unit, len(val_items), unit, tok_report.truncated,
             cfg.cutoff_len, tok_report.dropped, data_report.skipped_identical)
    rendering = describe_rendering(tokenizer, cfg.template, train_examples) if processor is None \
        else vision.describe(processor)  # said once, and in summary.json
    log.info("rendering: %s", rendering_text(rendering))
    if not train_items:
        raise DataError(f"every training {unit[:-1]} was dropped: none fits cutoff_len={cfg.cutoff_len}; raise it")

    # --- models and optimizer ------------------------------------------------------------
    engine = make_engine(cfg, make_trackers(cfg))  # how the processes run the loop (engines/, docs/distributed.md)
    if engine.is_main:  # push_to_hub: a login or repo problem stops the run now, not at the end
        hub.create_repo(cfg)
    else:
        log.setLevel(logging.WARNING)  # one log: the main process's
    engine.check(cfg)  # what this engine does not do: refused before any model loads
    rank, world = engine.data_shard  # (sequence parallelism: a group of processes shares one share)
    global_batch = cfg.per_device_train_batch_size * world  # items of one micro-batch, over all processes
    policy, reference = load_models(cfg, tokenizer, engine, {"train": train_items, **eval_items}, processor)
    metrics = MetricsLog(cfg, engine.accelerator)
    nonfinite = runtime.NonFiniteGuard(cfg, engine.accelerator, metrics)
    metrics.describe_setup(engine.accelerator, global_batch, unit, reference.description,
                           describe_precision(policy, reference, cfg))
    policy.train()
    # the policy's whole pass as one module, for the engine to wrap, shard or run: its log-probs
    # (`step.logps_module`), or a reward model's scores (`reward_model.RewardModule`)
    policy_logps, optimizer = engine.prepare(Step.module(policy, cfg), lambda: make_optimizer(policy, cfg), reference)
    micro_per_epoch = math.ceil(len(train_items) / global_batch)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)
    metrics.planned_steps = total_steps
    scheduler = make_scheduler(optimizer, cfg, total_steps)  # on the groups the prepared optimizer steps with
    train_step = Step(cfg, engine, processor)
    pad_id = tokenizer.pad_token_id
    train_reference = reference.on("train")
    eval_every = steps_per_epoch if cfg.eval_strategy == "epoch" else cfg.eval_steps or steps_per_epoch
    do_eval = bool(val_items) and cfg.eval_strategy != "no"

    def evaluation(step: int) -> dict:  # fresh steps: an evaluation pass keeps no loss state of training's
        row = {}
        for name, items in eval_items.items():  # eval_* for the validation set, eval_<name>_* for the others
            row.update(evaluate(Step(cfg, engine, processor), policy_logps, reference.on(name), items,
                                cfg.eval_batch_size, pad_id, engine,
                                prefix="eval_" if name == "validation" else f"eval_{name}_"))
        if cfg.generate_during_eval and engine.is_main:  # what the policy writes now
            prompts = val_examples[:cfg.generate_during_eval]
            row.update(metrics.log_completions(step, prompts, sample_texts(policy, tokenizer, prompts, cfg,
                                                                           engine.device)))
        return row

    lengths = [Step.length(item) for item in train_items] if cfg.group_by_length else None  # in tokens

    def steps(epoch=0, start=0):  # endless stream of (epoch position, a step's global micro-batches)
        accumulation = cfg.gradient_accumulation_steps
        while True:  # each epoch reshuffled by seed; its last step takes what is left of it, not the next epoch's
            batches = epoch_batches(len(train_items), global_batch, cfg.seed, epoch, lengths=lengths)
            for j in range(start, steps_per_epoch):
                yield epoch + (j + 1) / steps_per_epoch, batches[j * accumulation:(j + 1) * accumulation]
            epoch, start = epoch + 1, 0

    metrics.data = {**vars(data_report), "truncated": tok_report.truncated, "dropped": tok_report.dropped,
                    "boundary_merges": tok_report.boundary_merges, "rendering": rendering,
                    # training examples per kind, read back by what renders like this run (rewards.py)
                    "kinds": dict(collections.Counter("conversational" if e.conversational else "plain"
                                                      for e in train_examples))}
    if do_eval and resume_from is None:  # the baseline: where the reference itself stands
        metrics.log({"step": 0, "epoch": 0.0, **evaluation(0)})
    best, stopped_early = BestModel(cfg), False
    running: dict[str, list[torch.Tensor]] = {}
    tokens, train_seconds = 0, 0.0  # throughput counts training time only, not logging or evaluation
    step = 0
    if resume_from is not None:  # the same state as the uninterrupted run had after `step`
        state = checkpoints.load_checkpoint(resume_from, engine, policy_logps, optimizer, scheduler, cfg, fingerprint)
        step, running, tokens, train_seconds = state["step"], state["running"], state["tokens"], state["train_seconds"]
        best.load_state_dict(state)
        check_best_model(cfg, best.step, step)
        metrics.resume(state, resume_from)
        train_step.load_state_dict(state["loss_state"])
        if cfg.sync_ref_model and not reference.load_synced(policy, resume_from, engine):
            log.warning("sync_ref_model: %s holds no moving reference (its run did not sync); the reference "
                        "restarts from the starting model", resume_from)
        log.info("resumed from %s at step %d", resume_from, step)
    # the data position: order depends only on (seed, epoch), so the steps taken say where we are
    stream = steps(*divmod(step, steps_per_epoch))
    bar = tqdm(total=total_steps, initial=step, desc=cfg.objective,
               disable=not cfg.progress_bar or not engine.is_main)

    # TR-DPO (sync_ref_model): the reference moves, so checkpoints hold it (the policy's weights to save it by)
    moving_reference = (lambda folder: reference.save_synced(policy, folder, engine)) if cfg.sync_ref_model else None

    def checkpoint(step: int) -> None:  # everything the loop needs to continue after `step`
        epoch_index, step_index = divmod(step, steps_per_epoch)
        loop_state = {"epoch": epoch_index, "micro_batch": step_index * cfg.gradient_accumulation_steps,
                      "tokens": tokens, "train_seconds": train_seconds, **best.state_dict(),
                      "loss_state": train_step.state_dict(), "log_history": metrics.history,
                      "nonfinite_steps_skipped": nonfinite.skipped, "data_fingerprint": fingerprint}
        # a VLM's checkpoints hold its processor (which saves the tokenizer too), so AutoProcessor loads one
        checkpoints.save_checkpoint(engine, policy_logps, optimizer, scheduler, processor or tokenizer, cfg, step,
                                    loop_state, running, moving_reference)
    stop.armed = True
    # (activation_offloading: activations saved for the backward wait in CPU memory; docs/performance.md)
    offload = OffloadActivations(engine.unwrap(policy_logps)) if cfg.activation_offloading else contextlib.nullcontext()

    # --- the loop ------------------------------------------------------------------------
    for step in range(step + 1, total_steps + 1):
        step_start = time.time()
        epoch, micro = next(stream)  # the step's global micro-batches (fewer at the end of an epoch)
        step_items = sum(len(idx) for idx in micro)  # over all processes
        log_now = step % cfg.logging_steps == 0 or step == total_steps
        step_stats, finite = {}, True  # this step's statistics join `running` once the step is known finite
        for k, idx in enumerate(micro):
            mine = idx[rank * len(idx) // world:(rank + 1) * len(idx) // world]  # this process's share
            # the engine averages the processes' gradients, hence x world: the step's loss is the mean over its items
            scale = world
            if not mine:  # fewer items than processes (an epoch's last batch): a share that counts for nothing
                mine, scale = idx[:1], 0  # keeps this process in the gradient synchronisation
            tokens += sum(Step.length(train_items[j]) for j in mine) if scale else 0
            batch = train_step.collate([train_items[j] for j in mine], pad_id, mine)
            batch = {key: v.to(engine.device) for key, v in batch.items()}
            last = k == len(micro) - 1
            with engine.accumulate(policy_logps, sync=last):  # gradients synchronised on the step's last micro-batch
                with engine.autocast(), offload:  # (the packed activations outlive the context: the backward reads them)
                    # (lockstep engines gather weights for the KL: every process computes it; an empty share's
                    # is not counted)
                    out = train_step(policy_logps, train_reference, batch, kl_max_tokens=KL_TRAIN_TOKENS,
                                     kl=log_now and last and (scale > 0 or engine.lockstep))
                # backward outside autocast (torch.autocast's docs): each backward op runs in its forward op's dtype;
                # inside, the CPU's fp32 LM head's backward went bf16, ~50x slower without fast bf16 (RESULTS.md)
                engine.backward(policy_logps, out.losses.sum() * scale / step_items)
            finite = finite & torch.isfinite(out.losses.detach()).all()
            if scale:
                for key, value in out.stats.items():
                    step_stats.setdefault(key, []).append(value)
        # clip, then update the weights unless the step is non-finite (it raises, or with skip_nonfinite_steps skips)
        grad_norm, stepped = engine.update(policy_logps, optimizer, cfg.max_grad_norm,
                                           skip=lambda norm: nonfinite.check(step, finite, norm))
        if stepped:
            scheduler.step()
            for key, values in step_stats.items():
                running.setdefault(key, []).extend(values)
        if cfg.sync_ref_model and step % cfg.ref_model_sync_steps == 0:  # TR-DPO: as TRL, at the end of the step
            sync_reference(reference, policy, cfg.ref_model_mixup_alpha, engine)  # counted whether or not it updated
        train_seconds += time.time() - step_start
        bar.update(1)

        if log_now and stepped:  # means over every process's items since the last row
            row = {"step": step, "epoch": round(epoch, 4),  # (an empty share's KL is not counted)
                   **training_row(running, tokens, train_seconds, out.kl if scale else None, engine)}
            row["grad_norm"] = float(grad_norm)
            row["learning_rate"] = scheduler.get_last_lr()[0]
            metrics.log(row)
            bar.set_postfix(progress_postfix(row, Step.progress))
            running, tokens, train_seconds = {}, 0, 0.0

        if do_eval and (step % eval_every == 0 or step == total_steps):
            row = {"step": step, "epoch": round(epoch, 4), **evaluation(step)}
            metrics.log(row)
            if best.update(row, step, engine, policy, processor or tokenizer, metrics.drift()):  # early stopping
                stopped_early = True
                break

        saved = checkpoints.save_now(cfg, step, steps_per_epoch)
        if saved:
            checkpoint(step)
        if step < total_steps and stop.requested(engine.accelerator):  # after the step's logging, evaluation, saving
            stop.stop(step, checkpoint if cfg.saves_checkpoints and not saved else None, metrics, cfg,
                      engine.accelerator)
    bar.close()

    # --- outputs -------------------------------------------------------------------------
    if best.step is not None and best.step != step:
        load_best_into(policy, cfg, engine)  # the model we keep is the best one seen
    nonfinite.check_weights(policy, step)  # never a final model with NaN or infinite weights
    summary: dict = {}
    weights = engine.whole_weights(policy, loaded_dtypes=True)  # gathered where sharded; None: the policy holds them
    if engine.is_main:
        final.save_final(policy, tokenizer, cfg, weights, processor)
        summary = metrics.finish(total_steps=total_steps, steps_done=step, stopped_early=stopped_early,
                                 best=best, elapsed=time.time() - start_time)
        hub.push_final(cfg)
    engine.wait()
    return summary
