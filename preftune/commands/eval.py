"""`preftune eval`: how one or several trained models stand against their reference.

    preftune eval --model_name_or_path out --dataset heldout.jsonl --output_dir eval_out      # on pairs
    preftune eval --model_name_or_path b0.05,b0.1,b0.5 --prompts prompts.jsonl \\
        --reward my_rewards.py:score --output_dir sweep                                       # samples + reward

On pairs (`dataset`): the statistics of training's evaluation (preference accuracy with ties as half,
margins, loss, KL per token and per sequence), from the one evaluator training uses, against the
reference the run trained with
(`ref_model`, else the one its output folder's preftune_config.yaml names). A reward model that
`preftune rm` wrote is evaluated as its training evaluated it: its pair accuracy, margins, rewards and
loss, with no reference.
On prompts (`prompts` + `reward`): `num_samples` completions per prompt from each model and from the
reference, scored by the reward: mean reward and its standard error, the win rate against the
reference's completion of the same prompt (ties half), the mean completion length, and
kl_per_sequence, the sequence-level KL estimate mean[log pi(y|x) - log pi_ref(y|x)] over the model's
own samples (nats per completion).
Writes output_dir/eval.json and eval.csv (a row per model), and with prompts samples.jsonl (a line
per prompt: {"prompt", "reference": [{"text", "reward"}], "models": {model: [...]}}, to read what
changed) and frontier.png: reward against KL per sequence, the DPO paper's Figure 2, one point per
model (the reference at KL 0).
Runs of one configuration with different seeds (3 or more whose preftune_config.yaml differ only in seed and
where they wrote) are also compared with each other: a seed whose KL per completion is above
health_max_seed_kl_ratio times the median of the others is named, with the remedy (eval.json's seed_spread).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
from pathlib import Path

from preftune import guard, health
from preftune.config import load_config, parse_command_line
from preftune.errors import ConfigError
from preftune.files import write_atomic

log = logging.getLogger("preftune")

USAGE = """usage: preftune eval --model_name_or_path M[,M2,...] [--ref_model R] [--dataset PAIRS]
                     [--prompts PROMPTS --reward module:function|REWARD_MODEL] --output_dir DIR [--key value ...]

On pairs (dataset): training's evaluation statistics against the reference. On prompts (prompts +
reward): num_samples completions per prompt from each model and the reference, scored by the reward
(mean, win rate against the reference, KL in nats per sequence, length). per_device_eval_batch_size:
pairs or prompts per batch.
"""


def _load(name: str, cfg):
    """A model folder as it is (a LoRA adapter folder merged into its base) or a hub id; and the run
    config its folder holds, if any."""
    from preftune.models import load_model
    from preftune.saved import load_full, run_config

    folder = Path(name).expanduser()
    if folder.is_dir():
        run_cfg = run_config(folder)
        # (a reward model, LoRA adapter or not, loads as the sequence classifier it is: saved.is_reward_model)
        return load_full(folder, run_cfg).float().eval(), run_cfg
    return load_model(name, cfg).eval(), None


def _reference(cfg, run_cfg, cache: dict, tokenizer):
    """(name, model) of the reference: ref_model, else the run's own; None when neither is known.
    Loaded once for every model that shares it, and checked to read the models' token ids as they do."""
    from preftune.models import check_same_tokenizer, check_vocabulary
    from preftune.reference import load_run_reference, run_reference

    if cfg.ref_model:
        name, first, what = cfg.ref_model, cfg.ref_model, "ref_model"
        loader = lambda: _load(name, cfg)[0]  # noqa: E731
    else:
        parts = run_reference(run_cfg)
        if parts is None:
            return None
        name, first, what = " + ".join(parts), parts[0], "the reference of its run"
        loader = lambda: load_run_reference(run_cfg).float().eval()  # noqa: E731
    if name not in cache:
        fix = "a reference must use the policy's tokenizer (same model family); set ref_model to one that does"
        check_same_tokenizer(tokenizer, first, what, fix, cfg.trust_remote_code)
        cache[name] = loader()
        check_vocabulary(cache[name], tokenizer, f"{what} '{first}'", fix)
    return name, cache[name]


