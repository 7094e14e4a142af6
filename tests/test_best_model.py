"""Saving keys as transformers' TrainingArguments: save_strategy (steps / epoch / no),
load_best_model_at_end with metric_for_best_model and greater_is_better, save_only_model."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_config

from preftune import train as train_mod
from preftune.config import from_dict
from preftune.errors import ConfigError


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def eval_rows(out: Path) -> list[dict]:
    history = json.loads((out / "dpo_metrics" / "log_history.json").read_text())
    return [r for r in history if "eval_loss" in r and r["step"] > 0]


@pytest.fixture(scope="module")
def overshooting(tmp_path_factory, tiny_model_dir):
    """A run whose learning rate is so high that the eval loss rises again after step 3: its last
    step is not its best. A checkpoint at every step holds each step's weights."""
    tmp = tmp_path_factory.mktemp("overshoot")
    cfg = tiny_config(tmp, tiny_model_dir, learning_rate=0.1, lr_scheduler_type="constant", warmup_ratio=0,
                      max_steps=8, eval_steps=1, logging_steps=1, save_steps=1, save_total_limit=10,
                      load_best_model_at_end=True)
    return cfg, train_mod.train(cfg)


def test_load_best_model_at_end_saves_the_best_steps_weights(overshooting):
    cfg, summary = overshooting
    out = Path(cfg.output_dir)
    rows = eval_rows(out)
    best = min(rows, key=lambda r: r["eval_loss"])
    assert best["step"] != 8 and rows[-1]["eval_loss"] > best["eval_loss"]  # the last step is not the best
    assert summary["kept_model"] == {"step": best["step"], "metric": "eval_loss", "value": best["eval_loss"],
                                     "why": "best evaluation: lowest eval_loss (load_best_model_at_end)"}
    assert summary["best"]["step"] == best["step"]
    final, at_best, last = weights(out), weights(out / f"checkpoint-{best['step']}"), weights(out / "checkpoint-8")
    assert all(torch.equal(final[k], at_best[k]) for k in at_best)
    assert not all(torch.equal(final[k], last[k]) for k in last)
    assert json.loads((out / "best_model" / "preftune_step.json").read_text()) == {"step": best["step"]}


def test_metric_for_best_model_with_greater_is_better(tmp_path, tiny_model_dir):
    """rewards/accuracies (without the eval_ prefix) picks the highest: greater is better for it."""
    cfg = tiny_config(tmp_path, tiny_model_dir, learning_rate=0.1, lr_scheduler_type="constant", warmup_ratio=0,
                      max_steps=6, eval_steps=1, logging_steps=1, load_best_model_at_end=True,
                      metric_for_best_model="rewards/margins")
    assert cfg.best_metric == "eval_rewards/margins" and cfg.best_greater
    summary = train_mod.train(cfg)
    rows = eval_rows(Path(cfg.output_dir))
    best = max(rows, key=lambda r: r["eval_rewards/margins"])  # the first of equals, as the run keeps it
    assert summary["kept_model"]["step"] == best["step"]
    assert summary["kept_model"]["why"] == "best evaluation: highest eval_rewards/margins (load_best_model_at_end)"
    best_model = weights(Path(cfg.output_dir) / "best_model")
    final = weights(Path(cfg.output_dir))
    assert all(torch.equal(final[k], best_model[k]) for k in best_model)


def test_greater_is_better_defaults_from_the_name(tmp_path, tiny_model_dir):
    def cfg(**over):
        return tiny_config(tmp_path, tiny_model_dir, load_best_model_at_end=True, **over)

    assert cfg().best_metric == "eval_loss" and not cfg().best_greater
    assert cfg(metric_for_best_model="eval_ood_loss").best_metric == "eval_ood_loss"
    assert not cfg(metric_for_best_model="ood_loss").best_greater
    assert not cfg(metric_for_best_model="kl_per_token").best_greater
    assert not cfg(metric_for_best_model="eval_kl_per_sequence").best_greater
    # kl, the per-token KL's name before it carried its unit (older configs): the same metric, no error
    for old, new in (("kl", "eval_kl_per_token"), ("eval_kl", "eval_kl_per_token"),
                     ("eval_ood_kl", "eval_ood_kl_per_token")):
        assert cfg(metric_for_best_model=old).best_metric == new and not cfg(metric_for_best_model=old).best_greater
    assert cfg(metric_for_best_model="rewards/accuracies").best_greater
    assert not cfg(metric_for_best_model="rewards/accuracies", greater_is_better=False).best_greater
    with pytest.raises(ConfigError, match="load_best_model_at_end needs evaluation"):
        cfg(eval_strategy=False)  # YAML's bare `no`


