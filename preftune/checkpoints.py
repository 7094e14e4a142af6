"""Writing models and checkpoints atomically.

Everything is first written to a temporary folder beside its destination and then renamed
into place, so a run killed at any moment leaves either the previous version or the new
one, never a half-written folder. Weights are safetensors; nothing here unpickles a model.

Checkpoints (and best_model/) hold the weights as training holds them: float32 master weights
for the trainable ones, so a resume continues exactly. The final model is written in the dtype
the weights were loaded in (a bfloat16 checkpoint comes back bfloat16, `models.restore_loaded_dtypes`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from peft import PeftModel, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from preftune import guard, hub, sharding, zero
from preftune.adapters import TRAINED_ADAPTER
from preftune.errors import ConfigError, ModelError
from preftune.files import fresh_tmp_dir, remove_dir, replace_dir, write_atomic
from preftune.tokenization import stop_ids
from preftune.models import restore_loaded_dtypes

log = logging.getLogger("preftune")


def best_dir(cfg) -> Path:
    return Path(cfg.output_dir) / "best_model"


def _save_weights(model, folder: Path, merge: bool = False, state_dict: dict | None = None) -> None:
    """A transformers model's weights (+ config, generation config), or a peft model's trained
    adapter (adapter_config.json + adapter_model.safetensors; the frozen `reference` adapter is
    not part of the result). merge=True writes a peft model as merged full weights instead; that
    merges in place, so the peft model is spent afterwards. state_dict: the weights to write in
    place of the model's own (a sharded model's, gathered by `sharding.full_state_dict`)."""
    if not isinstance(model, PeftModel):
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        if state_dict:  # config.json names the dtype of the model's own parameters, which a sharding engine
            _config_dtype(folder, state_dict)  # may hold in another (DeepSpeed's bf16): name the saved one
        return
    if merge:
        model.merge_and_unload(adapter_names=[TRAINED_ADAPTER]).save_pretrained(folder, safe_serialization=True)
        return
    given = {} if state_dict is None else {"state_dict": state_dict}  # sharded: the gathered adapter weights
    model.save_pretrained(folder, safe_serialization=True, selected_adapters=[TRAINED_ADAPTER], **given)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _config_dtype(folder: Path, state_dict: dict[str, torch.Tensor]) -> None:
    dtypes = [t.dtype for t in state_dict.values() if t.is_floating_point()]
    path = folder / "config.json"
    if not dtypes or not path.is_file():
        return
    name = str(max(set(dtypes), key=dtypes.count)).removeprefix("torch.")  # the weights' common dtype
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("dtype", name) != name:
        config["dtype"] = name
        write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_model(model, tokenizer, dest: Path, step: int, state_dict: dict | None = None) -> None:
    with _saving(dest.name, dest.parent, dest.with_name(f".{dest.name}.tmp")):
        tmp = fresh_tmp_dir(dest)
        _save_weights(model, tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / "preftune_step.json").write_text(json.dumps({"step": step}))
        replace_dir(tmp, dest)


def load_weights_into(model, folder: Path) -> None:
    """Load the safetensors weights `save_pretrained` wrote in `folder` into `model` (same architecture);
    for a peft model, the trained adapter it saved (`_save_weights`)."""
    if isinstance(model, PeftModel):
        adapter = folder / "adapter_model.safetensors"
        if not adapter.is_file():
            raise ModelError(f"{folder} holds no adapter_model.safetensors, but the policy is a LoRA model; resume "
                             "a LoRA run from its own checkpoints")
        if sharding.is_sharded(model):  # the saved keys, named as the model's trained-adapter parameters
            state = {re.sub(r"\.(lora_[A-Za-z_]+)\.", rf".\1.{TRAINED_ADAPTER}.", k): v
                     for k, v in load_file(adapter).items()}
            unknown = sorted(set(state) - {n for n, _ in model.named_parameters()})
            if unknown:
                raise ModelError(f"adapter in {folder} does not match the policy: unexpected {unknown[:3]}")
            sharding.load_full_state_dict(model, state)
            return
        result = set_peft_model_state_dict(model, load_file(adapter), TRAINED_ADAPTER)
        if result.unexpected_keys:
            raise ModelError(f"adapter in {folder} does not match the policy: unexpected {result.unexpected_keys[:3]}")
        return
    state = {}
    for shard in sorted(folder.glob("model*.safetensors")):  # not running_<process>.safetensors of a checkpoint
        state.update(load_file(shard))
    if sharding.is_sharded(model):  # each process keeps its shard of the whole weights
        sharding.load_full_state_dict(model, state)
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights (lm_head = embeddings) are stored once, so they may be reported missing
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
        raise ModelError(f"weights in {folder} do not match the policy: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


def load_best_into(model, cfg) -> None:
    """Load the best model's weights into `model` (same architecture)."""
    load_weights_into(model, best_dir(cfg))