def run_health(folder: Path, cfg) -> list[dict] | None:
    """The health report of the run that wrote `folder` (from its metric history), with this command's
    thresholds; None for a model that no preftune run wrote."""
    for metrics in ("dpo_metrics", "sft_metrics", "rm_metrics"):
        history = folder / metrics / "log_history.json"
        if history.is_file():
            return health.check(json.loads(history.read_text()), cfg.health_thresholds)
    return None


def eval_pairs(policy, reference, tokenizer, cfg, processor=None) -> dict:
    """Training's evaluation statistics on cfg.dataset's pairs (eval_ prefix dropped); a vision-language
    model's pairs, images included, through its `processor`, as training evaluates them."""
    import torch
    from accelerate import Accelerator

    from preftune.data import load_pairs
    from preftune.engines import OneProcess
    from preftune.evaluate import evaluate
    from preftune.models import router_aux_coef
    from preftune.reference import Reference
    from preftune.step import LogpsModule, PreferenceStep
    from preftune.tokenization import tokenize_pairs
    from preftune.vision import tokenize_vision_pairs

    pairs = load_pairs(cfg.__class__(**{**cfg.to_dict(), "eval_dataset": None, "val_size": 0.0}))[0]
    if processor is not None:
        items = tokenize_vision_pairs(processor, pairs, cfg)
    else:
        items = tokenize_pairs(tokenizer, pairs, cfg.cutoff_len, cfg.template, chat_kwargs=cfg.chat_template_kwargs)
    # a mixture-of-experts policy: its load-balancing loss in the loss, as in training's eval_loss
    stats = evaluate(PreferenceStep(cfg, processor=processor), LogpsModule(policy, cfg.logps_chunk_size,
                                                      router_aux_loss_coef=router_aux_coef(cfg, policy)),
                     Reference(reference, chunk_size=cfg.logps_chunk_size), items, cfg.eval_batch_size,
                     tokenizer.pad_token_id, OneProcess(cfg, Accelerator(cpu=not torch.cuda.is_available())))
    return {"pairs": len(items), **{k.removeprefix("eval_"): v for k, v in stats.items()}}


def eval_reward_pairs(model, run_cfg, tokenizer, cfg) -> dict:
    """A reward model's (`preftune rm`'s) statistics on cfg.dataset's pairs, as its training evaluated them:
    pair accuracy (ties as half), margins, mean chosen and rejected rewards, and its loss (with the run's
    center_rewards_coefficient and the pairs' margins). No reference."""
    import torch
    from accelerate import Accelerator

    from preftune.data import load_pairs
    from preftune.engines import OneProcess
    from preftune.evaluate import evaluate
    from preftune.reference import Reference
    from preftune.reward_model import RewardModule
    from preftune.step import RewardStep
    from preftune.tokenization import tokenize_pairs

    pairs = load_pairs(cfg.__class__(**{**cfg.to_dict(), "eval_dataset": None, "val_size": 0.0}))[0]
    items = tokenize_pairs(tokenizer, pairs, cfg.cutoff_len, cfg.template, chat_kwargs=cfg.chat_template_kwargs)
    stats = evaluate(RewardStep(run_cfg), RewardModule(model), Reference(), items, cfg.eval_batch_size,
                     tokenizer.pad_token_id, OneProcess(cfg, Accelerator(cpu=not torch.cuda.is_available())))
    return {"pairs": len(items), **{k.removeprefix("eval_"): v for k, v in stats.items()}}


def _samples(model, tokenizer, prompts, encoded, cfg, device, processor=None) -> list[list[list[int]]]:
    from preftune.generate import sample

    out = []
    for _, batch in sample(model.to(device), tokenizer, encoded, cfg, device,
                           images=[p.images or [] for p in prompts], processor=processor):
        out += batch
    return out  # (prompts, num_samples, completion ids)


