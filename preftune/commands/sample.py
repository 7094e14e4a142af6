"""`preftune sample`: completions sampled from a model, scored by a reward, paired into preference data.

    preftune sample --model_name_or_path sft_out --dataset prompts.jsonl --num_samples 4 \\
        --reward my_rewards.py:score --output_dir sampled
    preftune sample --model_name_or_path sft_out --dataset prompts.jsonl --output_dir to_label   # no reward

Prompts come from any data file training reads (prompt-only records allowed) and are rendered as
training renders them. Writes into output_dir:

    samples.jsonl   one line per prompt: {"id", "prompt", "system", "completions": [{"text", "score"}]};
                    without a reward the scores are null: the candidates that `preftune label` shows people
    pairs.jsonl     the pairs (`pairing`, `min_margin`) in the format training reads
    summary.json    counts (ties, pairs below min_margin, identical texts: skipped and counted), rewards, speed
    sample_settings.json  the settings that decide the samples (SAMPLING_KEYS), which a resumed run must repeat

Each prompt's line is appended and flushed the moment it is done, so a killed run loses nothing and,
run again with the same output_dir and settings, continues with the prompts it had not finished (the same
completions as an uninterrupted run: sampling is seeded per batch of prompts). Run again with other
sampling settings (num_samples, temperature, model, reward, ...), it is refused in one line naming them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path

from preftune import guard
from preftune.config import load_config, parse_command_line
from preftune.errors import ConfigError, DataError
from preftune.files import write_atomic

log = logging.getLogger("preftune")

USAGE = """usage: preftune sample [CONFIG.yaml] --model_name_or_path M --dataset PROMPTS --output_dir DIR
                       [--num_samples N] [--reward module:function | REWARD_MODEL] [--key value ...]

