"""`preftune train`: align a model with DPO (or another preference loss).

    preftune train                       # the embedded demo: tiny model, built-in pairs, CPU, minutes
    preftune train CONFIG.yaml           # LLaMA-Factory style or preftune YAML
    preftune train CONFIG.yaml --pref_beta 0.2 --output_dir out   # any key overridden
"""

from __future__ import annotations

import logging
from pathlib import Path

from preftune import guard
from preftune.config import ALIASES, load_config, parse_command_line
from preftune.errors import ConfigError

# keys that name the user's data: with them and no model, `preftune train` is not the demo
DATA_KEYS = {"dataset", "eval_dataset", "dataset_dir", "columns", "max_samples"}

USAGE = """usage: preftune train [CONFIG.yaml] [--key value ...]

Train a causal LM on preference pairs with DPO. Without CONFIG and without --model_name_or_path,
runs the embedded demo (a tiny local model and a built-in pair set, made locally).
Any config key can be given as --key value, overriding the file.
"""


def main(args: list[str], stage: str | None = None) -> int:
    """`preftune train`; `preftune sft` is this with stage: sft."""
    config_path, overrides, _ = parse_command_line(args)
    if stage:  # the command's stage wins over a config file's
        overrides = {"stage": stage, **overrides}
    named = {ALIASES.get(k, k) for k in overrides}
    if config_path is None and not stage and not named & {"model_name_or_path", "ref_model"}:
        if named & DATA_KEYS:  # the user's data, no model: never the demo's model trained on it
            raise ConfigError(f"{', '.join(sorted(named & DATA_KEYS))} given but no model_name_or_path; set the model "
                              "to train (the built-in demo runs without data keys: preftune train)")
        from preftune.demo import demo_config

        logging.getLogger("preftune").info("no config given: running the embedded demo (tiny local model, "
                                           "built-in preference pairs)")
        cfg = demo_config(overrides)
    else:
        cfg = load_config(config_path, overrides)  # every key checked before the heavy imports below
        if not cfg.model_name_or_path:
            empty = config_path is not None and not Path(config_path).read_text(encoding="utf-8").strip()
            raise ConfigError(f"{config_path or 'command line'}: {'the file is empty: ' if empty else ''}no "
                              "model_name_or_path; set it to the model to train (a hub id or a folder); "
                              "`preftune train` with no config at all runs the demo")
        guard.check_inputs(cfg)
    with guard.claim_output_dir(cfg.output_dir, guard.model_inputs(cfg)):
        from preftune.train import train  # heavy imports after the checks: a bad value fails fast

        summary = train(cfg)
    _end_process_group()
    if not summary:  # a process other than the main one of a multi-process run: the main one reports
        return 0
    out = summary["outputs"]
    base, best, kept = summary.get("baseline") or {}, summary.get("best") or {}, summary["kept_model"]
    # the figures of the model that was saved: the best evaluation's (load_best_model_at_end) or the last
    final = best if best and best["step"] == kept["step"] and kept["why"] != "last step" else summary["final"]
    metric = kept["metric"]
    if final is best:
        note = f"the model of step {kept['step']}: best {metric} {best[metric]:.4g}"
    elif best.get(metric) is not None:
        note = f"the last step; best {metric} {best[metric]:.4g} at step {best['step']}"
    else:
        note = "the last step"
    if "eval_rewards/accuracies" in base and "eval_rewards/accuracies" in final:
        print(f"held-out preference accuracy: {base['eval_rewards/accuracies']:.1%} -> "
              f"{final['eval_rewards/accuracies']:.1%} ({note})")
    if "eval_perplexity" in base and "eval_perplexity" in final:
        print(f"held-out perplexity: {base['eval_perplexity']:.3g} -> {final['eval_perplexity']:.3g} ({note})")
    print(f"model and tokenizer: {out['model']}")
    print(f"metrics and curves:  {out['metrics']} (training_metrics.csv, training_curves.png, summary.json, "
          "log_history.json)")
    return 0


def _end_process_group() -> None:
    """After a run that ended well, every collective is done: the process group goes now, while the interpreter
    is whole. Left to the interpreter's exit, gloo's worker threads can abort a process that finished
    ("terminate called without an active exception", SIGABRT: pytorch/pytorch#190489), and its launcher then
    reports the run failed (seen with 4 FSDP2 processes on CPU). Not after an error: another process may still
    be in a collective, which the destruction would hang (as torchtitan found)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
