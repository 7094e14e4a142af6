"""Loading the data a run needs: dataset entries -> examples, checked, split into train and validation.

    train, val, report = load_pairs(cfg)             # training: dataset, eval_dataset or val_size
    sets = load_eval_sets(cfg, report)               # the named evaluation sets beyond the validation set
    pairs = read_dataset("a.jsonl,my_pairs", "data") # any comma list of entries (pairs; KTO/SFT on request)
    prompts = read_prompts("prompts.jsonl", "data")  # prompts to sample from (preftune sample, eval)

A dataset entry is a name in `<dataset_dir>/dataset_info.json` (registry.py), a file (readers.py),
a `datasets` folder (`:split`), or a hub id (`owner/name:split`). `max_samples` keeps the first
records of each entry; `mix_strategy` mixes the entries of a comma list (`mix`; interleave_under
leaves examples out, said in the log); `default_system` fills in missing system prompts; `shuffle`
shuffles the training examples with `seed` before `val_size` holds some out; chosen == rejected
fails, or is skipped and counted with drop_invalid_pairs. Nothing is dropped silently: skips are
counted in `DataReport`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from preftune.data.images import ImageOptions, image_options
from preftune.data.readers import read_hf, read_records
from preftune.data.records import PreferencePair, UnpairedExample, to_examples
from preftune.data.registry import entry_records, read_info, split_name
from preftune.errors import DataError

log = logging.getLogger("preftune")


@dataclass
class DataReport:
    """Counts for summary.json and the log: nothing is dropped without being counted here."""
    read: int = 0
    skipped_identical: int = 0  # chosen == rejected, skipped with drop_invalid_pairs
    train: int = 0
    eval: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    eval_sets: dict[str, int] = field(default_factory=dict)  # named evaluation sets beyond the validation set


def _read_entry(name: str, dataset_dir: Path, columns: dict[str, str] | None, max_samples: int | None,
                sft: bool = False, prompts: bool = False, key: str = "dataset",
                images: ImageOptions | None = None) -> list[PreferencePair | UnpairedExample]:
    def convert(records, fmt=None, base_dir=None):
        if not records:
            raise DataError(f"{key} '{name}': no records")
        return to_examples(records[:max_samples] if max_samples is not None else records, fmt,
                           None if fmt else columns, sft, prompts, base_dir, images)

    info_path, info = read_info(dataset_dir)
    if name in info:
        return convert(*entry_records(name, info[name], info_path, dataset_dir, sft))
    for candidate in (Path(name), dataset_dir / name):
        if candidate.is_file():  # relative image paths are the file's folder's
            return convert(read_records(candidate), base_dir=candidate.parent)
        if candidate.is_dir():
            return convert(read_hf(str(candidate), "train"))
    base, split = split_name(name)
    if Path(base).is_dir():
        return convert(read_hf(base, split))
    if "/" in base and not Path(base).suffix and not base.startswith((".", "/")):
        return convert(read_hf(base, split))  # a hub id
    known = f" (registered there: {', '.join(sorted(info))})" if info else f" (no {info_path} found)"
    raise DataError(f"{key} '{name}': not a name in {info_path}{known}, not a file or folder, "
                    "and not a hub id (owner/name)")


def mix(sources: list[list], strategy: str = "concat", probs: list[float] | None = None, seed: int = 42) -> list:
    """The examples of several dataset entries as one list, by LLaMA-Factory's mix_strategy
    (data/data_utils.py merge_dataset, which hands the run's seed to datasets.interleave_datasets;
    the same examples in the same order as that function gives):
    concat: one entry after the other. interleave_under: one example of each entry in turn, stopping
    when the shortest runs out (undersampling); interleave_over: in turn until the longest runs out,
    the shorter ones starting again (oversampling); interleave_once: in turn, each example once,
    an entry that runs out skipped. With probs (one per entry, summing to 1) the entry of each next
    example is drawn at random instead of in turn: numpy's default_rng(seed), 1000 draws at a time."""
    if len(sources) == 1 or strategy == "concat":
        return [x for source in sources for x in source]
    lengths = [len(source) for source in sources]
    if probs is None:  # in turn: round i takes example i of each entry
        rounds = min(lengths) if strategy == "interleave_under" else max(lengths)
        return [source[i % len(source)] for i in range(rounds) for source in sources
                if strategy == "interleave_over" or i < len(source)]
    import numpy as np  # only for this draw: numpy's generator is what datasets draws with

    rng = np.random.default_rng(seed)
    taken, exhausted, out = [0] * len(sources), [False] * len(sources), []
    stop = any if strategy == "interleave_under" else all
    while True:
        for i in (int(i) for i in rng.choice(len(sources), size=1000, p=probs)):
            if stop(exhausted):
                return out
            if strategy == "interleave_once" and exhausted[i]:
                continue  # without replacement: an entry that ran out is skipped
            out.append(sources[i][taken[i] % lengths[i]])  # over/under: an entry that ran out starts again
            taken[i] += 1
            exhausted[i] = exhausted[i] or taken[i] >= lengths[i]


