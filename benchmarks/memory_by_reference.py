"""Peak memory of each way to get the reference model, on one model, through `preftune.train`.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/memory_by_reference.py            # prints a Markdown table

Each strategy trains the same randomly initialised Qwen2-architecture model (fp32, CPU) for a
few steps in its own child process and reports that process's peak resident memory
(ru_maxrss) and its resident memory after imports, so the difference is what the models,
optimizer state and activations took. CPU RSS, not GPU memory: the ratios between strategies
are what carries over (weights, gradients, AdamW state and the reference copy scale alike).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

STRATEGIES = {  # name -> config keys beyond the shared ones
    "full, frozen reference copy": {"finetuning_type": "full"},
    "full, reference-free (simpo)": {"finetuning_type": "full", "pref_loss": "simpo", "pref_beta": 2.0},
    "freeze (last 2 layers), frozen copy": {"finetuning_type": "freeze", "freeze_trainable_layers": 2},
    "lora r=16, adapter off = reference": {"finetuning_type": "lora", "lora_rank": 16},
    "lora r=16, ref_model (separate copy)": {"finetuning_type": "lora", "lora_rank": 16, "ref_model": "SAME"},
}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(name: str, work: Path, steps: int) -> dict:
    from preftune.config import from_dict
    from preftune.train import train

    after_imports = _rss_mib()
    keys = {k: (str(work / "model") if v == "SAME" else v) for k, v in STRATEGIES[name].items()}
    cfg = from_dict({"model_name_or_path": str(work / "model"), "dataset": str(work / "train.jsonl"),
                     "output_dir": str(work / "out"), "torch_dtype": "float32", "per_device_train_batch_size": 4,
                     "cutoff_len": 128, "max_steps": steps, "learning_rate": 1e-4, "logging_steps": steps,
                     "eval_strategy": "no", "progress_bar": False, "plot_loss": False, "save_adapter_only": False,
                     **keys})
    train(cfg)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"after_imports_mib": after_imports, "peak_mib": peak}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, Path(args.work), args.steps)))
        return

    from preftune.demo import build_model, build_tokenizer, make_pairs

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pairs = make_pairs(64, 0)
        (work / "train.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
        tokenizer = build_tokenizer([p[k] for p in pairs for k in ("prompt", "chosen", "rejected")])
        model = build_model(args.vocab, 0, hidden=args.hidden, layers=args.layers)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
        rows = []
        for name in STRATEGIES:
            out = subprocess.run([sys.executable, __file__, "--child", name, "--work", str(work),
                                  "--steps", str(args.steps)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((name, r["peak_mib"], r["peak_mib"] - r["after_imports_mib"]))
    print(f"model: Qwen2, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: "
          f"{n_params / 1e6:.1f}M parameters ({n_params * 4 / 2**20:.0f} MiB in fp32); {args.steps} steps, "
          "4 pairs x 128 tokens")
    print("\n| reference strategy | peak RSS (MiB) | peak - after imports (MiB) |\n|---|---:|---:|")
    for name, peak, delta in rows:
        print(f"| {name} | {peak:.0f} | {delta:.0f} |")


if __name__ == "__main__":
    main()
