"""The final model in output_dir: written file by file atomically, each weight in the dtype it was
loaded in, readable by transformers (and by readers built on transformers 4), and never mixed with an
earlier run's weight files.

    save_final(policy, tokenizer, cfg, weights)    # the main process, last (it casts or merges in place)
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import yaml

from preftune.checkpoints.folders import saving
from preftune.checkpoints.weights import save_weights
from preftune.files import fresh_tmp_dir, write_atomic
from preftune.models import restore_loaded_dtypes
from preftune.tokenization import stop_ids

log = logging.getLogger("preftune")


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


def save_final(model, tokenizer, cfg, state_dict: dict | None = None, processor=None) -> None:
    """The final model and tokenizer into output_dir itself, file by file atomically, each weight in
    the dtype it was loaded in (trainable ones are cast back from their float32 master copy). A LoRA
    policy is written as its adapter (cfg.final_adapter_only) or merged into full weights. Both the
    cast and the merge change the model in place: call this last. A sharded model's weights come
    gathered, already in their loaded dtypes, as state_dict. A vision-language model's `processor` is saved
    with it (its tokenizer included), so that AutoProcessor loads the folder as the model it is."""
    out = Path(cfg.output_dir)
    # generation stops where training's completions end (a reward model, which does not generate, has none)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = stop_ids(tokenizer)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out / ".final.tmp"
    with saving("the final model", out, tmp):
        fresh_tmp_dir(out / "final")
        if state_dict is None:
            restore_loaded_dtypes(model)
        save_weights(model, tmp, merge=not cfg.final_adapter_only, state_dict=state_dict)
        add_legacy_rope_keys(tmp)
        (processor or tokenizer).save_pretrained(tmp)
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
