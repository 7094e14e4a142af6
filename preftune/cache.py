"""preftune's two on-disk caches, and the one fingerprint of a run's data.

    train_tok = tokenize_cached(tokenizer, train_pairs, cfg, report)   # the tokenization cache
    logps = read_ref_logps(path, key, n)                                # the reference log-probs cache
    write_ref_logps(path, key, logps)                                   # (reference.py names its key's parts)
    fingerprint = data_fingerprint(train_items, eval_items)            # what a resume is checked against

Both caches are folders of `<key>.safetensors` files, the key `key_of` the parts the cached values
depend on, so a change to any part misses the cache and nothing stale is ever read. `preftune cache
list/clear` finds them through `cache_dir` and `ref_logps_dir`.

The tokenization cache (`<tokenized_cache_dir>/<key>.safetensors`): a second run on the same data
loads its token ids instead of re-tokenizing. The key's parts:
  * CACHE_VERSION, bumped whenever preftune's tokenization output changes;
  * the data: every normalized pair's fields, in order (`data_fingerprint`, which leaves out the
    file names, so a moved file hits);
  * the tokenizer: its tokenizer.json (vocabulary, merges, normalizer, added tokens, the
    post-processor that adds BOS), BOS/EOS ids and the chat template in use;
  * the settings: cutoff_len, template, truncation_mode, max_prompt_length.
`overwrite_cache: true` rebuilds it.

Why safetensors files and a process pool (tokenization.py) rather than `datasets.map(num_proc,
cache_file_name, new_fingerprint)`: pairs hold conversations of varying shape that Arrow would
have to re-encode as JSON, datasets' fingerprint of a tokenizer is a dill pickle (slow, and not
stable across library versions), and reading ids back from Arrow is slower than from one flat
numpy array. safetensors is already installed with transformers, validates its header against
the file size (a cut-off file fails to open), and carries a metadata dict for the counts.

The reference log-probs cache (`<ref_logps_cache_dir>/<key>.safetensors`, precompute_ref_log_probs):
each split's (N, 2) reference log-probs; reference.py's `cache_key` names its parts (the weights by
`model_fingerprint`, the tokenized pairs by `data_fingerprint`, precision, versions).

A file is written under a temporary name and renamed, so a reader sees a whole file or none; a
file that fails to open, or whose key, checksum or shapes disagree, is rebuilt with a warning.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.data import PreferencePair
from preftune.errors import ModelError
from preftune.files import cache_root, write_file_atomic
from preftune.tokenization import TokenizedPair, TokenizeReport, setup_rendering, tokenize_pairs

log = logging.getLogger("preftune")


# --- what both caches and a resume are keyed by -------------------------------------------------

def key_of(parts: dict[str, Any]) -> str:
    """A cache file's key: the SHA-256 of `parts` (JSON values) as canonical JSON, 32 hex digits. Each
    cache names its own parts; the data goes in as its `data_fingerprint`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def data_fingerprint(train_items: list, eval_items: dict[str, list] | None = None) -> str:
    """A hash of a run's training and evaluation items (tokenized pairs or examples; normalized pairs
    for the tokenization cache): what the run trains on, whatever the files, template or cutoff that
    produced it. A resume on other data is refused (checkpoints), and a cache keyed by it misses.
    A `where` field (the file and line an example came from) is not data and is left out. Checkpoints
    store this value: changing how it is computed makes every saved run refuse to resume."""
    digest = hashlib.sha256()
    for name, items in {"train": train_items, **(eval_items or {})}.items():
        digest.update(f"{name}:{len(items)}\n".encode())
        for item in items:
            # kl_completion (KTO) is derived from the other items, which are hashed
            # an unset margin is left out too, so that data without one hashes as before the field existed (the
            # caches and checkpoints of earlier runs keep their keys)
            values = [getattr(item, f.name) for f in dataclasses.fields(item) if f.name not in ("where", "kl_completion")
                      and not (f.name == "margin" and item.margin is None)] \
                if dataclasses.is_dataclass(item) else [item]
            for value in values:
                if isinstance(value, (str, int, float, type(None))):  # array("q", ...) refuses these: no try needed
                    digest.update(repr(value).encode())
                    continue
                try:  # token ids: packed at C speed (repr of every id would take seconds on a large set)
                    digest.update(array("q", value).tobytes())
                except TypeError:
                    digest.update(repr(value).encode())
    return digest.hexdigest()[:16]


