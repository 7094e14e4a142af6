"""`preftune export`: a trained model cast to half precision or quantized to int8 for deployment.

    preftune export output                                   # bf16 into output-bf16/
    preftune export output --dtype int8 --out deploy/int8    # int8 weight-only (torchao)
    preftune export output --dtype fp16 --data heldout.jsonl # quality measured on these pairs

bf16/fp16 cast every floating-point weight; int8 quantizes the weights of the linear layers
(not the embeddings or the LM head) with torchao's `Int8WeightOnlyConfig` through transformers'
`TorchAoConfig`: one symmetric absmax scale per output row, computation in the model's own dtype
(docs/export.md sets this next to the classic per-tensor absmax formula). Either way the folder holds
safetensors weights, the tokenizer and the generation config, and loads with plain
`AutoModelForCausalLM.from_pretrained(out)` (+ torchao for int8). MODEL may be a LoRA adapter
folder (a save_adapter_only or QLoRA run's output): it is merged into its base in float32 first.
A vision-language model (config.json with a vision_config) is loaded through transformers'
image-text-to-text auto class and exported with its processor (processor_config.json, the image
processor's settings, its chat template and tokenizer): `AutoProcessor` + `AutoModelForImageTextToText`
load the folder; its held-out pairs, images included, are rendered and measured through that processor.

The export is written to a temporary folder beside OUT, loaded back from there and checked
(dtypes, a forward pass), measured, and only then renamed into place, so OUT is either absent
(or the previous export) or complete. What it measures goes to OUT/export_report.json: weight
bytes before and after, and on held-out pairs (`--data`, else the held-out split of the run
that wrote MODEL, read from its preftune_config.yaml) the log-prob drift between the original
and the exported model and the preference accuracy of each, against the reference the run
trained against (`models.load_reference`). A reward model (`preftune rm`'s folder or LoRA adapter: a
sequence classifier, `saved.is_reward_model`) is exported as one, and measured by its own rewards: the
share of pairs with r(chosen) > r(rejected) before and after, and how far the rewards moved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from preftune.config import TrainConfig, load_config, parse_command_line
from preftune.errors import ConfigError, DataError, ModelError
from preftune.files import fresh_tmp_dir, replace_dir
from preftune.saved import (adapter_base, is_adapter, is_reward_model, is_vision_folder, load_folder, load_full,
                            merged_adapter, run_config, with_run_template)

if TYPE_CHECKING:  # for the annotations only: torch is imported where a function needs it, after the config is read
    import torch

log = logging.getLogger("preftune")

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "int8": None}  # --dtype -> torch's dtype (int8: torchao's)
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


def _check_model_dir(model: str, what: str = "MODEL") -> Path:
    src = Path(model).expanduser()
    if not src.is_dir():
        raise ModelError(f"{what} '{model}' is not a folder; pass the output_dir of a run (or any folder "
                         "saved with save_pretrained)")
    if not (src / "config.json").is_file() and not is_adapter(src):
        raise ModelError(f"{what} '{model}' has no config.json (nor adapter_config.json), so it is not a saved "
                         "transformers model or LoRA adapter")
    if not weight_bytes(src):
        raise ModelError(f"{what} '{model}' has no weight files (*.safetensors)")
    return src


def _quantized_linears(model) -> tuple[int, int]:
    """(linear layers whose weight is a torchao Int8Tensor, all linear layers)."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(type(m.weight).__name__ == "Int8Tensor" for m in linears), len(linears)


def check_export(model, dtype: str, vocab_id: int) -> dict:
    """The reloaded export holds what was asked and runs; returns what it found."""
    import torch

    found: dict = {}
    if dtype == "int8":
        n_q, n_linear = _quantized_linears(model)
        if n_q == 0:
            raise ModelError("the int8 export reloaded without quantized layers")
        found["int8_linear_layers"] = f"{n_q} of {n_linear}"  # the LM head stays in full precision
    else:
        want = getattr(torch, DTYPES[dtype])
        wrong = {str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != want}
        if wrong:
            raise ModelError(f"the {dtype} export reloaded with parameters in {sorted(wrong)}")
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[vocab_id, vocab_id]])).logits
    if not torch.isfinite(logits).all():
        raise ModelError(f"the {dtype} export gives non-finite logits"
                         + (" (weights beyond fp16's range of 65504: use --dtype bf16)" if dtype == "fp16" else ""))
    found["dtypes"] = sorted({str(p.dtype).removeprefix("torch.") for p in model.state_dict().values()})
    return found


