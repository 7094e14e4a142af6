"""Config: LLaMA-Factory keys, seed-003 aliases, overrides, the command-line parser, the groups of keys,
and one clear line per bad value."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from preftune.config import GROUPS, TrainConfig, from_dict, load_config, parse_command_line
from preftune.errors import ConfigError

SEED_000_YAML = """\
### DPO 训练配置
model_name_or_path: Qwen/Qwen2.5-7B
stage: dpo                              # 关键：设为 dpo
do_train: true
finetuning_type: lora

### DPO 特有参数
pref_beta: 0.1
pref_loss: sigmoid

### LoRA
lora_rank: 64
lora_target: all

### 数据
dataset: my_dpo_data
template: qwen
cutoff_len: 2048

### 训练
per_device_train_batch_size: 1
gradient_accumulation_steps: 16
num_train_epochs: 2.0
learning_rate: 5.0e-6
bf16: true
output_dir: saves/qwen2.5-7b/lora/dpo
"""

SEED_003_CONFIG = {
    "train_data_path": "train.jsonl", "val_data_path": "val.jsonl", "batch_size": 32,
    "model_name": "meta-llama/Llama-2-7b", "ref_model": "same_as_policy", "beta": 0.1, "max_length": 512,
    "optimizer": "adamw", "learning_rate": 1e-5, "weight_decay": 0.01, "warmup_steps": 100, "num_epochs": 3,
    "max_grad_norm": 1.0, "eval_every": 100, "dropout": 0.1, "early_stopping_patience": 3,
    "mixed_precision": "fp16", "log_every": 10, "save_every": 500,
}


def test_seed_000_yaml_parses_with_lora(tmp_path):
    path = tmp_path / "dpo.yaml"
    path.write_text(SEED_000_YAML, encoding="utf-8")
    cfg = load_config(str(path))
    assert cfg.finetuning_type == "lora" and cfg.lora_target == "all" and cfg.lora_alpha is None
    assert (cfg.pref_beta, cfg.pref_loss, cfg.cutoff_len, cfg.gradient_accumulation_steps) == (0.1, "sigmoid", 2048, 16)
    assert cfg.bf16 and cfg.mixed_precision == "bf16" and cfg.learning_rate == 5e-6 and cfg.lora_rank == 64


def test_seed_003_names_are_aliases():
    cfg = from_dict(SEED_003_CONFIG)
    assert cfg.dataset == "train.jsonl" and cfg.eval_dataset == "val.jsonl"
    assert cfg.per_device_train_batch_size == 32 and cfg.model_name_or_path == "meta-llama/Llama-2-7b"
    assert cfg.ref_model is None and cfg.pref_beta == 0.1 and cfg.cutoff_len == 512
    assert cfg.num_train_epochs == 3 and cfg.eval_steps == 100 and cfg.logging_steps == 10 and cfg.save_steps == 500
    assert cfg.fp16 and not cfg.bf16 and cfg.dropout == 0.1 and cfg.early_stopping_patience == 3


@pytest.mark.parametrize("key,suggestion", [("pref_betta", "pref_beta"), ("learnig_rate", "learning_rate"),
                                            ("cutof_len", "cutoff_len"), ("bta", "beta")])
def test_unknown_key_suggests_closest(key, suggestion):
    with pytest.raises(ConfigError, match=f"unknown key '{key}'. Did you mean '{suggestion}'"):
        from_dict({key: 1})


@pytest.mark.parametrize("raw,message", [
    ({"pref_beta": -0.1}, "pref_beta must be a positive number"),
    ({"beta": 0}, "must be a positive number"),
    ({"pref_loss": "sigmod"}, "unknown loss 'sigmod'.*Did you mean 'sigmoid'"),
    ({"pref_bco_weight": -0.5}, "pref_bco_weight must be a number >= 0"),
    ({"pref_loss": "simpo", "pref_bco_weight": 0.5}, "pref_bco_weight: BCO needs the reference and pref_loss simpo"),
    ({"stage": "ppo"}, "stage: unknown value 'ppo'; use dpo, sft or rm"),
    ({"stage": "sft", "pref_loss": "ipo"}, "pref_loss: stage: sft trains on completions alone"),
    ({"finetuning_type": "lora", "lora_rank": 0}, "lora_rank must be at least 1"),
    ({"learning_rate": "fast"}, "learning_rate' got 'fast'; expected float"),
    ({"per_device_train_batch_size": 0}, "at least 1"),
    ({"per_device_train_batch_size": 2.5}, "expected int"),
    ({"bf16": "maybe"}, "expected bool"),
    ({"mixed_precision": "int8"}, "mixed_precision must be one of"),
    ({"bf16": True, "fp16": True}, "choose one"),
    ({"beta": 0.1, "pref_beta": 0.2}, "both set pref_beta; keep one"),
    ({"pref_ftx": -0.5}, "pref_ftx must be a number >= 0"),
    ({"rpo_alpha": 1.0}, "rpo_alpha \\(older TRL\\) averages the NLL over all chosen tokens.*Use pref_ftx"),
    ({"label_smoothing": 0.5}, "label_smoothing must be in \\[0, 0.5\\)"),
    ({"label_smoothing": -0.1}, "label_smoothing must be in \\[0, 0.5\\)"),
    ({"pref_loss": "robust", "label_smoothing": 0.5}, "robust divides by 1 - 2 \\* label_smoothing"),
    ({"pref_loss": "hinge", "label_smoothing": 0.1}, "pref_loss hinge does not use it"),
    ({"pref_loss": "ipo", "dpo_label_smoothing": 0.1}, "pref_loss ipo does not use it"),
    ({"pref_loss": "discopop", "label_smoothing": 0.1}, "pref_loss discopop does not use it"),
    ({"pref_loss": "exo_pair"}, "exo_pair needs label_smoothing > 0"),
    ({"pref_loss": "discopop", "discopop_tau": 0}, "discopop_tau must be a positive number"),
    ({"pref_loss": "simpo", "simpo_gamma": -0.5}, "simpo_gamma must be a number >= 0"),
    ({"pref_loss": "simpo", "label_smoothing": 0.1}, "pref_loss simpo does not use it"),
    ({"pref_loss": "orpo", "ref_model": "other/model"}, "orpo is reference-free and loads no reference model"),
    ({"pref_loss": ["sigmoid", "sft"], "loss_weights": [1.0]}, "loss_weights: 1 weights for 2 losses in pref_loss"),
    ({"pref_loss": ["sigmoid", "sigmod"]}, "unknown loss 'sigmod'.*Did you mean 'sigmoid'"),
    ({"pref_loss": "sigmoid,sigmoid"}, "names a loss twice"),
    ({"pref_loss": "sigmoid", "loss_weights": [-1.0]}, "loss_weights must be numbers >= 0"),
    ({"loss_weights": "a,b"}, "loss_weights' got 'a,b'"),
    ({"pref_loss": "simpo,sft", "label_smoothing": 0.1}, "pref_loss simpo,sft does not use it"),
])
def test_invalid_values_give_one_clear_line(raw, message):
    with pytest.raises(ConfigError, match=message) as err:
        from_dict(raw)
    assert "\n" not in str(err.value)


def test_overrides_replace_file_values_whatever_the_spelling(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"beta": 0.1, "mixed_precision": "bf16", "max_length": 256}))
    line = parse_command_line([str(path), "--pref_beta", "0.3", "--bf16=false", "--cutoff_len", "64"])
    assert line.config == str(path) and line.overrides == {"pref_beta": 0.3, "bf16": False, "cutoff_len": 64}
    cfg = load_config(line.config, line.overrides)
    assert (cfg.pref_beta, cfg.bf16, cfg.cutoff_len) == (0.3, False, 64)
    # a list of arguments goes through the same parser
    assert load_config(str(path), ["--max_length", "32"]).cutoff_len == 32
    with pytest.raises(ConfigError, match="needs a value"):
        load_config(str(path), ["--pref_beta"])


def test_one_parser_for_every_command():
    """Positional, --config, overrides (read as YAML, keys as written), a command's flags, switches and aliases."""
    line = parse_command_line(["data.jsonl", "--model", "m", "--json", "--plot=p.png", "--cutoff-len", "64",
                               "--columns", "{prompt: q}"], positional="dataset", flags={"json": False, "plot": None})
    assert line.config is None and line.flags == {"json": True, "plot": "p.png"}
    assert line.overrides == {"dataset": "data.jsonl", "model": "m", "cutoff_len": 64, "columns": {"prompt": "q"}}
    assert list(line.overrides) == ["dataset", "model", "cutoff_len", "columns"]  # the positional first
    line = parse_command_line(["out", "--data", "d.jsonl", "--dtype", "int8", "--config", "run.yaml"],
                              positional="model_name_or_path", flags={"dtype": "bf16", "overwrite": False},
                              aliases={"data": "eval_dataset"})
    assert line == ("run.yaml", {"model_name_or_path": "out", "eval_dataset": "d.jsonl"},
                    {"dtype": "int8", "overwrite": False})
    assert parse_command_line(["--beta", "0.1", "--beta", "0.2"]).overrides == {"beta": 0.2}  # the later wins
    assert parse_command_line(["--template", "none", "--x="]).overrides == {"template": "none", "x": ""}
    # a flag as the positional keeps its text as given (label's FILE)
    assert parse_command_line(["123"], positional="file", flags={"file": None}).flags == {"file": "123"}


