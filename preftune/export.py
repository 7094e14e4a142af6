"""`preftune export`: a trained model cast to half precision or quantized to int8 for deployment.

    preftune export output                                   # bf16 into output-bf16/
    preftune export output --dtype int8 --out deploy/int8    # int8 weight-only (torchao)
    preftune export output --dtype fp16 --data heldout.jsonl # quality measured on these pairs

bf16/fp16 cast every floating-point weight; int8 quantizes the weights of the linear layers
(not the embeddings or the LM head) with torchao's `Int8WeightOnlyConfig` through transformers'
`TorchAoConfig`: one symmetric absmax scale per output row, computation in the model's own dtype
(docs/export.md sets this next to seed 003's per-tensor formula). Either way the folder holds
safetensors weights, the tokenizer and the generation config, and loads with plain
`AutoModelForCausalLM.from_pretrained(out)` (+ torchao for int8).

The export is written to a temporary folder beside OUT, loaded back from there and checked
(dtypes, a forward pass), measured, and only then renamed into place, so OUT is either absent
(or the previous export) or complete. What it measures goes to OUT/export_report.json: weight
bytes before and after, and on held-out pairs (`--data`, else the held-out split of the run
that wrote MODEL, read from its preftune_config.yaml) the log-prob drift between the original
and the exported model and the preference accuracy of each.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
from pathlib import Path

import torch

from preftune.errors import ConfigError, DataError, ModelError

log = logging.getLogger("preftune")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}
INT8_INSTALL = ("--dtype int8 needs torchao (PyTorch's quantization library), which is not installed: "
                "pip install 'preftune[export]' (or: pip install torchao==0.18.0)")


def _torchao_config():
    """transformers' TorchAoConfig for int8 weight-only, per-row scales; a clear line without torchao."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, PerRow
    except ImportError:
        raise ConfigError(INT8_INSTALL) from None
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig(granularity=PerRow()))


def weight_bytes(folder: Path) -> int:
    """Bytes of the weight files of a saved model (safetensors shards, or legacy .bin)."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())


def _check_model_dir(model: str) -> Path:
    src = Path(model).expanduser()
    if not src.is_dir():
        raise ModelError(f"MODEL '{model}' is not a folder; pass the output_dir of a run (or any folder "
                         "saved with save_pretrained)")
    if not (src / "config.json").is_file():
        hint = (" It holds a LoRA adapter: export the merged model" if (src / "adapter_config.json").is_file()
                else "")
        raise ModelError(f"MODEL '{model}' has no config.json, so it is not a saved transformers model.{hint}")
    if not weight_bytes(src):
        raise ModelError(f"MODEL '{model}' has no weight files (*.safetensors)")
    return src


def _load(folder: Path, dtype: str | torch.dtype = "auto", quantization_config=None):
    from transformers import AutoModelForCausalLM

    # quantization_config=None would override the one a quantized folder's config.json holds
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **extra)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load '{folder}': {first}") from None
    return model.eval()


def _quantized_linears(model) -> tuple[int, int]:
    """(linear layers whose weight is a torchao Int8Tensor, all linear layers)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(type(m.weight).__name__ == "Int8Tensor" for m in linears), len(linears)