def read_examples(spec: str, dataset_dir: str, max_samples: int | None = None,
                  columns: dict[str, str] | None = None, sft: bool = False,
                  prompts: bool = False, key: str = "dataset", mix_strategy: str = "concat",
                  interleave_probs: list[float] | None = None, seed: int = 42,
                  default_system: str | None = None,
                  images: ImageOptions | None = None) -> list[PreferencePair | UnpairedExample]:
    """All examples (pairs and unpaired) of a comma list of dataset entries, in order (sft: SFT
    records too, as pairs whose chosen is the completion; prompts: prompt-only records too), or mixed
    by `mix_strategy`; `default_system` is the system prompt of those that have none. `key`: the
    config key that named them, for the errors. images: where relative image paths are read from and the
    pixel bounds (the config's media_dir, image_max_pixels, image_min_pixels; default: dataset_dir, none set)."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    images = images or ImageOptions(dataset_dir)
    sources = [_read_entry(name, Path(dataset_dir), columns, max_samples, sft, prompts, key, images)
               for name in names]
    mixed = mix(sources, mix_strategy, interleave_probs, seed)
    if mix_strategy != "concat" and len(sources) > 1:
        log.info("%s: %s of %s (%s examples) gives %d examples", key, mix_strategy, ", ".join(names),
                 " + ".join(str(len(s)) for s in sources), len(mixed))
    if default_system:  # LLaMA-Factory's `system or default_system`: an empty system prompt counts as none
        mixed = [e if e.system else dataclasses.replace(e, system=default_system) for e in mixed]
    return mixed


def read_dataset(spec: str, dataset_dir: str, max_samples: int | None = None,
                 columns: dict[str, str] | None = None, allow_unpaired: bool = False,
                 sft: bool = False, mix_strategy: str = "concat", interleave_probs: list[float] | None = None,
                 seed: int = 42, default_system: str | None = None,
                 images: ImageOptions | None = None) -> list[PreferencePair]:
    """All preference pairs of a comma list of dataset entries (mixed by mix_strategy); unpaired data
    is refused unless allow_unpaired (pref_loss: kto), which returns pairs and unpaired examples in
    order. sft: SFT records too (prompt/completion, messages, alpaca output, sharegpt), and preference
    pairs train on their chosen."""
    examples = read_examples(spec, dataset_dir, max_samples, columns, sft, mix_strategy=mix_strategy,
                             interleave_probs=interleave_probs, seed=seed, default_system=default_system,
                             images=images)
    unpaired = [e for e in examples if isinstance(e, UnpairedExample)]
    if unpaired and sft:
        raise DataError(f"{unpaired[0].where}: labelled (KTO-style) examples: SFT trains on every completion it is "
                        "given; drop the 'label' field (and the undesirable examples) for sft")
    if unpaired and not allow_unpaired:
        raise DataError(f"{unpaired[0].where}: unpaired (KTO-style prompt/completion/label) data needs pref_loss: kto "
                        f"({len(unpaired)} such records); the other losses need chosen/rejected pairs")
    return examples  # type: ignore[return-value]


def read_prompts(spec: str, dataset_dir: str, max_samples: int | None = None,
                 columns: dict[str, str] | None = None, key: str = "dataset",
                 default_system: str | None = None) -> list[PreferencePair]:
    """The prompts of a comma list of dataset entries, for sampling and evaluation: prompt-only records
    (`{"prompt": text or messages, "system": ...}`) or the prompt of any record training reads (pairs,
    SFT records, unpaired examples), as pairs with empty completions. `key`: the config key that named
    them (sample's dataset, eval's prompts), for the errors."""
    out = []
    for e in read_examples(spec, dataset_dir, max_samples, columns, sft=True, prompts=True, key=key,
                           default_system=default_system):
        if isinstance(e, UnpairedExample):
            e = PreferencePair(prompt=e.prompt, chosen="", rejected="", system=e.system, where=e.where,
                               messages=e.messages, conversational=e.conversational)
        else:
            e = dataclasses.replace(e, chosen="", rejected="", chosen_messages=None, rejected_messages=None)
        if not e.prompt.strip() and not e.messages:
            raise DataError(f"{e.where}: the prompt has no text to sample a completion for")
        out.append(e)
    return out


def source_of(where: str) -> str:
    """The file or dataset an example's `where` ("file:line", "file record i", "file row i") names."""
    return where.rsplit(":", 1)[0].split(" record ")[0].split(" row ")[0]


