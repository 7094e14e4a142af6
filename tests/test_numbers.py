"""The numbers are checked: every numeric key's type, finiteness and range before anything loads
(config.BOUNDS), options that cannot act refused or warned once, and the run-time guards
(preftune/runtime.py): non-finite steps, SIGINT/SIGTERM, live metric files, resume changes."""

import logging
import math

import pytest

from preftune import config
from preftune.config import BOUNDS, TrainConfig, from_dict
from preftune.errors import ConfigError
from preftune.tokenization import BUILTIN_TEMPLATES

NUMERIC_EXEMPT = {"quantization_bit", "ref_model_quantization_bit",  # choices 4 or 8
                  "freeze_trainable_layers"}  # any integer but 0 (its own check)


def test_every_numeric_key_has_bounds():
    numeric = {name for name, base in config._TYPES_BASE.items() if base in (int, float)}
    assert numeric - NUMERIC_EXEMPT == set(BOUNDS)


FLOAT_KEYS = sorted(name for name in BOUNDS if config._TYPES_BASE[name] is float)


@pytest.mark.parametrize("name", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_floats_are_refused_with_key_and_range(name, value):
    with pytest.raises(ConfigError) as err:
        from_dict({name: value})
    message = str(err.value)
    assert message.startswith(f"{name} must be ") and message.endswith(f"got {value}") and "\n" not in message


@pytest.mark.parametrize("raw, message", [
    ({"learning_rate": 0}, r"^learning_rate must be in \(0, 1e30\] \(fine-tuning uses about 1e-6 to 1e-4\); got 0"),
    ({"warmup_steps": -5}, r"^warmup_steps must be at least 0; got -5$"),
    ({"warmup_ratio": -0.1}, r"^warmup_ratio must be in \[0, 1\); got -0.1$"),
    ({"seed": 2 ** 40}, r"^seed must be an integer in"),
    ({"adam_beta2": -0.1}, r"^adam_beta2 must be in \[0, 1\)"),
    ({"weight_decay": -0.01}, r"^weight_decay must be a number >= 0; got -0.01$"),
    ({"max_grad_norm": -1}, r"^max_grad_norm must be a number >= 0 \(0 turns clipping off\); got -1"),
    ({"num_train_epochs": -1, "max_steps": 10}, r"^num_train_epochs must be a number >= 0; got -1"),
    ({"max_steps": -2}, r"^max_steps must be at least -1 \(-1 or 0: num_train_epochs decides\); got -2$"),
    ({"val_size": 1.5}, r"^val_size must be a number >= 0 \(a share in \(0, 1\) or a count >= 1\); got 1.5$"),
    ({"val_size": -0.2}, r"^val_size must be"),
    ({"save_steps": 0}, r"^save_steps must be at least 1; got 0$"),
    ({"logging_steps": -1}, r"^logging_steps must be at least 1"),
    ({"lora_dropout": 1.0}, r"^lora_dropout must be in \[0, 1\)"),
    ({"top_p": 0}, r"^top_p must be in \(0, 1\]"),
    ({"skip_nonfinite_steps": -1}, r"^skip_nonfinite_steps must be at least 0"),
    ({"loss_weights": [1.0, float("inf")], "pref_loss": "sigmoid,sft"}, r"^loss_weights: NaN and infinity"),
    ({"learning_rate": True}, r"'learning_rate' got True; expected float"),
])
def test_bad_numbers_give_one_line_naming_key_value_and_range(raw, message):
    """More bad values, given on the command line: test_hostile_numbers.py (a case is in one file or the other)."""
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_val_size_share_or_count_is_said(tmp_path, caplog):
    from preftune.data import load_pairs
    from preftune.demo import make_pairs
    import json

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(20, 0)))
    with caplog.at_level(logging.INFO, logger="preftune"):
        load_pairs(from_dict({"dataset": str(data), "val_size": 0.25}))
        load_pairs(from_dict({"dataset": str(data), "val_size": 3}))
    assert "val_size 0.25 read as a share: 5 of 20 pairs held out" in caplog.text
    assert "val_size 3 read as a count: 3 of 20 pairs held out" in caplog.text


def test_template_names_match_the_built_ins():
    assert set(config.TEMPLATE_NAMES) == set(BUILTIN_TEMPLATES)


def test_unknown_template_lists_the_known_names():
    with pytest.raises(ConfigError, match=r"^template: unknown name 'chatmll'; use one of chatml, qwen, .* or none, "
                                          r"empty, plain \(raw text\)"):
        from_dict({"template": "chatmll"})
    for name in ("none", "empty", "plain", "llama3"):  # raw-text names are accepted (none reads as unset)
        from_dict({"template": name})


