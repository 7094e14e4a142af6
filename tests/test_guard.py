"""The user's files and the run's inputs, class by class (issue 12): output_dir kept apart from the input
models, written to before training, locked; the final save removing only files its manifest lists; a
failed save naming the last checkpoint; `~` and empty paths; model folders, compressed and broken data;
dependency errors at the boundary; --debug. End to end through the CLI: tests/test_hostile_files.py."""

from __future__ import annotations

import bz2
import errno
import gzip
import json
import logging
import lzma
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from preftune import checkpoints, final, guard
from preftune.config import from_dict
from preftune.errors import ConfigError, ModelError

ROOT = Path(__file__).resolve().parent.parent


# --- output_dir apart from the inputs, and writable ---------------------------------------------

def test_output_dir_inside_ref_model_is_refused_beside_an_input_is_fine(tmp_path):
    """The other inputs output_dir may not be, be inside, or hold in a folder a run replaces:
    test_hostile_files.py, through the CLI (out_is_model, out_inside_model, out_is_ref_model,
    model_inside_a_checkpoint_of_out)."""
    model = tmp_path / "model"
    model.mkdir()
    with pytest.raises(ConfigError, match=r"is inside ref_model"):  # (the CLI cases: inside model_name_or_path)
        guard.check_output_dir(str(model / "run"), [("ref_model", str(model))])
    (tmp_path / "out" / "checkpoint-4").mkdir(parents=True)
    # beside it, or in a folder of output_dir that no run touches (the demo's base model), is fine
    (tmp_path / "out" / "base_model").mkdir()
    assert guard.check_output_dir(str(tmp_path / "out"), [("model_name_or_path", str(tmp_path / "out" / "base_model")),
                                                         ("ref_model", str(model))]) == (tmp_path / "out").resolve()


def test_output_dir_through_a_symlink_is_still_the_model(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "link").symlink_to(model)
    with pytest.raises(ConfigError, match="is model_name_or_path"):
        guard.check_output_dir(str(tmp_path / "link"), [("model_name_or_path", str(model))])


@pytest.mark.parametrize("value", ["", "  "])
def test_empty_output_dir_is_refused(value):
    with pytest.raises(ConfigError, match=r"output_dir is empty \(an unset shell variable\?\)"):
        guard.check_output_dir(value, [])