# --- the tokenization cache ---------------------------------------------------------------------

CACHE_VERSION = "2"  # bump when the ids produced for the same inputs change (2: plain strings are raw text)
_ARRAYS = ("chosen_ids", "rejected_ids", "chosen_lengths", "rejected_lengths", "chosen_start", "rejected_start",
           "truncated")


def cache_dir(cfg) -> Path:
    """The tokenization cache's folder: tokenized_cache_dir, else <cache root>/tokenized."""
    return Path(cfg.tokenized_cache_dir).expanduser() if cfg.tokenized_cache_dir else cache_root() / "tokenized"


def cache_key(tokenizer, pairs: list[PreferencePair], cfg) -> str:
    """The tokenization cache's key for `pairs` tokenized by `tokenizer` under `cfg` (the module docstring)."""
    return key_of({
        "version": CACHE_VERSION,
        "cutoff_len": cfg.cutoff_len, "template": cfg.template, "truncation_mode": cfg.truncation_mode,
        "max_prompt_length": cfg.max_prompt_length,
        **({"chat_template_kwargs": cfg.chat_template_kwargs} if cfg.chat_template_kwargs else {}),
        # vocabulary, merges, normalizer, added tokens and the post-processor that adds BOS
        "tokenizer": tokenizer.backend_tokenizer.to_str(),
        "tokenizer_class": type(tokenizer).__name__, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "chat_template": tokenizer.chat_template,
        "data": data_fingerprint(pairs),
    })


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in _ARRAYS + (("margin",) if "margin" in arrays else ()):
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def _save(path: Path, key: str, toks: list[TokenizedPair], report: TokenizeReport) -> None:
    from safetensors.numpy import save_file

    arrays = {
        "chosen_ids": np.fromiter((i for t in toks for i in t.chosen_ids), np.int64).astype(np.int32),
        "rejected_ids": np.fromiter((i for t in toks for i in t.rejected_ids), np.int64).astype(np.int32),
        "chosen_lengths": np.array([len(t.chosen_ids) for t in toks], np.int32),
        "rejected_lengths": np.array([len(t.rejected_ids) for t in toks], np.int32),
        "chosen_start": np.array([t.chosen_start for t in toks], np.int32),
        "rejected_start": np.array([t.rejected_start for t in toks], np.int32),
        "truncated": np.array([t.truncated for t in toks], np.uint8),
    }
    if any(t.margin is not None for t in toks):  # stage: rm's margins; NaN: the pair has none
        arrays["margin"] = np.array([math.nan if t.margin is None else t.margin for t in toks], np.float64)
    metadata = {"key": key, "version": CACHE_VERSION, "checksum": _checksum(arrays),
                "report": json.dumps(vars(report))}
    try:
        write_file_atomic(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))
    except OSError as e:  # the cache only saves time; a read-only or full disk must not stop the run
        log.warning("tokenization cache: could not write %s (%s); the next run tokenizes again", path, e)


