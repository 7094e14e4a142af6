"""Hostile numbers and options, end to end through the CLI: each bad input gives a non-zero exit, one
line `preftune: error: ...` naming the key and what is allowed, no traceback, and no file outside
output_dir touched (the surroundings are hashed before and after).

Each case runs once. Most run in-process through `preftune.cli.main` (the command-line text parsed,
checked, refused): a Python start with torch per case would add seconds each and test nothing more.
BOUNDARY runs as real `python -m preftune train cfg.yaml --key value` processes (tests/hostile.py's
rule, HOME and caches elsewhere): one refusal before anything loads, and one failure in the middle of
training, whose checkpoints and metric files must stay inside output_dir.
(test_numbers.py checks the config's bounds key by key through `from_dict`, without the CLI.)
"""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hostile import _inside, cli_env, run_refused, snapshot
from preftune.cli import main
from preftune.demo import make_pairs


# (command-line overrides, what the one error line must contain); the options that need validation data
# and unknown templates: test_numbers.py, which also checks what is accepted
CASES = [
    (["--learning_rate", "-1e-5"], "learning_rate must be in (0, 1e30]"),
    (["--learning_rate", "1e39"], "learning_rate must be in (0, 1e30]"),  # beyond float32: torch's AdamW would crash
    (["--learning_rate", "abc"], "config key 'learning_rate' got 'abc'; expected float"),
    (["--num_train_epochs", ".inf"], "num_train_epochs must be a number >= 0; got inf"),
    (["--warmup_steps", "-10"], "warmup_steps must be at least 0; got -10"),
    (["--warmup_ratio", "1.5"], "warmup_ratio must be in [0, 1); got 1.5"),
    (["--seed", "-1"], "seed must be an integer in [0, 4294967295] (numpy's seed range); got -1"),
    (["--seed", "1.5"], "config key 'seed' got 1.5; expected int"),
    (["--adam_beta1", "1"], "adam_beta1 must be in [0, 1); got 1"),
    (["--adam_beta2", ".nan"], "adam_beta2 must be in [0, 1); got nan"),
    (["--adam_epsilon", "0"], "adam_epsilon must be a positive number; got 0"),
    (["--weight_decay", "-0.1"], "weight_decay must be a number >= 0; got -0.1"),
    (["--max_grad_norm", ".inf"], "max_grad_norm must be a number >= 0 (0 turns clipping off); got inf"),
    (["--val_size", "2.5"], "val_size must be a number >= 0 (a share in (0, 1) or a count >= 1); got 2.5"),
    (["--pref_beta", "0"], "pref_beta must be a positive number; got 0"),
    (["--label_smoothing", ".nan"], "label_smoothing must be in [0, 0.5)"),
    (["--pref_loss", "simpo", "--simpo_gamma", "-1"], "simpo_gamma must be a number >= 0; got -1"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be at least 1; got 0"),
    (["--finetuning_type", "lora", "--lora_dropout", "1.5"], "lora_dropout must be in [0, 1); got 1.5"),
    (["--max_steps", "-3"], "max_steps must be at least -1"),
    (["--max_steps", "true"], "config key 'max_steps' got True; expected int"),
    (["--logging_steps", "0"], "logging_steps must be at least 1; got 0"),
    (["--skip_nonfinite_steps", "-1"], "skip_nonfinite_steps must be at least 0; got -1"),
    (["--lr_scheduler_kwargs", "{min_lr_rate: .nan}"], "lr_scheduler_kwargs: NaN and infinity are not allowed"),
]
GPU_ONLY = [(["--fp16", "true"], "fp16: float16 mixed precision needs a CUDA GPU")]  # refused on a CPU machine
IN_PROCESS = CASES + ([] if torch.cuda.is_available() else GPU_ONLY)
# as `python -m preftune` processes: a refusal before anything loads; a run that trains until its loss is
# non-finite (learning_rate 1e30: step 2), having written checkpoints and metric files
REFUSED = (["--learning_rate", "nan"], "learning_rate must be in (0, 1e30] (fine-tuning uses about 1e-6 to 1e-4); "
                                       "got nan")
NON_FINITE = (["--learning_rate", "1e30", "--logging_steps", "1"], "training stopped at step 2: the loss is non-finite")


@pytest.fixture
def setup(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(16, 0)))
    out = tmp_path / "out"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": str(tiny_model_dir), "dataset": str(data),
                                   "output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 4,
                                   "cutoff_len": 64, "torch_dtype": "float32", "progress_bar": False,
                                   "plot_loss": False, "save_steps": 1}))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cfg, out, cwd, [tmp_path, tiny_model_dir]


def check(code: int, stderr: str, expected: str, out: Path):
    errors = [line for line in stderr.splitlines() if line.startswith("preftune: error: ")]
    assert code == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    assert len(errors) == 1 and expected in errors[0], stderr[-2000:]
    assert not (out / "model.safetensors").exists()  # never a final model from a refused or failed run


@pytest.mark.parametrize("args, expected", IN_PROCESS, ids=[" ".join(a) for a, _ in IN_PROCESS])
def test_bad_numbers_and_options_through_cli_main(setup, args, expected, capsys, monkeypatch):
    cfg, out, cwd, watch = setup
    before = snapshot(watch)
    monkeypatch.chdir(cwd)
    code = main(["train", str(cfg), *args])
    check(code, capsys.readouterr().err, expected, out)
    after = snapshot(watch)  # nothing outside output_dir changed
    assert not [p for p in before.keys() | after.keys() if before.get(p) != after.get(p) and not _inside(p, out)]


def refused_by_the_cli(setup, args, expected) -> str:
    cfg, out, cwd, watch = setup  # the shared rule (tests/hostile.py): one line, no traceback, nothing else touched
    message = run_refused(["train", str(cfg), *args], cwd, watch, expect=[expected], output_dir=out,
                          env=cli_env(cwd.parent.with_name(cwd.parent.name + "_home")))  # HOME, caches: not watched
    assert not (out / "model.safetensors").exists()
    return message


def test_a_bad_number_through_the_cli(setup):
    refused_by_the_cli(setup, *REFUSED)


def test_a_non_finite_loss_stops_the_cli_run_at_its_step(setup):
    """The run stops at the first non-finite step, naming it, the likely cause and the last good
    checkpoint, whose weights are finite; no checkpoint of the bad step, no final model; the metric
    files hold every finite step's row and the failure."""
    message = refused_by_the_cli(setup, *NON_FINITE)
    out = setup[1]
    assert "Likely cause: learning_rate 1e+30 is far too high" in message
    assert f"the last good checkpoint is {out / 'checkpoint-1'}" in message and not (out / "checkpoint-2").exists()
    assert all(torch.isfinite(w).all() for w in load_file(out / "checkpoint-1" / "model.safetensors").values())
    summary = json.loads((out / "dpo_metrics" / "summary.json").read_text())
    assert summary["status"].startswith("failed: non-finite") and summary["status"].endswith("at step 2")
    assert [r["step"] for r in json.loads((out / "dpo_metrics" / "log_history.json").read_text())] == [1]
