"""The embedded default run: a tiny model and a preference task made locally, no download.

`preftune train` with no config calls `demo_config()`: it writes a built-in pair set (advice
prompts; the chosen answer is constructive, the rejected one dismissive, built from separate
phrase banks so the preference generalises to held-out pairs), trains a small BPE tokenizer
with a ChatML chat template on it, saves a randomly initialised Qwen2-architecture model, and
returns the config that trains on them through exactly the path a user's run takes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from preftune.config import TrainConfig, from_dict
from preftune.tokenization import CHATML

TOPICS = ["python", "chess", "guitar", "cooking", "running", "painting", "algebra", "spanish", "writing", "swimming",
          "drawing", "piano", "statistics", "gardening", "photography", "baking", "physics", "yoga", "history",
          "chemistry", "knitting", "climbing", "poetry", "sketching", "typing", "rust", "french", "singing",
          "budgeting", "sailing", "geometry", "cycling", "dancing", "juggling", "surfing", "calculus", "pottery",
          "welding", "skiing", "tennis"]
ASKS = ["How should I learn {t}?", "Any tips for getting better at {t}?", "I want to start {t}. Where do I begin?",
        "What is a good way to practice {t}?", "Can you help me improve at {t}?", "How do I get started with {t}?"]
GOOD_OPEN = ["Sure!", "Great question.", "Happy to help.", "Good idea!", "Of course."]
GOOD_BODY = ["Start with the basics of {t} and practice a little every day.",
             "Set a small goal for {t} each week and track your progress.",
             "Find a patient teacher for {t} and ask for honest feedback.",
             "Break {t} into small steps and review what you learned.",
             "Practice {t} regularly, rest well, and be kind to yourself.",
             "Read a beginner guide on {t}, then try simple exercises."]
GOOD_CLOSE = ["You will improve steadily.", "Enjoy the process!", "Good luck, you can do it.",
              "Small steps add up.", "Keep going and stay curious."]
BAD_OPEN = ["Whatever.", "Meh.", "Ugh.", "No idea.", "Who cares."]
BAD_BODY = ["Just copy someone else at {t} and hope it works.", "Don't bother with {t}, it is a waste of time.",
            "Skip the basics of {t}, nobody needs them.", "Cheat at {t} if you can get away with it.",
            "Give up on {t} when it gets hard.", "Just guess at {t} and never practice."]
BAD_CLOSE = ["Not my problem.", "Figure it out yourself.", "That is all.", "Stop asking.", "Good luck, I guess."]



def _good(rng, t):
    return " ".join([rng.choice(GOOD_OPEN), rng.choice(GOOD_BODY).format(t=t), rng.choice(GOOD_CLOSE)])


def make_pairs(n: int, seed: int) -> list[dict]:
    """Three pairs in four prefer a constructive answer over a dismissive one (style); the fourth
    prefers an on-topic answer over an equally polite one about another topic (relevance), which
    the model can only get right by reading the prompt."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        t = rng.choice(TOPICS)
        if i % 4:
            rejected = " ".join([rng.choice(BAD_OPEN), rng.choice(BAD_BODY).format(t=t), rng.choice(BAD_CLOSE)])
        else:
            rejected = _good(rng, rng.choice([o for o in TOPICS if o != t]))
        pairs.append({"prompt": rng.choice(ASKS).format(t=t), "chosen": _good(rng, t), "rejected": rejected})
    return pairs


def build_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts`, ChatML special tokens, no BOS (like Qwen2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML)


def build_model(vocab_size: int, seed: int, hidden: int = 64, layers: int = 2):
    """A randomly initialised Qwen2-architecture causal LM."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True)
    return Qwen2ForCausalLM(config)


def write_demo_assets(folder: Path, n_train: int = 800, n_val: int = 200, seed: int = 0) -> tuple[Path, Path, Path]:
    """Writes data/{train,val}.jsonl and base_model/ under `folder`; returns their paths."""
    data_dir, model_dir = folder / "data", folder / "base_model"
    data_dir.mkdir(parents=True, exist_ok=True)
    train, val = make_pairs(n_train, seed), make_pairs(n_val, seed + 1)
    for name, pairs in (("train", train), ("val", val)):
        with open(data_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(p) + "\n" for p in pairs)
    tokenizer = build_tokenizer([p[k] for p in train for k in ("prompt", "chosen", "rejected")])
    model = build_model(len(tokenizer), seed)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return data_dir / "train.jsonl", data_dir / "val.jsonl", model_dir


DEMO_SETTINGS = {
    "pref_beta": 0.1,
    "pref_loss": "sigmoid",
    "learning_rate": 1e-3,
    "per_device_train_batch_size": 16,
    "num_train_epochs": 3,
    "warmup_ratio": 0.1,
    "lr_scheduler_type": "cosine",
    "logging_steps": 5,
    "eval_steps": 10,
    "cutoff_len": 128,
    "torch_dtype": "float32",
}


def demo_config(overrides: dict | None = None) -> TrainConfig:
    """The demo's config; `overrides` (from the command line) win over its settings."""
    overrides = dict(overrides or {})
    output_dir = Path(overrides.get("output_dir", "output"))
    train_file, val_file, model_dir = write_demo_assets(output_dir / "demo")
    raw = {**DEMO_SETTINGS, "model_name_or_path": str(model_dir), "dataset": str(train_file),
           "eval_dataset": str(val_file), "output_dir": str(output_dir), **overrides}
    return from_dict(raw, "embedded demo")
