"""`preftune demo`: the whole flow on a small model that first learns language, end to end on CPU in
minutes, and what alignment changed, before and after.

    preftune demo                                       # into output/demo_flow
    preftune demo --sweep 0.05,0.1,0.5                  # a DPO run per beta, one eval: frontier.png
    preftune demo --seed 1 --output_dir output/demo_seed1

1. data/      short movie reviews made from templates and word banks (positive, negative and mixed,
              in equal shares; preftune/demo.py), and prompts ("Review of The Quiet Harbor:") about
              films the SFT model never read a review of: some to sample pairs from, others to
              evaluate on
2. the SFT    a BPE tokenizer and a small Qwen2-architecture model made locally, fine-tuned on the
   model      reviews with the sft objective: the reference. Cached in <cache_dir>/<hash of the
              data and settings> (default $XDG_CACHE_HOME/preftune/demo), so later runs skip it
3. sampled/   `preftune sample`: 4 completions per prompt from the SFT model, scored by the reward
              `preftune.demo:sentiment` (positive words +1, negative -1, over all of them), the
              best against the worst
4. dpo/       `preftune train` on those pairs, the SFT model as model and reference
5. eval/      `preftune eval` of the DPO model against the SFT model on the evaluation prompts

Each step is the command's own code (`train.train`, `commands.sample.run`, `commands.eval.run`),
configured as a user would configure it. The figures are printed and written to demo.json.

`preftune demo --vision` is DPO on a vision-language model instead (`run_vision`; assets in
preftune/demo_vision.py): images of coloured shapes, "What colour is the shape?", the right colour chosen
and another rejected, balanced so that only the image tells them apart; written in LLaMA-Factory's format
(dataset_info.json, `<image>` placeholders) and trained by `preftune train` on a tiny random-init Qwen2-VL.
The held-out preference accuracy before (chance) and after is the proof that the image reaches the loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

from preftune import guard
from preftune.commands.sample import SETTINGS_FILE
from preftune.config import from_dict, load_options, parse_command_line
from preftune.data.readers import data_lines
from preftune.errors import ConfigError
from preftune.files import write_atomic

log = logging.getLogger("preftune")

USAGE = """usage: preftune demo [--config FILE] [--output_dir DIR] [--seed N] [--beta B | --sweep B1,B2,...]
                     [--cache_dir DIR] [--reviews N] [--hidden N] [--layers N] [--sft_epochs N] [--prompts N]
                     [--eval_prompts N]

The whole flow on a model that first learns language, on CPU in a few minutes: SFT on generated
movie reviews (the reference; cached), `preftune sample` scored by the sentiment reward, DPO on the
pairs, `preftune eval` of the DPO model against the SFT model. Prints completions before and after,
the reward lift, the win rate and the KL spent (nats per sequence). --sweep runs DPO at several betas
and draws the reward-vs-KL frontier (eval/frontier.png).