def _load(path: Path, key: str) -> tuple[list[TokenizedPair], TokenizeReport] | None:
    """The cached pairs and counts, or None when the file is missing or not to be trusted."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            arrays = {name: f.get_tensor(name) for name in _ARRAYS + (("margin",) if "margin" in f.keys() else ())}
        if metadata.get("key") != key or metadata.get("version") != CACHE_VERSION:
            raise ValueError("written for other inputs")
        if metadata.get("checksum") != _checksum(arrays):
            raise ValueError("checksum mismatch")
        n = len(arrays["chosen_lengths"])
        if any(len(arrays[name]) != n for name in (*_ARRAYS[2:], *(("margin",) if "margin" in arrays else ()))) \
                or arrays["chosen_lengths"].sum() != len(arrays["chosen_ids"]) \
                or arrays["rejected_lengths"].sum() != len(arrays["rejected_ids"]):
            raise ValueError("inconsistent shapes")
        report = TokenizeReport(**json.loads(metadata["report"]))
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, it is rebuilt, never trusted
        log.warning("tokenization cache: ignoring %s (%s); tokenizing again", path, str(e).splitlines()[0] if str(e)
                    else type(e).__name__)
        return None
    chosen, rejected = arrays["chosen_ids"].tolist(), arrays["rejected_ids"].tolist()
    chosen_ends = np.cumsum(arrays["chosen_lengths"]).tolist()
    rejected_ends = np.cumsum(arrays["rejected_lengths"]).tolist()
    margins = arrays["margin"].tolist() if "margin" in arrays else [math.nan] * n
    toks, c0, r0 = [], 0, 0
    for c1, r1, cs, rs, tr, m in zip(chosen_ends, rejected_ends, arrays["chosen_start"].tolist(),
                                     arrays["rejected_start"].tolist(), arrays["truncated"].tolist(), margins):
        toks.append(TokenizedPair(chosen[c0:c1], cs, rejected[r0:r1], rs, bool(tr), None if math.isnan(m) else m))
        c0, r0 = c1, r1
    return toks, report


def tokenize_cached(tokenizer, pairs: list[PreferencePair], cfg, report: TokenizeReport) -> list[TokenizedPair]:
    """`tokenize_pairs` with the config's settings, through the cache; adds the counts to `report`."""
    if not pairs:
        return []
    setup_rendering(tokenizer, cfg.template)  # first, so the key holds the template actually used
    key = cache_key(tokenizer, pairs, cfg)
    path = cache_dir(cfg) / f"{key}.safetensors"
    loaded = None if cfg.overwrite_cache else _load(path, key)
    if loaded is not None:
        toks, part = loaded
        log.info("tokenization cache: loaded %d tokenized pairs from %s", len(toks), path)
        if part.boundary_merges:  # the warning the tokenizing run gave
            log.warning("%d of %d pairs have a token that spans the prompt/completion boundary; it is scored as "
                        "completion", part.boundary_merges, len(pairs))
    else:
        part = TokenizeReport()
        start = time.perf_counter()
        toks = tokenize_pairs(tokenizer, pairs, cfg.cutoff_len, cfg.template, part, cfg.truncation_mode,
                              cfg.max_prompt_length, cfg.preprocessing_num_workers, cfg.chat_template_kwargs)
        _save(path, key, toks, part)
        log.info("tokenization cache: tokenized %d pairs in %.1f s, saved to %s", len(pairs),
                 time.perf_counter() - start, path)
    totals = vars(report)  # the dataclass's fields, added up in place
    for name, value in vars(part).items():
        totals[name] += value
    return toks


# --- the reference log-probs cache ----------------------------------------------------------------

def ref_logps_dir(cfg) -> Path:
    """The reference log-probs cache's folder: ref_logps_cache_dir, else <cache root>/ref_logps."""
    return Path(cfg.ref_logps_cache_dir).expanduser() if cfg.ref_logps_cache_dir else cache_root() / "ref_logps"


def model_fingerprint(name: str) -> str:
    """What identifies the weights of model `name` without reading them. A local folder: name, size and
    modification time of each file in it (cheap; re-saved or edited weights change size or mtime; a
    copied folder misses once). A hub id: its commit hash (files at a commit never change)."""
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


def read_ref_logps(path: Path, key: str, n: int) -> torch.Tensor | None:
    """The cached (n, 2) log-probs, or None when absent, unreadable or not the ones for `key`."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

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


def write_ref_logps(path: Path, key: str, logps: torch.Tensor) -> None:
    """`logps` cached under `key` (atomically: a killed run leaves no partial file under the key)."""
    from safetensors.torch import save_file

    write_file_atomic(path, lambda tmp: save_file({"logps": logps.contiguous()}, tmp, metadata={"key": key}))