def check_output_dir(cfg, resuming: bool) -> None:
    """A fresh run must not meet another run's checkpoint-N folders in output_dir: save_total_limit
    would rotate by step number across both runs (deleting the new run's own checkpoints) and
    `resume_from_checkpoint: true` would pick the other run's latest. Refused with the ways out;
    `overwrite_output_dir: true` (LLaMA-Factory's key) deletes them, and the earlier best_model/."""
    out = guard.check_output_dir(cfg.output_dir, guard.model_inputs(cfg))  # not an input model, writable
    found = _checkpoints(out) if out.is_dir() else []
    if resuming or not found:
        return
    if not cfg.overwrite_output_dir:
        raise ConfigError(f"output_dir: {out} holds {', '.join(p.name for _, p in found[-3:])} from an earlier run; "
                          "resume it (resume_from_checkpoint: true), choose another output_dir, or set "
                          "overwrite_output_dir: true to delete them")
    for path in [p for _, p in found] + [best_dir(cfg)]:
        remove_dir(path)
    log.info("overwrite_output_dir: deleted %d checkpoint(s) of an earlier run in %s", len(found), out)


# The files a saved model's weights can be in. A new final save removes those an earlier save listed
# in its manifest and this one did not write, so that an adapter left by an earlier run is not applied
# on top of new merged weights (or stale merged weights read instead of a new adapter). Files no
# manifest lists are the user's: kept, with a warning when a loader might read them instead.
WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin",
                "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MANIFEST = ".preftune_manifest.json"  # the files the last final save wrote into output_dir


def _manifest(out: Path) -> set[str]:
    try:
        files = json.loads((out / MANIFEST).read_text(encoding="utf-8"))["files"]
        return {f for f in files if isinstance(f, str) and "/" not in f and f not in (".", "..")}
    except (OSError, ValueError, KeyError, TypeError):
        return set()


