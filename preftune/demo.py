"""The embedded demos: tiny models and tasks made locally, no download.

`preftune train` with no config calls `demo_config()`: it writes a built-in pair set (advice
prompts; the chosen answer is constructive, the rejected one dismissive, built from separate
phrase banks so the preference generalises to held-out pairs), trains a small BPE tokenizer
with a ChatML chat template on it, saves a randomly initialised Qwen2-architecture model, and
returns the config that trains on them through exactly the path a user's run takes. Its model
learns the preference, not language.

`preftune demo` (preftune/commands/demo.py) runs the whole flow on a model that first learns
language: the movie reviews below (`write_review_data`) to fine-tune it on, and a reward people
can read, `sentiment` (`reward: preftune.demo:sentiment`); its SFT models are cached in
`sft_cache_dir()`, which `preftune cache` lists and clears.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from preftune.config import TrainConfig, from_dict
from preftune.files import cache_root
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
    # the pairs are plain strings, which are raw text unless `template` is set: the demo trains through
    # its tokenizer's ChatML template, as a LLaMA-Factory config with `template: qwen` would
    "template": "chatml",
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
    "load_best_model_at_end": True,  # the eval loss bottoms out before the last step: keep that model
}


def demo_config(overrides: dict | None = None) -> TrainConfig:
    """The demo's config; `overrides` (from the command line) win over its settings."""
    overrides = dict(overrides or {})
    output_dir = Path(overrides.get("output_dir", "output"))
    train_file, val_file, model_dir = write_demo_assets(output_dir / "demo")
    raw = {**DEMO_SETTINGS, "model_name_or_path": str(model_dir), "dataset": str(train_file),
           "eval_dataset": str(val_file), "output_dir": str(output_dir), **overrides}
    return from_dict(raw, "embedded demo")


# --- the review demo (`preftune demo`): a corpus the tiny model learns, and a reward people can read ----------
# Short movie reviews from templates and word banks. Each review is positive, negative or mixed, in
# equal shares and independent of the title (which reviews never repeat), so the SFT model writes all three and a reward that
# likes positive words has something to choose between. Sentiment words come only from POSITIVE and
# NEGATIVE, so `sentiment` reads them back exactly.
TITLE_WORDS = (["Silent", "Last", "Golden", "Hidden", "Broken", "Distant", "Crimson", "Frozen", "Midnight", "Lost",
                "Wild", "Secret", "Burning", "Quiet", "Empty", "Electric", "Paper", "Iron", "Glass", "Velvet",
                "Northern", "Little", "Second", "Falling", "Hollow", "Painted", "Sleeping", "Restless", "Winding",
                "Borrowed"],
               ["River", "Garden", "Kingdom", "Letter", "Island", "Promise", "Harbor", "Mountain", "Machine",
                "Summer", "Station", "Mirror", "Forest", "Voyage", "Orchard", "Lantern", "Empire", "Circus",
                "Bridge", "Winter", "Signal", "Daughter", "Engine", "Country", "Desert", "Tower", "Valley", "Market",
                "Stranger", "Road"])
ASPECTS = ["acting", "plot", "music", "script", "ending", "pacing", "dialogue", "cast", "soundtrack", "camera work",
           "story", "humor"]
POSITIVE_ADJ = ["wonderful", "brilliant", "superb", "charming", "moving", "delightful", "gripping", "beautiful",
                "clever", "touching"]
NEGATIVE_ADJ = ["dull", "boring", "awful", "clumsy", "tedious", "weak", "messy", "flat", "lifeless", "predictable"]
POSITIVE = frozenset(POSITIVE_ADJ + ["loved", "enjoyed", "adored", "recommended", "masterpiece", "joy"])
NEGATIVE = frozenset(NEGATIVE_ADJ + ["hated", "disliked", "regretted", "avoid", "waste", "mess"])
POSITIVE_SENTENCES = ["The {aspect} is {pos}.", "It is a {pos} film.", "I loved the {aspect}.",
                      "I enjoyed every minute of it.", "The {aspect} is {pos} and the {aspect2} is {pos2}.",
                      "Highly recommended.", "A small masterpiece.", "What a joy to watch."]
NEGATIVE_SENTENCES = ["The {aspect} is {neg}.", "It is a {neg} film.", "I hated the {aspect}.",
                      "I regretted every minute of it.", "The {aspect} is {neg} and the {aspect2} is {neg2}.",
                      "Avoid this one.", "A waste of two hours.", "What a mess."]
MIXED_SENTENCES = ["The {aspect} is {pos}, but the {aspect2} is {neg}.", "The {aspect} is {neg}, but the {aspect2} is {pos}.",
                   "I loved the {aspect} and disliked the {aspect2}.", "It is {pos} at first and {neg} at the end."]
NEUTRAL_SENTENCES = ["I saw it with my sister.", "It runs about two hours.", "It is set in a small town.",
                     "The {aspect} gets most of the attention.", "I watched it on a rainy Sunday.",
                     "The film follows a family over one summer."]


def movie_titles(seed: int) -> list[str]:
    """Every title of the word banks ("The Silent River"), in an order shuffled by `seed`."""
    titles = [f"The {a} {b}" for a in TITLE_WORDS[0] for b in TITLE_WORDS[1]]
    random.Random(seed).shuffle(titles)
    return titles


def _sentence(rng: random.Random, templates: list[str]) -> str:
    aspect, aspect2 = rng.sample(ASPECTS, 2)
    pos, pos2 = rng.sample(POSITIVE_ADJ, 2)
    neg, neg2 = rng.sample(NEGATIVE_ADJ, 2)
    return rng.choice(templates).format(aspect=aspect, aspect2=aspect2, pos=pos, pos2=pos2, neg=neg,
                                        neg2=neg2)


