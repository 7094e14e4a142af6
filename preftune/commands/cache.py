"""`preftune cache`: what preftune's caches hold, and clearing them.

    preftune cache list                           # folders, files, sizes, oldest and newest
    preftune cache clear                          # delete every cached file
    preftune cache clear --older_than_days 30     # only files not used (written) for 30 days

Two caches, both safe to delete (a run recomputes what it misses):
  tokenized   the tokenized pairs of each dataset and tokenizer (tokenized_cache_dir, default
              $XDG_CACHE_HOME/preftune/tokenized, else ~/.cache/preftune/tokenized)
  ref_logps   precomputed reference log-probs (ref_logps_cache_dir, default .../preftune/ref_logps)
The folders are the config's: `--tokenized_cache_dir` / `--ref_logps_cache_dir` (or --config FILE) name
others. Only preftune's own cache files (*.safetensors) are listed and deleted, nothing else in them.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

from preftune.config import load_config, parse_command_line
from preftune.errors import ConfigError

USAGE = """usage: preftune cache {list,clear} [CONFIG.yaml] [--older_than_days N] [--tokenized_cache_dir D]
                      [--ref_logps_cache_dir D]

list: each cache's folder, files, size, oldest and newest; clear: delete its files (with
--older_than_days N only those not written for N days). Only preftune's own cache files
(*.safetensors) are listed and deleted; a run recomputes what it misses.
"""


def folders(cfg) -> dict[str, Path]:
    from preftune.cache import cache_dir, ref_logps_dir as ref_cache_dir

    return {"tokenized": cache_dir(cfg), "ref_logps": ref_cache_dir(cfg)}


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
    config_path, overrides, flags = parse_command_line(args[1:], flags={"older_than_days": None})
    cfg = load_config(config_path, overrides)
    try:
        days = None if flags["older_than_days"] is None else float(flags["older_than_days"])
    except ValueError:
        raise ConfigError(f"--older_than_days must be a number of days; got {flags['older_than_days']!r}") from None
    cutoff = time.time() - days * 86400 if days is not None else None
    for name, folder in folders(cfg).items():
        files = cached_files(folder)
        if action == "list":
            if not files:
                print(f"{name:10s} {folder}: empty")
                continue
            times = [f.stat().st_mtime for f in files]
            print(f"{name:10s} {folder}: {len(files)} files, {_mib(sum(f.stat().st_size for f in files))}, "
                  f"written {_day(min(times))} .. {_day(max(times))}")
            continue
        doomed = [f for f in files if cutoff is None or f.stat().st_mtime < cutoff]
        freed = sum(f.stat().st_size for f in doomed)
        for f in doomed:
            f.unlink()
        print(f"{name:10s} {folder}: deleted {len(doomed)} of {len(files)} files ({_mib(freed)})")
    return 0