@contextlib.contextmanager
def _saving(what: str, out: Path, tmp: Path):
    """A failed write (disk full, permissions, the folder gone) while saving: one line naming what was
    lost and where the last complete checkpoint is, never a traceback after hours of training. The
    temporary folder goes; the previous version stays in place."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        complete = [p for _, p in _checkpoints(out) if not _missing(p)] if out.is_dir() else []
        last = (f"the last complete checkpoint is {complete[-1]} (resume_from_checkpoint: true continues from it)"
                if complete else "no checkpoint was written before (set save_steps to keep them)")
        raise ModelError(f"could not write {what} in {out} ({e.strerror or type(e).__name__}"
                         f"{': ' + e.filename if getattr(e, 'filename', None) else ''}); {last}; free space "
                         "there or choose another output_dir") from None


def add_legacy_rope_keys(folder: Path) -> None:
    """transformers 5 writes the rotary settings only inside config.json's `rope_parameters`; readers
    built on transformers 4 (several serving stacks) look for `rope_theta` / `rope_scaling` at the top
    level and silently fall back to rope_theta 10000 without them (Qwen2.5 uses 1e6: garbage output).
    Both spellings are written; transformers 5 reads such a file the same (tested)."""
    path = folder / "config.json"
    if not path.is_file():  # an adapter folder: its base's config applies
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    for part in (config, config.get("text_config")):  # multimodal configs nest the text model's
        rope = part.get("rope_parameters") if isinstance(part, dict) else None
        if isinstance(rope, dict) and "rope_theta" in rope:
            part.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", "default") != "default":
                part.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_final(model, tokenizer, cfg, state_dict: dict | None = None) -> None:
    """The final model and tokenizer into output_dir itself, file by file atomically, each weight in
    the dtype it was loaded in (trainable ones are cast back from their float32 master copy). A LoRA
    policy is written as its adapter (cfg.final_adapter_only) or merged into full weights. Both the
    cast and the merge change the model in place: call this last. A sharded model's weights come
    gathered, already in their loaded dtypes, as state_dict."""
    out = Path(cfg.output_dir)
    if model.generation_config is not None:  # generation stops where training's completions end
        model.generation_config.eos_token_id = stop_ids(tokenizer)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out / ".final.tmp"
    with _saving("the final model", out, tmp):
        fresh_tmp_dir(out / "final")
        if state_dict is None:
            restore_loaded_dtypes(model)
        _save_weights(model, tmp, merge=not cfg.final_adapter_only, state_dict=state_dict)
        add_legacy_rope_keys(tmp)
        tokenizer.save_pretrained(tmp)
        # the resolved config: `preftune train <output_dir>/preftune_config.yaml` repeats the run
        (tmp / "preftune_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
        written = {f.name for f in tmp.iterdir()}
        earlier = _manifest(out)
        # the manifest first: a kill between the two leaves it naming every file this save wrote
        write_atomic(out / MANIFEST, json.dumps({"files": sorted(written | earlier)}, indent=1))
        for f in tmp.iterdir():
            os.replace(f, out / f.name)
        tmp.rmdir()
    for name in sorted(earlier - written):
        stale = out / name
        if stale.is_file() and any(stale.match(pattern) for pattern in WEIGHT_FILES):
            stale.unlink()
            log.info("removed %s of an earlier run's output from %s", name, out)
    write_atomic(out / MANIFEST, json.dumps({"files": sorted(written)}, indent=1))
    foreign = sorted(p.name for pattern in WEIGHT_FILES for p in out.glob(pattern) if p.name not in written)
    if foreign:
        log.warning("%s also holds %s, not written by preftune (kept); a loader may read them with or instead of "
                    "the new model: move them away", out, ", ".join(foreign))


def save_checkpoint(accelerator, policy, optimizer, scheduler, tokenizer, cfg, step: int, loop_state: dict,
                    running: dict) -> None:
    """checkpoint-<step>/: everything an exact resume needs, in formats read back without unpickling.

        model.safetensors, config, tokenizer  the policy, loadable by transformers (a peft model: its adapter)
        optimizer.pt              AdamW state: torch.save, read back with torch.load(weights_only=True)
        scheduler.json            the LR scheduler's state_dict (plain numbers)
        rng_state_<process>.json  python, numpy, torch (and CUDA) generator states of each process
        running_<process>.safetensors  each process's per-item statistics since the last logging step
        trainer_state.json        step, data position, counters, early-stopping and loss state, metrics so
                                  far, the number of processes

    accelerate's save_state is not used: it pickles the RNG states (random_states_*.pkl) and would
    store the weights a second time. With save_only_model only the model, tokenizer and metrics are
    written (no resume from such a checkpoint).
    """
    out = Path(cfg.output_dir)
    dest = out / f"checkpoint-{step}"
    tmp = dest.with_name(f".{dest.name}.tmp")
    with _saving(f"checkpoint-{step}", out, tmp):
        _write_checkpoint(accelerator, policy, optimizer, scheduler, tokenizer, cfg, step, loop_state, running, dest)
    if not accelerator.is_main_process:
        return
    replace_dir(tmp, dest)
    if cfg.save_total_limit:
        found = _checkpoints(out)
        for _, p in found[:-cfg.save_total_limit]:
            remove_dir(p)
        for doomed in out.glob(".checkpoint-*.deleting"):  # any a kill left behind
            shutil.rmtree(doomed)
    hub.push_checkpoint(cfg, dest)  # push_to_hub: what hub_strategy pushes of a checkpoint


def _write_checkpoint(accelerator, policy, optimizer, scheduler, tokenizer, cfg, step, loop_state, running,
                      dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    if accelerator.is_main_process:
        fresh_tmp_dir(dest)
    accelerator.wait_for_everyone()
    if not cfg.save_only_model:
        _write_json(tmp / f"rng_state_{accelerator.process_index}.json", _rng_state())
        if running:  # (N,) per statistic: this process's values of the micro-batches since the last logging step
            save_file({k: torch.cat(v).cpu().contiguous() for k, v in running.items()},
                      tmp / f"running_{accelerator.process_index}.safetensors", metadata={"order": json.dumps(list(running))})
    model = accelerator.unwrap_model(policy).model
    weights, optimizer_state = None, None
    if sharding.is_sharded(model):  # every process takes part in gathering the whole state
        weights = sharding.full_state_dict(model)
        if zero.is_zero(model) and not cfg.save_only_model:  # DeepSpeed writes its partitions itself
            zero.save_engine_state(policy, tmp)
        elif not cfg.save_only_model:
            optimizer_state = sharding.full_optimizer_state(model, optimizer.optimizer)
    if accelerator.is_main_process:
        _save_weights(model, tmp, state_dict=weights)  # a LoRA policy: its trained adapter only
        tokenizer.save_pretrained(tmp)
        if not cfg.save_only_model and not zero.is_zero(model):
            torch.save(optimizer_state or optimizer.state_dict(), tmp / "optimizer.pt")
        if not cfg.save_only_model:
            _write_json(tmp / "scheduler.json", scheduler.state_dict())
            if accelerator.scaler is not None:  # fp16: the loss scale and its growth counter
                _write_json(tmp / "scaler.json", accelerator.scaler.state_dict())
            _write_json(tmp / "trainer_state.json", {**loop_state, "step": step, "running_keys": list(running),
                                                     "world_size": accelerator.num_processes, "config": cfg.to_dict(),
                                                     "sharded": weights is not None, "engine": _engine(model)})
        (tmp / "log_history.json").write_text(json.dumps(loop_state["log_history"], indent=1))
        (tmp / "preftune_step.json").write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()


# Files a checkpoint needs for an exact resume (besides the weights).
RESUME_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.json", "rng_state_0.json")


def _checkpoints(out: Path) -> list[tuple[int, Path]]:
    """checkpoint-N folders by step. A `.checkpoint-N.tmp` left by a run killed mid-write does not match."""
    return sorted((int(m.group(1)), p) for p in out.glob("checkpoint-*")
                  if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))


def latest_checkpoint(out: Path) -> Path | None:
    """The latest checkpoint-N folder in `out` that a resume can use, or None."""
    complete = [p for _, p in _checkpoints(out) if not _missing(p)] if out.is_dir() else []
    return complete[-1] if complete else None


def _missing(folder: Path) -> list[str]:
    weights = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
    missing = [] if any((folder / w).is_file() for w in weights) else ["model weights (model.safetensors)"]
    # under DeepSpeed the optimizer state is its own partitioned files (deepspeed/), not optimizer.pt
    optimizer = (folder / "optimizer.pt").is_file() or (folder / zero.ENGINE_DIR).is_dir()
    return missing + [name for name in RESUME_FILES if not (folder / name).is_file() and
                      not (name == "optimizer.pt" and optimizer)]


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
        found = _checkpoints(out)
        complete = [p for _, p in found if not _missing(p)]
        if not complete:
            if found:
                raise ConfigError(f"resume_from_checkpoint: true, but no checkpoint in {out} is complete "
                                  f"({found[-1][1].name} lacks {', '.join(_missing(found[-1][1]))}); "
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
    missing = _missing(folder)
    if missing:
        raise ConfigError(f"resume_from_checkpoint: '{value}' is not a complete preftune checkpoint: it lacks "
                          f"{', '.join(missing)} (save_only_model: true checkpoints cannot be resumed)")
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
    "reference": ("ref_model", "ref_model_adapters", "ref_model_quantization_bit", "precompute_ref_log_probs"),
    "loss": ("pref_loss", "loss_weights", "pref_beta", "label_smoothing", "discopop_tau", "simpo_gamma",
             "pref_bco_weight", "pref_ftx", "kto_chosen_weight", "kto_rejected_weight", "f_divergence_type",
             "f_alpha_divergence_coef", "ld_alpha", "use_weighting"),
}
DATA_KEYS = ("dataset", "dataset_dir", "eval_dataset", "columns", "template", "cutoff_len", "truncation_mode",
             "max_prompt_length", "drop_invalid_pairs")
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
                  "torch_compile", "torch_compile_backend", "torch_compile_mode", "enable_liger_kernel")


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
    """The tokenized data must be the checkpoint's (compared by `runtime.data_fingerprint`)."""
    saved = state.get("data_fingerprint")
    if saved is None or fingerprint is None or saved == fingerprint:
        return
    keys = _changes(state["config"], cfg.to_dict(), DATA_KEYS)
    what = f" ({', '.join(keys)})" if keys else " (the same settings: the files' contents changed)"
    if not cfg.resume_override:
        raise ConfigError(f"resume_from_checkpoint: {folder} was trained on other data{what}; resume with the run's "
                          "own data, or set resume_override: true to continue on this data")
    log.warning("resume_override: continuing %s on other data%s", folder, what)


