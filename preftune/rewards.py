"""Rewards: what scores a sampled completion, for `preftune sample` and `preftune eval`.

    score = load_reward("my_rewards.py:sentiment")      # or "pkg.module:fn", or a reward model id/folder
    score(prompts, completions) -> list[float]

A function is called with the prompts (each the prompt's last user turn as text) and the completions
(text), and must return a list (or array, tensor) of one finite number per completion. Its file is
imported as a library (sys.argv holds only its name while it loads). A reward model is a transformers
sequence-classification model (one output): each prompt and completion are rendered through its
own chat template (as a user and an assistant turn) when it has one, else joined as text, and its
output is the score; one that `preftune rm` wrote is given the token ids its training would give the
pair (its run's rendering: docs/reward-model.md), and its LoRA adapter folder (save_adapter_only) is
merged into its base first. Every failure is one line naming the reward.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import math
import numbers
import sys
from pathlib import Path

import numpy as np
import torch

from preftune.errors import ConfigError, ModelError
from preftune.saved import adapter_base, is_adapter, is_reward_model, merged_adapter, model_run_config


def _load_function(spec: str):
    module_name, _, fn_name = spec.rpartition(":")
    # The user's module is imported as a library, not run as a script: it sees no preftune arguments in
    # sys.argv (a module that parses them at import would read preftune's own), and whatever it writes to
    # stderr while exiting (argparse's usage) is kept for the one error line, not printed as if preftune's.
    argv, stderr = sys.argv, io.StringIO()
    sys.argv = [module_name]
    try:
        with contextlib.redirect_stderr(stderr):
            if module_name.endswith(".py"):
                path = Path(module_name).expanduser()
                if not path.is_file():
                    raise ConfigError(f"reward: '{module_name}' does not exist (expected path/to/file.py:function)")
                module_spec = importlib.util.spec_from_file_location(path.stem, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules.setdefault(path.stem, module)
                module_spec.loader.exec_module(module)
            else:
                module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except SystemExit as e:
        said = [line.strip() for line in stderr.getvalue().splitlines() if line.strip()]
        raise ConfigError(f"reward: importing '{module_name}' exited (SystemExit {e.code})"
                          + (f" saying '{said[-1]}'" if said else "") + ": a reward file must not parse the command "
                          "line or exit when imported; put that under `if __name__ == \"__main__\":`") from None
    except Exception as e:  # noqa: BLE001 - the user's module: any error while importing it is theirs
        raise ConfigError(f"reward: importing '{module_name}' failed: {type(e).__name__}: {e}") from None
    finally:
        sys.argv = argv
    sys.stderr.write(stderr.getvalue())  # what a module that imported fine printed is its own
    fn = vars(module).get(fn_name)
    if not callable(fn):
        raise ConfigError(f"reward: '{module_name}' has no function '{fn_name}'")
    return fn


def _reward_model(name: str, batch_size: int = 8):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = Path(name).expanduser()
    run_cfg = model_run_config(name)  # the run that wrote it, if preftune's: its base, its rendering
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        if is_adapter(folder):  # a LoRA reward model's adapter (save_adapter_only): merged into its base
            if not is_reward_model(folder):
                raise ModelError(f"reward: '{name}' is the LoRA adapter of a causal LM, not of a reward model "
                                 "(peft task_type SEQ_CLS, as preftune rm writes); give a reward model")
            model = merged_adapter(folder, *adapter_base(folder, run_cfg))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(name).eval()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"reward: cannot load the reward model '{name}': {first}. Check the id or folder (and "
                         "network access or HF_HUB_OFFLINE), or give module:function") from None
    if model.config.num_labels != 1:
        raise ModelError(f"reward: '{name}' has {model.config.num_labels} outputs; a reward model has one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    if run_cfg is not None and run_cfg.stage == "rm":
        return _trained_reward_model(model, tokenizer, run_cfg, folder, batch_size)

    @torch.no_grad()
    def score(prompts: list[str], completions: list[str]) -> list[float]:
        if tokenizer.chat_template:
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                                   tokenize=False) for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True)
            out += model(**enc).logits[:, 0].float().tolist()
        return out

    return score


def _trained_reward_model(model, tokenizer, run_cfg, folder: Path, batch_size: int):
    """A reward model `preftune rm` wrote: each (prompt, completion) is scored on the token ids its training
    would give the pair, through preftune's own pair tokenization with the run's template, cutoff_len and
    chat-template arguments (plain text, as sample's and label's pairs write prompts; as a conversation
    where the run's data were conversations only), so that the reward is read at the position it was
    trained at (the last non-pad token, `reward_model.RewardModule`)."""
    from preftune.batching import collate_chosen
    from preftune.data import PreferencePair
    from preftune.tokenization import TokenizeReport, setup_rendering, tokenize_pair

    rendering = setup_rendering(tokenizer, run_cfg.template, run_cfg.chat_template_kwargs)
    conversational = _trained_on_conversations(folder)

    @torch.no_grad()
    def score(prompts: list[str], completions: list[str]) -> list[float]:
        items = []
        for prompt, completion in zip(prompts, completions):
            pair = PreferencePair(prompt=prompt, chosen=completion, rejected=completion, where="reward",
                                  conversational=conversational)
            item = tokenize_pair(tokenizer, pair, run_cfg.cutoff_len, rendering, TokenizeReport(),
                                 run_cfg.truncation_mode, run_cfg.max_prompt_length)
            if item is None:
                raise ConfigError(f"reward {folder}: a completion does not fit the reward model's cutoff_len "
                                  f"({run_cfg.cutoff_len}) beside its prompt; shorten the prompts")
            items.append(item)
        out = []
        for i in range(0, len(items), batch_size):
            batch = collate_chosen(items[i:i + batch_size], tokenizer.pad_token_id)  # (b, T), right-padded
            out += model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float().tolist()
        return out

    return score


def _trained_on_conversations(folder: Path) -> bool:
    """Whether the reward model's training data were conversations only (messages, which a chat template
    renders even with template unset), else plain text: the training examples per kind its run recorded
    (summary.json's data.kinds). A folder written before that key existed is read from the rendering's
    description, whose `why` names conversational data (and plain strings where there were some)."""
    import json

    try:
        data = json.loads((folder / "rm_metrics" / "summary.json").read_text(encoding="utf-8"))["data"]
        kinds = data.get("kinds")
        if isinstance(kinds, dict):
            return bool(kinds.get("conversational")) and not kinds.get("plain")
        why = data["rendering"].get("why", "")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return "conversational data" in why and "plain-string" not in why


def _numbers(scores, spec: str) -> list[float]:
    """A reward's return value as floats: a list (or tuple, numpy array, torch tensor) of real numbers.
    Anything else is refused, never read element by element: a string of digits would be as many scores
    as it has characters."""
    if isinstance(scores, (torch.Tensor, np.ndarray)):
        scores = scores.tolist()
    if not isinstance(scores, (list, tuple)):
        raise ConfigError(f"reward {spec} returned {_shown(scores)}; return a list with one number per completion")
    for i, s in enumerate(scores):
        if isinstance(s, (torch.Tensor, np.ndarray)) and s.ndim == 0:
            continue
        if not isinstance(s, numbers.Real):
            raise ConfigError(f"reward {spec} returned a list whose item {i} is {_shown(s)}; return a list with "
                              "one number per completion")
    return [float(s) for s in scores]


def _shown(value) -> str:
    return f"a {type(value).__name__} ({value!r:.40})"


def load_reward(spec: str):
    """The reward `spec` names, as a checked function (prompts, completions) -> list[float]."""
    looks_like_function = ":" in spec and not Path(spec).expanduser().exists()
    fn = _load_function(spec) if looks_like_function else _reward_model(spec)

    def checked(prompts: list[str], completions: list[str]) -> list[float]:
        try:
            scores = fn(prompts, completions)
        except Exception as e:  # noqa: BLE001 - the user's function: whatever it raises is reported as its own
            raise ConfigError(f"reward {spec} raised {type(e).__name__}: {e}") from None
        scores = _numbers(scores, spec)
        if len(scores) != len(completions):
            raise ConfigError(f"reward {spec} returned {len(scores)} scores for {len(completions)} completions; "
                              "return one per completion")
        bad = [s for s in scores if not math.isfinite(s)]
        if bad:
            raise ConfigError(f"reward {spec} returned a non-finite score ({bad[0]}); return finite numbers")
        return scores

    return checked