def check_export(model, dtype: str, vocab_id: int) -> dict:
    """The reloaded export holds what was asked and runs; returns what it found."""
    found: dict = {}
    if dtype == "int8":
        n_q, n_linear = _quantized_linears(model)
        if n_q == 0:
            raise ModelError("the int8 export reloaded without quantized layers")
        found["int8_linear_layers"] = f"{n_q} of {n_linear}"  # the LM head stays in full precision
    else:
        wrong = {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != DTYPES[dtype]}
        if wrong:
            raise ModelError(f"the {dtype} export reloaded with parameters in {sorted(wrong)}")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[vocab_id, vocab_id]])).logits
    if not torch.isfinite(logits).all():
        raise ModelError(f"the {dtype} export gives non-finite logits"
                         + (" (weights beyond fp16's range of 65504: use --dtype bf16)" if dtype == "fp16" else ""))
    found["dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in model.state_dict().values()})
    return found


# --- quality on held-out pairs -----------------------------------------------------------

def heldout_pairs(src: Path, data: str | None, dataset_dir: str, max_samples: int | None):
    """Pairs to measure on, the tokenization settings, and where they came from.

    `--data` wins; else a run's output folder (preftune_config.yaml beside the weights) gives its
    own held-out split, exactly as training drew it (`load_pairs`), its cutoff_len, template and
    reference. Returns (pairs, settings dict, source text); pairs is [] when there is nothing.
    """
    from preftune.config import load_config
    from preftune.data import DataReport, check_pairs, load_pairs, read_dataset

    run_cfg = None
    if (src / "preftune_config.yaml").is_file():
        try:
            run_cfg = load_config(str(src / "preftune_config.yaml"))
        except ConfigError as e:  # e.g. written by another preftune version: --data still works
            log.warning("ignoring %s: %s", src / "preftune_config.yaml", e)
    settings = {"cutoff_len": run_cfg.cutoff_len if run_cfg else 1024, "template": run_cfg.template if run_cfg else None,
                "ref": (run_cfg.ref_model or run_cfg.model_name_or_path) if run_cfg else None}
    if data:
        report = DataReport()
        # pairs chosen == rejected or with an empty side say nothing about a preference: counted, not used
        pairs = check_pairs(read_dataset(data, dataset_dir, max_samples), drop_invalid=True, report=report)
        skipped = report.skipped_empty + report.skipped_identical
        return pairs, settings, data + (f" ({skipped} empty or identical pairs skipped)" if skipped else "")
    if run_cfg is None:
        return [], settings, None
    try:
        _, val, _ = load_pairs(run_cfg)
    except DataError as e:
        raise DataError(f"the held-out pairs of the run in {src} cannot be read ({e}); pass --data") from None
    source = f"{run_cfg.eval_dataset or 'val_size split of ' + str(run_cfg.dataset)} (from {src / 'preftune_config.yaml'})"
    return val[:max_samples] if max_samples else val, settings, source


@torch.no_grad()
def pair_logps(model, tokenized, pad_id: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (N, 2) [chosen, rejected] and completion lengths (N, 2)."""
    from preftune.batching import collate
    from preftune.logps import get_batch_logps

    logps, lengths = [], []
    for i in range(0, len(tokenized), batch_size):
        batch = collate(tokenized[i:i + batch_size], pad_id)
        lp, n = get_batch_logps(model, **batch)  # (2B,), chosen rows first
        logps.append(lp.float().view(2, -1).T)
        lengths.append(n.view(2, -1).T)
    return torch.cat(logps), torch.cat(lengths)


def quality(original: torch.Tensor, exported: torch.Tensor, lengths: torch.Tensor,
            reference: torch.Tensor | None = None) -> dict:
    """Drift and preference accuracy from (N, 2) [chosen, rejected] summed log-probs.

    Accuracy is the share of pairs where the model prefers chosen: with a reference, the DPO
    implicit reward (log pi - log pi_ref of chosen above that of rejected, TRL's
    rewards/accuracies); without one, the plain log-prob (log pi(chosen) > log pi(rejected)).
    """
    delta = (exported - original).abs()  # (N, 2)
    base, ref = (original, exported) if reference is None else (original - reference, exported - reference)
    prefers_orig, prefers_exp = base[:, 0] > base[:, 1], ref[:, 0] > ref[:, 1]
    return {
        "pairs": int(original.size(0)),
        "accuracy_kind": "logps" if reference is None else "implicit_reward",
        "accuracy_original": prefers_orig.float().mean().item(),
        "accuracy_exported": prefers_exp.float().mean().item(),
        "flipped_pairs": int((prefers_orig != prefers_exp).sum()),
        "logps_drift_per_sequence": delta.mean().item(),  # mean |delta summed log-prob| over chosen and rejected
        "logps_drift_per_token": (delta / lengths.clamp(min=1)).mean().item(),  # the same, length-averaged
        "logps_drift_max": delta.max().item(),
    }


# --- the command -----------------------------------------------------------------------------

def export(model: str, dtype: str = "bf16", out: str | None = None, data: str | None = None,
           dataset_dir: str = "data", ref: str | None = None, max_samples: int | None = None,
           batch_size: int = 8, overwrite: bool = False) -> dict:
    """Write the export of `model` to `out` (default: MODEL-<dtype> beside it); returns the report."""
    from transformers import AutoTokenizer

    from preftune.checkpoints import _fresh_tmp, _replace_dir
    from preftune.tokenization import tokenize_pairs

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got '{dtype}'")
    quant = _torchao_config() if dtype == "int8" else None  # fail on a missing library before any work
    src = _check_model_dir(model)
    dest = Path(out).expanduser() if out else src.with_name(f"{src.name}-{dtype}")
    if dest.resolve() == src.resolve():
        raise ConfigError(f"--out '{dest}' is MODEL itself; choose another folder")
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise ConfigError(f"--out '{dest}' already exists and is not empty; pass --overwrite or choose another folder")
    tokenizer = AutoTokenizer.from_pretrained(src)  # saved unchanged: nothing below may alter it first

    tmp = _fresh_tmp(dest)
    try:
        exported = _load(src, DTYPES[dtype] or "auto", quant)
        exported.save_pretrained(tmp, safe_serialization=True)  # + generation_config.json
        tokenizer.save_pretrained(tmp)
        del exported
        reloaded = _load(tmp)  # the folder exactly as a user loads it
        vocab_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        report = {"model": str(src), "out": str(dest), "dtype": dtype,
                  "method": ("torchao Int8WeightOnlyConfig(PerRow): int8 linear weights, one absmax scale per "
                             "output row" if dtype == "int8" else f"cast to {dtype}"),
                  "weight_bytes_before": weight_bytes(src), "weight_bytes_after": weight_bytes(tmp),
                  **check_export(reloaded, dtype, vocab_id)}
        report["size_ratio"] = report["weight_bytes_after"] / report["weight_bytes_before"]

        pairs, settings, source = heldout_pairs(src, data, dataset_dir, max_samples)
        if pairs:
            tokenized = tokenize_pairs(tokenizer, pairs, settings["cutoff_len"], settings["template"])
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else vocab_id  # masked anyway
            original, lengths = pair_logps(_load(src), tokenized, pad_id, batch_size)
            after, _ = pair_logps(reloaded, tokenized, pad_id, batch_size)
            ref = ref or (settings["ref"] if settings["ref"] and Path(settings["ref"]).is_dir() else None)
            reference = pair_logps(_load(_check_model_dir(ref)), tokenized, pad_id, batch_size)[0] if ref else None
            report["heldout"] = {"data": source, "reference": ref, **quality(original, after, lengths, reference)}
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written export behind
        raise
    _replace_dir(tmp, dest)
    return report


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_report(r: dict) -> str:
    lines = [f"exported {r['model']} -> {r['out']} ({r['method']})",
             f"  weights   {r['weight_bytes_before']:,} B ({_mib(r['weight_bytes_before'])}) -> "
             f"{r['weight_bytes_after']:,} B ({_mib(r['weight_bytes_after'])}), ratio {r['size_ratio']:.3f}"]
    h = r.get("heldout")
    if h:
        kind = "implicit reward vs " + h["reference"] if h["accuracy_kind"] == "implicit_reward" else "log-prob"
        lines += [f"  held-out  {h['pairs']} pairs from {h['data']}",
                  f"  accuracy  {h['accuracy_original']:.1%} -> {h['accuracy_exported']:.1%} ({kind}; "
                  f"{h['flipped_pairs']} pairs flipped)",
                  f"  drift     mean |d log-prob| {h['logps_drift_per_sequence']:.4f} per sequence, "
                  f"{h['logps_drift_per_token']:.5f} per token, max {h['logps_drift_max']:.4f}"]
    else:
        lines.append("  held-out  none measured: pass --data PAIRS (MODEL has no preftune_config.yaml to take them from)")
    lines.append(f"  report    {Path(r['out']) / 'export_report.json'}")
    return "\n".join(lines)


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="preftune export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a saved model folder (a run's output_dir)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="bf16, fp16 or int8 (weight-only)")
    parser.add_argument("--out", help="output folder (default: MODEL-<dtype> beside MODEL)")
    parser.add_argument("--data", help="held-out pairs, as the `dataset` config key takes them (default: the "
                                       "held-out split of the run that wrote MODEL)")
    parser.add_argument("--dataset_dir", default="data", help="folder holding dataset_info.json")
    parser.add_argument("--ref", help="reference model for the DPO implicit-reward accuracy (default: the run's)")
    parser.add_argument("--max_samples", type=int, help="measure on at most this many pairs")
    parser.add_argument("--batch_size", type=int, default=8, help="pairs per forward pass when measuring")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    opts = parser.parse_args(args)
    report = export(opts.model, opts.dtype, opts.out, opts.data, opts.dataset_dir, opts.ref, opts.max_samples,
                    opts.batch_size, opts.overwrite)
    print(format_report(report))
    return 0