def eval_prompts(models: dict, reference, tokenizer, cfg, processor=None, image_dir: Path | None = None
                 ) -> tuple[dict, dict, list[dict]]:
    """(per-model, reference) sampling statistics on cfg.prompts scored by cfg.reward, and the
    completions themselves: a record per prompt with the reference's and each model's, scored. A
    vision-language model's prompts, images included, through its `processor`: rendered as `preftune sample`
    renders them, sampled and scored (log-probs for the KL) with their images."""
    import torch

    from preftune.data import read_prompts
    from preftune.evaluate import completion_logps
    from preftune.generate import model_context
    from preftune.rewards import load_reward
    from preftune.tokenization import TokenizedPair
    from preftune.commands.sample import encode_to_fit, image_path
    from preftune.vision import VisionPair

    reward = load_reward(cfg.reward)
    prompts = read_prompts(cfg.prompts, cfg.dataset_dir, cfg.max_samples, cfg.columns, key="prompts",
                           default_system=cfg.default_system)
    # every model and the reference sample and score the same prompt ids: cut to the smallest context
    contexts = [c for c in (model_context(m.config) for m in [*models.values(), reference]) if c is not None]
    context = min(contexts) if contexts else None
    encoded, cut, rendering = encode_to_fit(tokenizer, processor, prompts, cfg, context)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # a prompt's images as `preftune sample` writes them: absolute paths (embedded ones as PNGs in image_dir)
    records = [{"prompt": p.prompt, **({"images": [image_path(ref, image_dir) for ref in p.images]} if p.images else {}),
                "reference": [], "models": {}} for p in prompts]

    def scored(model, name=None):
        samples = _samples(model, tokenizer, prompts, encoded, cfg, device, processor)
        texts = [[tokenizer.decode(c, skip_special_tokens=True) for c in row] for row in samples]
        flat_prompts = [p.prompt for p, row in zip(prompts, texts) for _ in row]
        rewards = reward(flat_prompts, [t for row in texts for t in row])
        for i, (rec, row) in enumerate(zip(records, texts)):
            scored_row = [{"text": t, "reward": r} for t, r in zip(row, rewards[i * len(row):(i + 1) * len(row)])]
            if name is None:
                rec["reference"] = scored_row
            else:
                rec["models"][name] = scored_row
        return samples, rewards

    ref_samples, ref_rewards = scored(reference)
    ref_stats = _reward_stats(ref_rewards, [len(c) for row in ref_samples for c in row])
    ref_stats["kl_per_sequence"] = 0.0
    results = {}
    for name, model in models.items():
        samples, rewards = scored(model, name)
        items = [TokenizedPair(ids + c, len(ids), ids + c, len(ids)) if processor is None else
                 VisionPair(ids + c, len(ids), ids + c, len(ids), images=list(p.images or []))
                 for p, ids, row in zip(prompts, encoded, samples) for c in row]
        # log pi(y|x) - log pi_ref(y|x) of each sample, summed over its tokens: nats per sequence
        kl = completion_logps(model.to(device), items, tokenizer.pad_token_id, cfg.eval_batch_size, device, processor) \
            - completion_logps(reference.to(device), items, tokenizer.pad_token_id, cfg.eval_batch_size, device,
                               processor)
        wins = [1.0 if r > q else 0.5 if r == q else 0.0 for r, q in zip(rewards, ref_rewards)]
        results[name] = {**_reward_stats(rewards, [len(c) for row in samples for c in row]),
                         "win_rate_vs_reference": sum(wins) / len(wins), "kl_per_sequence": kl.mean().item(),
                         "kl_per_sequence_stderr": (kl.std().item() / math.sqrt(len(kl))) if len(kl) > 1 else 0.0}
    return results, {"prompts": len(prompts), "prompts_cut_to_context": cut, **ref_stats}, records


def _reward_stats(rewards: list[float], lengths: list[int]) -> dict:
    n = len(rewards)
    mean = sum(rewards) / n
    var = sum((r - mean) ** 2 for r in rewards) / (n - 1) if n > 1 else 0.0
    return {"samples": n, "reward": mean, "reward_stderr": math.sqrt(var / n), "mean_length": sum(lengths) / n}