def test_output_dir_that_cannot_be_written(tmp_path, monkeypatch):
    """A full disk at the probe. A file in the way: test_hostile_files.py (out_is_a_file, out_below_a_file)."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(guard, "open", full, raising=False)
    with pytest.raises(ConfigError, match=r"output_dir: cannot write in '.*out' \(No space left on device\)"):
        guard.check_output_dir(str(tmp_path / "out"), [])
    monkeypatch.undo()
    guard.check_output_dir(str(tmp_path / "out"), [])
    assert list((tmp_path / "out").iterdir()) == []  # the probe file is gone


# --- the lock ---------------------------------------------------------------------------------------

HOLD = """import sys
from pathlib import Path
from preftune.guard import output_lock
with output_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()  # until killed (or the test's end closes the pipe): no time limit to race
"""


def test_a_second_run_on_the_same_output_dir_stops_naming_the_first(tmp_path, caplog):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        owner = json.loads((out / ".preftune.lock").read_text())
        assert owner["pid"] == holder.pid and owner["host"] == socket.gethostname()
        with pytest.raises(ConfigError, match=rf"in use by another preftune run \(pid {holder.pid}, since"):
            with guard.output_lock(out):
                pass
    finally:
        holder.kill()  # SIGKILL: no clean-up, the lock stays behind
        holder.wait()
    assert (out / ".preftune.lock").is_file()
    with caplog.at_level(logging.WARNING, logger="preftune"), guard.output_lock(out):
        assert json.loads((out / ".preftune.lock").read_text())["pid"] == os.getpid()
    assert f"took over the lock of a run that is gone (pid {holder.pid})" in caplog.text
    assert not (out / ".preftune.lock").exists()  # released


def test_the_lock_is_released_on_errors_reentrant_and_only_the_main_process_takes_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with guard.output_lock(out):
            with guard.output_lock(out):  # the same process again (the demo's steps): no deadlock
                assert (out / ".preftune.lock").is_file()
            assert (out / ".preftune.lock").is_file()  # the outer holder still has it
            raise RuntimeError
    assert not (out / ".preftune.lock").exists()
    # another host's lock refuses the run (test_hostile_files.py: out_locked_on_another_host), but not
    # the second process of the run that holds it
    (out / ".preftune.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    monkeypatch.setenv("RANK", "1")  # torchrun's second process: the first one holds the lock
    with guard.output_lock(out):
        pass
    assert json.loads((out / ".preftune.lock").read_text())["host"] == "elsewhere"


def test_claim_removes_the_folder_it_made_when_the_run_wrote_nothing(tmp_path):
    with pytest.raises(RuntimeError), guard.claim_output_dir(str(tmp_path / "new"), []):
        raise RuntimeError
    assert not (tmp_path / "new").exists()
    (tmp_path / "old").mkdir()
    with pytest.raises(RuntimeError), guard.claim_output_dir(str(tmp_path / "old"), []):
        raise RuntimeError
    assert (tmp_path / "old").is_dir()


# --- the final save: a manifest, and nothing else deleted ---------------------------------------------

@pytest.fixture
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


def test_final_save_keeps_files_it_did_not_write(tmp_path, tiny, tiny_model_dir, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"the user's")
    (out / "notes.txt").write_text("mine")
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "output_dir": str(out)})
    with caplog.at_level(logging.WARNING, logger="preftune"):
        final.save_final(*tiny, cfg)
    assert (out / "pytorch_model.bin").read_bytes() == b"the user's" and (out / "notes.txt").read_text() == "mine"
    assert "pytorch_model.bin, not written by preftune (kept)" in caplog.text
    listed = json.loads((out / final.MANIFEST).read_text())["files"]
    assert "model.safetensors" in listed and "config.json" in listed and "pytorch_model.bin" not in listed


def test_final_save_removes_stale_weights_only_its_manifest_lists(tmp_path, tiny, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "adapter_model.bin"):
        (out / name).write_text("an earlier LoRA run's")
    (out / final.MANIFEST).write_text(json.dumps({"files": ["adapter_model.safetensors", "adapter_config.json",
                                                                  "../outside.txt"]}))
    (tmp_path / "outside.txt").write_text("never")
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "output_dir": str(out)})
    final.save_final(*tiny, cfg)
    assert not (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    assert (out / "adapter_model.bin").exists()  # no manifest lists it: the user's
    assert (tmp_path / "outside.txt").read_text() == "never"
    assert (out / "model.safetensors").is_file()


def complete_checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("model.safetensors", *checkpoints.RESUME_FILES):
        (folder / name).write_text("x")
    return folder


def test_a_failed_final_save_names_the_last_checkpoint(tmp_path, tiny, tiny_model_dir, monkeypatch):
    out = tmp_path / "out"
    last = complete_checkpoint(out / "checkpoint-3")
    (out / "model.safetensors").write_text("an earlier final model")

    def disk_full(model, folder, merge=False, state_dict=None):
        (folder / "model.safetensors").write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(final, "save_weights", disk_full)  # the final save's and best_model/'s writer
    monkeypatch.setattr(checkpoints.weights, "save_weights", disk_full)
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "output_dir": str(out)})
    with pytest.raises(ModelError, match=rf"could not write the final model in .*out \(No space left on device\); the "
                                         rf"last complete checkpoint is {last} \(resume_from_checkpoint: true"):
        final.save_final(*tiny, cfg)
    assert not (out / ".final.tmp").exists() and (out / "model.safetensors").read_text() == "an earlier final model"
    with pytest.raises(ModelError, match=r"could not write best_model .* no checkpoint was written before"):
        checkpoints.save_model(tiny[0], tiny[1], tmp_path / "other" / "best_model", 5)


# --- paths in the config -------------------------------------------------------------------------------

def test_tilde_is_expanded_in_every_path_key(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = from_dict({"model_name_or_path": "~/m", "ref_model": "~/r", "dataset": "a.jsonl, ~/b.jsonl",
                     "eval_dataset": {"val": "~/v.jsonl", "ood": "o.jsonl"}, "output_dir": "~/out",
                     "dataset_dir": "~/data", "tokenized_cache_dir": "~/cache", "resume_from_checkpoint": "~/out/ck",
                     "reward": "~/r.py:score"})
    assert cfg.model_name_or_path == f"{tmp_path}/m" and cfg.ref_model == f"{tmp_path}/r"
    assert cfg.dataset == f"a.jsonl, {tmp_path}/b.jsonl" and cfg.eval_dataset == {"val": f"{tmp_path}/v.jsonl",
                                                                                  "ood": "o.jsonl"}
    assert cfg.output_dir == f"{tmp_path}/out" and cfg.dataset_dir == f"{tmp_path}/data"
    assert cfg.tokenized_cache_dir == f"{tmp_path}/cache" and cfg.resume_from_checkpoint == f"{tmp_path}/out/ck"
    assert cfg.reward == f"{tmp_path}/r.py:score"


@pytest.mark.parametrize("key", ["model_name_or_path", "adapter_name_or_path"])  # the others: test_hostile_files.py
def test_an_empty_path_is_refused_not_read_as_unset(key):
    with pytest.raises(ConfigError, match=rf"^config: {key} is empty \(an unset shell variable\?\)"):
        from_dict({key: ""})


def test_train_without_a_model_says_so(tmp_path):
    from preftune.train import train

    with pytest.raises(ConfigError, match="model_name_or_path is not set"):
        train(from_dict({"dataset": "x.jsonl", "output_dir": str(tmp_path / "out")}))


# --- model folders ---------------------------------------------------------------------------------------

def test_safetensors_headers_are_checked(tmp_path, tiny_model_dir):
    good = tiny_model_dir / "model.safetensors"
    assert guard.check_safetensors(good) is None
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-10])
    assert guard.check_safetensors(cut).startswith("truncated")
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    assert "shorter than a safetensors header" in guard.check_safetensors(short)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes((10).to_bytes(8, "little") + b"not json!!")
    assert "not readable JSON" in guard.check_safetensors(junk)


def test_model_load_errors_of_dependencies_name_the_folder(tmp_path, tiny_model_dir, monkeypatch):
    """A broken file the header check cannot see: transformers/safetensors' own exception, at the boundary."""
    from preftune import models

    def broken(*args, **kwargs):
        raise RuntimeError("Error while deserializing header: HeaderTooLarge")

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", broken)
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir)})
    with pytest.raises(ModelError, match=rf"model_name_or_path: cannot load '{tiny_model_dir}': Error while "
                                         "deserializing header"):
        models.load_model(str(tiny_model_dir), cfg)


