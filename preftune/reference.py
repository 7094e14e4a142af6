"""Precomputed reference log-probs (`precompute_ref_log_probs: true`): the reference model runs
once over the training and validation pairs, before the policy is loaded, and is then freed, so
training holds one model (plus its optimizer state) instead of two.

    precompute_reference_logps(cfg, {"train": train_tok, "validation": val_tok}, pad_id, accelerator)

Every pair gets log pi_ref(y_w|x) and log pi_ref(y_l|x), summed over completion tokens, in its
`TokenizedPair.reference_chosen_logps` / `reference_rejected_logps`; `reference_logps_of` turns a
batch's pairs into the (2B,) tensor that `train.preference_step` uses instead of a reference
forward. Evaluation reads the validation pairs' values the same way, so it compares the policy
with the true reference, never with itself.

Each split is cached in `<ref_logps_cache_dir>/<key>.safetensors`, the key a hash of everything
that changes the numbers:
  - the reference weights. A local folder: name, size and modification time of each file in it
    (cheap, the weights are not read; re-saved or edited weights change size or mtime; a copied
    folder misses once). A hub id: its commit hash (files at a commit never change). The same
    for each adapter merged into it (`ref_model_adapters`, or a LoRA run's adapter_name_or_path),
    and its quantization.
  - the tokenized pairs: every token id and completion start, so data, template, cutoff_len and
    tokenizer changes are all in it.
  - torch_dtype, mixed precision, attn_implementation, the device type, the torch and
    transformers versions (kernels differ), and this file's CACHE_FORMAT.
A file is written to a temporary name and renamed into place, so a killed run leaves no partial
file under the key. A file that does not load or does not match its key is recomputed and
replaced, never trusted.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
from array import array
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from preftune.batching import collate, epoch_batches
from preftune.errors import ModelError
from preftune.logps import get_batch_logps
from preftune.adapters import split_names
from preftune.models import DTYPES, check_vocabulary, load_reference, reference_adapters
from preftune.tokenization import TokenizedPair

log = logging.getLogger("preftune")

CACHE_FORMAT = 1  # bump when what a cache file holds, or how it is computed, changes


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "preftune" / "ref_logps"


def model_fingerprint(name: str) -> str:
    """What identifies the weights of model `name` without reading them (see the module docstring)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        return json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    from huggingface_hub import snapshot_download

    try:  # online: asks the hub for the current commit; offline: the commit cached locally
        snapshot = snapshot_download(name, allow_patterns=["config.json"])
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many types; all mean "cannot resolve"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"precompute_ref_log_probs: cannot find the commit of '{name}' to key its cache: {first}. "
                         "Check the id (and network access or HF_HUB_OFFLINE)") from None
    return f"hub:{name}@{Path(snapshot).name}"  # the snapshot folder is named by the commit hash


def data_fingerprint(pairs: list[TokenizedPair]) -> str:
    """sha256 of every pair's token ids and completion starts (lengths included, so no two lists collide)."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(array("q", [len(p.chosen_ids), p.chosen_start, len(p.rejected_ids), p.rejected_start,
                             *p.chosen_ids, *p.rejected_ids]).tobytes())
    return h.hexdigest()


def cache_key(cfg, pairs: list[TokenizedPair], device_type: str) -> str:
    parts = {
        "format": CACHE_FORMAT,
        "reference": model_fingerprint(cfg.ref_model or cfg.model_name_or_path),
        # the adapters merged into it (models.load_reference), in order
        "adapters": [model_fingerprint(a) for a in split_names(reference_adapters(cfg))],
        "quantization_bit": cfg.ref_model_quantization_bit,
        "data": data_fingerprint(pairs),
        "torch_dtype": str(DTYPES[cfg.torch_dtype]),  # bf16 and bfloat16 are one key
        "mixed_precision": cfg.mixed_precision,
        "attn_implementation": cfg.attn_implementation,
        "ld_alpha": cfg.ld_alpha,  # LD-DPO weights the reference's tokens too
        "device": device_type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(path: Path, key: str, n: int) -> torch.Tensor | None:
    """The cached (n, 2) log-probs, or None when absent, unreadable or not the ones for `key`."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, logps = f.metadata() or {}, f.get_tensor("logps")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # truncated or garbled
        log.warning("reference log-probs cache %s is unreadable (%s); recomputing it", path, str(e).splitlines()[0])
        return None
    if meta.get("key") != key or logps.shape != (n, 2) or logps.dtype != torch.float32:
        log.warning("reference log-probs cache %s does not match its key; recomputing it", path)
        return None
    return logps


