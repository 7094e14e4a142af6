"""Offline DPO against iterative DPO (`preftune iterate`, 3 rounds) on the demo task, at equal pairs and steps.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_rounds.py                  # seeds 0 1 2
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_rounds.py --seeds 0 --json-out benchmarks/_work/rounds.json

Per seed, on `preftune demo`'s task (its generated reviews, SFT model, sentiment reward, sampling and DPO
settings; the SFT model from the demo's cache, trained when missing):

- offline    `preftune sample` of the SFT model on all --prompts prompts (4 completions, best vs worst), then
             DPO on those pairs for 3 x --steps_per_round steps
- rounds     `preftune iterate`, 3 rounds: each samples a disjoint third of the same prompts from the current
             policy, then DPO for --steps_per_round steps against the SFT model

The same prompts, sampling, DPO settings and total optimizer steps; about the same pairs (ties are skipped).
Both are evaluated by `preftune eval` on the demo's held-out prompts against the SFT model: mean reward
(+- stderr), KL per completion to the SFT model (nats), and the share of well-formed completions.
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


def run_seed(seed: int, args) -> dict:
    from preftune.commands import demo as demo_cmd
    from preftune.commands import eval as eval_cmd
    from preftune.commands import iterate
    from preftune.commands import sample as sample_cmd
    from preftune.config import from_dict
    from preftune.demo import write_review_data
    from preftune.train import train

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

    # offline: one sample of the SFT model on every prompt, DPO for all the steps
    start = time.time()
    sampled = sample_cmd.run(from_dict({**common, "dataset": str(data["prompts"]), "output_dir": str(out / "offline"
                                                                                                       / "sample")}, "bench"))
    trained = train(from_dict({**common, "dataset": sampled["outputs"]["pairs"], "max_steps": 3 * args.steps_per_round,
                               "output_dir": str(out / "offline" / "model"), "overwrite_output_dir": True}, "bench"))
    report = eval_cmd.run(from_dict({**common, "model_name_or_path": str(out / "offline" / "model"),
                                     "prompts": str(data["eval_prompts"]), "output_dir": str(out / "offline" / "eval")},
                                    "bench"))
    seconds["offline"] = time.time() - start
    p = report["models"][0]["prompts"]
    offline = {"pairs": sampled["pairs"], "steps": trained["steps"]["done"], "reward": p["reward"],
               "reward_stderr": p["reward_stderr"], "kl_to_sft": p["kl_per_sequence"],
               "kl_to_sft_stderr": p["kl_per_sequence_stderr"], "mean_length": p["mean_length"],
               "well_formed": well_formed_share(out / "offline" / "eval", str(out / "offline" / "model"))}

    # rounds: preftune iterate, a disjoint third of the prompts and a third of the steps per round
    start = time.time()
    summary = iterate.run(from_dict({**common, "dataset": str(data["prompts"]), "prompts": str(data["eval_prompts"]),
                                     "rounds": 3, "max_steps": args.steps_per_round,
                                     "output_dir": str(out / "rounds")}, "bench"))
    seconds["rounds"] = time.time() - start
    rounds = [{k: row[k] for k in ("round", "pairs", "steps", "reward", "reward_stderr", "kl_to_sft",
                                   "kl_to_sft_stderr", "mean_length")}
              | {"well_formed": well_formed_share(out / "rounds" / f"round_{row['round']}" / "eval", row["model"]),
                 "health": [h["name"] for h in row["health"]]} for row in summary["rounds"]]
    return {"seed": seed, "sft": summary["sft"], "offline": offline, "rounds": rounds,
            "offline_health": [s["name"] for s in trained["health"] if s["fired"]],
            "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def table(runs: list[dict]) -> str:
    lines = ["| seed | run | pairs | steps | reward | KL to SFT (nats/completion) | well-formed | length |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['seed']} | SFT | | | {r['sft']['reward']:+.3f} +- {r['sft']['reward_stderr']:.3f} | 0 | | "
                     f"{r['sft']['mean_length']:.1f} |")
        o = r["offline"]
        lines.append(f"| {r['seed']} | offline DPO | {o['pairs']} | {o['steps']} | {o['reward']:+.3f} +- "
                     f"{o['reward_stderr']:.3f} | {o['kl_to_sft']:.2f} +- {o['kl_to_sft_stderr']:.2f} | "
                     f"{o['well_formed']:.1%} | {o['mean_length']:.1f} |")
        pairs = steps = 0
        for row in r["rounds"]:
            pairs, steps = pairs + row["pairs"], steps + row["steps"]
            lines.append(f"| {r['seed']} | round {row['round']} | {pairs} | {steps} | {row['reward']:+.3f} +- "
                         f"{row['reward_stderr']:.3f} | {row['kl_to_sft']:.2f} +- {row['kl_to_sft_stderr']:.2f} | "
                         f"{row['well_formed']:.1%} | {row['mean_length']:.1f} |")
    if len(runs) > 1:
        def mean_sd(values):
            return f"{statistics.mean(values):+.3f} +- {statistics.stdev(values):.3f}"
        lines.append(f"| mean +- sd | offline DPO | | | {mean_sd([r['offline']['reward'] for r in runs])} | "
                     f"{mean_sd([r['offline']['kl_to_sft'] for r in runs])} | | |")
        lines.append(f"| mean +- sd | round 3 | | | {mean_sd([r['rounds'][-1]['reward'] for r in runs])} | "
                     f"{mean_sd([r['rounds'][-1]['kl_to_sft'] for r in runs])} | | |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prompts", type=int, default=300, help="prompts to sample pairs from (split in 3 for rounds)")
    parser.add_argument("--eval_prompts", type=int, default=100)
    parser.add_argument("--steps_per_round", type=int, default=16, help="offline DPO trains 3x this many steps")
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
