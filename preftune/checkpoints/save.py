"""Writing checkpoint-N/ folders: everything an exact resume needs, atomically.

    save_checkpoint(engine, policy_logps, optimizer, scheduler, tokenizer, cfg, step, loop_state, running)

The folder is first written as `.checkpoint-N.tmp` beside its destination and then renamed into
place, so a run killed at any moment leaves either the previous checkpoint or the new one, never a
half-written folder. Checkpoints hold the weights as training holds them: float32 master weights for
the trainable ones, so a resume continues exactly (checkpoints/resume.py reads them back).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from preftune import hub
from preftune.checkpoints.folders import checkpoint_folders, saving
from preftune.checkpoints.weights import save_weights
from preftune.files import fresh_tmp_dir, remove_dir, replace_dir


def save_now(cfg, step: int, steps_per_epoch: int) -> bool:
    """Whether `step` writes a checkpoint: save_strategy steps (every save_steps), epoch (each epoch's
    last step) or no."""
    if not cfg.saves_checkpoints:
        return False
    return step % (steps_per_epoch if cfg.save_strategy == "epoch" else cfg.save_steps) == 0


def save_checkpoint(engine, policy_logps, optimizer, scheduler, tokenizer, cfg, step: int, loop_state: dict,
                    running: dict, save_reference=None) -> None:
    """checkpoint-<step>/: everything an exact resume needs, in formats read back without unpickling.
    Every process calls this (a sharded engine gathers); the main process writes.

        model.safetensors, config, tokenizer  the policy, loadable by transformers (a peft model: its adapter)
        optimizer.pt              AdamW state: torch.save, read back with torch.load(weights_only=True)
                                  (ZeRO: DeepSpeed's own partitioned files in deepspeed/ instead)
        scheduler.json            the LR scheduler's state_dict (plain numbers)
        rng_state_<process>.json  python, numpy, torch (and CUDA) generator states of each process
        running_<process>.safetensors  each process's per-item statistics since the last logging step
        trainer_state.json        step, data position, counters, early-stopping and loss state, metrics so
                                  far, the number of processes, the engine that keeps the optimizer state
        reference.safetensors     a moving reference's weights (sync_ref_model; a LoRA run: its reference
                                  adapter), written by `save_reference(folder)`

    accelerate's save_state is not used: it pickles the RNG states (random_states_*.pkl) and would
    store the weights a second time. With save_only_model only the model, tokenizer and metrics are
    written (no resume from such a checkpoint).
    """
    out = Path(cfg.output_dir)
    dest = out / f"checkpoint-{step}"
    tmp = dest.with_name(f".{dest.name}.tmp")
    with saving(f"checkpoint-{step}", out, tmp):
        _write_checkpoint(engine, policy_logps, optimizer, scheduler, tokenizer, cfg, step, loop_state, running, dest,
                          save_reference)
    if not engine.is_main:
        return
    replace_dir(tmp, dest)
    if cfg.save_total_limit:
        found = checkpoint_folders(out)
        for _, p in found[:-cfg.save_total_limit]:
            remove_dir(p)
        for doomed in out.glob(".checkpoint-*.deleting"):  # any a kill left behind
            shutil.rmtree(doomed)
    hub.push_checkpoint(cfg, dest)  # push_to_hub: what hub_strategy pushes of a checkpoint


def _write_checkpoint(engine, policy_logps, optimizer, scheduler, tokenizer, cfg, step, loop_state, running,
                      dest: Path, save_reference=None) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    if engine.is_main:
        fresh_tmp_dir(dest)
    engine.wait()
    if not cfg.save_only_model:
        _write_json(tmp / f"rng_state_{engine.rank}.json", rng_state())
        if running:  # (N,) per statistic: this process's values of the micro-batches since the last logging step
            save_file({k: torch.cat(v).cpu().contiguous() for k, v in running.items()},
                      tmp / f"running_{engine.rank}.safetensors", metadata={"order": json.dumps(list(running))})
    model = engine.unwrap(policy_logps).model
    weights = engine.whole_weights(model)  # collective where the engine shards; None: the model holds them
    if not cfg.save_only_model:
        engine.save_optimizer(policy_logps, optimizer, tmp)
        if save_reference is not None:  # collective too: gathered where sharded, written by the main process
            save_reference(tmp)
    if engine.is_main:
        save_weights(model, tmp, state_dict=weights)  # a LoRA policy: its trained adapter only
        tokenizer.save_pretrained(tmp)
        if not cfg.save_only_model:
            _write_json(tmp / "scheduler.json", scheduler.state_dict())
            if engine.accelerator.scaler is not None:  # fp16: the loss scale and its growth counter
                _write_json(tmp / "scaler.json", engine.accelerator.scaler.state_dict())
            _write_json(tmp / "trainer_state.json", {**loop_state, "step": step, "running_keys": list(running),
                                                     "world_size": engine.world, "config": cfg.to_dict(),
                                                     "sharded": weights is not None,
                                                     "engine": engine.checkpoint_format})
        (tmp / "log_history.json").write_text(json.dumps(loop_state["log_history"], indent=1))
        (tmp / "preftune_step.json").write_text(json.dumps({"step": step}))
    engine.wait()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


def rng_state() -> dict:
    """This process's generator states as plain numbers (accelerate pickles them)."""
    version, mt, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": [version, list(mt), gauss_next],
             "numpy": [name, keys.tolist(), pos, has_gauss, cached_gaussian],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """The generator states `rng_state` noted."""
    version, mt, gauss_next = state["python"]
    random.setstate((version, tuple(mt), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