def _vision_processor(weights: Path, processor_dir: Path | str):
    """A vision-language model's processor (saved in `processor_dir`, a run's output_dir or the base of its
    adapter), written with the export so that AutoProcessor + AutoModelForImageTextToText load it; None for a
    text-only model (`weights`: the folder whose config.json says which)."""
    if not is_vision_folder(weights):
        return None
    from transformers import AutoConfig

    from preftune.vision import saved_processor

    return saved_processor(str(processor_dir), AutoConfig.from_pretrained(weights), what="MODEL")


# --- quality on held-out pairs -----------------------------------------------------------

def _only_pairs(examples: list, where: str) -> tuple[list, int]:
    """The preference pairs among `examples` and how many unpaired (KTO) examples were left out:
    the quality check compares chosen with rejected, which an unpaired example does not have."""
    from preftune.data import PreferencePair

    pairs = [e for e in examples if isinstance(e, PreferencePair)]
    if examples and not pairs:
        raise DataError(f"{where} holds unpaired (KTO-style prompt/completion/label) examples only, and the quality "
                        "check needs chosen/rejected pairs: pass --data PAIRS")
    return pairs, len(examples) - len(pairs)


def heldout_pairs(src: Path, run_cfg, data: str | None, dataset_dir: str, max_samples: int | None,
                  default_system: str | None = None):
    """Pairs to measure on and where they came from; ([], None) when there is nothing.

    `--data` wins; else a run's output folder (preftune_config.yaml beside the weights) gives its
    own held-out split, exactly as training drew it (`load_pairs`). Unpaired examples (a kto
    run's, or --data's) are left out and counted.
    """
    from preftune.data import DataReport, check_pairs, load_pairs, read_dataset

    if data:
        report = DataReport()
        # pairs with chosen == rejected say nothing about a preference: counted, not used
        examples = check_pairs(read_dataset(data, dataset_dir, max_samples, allow_unpaired=True), drop_invalid=True,
                               report=report)
        if default_system:  # as the run's own pairs got it (data/load.py)
            examples = [e if e.system else dataclasses.replace(e, system=default_system) for e in examples]
        pairs, unpaired = _only_pairs(examples, f"--data '{data}'")
        skipped = report.skipped_identical
        notes = [f"{skipped} pairs with chosen == rejected skipped"] if skipped else []
        notes += [f"{unpaired} unpaired examples skipped"] if unpaired else []
        return pairs, data + (f" ({'; '.join(notes)})" if notes else "")
    if run_cfg is None:
        return [], None
    try:
        _, val, _ = load_pairs(run_cfg)
    except DataError as e:
        raise DataError(f"the held-out pairs of the run in {src} cannot be read ({e}); pass --data") from None
    pairs, unpaired = _only_pairs(val, f"the held-out split of the run in {src}")
    source = f"{run_cfg.eval_dataset or 'val_size split of ' + str(run_cfg.dataset)} (from {src / 'preftune_config.yaml'})"
    source += f" ({unpaired} unpaired examples skipped)" if unpaired else ""
    return pairs[:max_samples] if max_samples else pairs, source


def quality(original: torch.Tensor, exported: torch.Tensor, lengths: torch.Tensor,
            reference: torch.Tensor | None = None) -> dict:
    """Drift and preference accuracy from (N, 2) [chosen, rejected] summed log-probs.

    Accuracy is the share of pairs where the model prefers chosen: with a reference, the DPO
    implicit reward (log pi - log pi_ref of chosen above that of rejected, TRL's
    rewards/accuracies); without one, the plain log-prob (log pi(chosen) > log pi(rejected)).
    A tie counts half, as in training's eval_rewards/accuracies.
    """
    from preftune.evaluate import accuracy

    delta = (exported - original).abs()  # (N, 2)
    base, ref = (original, exported) if reference is None else (original - reference, exported - reference)
    margin_orig, margin_exp = base[:, 0] - base[:, 1], ref[:, 0] - ref[:, 1]
    return {
        "pairs": int(original.size(0)),
        "accuracy_kind": "logps" if reference is None else "implicit_reward",
        "accuracy_original": accuracy(base[:, 0], base[:, 1]).mean().item(),
        "accuracy_exported": accuracy(ref[:, 0], ref[:, 1]).mean().item(),
        # reversed, not merely moved off a tie: a model equal to its reference ties on every pair
        "flipped_pairs": int((margin_orig * margin_exp < 0).sum()),
        "logps_drift_per_sequence": delta.mean().item(),  # mean |delta summed log-prob| over chosen and rejected
        "logps_drift_per_token": (delta / lengths.clamp(min=1)).mean().item(),  # the same, length-averaged
        "logps_drift_max": delta.max().item(),
    }