Options (default; --config FILE reads them from a YAML file, e.g. sweep: [0.05, 0.1]; the command line's win):
"""

FLAGS = {  # name -> (default, help); every size of the flow is a flag, so that a test can run it small
    "output_dir": ("output/demo_flow", "where every step writes (data/, sampled/, dpo/, eval/, demo.json)"),
    "cache_dir": ("", "the SFT models' cache (empty: $XDG_CACHE_HOME/preftune/demo, else ~/.cache/preftune/demo; "
                      "preftune cache list/clear --demo_cache_dir DIR)"),
    "seed": (0, "the data, the model's initialisation, sampling and training"),
    "beta": (0.1, "DPO's beta"),
    "sweep": ("", "a comma list of betas: a DPO run for each, evaluated together (eval/frontier.png)"),
    "reviews": (4000, "SFT reviews"),
    "hidden": (128, "the model's hidden size (4 attention heads, 2 KV heads)"),
    "layers": (4, "the model's layers"),
    "sft_epochs": (4.0, "SFT epochs"),
    "prompts": (300, "held-out prompts sampled for DPO pairs (about one pair each)"),
    "eval_prompts": (100, "other held-out prompts the models are evaluated on"),
}
USAGE += "\n".join(f"  --{name} ({default!r})\n      {what}" for name, (default, what) in FLAGS.items())

USAGE += """

preftune demo --vision [--config FILE] [--output_dir DIR] [--seed N] [--beta B] [--pairs N] [--eval_pairs N]
                       [--epochs N]

DPO on a tiny vision-language model (Qwen2-VL architecture, random init, made locally) on CPU in about a
minute: images of coloured shapes, "What colour is the shape?", the right colour chosen and another one
rejected, in LLaMA-Factory's format (data/dataset_info.json). Prints the held-out preference accuracy before
(chance: only the image tells the answers apart) and after.

Options with --vision (default):
"""

VISION_FLAGS = {  # name -> (default, help), as FLAGS
    "output_dir": ("output/demo_vision", "where it writes (data/, base_model/, dpo/, demo.json)"),
    "seed": (0, "the images, the pairs, the model's initialisation and training"),
    "beta": (0.5, "DPO's beta"),
    "pairs": (480, "training pairs"),
    "eval_pairs": (120, "held-out pairs, on images of their own"),
    "epochs": (3.0, "DPO epochs"),
}
USAGE += "\n".join(f"  --{name} ({default!r})\n      {what}" for name, (default, what) in VISION_FLAGS.items())
# The vision demo's DPO, as a LLaMA-Factory config would say it (template: qwen2_vl is its name for the model's
# chat template). Full fine-tuning with LLaMA-Factory's freeze defaults: the vision tower and projector stay as
# initialised (random), the language model learns to read their features. A high learning rate and beta for a
# model trained from scratch in a minute: at beta 0.1 the accuracy rises more slowly and less surely.
VISION_DPO = {"template": "qwen2_vl", "pref_loss": "sigmoid", "learning_rate": 3e-3, "per_device_train_batch_size": 16,
              "warmup_ratio": 0.1, "lr_scheduler_type": "cosine", "logging_steps": 5, "eval_steps": 30,
              "torch_dtype": "float32", "save_strategy": "no"}

VOCAB_SIZE = 1024  # more than the corpus needs: every word becomes one token, so no misspelt words
REWARD = "preftune.demo:sentiment"
SHOW = 4  # prompts printed before and after
# Settings of each step (config keys, as a user's YAML would hold them). SFT: a high learning rate
# and large batches, for a model trained from scratch in a minute. DPO: the sigmoid loss plus the
# NLL of the chosen completion (pref_ftx, as LLaMA-Factory and RPO): the reward reads words, not
# grammar, and without that term the same reward costs 3.5x the KL and half the completions stop
# being sentences (docs/pipeline.md, "preftune demo"). The data are plain strings, which are raw text unless
# `template` is set: every step renders them through the tokenizer's ChatML template, the format its figures
# were measured in (and the SFT model's cache key holds it).
TEMPLATE = {"template": "chatml"}
SFT = {**TEMPLATE, "stage": "sft", "learning_rate": 4e-3, "per_device_train_batch_size": 64, "warmup_ratio": 0.05,
       "lr_scheduler_type": "cosine", "logging_steps": 20, "eval_strategy": "epoch", "cutoff_len": 128,
       "torch_dtype": "float32"}
SAMPLING = {**TEMPLATE, "num_samples": 4, "max_new_tokens": 64, "per_device_eval_batch_size": 16, "reward": REWARD}
DPO = {**TEMPLATE, "pref_loss": "sigmoid", "pref_ftx": 1.0, "learning_rate": 5e-4, "per_device_train_batch_size": 16, "num_train_epochs": 3,
       "warmup_ratio": 0.1, "lr_scheduler_type": "cosine", "val_size": 0.1, "logging_steps": 5, "eval_steps": 10,
       "cutoff_len": 128, "torch_dtype": "float32"}  # a completion the SFT model ends at once (empty) is an answer too
# The demo keeps no checkpoint-N folders (save_steps' default, 500, is passed by a larger --reviews or
# --sft_epochs): its runs are minutes long and a killed one starts over. Outside SFT, so the cache key
# of the SFT model stays what it was.
NO_CHECKPOINTS = {"save_strategy": "no"}


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON Lines file the demo wrote (split as JSON allows: a model may write U+2028)."""
    return [json.loads(line) for line in data_lines(path.read_text(encoding="utf-8")) if line.strip()]


def typed(found: dict, flags: dict) -> dict:
    """The flags' values (strings from the command line) in their defaults' types."""
    settings = {}
    for name, (default, _) in flags.items():
        try:
            settings[name] = type(default)(found[name])
        except ValueError:
            raise ConfigError(f"--{name}: expected a {type(default).__name__}, got '{found[name]}'") from None
    return settings


def settings_from(found: dict) -> dict:
    """The flags' values (strings from the command line) in their defaults' types, checked."""
    settings = typed(found, FLAGS)
    try:
        betas = [float(b) for b in settings["sweep"].split(",") if b.strip()] or [settings["beta"]]
    except ValueError:
        raise ConfigError(f"--sweep: expected a comma list of betas, e.g. 0.05,0.1,0.5; got '{settings['sweep']}'") from None
    if any(not (b > 0 and math.isfinite(b)) for b in betas) or len(set(betas)) < len(betas):
        raise ConfigError(f"--beta/--sweep: betas must be distinct positive numbers; got {betas}")
    settings["betas"] = betas
    for name in ("reviews", "hidden", "layers", "prompts", "eval_prompts"):
        if settings[name] < 1:
            raise ConfigError(f"--{name} must be at least 1; got {settings[name]}")
    if settings["hidden"] % 4:
        raise ConfigError(f"--hidden must be a multiple of 4 (the model's attention heads); got {settings['hidden']}")
    if settings["prompts"] + settings["eval_prompts"] > 600:  # 900 titles: at least 300 left for the SFT reviews
        raise ConfigError("--prompts + --eval_prompts must be at most 600 (the rest of the 900 titles are the "
                          f"SFT reviews'); got {settings['prompts'] + settings['eval_prompts']}")
    if not settings["sft_epochs"] > 0:
        raise ConfigError(f"--sft_epochs must be positive; got {settings['sft_epochs']}")
    return settings


def sft_model(settings: dict, data: dict[str, Path]) -> tuple[Path, dict]:
    """The SFT model's folder and its run's summary: from the cache when these data and settings
    were trained before, else made and trained now. A folder counts as cached only once its
    demo_sft.json is written, after the model, so a killed run is trained again, not reused."""
    from preftune.demo import SFT_MARKER, build_model, build_tokenizer, sft_cache_dir
    from preftune.train import train

    model_settings = {k: settings[k] for k in ("seed", "hidden", "layers", "sft_epochs")}
    key = hashlib.sha256(json.dumps([model_settings, SFT, VOCAB_SIZE]).encode()
                         + data["reviews"].read_bytes() + data["reviews_val"].read_bytes()).hexdigest()[:16]
    root = sft_cache_dir(settings["cache_dir"])
    folder, marker = root / key, root / key / SFT_MARKER
    if marker.is_file():
        log.info("SFT model: reusing %s (trained before on the same data and settings)", folder)
        return folder, {**json.loads(marker.read_text()), "cached": True}
    if folder.exists():  # a run killed before its marker: never trusted
        shutil.rmtree(folder)
    reviews = read_jsonl(data["reviews"])
    tokenizer = build_tokenizer([r[k] for r in reviews for k in ("prompt", "completion")], VOCAB_SIZE)
    base = folder / "base_model"  # the random initialisation; the trained model is saved beside it
    build_model(len(tokenizer), settings["seed"], settings["hidden"], settings["layers"]).save_pretrained(base)
    tokenizer.save_pretrained(base)
    summary = train(from_dict({**SFT, "model_name_or_path": str(base), "dataset": str(data["reviews"]),
                               "eval_dataset": str(data["reviews_val"]), "num_train_epochs": settings["sft_epochs"],
                               "seed": settings["seed"], "output_dir": str(folder), **NO_CHECKPOINTS},
                              "preftune demo (sft)"))
    result = {"settings": model_settings, "perplexity": [summary["baseline"]["eval_perplexity"],
                                                         summary["final"]["eval_perplexity"]],
              "seconds": summary["timings"]["elapsed_seconds"]}
    write_atomic(marker, json.dumps(result, indent=1))
    return folder, {**result, "cached": False}


SAMPLE_FILES = {"samples.jsonl", "pairs.jsonl", "summary.json", SETTINGS_FILE, ".preftune.lock"}  # what sample writes


def run(settings: dict) -> dict:
    """The flow into settings["output_dir"]; returns what demo.json holds."""
    from preftune.commands import eval as eval_cmd
    from preftune.commands import sample as sample_cmd
    from preftune.demo import well_formed, write_review_data
    from preftune.train import train

    start = time.time()
    out = Path(settings["output_dir"]).expanduser()
    seed = settings["seed"]
    foreign = sorted(p.name for p in (out / "sampled").glob("*") if p.name not in SAMPLE_FILES
                     and not (p.name.startswith(".") and p.name.endswith(".tmp")))
    if foreign:  # the earlier samples are deleted below: only when they are all the demo's own
        raise ConfigError(f"--output_dir: {out / 'sampled'} holds {', '.join(foreign[:3])}, which the demo did not "
                          "write and would delete; choose another --output_dir")
    data = write_review_data(out / "data", seed, settings["reviews"], settings["prompts"], settings["eval_prompts"])
    seconds = {}

    t = time.time()
    sft, sft_report = sft_model(settings, data)
    seconds["sft"] = time.time() - t

    t = time.time()
    # sample resumes a folder it finds; samples of an earlier run (maybe another SFT model) are not ours
    shutil.rmtree(out / "sampled", ignore_errors=True)
    sampled = sample_cmd.run(from_dict({**SAMPLING, "model_name_or_path": str(sft), "dataset": str(data["prompts"]),
                                        "seed": seed, "output_dir": str(out / "sampled")}, "preftune demo (sample)"))
    seconds["sample"] = time.time() - t

    t = time.time()
    sweep = len(settings["betas"]) > 1
    runs = {}  # DPO output folder -> (beta, summary)
    for beta in settings["betas"]:
        folder = out / (f"dpo_beta{beta:g}" if sweep else "dpo")
        runs[str(folder)] = beta, train(from_dict(
            {**DPO, "model_name_or_path": str(sft), "dataset": sampled["outputs"]["pairs"], "pref_beta": beta,
             "seed": seed, "output_dir": str(folder), "overwrite_output_dir": True, **NO_CHECKPOINTS},
            "preftune demo (dpo)"))
    seconds["dpo"] = time.time() - t

    t = time.time()
    report = eval_cmd.run(from_dict({**SAMPLING, "model_name_or_path": ",".join(runs), "prompts": str(data["eval_prompts"]),
                                     "seed": seed, "output_dir": str(out / "eval")}, "preftune demo (eval)"))
    seconds["eval"] = time.time() - t
    seconds["total"] = time.time() - start

    reference = report["reference"]
    records = read_jsonl(out / "eval" / "samples.jsonl")

    def share_well_formed(completions):
        return sum(well_formed(c["text"]) for c in completions) / len(completions)

    models = []
    for row in report["models"]:
        beta, summary = runs[row["model"]]
        p = row["prompts"]
        models.append({"model": row["model"], "beta": beta, "reward": p["reward"], "reward_stderr": p["reward_stderr"],
                       # standard errors added in quadrature, as for independent samples; the two share
                       # prompts and sampling seeds, which correlates them positively, so this errs large
                       "lift": p["reward"] - reference["reward"],
                       "lift_stderr": math.hypot(p["reward_stderr"], reference["reward_stderr"]),
                       "win_rate": p["win_rate_vs_reference"], "kl_per_sequence": p["kl_per_sequence"],
                       "kl_per_sequence_stderr": p["kl_per_sequence_stderr"],
                       "heldout_accuracy": [summary["baseline"]["eval_rewards/accuracies"],
                                            summary["final"]["eval_rewards/accuracies"]],
                       "mean_length": p["mean_length"],
                       "well_formed": share_well_formed([c for r in records for c in r["models"][row["model"]]])})
    result = {"settings": {k: v for k, v in settings.items() if k != "betas"}, "sft_model": str(sft), "sft": sft_report,
              "sample": {"pairs": sampled["pairs"], "skipped": sampled["skipped"], "reward": sampled["reward"]["mean"],
                         "completions_per_second": sampled["completions_per_second"]},
              "reference": {"reward": reference["reward"], "reward_stderr": reference["reward_stderr"],
                            "mean_length": reference["mean_length"],
                            "well_formed": share_well_formed([c for r in records for c in r["reference"]])},
              "models": models, "eval_prompts": reference["prompts"], "completions_per_prompt": SAMPLING["num_samples"],
              "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "outputs": {"samples": str(out / "eval" / "samples.jsonl"), "frontier": str(out / "eval" / "frontier.png")}}
    write_atomic(out / "demo.json", json.dumps(result, indent=1))
    return result


def before_after(samples_path: Path, models: list[dict], n: int) -> str:
    """The first completion of the first `n` evaluation prompts: the SFT model's, then each DPO model's."""
    lines = []
    records = read_jsonl(samples_path)[:n]
    width = max(len(f"after (beta {m['beta']:g})") for m in models) if len(models) > 1 else len("before")
    for rec in records:
        lines.append(rec["prompt"])
        first = rec["reference"][0]
        lines.append(f"  {'before':{width}s} {first['reward']:+.2f}  {first['text'].strip()}")
        for m in models:
            label = f"after (beta {m['beta']:g})" if len(models) > 1 else "after"
            c = rec["models"][m["model"]][0]
            lines.append(f"  {label:{width}s} {c['reward']:+.2f}  {c['text'].strip()}")
    return "\n".join(lines)


def print_report(result: dict) -> None:
    models, ref = result["models"], result["reference"]
    print(f"\nBefore (the SFT model) and after (DPO): the first completion of {SHOW} held-out prompts and its "
          "reward\n(-1: only negative words ... +1: only positive ones; the same sampling seed for both models):\n")
    print(before_after(Path(result["outputs"]["samples"]), models, SHOW))
    print(f"\nSentiment reward on {result['eval_prompts']} held-out prompts x {result['completions_per_prompt']} "
          "completions (mean +- standard error); KL in nats\nper completion; well-formed: every sentence is one "
          "of the corpus's sentence forms; mean length in tokens:")
    row = "  {:16s} {:16s} {:16s} {:>8s}  {:18s} {:>11s} {:>7s}"
    print(row.format("model", "reward", "lift over SFT", "win rate", "KL (nats/sequence)", "well-formed", "length"))
    print(row.format("SFT (reference)", f"{ref['reward']:+.3f} +- {ref['reward_stderr']:.3f}", "", "", "",
                     f"{ref['well_formed']:.1%}", f"{ref['mean_length']:.1f}"))
    for m in models:
        print(row.format(f"DPO beta {m['beta']:g}", f"{m['reward']:+.3f} +- {m['reward_stderr']:.3f}",
                         f"{m['lift']:+.3f} +- {m['lift_stderr']:.3f}", f"{m['win_rate']:.1%}",
                         f"{m['kl_per_sequence']:.2f} +- {m['kl_per_sequence_stderr']:.2f}", f"{m['well_formed']:.1%}",
                         f"{m['mean_length']:.1f}"))
    for m in models:
        before, after = m["heldout_accuracy"]
        print(f"held-out preference accuracy of the DPO run (beta {m['beta']:g}): {before:.1%} -> {after:.1%}")
    sft = result["sft"]
    print(f"SFT model: held-out perplexity {sft['perplexity'][0]:.3g} -> {sft['perplexity'][1]:.3g}"
          + (" (cached)" if sft["cached"] else f", trained in {sft['seconds']:.0f} s") + f": {result['sft_model']}")
    s = result["seconds"]
    print(f"seconds: sft {s['sft']:.0f}, sample {s['sample']:.0f}, dpo {s['dpo']:.0f}, eval {s['eval']:.0f}, "
          f"total {s['total']:.0f}")
    out = Path(result["settings"]["output_dir"])
    print(f"written: {out / 'demo.json'}, {result['outputs']['samples']} (every completion), "
          f"{result['outputs']['frontier']} (reward vs KL per sequence)")


def vision_settings_from(found: dict) -> dict:
    """--vision's flags in their defaults' types, checked."""
    settings = typed(found, VISION_FLAGS)
    if not (settings["beta"] > 0 and math.isfinite(settings["beta"])):
        raise ConfigError(f"--beta must be a positive number; got {settings['beta']}")
    for name in ("pairs", "eval_pairs"):
        if settings[name] < 1:
            raise ConfigError(f"--{name} must be at least 1; got {settings[name]}")
    if not settings["epochs"] > 0:
        raise ConfigError(f"--epochs must be positive; got {settings['epochs']}")
    return settings


def run_vision(settings: dict) -> dict:
    """The vision demo into settings["output_dir"]: data/ (LLaMA-Factory's format), base_model/ (the tiny Qwen2-VL),
    dpo/ (`preftune train`'s run); returns what demo.json holds."""
    from preftune.demo_vision import DATASETS, build_model, write_data
    from preftune.train import train

    start = time.time()
    out = Path(settings["output_dir"]).expanduser()
    data = write_data(out / "data", settings["pairs"], settings["eval_pairs"], settings["seed"])
    model = build_model(out / "base_model", settings["seed"])
    summary = train(from_dict({**VISION_DPO, "model_name_or_path": str(model), "dataset_dir": str(data),
                               "dataset": DATASETS["train"], "eval_dataset": DATASETS["val"],
                               "pref_beta": settings["beta"], "num_train_epochs": settings["epochs"],
                               "seed": settings["seed"], "output_dir": str(out / "dpo"), "overwrite_output_dir": True},
                              "preftune demo --vision"))
    result = {"settings": settings, "heldout_accuracy": [summary["baseline"]["eval_rewards/accuracies"],
                                                         summary["final"]["eval_rewards/accuracies"]],
              "heldout_margin": [summary["baseline"]["eval_rewards/margins"], summary["final"]["eval_rewards/margins"]],
              "seconds": round(time.time() - start, 1),
              "outputs": {"data": str(data), "base_model": str(model), "dpo": str(out / "dpo"),
                          "config": str(out / "dpo" / "preftune_config.yaml")}}
    write_atomic(out / "demo.json", json.dumps(result, indent=1))
    return result


def print_vision_report(result: dict) -> None:
    (before, after), s, o = result["heldout_accuracy"], result["settings"], result["outputs"]
    print(f"\nHeld-out preference accuracy ({s['eval_pairs']} pairs, on images the model never saw; chance is 50%: "
          "the question and\nthe two answers alone cannot tell which answer is right):\n"
          f"  before DPO {before:.1%}  ->  after DPO {after:.1%}  (mean reward margin {result['heldout_margin'][1]:+.2f})")
    print(f"seconds: {result['seconds']:.0f}")
    print(f"written: {o['data']} (LLaMA-Factory's format: dataset_info.json, images/), {o['base_model']} (the tiny "
          f"Qwen2-VL), {o['dpo']} (the trained model)\nthe same run: preftune train {o['config']}")


def main(args: list[str]) -> int:
    # --config FILE holds the demo's options only (it writes its steps' configs itself): any other key is a mistake
    vision = "--vision" in args
    flags = VISION_FLAGS if vision else FLAGS
    line = parse_command_line(args, flags={**dict.fromkeys(flags), "vision": False})
    line.flags.pop("vision")
    found = load_options("demo", line, {name: default for name, (default, _) in flags.items()})
    if vision:
        settings = vision_settings_from(found)
        with guard.claim_output_dir(settings["output_dir"], []):
            result = run_vision(settings)
        print_vision_report(result)
        return 0
    settings = settings_from(found)
    with guard.claim_output_dir(settings["output_dir"], []):
        result = run(settings)
    print_report(result)
    return 0