def plot_frontier(rows: list[dict], reference: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.errorbar([0.0], [reference["reward"]], yerr=[reference["reward_stderr"]], fmt="s", color="k", label="reference")
    xs = [r["prompts"]["kl_per_sequence"] for r in rows]
    ys = [r["prompts"]["reward"] for r in rows]
    ax.errorbar(xs, ys, xerr=[r["prompts"]["kl_per_sequence_stderr"] for r in rows],
                yerr=[r["prompts"]["reward_stderr"] for r in rows], fmt="o", label="models")
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(Path(r["model"]).name or r["model"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("KL(pi || pi_ref), nats per sequence, on the model's own samples")
    ax.set_ylabel("mean reward")
    ax.set_title("reward vs KL per sequence")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(cfg) -> dict:
    """Evaluate into cfg.output_dir (checked apart from the models, writable, locked); returns the report."""
    names = [n.strip() for n in (cfg.model_name_or_path or "").split(",") if n.strip()]
    if not names:
        raise ConfigError("preftune eval needs model_name_or_path (one model, or a comma list of them)")
    if not cfg.dataset and not cfg.prompts:
        raise ConfigError("preftune eval needs something to measure on: dataset (pairs) and/or prompts with reward")
    if cfg.prompts and not cfg.reward:
        raise ConfigError("prompts: scoring samples needs reward (module:function or a reward model)")
    guard.check_inputs(cfg)
    with guard.claim_output_dir(cfg.output_dir, guard.model_inputs(cfg)) as out:
        return _evaluate(cfg, names, out)


def _evaluate(cfg, names: list[str], out: Path) -> dict:
    from preftune.saved import with_run_template
    from preftune.models import check_same_tokenizer, check_vocabulary, load_tokenizer
    from preftune.vision import load_processor

    tokenizer = load_tokenizer(names[0], cfg.trust_remote_code)
    # a vision-language model's processor renders its pairs, images included (vision.py); None for a text model
    processor = load_processor(dataclasses.replace(cfg, model_name_or_path=names[0])) \
        if cfg.dataset or cfg.prompts else None
    rows, references, models, configs = [], {}, {}, {}
    for name in names:
        if name != names[0]:  # scored on the first one's token ids
            check_same_tokenizer(tokenizer, name, "model_name_or_path", "evaluate models of other tokenizers in "
                                 "separate runs", cfg.trust_remote_code, against=f"the first model '{names[0]}'")
        model, run_cfg = _load(name, cfg)
        if not rows:  # the first model's run decides how its data and prompts are rendered
            cfg = with_run_template(cfg, run_cfg)
        check_vocabulary(model, tokenizer, f"model_name_or_path '{name}'", "every model must use the first one's tokenizer")
        if run_cfg is not None and run_cfg.stage == "rm":  # a reward model: its pair accuracy, no reference
            if cfg.prompts:
                raise ConfigError(f"model_name_or_path '{name}' is a reward model (preftune rm): it scores "
                                  "completions rather than writing them; give it as --reward, or evaluate it on "
                                  "pairs (--dataset) without --prompts")
            rows.append({"model": name, "reference": "none (a reward model)", "health": run_health(Path(name)
                         .expanduser(), cfg), **({"pairs": eval_reward_pairs(model, run_cfg, tokenizer, cfg)}
                                                 if cfg.dataset else {})})
            continue
        ref = _reference(cfg, run_cfg, references, tokenizer)
        if ref is None:
            raise ConfigError(f"model_name_or_path '{name}': no reference known (its folder has no preftune_config.yaml "
                              "naming one); set ref_model")
        row = {"model": name, "reference": ref[0]}
        if cfg.dataset:
            row["pairs"] = eval_pairs(model, ref[1], tokenizer, cfg, processor)
        row["health"] = run_health(Path(name).expanduser(), cfg)
        rows.append(row)
        models[name] = model
        if run_cfg is not None:
            configs[name] = run_cfg.to_dict()
    reference_stats = None
    if cfg.prompts:
        if len({row["reference"] for row in rows}) > 1:
            raise ConfigError("prompts: the models have different references; evaluate them separately (or set ref_model)")
        per_model, reference_stats, records = eval_prompts(models, references[rows[0]["reference"]], tokenizer, cfg,
                                                           processor, out / "images")
        for row in rows:
            row["prompts"] = per_model[row["model"]]
    out.mkdir(parents=True, exist_ok=True)
    if cfg.prompts:
        write_atomic(out / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    report = {"models": rows, "reference": reference_stats, "seed_spread": seed_spread(rows, configs, cfg),
              "config": cfg.to_dict()}
    write_atomic(out / "eval.json", json.dumps(report, indent=1, default=str))
    flat = [{"model": r["model"], "reference": r["reference"],
             **{f"{part}/{k}": v for part in ("pairs", "prompts") for k, v in (r.get(part) or {}).items()}}
            for r in rows]
    columns = list(dict.fromkeys(k for row in flat for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    write_atomic(out / "eval.csv", buffer.getvalue())
    if reference_stats:
        plot_frontier(rows, reference_stats, out / "frontier.png")
    return report


def seed_spread(rows: list[dict], configs: dict[str, dict], cfg) -> list[dict]:
    """For each group of the evaluated runs that are one configuration with different seeds (health.seed_groups:
    3 or more), {runs, source, signals}: each run's seed_spread record (health.seed_outliers) on its KL per
    completion: on the prompts' samples where they were evaluated, else along the pairs' completions."""
    source = "prompts" if any("prompts" in r for r in rows) else "pairs"
    figures = {r["model"]: r[source] for r in rows if source in r and "kl_per_sequence" in r[source]}
    return [{"runs": group, "source": source,
             "signals": health.seed_outliers({n: figures[n] for n in group}, cfg.health_max_seed_kl_ratio)}
            for group in health.seed_groups({n: c for n, c in configs.items() if n in figures})]


def main(args: list[str]) -> int:
    config_path, overrides, _ = parse_command_line(args)
    report = run(load_config(config_path, overrides))
    for row in report["models"]:
        line = f"{row['model']} (reference: {row['reference']})"
        if "pairs" in row:
            p = row["pairs"]
            line += (f"\n  pairs    {p['pairs']}: accuracy {p['rewards/accuracies']:.1%}, margin "
                     f"{p['rewards/margins']:.3f}, loss {p['loss']:.4f}"
                     + (f", KL {p['kl_per_token']:.4f} nats/token, {p['kl_per_sequence']:.3f} nats/sequence"
                        if "kl_per_token" in p else ""))
        for signal in row["health"] or []:
            if signal["fired"]:
                line += (f"\n  health   {signal['name']} = {signal['value']:.4g} (threshold {signal['threshold']:g}, "
                         f"{signal['unit']}) from step {signal['step']} of its run: {signal['remedy']}")
        if "prompts" in row:
            s = row["prompts"]
            line += (f"\n  prompts  reward {s['reward']:.3f} +- {s['reward_stderr']:.3f}, win rate vs reference "
                     f"{s['win_rate_vs_reference']:.1%}, KL {s['kl_per_sequence']:.3f} nats/sequence, mean length "
                     f"{s['mean_length']:.1f}")
        print(line)
    for group in report["seed_spread"]:
        kls = [s["kl_per_sequence"] for s in group["signals"]]
        print(f"seeds    {len(group['runs'])} runs of one configuration, KL per completion ({group['source']}) "
              f"{min(kls):.3g} to {max(kls):.3g} nats")
        fired = [s for s in group["signals"] if s["fired"]]
        for signal in fired:
            print(f"  health   {health.describe_seed_outlier(signal)}")
        if not fired:
            print(f"  health   no seed above {group['signals'][0]['threshold']:g}x the median KL of the others")
    if report["reference"]:
        r = report["reference"]
        print(f"reference prompts reward {r['reward']:.3f} +- {r['reward_stderr']:.3f}, mean length {r['mean_length']:.1f}")
    print(f"written: {Path(report['config']['output_dir']) / 'eval.json'}, eval.csv"
          + (", samples.jsonl, frontier.png" if report["reference"] else ""))
    return 0
