"""Offline DPO against iterative DPO (`preftune iterate`, 3 rounds) on the demo task, at equal pairs and steps.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_rounds.py                  # seeds 0 1 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_rounds.py --seeds 0 --json-out benchmarks/_work/rounds.json

Per seed, on `preftune demo`'s task (its generated reviews, SFT model, sentiment reward, sampling and DPO
settings; the SFT model from the demo's cache, trained when missing):

- rounds     `preftune iterate`, 3 rounds: each samples a disjoint third of --prompts prompts from the current
             policy (4 completions, best vs worst), then DPO against the SFT model for the demo's
             num_train_epochs over that round's pairs (steps in proportion to the pairs it made)
- offline    `preftune sample` of the SFT model on all --prompts prompts, then DPO on the first P of its pairs
             for S steps, P and S the rounds' totals: at the demo's beta (0.1) and at each --offline_betas,
             to place offline DPO's reward-vs-KL frontier (a finished one is read back from its
             offline.json, so a rerun with more betas trains only those)

Equal pairs and optimizer steps: the demo's reward saturates at +1, so as the policy improves more of a
round's prompts get 4 equal scores and make no pair (a tie); the rounds then make fewer pairs than offline
sampling of the SFT model does, and offline DPO is held to the rounds' pairs and steps. (The earlier version
gave each round a fixed --steps_per_round: round 3 ran 16 steps on 18 to 32 pairs.)
Both are evaluated by `preftune eval` on the demo's held-out prompts against the SFT model: mean reward
(+- stderr), KL per completion to the SFT model (nats), and the share of well-formed completions; the
spread between seeds of each row is checked as `preftune eval` checks it (health.seed_outliers).
Each seed runs in this process, one after another; --jobs N runs seeds in N processes at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(__file__).resolve().parent / "_work"


def well_formed_share(eval_dir: Path, name: str) -> float:
    """The share of a model's evaluation completions that are sentences of the review templates."""
    from preftune.demo import well_formed

    texts = [c["text"] for line in (eval_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines() if line
             for c in json.loads(line)["models"][name]]
    return sum(map(well_formed, texts)) / len(texts)


def offline_run(common: dict, sampled: dict, data: dict, beta: float, pairs: int, steps: int, folder: Path) -> dict:
    """Offline DPO at `beta` on the first `pairs` pairs of `sampled` for `steps` steps into folder/model, evaluated
    into folder/eval; a finished one (folder/offline.json) is read back, so a rerun adds betas without retraining."""
    from preftune.commands import eval as eval_cmd
    from preftune.config import from_dict
    from preftune.train import train

    record = folder / "offline.json"
    if record.is_file() and (done := json.loads(record.read_text()))["pairs"] == pairs and done["steps"] == steps:
        return done
    trained = train(from_dict({**common, "pref_beta": beta, "dataset": sampled["outputs"]["pairs"],
                               "max_samples": pairs, "max_steps": steps, "output_dir": str(folder / "model"),
                               "overwrite_output_dir": True}, "bench"))
    report = eval_cmd.run(from_dict({**common, "model_name_or_path": str(folder / "model"),
                                     "prompts": str(data["eval_prompts"]), "output_dir": str(folder / "eval")},
                                    "bench"))
    p = report["models"][0]["prompts"]
    done = {"beta": beta, "pairs": pairs, "sampled_pairs": sampled["pairs"], "steps": trained["steps"]["done"],
            "reward": p["reward"], "reward_stderr": p["reward_stderr"], "kl_to_sft": p["kl_per_sequence"],
            "kl_to_sft_stderr": p["kl_per_sequence_stderr"], "mean_length": p["mean_length"],
            "well_formed": well_formed_share(folder / "eval", str(folder / "model")),
            "health": [s["name"] for s in trained["health"] if s["fired"]]}
    record.write_text(json.dumps(done, indent=1))
    return done


def run_seed(seed: int, args) -> dict:
    from preftune.commands import demo as demo_cmd
    from preftune.commands import iterate
    from preftune.commands import sample as sample_cmd
    from preftune.config import from_dict
    from preftune.demo import write_review_data

    out = WORK / f"rounds_seed{seed}"
    settings = demo_cmd.settings_from({**{k: v for k, (v, _) in demo_cmd.FLAGS.items()}, "seed": seed,
                                       "prompts": args.prompts, "eval_prompts": args.eval_prompts,
                                       "output_dir": str(out), "cache_dir": args.cache_dir})
    data = write_review_data(out / "data", seed, settings["reviews"], settings["prompts"], settings["eval_prompts"])
    start = time.time()
    sft, _ = demo_cmd.sft_model(settings, data)
    seconds = {"sft": time.time() - start}
    common = {**demo_cmd.DPO, **demo_cmd.SAMPLING, **demo_cmd.NO_CHECKPOINTS, "model_name_or_path": str(sft),
              "seed": seed, "progress_bar": False}

    # rounds: preftune iterate, a disjoint third of the prompts per round, the demo's epochs over each round's pairs
    start = time.time()
    summary = iterate.run(from_dict({**common, "dataset": str(data["prompts"]), "prompts": str(data["eval_prompts"]),
                                     "rounds": 3, "output_dir": str(out / "rounds")},
                                    "bench"))
    seconds["rounds"] = time.time() - start
    rounds = [{k: row[k] for k in ("round", "pairs", "steps", "reward", "reward_stderr", "kl_to_sft",
                                   "kl_to_sft_stderr", "mean_length")}
              | {"well_formed": well_formed_share(out / "rounds" / f"round_{row['round']}" / "eval", row["model"]),
                 "health": [h["name"] for h in row["health"]]} for row in summary["rounds"]]
    pairs, steps = sum(r["pairs"] for r in rounds), sum(r["steps"] for r in rounds)

    # offline: one sample of the SFT model on every prompt; DPO on the first `pairs` of its pairs for `steps` steps,
    # at the demo's beta and at each of --offline_betas (lower: more KL), to place offline DPO's frontier
    start = time.time()
    sampled = sample_cmd.run(from_dict({**common, "dataset": str(data["prompts"]), "output_dir": str(out / "offline"
                                                                                                       / "sample")}, "bench"))
    if sampled["pairs"] < pairs:
        raise SystemExit(f"seed {seed}: offline sampling made {sampled['pairs']} pairs, the rounds {pairs}")
    offline = [offline_run(common, sampled, data, beta, pairs, steps, out / "offline" / f"beta{beta:g}")
               for beta in dict.fromkeys([from_dict(common, "bench").pref_beta, *args.offline_betas])]
    seconds["offline"] = time.time() - start
    ties = [json.loads((out / "rounds" / f"round_{r['round']}" / "sample" / "summary.json").read_text())
            .get("skipped") for r in rounds]
    return {"seed": seed, "sft": summary["sft"], "offline": offline, "rounds": rounds, "round_skipped": ties,
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def table(runs: list[dict]) -> str:
    from preftune import health

    lines = ["| seed | run | pairs | steps | reward | KL to SFT (nats/completion) | well-formed | length |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['seed']} | SFT | | | {r['sft']['reward']:+.3f} +- {r['sft']['reward_stderr']:.3f} | 0 | | "
                     f"{r['sft']['mean_length']:.1f} |")
        for o in sorted(r["offline"], key=lambda o: o["beta"]):
            lines.append(f"| {r['seed']} | offline DPO, beta {o['beta']:g} | {o['pairs']} | {o['steps']} | "
                         f"{o['reward']:+.3f} +- {o['reward_stderr']:.3f} | {o['kl_to_sft']:.2f} +- "
                         f"{o['kl_to_sft_stderr']:.2f} | {o['well_formed']:.1%} | {o['mean_length']:.1f} |")
        pairs = steps = 0
        for row in r["rounds"]:
            pairs, steps = pairs + row["pairs"], steps + row["steps"]
            lines.append(f"| {r['seed']} | round {row['round']} | {pairs} | {steps} | {row['reward']:+.3f} +- "
                         f"{row['reward_stderr']:.3f} | {row['kl_to_sft']:.2f} +- {row['kl_to_sft_stderr']:.2f} | "
                         f"{row['well_formed']:.1%} | {row['mean_length']:.1f} |")
    if len(runs) > 1:
        def mean_sd(values, sign="+"):
            return f"{statistics.mean(values):{sign}.3f} +- {statistics.stdev(values):.3f}"
        for i, o in sorted(enumerate(runs[0]["offline"]), key=lambda io: io[1]["beta"]):
            lines.append(f"| mean +- sd | offline DPO, beta {o['beta']:g} | | | "
                         f"{mean_sd([r['offline'][i]['reward'] for r in runs])} | "
                         f"{mean_sd([r['offline'][i]['kl_to_sft'] for r in runs], '')} | | |")
        for k in range(len(runs[0]["rounds"])):
            lines.append(f"| mean +- sd | round {k + 1} | | | {mean_sd([r['rounds'][k]['reward'] for r in runs])} | "
                         f"{mean_sd([r['rounds'][k]['kl_to_sft'] for r in runs], '')} | | |")
    # the spread between seeds (health.seed_outliers, as preftune eval reports it): a seed far above the others' KL
    if len(runs) >= 3:
        lines.append("")
        groups = {f"offline DPO, beta {o['beta']:g}": [r["offline"][i] for r in runs]
                  for i, o in enumerate(runs[0]["offline"])}
        groups.update({f"round {k + 1}": [r["rounds"][k] for r in runs] for k in range(len(runs[0]["rounds"]))})
        for name, figures in groups.items():
            signals = health.seed_outliers({f"seed {r['seed']}": {"kl_per_sequence": f["kl_to_sft"],
                                                                    "reward": f["reward"], "mean_length": f["mean_length"]}
                                            for r, f in zip(runs, figures)}, 2.0)
            fired = [f"{s['run']} ({s['value']:.2g}x)" for s in signals if s["fired"]]
            top = max(s["value"] for s in signals)
            lines.append(f"seed spread, {name}: " + (", ".join(fired) + " above 2x the others' median KL" if fired
                                                        else f"no seed above 2x the others' median KL (at most {top:.2g}x)"))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prompts", type=int, default=300, help="prompts to sample pairs from (split in 3 for rounds)")
    parser.add_argument("--eval_prompts", type=int, default=100)
    parser.add_argument("--offline_betas", type=float, nargs="*", default=[0.025, 0.05, 0.2, 0.4],
                        help="offline DPO also at these betas (same pairs and steps), to place its frontier")
    parser.add_argument("--cache_dir", default="", help="the SFT models' cache (default: preftune demo's own)")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run in this many processes at once")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child process: this seed only
    args = parser.parse_args()
    if args.one is not None:
        import logging

        logging.basicConfig(level=logging.WARNING)
        print(json.dumps(run_seed(args.one, args)))
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    runs, pending = [], list(args.seeds)
    base = [a for a in sys.argv[1:]]
    while pending:  # each seed in its own process, --jobs at a time
        batch, pending = pending[:args.jobs], pending[args.jobs:]
        procs = [subprocess.Popen([sys.executable, __file__, *base, "--one", str(s)], stdout=subprocess.PIPE,
                                  text=True) for s in batch]
        for proc in procs:
            stdout, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"a seed failed (exit {proc.returncode})")
            runs.append(json.loads(stdout.strip().splitlines()[-1]))
    print(table(runs))
    if args.json_out:
        args.json_out.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
