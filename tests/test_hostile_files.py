"""Hostile input, end to end through the `preftune` command (issue 12): output folders that would destroy
the user's files, and inputs that are not what they claim (model folders, data files, configs). A few
cases run as real `python -m preftune` processes, the rest through `cli.main` in-process (SUBPROCESS).

Each case must be refused with one error line naming the file/key/record and the fix, a non-zero exit,
no traceback, and no file outside output_dir changed (tests/hostile.py hashes the case's surroundings:
the input model, the data, the current folder, HOME). Most cases stop in the config and path checks,
before torch loads a model; the data cases share one tiny model folder.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
import shutil
import socket
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from hostile import cli_env, run_refused

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json")


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_model_dir, demo_pairs):
    """The user's surroundings: a model folder, pairs, HOME, and a working folder that holds a model's
    files of its own (what `output_dir: ""` used to overwrite and delete)."""
    root = tmp_path_factory.mktemp("hostile_files")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs[:16]))
    home, work = root / "home", root / "work"
    home.mkdir()
    work.mkdir()
    (work / "config.json").write_text('{"mine": true}')
    (work / "pytorch_model.bin").write_bytes(b"the user's own weights")
    return SimpleNamespace(root=root, model=model, data=data, home=home, work=work)


def copy_model(p, dest: Path, drop=()) -> Path:
    shutil.copytree(p.model, dest)
    for name in drop:
        (dest / name).unlink(missing_ok=True)
    return dest


def fake_adapter(folder: Path) -> Path:
    """A LoRA adapter folder as peft writes it (config + an empty, well-formed safetensors file)."""
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    header = b"{}"
    (folder / "adapter_model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    return folder


def train(p, out, *more) -> list[str]:
    return ["train", "--model_name_or_path", str(p.model), "--dataset", str(p.data), "--max_steps", "1",
            "--progress_bar", "false", "--plot_loss", "false", "--output_dir", str(out), *more]


def with_model(args: list[str], model) -> list[str]:
    args = list(args)
    args[args.index("--model_name_or_path") + 1] = str(model)
    return args


def data_file(p, case: Path, name: str, content: bytes) -> Path:
    path = case / name
    path.write_bytes(content)
    return path


def lines(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


PAIR = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}


# --- the cases: name -> (p, case folder) -> dict(args, expect, out=None, cwd=None, env=None) ----------------

def out_is_model(p, c):
    return dict(args=train(p, p.model), expect=["output_dir", f"is model_name_or_path '{p.model}'", "outside"])


def out_inside_model(p, c):
    return dict(args=train(p, p.model / "run"), expect=["is inside model_name_or_path", "outside"])


def out_is_ref_model(p, c):
    ref = copy_model(p, c / "ref")
    return dict(args=train(p, ref, "--ref_model", str(ref)), expect=[f"is ref_model '{ref}'"])


def out_is_adapter(p, c):
    adapter = fake_adapter(c / "adapter")
    return dict(args=train(p, adapter, "--finetuning_type", "lora", "--adapter_name_or_path", str(adapter)),
                expect=[f"is adapter_name_or_path '{adapter}'"])


def out_empty(p, c):
    return dict(args=train(p, ""), cwd=p.work, expect=["output_dir is empty", "unset shell variable"])


def out_empty_in_yaml(p, c):
    config = c / "run.yaml"
    config.write_text(f"model_name_or_path: {p.model}\ndataset: {p.data}\noutput_dir: ''\n")
    return dict(args=["train", str(config)], cwd=p.work, expect=[str(config), "output_dir is empty"])


def out_empty_sft(p, c):
    return dict(args=["sft", "--model_name_or_path", str(p.model), "--dataset", str(p.data), "--output_dir", ""],
                cwd=p.work, expect=["output_dir is empty"])


def model_inside_a_checkpoint_of_out(p, c):
    out = c / "out"
    model = copy_model(p, out / "checkpoint-2")
    return dict(args=with_model(train(p, out), model),
                expect=[f"model_name_or_path: '{model}' is inside output_dir", "checkpoint-2/", "copy the model"])


def out_is_a_file(p, c):
    (c / "out.txt").write_text("notes")
    return dict(args=train(p, c / "out.txt"), expect=["is a file, not a folder", "choose a folder"])


def out_below_a_file(p, c):
    (c / "out.txt").write_text("notes")
    return dict(args=train(p, c / "out.txt" / "run"), expect=[f"'{c / 'out.txt'}' is a file, not a folder"])


def out_not_writable(p, c):
    return dict(args=train(p, "/proc/preftune_hostile/run"), expect=["output_dir: cannot write in", "choose a folder"])


def out_locked_by_a_live_run(p, c):
    out = c / "out"
    out.mkdir()
    (out / ".preftune.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return dict(args=train(p, out), expect=[f"pid {os.getpid()}", "in use by another preftune run",
                                             "choose another output_dir"])


def out_locked_on_another_host(p, c):
    out = c / "out"
    out.mkdir()
    (out / ".preftune.lock").write_text(json.dumps({"pid": 1, "host": "gpu-node-7"}))
    return dict(args=train(p, out), expect=["pid 1 on gpu-node-7", "delete the lock"])


def sample_out_is_model(p, c):
    return dict(args=["sample", "--model_name_or_path", str(p.model), "--dataset", str(p.data), "--output_dir",
                      str(p.model)], expect=["is model_name_or_path"])


def eval_out_is_model(p, c):
    return dict(args=["eval", "--model_name_or_path", str(p.model), "--dataset", str(p.data), "--ref_model",
                      str(p.model), "--output_dir", str(p.model)], expect=["is model_name_or_path"])


def export_out_empty(p, c):
    return dict(args=["export", str(p.model), "--out", ""], cwd=p.work, expect=["--out is empty"])


def export_out_is_model(p, c):
    return dict(args=["export", str(p.model), "--out", str(p.model), "--overwrite"], expect=["is MODEL"])


def demo_out_empty(p, c):
    return dict(args=["demo", "--output_dir", ""], cwd=p.work, expect=["output_dir is empty"])


def demo_would_delete_a_users_file(p, c):
    (c / "out" / "sampled").mkdir(parents=True)
    (c / "out" / "sampled" / "my_notes.txt").write_text("mine")
    return dict(args=["demo", "--output_dir", str(c / "out"), "--cache_dir", str(c / "out" / "cache")],
                expect=["sampled holds my_notes.txt", "choose another --output_dir"])


def ref_model_empty(p, c):
    return dict(args=train(p, c / "out", "--ref_model", ""), expect=["ref_model is empty", "remove the key"])


def dataset_empty(p, c):
    return dict(args=train(p, c / "out", "--dataset", ""), expect=["dataset is empty"])


def config_without_model(p, c):
    config = c / "run.yaml"
    config.write_text(f"dataset: {p.data}\noutput_dir: {c / 'out'}\n")
    return dict(args=["train", str(config)], expect=[str(config), "no model_name_or_path", "set it"])


def empty_config(p, c):
    config = c / "run.yaml"
    config.write_text("\n")
    return dict(args=["train", str(config)], expect=[str(config), "the file is empty", "model_name_or_path"])


def model_is_a_file(p, c):
    return dict(args=with_model(train(p, c / "out"), p.model / "model.safetensors"),
                expect=["model.safetensors' is a file", "give the model's folder"])


def model_without_tokenizer(p, c):
    model = copy_model(p, c / "m", drop=TOKENIZER_FILES)
    return dict(args=with_model(train(p, c / "out"), model), expect=[f"'{model}' has no tokenizer files", "copy them"])


def model_truncated_weights(p, c):
    model = copy_model(p, c / "m")
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return dict(args=with_model(train(p, c / "out"), model),
                expect=[f"'{model}'", "model.safetensors is broken (truncated", "download it again"])


def model_garbage_weights(p, c):
    model = copy_model(p, c / "m")
    (model / "model.safetensors").write_bytes(os.urandom(4096))
    return dict(args=with_model(train(p, c / "out"), model), expect=["model.safetensors is broken"])


def model_without_config(p, c):
    model = copy_model(p, c / "m", drop=["config.json"])
    return dict(args=with_model(train(p, c / "out"), model), expect=[f"'{model}' has no config.json"])


def model_without_weights(p, c):
    model = copy_model(p, c / "m", drop=["model.safetensors"])
    return dict(args=with_model(train(p, c / "out"), model), expect=[f"'{model}' holds no weights"])


def model_missing_shard(p, c):
    model = copy_model(p, c / "m")
    os.replace(model / "model.safetensors", model / "model-00001-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return dict(args=with_model(train(p, c / "out"), model),
                expect=["lacks 1 weight shard", "model-00002-of-00002.safetensors", "copy the whole"])


def ref_model_truncated(p, c):
    ref = copy_model(p, c / "ref")
    (ref / "model.safetensors").write_bytes((ref / "model.safetensors").read_bytes()[:100])
    return dict(args=train(p, c / "out", "--ref_model", str(ref)), expect=["ref_model:", "is broken"])


def adapter_that_is_not_one(p, c):
    return dict(args=train(p, c / "out", "--finetuning_type", "lora", "--adapter_name_or_path", str(p.model)),
                expect=["adapter_name_or_path", "is not an adapter folder (no adapter_config.json)"])


def model_under_tilde_missing(p, c):
    return dict(args=with_model(train(p, c / "out"), "~/models/none"),
                expect=[f"'{p.home / 'models' / 'none'}' does not exist"])


def tokenizer_json_corrupt(p, c):
    model = copy_model(p, c / "m")
    (model / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return dict(args=with_model(train(p, c / "out"), model), expect=[f"cannot load '{model}'"])


def data_lone_surrogate(p, c):
    bad = b'{"prompt": "Hi \\ud83d", "chosen": "Hello!", "rejected": "Go away."}\n'
    data = data_file(p, c, "pairs.jsonl", lines([PAIR]) + bad)
    return dict(args=train(p, c / "out", "--dataset", str(data)), expect=[f"{data}:2", "lone surrogate", "fix or remove"])


def data_lone_surrogate_in_array(p, c):
    bad = {**PAIR, "chosen": "\udc00 Hello"}
    data = data_file(p, c, "pairs.json", json.dumps([PAIR, bad]).encode())
    return dict(args=train(p, c / "out", "--dataset", str(data)), expect=[f"{data} record 1", "\\udc00"])


def data_zstd(p, c):
    data = data_file(p, c, "pairs.jsonl.zst", b"\x28\xb5\x2f\xfd" + os.urandom(64))
    return dict(args=train(p, c / "out", "--dataset", str(data)), expect=[str(data), "zstd-compressed", "zstd -d"])


def data_zip(p, c):
    with zipfile.ZipFile(c / "pairs.zip", "w") as z:
        z.writestr("pairs.jsonl", lines([PAIR]))
    data = c / "pairs.zip"
    return dict(args=train(p, c / "out", "--dataset", str(data)), expect=[str(data), "zip-compressed", "unzip"])


def data_gzip_damaged(p, c):
    data = data_file(p, c, "pairs.jsonl.gz", gzip.compress(lines([PAIR] * 20))[:40])
    return dict(args=train(p, c / "out", "--dataset", str(data)), expect=[str(data), "damaged gzip"])


def data_bz2_with_a_bad_record(p, c):
    """Compressed files are read (bz2 here, under a plain .jsonl name): errors then name the line."""
    data = data_file(p, c, "pairs.jsonl", bz2.compress(lines([PAIR, {"prompt": "Hi", "chosen": "Hello!"}])))
    return dict(args=train(p, c / "out", "--dataset", str(data)), expect=[f"{data}:2", "missing field 'rejected'"])


def optimizer_rejects_a_value(p, c):
    out = c / "out"  # the tokenization cache goes inside it: nothing else may change
    return dict(args=train(p, out, "--adam_beta1", "1.5", "--tokenized_cache_dir", str(out / "cache")),
                out=out, expect=["adam_beta1"])


CASES = [out_is_model, out_inside_model, out_is_ref_model, out_is_adapter, out_empty, out_empty_in_yaml, out_empty_sft,
         model_inside_a_checkpoint_of_out, out_is_a_file, out_below_a_file, out_not_writable, out_locked_by_a_live_run,
         out_locked_on_another_host, sample_out_is_model, eval_out_is_model, export_out_empty, export_out_is_model,
         demo_out_empty, demo_would_delete_a_users_file, ref_model_empty, dataset_empty, config_without_model, empty_config, model_is_a_file,
         model_without_tokenizer, model_truncated_weights, model_garbage_weights, model_without_config,
         model_without_weights, model_missing_shard, ref_model_truncated, adapter_that_is_not_one,
         model_under_tilde_missing, tokenizer_json_corrupt, data_lone_surrogate, data_lone_surrogate_in_array,
         data_zstd, data_zip, data_gzip_damaged, data_bz2_with_a_bad_record, optimizer_rejects_a_value]


# Cases run as real `python -m preftune` processes: the CLI boundary itself (the interpreter's exit status, the
# one line on a real stderr) for a guard, a data and a model refusal; and a lock held by another live process,
# which this process cannot stand for (a lock taken by the process itself is re-entered). The rest run through
# `cli.main` in this process: the same checks, without starting Python 41 times.
SUBPROCESS = (out_locked_by_a_live_run, out_is_model, data_gzip_damaged, model_truncated_weights)


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__)
def test_hostile_input_is_refused_in_one_line_and_touches_nothing(case, project, tmp_path):
    spec = case(project, tmp_path)
    run_refused(spec["args"], cwd=spec.get("cwd", tmp_path), watch=[project.root, tmp_path],
                expect=spec["expect"], output_dir=spec.get("out"), env=cli_env(project.home),
                in_process=case not in SUBPROCESS)


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25 and len({c.__name__ for c in CASES}) == len(CASES)