def make_review(rng: random.Random) -> tuple[str, str]:
    """(sentiment, review): 1 to 3 sentences; a positive review has only positive and neutral
    sentences, a negative one only negative and neutral ones, a mixed one a mixed sentence."""
    sentiment = rng.choice(["positive", "negative", "mixed"])
    own = {"positive": POSITIVE_SENTENCES, "negative": NEGATIVE_SENTENCES, "mixed": MIXED_SENTENCES}[sentiment]
    n = rng.randint(1, 3)
    sentences = [_sentence(rng, own)]
    sentences += [_sentence(rng, own if rng.random() < 0.5 else NEUTRAL_SENTENCES) for _ in range(n - 1)]
    rng.shuffle(sentences)
    return sentiment, " ".join(sentences)


def review_prompt(title: str) -> str:
    return f"Review of {title}:"


def make_reviews(titles: list[str], n: int, seed: int) -> list[dict]:
    """`n` SFT records {"prompt", "completion", "sentiment"} about `titles` (each title several times)."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        title = titles[i % len(titles)]
        sentiment, review = make_review(rng)
        records.append({"prompt": review_prompt(title), "completion": review, "sentiment": sentiment})
    return records


def sentiment_score(text: str) -> float:
    """(positive words - negative words) / (positive + negative words), in [-1, 1]; 0 without any.
    A ratio, not a count: saying "brilliant" five times earns no more than saying it once."""
    words = re.findall(r"[a-z]+", text.lower())
    pos = sum(w in POSITIVE for w in words)
    neg = sum(w in NEGATIVE for w in words)
    return (pos - neg) / (pos + neg) if pos + neg else 0.0


def sentiment(prompts: list[str], completions: list[str]) -> list[float]:
    """The demo's reward, `reward: preftune.demo:sentiment`: the sentiment score of each completion."""
    return [sentiment_score(c) for c in completions]


def write_review_data(folder: Path, seed: int, reviews: int, prompts: int, eval_prompts: int) -> dict[str, Path]:
    """The review demo's data under `folder`, from `seed` alone; returns the paths by name:
    reviews.jsonl (`reviews` SFT records), reviews_val.jsonl (held-out reviews: the SFT run's
    validation set), prompts.jsonl (`prompts` prompts to sample DPO pairs from) and
    eval_prompts.jsonl (`eval_prompts` prompts to evaluate on). The three title sets are disjoint,
    so sampling and evaluation ask about films the SFT model never read a review of."""
    titles = movie_titles(seed)
    eval_titles, sample_titles = titles[:eval_prompts], titles[eval_prompts:eval_prompts + prompts]
    sft_titles = titles[eval_prompts + prompts:]
    n_val = min(200, max(20, reviews // 10))
    records = {"reviews": make_reviews(sft_titles, reviews, seed),
               "reviews_val": make_reviews(eval_titles + sample_titles, n_val, seed + 1),
               "prompts": [{"prompt": review_prompt(t)} for t in sample_titles],
               "eval_prompts": [{"prompt": review_prompt(t)} for t in eval_titles]}
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in records.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return paths


def _grammar() -> re.Pattern:
    """Every sentence the review templates can make, with any adjective in any adjective's place
    (sentiment aside: "The plot is superb, but the music is superb." is still a sentence)."""
    aspect = "(?:" + "|".join(map(re.escape, ASPECTS)) + ")"
    adjective = "(?:" + "|".join(map(re.escape, POSITIVE_ADJ + NEGATIVE_ADJ)) + ")"
    alternatives = []
    for t in POSITIVE_SENTENCES + NEGATIVE_SENTENCES + MIXED_SENTENCES + NEUTRAL_SENTENCES:
        pattern = re.escape(t)
        for name, words in (("aspect", aspect), ("aspect2", aspect), ("pos", adjective), ("pos2", adjective),
                            ("neg", adjective), ("neg2", adjective)):
            pattern = pattern.replace(re.escape("{" + name + "}"), words)
        alternatives.append(pattern)
    return re.compile("|".join(alternatives))


GRAMMAR = _grammar()


def well_formed(text: str) -> bool:
    """Whether `text` is one or more sentences of the review templates (a readability check: the
    words of a sentence may be well chosen and still not make a sentence)."""
    sentences = re.split(r"(?<=\.)\s+", text.strip())
    return bool(text.strip()) and all(GRAMMAR.fullmatch(s) for s in sentences)


# --- where `preftune demo` keeps its SFT models (commands/demo.py trains them; `preftune cache` lists and clears them)

SFT_MARKER = "demo_sft.json"  # written last into a cached SFT model's folder: the folder is complete


def sft_cache_dir(cache_dir: str = "") -> Path:
    """The folder of the demo's SFT models: --cache_dir, else <cache root>/demo ($XDG_CACHE_HOME/preftune/demo)."""
    return Path(cache_dir).expanduser() if cache_dir else cache_root() / "demo"


def cached_sft_models(root: Path) -> list[Path]:
    """The SFT model folders the demo made in `root` (`preftune cache` lists and clears them): named by
    their 16-hex-digit key, holding the marker or (a killed run's) base_model/; nothing else in root."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and len(p.name) == 16
                  and all(c in "0123456789abcdef" for c in p.name)
                  and ((p / SFT_MARKER).is_file() or (p / "base_model").is_dir()))