def pair_rewards(model, pairs: list, pad_id: int, batch_size: int) -> torch.Tensor:
    """A reward model's r(x, y) (N, 2) float32, column 0 chosen, column 1 rejected, of N tokenized pairs,
    read as its training reads them (`reward_model.RewardModule`)."""
    import torch

    from preftune.batching import collate
    from preftune.evaluate import ordered_batches
    from preftune.reward_model import RewardModule

    scorer, rewards = RewardModule(model), torch.empty(len(pairs), 2)
    with torch.no_grad():
        for idx, batch in ordered_batches(pairs, batch_size, collate, pad_id):
            rewards[idx] = scorer(batch["input_ids"], batch["attention_mask"]).cpu().view(2, len(idx)).T
    return rewards


def reward_quality(original: torch.Tensor, exported: torch.Tensor) -> dict:
    """A reward model's pair accuracy (r(chosen) > r(rejected), a tie half, as training's
    eval_rewards/accuracies) before and after, from (N, 2) [chosen, rejected] rewards, and how far the
    rewards moved."""
    from preftune.evaluate import accuracy

    delta = (exported - original).abs()  # (N, 2)
    margin_orig, margin_exp = original[:, 0] - original[:, 1], exported[:, 0] - exported[:, 1]
    return {
        "pairs": int(original.size(0)),
        "accuracy_kind": "reward",
        "accuracy_original": accuracy(original[:, 0], original[:, 1]).mean().item(),
        "accuracy_exported": accuracy(exported[:, 0], exported[:, 1]).mean().item(),
        "flipped_pairs": int((margin_orig * margin_exp < 0).sum()),
        "reward_drift": delta.mean().item(),  # mean |delta r| over chosen and rejected
        "reward_drift_max": delta.max().item(),
    }


# --- the command -----------------------------------------------------------------------------

def _check_out(dest: Path, reads: list[tuple[str, str]], overwrite: bool) -> None:
    """--out is replaced as a whole, so it must be a folder (or not exist yet) that holds nothing
    export reads: an --out that is or contains MODEL would delete the model being exported."""
    for folder in (dest, *dest.parents):  # the nearest existing one decides whether dest can be a folder
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"--out '{dest}': '{folder}' is a file, not a folder; choose a folder path")
            break
    target = dest.resolve()
    for what, path in reads:
        p = Path(path).expanduser()
        if p.exists() and (p.resolve() == target or target in p.resolve().parents):
            verb = "is" if p.resolve() == target else "contains"
            raise ConfigError(f"--out '{dest}' {verb} {what} '{path}', and export replaces --out as a whole; "
                              "choose a folder outside it")
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise ConfigError(f"--out '{dest}' already exists and is not empty; pass --overwrite or choose another folder")


