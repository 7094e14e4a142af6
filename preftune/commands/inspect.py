"""`preftune inspect`: what a dataset holds before a run spends time on it.

    preftune inspect pairs.jsonl                                  # character lengths
    preftune inspect pairs.jsonl --model Qwen/Qwen2.5-0.5B-Instruct --cutoff_len 2048 --plot lengths.png
    preftune inspect my_dpo_data --dataset_dir data --json        # a dataset_info.json name
    preftune inspect --config run.yaml                            # the data, tokenizer and cutoff of a run

Counts per source, length percentiles of prompt/chosen/rejected (tokens with --model, else
characters), pairs the cutoff would truncate, duplicates, chosen == rejected, empty fields, the
length bias (how often chosen is longer than rejected: a DPO model learns that bias too), and a
few examples rendered exactly as training sees them, with the completion boundary marked.
Pairs with images (docs/vision.md): how many images per pair, their sizes as the model gets them
(after image_max_pixels / image_min_pixels), and with a vision-language --model the tokens its
processor makes of each image; the pairs are then rendered and tokenized by its processor, as a run does.
"""

from __future__ import annotations

import json
import os
from collections import Counter

from preftune.config import TrainConfig, load_config, parse_command_line
from preftune.data import PreferencePair, UnpairedExample, read_examples, source_of
from preftune.data.images import image_options, text_of
from preftune.errors import ConfigError, DataError
from preftune.tokenization import (TokenizeReport, as_pair, describe_rendering, encode_pair, prompt_messages,
                                   rendering_text, setup_rendering, truncate_pair)

