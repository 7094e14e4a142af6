"""`preftune cache`: what preftune's caches hold, and clearing them.

    preftune cache list                           # folders, files, sizes, oldest and newest
    preftune cache clear                          # delete every cached file
    preftune cache clear --older_than_days 30     # only files not used (written) for 30 days

Three caches, all safe to delete (a run recomputes what it misses):
  tokenized   the tokenized pairs of each dataset and tokenizer (tokenized_cache_dir, default
              $XDG_CACHE_HOME/preftune/tokenized, else ~/.cache/preftune/tokenized)
  ref_logps   precomputed reference log-probs (ref_logps_cache_dir, default .../preftune/ref_logps)
  demo_sft    `preftune demo`'s SFT models, one folder per data and settings (its --cache_dir,
              default .../preftune/demo; `--demo_cache_dir` here names another)
The folders are the config's: `--tokenized_cache_dir` / `--ref_logps_cache_dir` (or --config FILE) name
others. Only preftune's own cache files (*.safetensors; the demo's model folders) are listed and
deleted, nothing else in them.
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

from preftune.config import load_config, parse_command_line
from preftune.errors import ConfigError

USAGE = """usage: preftune cache {list,clear} [CONFIG.yaml] [--older_than_days N] [--tokenized_cache_dir D]
                      [--ref_logps_cache_dir D] [--demo_cache_dir D]

list: each cache's folder, files, size, oldest and newest; clear: delete its files (with
--older_than_days N only those not written for N days). The caches: tokenized pairs, reference
log-probs and the SFT models of `preftune demo` (in --demo_cache_dir, default the demo's). Only
preftune's own cache files (*.safetensors; the demo's model folders) are listed and deleted; a run
recomputes what it misses (the demo trains its SFT model again).
"""


def folders(cfg) -> dict[str, Path]:
    from preftune.cache import cache_dir, ref_logps_dir as ref_cache_dir

    return {"tokenized": cache_dir(cfg), "ref_logps": ref_cache_dir(cfg)}


def demo_models(folder: Path) -> list[tuple[Path, float, int]]:
    """The demo's SFT model folders in `folder`: (folder, when written, bytes)."""
    from preftune.demo import SFT_MARKER, cached_sft_models

    found = []
    for model in cached_sft_models(folder):
        marker = model / SFT_MARKER  # written when the model was complete; a killed run's folder has none
        written = (marker if marker.is_file() else model).stat().st_mtime
        found.append((model, written, sum(f.stat().st_size for f in model.rglob("*") if f.is_file())))
    return found


def cached_files(folder: Path) -> list[Path]:
    """The cache files of a folder: the *.safetensors preftune writes (not temporary or foreign files)."""
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file()) if folder.is_dir() else []


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _day(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")


def main(args: list[str]) -> int:
    action = args[0] if args else None
    if action not in ("list", "clear"):
        raise ConfigError("preftune cache: say what to do: list or clear (preftune cache list)")
    config_path, overrides, flags = parse_command_line(args[1:], flags={"older_than_days": None,
                                                                       "demo_cache_dir": ""})
    cfg = load_config(config_path, overrides)
    try:
        days = None if flags["older_than_days"] is None else float(flags["older_than_days"])
    except ValueError:
        raise ConfigError(f"--older_than_days must be a number of days; got {flags['older_than_days']!r}") from None
    cutoff = time.time() - days * 86400 if days is not None else None
    entries = {name: [(f, f.stat().st_mtime, f.stat().st_size) for f in cached_files(folder)]
               for name, folder in folders(cfg).items()}
    from preftune.demo import sft_cache_dir

    demo_dir = sft_cache_dir(flags["demo_cache_dir"])
    entries["demo_sft"] = demo_models(demo_dir)
    where = {**folders(cfg), "demo_sft": demo_dir}
    for name, found in entries.items():
        folder, what = where[name], "models" if name == "demo_sft" else "files"
        if action == "list":
            if not found:
                print(f"{name:10s} {folder}: empty")
                continue
            times = [written for _, written, _ in found]
            print(f"{name:10s} {folder}: {len(found)} {what}, {_mib(sum(size for *_, size in found))}, "
                  f"written {_day(min(times))} .. {_day(max(times))}")
            continue
        doomed = [(path, size) for path, written, size in found if cutoff is None or written < cutoff]
        for path, _ in doomed:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        print(f"{name:10s} {folder}: deleted {len(doomed)} of {len(found)} {what} "
              f"({_mib(sum(size for _, size in doomed))})")
    return 0
