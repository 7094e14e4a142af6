"""Atomic writes: a file or folder is written under a temporary name beside its destination and
renamed into place, so a process killed at any moment leaves the old version or the new one,
never a half-written one. Used by checkpoints, reports, caches and export."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    """Where preftune's caches live by default: $XDG_CACHE_HOME/preftune, else ~/.cache/preftune."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "preftune"


def write_file_atomic(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` to a temporary file beside `path`, then renamed over it: a concurrent reader (another
    process, another run) sees the old file or the whole new one, and a killed writer leaves none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = str(path.with_name(f".{path.name}.{os.getpid()}.tmp"))  # per process: two writers never share one
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: Path, text: str) -> None:
    """`path` replaced by `text` (UTF-8) in one rename."""
    write_file_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def fresh_tmp_dir(dest: Path) -> Path:
    """An empty temporary folder beside `dest`, to be filled and then `replace_dir`-ed into place."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a run killed mid-write: never trusted
    tmp.mkdir(parents=True)
    return tmp


def replace_dir(tmp: Path, dest: Path) -> None:
    """Swap a finished temporary folder into `dest` (the old one is moved aside, then removed)."""
    old = dest.with_name(dest.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old.exists():
        shutil.rmtree(old)


def remove_dir(path: Path) -> None:
    """Delete a folder, renamed to .<name>.deleting first: a kill during the removal must not leave
    a half-deleted folder under its real name (checkpoint rotation sweeps such leftovers). With
    several processes only one wins the rename; for the others the folder is already gone."""
    doomed = path.with_name(f".{path.name}.deleting")
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed)
