"""`preftune demo` over several seeds: reward lift, KL, held-out accuracy and speed, mean and spread.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_demo.py                   # seeds 0 1 2, defaults
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_demo.py --seeds 0 1 2 --json-out benchmarks/_work/demo.json

Each seed is a whole `preftune demo` run in its own process (`--seed S`: its own corpus, initialisation,
SFT, samples, DPO and evaluation), into benchmarks/_work/demo_seed<S>/, with an SFT cache that starts
empty (benchmarks/_work/demo_cache/), so every SFT model is trained and timed. The figures are each
run's demo.json; the load average is printed beside them, because other processes on the machine slow
a CPU run down (on 2 cores, several times).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORK = Path(__file__).resolve().parent / "_work"


def spread(values: list[float]) -> str:
    """mean +- sample standard deviation [min, max]"""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {sd:.3f} [{min(values):.3f}, {max(values):.3f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("demo_args", nargs="*", help="more `preftune demo` options, after --")
    args = parser.parse_args()
    cache = WORK / "demo_cache"
    shutil.rmtree(cache, ignore_errors=True)
    runs = []
    for seed in args.seeds:
        out = WORK / f"demo_seed{seed}"
        load_before = os.getloadavg()[0]
        start = time.time()
        subprocess.run([sys.executable, "-m", "preftune", "demo", "--seed", str(seed), "--output_dir", str(out),
                        "--cache_dir", str(cache), *args.demo_args], check=True, stdout=subprocess.DEVNULL)
        wall = time.time() - start
        result = json.loads((out / "demo.json").read_text())
        (model,) = result["models"]
        runs.append({"seed": seed, "wall_seconds": round(wall, 1), "load_before": load_before,
                     "load_after": os.getloadavg()[0], "sft_reward": result["reference"]["reward"],
                     "dpo_reward": model["reward"], "lift": model["lift"], "lift_stderr": model["lift_stderr"],
                     "kl_per_sequence": model["kl_per_sequence"], "win_rate": model["win_rate"],
                     "accuracy": model["heldout_accuracy"][1],
                     "well_formed_sft": result["reference"]["well_formed"], "well_formed_dpo": model["well_formed"],
                     "sft_perplexity": result["sft"]["perplexity"][1], "seconds": result["seconds"],
                     "completions_per_second": result["sample"]["completions_per_second"]})
        r = runs[-1]
        print(f"seed {seed}: reward {r['sft_reward']:+.3f} -> {r['dpo_reward']:+.3f} (lift {r['lift']:+.3f} +- "
              f"{r['lift_stderr']:.3f}), KL {r['kl_per_sequence']:.2f} nats/sequence, win rate {r['win_rate']:.1%}, "
              f"held-out accuracy "
              f"{r['accuracy']:.1%}, well-formed {r['well_formed_sft']:.1%} -> {r['well_formed_dpo']:.1%}, sampling "
              f"{r['completions_per_second']:.0f} completions/s, seconds {r['seconds']}, wall {wall:.0f} s, load "
              f"{load_before:.1f} -> {r['load_after']:.1f}", flush=True)
    print(f"\nover seeds {args.seeds} (mean +- standard deviation [min, max]):")
    for key in ("sft_reward", "dpo_reward", "lift", "kl_per_sequence", "win_rate", "accuracy", "well_formed_sft",
                "well_formed_dpo", "sft_perplexity", "completions_per_second", "wall_seconds"):
        print(f"  {key:24s} {spread([r[key] for r in runs])}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"runs": runs, "demo_args": args.demo_args}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
