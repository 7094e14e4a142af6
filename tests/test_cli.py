"""The command line: a seed-000 LLaMA-Factory config runs unchanged; bad input is one line, exit 2."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from preftune.cli import COMMANDS, main
from preftune.config import TrainConfig
from preftune.demo import make_pairs


@pytest.fixture
def lf_project(tmp_path, tiny_model_dir):
    """A LLaMA-Factory layout: data/dataset_info.json + alpaca ranking data + the seed-000 YAML."""
    data = tmp_path / "data"
    data.mkdir()
    records = [{"instruction": p["prompt"], "input": "", "chosen": p["chosen"], "rejected": p["rejected"]}
               for p in make_pairs(48, 0)]
    (data / "prefs.json").write_text(json.dumps(records, ensure_ascii=False))
    (data / "dataset_info.json").write_text(json.dumps({"my_dpo_data": {"file_name": "prefs.json", "ranking": True}}))
    config = tmp_path / "dpo.yaml"
    config.write_text(f"""\
model_name_or_path: {tiny_model_dir}
stage: dpo
do_train: true
finetuning_type: full
pref_beta: 0.1
pref_loss: sigmoid
lora_rank: 64
lora_target: all
dataset: my_dpo_data
dataset_dir: {data}
template: qwen
cutoff_len: 2048
per_device_train_batch_size: 4
gradient_accumulation_steps: 2
num_train_epochs: 2.0
learning_rate: 5.0e-6
bf16: true
output_dir: {tmp_path / 'saves'}
""")
    return config


def test_llama_factory_config_runs_unchanged(lf_project, tmp_path, capsys):
    assert main(["train", str(lf_project), "--max_steps", "2", "--val_size", "8", "--progress_bar", "false"]) == 0
    out = capsys.readouterr().out
    assert "held-out preference accuracy" in out and str(tmp_path / "saves") in out
    summary = json.loads((tmp_path / "saves" / "dpo_metrics" / "summary.json").read_text())
    assert summary["config"]["bf16"] and summary["config"]["gradient_accumulation_steps"] == 2
    assert summary["data"] == {**summary["data"], "train": 40, "eval": 8}
    assert (tmp_path / "saves" / "config.json").exists() and (tmp_path / "saves" / "tokenizer.json").exists()


@pytest.mark.parametrize("override,message", [
    (["--model_name_or_path", "/nonexistent/model"], "model_name_or_path: '/nonexistent/model' does not exist"),
    (["--dataset", "missing_set"], "dataset 'missing_set': not a name in .*dataset_info.json \\(registered there: my_dpo_data\\)"),
    (["--pref_beta", "-1"], "pref_beta must be a positive number"),
    (["--pref_loss", "dpo"], "unknown loss 'dpo'"),
    (["--finetuning_type", "qlora"], "finetuning_type: unknown value 'qlora'; use full, freeze or lora"),
    (["--pref_bta", "0.1"], "unknown key 'pref_bta'. Did you mean 'pref_beta'"),
])
def test_bad_input_is_one_line_and_exit_2(lf_project, capsys, override, message):
    assert main(["train", str(lf_project), *override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("preftune: error: ")
    assert __import__("re").search(message, err[0]), err[0]


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
@pytest.mark.parametrize("override", [["--attn_implementation", "flash_attention_2"], ["--flash_attn", "fa2"]])
def test_flash_attention_2_without_the_package_is_one_line(lf_project, capsys, override):
    assert main(["train", str(lf_project), *override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert f"{override[0][2:]}: {override[1]} needs the flash_attn package" in err[0]
    assert err[0].endswith("pip install flash-attn (CUDA), or flash_attn: sdpa")


def test_malformed_data_line_through_the_cli(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n')
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(bad)]) == 2
    assert f"{bad}:2: malformed JSON line" in capsys.readouterr().err


def test_no_traceback_from_the_real_command(tmp_path):
    result = subprocess.run([sys.executable, "-m", "preftune", "train", "--model_name_or_path", "/no/such/model",
                             "--dataset", "x.jsonl"], capture_output=True, text=True, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.strip().count("\n") == 0
    assert "does not exist" in result.stderr


def test_help_lists_every_key(capsys):
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for key in ("pref_beta", "cutoff_len", "early_stopping_patience", "logps_chunk_size", "beta -> pref_beta"):
        assert key in out
    assert all(f"--{f.name} (default" in out for f in dataclasses.fields(TrainConfig))


@pytest.mark.parametrize("command,listed,not_listed", [
    ("cache", ["tokenized_cache_dir", "ref_logps_cache_dir"], ["lora_rank", "pref_beta", "cutoff_len", "beta -> "]),
    ("inspect", ["dataset", "cutoff_len", "template", "model -> model_name_or_path"], ["lora_rank", "learning_rate"]),
    ("sample", ["num_samples", "reward", "per_device_eval_batch_size", "output_dir"], ["lora_rank", "pref_beta"]),
    ("export", ["model_name_or_path", "eval_dataset", "ref_model", "--dtype D"], ["learning_rate", "num_samples"]),
    ("sft", ["learning_rate", "lora_rank", "cutoff_len"], ["pref_beta", "pref_loss"]),
    ("train", ["tokenized_cache_dir", "lora_rank", "pref_beta", "num_samples"], []),
    ("label", ["--annotator NAME"], ["Config keys", "cutoff_len"]),
])
def test_each_commands_help_lists_the_keys_it_reads(capsys, command, listed, not_listed):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: preftune {command}")
    for key in listed:
        assert key in out, key
    for key in not_listed:  # a key's own line, or any text
        assert (f"--{key} (" if key.isidentifier() else key) not in out, key


def test_every_command_declares_the_groups_it_reads():
    from preftune.cli import COMMAND_GROUPS, COMMANDS
    from preftune.config import GROUPS

    assert set(COMMAND_GROUPS) == set(COMMANDS)
    assert all(set(groups) <= set(GROUPS) for groups in COMMAND_GROUPS.values())


@pytest.mark.parametrize("argv", [["--help"], ["--version"], *([c, "--help"] for c in COMMANDS),
                                  ["cache", "list", "-h"]], ids=" ".join)
def test_help_imports_neither_torch_nor_transformers(argv):
    """--help answers from the config and the command's usage: no torch, no transformers (seconds each)."""
    root = Path(__file__).resolve().parents[1]
    code = (f"import sys; from preftune.cli import main; rc = main({argv!r}); "
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.stderr.split()[-3:] == ["0", "False", "False"], result.stderr
    assert result.stdout.startswith("usage: preftune" if "--version" not in argv else "preftune ")


def test_hub_id_is_tried_on_the_hub_and_fails_clearly_offline(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert main(["train", "--model_name_or_path", "Qwen/Qwen2.5-0.5B-Instruct", "--dataset", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load 'Qwen/Qwen2.5-0.5B-Instruct'" in err[0]


def test_saved_config_repeats_the_run(lf_project, tmp_path):
    assert main(["train", str(lf_project), "--max_steps", "1", "--progress_bar", "false"]) == 0
    saved = tmp_path / "saves" / "preftune_config.yaml"
    from preftune.config import load_config

    cfg = load_config(str(saved))
    assert cfg.max_steps == 1 and cfg.dataset == "my_dpo_data" and cfg.gradient_accumulation_steps == 2


def test_yaml_no_means_no_for_keys_whose_values_include_it(tmp_path):
    from preftune.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("eval_strategy: no\nmixed_precision: no\n")  # YAML 1.1 reads both as false
    cfg = load_config(str(path))
    assert cfg.eval_strategy == "no" and not cfg.bf16 and not cfg.fp16


def test_version(capsys):
    from preftune import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"preftune {__version__}"


def test_data_without_a_model_is_an_error_not_the_demo(tmp_path, capsys):
    assert main(["train", "--dataset", str(tmp_path / "mine.jsonl"), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "dataset given but no model_name_or_path" in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_output_closed_early_is_no_traceback(tmp_path, demo_pairs):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(f"{sys.executable} -m preftune inspect {data} --json | head -n 1", shell=True, env=env,
                            capture_output=True, text=True)
    assert result.stdout.strip() == "{" and "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


def test_saved_model_stops_generating_at_the_end_of_its_turn(tmp_path, tiny_model_dir, demo_pairs):
    from transformers import AutoTokenizer, GenerationConfig

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs[:16]))
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(data), "--max_steps", "1",
                 "--output_dir", str(tmp_path / "out"), "--progress_bar", "false", "--plot_loss", "false"]) == 0
    gen = GenerationConfig.from_pretrained(tmp_path / "out")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in gen.eos_token_id and gen.pad_token_id == tokenizer.pad_token_id


def test_saved_config_gives_transformers_4_readers_the_same_rotary_settings(tmp_path):
    """transformers 4 reads rope_theta / rope_scaling at the top level of config.json (and defaults
    rope_theta to 10000 without it); transformers 5 reads rope_parameters. Both must agree."""
    from transformers import AutoConfig, Qwen2Config

    from preftune.final import add_legacy_rope_keys

    for rope in ({"rope_type": "default", "rope_theta": 1e6},
                 {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 4096}):
        folder = tmp_path / rope["rope_type"]
        Qwen2Config(vocab_size=64, rope_parameters=rope).save_pretrained(folder)
        add_legacy_rope_keys(folder)
        saved = json.loads((folder / "config.json").read_text())
        assert saved["rope_theta"] == 1e6  # what a transformers-4 reader takes
        if rope["rope_type"] != "default":
            assert saved["rope_scaling"] == {k: v for k, v in rope.items() if k != "rope_theta"}
        assert AutoConfig.from_pretrained(folder).rope_parameters == rope  # transformers 5 reads it unchanged
