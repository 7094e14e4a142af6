"""The tokenization cache: a second run on the same data loads its token ids instead of re-tokenizing.

    train_tok = tokenize_cached(tokenizer, train_pairs, cfg, report)

One file per tokenized split, `<tokenized_cache_dir>/<key>.safetensors`, where the key is the
SHA-256 of everything the token ids depend on:
  * CACHE_VERSION, bumped whenever preftune's tokenization output changes;
  * the data: every normalized pair's fields, in order (not the file names, so a moved file hits);
  * the tokenizer: its tokenizer.json (vocabulary, merges, normalizer, added tokens, the
    post-processor that adds BOS), BOS/EOS ids and the chat template in use;
  * the settings: cutoff_len, template, truncation_mode, max_prompt_length.
Changing any of them misses the cache; `overwrite_cache: true` rebuilds it.

Why safetensors files and a process pool (tokenization.py) rather than `datasets.map(num_proc,
cache_file_name, new_fingerprint)`: pairs hold conversations of varying shape that Arrow would
have to re-encode as JSON, datasets' fingerprint of a tokenizer is a dill pickle (slow, and not
stable across library versions), and reading ids back from Arrow is slower than from one flat
numpy array. safetensors is already installed with transformers, validates its header against
the file size (a cut-off file fails to open), and carries a metadata dict for the counts.
A file is written under a temporary name and renamed, so a reader sees a whole file or none; a
file that fails to open, or whose checksum or shapes disagree, is rebuilt with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from preftune.data import PreferencePair
from preftune.files import cache_root
from preftune.tokenization import TokenizedPair, TokenizeReport, setup_rendering, tokenize_pairs

log = logging.getLogger("preftune")

CACHE_VERSION = "2"  # bump when the ids produced for the same inputs change (2: plain strings are raw text)
_ARRAYS = ("chosen_ids", "rejected_ids", "chosen_lengths", "rejected_lengths", "chosen_start", "rejected_start",
           "truncated")


def cache_dir(cfg) -> Path:
    """The tokenization cache's folder: tokenized_cache_dir, else <cache root>/tokenized."""
    return Path(cfg.tokenized_cache_dir).expanduser() if cfg.tokenized_cache_dir else cache_root() / "tokenized"


def cache_key(tokenizer, pairs: list[PreferencePair], cfg) -> str:
    h = hashlib.sha256()
    settings = {"version": CACHE_VERSION, "cutoff_len": cfg.cutoff_len, "template": cfg.template,
                "truncation_mode": cfg.truncation_mode, "max_prompt_length": cfg.max_prompt_length}
    h.update(json.dumps(settings, sort_keys=True).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                         tokenizer.chat_template]).encode())
    for p in pairs:
        fields = {k: v for k, v in vars(p).items() if k != "where"}
        h.update(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\0")
    return h.hexdigest()


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in _ARRAYS:
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
    metadata = {"key": key, "version": CACHE_VERSION, "checksum": _checksum(arrays),
                "report": json.dumps(vars(report))}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(arrays, tmp, metadata=metadata)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
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
            arrays = {name: f.get_tensor(name) for name in _ARRAYS}
        if metadata.get("key") != key or metadata.get("version") != CACHE_VERSION:
            raise ValueError("written for other inputs")
        if metadata.get("checksum") != _checksum(arrays):
            raise ValueError("checksum mismatch")
        n = len(arrays["chosen_lengths"])
        if any(len(arrays[name]) != n for name in _ARRAYS[2:]) \
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
    toks, c0, r0 = [], 0, 0
    for c1, r1, cs, rs, tr in zip(chosen_ends, rejected_ends, arrays["chosen_start"].tolist(),
                                  arrays["rejected_start"].tolist(), arrays["truncated"].tolist()):
        toks.append(TokenizedPair(chosen[c0:c1], cs, rejected[r0:r1], rs, bool(tr)))
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
                              cfg.max_prompt_length, cfg.preprocessing_num_workers)
        _save(path, key, toks, part)
        log.info("tokenization cache: tokenized %d pairs in %.1f s, saved to %s", len(pairs),
                 time.perf_counter() - start, path)
    totals = vars(report)  # the dataclass's fields, added up in place
    for name, value in vars(part).items():
        totals[name] += value
    return toks