def check_pairs(pairs: list[PreferencePair], drop_invalid: bool, report: DataReport,
                sft: bool = False) -> list[PreferencePair]:
    """chosen == rejected teaches DPO nothing: fail, or skip such pairs with a count. An empty completion
    is a valid answer (the end-of-turn token alone; TRL trains on it too). sft: only chosen is trained
    on, so nothing is checked."""
    identical = [] if sft else [p for p in pairs if isinstance(p, PreferencePair) and p.chosen == p.rejected
                                and p.chosen_messages == p.rejected_messages]
    if identical and not drop_invalid:
        raise DataError(f"{len(identical)} with chosen == rejected (first: {', '.join(p.where for p in identical[:3])}). "
                        "Fix the data, or set drop_invalid_pairs: true to skip and count them")
    report.skipped_identical += len(identical)
    bad = {id(p) for p in identical}
    return [p for p in pairs if id(p) not in bad]


def load_eval_sets(cfg, report: DataReport) -> dict[str, list[PreferencePair]]:
    """The named evaluation sets beyond the validation set (eval_dataset as a mapping), checked as the
    validation set is, their counts in `report`."""
    sets = {}
    for name, spec in list(cfg.eval_sets.items())[1:]:
        examples = read_dataset(spec, cfg.dataset_dir, cfg.max_samples, cfg.columns, cfg.is_kto, cfg.objective == "sft",
                                default_system=cfg.default_system, images=image_options(cfg))
        report.read += len(examples)
        sets[name] = check_pairs(examples, cfg.drop_invalid_pairs, report, cfg.objective == "sft")
        if not sets[name]:
            raise DataError(f"eval_dataset '{name}' ({spec}): no examples left after checks")
    report.eval_sets = {name: len(v) for name, v in sets.items()}
    return sets


def _say_rejected_unused(examples: list[PreferencePair], split: str) -> None:
    """SFT reads a preference pair as its chosen answer (SFT records are read as pairs whose rejected is
    the chosen): say so, counted, rather than drop the rejected answers unsaid."""
    pairs = sum(1 for p in examples if p.rejected != p.chosen or p.rejected_messages != p.chosen_messages)
    if pairs:
        log.info("sft: %d of the %d %s records are preference pairs: trained on their chosen answers; their "
                 "rejected answers are not used (preftune train trains on both)", pairs, len(examples), split)


def load_pairs(cfg) -> tuple[list[PreferencePair], list[PreferencePair], DataReport]:
    """Train and validation pairs for a config, plus the counts."""
    report = DataReport()
    if not cfg.dataset:
        raise DataError("no training data: set dataset (a name in dataset_info.json or a JSON/JSONL path)")
    unpaired = cfg.is_kto  # kto reads unpaired examples too
    sft = cfg.objective == "sft"  # SFT records too; pairs give their chosen
    train = read_dataset(cfg.dataset, cfg.dataset_dir, cfg.max_samples, cfg.columns, unpaired, sft,
                         cfg.mix_strategy, cfg.interleave_probs, cfg.seed, cfg.default_system, image_options(cfg))
    report.read = len(train)
    report.sources = dict(Counter(source_of(p.where) for p in train))
    if sft:
        _say_rejected_unused(train, "training")
    train = check_pairs(train, cfg.drop_invalid_pairs, report, sft)
    with_margin = sum(1 for p in train if getattr(p, "margin", None) is not None)
    if with_margin and cfg.objective != "rm":
        log.info("margin: %d of the %d training pairs have one; only stage: rm (a reward model) reads it, %s "
                 "does not", with_margin, len(train), cfg.objective)
    if cfg.shuffle:  # before the split, so val_size draws from every source
        random.Random(cfg.seed).shuffle(train)
    if cfg.eval_dataset:
        # a comma list is mixed as the training entries are (as LLaMA-Factory); a mapping's sets are not
        one = isinstance(cfg.eval_dataset, str)
        val = read_dataset(cfg.eval_sets["validation"], cfg.dataset_dir, cfg.max_samples, cfg.columns, unpaired, sft,
                           cfg.mix_strategy if one else "concat", cfg.interleave_probs if one else None, cfg.seed,
                           cfg.default_system, image_options(cfg))
        report.read += len(val)
        if sft:
            _say_rejected_unused(val, "validation")
        val = check_pairs(val, cfg.drop_invalid_pairs, report, sft)
    elif cfg.val_size > 0:
        n_val = int(cfg.val_size) if cfg.val_size >= 1 else max(1, round(len(train) * cfg.val_size))
        if n_val >= len(train):
            raise DataError(f"val_size {cfg.val_size} leaves no training pairs out of {len(train)}")
        log.info("val_size %g read as %s: %d of %d pairs held out for validation", cfg.val_size,
                 "a count" if cfg.val_size >= 1 else "a share", n_val, len(train))
        order = list(range(len(train)))
        random.Random(cfg.seed).shuffle(order)
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
    else:
        val = []
    if not train:
        raise DataError("no training pairs left after checks")
    report.train, report.eval = len(train), len(val)
    return train, val, report
