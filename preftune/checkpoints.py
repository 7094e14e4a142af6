"""Writing models and checkpoints atomically.

Everything is first written to a temporary folder beside its destination and then renamed
into place, so a run killed at any moment leaves either the previous version or the new
one, never a half-written folder. Weights are safetensors; nothing here unpickles a model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import yaml
from peft import PeftModel, set_peft_model_state_dict
from safetensors.torch import load_file

TRAINED_ADAPTER = "default"  # peft's name for the adapter it creates or loads first


def best_dir(cfg) -> Path:
    return Path(cfg.output_dir) / "best_model"


def _replace_dir(tmp: Path, dest: Path) -> None:
    """Swap a finished temporary folder into `dest` (the old one is moved aside, then removed)."""
    old = dest.with_name(dest.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old)


def _fresh_tmp(dest: Path) -> Path:
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed mid-write: never trusted
    tmp.mkdir(parents=True)
    return tmp


def _save_weights(model, folder: Path, merge: bool = False) -> None:
    """A transformers model's weights (+ config, generation config), or a peft model's trained
    adapter (adapter_config.json + adapter_model.safetensors; the frozen `reference` adapter is
    not part of the result). merge=True writes a peft model as merged full weights instead; that
    merges in place, so the peft model is spent afterwards."""
    if not isinstance(model, PeftModel):
        model.save_pretrained(folder, safe_serialization=True)
        return
    if merge:
        model.merge_and_unload(adapter_names=[TRAINED_ADAPTER]).save_pretrained(folder, safe_serialization=True)
        return
    model.save_pretrained(folder, safe_serialization=True, selected_adapters=[TRAINED_ADAPTER])
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def save_model(model, tokenizer, dest: Path, step: int) -> None:
    tmp = _fresh_tmp(dest)
    _save_weights(model, tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "preftune_step.json").write_text(json.dumps({"step": step}))
    _replace_dir(tmp, dest)


def load_best_into(model, cfg) -> None:
    """Load the best model's weights into `model` (same architecture)."""
    folder = best_dir(cfg)
    if isinstance(model, PeftModel):  # the best adapter, written by save_model
        result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"), TRAINED_ADAPTER)
        if result.unexpected_keys:
            raise RuntimeError(f"best adapter in {folder} does not match the policy: unexpected "
                               f"{result.unexpected_keys[:3]}")
        return
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # tied weights (lm_head = embeddings) are stored once, so they may be reported missing
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
        raise RuntimeError(f"best model in {folder} does not match the policy: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")


def save_final(model, tokenizer, cfg) -> None:
    """The final model and tokenizer into output_dir itself, file by file atomically. A LoRA
    policy is written as its adapter (save_adapter_only) or merged into full weights, which
    merges it in place: call this last."""
    out = Path(cfg.output_dir)
    tmp = _fresh_tmp(out / "final")
    _save_weights(model, tmp, merge=not cfg.save_adapter_only)
    tokenizer.save_pretrained(tmp)
    # the resolved config: `preftune train <output_dir>/preftune_config.yaml` repeats the run
    (tmp / "preftune_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def save_checkpoint(accelerator, policy, tokenizer, cfg, step: int, metrics) -> None:
    """checkpoint-<step>/: loadable model + tokenizer, optimizer/RNG state, metrics so far."""
    out = Path(cfg.output_dir)
    dest = out / f"checkpoint-{step}"
    tmp = _fresh_tmp(dest)
    accelerator.unwrap_model(policy).model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if not cfg.save_only_model:
        accelerator.save_state(str(tmp / "state"), safe_serialization=True)
    (tmp / "log_history.json").write_text(json.dumps(metrics.history, indent=1))
    (tmp / "preftune_step.json").write_text(json.dumps({"step": step}))
    _replace_dir(tmp, dest)
    if cfg.save_total_limit:
        found = sorted((int(m.group(1)), p) for p in out.glob("checkpoint-*")
                       if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
        for _, p in found[:-cfg.save_total_limit]:
            shutil.rmtree(p)
