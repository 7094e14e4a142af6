"""Regenerate the measured table of docs/losses.md: every loss trained on the embedded demo task.

Each `pref_loss` in preftune.config.LOSS_NAMES, and DPO with each option of `VARIANTS` (f-divergences,
LD-DPO, WPO), trains the demo's tiny model on the demo's built-in pairs with the demo's settings
(pref_beta 0.1, same seed, data and steps; label_smoothing 0.1 where a loss needs it), and the
held-out preference accuracy, reward margin and per-token KL to the reference at the end are
written between the markers in docs/losses.md. `kto` trains on the pairs split into desirable and
undesirable examples; its held-out pairs are then scored pairwise like the others' (`pairwise_eval`).

    PYTHONPATH=. .venv/bin/python docs/compare_losses.py [--epochs 3] [--only kto,ld_alpha=0.5]

--only measures the named rows alone and replaces (or adds) just those rows of the table.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from transformers.utils import logging as hf_logging

from preftune.config import LOSS_NAMES
from preftune.demo import demo_config
from preftune.train import train

DOC = Path(__file__).parent / "losses.md"
BEGIN, END = "<!-- measured: begin -->", "<!-- measured: end -->"
NEEDS_SMOOTHING = {"exo_pair"}
# DPO (sigmoid) with one option each: row label -> config overrides
VARIANTS = {
    "f_divergence_type=forward_kl": {"f_divergence_type": "forward_kl"},
    "f_divergence_type=js_divergence": {"f_divergence_type": "js_divergence"},
    "f_divergence_type=alpha_divergence": {"f_divergence_type": "alpha_divergence"},  # alpha 0.5
    "ld_alpha=0.5": {"ld_alpha": 0.5},
    "use_weighting": {"use_weighting": True},
}
HEADER = "| `pref_loss` | held-out preference accuracy | reward margin | KL to reference (nats per token) |"


def pairwise_eval(cfg) -> dict:
    """DPO's held-out statistics of the model a run saved in cfg.output_dir, against the demo's
    starting model as reference: for kto, whose own evaluation is per example, not per pair."""
    import torch
    from accelerate import Accelerator

    from preftune.config import from_dict
    from preftune.data import load_pairs
    from preftune.engines import OneProcess
    from preftune.evaluate import evaluate
    from preftune.models import load_tokenizer
    from preftune.reference import load_models
    from preftune.step import LogpsModule, PreferenceStep
    from preftune.tokenization import tokenize_pairs

    raw = {**cfg.to_dict(), "pref_loss": "sigmoid", "kto_chosen_weight": 1.0, "kto_rejected_weight": 1.0,
           "model_name_or_path": cfg.output_dir, "ref_model": cfg.model_name_or_path}
    sigmoid = from_dict(raw, "pairwise evaluation")
    tokenizer = load_tokenizer(sigmoid.model_name_or_path)
    val = tokenize_pairs(tokenizer, load_pairs(sigmoid)[1], sigmoid.cutoff_len, sigmoid.template)
    policy, reference = load_models(sigmoid)
    with torch.no_grad():
        return evaluate(PreferenceStep(sigmoid), LogpsModule(policy, sigmoid.logps_chunk_size), reference, val,
                        sigmoid.eval_batch_size, tokenizer.pad_token_id,
                        OneProcess(sigmoid, Accelerator(cpu=not torch.cuda.is_available())))


def measure(name: str, epochs: float, workdir: Path) -> dict:
    over = {"pref_loss": name if name in LOSS_NAMES else "sigmoid", **VARIANTS.get(name, {}),
            "num_train_epochs": epochs, "output_dir": str(workdir / name), "progress_bar": False,
            "plot_loss": False}
    if name in NEEDS_SMOOTHING:
        over["label_smoothing"] = 0.1
    cfg = demo_config(over)
    final = train(cfg)["final"]
    if cfg.is_kto:
        final = pairwise_eval(cfg)
    return {"accuracy": final["eval_rewards/accuracies"], "margin": final["eval_rewards/margins"],
            "kl": final.get("eval_kl_per_token"), "loss": final["eval_loss"]}


def row(name: str, r: dict) -> str:
    kl = "n/a" if r["kl"] is None else f"{r['kl']:.3f}"
    label = f"`{name}`" if name in LOSS_NAMES else f"`sigmoid`, `{name}`"
    return f"| {label} | {r['accuracy']:.1%} | {r['margin']:.2f} | {kl} |"


def table(results: dict, epochs: float) -> str:
    lines = [f"Measured by `docs/compare_losses.py` on the embedded demo task (`preftune train` with no config: "
             f"a random-init 2-layer Qwen2-architecture model, 800 train / 200 held-out pairs, {epochs:g} epochs, "
             "pref_beta 0.1, lr 1e-3, same seed; label_smoothing 0.1 for exo_pair). Held-out values at the end; "
             "the start is 50% accuracy, margin 0, KL 0. One tiny task and one beta: a sanity comparison, "
             "not a ranking of the methods.", "", HEADER, "|---|---|---|---|"]
    return "\n".join(lines + [row(name, r) for name, r in results.items()])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--only", default=None, help="comma list of row names to measure alone (others kept)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    hf_logging.disable_progress_bar()
    names = args.only.split(",") if args.only else list(LOSS_NAMES) + list(VARIANTS)
    unknown = [n for n in names if n not in LOSS_NAMES and n not in VARIANTS]
    if unknown:
        raise SystemExit(f"--only: unknown rows {unknown}; choose from {list(LOSS_NAMES) + list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.only:  # each row into the table as soon as it is measured
            for name in names:
                write_block({name: measure(name, args.epochs, Path(tmp))}, args.epochs, replace_rows=True)
        else:
            write_block({name: measure(name, args.epochs, Path(tmp)) for name in names}, args.epochs)


def write_block(results: dict, epochs: float, replace_rows: bool = False) -> None:
    """The whole measured block, or (replace_rows) the existing table with these rows replaced or added."""
    text = DOC.read_text(encoding="utf-8")
    if replace_rows:
        old = text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n").splitlines()
        kept = [line for line in old if not any(line.startswith(row(n, r).split(" | ")[0] + " |")
                                                for n, r in results.items())]
        block = "\n".join(kept + [row(name, r) for name, r in results.items()])
    else:
        block = table(results, epochs)
    block = f"{BEGIN}\n{block}\n{END}"
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Measured on the demo task\n\n" + block + "\n"
    DOC.write_text(text, encoding="utf-8")
    print(block, flush=True)


if __name__ == "__main__":
    main()
