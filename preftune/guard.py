"""Guarding the user's files and checking the run's inputs before anything is built.

    check_output_dir(out, inputs)   output_dir is not an input, nor inside one (nor one inside a folder
                                    preftune replaces), is a folder, and takes a write (a probe file)
    with output_lock(out): ...      one run per output_dir (.preftune.lock: pid and host)
    check_model_dir(name, key)      a local model folder holds config.json, intact weights, a tokenizer

Why before: a run that finds these at its final save has spent its hours, and one that writes into
its own input model destroys it. Each problem is one line naming the folder (or key) and the fix.
Imports only preftune.errors, so the light commands can run these checks before torch loads models.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path

from preftune.errors import ConfigError, ModelError

log = logging.getLogger("preftune")

LOCK_NAME = ".preftune.lock"
# Folders inside output_dir that preftune replaces or deletes as a whole (checkpoint rotation,
# overwrite_output_dir, the final save's temporary folder): an input inside one would be lost.
REPLACED = ("checkpoint-", "best_model", ".checkpoint-", ".best_model", ".final")


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def local_paths(value: str | None) -> list[str]:
    """The entries of a comma list of model paths/ids that exist on this machine."""
    return [s.strip() for s in (value or "").split(",") if s.strip() and Path(s.strip()).exists()]


def check_output_dir(out: str, inputs: list[tuple[str, str]], key: str = "output_dir") -> Path:
    """The resolved output folder, after refusing what would destroy the user's files or fail only at
    the end: empty, equal to or inside an input model folder (the final save would overwrite its
    weights), an input inside a folder of output_dir that preftune replaces, a file, or not writable.
    inputs: (config key, path) of everything the command reads that output_dir must keep apart from."""
    if not str(out).strip():
        raise ConfigError(f"{key} is empty (an unset shell variable?); give the folder to write into, e.g. "
                          f"--{key} runs/my_run")
    dest = Path(out).expanduser().resolve()
    for what, path in inputs:
        src = Path(path).expanduser()
        if not src.exists():
            continue
        src = src.resolve()
        if _inside(dest, src):
            verb = "is" if dest == src else "is inside"
            raise ConfigError(f"{key}: '{out}' {verb} {what} '{path}'; writing there would overwrite the input "
                              f"model's files. Choose an {key} outside it")
        if dest in src.parents:
            first = src.relative_to(dest).parts[0]
            if first.startswith(REPLACED):
                raise ConfigError(f"{what}: '{path}' is inside {key} '{out}' ({first}/), which a run replaces or "
                                  f"deletes; copy the model elsewhere or choose another {key}")
    for folder in (dest, *dest.parents):  # the nearest existing one decides whether dest can be a folder
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"{key}: '{out}': '{folder}' is a file, not a folder; choose a folder path")
            break
    probe(dest, key, out)
    return dest


def probe(dest: Path, key: str, shown: str) -> None:
    """Create dest and write (then remove) a small file in it: a read-only folder, a full disk or a
    missing permission is found now, not at the first checkpoint."""
    tmp = dest / f".preftune_probe_{os.getpid()}"
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise ConfigError(f"{key}: cannot write in '{shown}' ({e.strerror or type(e).__name__}); choose a folder "
                          "you can write to, or free space there") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


# --- one run per output_dir ---------------------------------------------------------------

def _alive(pid: int) -> bool:
    """Whether process `pid` runs on this machine (a zombie, killed but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _read_lock(path: Path) -> dict:
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _main_process() -> bool:
    """torchrun and accelerate launch set RANK: only the first process of a run takes the lock."""
    return os.environ.get("RANK", "0") == "0"


def _create(path: Path, tmp: Path, text: str) -> None:
    """Create `path` holding `text`, failing with FileExistsError when it exists: a hard link of a
    finished file (never seen half-written), or O_EXCL where the filesystem has no hard links."""
    tmp.write_text(text, encoding="utf-8")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
    finally:
        tmp.unlink()


@contextlib.contextmanager
def output_lock(dest: Path, key: str = "output_dir"):
    """Hold dest/.preftune.lock (pid, host, start time) while the block runs; a live owner stops this run
    with one line, a dead one's lock (a killed run on this machine) is taken over with a note.
    Re-entrant within one process (the demo's steps)."""
    path = dest / LOCK_NAME
    if not _main_process():
        yield
        return
    host = socket.gethostname()
    mine = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    tmp = dest / f".preftune.lock.{os.getpid()}"
    dest.mkdir(parents=True, exist_ok=True)
    taken = False
    for _ in range(3):
        owner = _read_lock(path) if path.exists() else None
        if owner is not None:
            pid = owner.get("pid")
            if pid == os.getpid() and owner.get("host") == host:
                yield  # this process holds it already
                return
            if owner.get("host", host) != host:
                raise ConfigError(f"{key} '{dest}' is in use by pid {pid} on {owner['host']} (lock {path}); wait "
                                  "for that run, choose another output_dir, or delete the lock if it is gone")
            if isinstance(pid, int) and _alive(pid):
                raise ConfigError(f"{key} '{dest}' is in use by another preftune run (pid {pid}, since "
                                  f"{owner.get('started', '?')}); wait for it or choose another output_dir (if that pid is no "
                                  f"preftune run, delete {path})")
            log.warning("%s: took over the lock of a run that is gone (pid %s); its outputs may be incomplete",
                        dest, pid if pid is not None else "unknown")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        try:
            _create(path, tmp, json.dumps(mine))
            taken = True
            break
        except FileExistsError:
            continue  # another run was quicker: look again
    if not taken:
        raise ConfigError(f"{key} '{dest}': could not take its lock {path}; is another run starting there?")
    try:
        yield
    finally:
        if _read_lock(path).get("pid") == os.getpid():
            with contextlib.suppress(OSError):
                path.unlink()


@contextlib.contextmanager
def claim_output_dir(out: str, inputs: list[tuple[str, str]], key: str = "output_dir"):
    """check_output_dir, then the lock for the block; a folder this made and left empty (the run failed
    before writing anything) is removed again."""
    existed = Path(out).expanduser().exists() if str(out).strip() else True
    dest = check_output_dir(out, inputs, key)
    try:
        with output_lock(dest, key):
            yield dest
    finally:
        if not existed:
            with contextlib.suppress(OSError):
                dest.rmdir()  # only when empty


# --- input model folders ------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt",
                   "sentencepiece.bpe.model", "tiktoken.model")


