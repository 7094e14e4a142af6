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
    ({"learning_rate": "nan"}, r"^learning_rate must be a positive number; got nan$"),
    ({"learning_rate": 0}, r"^learning_rate must be a positive number; got 0"),
    ({"warmup_steps": -5}, r"^warmup_steps must be at least 0; got -5$"),
    ({"warmup_ratio": -0.1}, r"^warmup_ratio must be in \[0, 1\); got -0.1$"),
    ({"seed": -1}, r"^seed must be an integer in \[0, 4294967295\] \(numpy's seed range\); got -1$"),
    ({"seed": 2 ** 40}, r"^seed must be an integer in"),
    ({"adam_beta1": 1.0}, r"^adam_beta1 must be in \[0, 1\); got 1.0$"),
    ({"adam_beta2": -0.1}, r"^adam_beta2 must be in \[0, 1\)"),
    ({"adam_epsilon": 0}, r"^adam_epsilon must be a positive number; got 0"),
    ({"weight_decay": -0.01}, r"^weight_decay must be a number >= 0; got -0.01$"),
    ({"max_grad_norm": -1}, r"^max_grad_norm must be a number >= 0 \(0 turns clipping off\); got -1"),
    ({"num_train_epochs": -1, "max_steps": 10}, r"^num_train_epochs must be a number >= 0; got -1"),
    ({"max_steps": -2}, r"^max_steps must be at least -1 \(-1 or 0: num_train_epochs decides\); got -2$"),
    ({"val_size": 1.5}, r"^val_size must be a number >= 0 \(a share in \(0, 1\) or a count >= 1\); got 1.5$"),
    ({"val_size": -0.2}, r"^val_size must be"),
    ({"per_device_train_batch_size": 0}, r"^per_device_train_batch_size must be at least 1; got 0$"),
    ({"save_steps": 0}, r"^save_steps must be at least 1; got 0$"),
    ({"logging_steps": -1}, r"^logging_steps must be at least 1"),
    ({"lora_dropout": 1.0}, r"^lora_dropout must be in \[0, 1\)"),
    ({"top_p": 0}, r"^top_p must be in \(0, 1\]"),
    ({"skip_nonfinite_steps": -1}, r"^skip_nonfinite_steps must be at least 0"),
    ({"lr_scheduler_kwargs": {"min_lr_rate": float("nan")}}, r"^lr_scheduler_kwargs: NaN and infinity"),
    ({"loss_weights": [1.0, float("inf")], "pref_loss": "sigmoid,sft"}, r"^loss_weights: NaN and infinity"),
    ({"learning_rate": True}, r"'learning_rate' got True; expected float"),
    ({"seed": 1.5}, r"'seed' got 1.5; expected int"),
])
def test_bad_numbers_give_one_line_naming_key_value_and_range(raw, message):
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
            from_dict({"save_only_model": True})
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["eval_steps: no validation data (eval_dataset or val_size), so nothing is evaluated",
                        "eval_steps: ignored with eval_strategy: epoch",
                        "warmup_ratio: 0.1 is ignored, warmup_steps: 3 sets the warmup",
                        "save_only_model: no checkpoints are written (save_steps is unset), so it changes nothing"]


def test_defaults_pass():
    from_dict({})
    assert TrainConfig().skip_nonfinite_steps == 0 and TrainConfig().resume_override is False