@pytest.mark.parametrize("key", ["early_stopping_patience", "generate_during_eval"])
def test_options_needing_validation_data_are_refused_without_it(key):
    with pytest.raises(ConfigError, match=f"^{key}: needs validation data, and there is none; set eval_dataset"):
        from_dict({key: 2})
    from_dict({key: 2, "val_size": 0.1})  # with validation data: fine


def test_inert_options_are_warned_once(caplog):
    config._warned.clear()
    with caplog.at_level(logging.WARNING, logger="preftune"):
        for _ in range(2):
            from_dict({"eval_steps": 5})
            from_dict({"eval_steps": 5, "val_size": 0.1, "eval_strategy": "epoch"})
            from_dict({"warmup_steps": 3, "warmup_ratio": 0.1})
            from_dict({"save_only_model": True, "save_strategy": "no"})
            from_dict({"overwrite_output_dir": True, "resume_from_checkpoint": True})
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["eval_steps: no validation data (eval_dataset or val_size), so nothing is evaluated",
                        "eval_steps: ignored with eval_strategy: epoch",
                        "warmup_ratio: 0.1 is ignored, warmup_steps: 3 sets the warmup",
                        "save_only_model: no checkpoints are written (save_strategy: no, or save_steps: null), so it changes nothing",
                        "overwrite_output_dir: ignored when resuming (the checkpoints in output_dir are the run's own)"]


def test_sampling_at_evaluations_without_evaluations_is_refused():
    with pytest.raises(ConfigError, match="^generate_during_eval samples at each evaluation, and eval_strategy is no"):
        from_dict({"generate_during_eval": 2, "val_size": 0.1, "eval_strategy": "no"})


def test_defaults_pass():
    from_dict({})
    assert TrainConfig().skip_nonfinite_steps == 0 and TrainConfig().resume_override is False


# --- run time: non-finite steps (preftune/runtime.py) ---------------------------------------------
# (a learning rate that makes the loss non-finite, end to end through the CLI: test_hostile_numbers.py)

import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from preftune import engines, runtime  # noqa: E402
from preftune import train as train_mod  # noqa: E402
from preftune.demo import make_pairs  # noqa: E402


def small_run(tmp_path, model_dir, **over):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(32, 0)))
    raw = {"model_name_or_path": str(model_dir), "dataset": str(data), "output_dir": str(tmp_path / "out"),
           "per_device_train_batch_size": 4, "max_steps": 6, "logging_steps": 1, "cutoff_len": 64,
           "torch_dtype": "float32", "progress_bar": False, "plot_loss": False, "learning_rate": 1e-3}
    return from_dict({**raw, **over})