@pytest.mark.parametrize("args,spec,message", [
    (["a.yaml", "b.yaml"], {}, "unexpected argument 'b.yaml' \\(after 'a.yaml'\\)"),
    (["a.yaml", "--config", "b.yaml"], {}, "two config files, 'a.yaml' and --config b.yaml"),
    (["--pref_beta", "--bf16", "true"], {}, "--pref_beta needs a value"),
    (["--json=yes"], {"flags": {"json": False}}, "--json is a switch and takes no value"),
    (["--columns", "{prompt: q"], {}, "--columns '{prompt: q' is read as YAML and is not valid YAML"),
])
def test_command_line_mistakes_are_one_line(args, spec, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_command_line(args, **spec)
    assert "\n" not in str(e.value)


def test_every_key_has_one_of_the_groups():
    groups = {name: [f.name for f in dataclasses.fields(TrainConfig) if f.metadata["group"] == name] for name in GROUPS}
    assert all(groups.values()), [name for name, keys in groups.items() if not keys]
    assert sum(map(len, groups.values())) == len(dataclasses.fields(TrainConfig))
    assert "lora_rank" in groups["adapters"] and "tokenized_cache_dir" in groups["caches"]


def test_config_names_equal_their_owners():
    """config keeps plain copies of names that torch-importing modules own (so reading a config is quick)."""
    from preftune import losses, optim
    from preftune.config import names

    assert names.LOSSES == tuple(losses.LOSSES) and names.UNPAIRED_LOSSES == tuple(losses.UNPAIRED_LOSSES)
    assert set(names.REFERENCE_FREE) == losses.REFERENCE_FREE
    smoothed = tuple(n for n in names.LOSS_NAMES if "label_smoothing" in losses.loss_options(n))
    assert names.LABEL_SMOOTHING_LOSSES == smoothed
    f_losses = tuple(n for n in names.LOSS_NAMES if "f_divergence_type" in losses.loss_options(n))
    assert names.F_DIVERGENCE_LOSSES == f_losses
    assert (names.OPTIMIZERS, names.SCHEDULERS) == (optim.OPTIMIZERS, optim.SCHEDULERS)


def test_reading_a_config_does_not_import_torch():
    root = Path(__file__).resolve().parents[1]
    code = ("import sys; from preftune.config import load_config; "
            "load_config('examples/dpo.yaml', {'pref_loss': 'sigmoid,sft', 'label_smoothing': 0.1}); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.stdout.split() == ["False", "False"], out.stderr


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("pref_beta: [0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_defaults_are_sane():
    cfg = TrainConfig()
    assert cfg.pref_beta == 0.1 and cfg.pref_loss == "sigmoid" and cfg.output_dir == "output"
    assert cfg.disable_dropout and cfg.eval_batch_size == cfg.per_device_train_batch_size


@pytest.mark.parametrize("loss", ["sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"])
def test_label_smoothing_is_accepted_by_the_losses_that_use_it(loss):
    assert from_dict({"pref_loss": loss, "label_smoothing": 0.1}).label_smoothing == 0.1
    assert from_dict({"pref_loss": loss, "dpo_label_smoothing": 0.1}).label_smoothing == 0.1  # LLaMA-Factory


def test_every_loss_loads_with_default_hyperparameters():
    from preftune.config import LOSS_NAMES
    for loss in set(LOSS_NAMES) - {"exo_pair"}:  # exo_pair needs label_smoothing > 0 (tested above)
        cfg = from_dict({"pref_loss": loss})
        assert cfg.label_smoothing == 0.0 and cfg.discopop_tau == 0.05


@pytest.mark.parametrize("raw,message", [
    ({"pref_loss": "sigmoid,kto"}, r"^pref_loss: kto trains on unpaired examples and cannot be combined with the "
                                   r"paired loss\(es\) sigmoid; use pref_loss: kto alone$"),
    ({"pref_loss": "sigmoid", "kto_chosen_weight": 2.0}, r"^kto_chosen_weight: only pref_loss: kto weighs"),
    ({"pref_loss": "ipo", "undesirable_weight": 0.5}, r"^kto_rejected_weight: only pref_loss: kto weighs .* "
                                                      r"pref_loss is ipo; remove kto_rejected_weight$"),
    ({"pref_loss": "kto", "kto_chosen_weight": -1}, r"^kto_chosen_weight must be a number >= 0; got -1"),
    ({"pref_loss": "kto", "pref_ftx": 0.1}, r"^pref_ftx: not supported with pref_loss: kto"),
    ({"pref_loss": "kto", "loss_weights": [3.0]}, r"^loss_weights: weighs several losses, and kto runs alone"),
    ({"pref_loss": "kto", "pref_bco_weight": 0.1}, r"^pref_bco_weight: not supported with pref_loss: kto"),
    ({"pref_loss": "kto", "label_smoothing": 0.1}, r"^label_smoothing: pref_loss kto does not use it"),
    ({"f_divergence_type": "kl"}, r"^f_divergence_type: unknown value 'kl'; use reverse_kl, forward_kl, "),
    ({"pref_loss": "nca_pair", "f_divergence_type": "forward_kl"},
     r"^f_divergence_type: forward_kl replaces the log-ratios in DPO's margin, which nca_pair does not use \(.*"
     r"TRL refuses it too\); use one of sigmoid, hinge, ipo, robust, exo_pair, discopop, sigmoid_norm, or "),
    ({"pref_loss": "sigmoid,bco_pair", "f_divergence_type": "js_divergence"},
     r"^f_divergence_type: js_divergence .* which bco_pair does not use"),
    ({"pref_loss": "simpo", "f_divergence_type": "js_divergence"}, r"^f_divergence_type: .* which simpo does not use"),
    ({"pref_loss": "sft", "f_divergence_type": "js_divergence"}, r"^f_divergence_type: .* which sft does not use"),
    ({"pref_loss": "kto", "f_divergence_type": "forward_kl"}, r"^f_divergence_type: .* which kto does not use"),
    ({"f_divergence_type": "forward_kl", "f_alpha_divergence_coef": 0.3},
     r"^f_alpha_divergence_coef: used only with f_divergence_type: alpha_divergence \(it is forward_kl\)"),
    ({"ld_alpha": 1.5}, r"^ld_alpha must be in \[0, 1\]"),
    ({"pref_loss": "simpo", "ld_alpha": 0.5}, r"^ld_alpha: LD-DPO .* does not apply to simpo \(reference-free or "),
    ({"pref_loss": "kto", "ld_alpha": 0.5}, r"^ld_alpha: LD-DPO .* does not apply to kto "),
    ({"pref_loss": "aot", "use_weighting": True}, r"^use_weighting: WPO's per-pair weights do not apply to aot "
                                                  r"\(aot sorts the pairs, as TRL refuses; kto is unpaired\)"),
    ({"pref_loss": "sigmoid,aot_unpaired", "use_weighting": True}, r"^use_weighting: .* do not apply to aot_unpaired"),
    ({"pref_loss": "kto", "use_weighting": True}, r"^use_weighting: .* do not apply to kto"),
])
def test_invalid_loss_option_combinations_fail_in_one_line(raw, message):
    with pytest.raises(ConfigError, match=message) as e:
        from_dict(raw)
    assert "\n" not in str(e.value)


def test_loss_options_that_apply_are_accepted():
    cfg = from_dict({"pref_loss": "kto", "desirable_weight": 1.33, "undesirable_weight": 0.5})  # TRL's names
    assert (cfg.kto_chosen_weight, cfg.kto_rejected_weight, cfg.is_kto) == (1.33, 0.5, True)
    assert from_dict({"pref_loss": "sigmoid,sft", "f_divergence_type": "alpha_divergence",
                      "f_alpha_divergence_coef": 0.3}).loss_options("sigmoid")["f_alpha_divergence_coef"] == 0.3
    assert from_dict({"pref_loss": "hinge,ipo,sft", "f_divergence_type": "js_divergence"}).loss_options("ipo") == \
        {"f_divergence_type": "js_divergence", "f_alpha_divergence_coef": 0.5}
    assert from_dict({"pref_loss": "ipo", "ld_alpha": 0.5, "use_weighting": True}).ld_alpha == 0.5
    assert from_dict({"pref_loss": "simpo", "use_weighting": True}).use_weighting
    assert not from_dict({"pref_loss": "kto_pair"}).is_kto
