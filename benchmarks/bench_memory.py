"""Peak memory of each way to get the reference model, on the same model, data and settings.

    python benchmarks/bench_memory.py                     # CPU defaults: a ~67M-parameter model, a few minutes
    python benchmarks/bench_memory.py --hidden 256 --layers 2 --vocab 8192   # a quick look

The parent writes a randomly initialised Qwen2-architecture model (`preftune.demo.build_model`,
fp32, big enough that weights and optimizer state dominate), a second one with other weights
(for `ref_model`), the demo's tokenizer and preference pairs to benchmarks/_work/memory/, then
trains each strategy in its own child process (this file with `--child NAME`), so each peak is
that strategy's alone. A child prints one `BENCH_RESULT {json}` line with its peak resident set
size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`, which covers model loading, the precompute
pass and training) and its RSS right after the imports. A strategy the config refuses with a
ConfigError is reported as skipped. The LoRA precompute row reads the cache the full-model
precompute rows wrote (the same reference and data), so it measures training alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MARK = "BENCH_RESULT "

# strategy -> config overrides ({work} is the work folder); the same run otherwise
STRATEGIES = {
    "separate reference copy (default)": {},
    "ref_model: another folder": {"ref_model": "{work}/other_ref"},
    "precompute_ref_log_probs, first run": {"precompute_ref_log_probs": True, "ref_logps_cache_dir": "{work}/cache"},
    "precompute_ref_log_probs, cache hit": {"precompute_ref_log_probs": True, "ref_logps_cache_dir": "{work}/cache"},
    "no reference (pref_loss: simpo)": {"pref_loss": "simpo"},
    "freeze (last 2 layers), separate reference copy": {"finetuning_type": "freeze", "freeze_trainable_layers": 2},
    "LoRA r=16, adapter-disabled policy as reference": {"finetuning_type": "lora", "lora_rank": 16},
    "LoRA r=16, ref_model: another folder": {"finetuning_type": "lora", "lora_rank": 16,
                                             "ref_model": "{work}/other_ref"},
    "LoRA r=16, precompute_ref_log_probs (cache hit)": {"finetuning_type": "lora", "lora_rank": 16,
                                                        "precompute_ref_log_probs": True,
                                                        "ref_logps_cache_dir": "{work}/cache"},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=768, help="model hidden size (intermediate = 2 x hidden)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers")
    p.add_argument("--vocab", type=int, default=32000, help="model vocabulary (LM head rows, tied to the embeddings)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per strategy")
    p.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    p.add_argument("--work", default=str(HERE / "_work" / "memory"), help="work folder (models, data, outputs)")
    p.add_argument("--json-out", default=None, help="also write the results as JSON here")
    p.add_argument("--child", choices=list(STRATEGIES), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def child(args) -> None:
    from preftune.config import from_dict
    from preftune.errors import ConfigError
    from preftune.train import train

    import_rss = _rss_mib()
    work = Path(args.work)
    raw = {"model_name_or_path": str(work / "policy"), "dataset": str(work / "train.jsonl"),
           "output_dir": str(work / "out"), "max_steps": args.steps, "per_device_train_batch_size": args.batch_size,
           "learning_rate": 1e-5, "logging_steps": args.steps, "eval_strategy": "no", "cutoff_len": 256,
           "torch_dtype": "float32", "progress_bar": False, "plot_loss": False,
           "template": "chatml"}  # the plain-string pairs through the ChatML template, as when RESULTS.md was measured
    raw.update({k: v.format(work=work) if isinstance(v, str) else v for k, v in STRATEGIES[args.child].items()})
    start = time.time()
    try:
        summary = train(from_dict(raw, "bench_memory"))
    except ConfigError as e:
        print(MARK + json.dumps({"skipped": str(e)}), flush=True)
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(MARK + json.dumps({"peak_rss_mib": peak, "import_rss_mib": import_rss, "seconds": time.time() - start,
                             "final_loss": summary["final"]["loss"]}), flush=True)


def prepare(args) -> int:
    """Writes the models, tokenizer and data; returns the parameter count."""
    from preftune.demo import build_model, build_tokenizer, make_pairs

    work = Path(args.work)
    if work.exists():
        shutil.rmtree(work)  # a stale cache would turn the first precompute run into a hit
    work.mkdir(parents=True)
    pairs = make_pairs(args.steps * args.batch_size, seed=0)
    (work / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tokenizer = build_tokenizer([p[k] for p in pairs for k in ("prompt", "chosen", "rejected")], vocab_size=400)
    for name, seed in (("policy", 0), ("other_ref", 1)):
        model = build_model(args.vocab, seed=seed, hidden=args.hidden, layers=args.layers)
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    params = prepare(args)
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocabulary {args.vocab}: {params / 1e6:.1f}M parameters, "
          f"{params * 4 / 2**20:.0f} MiB of fp32 weights; {args.steps} steps of {args.batch_size} pairs", flush=True)
    results = {}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for name in STRATEGIES:
        cmd = [sys.executable, __file__, "--child", name, "--work", args.work, "--hidden", str(args.hidden),
               "--layers", str(args.layers), "--vocab", str(args.vocab), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith(MARK)), None)
        if line is None:
            sys.exit(f"{name}: the child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len(MARK):])
        print(f"  {name}: {results[name]}", flush=True)
    print("\n| strategy | peak RSS (MiB) | peak - imports (MiB) | x fp32 weights | seconds |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        if "skipped" in r:
            print(f"| {name} | skipped | | | |")
            continue
        above = r["peak_rss_mib"] - r["import_rss_mib"]
        print(f"| {name} | {r['peak_rss_mib']:.0f} | {above:.0f} | {above / (params * 4 / 2**20):.2f} | "
              f"{r['seconds']:.0f} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"params": params, "args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
