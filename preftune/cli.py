"""The `preftune` command: dispatches to one module of `preftune.commands` per subcommand and
turns every user-facing error into one line and a non-zero exit.

    preftune train [CONFIG.yaml] [--key value ...]       # align a model (no arguments: the quick embedded demo)
    preftune demo [--output_dir DIR] [--sweep B1,B2]     # the whole flow, sft -> sample -> dpo -> eval, on CPU
    preftune demo --vision                               # DPO on a tiny vision-language model, images in the pairs
    preftune sft [CONFIG.yaml] [--key value ...]         # supervised fine-tuning on completions
    preftune rm [CONFIG.yaml] [--key value ...]          # a reward model trained on preference pairs
    preftune inspect DATA [--model M] [--json] [--plot PNG] [--key value ...]   # look at the data first
    preftune export MODEL [--dtype bf16|fp16|int8] [--out DIR] [--data HELDOUT]  # for deployment
    preftune iterate [CONFIG.yaml] [--key value ...]     # iterative DPO: rounds of sample, score, pair, train, eval
    preftune label FILE [--port 8765] [--annotator NAME] [--export PAIRS]        # label pairs by hand

`preftune <command> --help` prints the command's usage and the config keys it reads (`COMMAND_GROUPS`),
without importing torch. Any command takes --debug (or PREFTUNE_DEBUG=1 in the environment): errors
with their full traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback

from preftune.config import GROUPS, command_help, wants_help
from preftune.errors import PreftuneError

COMMANDS = {  # name -> what it does; the code is preftune/commands/<name>.py
    "train": "align a model with DPO (preftune train --help)",
    "sft": "supervised fine-tuning on completions, e.g. to make a reference (preftune sft --help)",
    "rm": "a reward model (Bradley-Terry) trained on preference pairs, for sample/eval --reward (preftune rm --help)",
    "sample": "completions from a model, scored by a reward, paired into preference data (preftune sample --help)",
    "eval": "models against their reference: pairs, or samples scored by a reward (preftune eval --help)",
    "iterate": "iterative DPO: rounds of sample, score, pair, DPO and eval from the current policy (preftune iterate --help)",
    "inspect": "statistics and rendered examples of a dataset (preftune inspect --help)",
    "export": "the model in bf16/fp16/int8 for deployment (preftune export --help)",
    "cache": "list or clear the tokenization and reference log-probs caches (preftune cache --help)",
    "label": "a local page to label preference pairs by hand (preftune label --help)",
    "demo": "the whole flow (sft, sample, dpo, eval) on a small model, before and after; --vision: DPO on a tiny "
            "vision-language model (preftune demo --help)",
}
# The config groups (config.GROUPS) each command reads: its --help lists their keys. Every command
# accepts every key (a train YAML loads for sample, eval, inspect), so this focuses the help only.
COMMAND_GROUPS = {
    "train": tuple(GROUPS),
    "sft": tuple(g for g in GROUPS if g not in ("reference", "objective")),
    "rm": tuple(g for g in GROUPS if g != "reference"),
    "sample": ("model", "data", "tokenization", "batches", "sampling", "run"),
    "eval": ("model", "reference", "objective", "data", "tokenization", "batches", "precision", "sampling", "health",
             "run"),
    "iterate": tuple(GROUPS),  # sample's, train's and eval's keys
    "inspect": ("model", "data", "tokenization"),
    "export": ("model", "reference", "data", "tokenization", "batches"),
    "cache": ("caches",),
    "label": (),  # its own options only (--config FILE holds them too: config.load_options)
    "demo": (),
}


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # --debug anywhere (or PREFTUNE_DEBUG=1): errors come with their full traceback
    debug = "--debug" in argv or os.environ.get("PREFTUNE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if argv and argv[0] in ("-V", "--version"):
        import preftune

        print(f"preftune {preftune.__version__}")
        return 0
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: preftune {{{','.join(COMMANDS)}}} ...\n\n"
              + "\n".join(f"  {name:9s} {what}" for name, what in COMMANDS.items())
              + "\n\n  --debug   with any command (or PREFTUNE_DEBUG=1): errors with their full traceback"
              + "\n  -V, --version  the version of preftune")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"preftune: error: unknown command '{command}'; available: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"preftune.commands.{command}")  # light: commands import torch when they run
        if wants_help(rest):  # before logging is set up (it imports transformers): --help answers at once
            print(command_help(command, module.USAGE, COMMAND_GROUPS[command]))
            return 0
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _setup_logging()
        return module.main(rest)
    except PreftuneError as e:  # a stop by SIGINT/SIGTERM (runtime.Stopped) carries its own status: 130, 143
        if debug:
            traceback.print_exc()
        code = getattr(e, "exit_code", 2)
        print(f"preftune: {'error: ' if code == 2 else ''}{e}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (preftune inspect ... --json | head): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0
    except OSError as e:  # a write that failed where no save guards it (a full disk, permissions): one line
        if debug:
            raise
        where = f" '{e.filename}'" if e.filename else ""
        print(f"preftune: error: {e.strerror or type(e).__name__}{where}; free space or fix the permissions there "
              "(--debug shows the traceback)", file=sys.stderr)
        return 1
    except Exception as e:  # not anticipated: still one line, the traceback on request
        if debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"preftune: error: unexpected {type(e).__name__}{': ' + first if first else ''} (in preftune "
              f"{command}); run it again with --debug for the traceback, and please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