def inject_inf_gradient(monkeypatch, at_call: int):
    """The `at_call`-th gradient clipping of the process sees an infinite gradient (a real one, in a weight)."""
    real = Accelerator.clip_grad_norm_
    calls = []

    def clip(self, parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        calls.append(1)
        if len(calls) == at_call:
            next(p for p in parameters if p.grad is not None).grad.view(-1)[0] = math.inf
        return real(self, parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(Accelerator, "clip_grad_norm_", clip)


def test_an_injected_infinite_gradient_stops_the_run_naming_the_step(tmp_path, tiny_model_dir, monkeypatch):
    inject_inf_gradient(monkeypatch, at_call=3)
    with pytest.raises(runtime.NonFiniteStep, match=r"^training stopped at step 3: the gradient norm is inf .*"
                                                    r"no checkpoint was written \(set save_steps"):
        train_mod.train(small_run(tmp_path, tiny_model_dir))
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_skip_nonfinite_steps_skips_and_counts(tmp_path, tiny_model_dir, monkeypatch, caplog):
    inject_inf_gradient(monkeypatch, at_call=3)
    with caplog.at_level(logging.WARNING, logger="preftune"):
        summary = train_mod.train(small_run(tmp_path, tiny_model_dir, skip_nonfinite_steps=1))
    assert summary["nonfinite_steps_skipped"] == {"count": 1, "steps": [3]}
    assert summary["status"] == "completed" and summary["steps"]["done"] == 6
    assert "step 3: the gradient norm is inf; step skipped (1 of skip_nonfinite_steps: 1)" in caplog.text
    assert "non-finite steps skipped: 1 (steps 3; skip_nonfinite_steps: 1)" in caplog.text
    history = json.loads((tmp_path / "out" / "dpo_metrics" / "log_history.json").read_text())
    assert [r["step"] for r in history] == [1, 2, 4, 5, 6]  # the skipped step's NaN statistics are not logged
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_a_skipped_step_takes_no_optimizer_or_schedule_step(tmp_path, tiny_model_dir, monkeypatch):
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    inject_inf_gradient(monkeypatch, at_call=2)
    summary = train_mod.train(small_run(tmp_path, tiny_model_dir, skip_nonfinite_steps=3, lr_scheduler_type="linear"))
    assert len(steps) == 5  # 6 steps, one skipped
    assert summary["final"]["learning_rate"] == pytest.approx(1e-3 * 1 / 6)  # the schedule advanced 5 times


def test_fp16_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^fp16: float16 mixed precision needs a CUDA GPU"):
        engines.check_hardware(from_dict({"fp16": True}))
    engines.check_hardware(from_dict({"bf16": True}))  # bf16 autocast runs on CPUs


# --- signals -----------------------------------------------------------------------------------------


def signal_at_step(monkeypatch, signum, at_step: int, times: int = 1):
    """The process sends itself `signum` during optimizer step `at_step` (`times` times)."""
    real_step = torch.optim.AdamW.step
    count = []

    def step(self, *args, **kwargs):
        count.append(1)
        if len(count) == at_step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_stops(tmp_path, tiny_model_dir, monkeypatch, signum,
                                                                   code):
    signal_at_step(monkeypatch, signum, at_step=4)
    previous = signal.getsignal(signum)
    with pytest.raises(runtime.Stopped) as err:
        train_mod.train(small_run(tmp_path, tiny_model_dir, save_steps=3))
    out = tmp_path / "out"
    name = signal.Signals(signum).name
    assert err.value.exit_code == code
    assert str(err.value) == (f"stopped by {name} after step 4; metrics are in {out / 'dpo_metrics'}; the last good "
                              f"checkpoint is {out / 'checkpoint-4'} (resume_from_checkpoint: true continues from it)")
    assert signal.getsignal(signum) is previous  # handlers restored
    assert (out / "checkpoint-3").is_dir() and (out / "checkpoint-4").is_dir()
    assert not (out / "model.safetensors").exists()
    assert [r["step"] for r in json.loads((out / "dpo_metrics" / "log_history.json").read_text())] == [1, 2, 3, 4]
    summary = json.loads((out / "dpo_metrics" / "summary.json").read_text())
    assert summary["status"] == f"stopped by {name} after step 4" and summary["kept_model"] is None


def test_a_second_signal_stops_at_once(tmp_path, tiny_model_dir, monkeypatch):
    signal_at_step(monkeypatch, signal.SIGTERM, at_step=2, times=2)
    with pytest.raises(runtime.Stopped, match="a second signal: the current step was abandoned"):
        train_mod.train(small_run(tmp_path, tiny_model_dir, save_steps=3))
    assert not (tmp_path / "out" / "checkpoint-2").exists()


# --- live metric files ---------------------------------------------------------------------------------


def test_metric_files_gain_each_row_as_it_is_logged(tmp_path, tiny_model_dir, monkeypatch):
    from preftune.report import MetricsLog

    seen = []
    real_log = MetricsLog.log

    def log_and_look(self, row):
        real_log(self, row)
        history = json.loads((self.dir / "log_history.json").read_text())
        csv_steps = [line.split(",")[0] for line in (self.dir / "training_metrics.csv").read_text().splitlines()[1:]]
        summary = json.loads((self.dir / "summary.json").read_text()) if (self.dir / "summary.json").exists() else None
        seen.append((row["step"], len(history), csv_steps, summary and summary["status"]))

    monkeypatch.setattr(MetricsLog, "log", log_and_look)
    train_mod.train(small_run(tmp_path, tiny_model_dir, max_steps=4, logging_steps=2, val_size=8, eval_steps=2,
                              plot_loss=True))
    assert seen[0] == (0, 1, ["0"], None)  # the baseline evaluation: no summary yet
    assert seen[1][:3] == (2, 2, ["0", "2"])  # train row at 2
    assert seen[2][:3] == (2, 3, ["0", "2"]) and seen[2][3] == "running"  # eval row at 2: summary refreshed
    assert seen[-1][:3] == (4, 5, ["0", "2", "4"])
    summary = json.loads((tmp_path / "out" / "dpo_metrics" / "summary.json").read_text())
    assert summary["status"] == "completed" and (tmp_path / "out" / "dpo_metrics" / "training_curves.png").is_file()


def test_only_the_main_process_writes_metric_files(tmp_path):
    from preftune.report import MetricsLog

    metrics = MetricsLog(from_dict({"output_dir": str(tmp_path / "out")}))
    metrics.writes = False  # describe_setup sets it from accelerator.is_main_process
    metrics.log({"step": 1, "epoch": 0.1, "loss": 0.5})
    metrics.log({"step": 1, "epoch": 0.1, "eval_loss": 0.6})
    assert not (tmp_path / "out").exists() and len(metrics.history) == 2


# --- resume: what may change -------------------------------------------------------------------------

from preftune import checkpoints  # noqa: E402
from preftune.losses import LOSSES, UNPAIRED_LOSSES, loss_options  # noqa: E402


def test_every_loss_option_is_a_guarded_resume_key():
    options = {key for name in [*LOSSES, *UNPAIRED_LOSSES] for key in loss_options(name)}
    assert options <= set(checkpoints.CHANGED_RUN_KEYS["loss"])
    grouped = set().union(*checkpoints.CHANGED_RUN_KEYS.values())
    assert not grouped & set(checkpoints.FREE_ON_RESUME) and set(config._FIELDS) >= grouped


@pytest.fixture
def checkpointed(tmp_path, tiny_model_dir):
    """A finished run of 4 steps with checkpoint-2 and checkpoint-4."""
    cfg = small_run(tmp_path, tiny_model_dir, max_steps=4, save_steps=2)
    train_mod.train(cfg)
    return cfg


def resumed(cfg, **over):
    return from_dict({**cfg.to_dict(), "resume_from_checkpoint": True, **over})


@pytest.mark.parametrize("over, message", [
    ({"pref_beta": 0.2}, r"written by another run \(loss: pref_beta 0.1 -> 0.2\); resume with the run's own settings, "
                         r"or set resume_override: true"),
    ({"ref_model": "{model}"}, r"\(reference: ref_model None -> '.*tiny_model.*'\)"),
    ({"pref_loss": "ipo"}, r"\(loss: pref_loss 'sigmoid' -> 'ipo'\)"),
    ({"finetuning_type": "lora"}, r"\(model: finetuning_type 'full' -> 'lora'\)"),
    ({"max_steps": 3}, r"^max_steps: 3 is below the step of the checkpoint resumed \(checkpoint-4, step 4\)"),
    ({"seed": 1}, r"written with other seed \(seed=42\)"),
])
def test_a_resume_that_changes_the_run_is_refused_naming_the_change(checkpointed, tiny_model_dir, over, message):
    over = {k: v.format(model=tiny_model_dir) if isinstance(v, str) else v for k, v in over.items()}
    with pytest.raises(ConfigError, match=message):
        checkpoints.resume_dir(resumed(checkpointed, **over))


def test_a_changed_model_is_refused(checkpointed, tmp_path):
    other = tmp_path / "other_model"
    other.mkdir()
    with pytest.raises(ConfigError, match=r"\(model: model_name_or_path '.*' -> '.*other_model'\)"):
        checkpoints.resume_dir(resumed(checkpointed, model_name_or_path=str(other)))


def test_resume_override_allows_a_deliberate_change_with_a_warning(checkpointed, caplog):
    with caplog.at_level(logging.WARNING, logger="preftune"):
        folder = checkpoints.resume_dir(resumed(checkpointed, pref_beta=0.2, resume_override=True))
    assert folder.name == "checkpoint-4"
    assert "resume_override: continuing" in caplog.text and "pref_beta 0.1 -> 0.2" in caplog.text


def test_free_keys_change_silently_and_others_are_warned(checkpointed, caplog):
    with caplog.at_level(logging.WARNING, logger="preftune"):
        checkpoints.resume_dir(resumed(checkpointed, logging_steps=5, save_steps=3, plot_loss=True))
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="preftune"):
        checkpoints.resume_dir(resumed(checkpointed, learning_rate=5e-4, max_steps=8))
    assert "settings differ from the checkpoint's run: max_steps 4 -> 8, learning_rate 0.001 -> 0.0005" in caplog.text


def test_a_resume_on_other_data_is_refused(checkpointed):
    data = checkpointed.dataset
    lines = open(data).read().splitlines()
    record = json.loads(lines[0])
    record["chosen"] = "Edited. " + record["chosen"]  # at the start: cutoff_len keeps it
    with open(data, "w") as f:
        f.write("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    with pytest.raises(ConfigError, match=r"was trained on other data \(the same settings: the files' contents "
                                          r"changed\); resume with the run's own data, or set resume_override: true"):
        train_mod.train(resumed(checkpointed, max_steps=6))
    summary = train_mod.train(resumed(checkpointed, max_steps=6, resume_override=True))
    assert summary["resumed_from"]["step"] == 4 and summary["steps"]["done"] == 6


def test_a_final_model_with_non_finite_weights_is_never_saved(tmp_path, tiny_model_dir, monkeypatch):
    """An update that overflows on the last step: no later loss shows it, the final check does."""
    real_step = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        self.param_groups[0]["params"][0].data.fill_(math.inf)
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    with pytest.raises(runtime.NonFiniteStep, match=r"^training stopped after step 1: weight .* is not finite"):
        train_mod.train(small_run(tmp_path, tiny_model_dir, max_steps=1))
    assert not (tmp_path / "out" / "model.safetensors").exists()
