"""The command line and config rough edges a newcomer hits (issue 19): bare boolean flags, LLaMA-Factory's
stage: kto, the template of the run that wrote a model, --config for label and demo, the progress bar's
figures, the defaults, export's --batch_size, --version in --help, and the demo's SFT models in the cache."""

import re

import pytest
import yaml

from preftune.config import load_config, parse_command_line
from preftune.errors import ConfigError

# --- a bare boolean flag means true ------------------------------------------------------------------


def test_a_bare_boolean_flag_means_true_as_in_hf_argument_parser():
    line = parse_command_line(["--bf16", "--pref_beta", "0.2", "--gradient_checkpointing", "--do_eval",
                               "--use_liger_kernel"])
    assert line.overrides == {"bf16": True, "pref_beta": 0.2, "gradient_checkpointing": True, "do_eval": True,
                              "use_liger_kernel": True}  # a key not honoured (do_eval) and an alias too
    cfg = load_config(None, ["--model", "m", "--gradient_checkpointing", "--bf16"])  # last on the line too
    assert cfg.gradient_checkpointing is True and cfg.bf16 is True
    assert parse_command_line(["--bf16", "false", "--fp16=false"]).overrides == {"bf16": False, "fp16": False}
    assert load_config(None, ["--model", "m", "--gradient_checkpointing", "false"]).gradient_checkpointing is False


@pytest.mark.parametrize("args, message", [
    (["--pref_beta"], "^command line: --pref_beta needs a value$"),
    (["--cutoff_len", "--bf16"], "^command line: --cutoff_len needs a value$"),
    (["--output_dir"], "^command line: --output_dir needs a value$"),
])
def test_a_bare_non_boolean_flag_still_fails_in_one_line(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_command_line(args)


def test_a_command_flag_keeps_its_own_rule():
    """label's --port is the command's own, not a config key: bare, it needs its value."""
    with pytest.raises(ConfigError, match="--port needs a value"):
        parse_command_line(["--port"], flags={"port": "8765"})


# --- stage: kto --------------------------------------------------------------------------------------

# LLaMA-Factory's examples/train_lora/llama3_lora_kto.yaml, with its keys as they are (batch size 2: kto
# estimates its reference point from the micro-batch's other examples)
LLAMAFACTORY_KTO = """\
model_name_or_path: m
trust_remote_code: true
stage: kto
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
pref_beta: 0.1
kto_chosen_weight: 1.0
kto_rejected_weight: 1.0
dataset: kto.jsonl
template: llama3
cutoff_len: 2048
max_samples: 1000
overwrite_cache: true
output_dir: saves/kto
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none
per_device_train_batch_size: 2
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
ddp_timeout: 180000000
"""


def test_stage_kto_means_pref_loss_kto(tmp_path):
    path = tmp_path / "kto.yaml"
    path.write_text(LLAMAFACTORY_KTO)
    cfg = load_config(str(path))
    assert (cfg.stage, cfg.pref_loss, cfg.is_kto, cfg.objective) == ("dpo", "kto", True, "kto")
    assert (cfg.pref_beta, cfg.kto_chosen_weight, cfg.finetuning_type) == (0.1, 1.0, "lora")
    assert load_config(str(path), {"pref_loss": "kto"}).pref_loss == "kto"  # said twice, the same: fine
    assert load_config(str(path), {"stage": "sft"}).stage == "sft"  # `preftune sft kto.yaml`: the command's stage


@pytest.mark.parametrize("extra, given", [({"pref_loss": "sigmoid"}, "pref_loss"), ({"loss_type": "ipo"}, "loss_type")])
def test_stage_kto_beside_another_pref_loss_is_one_line(tmp_path, extra, given):
    path = tmp_path / "kto.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(LLAMAFACTORY_KTO), **extra}))
    with pytest.raises(ConfigError, match=rf"^{path}: stage: kto trains pref_loss: kto, and {given} is "
                                          rf"'{list(extra.values())[0]}'; remove {given} \(or use stage: dpo"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="stage: kto trains pref_loss: kto, and pref_loss is 'sigmoid'"):
        load_config(None, {"model": "m", "stage": "kto", "pref_loss": "sigmoid"})  # the command line's too


# --- the template of the run that wrote the model: one rule for every command ------------------------


@pytest.fixture
def sft_run_dir(tmp_path, tiny_model_dir):
    """A folder as `preftune sft` leaves it: the model, and the resolved config of a run with template: chatml."""
    import shutil

    from preftune.config import from_dict

    folder = tmp_path / "sft_out"
    shutil.copytree(tiny_model_dir, folder)
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "stage": "sft", "template": "chatml",
                     "dataset": "sft.jsonl", "output_dir": str(folder)})
    (folder / "preftune_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return folder


@pytest.fixture
def pairs_file(tmp_path):
    import json

    from preftune.demo import make_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(8, 0)))
    return path


