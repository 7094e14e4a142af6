"""Running `python -m preftune` as a hostile but realistic user would, and checking the rule every
refusal must follow (issue 12): a non-zero exit, exactly one error line that names the file, key or
record and the fix, no traceback anywhere, and no file outside output_dir touched.

    from hostile import run_refused
    message = run_refused(["train", "--model_name_or_path", str(model), "--output_dir", str(model)],
                          cwd=tmp_path, watch=[tmp_path], expect=["is model_name_or_path"])

`watch` lists the folders (or files) around the case: the input model, the data, the current folder,
HOME. Every file under them is hashed before and after; only paths inside `output_dir` may change.
A helper module, not a test module: hostile-input test files (files, numbers, ...) share it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ERROR_PREFIX = "preftune: error: "


def snapshot(paths) -> dict[str, str]:
    """Every file and folder under `paths`: path -> sha256 of its bytes (or its kind: 'dir', 'link')."""
    seen: dict[str, str] = {}
    for top in map(Path, paths):
        if not top.exists() and not top.is_symlink():
            continue
        entries = [top] + (sorted(top.rglob("*")) if top.is_dir() and not top.is_symlink() else [])
        for p in entries:
            if p.is_symlink():
                seen[str(p)] = "link:" + os.readlink(p)
            elif p.is_dir():
                seen[str(p)] = "dir"
            elif p.is_file():
                seen[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return seen


def cli_env(home: Path | None = None, **extra: str) -> dict[str, str]:
    """A clean environment for `python -m preftune`: this checkout first on the path, no network, one
    thread, HOME (and so `~` and the caches) where the test says."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONDONTWRITEBYTECODE": "1"}
    if home is not None:
        env.update(HOME=str(home), XDG_CACHE_HOME=str(Path(home) / ".cache"))
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "preftune", *args], cwd=cwd, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`preftune ARGS` through `cli.main` in this process (seconds saved on every case): in `cwd`, with
    `env`'s HOME and cache folders and extra variables set for the call, stdout and stderr captured."""
    from preftune.cli import main

    keep = {"HOME", "XDG_CACHE_HOME", *(k for k in (env or {}) if k not in cli_env())}
    saved_env, saved_cwd = {k: os.environ.get(k) for k in keep}, os.getcwd()
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.update({k: v for k, v in (env or {}).items() if k in keep})
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        os.chdir(saved_cwd)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["preftune", *args], code, out.getvalue(), err.getvalue())


def _inside(path: str, folder: Path | None) -> bool:
    if folder is None:
        return False
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


def run_refused(args: list[str], cwd: Path, watch, expect=(), output_dir: Path | None = None,
                env: dict[str, str] | None = None, timeout: float = 300, in_process: bool = False) -> str:
    """Run `python -m preftune ARGS` in `cwd`, assert the refusal rule, return the one error line.

    expect: substrings the error line must hold (the file/key/record it names, the fix it gives).
    output_dir: the one folder the command may write into (None: nothing may change).
    in_process: through `cli.main` in this process (`run_in_process`), not a new one."""
    watch = [Path(w) for w in watch]
    before = snapshot(watch)
    result = run_in_process(args, cwd, env) if in_process else run_cli(args, cwd, env, timeout)
    after = snapshot(watch)
    shown = f"args: {args}\nexit: {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    everything = result.stdout + result.stderr
    assert result.returncode != 0, shown
    assert "Traceback" not in everything, shown
    errors = [line for line in everything.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, shown
    message = errors[0]
    assert not message[len(ERROR_PREFIX):].startswith("unexpected "), f"not anticipated: {shown}"  # the last resort
    for part in expect:
        assert part in message, f"{part!r} not in the error line\n{shown}"
    changed = sorted(p for p in before.keys() | after.keys()
                     if before.get(p) != after.get(p) and not _inside(p, output_dir))
    assert not changed, f"files outside output_dir changed: {changed}\n{shown}"
    return message[len(ERROR_PREFIX):]
