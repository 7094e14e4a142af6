"""Resuming a run from a checkpoint-N folder: which folder, whether it is this run's, and its state back.

    folder = resume_dir(cfg)          # before anything loads: a bad path or another run's checkpoint fails at once
    state = load_checkpoint(folder, engine, policy_logps, optimizer, scheduler, cfg, fingerprint)

What a resume may change, and what makes it another run (refused unless resume_override: true), is
listed in the tables below (docs/checkpoints.md). A resumed run reaches the metrics and weights of an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from safetensors import safe_open

from preftune.checkpoints.folders import checkpoint_folders, missing
from preftune.checkpoints.save import set_rng_state
from preftune.errors import ConfigError

log = logging.getLogger("preftune")


def resume_dir(cfg) -> Path | None:
    """The checkpoint `resume_from_checkpoint` names: a folder, or "true" for the latest complete
    checkpoint-N in output_dir; checked against the config (`check_same_run`) before anything loads.
    None when unset."""
    folder = _resume_folder(cfg)
    if folder is not None:
        check_same_run(json.loads((folder / "trainer_state.json").read_text()), cfg, folder)
    return folder


def _resume_folder(cfg) -> Path | None:
    value = cfg.resume_from_checkpoint
    if not value:
        return None
    if value == "true":
        out = Path(cfg.output_dir)
        found = checkpoint_folders(out)
        complete = [p for _, p in found if not missing(p)]
        if not complete:
            if found:
                raise ConfigError(f"resume_from_checkpoint: true, but no checkpoint in {out} is complete "
                                  f"({found[-1][1].name} lacks {', '.join(missing(found[-1][1]))}); "
                                  "checkpoints written with save_only_model: true cannot be resumed")
            raise ConfigError(f"resume_from_checkpoint: true, but {out} holds no checkpoint-N folder; "
                              "set save_steps to write checkpoints, or remove resume_from_checkpoint")
        if complete[-1] != found[-1][1]:
            log.warning("resume: skipping %s (incomplete), resuming from %s", found[-1][1].name, complete[-1].name)
        return complete[-1]
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"resume_from_checkpoint: '{value}' is not a folder; give a checkpoint-N folder, "
                          "or true for the latest in output_dir")
    lacks = missing(folder)
    if lacks:
        raise ConfigError(f"resume_from_checkpoint: '{value}' is not a complete preftune checkpoint: it lacks "
                          f"{', '.join(lacks)} (save_only_model: true checkpoints cannot be resumed)")
    return folder


# What a resume may change (docs/checkpoints.md). Keys that decide which pairs make up each micro-batch:
# changed, the saved data position would point into a different stream, so they are always refused.
DATA_ORDER_KEYS = ("val_size", "shuffle", "max_samples", "seed", "per_device_train_batch_size",
                   "gradient_accumulation_steps")


# Keys that make it another run: refused unless resume_override: true (then warned, with the changes).
# The data is compared by its fingerprint (the tokenized items) once it is read: the same data may have
# moved, so a changed path alone is only warned, and the data keys are named when the data differs.
CHANGED_RUN_KEYS = {
    "model": ("model_name_or_path", "stage", "finetuning_type", "adapter_name_or_path", "lora_rank", "lora_alpha",
              "lora_dropout", "lora_target", "use_dora", "use_rslora", "additional_target", "freeze_trainable_layers",
              "freeze_trainable_modules", "freeze_extra_modules", "quantization_bit", "torch_dtype", "pure_bf16"),
    "reference": ("ref_model", "ref_model_adapters", "ref_model_quantization_bit", "precompute_ref_log_probs",
                  "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps"),
    "loss": ("pref_loss", "loss_weights", "pref_beta", "label_smoothing", "discopop_tau", "simpo_gamma",
             "pref_bco_weight", "pref_ftx", "kto_chosen_weight", "kto_rejected_weight", "f_divergence_type",
             "f_alpha_divergence_coef", "ld_alpha", "use_weighting", "router_aux_loss_coef"),
}


DATA_KEYS = ("dataset", "dataset_dir", "eval_dataset", "columns", "template", "cutoff_len", "truncation_mode",
             "max_prompt_length", "drop_invalid_pairs", "mix_strategy", "interleave_probs", "default_system")


# Keys that change nothing the weights go through: free on resume, not even warned. (Others, such as
# learning_rate or max_steps, change the rest of the run and are warned.)
FREE_ON_RESUME = ("resume_from_checkpoint", "resume_override", "output_dir", "overwrite_output_dir", "logging_steps",
                  "save_steps", "save_total_limit", "save_only_model", "plot_loss", "progress_bar", "report_to",
                  "eval_steps", "eval_strategy", "per_device_eval_batch_size", "generate_during_eval",
                  "dataloader_num_workers", "ddp_timeout", "preprocessing_num_workers", "overwrite_cache",
                  "tokenized_cache_dir", "ref_logps_cache_dir", "skip_nonfinite_steps", "num_samples",
                  "max_new_tokens", "temperature", "top_p", "top_k", "reward", "pairing", "min_margin", "prompts",
                  "run_name", "logging_dir", "save_strategy", "infer_backend", "vllm_gpu_util", "vllm_enforce_eager",
                  "prefix_sharing", "push_to_hub", "hub_model_id", "hub_private_repo", "hub_strategy", "hub_token",
                  "torch_compile", "torch_compile_backend", "torch_compile_mode", "enable_liger_kernel",
                  "pad_to_multiple_of")


def _changes(saved: dict, now: dict, keys) -> list[str]:
    return [f"{k} {saved[k]!r} -> {now[k]!r}" for k in keys if k in saved and k in now and saved[k] != now[k]]


def check_same_run(state: dict, cfg, folder: Path) -> None:
    """Refuse a resume that would continue another run: other data order, model, reference or loss
    (unless resume_override: true), or max_steps below the checkpoint's step. Other changes are warned."""
    saved, now = state["config"], cfg.to_dict()
    order = [k for k in DATA_ORDER_KEYS if k in saved and saved[k] != now[k]]
    if order:
        raise ConfigError(f"resume_from_checkpoint: {folder} was written with other {', '.join(order)} "
                          f"({', '.join(f'{k}={saved[k]!r}' for k in order)}); resume with the run's own values")
    if 0 < cfg.max_steps < state["step"]:
        raise ConfigError(f"max_steps: {cfg.max_steps} is below the step of the checkpoint resumed ({folder.name}, "
                          f"step {state['step']}); raise max_steps, or resume an earlier checkpoint")
    grouped = {group: _changes(saved, now, keys) for group, keys in CHANGED_RUN_KEYS.items()}
    changed = "; ".join(f"{group}: {', '.join(c)}" for group, c in grouped.items() if c)
    if changed and not cfg.resume_override:
        raise ConfigError(f"resume_from_checkpoint: {folder} was written by another run ({changed}); resume with "
                          "the run's own settings, or set resume_override: true to continue with these changes")
    if changed:
        log.warning("resume_override: continuing %s with changes (%s)", folder, changed)
    known = set(DATA_ORDER_KEYS + FREE_ON_RESUME).union(*CHANGED_RUN_KEYS.values())
    others = _changes(saved, now, [k for k in now if k not in known])
    if others:
        log.warning("resume: settings differ from the checkpoint's run: %s; the rest of the run follows the new "
                    "values", ", ".join(others))