def test_train_takes_the_template_of_the_sft_run_that_wrote_its_model(tmp_path, sft_run_dir, pairs_file):
    from preftune.commands import train as train_cmd

    common = ["--model_name_or_path", str(sft_run_dir), "--dataset", str(pairs_file), "--max_steps", "1",
              "--per_device_train_batch_size", "2", "--cutoff_len", "64", "--torch_dtype", "float32",
              "--progress_bar", "false", "--plot_loss", "false", "--save_strategy", "no"]
    assert train_cmd.main(common + ["--output_dir", str(tmp_path / "dpo")]) == 0
    saved = yaml.safe_load((tmp_path / "dpo" / "preftune_config.yaml").read_text())
    assert saved["template"] == "chatml"  # the resolved config: what the run trained in, and what comes next reads
    # a template the user sets wins, as for sample and eval: none asks for raw text
    assert train_cmd.main(common + ["--output_dir", str(tmp_path / "raw"), "--template", "none"]) == 0
    assert yaml.safe_load((tmp_path / "raw" / "preftune_config.yaml").read_text())["template"] == "none"


def test_the_run_template_rule(sft_run_dir, tiny_model_dir):
    from preftune.config import from_dict
    from preftune.saved import model_run_config, with_run_template

    run_cfg = model_run_config(str(sft_run_dir))
    assert run_cfg.template == "chatml"
    assert model_run_config(str(tiny_model_dir)) is None and model_run_config("org/hub-id") is None
    assert with_run_template(from_dict({}), run_cfg).template == "chatml"
    assert with_run_template(from_dict({"template": "qwen"}), run_cfg).template == "qwen"  # set: it wins
    assert with_run_template(from_dict({"template": "none"}), run_cfg).template == "none"
    assert with_run_template(from_dict({}), None).template is None


def test_inspect_renders_as_a_run_on_that_model_would(sft_run_dir, tiny_model_dir, pairs_file):
    from preftune.commands.inspect import inspect_data
    from preftune.config import from_dict

    on_run = inspect_data(from_dict({"model_name_or_path": str(sft_run_dir), "dataset": str(pairs_file)}), 1)
    on_plain = inspect_data(from_dict({"model_name_or_path": str(tiny_model_dir), "dataset": str(pairs_file)}), 1)
    assert "chatml" in on_run["rendering"]["used"] and "chatml" not in on_plain["rendering"]["used"]


# --- label and demo take --config FILE: their own options ---------------------------------------------


def test_label_reads_its_options_from_a_config_file(tmp_path, capsys):
    import json

    from preftune.cli import main

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    cfg = tmp_path / "label.yaml"
    cfg.write_text(yaml.safe_dump({"dataset": str(pairs), "export": str(tmp_path / "out.jsonl"), "seed": 3}))
    assert main(["label", "--config", str(cfg)]) == 0  # FILE and --export from the file
    assert (tmp_path / "out.jsonl").is_file() and "wrote 0 pairs" in capsys.readouterr().out
    cfg.write_text(yaml.safe_dump({"port": "http"}))
    assert main(["label", str(pairs), "--config", str(cfg)]) == 2  # the file's port is read...
    assert "--port must be a port number" in capsys.readouterr().err
    assert main(["label", str(pairs), "--config", str(cfg), "--port", "0", "--export", str(tmp_path / "o2.jsonl")]) == 0
    capsys.readouterr()  # ...and the command line's wins


@pytest.mark.parametrize("command, content, message", [
    ("label", {"pref_beta": 0.1}, r"unknown key 'pref_beta' for preftune label; its keys: host, port, annotator"),
    ("label", {"annotater": "me"}, r"unknown key 'annotater' for preftune label; did you mean 'annotator'\?"),
    ("label", {"host": {"a": 1}}, r"host: expected a number or text"),
    ("demo", {"model_name_or_path": "m"}, r"unknown key 'model_name_or_path' for preftune demo; its keys: output_dir"),
])
def test_label_and_demo_refuse_other_keys_in_one_line(tmp_path, capsys, command, content, message):
    from preftune.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(content))
    assert main([command, "x.jsonl", "--config", str(cfg)] if command == "label" else [command, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert re.search(f"^preftune: error: {cfg}: {message}", err), err


def test_demo_reads_its_options_from_a_config_file(tmp_path, capsys):
    from preftune.cli import main
    from preftune.commands.demo import FLAGS, settings_from
    from preftune.config import load_options

    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "d"), "sweep": [0.05, 0.5], "reviews": 100, "seed": 1}))
    line = parse_command_line(["--config", str(cfg), "--seed", "2"], flags=dict.fromkeys(FLAGS))
    settings = settings_from(load_options("demo", line, {name: default for name, (default, _) in FLAGS.items()}))
    assert (settings["betas"], settings["reviews"], settings["seed"]) == ([0.05, 0.5], 100, 2)  # the line wins
    assert settings["output_dir"] == str(tmp_path / "d") and settings["layers"] == FLAGS["layers"][0]
    # through the command: the file's values are checked as the flags' are (and nothing runs)
    cfg.write_text(yaml.safe_dump({"prompts": 500, "eval_prompts": 200}))
    assert main(["demo", "--config", str(cfg)]) == 2
    assert "--prompts + --eval_prompts must be at most 600" in capsys.readouterr().err


