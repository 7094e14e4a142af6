"""Rewards: what scores a sampled completion, for `preftune sample` and `preftune eval`.

    score = load_reward("my_rewards.py:sentiment")      # or "pkg.module:fn", or a reward model id/folder
    score(prompts, completions) -> list[float]

A function is called with the prompts (each the prompt's last user turn as text) and the completions
(text), and must return one finite number per completion. A reward model is a transformers
sequence-classification model (one output): each prompt and completion are rendered through its
own chat template (as a user and an assistant turn) when it has one, else joined as text, and its
output is the score. Every failure is one line naming the reward.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from pathlib import Path

import torch

from preftune.errors import ConfigError, ModelError


def _load_function(spec: str):
    module_name, _, fn_name = spec.rpartition(":")
    try:
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
    except Exception as e:  # noqa: BLE001 - the user's module: any error while importing it is theirs
        raise ConfigError(f"reward: importing '{module_name}' failed: {type(e).__name__}: {e}") from None
    fn = vars(module).get(fn_name)
    if not callable(fn):
        raise ConfigError(f"reward: '{module_name}' has no function '{fn_name}'")
    return fn


def _reward_model(name: str, batch_size: int = 8):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
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


def load_reward(spec: str):
    """The reward `spec` names, as a checked function (prompts, completions) -> list[float]."""
    looks_like_function = ":" in spec and not Path(spec).expanduser().exists()
    fn = _load_function(spec) if looks_like_function else _reward_model(spec)

    def checked(prompts: list[str], completions: list[str]) -> list[float]:
        try:
            scores = fn(prompts, completions)
        except Exception as e:  # noqa: BLE001 - the user's function: whatever it raises is reported as its own
            raise ConfigError(f"reward {spec} raised {type(e).__name__}: {e}") from None
        try:
            scores = [float(s) for s in scores]
        except (TypeError, ValueError):
            raise ConfigError(f"reward {spec} must return one number per completion; got {scores!r:.80}") from None
        if len(scores) != len(completions):
            raise ConfigError(f"reward {spec} returned {len(scores)} scores for {len(completions)} completions; "
                              "return one per completion")
        bad = [s for s in scores if not math.isfinite(s)]
        if bad:
            raise ConfigError(f"reward {spec} returned a non-finite score ({bad[0]}); return finite numbers")
        return scores

    return checked
