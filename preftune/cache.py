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
`overwrite_cache: true` rebuilds it. A vision-language model's pairs (`tokenize_vision_cached`): the
processor's settings and the image bounds join the key (the data's images are in it by their pixels), and the
file holds each image file's resized pixels too, read back by `data.images.StoredPixels` (docs/vision.md).

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
_OPTIONAL = ("margin", "pair_index")  # stage rm's margins; a VLM's kept pairs (the images are their own tensors)


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
    for name in _ARRAYS + tuple(name for name in _OPTIONAL if name in arrays):
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()


def _save(path: Path, key: str, toks: list[TokenizedPair], report: TokenizeReport, extra: dict | None = None,
          extra_metadata: dict | None = None) -> None:
    """`toks` and `report` under `key`; `extra`: more arrays (a VLM's pair_index and images), `extra_metadata`
    more strings."""
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
    arrays.update(extra or {})
    metadata = {"key": key, "version": CACHE_VERSION, "checksum": _checksum(arrays),
                "report": json.dumps(vars(report)), **(extra_metadata or {})}
    try:
        write_file_atomic(path, lambda tmp: save_file(arrays, tmp, metadata=metadata))
    except OSError as e:  # the cache only saves time; a read-only or full disk must not stop the run
        log.warning("tokenization cache: could not write %s (%s); the next run tokenizes again", path, e)


def _read(path: Path, key: str) -> tuple[dict, dict, set] | None:
    """The file's checked arrays (`_ARRAYS` and those of `_OPTIONAL` it has), its metadata and the names of all its
    tensors; None when the file is missing or not to be trusted."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            metadata, names = f.metadata() or {}, set(f.keys())
            arrays = {name: f.get_tensor(name) for name in _ARRAYS + tuple(n for n in _OPTIONAL if n in names)}
        if metadata.get("key") != key or metadata.get("version") != CACHE_VERSION:
            raise ValueError("written for other inputs")
        if metadata.get("checksum") != _checksum(arrays):
            raise ValueError("checksum mismatch")
        n = len(arrays["chosen_lengths"])
        if any(len(arrays[name]) != n for name in (*_ARRAYS[2:], *(o for o in _OPTIONAL if o in arrays))) \
                or arrays["chosen_lengths"].sum() != len(arrays["chosen_ids"]) \
                or arrays["rejected_lengths"].sum() != len(arrays["rejected_ids"]):
            raise ValueError("inconsistent shapes")
        metadata["report"] = TokenizeReport(**json.loads(metadata["report"]))
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, it is rebuilt, never trusted
        log.warning("tokenization cache: ignoring %s (%s); tokenizing again", path, str(e).splitlines()[0] if str(e)
                    else type(e).__name__)
        return None
    return arrays, metadata, names


def _pairs(arrays: dict) -> list[TokenizedPair]:
    """The tokenized pairs of a file's arrays."""
    chosen, rejected = arrays["chosen_ids"].tolist(), arrays["rejected_ids"].tolist()
    chosen_ends = np.cumsum(arrays["chosen_lengths"]).tolist()
    rejected_ends = np.cumsum(arrays["rejected_lengths"]).tolist()
    margins = arrays["margin"].tolist() if "margin" in arrays else [math.nan] * len(chosen_ends)
    toks, c0, r0 = [], 0, 0
    for c1, r1, cs, rs, tr, m in zip(chosen_ends, rejected_ends, arrays["chosen_start"].tolist(),
                                     arrays["rejected_start"].tolist(), arrays["truncated"].tolist(), margins):
        toks.append(TokenizedPair(chosen[c0:c1], cs, rejected[r0:r1], rs, bool(tr), None if math.isnan(m) else m))
        c0, r0 = c1, r1
    return toks


def _load(path: Path, key: str) -> tuple[list[TokenizedPair], TokenizeReport] | None:
    """The cached pairs and counts, or None when the file is missing or not to be trusted."""
    read = _read(path, key)
    return None if read is None else (_pairs(read[0]), read[1]["report"])


def _warn_boundary_merges(part: TokenizeReport, n_pairs: int) -> None:
    """On a cache hit, the warning the tokenizing run gave."""
    if part.boundary_merges:
        log.warning("%d of %d pairs have a token that spans the prompt/completion boundary; it is scored as "
                    "completion", part.boundary_merges, n_pairs)


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
        _warn_boundary_merges(part, len(pairs))
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


# --- the tokenization cache of a vision-language model's pairs ------------------------------------------