def check_same_data(state: dict, cfg, folder: Path, fingerprint: str | None) -> None:
    """The tokenized data must be the checkpoint's (compared by the data fingerprint)."""
    saved = state.get("data_fingerprint")
    if saved is None or fingerprint is None or saved == fingerprint:
        return
    keys = _changes(state["config"], cfg.to_dict(), DATA_KEYS)
    what = f" ({', '.join(keys)})" if keys else " (the same settings: the files' contents changed)"
    if not cfg.resume_override:
        raise ConfigError(f"resume_from_checkpoint: {folder} was trained on other data{what}; resume with the run's "
                          "own data, or set resume_override: true to continue on this data")
    log.warning("resume_override: continuing %s on other data%s", folder, what)


def load_checkpoint(folder: Path, engine, policy_logps, optimizer, scheduler, cfg,
                    fingerprint: str | None = None) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG states from `folder`, once its data
    is known to be this run's (`fingerprint`); return trainer_state.json's loop state, with `running`
    as {statistic: [tensor on the device]}."""
    state = json.loads((folder / "trainer_state.json").read_text())
    check_same_data(state, cfg, folder, fingerprint)
    written = state.get("engine", "fsdp" if state.get("sharded") else None)
    if written != engine.checkpoint_format:  # the optimizer state is kept differently
        how = f"with {written}" if written else "without fsdp or deepspeed"
        raise ConfigError(f"resume_from_checkpoint: {folder} was written {how}; resume with the setting it was "
                          "written with")
    if state.get("world_size", 1) != engine.world:
        # each process's share of every batch, and its random state, depend on the number of processes
        raise ConfigError(f"resume_from_checkpoint: {folder} was written by {state.get('world_size', 1)} process(es) "
                          f"and this run has {engine.world}; resume with the same number of processes")
    engine.load_checkpoint(policy_logps, optimizer, engine.unwrap(policy_logps).model, folder)
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    scaler = engine.accelerator.scaler
    if scaler is not None:
        if not (folder / "scaler.json").is_file():
            raise ConfigError(f"resume_from_checkpoint: {folder} has no scaler.json (it was not an fp16 run); "
                              "resume with the precision it was written with")
        scaler.load_state_dict(json.loads((folder / "scaler.json").read_text()))
    set_rng_state(json.loads((folder / f"rng_state_{engine.rank}.json").read_text()))
    running_file = folder / f"running_{engine.rank}.safetensors"
    state["running"] = {}
    if running_file.is_file():
        with safe_open(str(running_file), framework="pt") as f:
            state["running"] = {k: [f.get_tensor(k).to(engine.device)] for k in json.loads(f.metadata()["order"])}
    return state
