"""The folders a run keeps in output_dir besides its final model: checkpoint-N/ and best_model/.

    checkpoint_folders(out)      # [(step, folder)] by step; latest_checkpoint(out): the last complete one
    with saving(what, out, tmp): # a failed write (disk full) in one line naming the last complete checkpoint
    check_output_dir(cfg, resuming)   # a fresh run meeting another run's checkpoints: refused, or deleted

A checkpoint is complete when it holds the weights and every file a resume reads (`missing`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
from pathlib import Path

from preftune import guard
from preftune.errors import ConfigError, ModelError
from preftune.files import remove_dir

log = logging.getLogger("preftune")

# Files a checkpoint needs for an exact resume (besides the weights). The optimizer state is optimizer.pt,
# or the folder of an engine that writes its own (DeepSpeed's partitioned files: engines/zero.py)
OPTIMIZER_FILE = "optimizer.pt"  # the optimizer state, whole (torch.save of plain tensors; engines write it)
RESUME_FILES = ("trainer_state.json", OPTIMIZER_FILE, "scheduler.json", "rng_state_0.json")
ENGINE_STATE_DIRS = ("deepspeed",)


def best_dir(cfg) -> Path:
    return Path(cfg.output_dir) / "best_model"


def checkpoint_folders(out: Path) -> list[tuple[int, Path]]:
    """checkpoint-N folders by step. A `.checkpoint-N.tmp` left by a run killed mid-write does not match."""
    return sorted((int(m.group(1)), p) for p in out.glob("checkpoint-*")
                  if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))


def missing(folder: Path) -> list[str]:
    """What `folder` lacks to be resumed from (nothing: a complete checkpoint)."""
    weights = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
    lacks = [] if any((folder / w).is_file() for w in weights) else ["model weights (model.safetensors)"]
    optimizer = (folder / OPTIMIZER_FILE).is_file() or any((folder / d).is_dir() for d in ENGINE_STATE_DIRS)
    return lacks + [name for name in RESUME_FILES if not (folder / name).is_file() and
                    not (name == OPTIMIZER_FILE and optimizer)]


def latest_checkpoint(out: Path) -> Path | None:
    """The latest checkpoint-N folder in `out` that a resume can use, or None."""
    complete = [p for _, p in checkpoint_folders(out) if not missing(p)] if out.is_dir() else []
    return complete[-1] if complete else None


@contextlib.contextmanager
def saving(what: str, out: Path, tmp: Path):
    """A failed write (disk full, permissions, the folder gone) while saving: one line naming what was
    lost and where the last complete checkpoint is, never a traceback after hours of training. The
    temporary folder goes; the previous version stays in place."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(out)
        last = (f"the last complete checkpoint is {last} (resume_from_checkpoint: true continues from it)"
                if last else "no checkpoint was written before (set save_steps to keep them)")
        raise ModelError(f"could not write {what} in {out} ({e.strerror or type(e).__name__}"
                         f"{': ' + e.filename if getattr(e, 'filename', None) else ''}); {last}; free space "
                         "there or choose another output_dir") from None


def check_output_dir(cfg, resuming: bool) -> None:
    """A fresh run must not meet another run's checkpoint-N folders in output_dir: save_total_limit
    would rotate by step number across both runs (deleting the new run's own checkpoints) and
    `resume_from_checkpoint: true` would pick the other run's latest. Refused with the ways out;
    `overwrite_output_dir: true` (LLaMA-Factory's key) deletes them, and the earlier best_model/."""
    out = guard.check_output_dir(cfg.output_dir, guard.model_inputs(cfg))  # not an input model, writable
    found = checkpoint_folders(out) if out.is_dir() else []
    if resuming or not found:
        return
    if not cfg.overwrite_output_dir:
        raise ConfigError(f"output_dir: {out} holds {', '.join(p.name for _, p in found[-3:])} from an earlier run; "
                          "resume it (resume_from_checkpoint: true), choose another output_dir, or set "
                          "overwrite_output_dir: true to delete them")
    for path in [p for _, p in found] + [best_dir(cfg)]:
        remove_dir(path)
    log.info("overwrite_output_dir: deleted %d checkpoint(s) of an earlier run in %s", len(found), out)