def _engine(model) -> str | None:
    """The sharding engine a policy trains under: what its checkpoints' optimizer state is kept by."""
    return "deepspeed" if zero.is_zero(model) else "fsdp" if sharding.is_sharded(model) else None


def load_checkpoint(folder: Path, accelerator, policy, optimizer, scheduler, cfg,
                    fingerprint: str | None = None) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG states from `folder`, once its data
    is known to be this run's (`fingerprint`); return trainer_state.json's loop state, with `running`
    as {statistic: [tensor on the device]}."""
    state = json.loads((folder / "trainer_state.json").read_text())
    check_same_data(state, cfg, folder, fingerprint)
    model = accelerator.unwrap_model(policy).model
    written = state.get("engine", "fsdp" if state.get("sharded") else None)
    if written != _engine(model):  # the optimizer state is kept differently
        how = f"with {written}" if written else "without fsdp or deepspeed"
        raise ConfigError(f"resume_from_checkpoint: {folder} was written {how}; resume with the setting it was "
                          "written with")
    if state.get("world_size", 1) != accelerator.num_processes:
        # each process's share of every batch, and its random state, depend on the number of processes
        raise ConfigError(f"resume_from_checkpoint: {folder} was written by {state.get('world_size', 1)} process(es) "
                          f"and this run has {accelerator.num_processes}; resume with the same number of processes")
    if zero.is_zero(model):  # DeepSpeed's own files: the weights and its partitioned optimizer state
        zero.load_engine_state(policy, folder)
    else:
        load_weights_into(model, folder)
        optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        if sharding.is_sharded(model):
            sharding.load_full_optimizer_state(model, optimizer.optimizer, optimizer_state)
        else:
            optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(json.loads((folder / "scheduler.json").read_text()))
    if accelerator.scaler is not None:
        if not (folder / "scaler.json").is_file():
            raise ConfigError(f"resume_from_checkpoint: {folder} has no scaler.json (it was not an fp16 run); "
                              "resume with the precision it was written with")
        accelerator.scaler.load_state_dict(json.loads((folder / "scaler.json").read_text()))
    _set_rng_state(json.loads((folder / f"rng_state_{accelerator.process_index}.json").read_text()))
    running_file = folder / f"running_{accelerator.process_index}.safetensors"
    state["running"] = {}
    if running_file.is_file():
        with safe_open(str(running_file), framework="pt") as f:
            state["running"] = {k: [f.get_tensor(k).to(accelerator.device)] for k in json.loads(f.metadata()["order"])}
    return state


class BestModel:
    """The best evaluation so far by metric_for_best_model (default eval_loss; `cfg.best_metric`,
    `cfg.best_greater`), and early stopping's count of evaluations without a better one. When the run
    keeps the best (load_best_model_at_end or early_stopping_patience), each new best's weights go to
    best_model/, which the final save then writes instead of the last step's (`load_best_into`).
    The baseline at step 0 (the reference itself) is not a candidate."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.value: float | None = None
        self.step: int | None = None  # the step whose weights are in best_model/ (None: none kept)
        self.evals_without_gain = 0

    def update(self, row: dict, step: int, accelerator, model, tokenizer, sharded: bool = False) -> bool:
        """Take one evaluation row; True when early stopping ends the run here. `sharded`: an FSDP2 policy,
        whose whole weights every process gathers for the save."""
        metric = self.cfg.best_metric
        if metric not in row:
            logged = ", ".join(k for k in row if k.startswith("eval_"))
            raise ConfigError(f"metric_for_best_model: '{metric}' is not logged by this run's evaluation; "
                              f"choose one of {logged}")
        value = float(row[metric])
        better = value == value and (self.value is None or (value > self.value if self.cfg.best_greater
                                                            else value < self.value))
        if better:
            self.value, self.evals_without_gain = value, 0
            if self.cfg.keeps_best:
                self.step = step
                weights = sharding.full_state_dict(model) if sharded else None  # gathered by every process
                if accelerator.is_main_process:
                    save_model(model, tokenizer, best_dir(self.cfg), step, weights)
                accelerator.wait_for_everyone()
            return False
        self.evals_without_gain += 1
        patience = self.cfg.early_stopping_patience
        if patience and self.evals_without_gain >= patience:
            log.info("early stopping at step %d: %s has not improved for %d evaluations", step, metric,
                     self.evals_without_gain)
            return True
        return False

    def state_dict(self) -> dict:
        return {"best_value": self.value, "best_step": self.step, "evals_without_gain": self.evals_without_gain}

    def load_state_dict(self, state: dict) -> None:
        # best_loss: checkpoints written before metric_for_best_model (it was always eval_loss)
        self.value = state.get("best_value", state.get("best_loss"))
        self.step, self.evals_without_gain = state["best_step"], state["evals_without_gain"]

    def why(self) -> str:
        """Why the final model is the one it is (summary.json's kept_model)."""
        if self.step is None:
            return "last step"
        reason = "load_best_model_at_end" if self.cfg.load_best_model_at_end else "early stopping"
        order = "highest" if self.cfg.best_greater else "lowest"
        return f"best evaluation: {order} {self.cfg.best_metric} ({reason})"


def save_now(cfg, step: int, steps_per_epoch: int) -> bool:
    """Whether `step` writes a checkpoint: save_strategy steps (every save_steps), epoch (each epoch's
    last step) or no."""
    if not cfg.saves_checkpoints:
        return False
    return step % (steps_per_epoch if cfg.save_strategy == "epoch" else cfg.save_steps) == 0


def check_best_model(cfg, best_step: int | None, step: int) -> None:
    """A resumed run keeps the best model of early stopping in output_dir/best_model; it must be the
    one saved at best_step, or a later one that the resumed run will overwrite when it gets there."""
    if best_step is None:
        return
    marker = best_dir(cfg) / "preftune_step.json"
    saved = json.loads(marker.read_text())["step"] if marker.is_file() else None
    if saved is None or (saved != best_step and saved <= step):
        raise ConfigError(f"resume_from_checkpoint: the checkpoint's best model (step {best_step}) is not in "
                          f"{best_dir(cfg)}; resume with the run's own output_dir")


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def _rng_state() -> dict:
    """This process's generator states as plain numbers (accelerate pickles them)."""
    version, mt, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": [version, list(mt), gauss_next],
             "numpy": [name, keys.tolist(), pos, has_gauss, cached_gaussian],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