def export(cfg: TrainConfig, dtype: str = "bf16", out: str | None = None, overwrite: bool = False) -> dict:
    """Write the export of cfg.model_name_or_path (MODEL) to `out` (default: MODEL-<dtype> beside it);
    returns the report. Held-out pairs: cfg.eval_dataset (--data) if set, read from cfg.dataset_dir,
    at most cfg.max_samples, scored cfg.eval_batch_size at a time; the reference: cfg.ref_model (--ref)
    if set, else the run's. cutoff_len is the run's, else cfg's; the template cfg's, else the run's
    (saved.with_run_template, as every command).

    MODEL is a saved model, or a LoRA adapter folder, which is first merged into its base in float32
    (written to a temporary folder beside OUT): that merged model is the "before" of the report."""
    import torch
    from transformers import AutoTokenizer

    from preftune.batching import collate
    from preftune.evaluate import pair_logps
    from preftune.final import add_legacy_rope_keys
    from preftune.logps import LogpsModule
    from preftune.models import check_same_tokenizer, check_vocabulary
    from preftune.reference import load_run_reference, run_reference
    from preftune.tokenization import tokenize_pairs
    from preftune.vision import collate_vision, tokenize_vision_pairs

    if not cfg.model_name_or_path:
        raise ConfigError("preftune export: no MODEL given; pass the output_dir of a run (or any saved model folder)")
    model, data, ref, batch_size = cfg.model_name_or_path, cfg.eval_dataset, cfg.ref_model, cfg.eval_batch_size

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}; got '{dtype}'")
    if out is not None and not out.strip():
        raise ConfigError("--out is empty (an unset shell variable?); give the folder to write the export to, or "
                          "leave --out out for MODEL-<dtype> beside MODEL")
    quant = _torchao_config() if dtype == "int8" else None  # fail on a missing library before any work
    src = _check_model_dir(model)
    run_cfg = run_config(src)
    merge = adapter_base(src, run_cfg) if is_adapter(src) else None  # (base, adapters merged into it first)
    reward_model = is_reward_model(src)  # measured by its own rewards: no reference
    if reward_model and ref:
        raise ConfigError(f"--ref: MODEL '{model}' is a reward model, measured by its own rewards on the pairs, "
                          "with no reference; remove --ref")
    reference = None if reward_model else [ref] if ref else run_reference(run_cfg)
    named = src if src.name else src.resolve()  # MODEL '.' has no name to derive the default from
    dest = Path(out).expanduser() if out else named.with_name(f"{named.name}-{dtype}")
    reads = [("MODEL", str(src))] + [("the reference", r) for r in reference or []]
    if merge:
        reads += [("the base model of MODEL's adapter", merge[0])] + [("a starting adapter", a) for a in merge[1]]
    _check_out(dest, reads, overwrite)
    ref_dir = _check_model_dir(ref, "--ref") if ref else None
    rendered = with_run_template(cfg, run_cfg)  # the run's template, thinking settings and default_system
    pairs, source = heldout_pairs(src, run_cfg, data, cfg.dataset_dir, cfg.max_samples,  # data errors before any work
                                  rendered.default_system)
    tokenizer_dir = merge[0] if merge and not (src / "tokenizer_config.json").is_file() else src
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # saved unchanged: nothing below may alter it first
    processor = _vision_processor(Path(merge[0]) if merge else src, tokenizer_dir)  # a VLM's; else None
    if pairs and reference:  # the reference scores MODEL's token ids: before any weights are read
        check_same_tokenizer(tokenizer, reference[0], "--ref" if ref else "the run's reference",
                             "a reference must use the model's tokenizer (same model family)", against=f"MODEL '{src}'")

    tmp = fresh_tmp_dir(dest)
    merged = fresh_tmp_dir(dest.with_name(dest.name + ".merged")) if merge else None
    try:
        if merge:
            # saved once, so the export and the "before" model are both read from a plain folder
            merged_adapter(src, *merge).save_pretrained(merged, safe_serialization=True)
        weights = merged or src
        exported = load_folder(weights, getattr(torch, DTYPES[dtype]) if DTYPES[dtype] else "auto", quant)
        exported.save_pretrained(tmp, safe_serialization=True)  # + generation_config.json
        add_legacy_rope_keys(tmp)  # serving stacks on transformers 4 read the rotary base too
        (processor or tokenizer).save_pretrained(tmp)  # a VLM's processor holds its tokenizer: loads as a VLM
        del exported
        reloaded = load_folder(tmp)  # the folder exactly as a user loads it
        vocab_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        report = {"model": str(src), "out": str(dest), "dtype": dtype,
                  "method": ("torchao Int8WeightOnlyConfig(PerRow): int8 linear weights, one absmax scale per "
                             "output row" if dtype == "int8" else f"cast to {dtype}"),
                  "weight_bytes_before": weight_bytes(weights), "weight_bytes_after": weight_bytes(tmp),
                  **check_export(reloaded, dtype, vocab_id)}
        report["size_ratio"] = report["weight_bytes_after"] / report["weight_bytes_before"]
        if rendered.chat_template_kwargs:  # what a server must pass to render prompts as the model was trained
            report["chat_template_kwargs"] = rendered.chat_template_kwargs
        if merge:
            report["merged"] = {"base": merge[0], "adapters": [*merge[1], str(src)], "dtype": "float32"}

        if pairs:
            collate_fn = collate
            if processor is not None:  # rendered by its processor's chat template, images through its image processor
                tokenized = tokenize_vision_pairs(processor, pairs, dataclasses.replace(
                    rendered, cutoff_len=(run_cfg or cfg).cutoff_len))
                collate_fn = functools.partial(collate_vision, processor=processor)
            else:
                tokenized = tokenize_pairs(tokenizer, pairs, (run_cfg or cfg).cutoff_len, rendered.template,
                                           chat_kwargs=rendered.chat_template_kwargs)
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else vocab_id  # masked anyway
        if pairs and reward_model:
            report["heldout"] = {"data": source, "reference": None, **reward_quality(
                pair_rewards(load_folder(weights), tokenized, pad_id, batch_size),
                pair_rewards(reloaded, tokenized, pad_id, batch_size))}
        elif pairs:
            original, lengths = pair_logps(LogpsModule(load_folder(weights), cfg.logps_chunk_size), tokenized, pad_id,
                                           batch_size, collate_fn=collate_fn)
            after, _ = pair_logps(LogpsModule(reloaded, cfg.logps_chunk_size), tokenized, pad_id, batch_size,
                                  collate_fn=collate_fn)
            reference_logps = None
            if reference:
                ref_model = load_full(ref_dir, run_config(ref_dir)) if ref_dir else load_run_reference(run_cfg)
                check_vocabulary(ref_model, tokenizer, "--ref" if ref_dir else "the run's reference")
                reference_logps = pair_logps(LogpsModule(ref_model, cfg.logps_chunk_size), tokenized, pad_id,
                                             batch_size, collate_fn=collate_fn)[0]  # (N, 2)
            report["heldout"] = {"data": source, "reference": " + ".join(reference) if reference else None,
                                 **quality(original, after, lengths, reference_logps)}
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave a half-written export behind
        raise
    finally:
        if merged is not None:
            shutil.rmtree(merged, ignore_errors=True)  # only a step on the way
    replace_dir(tmp, dest)
    return report


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_report(r: dict) -> str:
    lines = [f"exported {r['model']} -> {r['out']} ({r['method']})",
             f"  weights   {r['weight_bytes_before']:,} B ({_mib(r['weight_bytes_before'])}) -> "
             f"{r['weight_bytes_after']:,} B ({_mib(r['weight_bytes_after'])}), ratio {r['size_ratio']:.3f}"]
    if r.get("merged"):
        m = r["merged"]
        lines.append(f"  merged    {' + '.join(m['adapters'])} into {m['base']} ({m['dtype']}) first: "
                     "'before' is that merged model")
    h = r.get("heldout")
    if h:
        kind = {"implicit_reward": f"implicit reward vs {h['reference']}", "logps": "log-prob",
                "reward": "the reward model's r(chosen) > r(rejected)"}[h["accuracy_kind"]]
        lines += [f"  held-out  {h['pairs']} pairs from {h['data']}",
                  f"  accuracy  {h['accuracy_original']:.1%} -> {h['accuracy_exported']:.1%} ({kind}; "
                  f"{h['flipped_pairs']} pairs flipped)"]
        lines.append(f"  drift     mean |d reward| {h['reward_drift']:.4f}, max {h['reward_drift_max']:.4f}"
                     if h["accuracy_kind"] == "reward" else
                     f"  drift     mean |d log-prob| {h['logps_drift_per_sequence']:.4f} per sequence, "
                     f"{h['logps_drift_per_token']:.5f} per token, max {h['logps_drift_max']:.4f}")
    else:
        lines.append("  held-out  none measured: pass --data PAIRS (MODEL has no preftune_config.yaml to take them from)")
    lines.append(f"  report    {Path(r['out']) / 'export_report.json'}")
    return "\n".join(lines)