BOUNDARY = "⟦completion⟧"  # marks where the scored completion starts in the rendered examples
PERCENTILES = (50, 90, 95, 99)


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    s = sorted(values)
    out = {"min": s[0], "mean": round(sum(s) / len(s), 1)}
    for p in PERCENTILES:  # nearest-rank percentile
        out[f"p{p}"] = s[min(len(s) - 1, max(0, -(-p * len(s) // 100) - 1))]
    out["max"] = s[-1]
    return out


def _shown(content) -> str:
    """A message's content as text, an image part as `<image>`."""
    if isinstance(content, str):
        return content
    return "".join("<image>" if part["type"] == "image" else part["text"] for part in content)


def _image_stats(pairs: list[PreferencePair], processor) -> dict:
    """How many images the pairs hold, their sizes as the model gets them, and (processor given) the
    image tokens the processor makes of each (one call per distinct image)."""
    refs = [ref for p in pairs for ref in p.images or []]
    per_pair = Counter(len(p.images or []) for p in pairs)
    out = {"total": len(refs), "distinct": len(set(refs)),
           "per_pair": {str(n): per_pair[n] for n in sorted(per_pair)},
           "width": _percentiles([r.size[0] for r in refs]), "height": _percentiles([r.size[1] for r in refs])}
    if processor is not None and refs:
        image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
        tokens = {}
        for ref in refs:
            if ref not in tokens:
                ids = processor(text=[processor.image_token], images=[[ref.load()]], add_special_tokens=False)
                tokens[ref] = list(ids["input_ids"][0]).count(image_id)
        out["tokens_per_image"] = _percentiles([tokens[r] for r in refs])
        out["image_tokens_per_pair"] = _percentiles([sum(tokens[r] for r in p.images or []) for p in pairs])
    return out


def inspect_data(cfg: TrainConfig, n_examples: int = 3) -> dict:
    """The statistics of cfg.dataset as a dict (what --json prints): lengths in tokens of cfg's
    model_name_or_path when it is set (rendered and cut with cfg's template, cutoff_len,
    truncation_mode and max_prompt_length, as a run does), else in characters."""
    model, cutoff_len, truncation_mode, max_prompt_length = (cfg.model_name_or_path, cfg.cutoff_len,
                                                             cfg.truncation_mode, cfg.max_prompt_length)
    if model:  # rendered as a run on that model renders (its template, thinking settings, default_system)
        from preftune.saved import model_run_config, with_run_template

        cfg = with_run_template(cfg, model_run_config(model))
    examples = read_examples(cfg.dataset, cfg.dataset_dir, columns=cfg.columns, mix_strategy=cfg.mix_strategy,
                             interleave_probs=cfg.interleave_probs, seed=cfg.seed, default_system=cfg.default_system,
                             images=image_options(cfg))
    pairs = [e for e in examples if isinstance(e, PreferencePair)]
    unpaired = [e for e in examples if isinstance(e, UnpairedExample)]
    sources = Counter(source_of(e.where) for e in examples)
    stats: dict = {"records": len(examples), "pairs": len(pairs), "unpaired": len(unpaired),
                   "sources": dict(sources), "unit": "tokens" if model else "characters"}
    processor = None
    if model:
        from preftune import vision
        from preftune.models import load_tokenizer

        processor = vision.load_processor(cfg)  # a vision-language model's renders every pair, as in a run
        tokenizer = processor.tokenizer if processor else load_tokenizer(model, cfg.trust_remote_code)
        rendering = setup_rendering(tokenizer, cfg.template, cfg.chat_template_kwargs)
        stats["rendering"] = vision.describe(processor) if processor else \
            describe_rendering(tokenizer, cfg.template, examples)  # what a run logs
        report = TokenizeReport()

        def encode(pair):
            if processor is not None:
                return vision.encode_vision_pair(processor, pair, {**cfg.chat_template_kwargs,
                                                                   **(pair.chat_template_kwargs or {})}, report)
            return encode_pair(tokenizer, pair, rendering, report)
        unusable = []

        def encoded(items: list) -> tuple[list, list]:
            """(the items that tokenize, their untruncated token ids); an unpaired example goes through
            the pair code as a pair with its one completion twice, as the run tokenizes it."""
            kept, toks = [], []
            for item in items:
                try:
                    toks.append(encode(as_pair(item)))
                    kept.append(item)
                except DataError as e:  # e.g. no prompt token left: the run would stop on it
                    unusable.append(str(e))
            return kept, toks

        def cut_all(toks: list) -> list:
            """What the run's truncation does at the cutoff (the same function, not a copy of its rule)."""
            return [truncate_pair(t, cutoff_len, truncation_mode, max_prompt_length, tokenizer.bos_token_id)
                    for t in toks]

        pairs, toks = encoded(pairs)
        prompt = [min(t.chosen_start, t.rejected_start) for t in toks]
        chosen = [len(t.chosen_ids) - t.chosen_start for t in toks]
        rejected = [len(t.rejected_ids) - t.rejected_start for t in toks]
        # what cutoff_len bounds: a whole sequence, prompt + completion (drawn against it by --plot)
        sequences = {"prompt + chosen": [len(t.chosen_ids) for t in toks],
                     "prompt + rejected": [len(t.rejected_ids) for t in toks]}
        cut = cut_all(toks)
        stats["cutoff_len"] = cutoff_len
        stats["truncation_mode"] = truncation_mode
        stats["max_prompt_length"] = max_prompt_length
        stats["truncated"] = sum(a is not None and a.truncated for a in cut)
        stats["truncated_completion"] = sum(
            a is not None and (len(a.chosen_ids) - a.chosen_start < c or len(a.rejected_ids) - a.rejected_start < r)
            for a, c, r in zip(cut, chosen, rejected))
        stats["dropped"] = sum(a is None for a in cut)  # no completion token would fit: the run leaves them out
        _, unpaired_toks = encoded(unpaired)
        stats["untokenizable"] = {"count": len(unusable), "first": unusable[:3]}
        unpaired_cut = cut_all(unpaired_toks)
        stats["unpaired_truncated"] = sum(a is not None and a.truncated for a in unpaired_cut)
        stats["unpaired_dropped"] = sum(a is None for a in unpaired_cut)
        unpaired_prompt = [t.chosen_start for t in unpaired_toks]
        unpaired_completion = [len(t.chosen_ids) - t.chosen_start for t in unpaired_toks]
        stats["boundary_merges"] = report.boundary_merges
        rendered = []
        for p, t in zip(pairs[:n_examples], toks):
            rendered.append({"where": p.where, **({"images": len(p.images)} if p.images is not None else {}),
                             "chosen": tokenizer.decode(t.chosen_ids[:t.chosen_start]) + BOUNDARY
                             + tokenizer.decode(t.chosen_ids[t.chosen_start:]),
                             "rejected_completion": tokenizer.decode(t.rejected_ids[t.rejected_start:])})
    else:
        def prompt_chars(p: PreferencePair) -> int:
            turns = p.messages or [{"content": p.prompt}]
            return len(p.system or "") + sum(len(text_of(m["content"])) for m in turns)  # images: not counted

        prompt = [prompt_chars(p) for p in pairs]
        chosen = [len(p.chosen) for p in pairs]
        rejected = [len(p.rejected) for p in pairs]
        unpaired_prompt = [prompt_chars(e) for e in unpaired]
        unpaired_completion = [len(e.completion) for e in unpaired]
        rendered = []
        for p in pairs[:n_examples]:
            text = "".join(f"[{m['role']}] {_shown(m['content'])}\n" for m in prompt_messages(p))
            rendered.append({"where": p.where, **({"images": len(p.images)} if p.images is not None else {}),
                             "chosen": f"{text}[assistant] {BOUNDARY}{p.chosen}",
                             "rejected_completion": p.rejected})
    if any(p.images is not None for p in pairs):
        stats["images"] = _image_stats(pairs, processor)
    stats["lengths"] = {"prompt": _percentiles(prompt), "chosen": _percentiles(chosen),
                        "rejected": _percentiles(rejected)}
    if unpaired:
        stats["lengths"].update({"unpaired prompt": _percentiles(unpaired_prompt),
                                 "unpaired completion": _percentiles(unpaired_completion)})
    keys = [(p.system, json.dumps(p.messages), p.prompt, p.chosen, p.rejected, repr(p.images)) for p in pairs]
    stats["duplicates"] = len(keys) - len(set(keys))
    stats["chosen_equals_rejected"] = sum(p.chosen == p.rejected for p in pairs)
    stats["empty"] = {"prompt": sum(not p.prompt.strip() for p in pairs),
                      "chosen": sum(not p.chosen.strip() for p in pairs),
                      "rejected": sum(not p.rejected.strip() for p in pairs)}
    n = max(len(pairs), 1)
    stats["length_bias"] = {"chosen_longer": round(sum(c > r for c, r in zip(chosen, rejected)) / n, 4),
                            "equal": round(sum(c == r for c, r in zip(chosen, rejected)) / n, 4),
                            "rejected_longer": round(sum(c < r for c, r in zip(chosen, rejected)) / n, 4)}
    stats["examples"] = rendered
    stats["_lengths_raw"] = {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                             "unpaired completion": unpaired_completion}
    if model:
        stats["_sequence_lengths_raw"] = sequences
    return stats


def format_report(stats: dict) -> str:
    unit = stats["unit"]
    lines = [f"{stats['records']} records: {stats['pairs']} preference pairs, {stats['unpaired']} unpaired"]
    lines += [f"  {n:6d}  {src}" for src, n in stats["sources"].items()]
    lines.append(f"lengths in {unit}" + ("" if unit == "tokens" else " (give --model for tokens)") + ":")
    cols = ["min", "mean"] + [f"p{p}" for p in PERCENTILES] + ["max"]
    width = max(9, *(len(part) + 1 for part in stats["lengths"]), 18 if "images" in stats else 0)
    lines.append("  " + " " * width + "".join(f"{c:>9s}" for c in cols))
    for part, pct in stats["lengths"].items():
        if pct:
            lines.append("  " + f"{part:{width}s}" + "".join(f"{pct[c]:>9}" for c in cols))
    if "images" in stats:
        im = stats["images"]
        per_pair = ", ".join(f"{n} image{'s' if n != '1' else ''}: {k}" for n, k in im["per_pair"].items())
        lines.append(f"images: {im['total']} ({im['distinct']} distinct); pairs with {per_pair}")
        rows = [("width (px)", im["width"]), ("height (px)", im["height"])]
        rows += [("tokens per image", im["tokens_per_image"]), ("image tokens/pair", im["image_tokens_per_pair"])] \
            if "tokens_per_image" in im else []
        for part, pct in rows:
            if pct:
                lines.append("  " + f"{part:{width}s}" + "".join(f"{pct[c]:>9}" for c in cols))
    if "rendering" in stats:
        lines.append(f"rendering: {rendering_text(stats['rendering'])}")
    if "truncated" in stats:
        lines.append(f"cutoff_len {stats['cutoff_len']} ({stats['truncation_mode']}): {stats['truncated']} pairs "
                     f"truncated ({stats['truncated_completion']} of them lose the end of a completion), "
                     f"{stats['dropped']} dropped (no completion token fits); {stats['boundary_merges']} with a "
                     "token spanning the boundary")
        if stats["unpaired"]:
            lines.append(f"  unpaired examples: {stats['unpaired_truncated']} truncated, {stats['unpaired_dropped']} "
                         "dropped")
        if stats["untokenizable"]["count"]:
            lines.append(f"{stats['untokenizable']['count']} pairs cannot be tokenized (a run stops on them): "
                         + "; ".join(stats["untokenizable"]["first"]))
    e = stats["empty"]
    lines.append(f"duplicates: {stats['duplicates']}   chosen == rejected: {stats['chosen_equals_rejected']}   "
                 f"empty prompt/chosen/rejected: {e['prompt']}/{e['chosen']}/{e['rejected']}")
    b = stats["length_bias"]
    lines.append(f"length bias: chosen longer in {b['chosen_longer']:.1%}, equal {b['equal']:.1%}, "
                 f"rejected longer {b['rejected_longer']:.1%}")
    for ex in stats["examples"]:
        images = f", {ex['images']} image(s)" if "images" in ex else ""
        lines.append(f"--- {ex['where']}{images} (completion starts at {BOUNDARY})")
        lines.append(ex["chosen"])
        lines.append(f"--- rejected completion: {ex['rejected_completion']}")
    return "\n".join(lines)


def plot_lengths(stats: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the parts, and (in tokens) the whole sequences against cutoff_len, which bounds prompt + completion
    panels = [("prompt and completions", stats["_lengths_raw"])]
    if "_sequence_lengths_raw" in stats:
        panels.append(("sequences (what cutoff_len bounds)", stats["_sequence_lengths_raw"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for part, values in series.items():
            if values:
                ax.hist(values, bins=40, alpha=0.5, label=part)
        if title.startswith("sequences"):
            ax.axvline(stats["cutoff_len"], color="k", linestyle="--", label="cutoff_len")
        ax.set_title(title)
        ax.set_xlabel(stats["unit"])
        ax.set_ylabel("pairs")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


USAGE = """usage: preftune inspect DATA [--model M] [--json] [--plot PNG] [--config FILE] [--key value ...]

Statistics and rendered examples of DATA (what the `dataset` key takes: files, dataset_info.json
names, folders, hub ids). With --model (model_name_or_path), lengths are in tokens and examples
are rendered and cut as a run with the same keys (template, cutoff_len, truncation_mode,
max_prompt_length, columns, dataset_dir) would; --config FILE takes them from a run's config.

  --json        print the statistics as JSON
  --plot PNG    write a histogram of the lengths
"""


def main(args: list[str]) -> int:
    config_path, overrides, flags = parse_command_line(args, positional="dataset", flags={"json": False, "plot": None})
    cfg = load_config(config_path, overrides)
    if not cfg.dataset:
        raise ConfigError("preftune inspect: no data given; pass DATA (a file, dataset_info.json name, folder or hub id)")
    stats = inspect_data(cfg)
    if flags["plot"]:
        plot_lengths(stats, os.path.expanduser(flags["plot"]))
    shown = {k: v for k, v in stats.items() if not k.endswith("_raw")}  # the raw lengths are for the plot only
    print(json.dumps(shown, indent=2, ensure_ascii=False) if flags["json"] else format_report(shown))
    return 0