def check_safetensors(path: Path) -> str | None:
    """What is wrong with a safetensors file (None: its header reads and the data it promises is all
    there), from its header alone: 8 bytes of length, a JSON header, then the tensors."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return f"its header claims {n} bytes but the file has {size}: truncated or not safetensors"
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError):
        return "its header is not readable JSON: corrupt or not safetensors"
    if not isinstance(header, dict):
        return "its header is not a mapping: corrupt or not safetensors"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, ValueError, IndexError):
        return "its header has no valid tensor offsets: corrupt"
    if 8 + n + end > size:
        return f"truncated: {size} bytes, its header promises {8 + n + end}"
    return None


def check_model_dir(name: str | None, key: str, tokenizer: bool = False, weights: bool = True,
                    adapter: bool = False) -> None:
    """A local model (or LoRA adapter) folder, before transformers builds anything from it: one line
    naming the folder and what is missing or broken. Hub ids pass (transformers reports those)."""
    if not name:
        return
    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids are 'name' or 'org/name'
    if not path.exists():
        if looks_local:
            raise ModelError(f"{key}: '{name}' does not exist (a local folder was expected)")
        return
    if not path.is_dir():
        raise ModelError(f"{key}: '{name}' is a file; give the model's folder (the one holding config.json and the "
                         "weights)")
    if adapter and not (path / "adapter_config.json").is_file():
        raise ModelError(f"{key}: '{name}' is not an adapter folder (no adapter_config.json); give a folder "
                         "that a LoRA run saved (save_adapter_only: true)")
    adapter = (path / "adapter_config.json").is_file()
    if not adapter and not (path / "config.json").is_file():
        raise ModelError(f"{key}: '{name}' has no config.json, so it is not a saved model folder; give the folder "
                         "save_pretrained wrote (or a hub id)")
    if tokenizer and not adapter and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"{key}: '{name}' has no tokenizer files (tokenizer.json, tokenizer.model or vocab.json); "
                         "copy them from the model it was trained from, or save the tokenizer there")
    if not weights:
        return
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{key}: '{name}': {index.name} is not a readable weight index; re-save the "
                             "model") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelError(f"{key}: '{name}' lacks {len(missing)} weight shard(s) its index lists ({missing[0]}, "
                             "...); copy the whole model folder")
    found = sorted(path.glob("*.safetensors"))
    if not found and not list(path.glob("*.bin")):
        raise ModelError(f"{key}: '{name}' holds no weights ("
                         + ("adapter_model.safetensors" if adapter else "model.safetensors or pytorch_model.bin")
                         + "); copy the whole model folder")
    for file in found:
        broken = check_safetensors(file)
        if broken:
            raise ModelError(f"{key}: '{name}': weights file {file.name} is broken ({broken}); copy or download it "
                             "again")


# --- what a run reads -------------------------------------------------------------------------

MODEL_KEYS = ("model_name_or_path", "ref_model")
ADAPTER_KEYS = ("adapter_name_or_path", "ref_model_adapters")


def model_inputs(cfg) -> list[tuple[str, str]]:
    """(key, path) of every local model, adapter and reward-model folder a config reads."""
    return [(key, p) for key in (*MODEL_KEYS, *ADAPTER_KEYS, "reward") for p in local_paths(getattr(cfg, key))]


def check_inputs(cfg, tokenizer: bool = True) -> None:
    """Every local model and adapter folder of a config, before anything is built from them; the first
    model of model_name_or_path (a comma list for eval) also needs its tokenizer files."""
    for i, name in enumerate(s.strip() for s in (cfg.model_name_or_path or "").split(",") if s.strip()):
        check_model_dir(name, "model_name_or_path", tokenizer=tokenizer and i == 0)
    check_model_dir(cfg.ref_model, "ref_model")
    for key in ADAPTER_KEYS:
        for name in (s.strip() for s in (getattr(cfg, key) or "").split(",") if s.strip()):
            check_model_dir(name, key, adapter=True)