USAGE = """usage: preftune export MODEL [--dtype bf16|fp16|int8] [--out DIR] [--overwrite] [--data PAIRS]
                       [--ref MODEL] [--config FILE] [--key value ...]

Write MODEL (a run's output_dir, any saved model folder, or a LoRA adapter folder) in bf16, fp16 or
int8 (weight-only) for deployment, and measure it on held-out pairs.

  --dtype D     bf16 (default), fp16 or int8
  --out DIR     output folder (default: MODEL-<dtype> beside MODEL)
  --overwrite   replace an existing --out folder
  --data PAIRS  held-out pairs, as the dataset key takes them (the eval_dataset key; default: the
                held-out split of the run that wrote MODEL)
  --ref MODEL   reference for the implicit-reward accuracy (the ref_model key; default: the run's)
  --per_device_eval_batch_size N  pairs per forward pass when measuring (default: per_device_train_batch_size,
                which --batch_size sets, as in every command)
  max_samples and dataset_dir apply to --data as to a run's dataset.
"""


def main(args: list[str]) -> int:
    config_path, overrides, flags = parse_command_line(
        args, positional="model_name_or_path", flags={"dtype": "bf16", "out": None, "overwrite": False},
        aliases={"data": "eval_dataset", "ref": "ref_model"})  # --batch_size is the config's alias, as everywhere
    report = export(load_config(config_path, overrides), flags["dtype"], flags["out"], flags["overwrite"])
    print(format_report(report))
    return 0