Sample num_samples completions for each prompt of the dataset, score them with the reward, and pair
them (pairing, min_margin) into preference data; without a reward, write the candidates for people to
label (preftune label). Prompts per batch: per_device_eval_batch_size; the engine: infer_backend.
"""


def prompt_record(pair, image_dir: Path | None = None) -> dict:
    """A prompt as the data files write it, in the form it came in (so the pairs are rendered as the prompt was
    sampled): text, or the conversation as messages; and its system turn. A prompt with images (TRL's vision
    format: {"type": "image"} parts) also gets `images`, each as an absolute path: a file's own, or, for an
    image that came as bytes (the datasets Image feature), a PNG written into `image_dir`, named by its digest."""
    if pair.messages is not None and not pair.from_text:
        prompt = pair.messages
    elif pair.conversational:
        prompt = [{"role": "user", "content": pair.prompt}]
    else:
        prompt = pair.prompt
    if pair.images is None:  # a text record ([]: a text-only record of a vision dataset, its parts kept)
        return {"prompt": prompt, "system": pair.system}
    return {"prompt": prompt, "system": pair.system, "images": [image_path(ref, image_dir) for ref in pair.images]}


def encode_to_fit(tokenizer, processor, prompts: list, cfg, context: int | None) -> tuple[list[list[int]], int, dict]:
    """The prompts' token ids, rendered as the run renders them (a VLM's processor, images included), cut from the
    left to leave max_new_tokens of `context` (said once in the log; a cut through a prompt's image tokens is one
    line), how many were cut, and the rendering, logged; what `sample` and `eval --prompts` both generate from."""
    from preftune.generate import fit_context, log_cut
    from preftune.tokenization import describe_rendering, encode_prompts, rendering_text
    from preftune.vision import describe, encode_vision_prompts

    prompt_ids = encode_prompts(tokenizer, prompts, cfg.template, cfg.chat_template_kwargs) if processor is None \
        else encode_vision_prompts(processor, prompts, cfg.chat_template_kwargs)
    encoded, cut = fit_context(prompt_ids, context, cfg.max_new_tokens, tokenizer.bos_token_id)
    cut_images = next((p.where for p, a, b in zip(prompts, prompt_ids, encoded) if p.images and a != b), None)
    if cut_images:  # the image tokens would lose their place
        raise DataError(f"{cut_images}: the prompt with its image tokens is longer than the model's context ({context}) "
                        f"less max_new_tokens ({cfg.max_new_tokens}); lower max_new_tokens or shorten the prompt")
    log_cut(cut, len(prompts), context, cfg.max_new_tokens)
    rendering = describe_rendering(tokenizer, cfg.template, prompts) if processor is None else describe(processor)
    log.info("rendering: %s", rendering_text(rendering))
    return encoded, cut, rendering


def image_path(ref, image_dir: Path | None) -> str | None:
    if isinstance(ref.source, str):
        return str(Path(ref.source).resolve())
    if image_dir is None:  # comparing a resumed run's prompts: the images are compared by the prompt's parts
        return None
    path = image_dir / f"{ref.digest[:32]}.png"
    if not path.is_file():
        image_dir.mkdir(exist_ok=True)
        ref.load().save(path)
    return str(path.resolve())


def read_samples(path: Path, prompts: list) -> dict[int, dict]:
    """The records an earlier run of this output_dir finished, by prompt position. A last line cut by
    a kill is dropped (and cut from the file); a record of another prompt is refused."""
    if not path.is_file():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines[-1]:  # no newline at the end: a line the kill cut short
        path.write_bytes(raw[:len(raw) - len(lines[-1])])
        log.warning("%s: dropped an unfinished last line (the run was killed while writing it)", path)
    done = {}
    for n, line in enumerate(lines[:-1], 1):
        try:
            rec = json.loads(line)
            pos = int(rec["id"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}:{n}: not a samples line written by preftune sample; use an empty output_dir") from None
        if pos >= len(prompts) or prompt_record(prompts[pos])["prompt"] != rec["prompt"]:
            raise ConfigError(f"{path}:{n}: holds samples of another prompt list (id {rec['id']}); use another "
                              "output_dir, or delete it to start over")
        done[pos] = rec
    return done


# What decides the completions and scores of a samples line: a resumed run must use the same values, or
# its samples.jsonl would mix records of both and summary.json claim the new ones (as resume_from_checkpoint
# checks training's settings). pairing and min_margin are free: pairs.jsonl is remade from every record.
SAMPLING_KEYS = ("model_name_or_path", "template", "enable_thinking", "preserve_thinking", "default_system", "reward",
                 "num_samples", "temperature", "top_p", "top_k", "max_new_tokens", "seed")
SETTINGS_FILE = "sample_settings.json"


def sampling_settings(cfg) -> dict:
    """cfg's SAMPLING_KEYS, with a local model folder and a reward file as absolute paths (the same run
    started from another folder is the same run)."""
    settings = {k: getattr(cfg, k) for k in SAMPLING_KEYS}
    if settings["model_name_or_path"] and Path(settings["model_name_or_path"]).expanduser().exists():
        settings["model_name_or_path"] = str(Path(settings["model_name_or_path"]).expanduser().resolve())
    module, _, fn = (settings["reward"] or "").rpartition(":")
    if module.endswith(".py") and Path(module).expanduser().is_file():
        settings["reward"] = f"{Path(module).expanduser().resolve()}:{fn}"
    return settings


def check_same_settings(out: Path, cfg, done: dict[int, dict]) -> None:
    """Refuse to add to the samples an earlier run wrote with other sampling settings; then record this
    run's (before its first line, so a killed run has them)."""
    path, now = out / SETTINGS_FILE, sampling_settings(cfg)
    if done:
        if path.is_file():
            try:
                saved = json.loads(path.read_text(encoding="utf-8"))
            except ValueError:
                raise DataError(f"{path} is not the JSON preftune sample writes; use another output_dir, or delete "
                                "samples.jsonl to start over") from None
        else:  # samples written before this file existed: their completion count is all there is to compare
            saved = {"num_samples": len(done[min(done)]["completions"])}
        changed = [k for k in SAMPLING_KEYS if k in saved and saved[k] != now[k]]
        if changed:
            raise ConfigError(f"{out / 'samples.jsonl'} holds {len(done)} prompts sampled with other settings ("
                              + ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in changed) + "); resume with the "
                              "earlier values, or use another output_dir (or delete samples.jsonl to start over)")
    write_atomic(path, json.dumps(now, indent=1))


def make_pairs(records: list[dict], cfg) -> tuple[list[dict], dict[str, int]]:
    """Preference pairs from scored records, as `pairing` says; what is not paired is counted."""
    pairs, skipped = [], {"ties": 0, "below_min_margin": 0, "identical_texts": 0}

    def add(rec, a, b):
        if a["score"] == b["score"]:
            skipped["ties"] += 1
        elif abs(a["score"] - b["score"]) < cfg.min_margin:
            skipped["below_min_margin"] += 1
        elif a["text"] == b["text"]:
            skipped["identical_texts"] += 1
        else:
            chosen, rejected = (a, b) if a["score"] > b["score"] else (b, a)
            pairs.append({"prompt": rec["prompt"], "chosen": chosen["text"], "rejected": rejected["text"],
                          **({"system": rec["system"]} if rec["system"] else {}),
                          **({"images": rec["images"]} if "images" in rec else {})})

    for rec in records:
        completions = rec["completions"]
        if cfg.pairing == "best_worst":
            ranked = sorted(completions, key=lambda c: c["score"])
            add(rec, ranked[-1], ranked[0])
        elif cfg.pairing == "all":
            for i in range(len(completions)):
                for j in range(i + 1, len(completions)):
                    add(rec, completions[i], completions[j])
        else:  # random, seeded per prompt
            add(rec, *random.Random(cfg.seed * 1_000_003 + int(rec["id"])).sample(completions, 2))
    return pairs, skipped


