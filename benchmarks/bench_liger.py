"""Peak memory and speed of a DPO training step with enable_liger_kernel against preftune's chunked LM head.

    python benchmarks/bench_liger.py                                  # CPU defaults: vocab 32768, a few minutes
    python benchmarks/bench_liger.py --vocab 16384 --steps 3 --chunk 1024

Each variant runs in its own child process (this file with `--child NAME`), so that its peak resident
set size (`ru_maxrss`) is its own. A child builds the same randomly initialised Qwen2-architecture
model (`preftune.demo.build_model`, fp32, tied embeddings), random batches of B pairs (prompt and
completion tokens), a precomputed reference (random log-probs: the same for both variants, so only the
policy's pass differs), and runs `--steps` optimizer steps of `step.PreferenceStep` through
`logps.LogpsModule` as the training loop does, after one warm-up step. It prints one `BENCH_RESULT
{json}` line: seconds per step, the peak RSS, and the peak above the RSS before the first step (what
the step itself adds: activations, logits, gradients, optimizer state).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "BENCH_RESULT "
VARIANTS = {"chunked LM head (default)": False, "enable_liger_kernel": True}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    p.add_argument("--completion", type=int, default=128, help="completion tokens")
    p.add_argument("--chunk", type=int, default=1024, help="logps_chunk_size")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> None:
    import torch

    from preftune.config import from_dict
    from preftune.demo import build_model
    from preftune.reference import Reference
    from preftune.step import LogpsModule, PreferenceStep

    torch.manual_seed(0)
    model = build_model(args.vocab, seed=0, hidden=args.hidden, layers=args.layers).train()
    B, T = args.pairs, args.prompt + args.completion
    batches = []
    for k in range(args.steps + 1):
        input_ids = torch.randint(0, args.vocab, (2 * B, T))
        completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
        completion_mask[:, args.prompt:] = 1
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                        "completion_mask": completion_mask, "index": torch.arange(k * B, (k + 1) * B)})
    table = -100 * torch.rand((args.steps + 1) * B, 2) - 300  # reference log-probs, summed over ~128 tokens
    reference = Reference(None, {"train": table}, args.chunk, "train")
    cfg = from_dict({"model_name_or_path": "m", "logps_chunk_size": args.chunk,
                     "enable_liger_kernel": VARIANTS[args.child]})
    policy, step = LogpsModule(model, args.chunk), PreferenceStep(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train_step(batch):
        out = step(policy, reference, batch)
        (out.losses.sum() / B).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.losses.mean().item()

    train_step(batches[0])  # warm-up: the optimizer state exists from here on
    before = _rss_mib()
    start = time.perf_counter()
    losses = [train_step(b) for b in batches[1:]]
    seconds = (time.perf_counter() - start) / args.steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(MARK + json.dumps({"variant": args.child, "seconds_per_step": seconds, "peak_rss_mib": peak,
                             "rss_before_steps_mib": before, "losses": losses}), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    print(f"vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, {args.pairs} pairs of "
          f"{args.prompt}+{args.completion} tokens, logps_chunk_size {args.chunk}, {args.steps} steps")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--child", name, *(argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
        rows.append(json.loads(next(line for line in out.splitlines() if line.startswith(MARK))[len(MARK):]))
    print(f"{'variant':28} {'s/step':>8} {'peak RSS MiB':>13} {'step adds MiB':>14}  losses")
    for r in rows:
        adds = r["peak_rss_mib"] - r["rss_before_steps_mib"]
        print(f"{r['variant']:28} {r['seconds_per_step']:8.2f} {r['peak_rss_mib']:13.0f} {adds:14.0f}  "
              + " ".join(f"{x:.5f}" for x in r["losses"]))


if __name__ == "__main__":
    main()