def test_torch_optimizer_checks_name_the_keys():
    from preftune.optim import make_optimizer

    cfg = SimpleNamespace(optim="adamw_torch", learning_rate=1e-3, weight_decay=0.0, adam_beta1=1.5, adam_beta2=0.999,
                          adam_epsilon=1e-8)
    with pytest.raises(ConfigError, match=r"optim adamw_torch: Invalid beta parameter .*; check learning_rate, adam_beta1"):
        make_optimizer(torch.nn.Linear(2, 2), cfg)


# --- data files ----------------------------------------------------------------------------------------------

PAIRS = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(3)]


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.mark.parametrize("name,compress", [("d.jsonl.gz", gzip.compress), ("d.jsonl", bz2.compress),
                                           ("d.jsonl.xz", lzma.compress)])
def test_compressed_data_is_read(tmp_path, name, compress):
    from preftune.data import read_dataset

    (tmp_path / name).write_bytes(compress(jsonl(PAIRS)))
    pairs = read_dataset(str(tmp_path / name), str(tmp_path))
    assert [p.prompt for p in pairs] == ["p0", "p1", "p2"] and pairs[2].where == f"{tmp_path / name}:3"


def test_compressed_csv_is_read(tmp_path):
    """Compressions preftune does not read (zstd, zip) and damaged files: test_hostile_files.py."""
    from preftune.data import read_dataset

    (tmp_path / "d.csv.gz").write_bytes(gzip.compress(b"prompt,chosen,rejected\nhi,yes,no\n"))
    assert read_dataset(str(tmp_path / "d.csv.gz"), str(tmp_path))[0].chosen == "yes"


def test_an_escaped_surrogate_pair_is_one_character(tmp_path):
    """A lone surrogate is refused naming the record: test_hostile_files.py (data_lone_surrogate)."""
    from preftune.data import read_dataset

    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "p \\ud83d\\ude00", "chosen": "ok", "rejected": "no"}\n')  # a whole pair: fine
    assert read_dataset(str(path), str(tmp_path))[0].prompt == "p \U0001F600"


# --- the command line ---------------------------------------------------------------------------------------

def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    from preftune import cli
    from preftune.commands import inspect

    def crash(args):
        raise KeyError("boom")

    monkeypatch.setattr(inspect, "main", crash)
    assert cli.main(["inspect", "x.jsonl"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["preftune: error: unexpected KeyError: 'boom' (in preftune inspect); run it again with --debug "
                   "for the traceback, and please report it"]
    with pytest.raises(KeyError):
        cli.main(["inspect", "x.jsonl", "--debug"])
    monkeypatch.setenv("PREFTUNE_DEBUG", "1")
    with pytest.raises(KeyError):
        cli.main(["inspect", "x.jsonl"])


def test_a_failed_write_anywhere_is_one_line(monkeypatch, capsys):
    from preftune import cli
    from preftune.commands import inspect

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/dpo_metrics/summary.json")

    monkeypatch.setattr(inspect, "main", full)
    assert cli.main(["inspect", "x.jsonl"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "preftune: error: No space left on device '/data/out/dpo_metrics/summary.json'; free space or fix the "
        "permissions there (--debug shows the traceback)"]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_prints_the_traceback_of_a_user_error(tmp_path, how):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           **({"PREFTUNE_DEBUG": "1"} if how == "env" else {})}
    result = subprocess.run([sys.executable, "-m", "preftune", "train", "--output_dir", "", "--model", "m",
                             *(["--debug"] if how == "flag" else [])], capture_output=True, text=True, cwd=tmp_path,
                            env=env)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("preftune: error: command line: output_dir is empty (an unset "
                                                      "shell variable?); give a path, or remove the key")
