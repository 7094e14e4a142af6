"""Peak memory of a loss with the reference (sigmoid, DPO) against a reference-free one (simpo).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_reference_free.py          # CPU, about a minute

The same model, data and settings as benchmarks/bench_dpo.py (its `make_assets`), trained by
preftune for a few steps once per loss, each in its own child process so that each peak RSS
(`ru_maxrss`) is its own. A reference-free loss loads no reference model and runs no reference
forward, so its peak should be lower by about one copy of the weights (fp32: 4 bytes a parameter)
plus what the reference forward holds at once. The table prints both, the saving, and the
weights' size for comparison.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench_dpo: the shared model and data
MARK = "BENCH_RESULT "
LOSSES = {"sigmoid": 0.1, "simpo": 2.0}  # loss -> beta


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per loss")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    p.add_argument("--hidden", type=int, default=512, help="model hidden size")
    p.add_argument("--layers", type=int, default=8, help="decoder layers")
    p.add_argument("--vocab", type=int, default=32768, help="model vocabulary")
    p.add_argument("--seq-len", type=int, default=128, help="target tokens per sequence")
    p.add_argument("--work", default=str(HERE / "_work" / "reference_free"), help="work folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=list(LOSSES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # the fields bench_dpo.make_assets reads
    args.pairs, args.lr, args.beta, args.logging_steps, args.bf16 = None, 1e-4, 0.1, None, False
    return args


def child(args, assets) -> dict:
    import bench_dpo

    import preftune.train as pt
    from preftune.config import from_dict

    import_rss = bench_dpo._rss_mib()
    cfg = from_dict({
        "model_name_or_path": assets["model_dir"], "dataset": assets["data"],
        "output_dir": str(Path(args.work) / f"out_{args.child}"), "pref_loss": args.child,
        "pref_beta": LOSSES[args.child], "learning_rate": 1e-4, "per_device_train_batch_size": args.batch_size,
        "max_steps": args.steps, "logging_steps": args.steps, "cutoff_len": assets["max_length"] + 8,
        "torch_dtype": "float32", "progress_bar": False, "eval_strategy": "no", "plot_loss": False,
    }, "bench")
    pt.train(cfg)
    return {"loss": args.child, **bench_dpo.memory(import_rss)}


def main(argv=None):
    args = parse_args(argv)
    import bench_dpo

    if args.child:
        assets = json.loads((Path(args.work) / "assets.json").read_text())
        print(MARK + json.dumps(child(args, assets)), flush=True)
        return
    assets = bench_dpo.make_assets(args)
    (Path(args.work) / "assets.json").write_text(json.dumps(assets))
    results = {}
    for loss in LOSSES:
        out = subprocess.run([sys.executable, __file__, "--child", loss, *(argv or sys.argv[1:])],
                             capture_output=True, text=True)
        line = next((l for l in out.stdout.splitlines() if l.startswith(MARK)), None)
        if line is None:
            raise SystemExit(f"{loss} child failed:\n{out.stderr[-3000:]}")
        results[loss] = json.loads(line[len(MARK):])
    weights_mib = assets["params"] * 4 / 2**20
    sig, sim = results["sigmoid"], results["simpo"]
    print(f"model: {assets['params'] / 1e6:.1f}M parameters, fp32 weights {weights_mib:.0f} MiB; "
          f"{args.steps} steps of {args.batch_size} pairs, sequences {assets['seq_len_min']}-{assets['seq_len_max']} tokens")
    print("| | sigmoid (reference) | simpo (reference-free) | saved |")
    print("|---|---:|---:|---:|")
    for key, name in (("peak_rss_mib", "peak RSS (MiB)"), ("peak_rss_over_imports_mib", "peak RSS - imports (MiB)")):
        print(f"| {name} | {sig[key]:.0f} | {sim[key]:.0f} | {sig[key] - sim[key]:.0f} |")
    print(f"| one copy of the weights (MiB) | | | {weights_mib:.0f} |")


if __name__ == "__main__":
    main()