def test_an_unknown_metric_for_best_model_names_the_logged_ones(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, max_steps=2, eval_steps=1, load_best_model_at_end=True,
                      metric_for_best_model="accuracy")
    with pytest.raises(ConfigError, match="metric_for_best_model: 'eval_accuracy' is not logged by this run's "
                                          "evaluation; choose one of eval_loss, .*eval_rewards/accuracies"):
        train_mod.train(cfg)


def test_without_load_best_the_last_step_is_kept(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, learning_rate=0.1, lr_scheduler_type="constant", warmup_ratio=0,
                      max_steps=4, eval_steps=1, logging_steps=1, save_steps=4)
    summary = train_mod.train(cfg)
    assert summary["kept_model"]["step"] == 4 and summary["kept_model"]["why"] == "last step"
    out = Path(cfg.output_dir)
    assert not (out / "best_model").exists()
    final, last = weights(out), weights(out / "checkpoint-4")
    assert all(torch.equal(final[k], last[k]) for k in last)


@pytest.mark.parametrize("strategy, saved", [("epoch", ["checkpoint-3", "checkpoint-6"]), (False, []),
                                             ("steps", ["checkpoint-4", "checkpoint-6"])])
def test_save_strategy(tmp_path, tiny_model_dir, strategy, saved):
    """epoch: at the end of each epoch (3 steps of 96 pairs at 32 per step); no (YAML's bare `no`
    reads false): never, whatever save_steps says; steps: every save_steps."""
    cfg = tiny_config(tmp_path, tiny_model_dir, save_strategy=strategy, save_steps=2, save_total_limit=2,
                      per_device_train_batch_size=32, num_train_epochs=2, eval_strategy="no", max_samples=96)
    train_mod.train(cfg)
    assert sorted(p.name for p in Path(cfg.output_dir).glob("checkpoint-*")) == saved


def test_save_only_model_checkpoints_cannot_be_resumed(tmp_path, tiny_model_dir):
    """As transformers: a model-only checkpoint has no optimizer, scheduler or random state."""
    cfg = tiny_config(tmp_path, tiny_model_dir, max_steps=2, save_steps=2, save_only_model=True, eval_strategy="no")
    train_mod.train(cfg)
    folder = Path(cfg.output_dir) / "checkpoint-2"
    assert (folder / "model.safetensors").is_file() and not (folder / "optimizer.pt").exists()
    resumed = from_dict({**cfg.to_dict(), "resume_from_checkpoint": True, "max_steps": 4})
    with pytest.raises(ConfigError, match="save_only_model: true cannot be resumed"):
        train_mod.train(resumed)


def test_command_line_reports_the_kept_model_and_reads_bare_no(tmp_path, tiny_model_dir, capsys):
    """A YAML config as people write it (save_strategy: no is YAML's false); the closing line gives the
    held-out accuracy of the model that was saved, the best evaluation's."""
    from preftune.cli import main

    base = tiny_config(tmp_path, tiny_model_dir)
    config = tmp_path / "cfg.yaml"
    config.write_text(f"""model_name_or_path: {tiny_model_dir}
dataset: {base.dataset}
eval_dataset: {base.eval_dataset}
output_dir: {tmp_path / 'out'}
torch_dtype: float32
per_device_train_batch_size: 16
learning_rate: 0.1
lr_scheduler_type: constant
max_steps: 8
eval_steps: 1
logging_steps: 1
save_strategy: no
save_steps: 1
load_best_model_at_end: true
metric_for_best_model: loss
progress_bar: false
""")
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "dpo_metrics" / "summary.json").read_text())
    best = summary["best"]
    assert summary["kept_model"]["step"] == best["step"] != 8
    assert (f"-> {best['eval_rewards/accuracies']:.1%} (the model of step {best['step']}: best eval_loss "
            f"{best['eval_loss']:.4g})") in out
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # save_strategy: no