def run(cfg) -> dict:
    """Sample into cfg.output_dir (checked apart from the model, writable, locked); returns the summary."""
    if not cfg.model_name_or_path or not cfg.dataset:
        raise ConfigError("preftune sample needs model_name_or_path (the model to sample) and dataset (the prompts)")
    if cfg.num_samples < 2:
        raise ConfigError(f"num_samples: sample pairs completions of a prompt, so it needs at least 2; got {cfg.num_samples}")
    guard.check_inputs(cfg)
    with guard.claim_output_dir(cfg.output_dir, guard.model_inputs(cfg)) as out:
        return _sample(cfg, out)


def _sample(cfg, out: Path) -> dict:
    import torch

    from preftune.saved import run_config, with_run_template
    from preftune.data import read_prompts
    from transformers import AutoConfig

    from preftune.generate import backend, model_context, sample, vllm_sample
    from preftune.models import load_model, load_tokenizer
    from preftune.rewards import load_reward
    from preftune.vision import completion_banned_ids, load_processor, vision_prompt_texts

    engine = backend(cfg)  # a missing engine, or a bad reward, fails before any sampling
    reward = load_reward(cfg.reward) if cfg.reward else None
    if Path(cfg.model_name_or_path).expanduser().is_dir():  # before the prompts: default_system may be the run's
        cfg = with_run_template(cfg, run_config(Path(cfg.model_name_or_path).expanduser()))
    prompts = read_prompts(cfg.dataset, cfg.dataset_dir, cfg.max_samples, cfg.columns,
                           default_system=cfg.default_system)
    samples_path = out / "samples.jsonl"
    done = read_samples(samples_path, prompts)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    processor = load_processor(cfg)  # a vision-language model's renders the prompts, images included; else None
    check_same_settings(out, cfg, done)  # with the template resolved, before a model loads
    context = model_context(AutoConfig.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code))
    texts = vision_prompt_texts(processor, prompts, cfg.chat_template_kwargs) if processor is not None else None
    encoded, cut, rendering = encode_to_fit(tokenizer, processor, prompts, cfg, context)
    if engine == "vllm":
        vision_kwargs = {} if processor is None else {"texts": texts, "images": [p.images or [] for p in prompts],
                                                      "banned_ids": completion_banned_ids(processor)}
        batches = vllm_sample(cfg.model_name_or_path, tokenizer, encoded, cfg, skip=set(done), **vision_kwargs)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = load_model(cfg.model_name_or_path, cfg).to(device)
        batches = sample(model, tokenizer, encoded, cfg, device, skip=set(done),
                         images=[p.images or [] for p in prompts], processor=processor)
    log.info("sampling %d completions for each of %d prompts with %s (%d done before)", cfg.num_samples,
             len(prompts), engine, len(done))
    start_time, new = time.time(), 0
    with open(samples_path, "a", encoding="utf-8") as f:
        for start, batch in batches:
            for i, completions in enumerate(batch):
                pos = start + i
                if pos in done:  # the rest of a batch a killed run had begun
                    continue
                texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
                scores = reward([prompts[pos].prompt] * len(texts), texts) if reward else [None] * len(texts)
                rec = {"id": str(pos), **prompt_record(prompts[pos], out / "images"),
                       "completions": [{"text": t, "score": s} for t, s in zip(texts, scores)]}
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())  # on disk before the next prompt starts: a kill loses nothing done
                done[pos] = rec
                new += 1
    seconds = time.time() - start_time
    records = [done[pos] for pos in sorted(done)]
    summary = {"prompts": len(prompts), "prompts_cut_to_context": cut, "completions_per_prompt": cfg.num_samples,
               "backend": engine, "sampled_now": new,
               "seconds": round(seconds, 2), "completions_per_second": new * cfg.num_samples / max(seconds, 1e-9),
               "rendering": rendering, "outputs": {"samples": str(samples_path)}, "config": cfg.to_dict()}
    if reward:
        pairs, skipped = make_pairs(records, cfg)
        write_atomic(out / "pairs.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
        scores = [c["score"] for r in records for c in r["completions"]]
        summary.update({"pairs": len(pairs), "skipped": skipped, "pairing": cfg.pairing,
                        "reward": {"name": cfg.reward, "mean": sum(scores) / len(scores), "min": min(scores),
                                   "max": max(scores)}})
        summary["outputs"]["pairs"] = str(out / "pairs.jsonl")
    write_atomic(out / "summary.json", json.dumps(summary, indent=1, default=str))
    return summary


def main(args: list[str]) -> int:
    config_path, overrides, _ = parse_command_line(args)
    summary = run(load_config(config_path, overrides))
    print(f"{summary['prompts']} prompts x {summary['completions_per_prompt']} completions -> "
          f"{summary['outputs']['samples']} ({summary['completions_per_second']:.1f} completions/s this run, "
          f"{summary['backend']})")
    if "pairs" in summary:
        s = summary["skipped"]
        print(f"{summary['pairs']} pairs ({summary['pairing']}) -> {summary['outputs']['pairs']}; skipped: "
              f"{s['ties']} ties, {s['below_min_margin']} below min_margin, {s['identical_texts']} identical texts")
    else:
        print("no reward given: label the candidates with `preftune label` "
              f"{summary['outputs']['samples']}")
    return 0
