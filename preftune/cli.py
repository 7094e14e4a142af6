"""The `preftune` command.

    preftune train                       # the embedded demo: tiny model, built-in pairs, CPU, minutes
    preftune train CONFIG.yaml           # LLaMA-Factory style or preftune YAML
    preftune train CONFIG.yaml --pref_beta 0.2 --output_dir out   # any key overridden
    preftune inspect DATA [--model M] [--cutoff_len N] [--json] [--plot PNG]   # look at the data first
    preftune export MODEL --dtype bf16|fp16|int8 [--out DIR] [--data HELDOUT]  # for deployment
"""

from __future__ import annotations

import logging
import os
import sys

from preftune.errors import PreftuneError

USAGE = """usage: preftune train [CONFIG.yaml] [--key value ...]

Train a causal LM on preference pairs with DPO. Without CONFIG and without --model_name_or_path,
runs the embedded demo (a tiny local model and a built-in pair set, made locally).
Any config key can be given as --key value, overriding the file.

Config keys:
"""


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[preftune] %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "datasets", "httpx", "urllib3", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # transformers imports torchao (the int8 export's library) whenever it is installed; on CPU its
    # optional CUDA kernels fail to load with warnings that are noise in every command; likewise
    # bitsandbytes' CPU backend (imported by peft whenever bitsandbytes is installed) about a kernel
    # package it would fetch from the hub
    for noisy in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading/saving bars would drown the training log


def cmd_train(args: list[str]) -> int:
    from preftune.config import help_text, load_config, parse_overrides

    if any(a in ("-h", "--help") for a in args):
        print(USAGE + help_text())
        return 0
    config_path = args[0] if args and not args[0].startswith("--") else None
    overrides = args[1:] if config_path else args
    from preftune.train import train  # heavy imports after argument checks

    over = parse_overrides(overrides)
    if config_path is None and not {"model_name_or_path", "model_name", "model"} & set(over):
        from preftune.demo import demo_config

        logging.getLogger("preftune").info("no config given: running the embedded demo (tiny local model, "
                                           "built-in preference pairs)")
        cfg = demo_config(over)
    else:
        cfg = load_config(config_path, overrides)
    summary = train(cfg)
    out = summary["outputs"]
    base, final, best = summary.get("baseline") or {}, summary["final"], summary.get("best") or {}
    if "eval_rewards/accuracies" in base and "eval_rewards/accuracies" in final:
        print(f"held-out preference accuracy: {base['eval_rewards/accuracies']:.1%} -> "
              f"{final['eval_rewards/accuracies']:.1%} (best eval loss {best.get('eval_loss', float('nan')):.4f})")
    print(f"model and tokenizer: {out['model']}")
    print(f"metrics and curves:  {out['metrics']} (training_metrics.csv, training_curves.png, summary.json, "
          "log_history.json)")
    return 0


def cmd_inspect(args: list[str]) -> int:
    from preftune.inspection import main as inspect_main

    return inspect_main(args)


def cmd_export(args: list[str]) -> int:
    from preftune.export import main as export_main

    return export_main(args)


COMMANDS = {"train": cmd_train, "inspect": cmd_inspect, "export": cmd_export}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: preftune {train,inspect,export} ...\n\n  train     align a model with DPO (preftune train --help)\n"
              "  inspect   statistics and rendered examples of a dataset (preftune inspect --help)\n"
              "  export    the model in bf16/fp16/int8 for deployment (preftune export --help)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"preftune: error: unknown command '{command}'; available: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _setup_logging()
    try:
        return COMMANDS[command](rest)
    except PreftuneError as e:
        print(f"preftune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