def _write_cache(path: Path, key: str, logps: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two writers never share a file
    save_file({"logps": logps.contiguous()}, str(tmp), metadata={"key": key, "format": str(CACHE_FORMAT)})
    os.replace(tmp, path)


@torch.no_grad()
def compute_reference_logps(reference, pairs: list[TokenizedPair], cfg, pad_id: int, accelerator) -> torch.Tensor:
    """One pass of the reference: (N, 2) summed log-probs, column 0 chosen, column 1 rejected;
    batched as evaluation is, under the run's precision (the same autocast as the live reference)."""
    out = torch.empty(len(pairs), 2)
    batches = epoch_batches(len(pairs), cfg.eval_batch_size, cfg.seed, 0, shuffle=False)
    for idx in tqdm(batches, desc="reference log-probs", disable=not cfg.progress_bar or not accelerator.is_main_process):
        batch = {k: v.to(accelerator.device) for k, v in collate([pairs[i] for i in idx], pad_id).items()}
        with accelerator.autocast():
            logps = get_batch_logps(reference, chunk_size=cfg.logps_chunk_size, ld_alpha=cfg.ld_alpha,
                                    **batch)[0].float().cpu()  # (2B,)
        out[idx, 0], out[idx, 1] = logps[:len(idx)], logps[len(idx):]
    return out


def precompute_reference_logps(cfg, splits: dict[str, list[TokenizedPair]], pad_id: int, accelerator,
                               tokenizer=None) -> dict:
    """Fill every pair's reference log-probs, from the cache or from one pass of the reference,
    which is loaded only on a miss and freed before returning (and checked to cover `tokenizer`'s
    vocabulary when given). Returns {split: cache file}."""
    cache_dir = Path(cfg.ref_logps_cache_dir or default_cache_dir()).expanduser()
    reference, files = None, {}
    for split, pairs in splits.items():
        if not pairs:
            continue
        # with several processes the main one computes and writes first; the others then read its file
        with accelerator.main_process_first():
            key = cache_key(cfg, pairs, accelerator.device.type)
            path = files[split] = cache_dir / f"{key}.safetensors"
            logps = _read_cache(path, key, len(pairs))
            if logps is None:
                if reference is None:
                    reference = load_reference(cfg).to(accelerator.device)
                    if tokenizer is not None:
                        check_vocabulary(reference, tokenizer, "ref_model" if cfg.ref_model else "the reference copy")
                logps = compute_reference_logps(reference, pairs, cfg, pad_id, accelerator)
                if accelerator.is_main_process:
                    _write_cache(path, key, logps)
                log.info("reference log-probs of %d %s pairs computed, cached in %s", len(pairs), split, path)
            else:
                log.info("reference log-probs of %d %s pairs read from %s", len(pairs), split, path)
        for pair, (chosen, rejected) in zip(pairs, logps.tolist()):
            pair.reference_chosen_logps, pair.reference_rejected_logps = chosen, rejected
    # the point of precomputing: no reference in memory while training
    del reference
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    log.info("precompute_ref_log_probs: no kl/eval_kl columns; the KL needs the reference's whole next-token "
             "distribution at every completion token, which is not cached")
    return files


def reference_logps_of(pairs: list[TokenizedPair]) -> torch.Tensor | None:
    """The precomputed log pi_ref of a batch's B pairs in the [chosen; rejected] order of
    `batching.collate`, (2B,) float32; None when they were not precomputed."""
    if pairs[0].reference_chosen_logps is None:
        return None
    return torch.tensor([p.reference_chosen_logps for p in pairs] + [p.reference_rejected_logps for p in pairs],
                        dtype=torch.float32)