# --- the progress bar shows what the objective has ---------------------------------------------------


def test_the_progress_bar_shows_each_objectives_own_figures_and_never_nan():
    from preftune.step import STEPS
    from preftune.train import progress_postfix

    def shown(row, objective):
        return progress_postfix(row, STEPS[objective].progress)

    dpo = {"loss": 0.69314, "rewards/accuracies": 0.75, "rewards/chosen": 0.1}
    assert shown(dpo, "dpo") == {"loss": "0.6931", "acc": "0.75"}
    sft = {"loss": 2.0, "perplexity": 7.389056}  # MetricsLog.log adds the perplexity of an sft row
    assert shown(sft, "sft") == {"loss": "2.0000", "ppl": "7.39"}
    kto = {"loss": 0.5, "z_ref": 0.0, "rewards/chosen": 0.25, "rewards/rejected": -0.125}
    assert shown(kto, "kto") == {"loss": "0.5000", "chosen": "0.25", "rejected": "-0.12"}
    assert shown({"loss": 0.5, "rewards/chosen": 0.25}, "kto") == {"loss": "0.5000", "chosen": "0.25"}
    for row, objective in ((dpo, "dpo"), (sft, "sft"), (kto, "kto")):
        assert "nan" not in " ".join(shown(row, objective).values())


# --- preftune cache: the demo's SFT models too --------------------------------------------------------


def test_cache_lists_and_clears_the_demos_sft_models_and_nothing_else(tmp_path, capsys):
    import os
    import time

    from preftune.cli import main

    demo = tmp_path / "demo"
    old, new, killed = demo / "0123456789abcdef", demo / "fedcba9876543210", demo / "00000000000000aa"
    for model in (old, new):
        (model / "base_model").mkdir(parents=True)
        (model / "model.safetensors").write_bytes(b"x" * 4096)
        (model / "demo_sft.json").write_text("{}")
    (killed / "base_model").mkdir(parents=True)  # a run killed before its marker: the demo's too
    (demo / "notes").mkdir()  # not the demo's: never touched
    (demo / "notes" / "base_model").mkdir()
    then = time.time() - 40 * 86400
    os.utime(old / "demo_sft.json", (then, then))
    dirs = ["--tokenized_cache_dir", str(tmp_path / "tok"), "--ref_logps_cache_dir", str(tmp_path / "ref"),
            "--demo_cache_dir", str(demo)]
    assert main(["cache", "list", *dirs]) == 0
    assert f"demo_sft   {demo}: 3 models" in capsys.readouterr().out
    assert main(["cache", "clear", "--older_than_days", "30", *dirs]) == 0
    assert sorted(p.name for p in demo.iterdir()) == sorted([new.name, killed.name, "notes"])
    assert "demo_sft" in capsys.readouterr().out
    assert main(["cache", "clear", *dirs]) == 0
    assert [p.name for p in demo.iterdir()] == ["notes"]
    assert f"demo_sft   {demo}: deleted 2 of 2 models" in capsys.readouterr().out


def test_the_demo_keeps_its_sft_models_where_cache_looks(monkeypatch, tmp_path):
    from preftune.demo import sft_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sft_cache_dir("") == tmp_path / "preftune" / "demo" and sft_cache_dir(str(tmp_path / "c")) == tmp_path / "c"


# --- --version in --help; export's --batch_size means what it means everywhere -------------------------


def test_version_is_in_the_help(capsys):
    from preftune.cli import main

    assert main(["--help"]) == 0
    assert "-V, --version" in capsys.readouterr().out
    assert main(["--version"]) == 0 and capsys.readouterr().out.startswith("preftune ")


def test_export_batch_size_is_the_train_batch_size_as_everywhere(monkeypatch):
    """--batch_size is per_device_train_batch_size in every command; export measures with the eval batch size,
    which is per_device_eval_batch_size, else that: so --batch_size still sizes export's passes."""
    from preftune.commands import export as export_cmd

    seen = []
    monkeypatch.setattr(export_cmd, "export", lambda cfg, *rest: seen.append(cfg) or {})
    monkeypatch.setattr(export_cmd, "format_report", lambda report: "")
    assert export_cmd.main(["run_out", "--batch_size", "8"]) == 0
    assert (seen[-1].per_device_train_batch_size, seen[-1].per_device_eval_batch_size, seen[-1].eval_batch_size) == \
        (8, None, 8)
    assert export_cmd.main(["run_out", "--batch_size", "8", "--per_device_eval_batch_size", "2"]) == 0
    assert seen[-1].eval_batch_size == 2
    assert "--per_device_eval_batch_size N" in export_cmd.USAGE and "--batch_size  pairs" not in export_cmd.USAGE