def vision_cache_key(processor, pairs: list[PreferencePair], cfg) -> str:
    """The tokenization cache's key for `pairs` tokenized by a vision-language model's `processor` (vision.py):
    the text key's parts, the processor's in place of the tokenizer's, and the image bounds."""
    tokenizer = processor.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return key_of({
        "version": CACHE_VERSION, "vision": VISION_CACHE_VERSION,
        "cutoff_len": cfg.cutoff_len, "template": cfg.template, "truncation_mode": cfg.truncation_mode,
        "max_prompt_length": cfg.max_prompt_length,
        **({"chat_template_kwargs": cfg.chat_template_kwargs} if cfg.chat_template_kwargs else {}),
        "tokenizer": backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())),
        "tokenizer_class": type(tokenizer).__name__, "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        # the template that renders every pair; the processor's class and settings (its image processor's size,
        # crop and normalization, its image token and how many an image expands into)
        "chat_template": processor.chat_template, "processor": processor.to_json_string(),
        "processor_class": type(processor).__name__,
        # the images by their pixels after the resize (data_fingerprint); the bounds too, for plain clarity
        "image_max_pixels": cfg.image_max_pixels, "image_min_pixels": cfg.image_min_pixels,
        "data": data_fingerprint(pairs),
    })


VISION_CACHE_VERSION = "1"  # bump when what a VLM's cache file holds changes
_STORED_MODES = ("RGB", "RGBA", "L")  # modes numpy holds whole: Image.fromarray gives them back as they were


def tokenize_vision_cached(processor, pairs: list[PreferencePair], cfg, report: TokenizeReport) -> list:
    """`vision.tokenize_vision_pairs` through the tokenization cache; adds the counts to `report`. The file holds,
    beside the text arrays, which pairs were kept (pair_index) and each distinct image file's pixels after the
    resize (image_max_pixels / image_min_pixels), uint8 (H, W, C), as `image.<digest>`: on a hit no processor
    call runs and a batch's images are read from the (memory-mapped) file, neither decoded nor resized again."""
    from preftune.vision import tokenize_vision_pairs

    if not pairs:
        return []
    key = vision_cache_key(processor, pairs, cfg)
    path = cache_dir(cfg) / f"{key}.safetensors"
    loaded = None if cfg.overwrite_cache else _load_vision(path, key, pairs)
    if loaded is not None:
        toks, part = loaded
        log.info("tokenization cache: loaded %d tokenized pairs with their images from %s", len(toks), path)
        _warn_boundary_merges(part, len(pairs))
    else:
        part, kept = TokenizeReport(), []
        start = time.perf_counter()
        toks = tokenize_vision_pairs(processor, pairs, cfg, part, kept)
        stored: dict[str, np.ndarray] = {}
        modes: dict[str, str] = {}
        for t in toks:
            for ref in t.images:
                if isinstance(ref.source, str) and ref.digest not in modes:  # a file (embedded images are in memory)
                    image = ref.load()
                    if image.mode in _STORED_MODES:
                        stored[f"image.{ref.digest}"], modes[ref.digest] = np.ascontiguousarray(np.asarray(image)), \
                            image.mode
        _save(path, key, toks, part, {"pair_index": np.array(kept, np.int64), **stored},
              {"image_modes": json.dumps(modes)})
        log.info("tokenization cache: tokenized %d pairs in %.1f s, saved to %s with %d images (%.1f MB)", len(pairs),
                 time.perf_counter() - start, path, len(stored), sum(a.nbytes for a in stored.values()) / 1e6)
    totals = vars(report)
    for name, value in vars(part).items():
        totals[name] += value
    return toks


def _load_vision(path: Path, key: str, pairs: list[PreferencePair]):
    """The cached VLM pairs (their images read from the file where it holds them) and counts, or None."""
    from preftune.data.images import StoredPixels
    from preftune.vision import VisionPair

    read = _read(path, key)
    if read is None:
        return None
    arrays, metadata, names = read
    index = arrays.get("pair_index")
    if index is None or (len(index) and (index.min() < 0 or index.max() >= len(pairs))):
        log.warning("tokenization cache: ignoring %s (no pair index for these pairs); tokenizing again", path)
        return None
    modes = json.loads(metadata.get("image_modes", "{}"))
    toks = []
    for i, t in zip(index.tolist(), _pairs(arrays)):
        refs = [dataclasses.replace(ref, source=StoredPixels(str(path), f"image.{ref.digest}", modes[ref.digest],
                                                             ref.source))
                if isinstance(ref.source, str) and ref.digest in modes and f"image.{ref.digest}" in names else ref
                for ref in pairs[i].images or []]
        toks.append(VisionPair(t.chosen_ids, t.chosen_start, t.rejected_ids, t.rejected_start, t.truncated,
                               images=refs))
    return toks, metadata["report"]


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
