"""Named evaluation sets (eval_dataset as a mapping) and completions sampled at each evaluation
(generate_during_eval): logged with their own names, plotted, in the health report, and without
changing a single training number."""

import json

import pytest

from preftune import health
from preftune import train as train_mod
from preftune.config import TrainConfig, from_dict
from preftune.errors import ConfigError


@pytest.fixture(scope="module")
def data(tmp_path_factory, demo_pairs):
    root = tmp_path_factory.mktemp("eval_sets")
    for name, pairs in (("train", demo_pairs[:32]), ("val", demo_pairs[32:44]), ("ood", demo_pairs[44:54])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return root


def config(data, model_dir, out, **over):
    return from_dict({"model_name_or_path": str(model_dir), "dataset": str(data / "train.jsonl"),
                      "eval_dataset": {"in_domain": str(data / "val.jsonl"), "ood": str(data / "ood.jsonl")},
                      "output_dir": str(out), "learning_rate": 5e-3, "per_device_train_batch_size": 8,
                      "max_steps": 4, "eval_steps": 2, "logging_steps": 1, "dropout": 0.1, "cutoff_len": 128,
                      "torch_dtype": "float32", "progress_bar": False, **over})


def test_named_sets_are_logged_plotted_and_checked(data, tiny_model_dir, tmp_path):
    summary = train_mod.train(config(data, tiny_model_dir, tmp_path / "out", generate_during_eval=2,
                                     max_new_tokens=8))
    rows = json.loads((tmp_path / "out" / "dpo_metrics" / "log_history.json").read_text())
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all("eval_ood_loss" in r and "eval_ood_rewards/accuracies" in r and "eval_ood_kl_per_token" in r
               for r in evals)
    assert summary["data"]["eval"] == 12 and summary["data"]["eval_sets"] == {"ood": 10}
    # the completions sampled at each evaluation
    lines = [json.loads(line) for line in (tmp_path / "out" / "dpo_metrics" / "completions.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 0, 2, 2, 4, 4]
    assert all(0 < line["tokens"] <= 8 for line in lines)
    assert all("eval_completion_length" in r for r in evals)
    signals = {s["name"]: s for s in summary["health"]}
    accuracies = {k: evals[-1][k] for k in ("eval_rewards/accuracies", "eval_ood_rewards/accuracies")}
    assert signals["heldout_accuracy"]["value"] == min(accuracies.values())
    assert signals["heldout_accuracy"]["metric"] == min(accuracies, key=accuracies.get)
    assert signals["completion_length_growth"]["value"] is not None


def test_sampling_at_evaluation_changes_no_training_number(data, tiny_model_dir, tmp_path):
    """Generation draws random numbers; it must not draw them from training's stream (dropout is on)."""
    plain = train_mod.train(config(data, tiny_model_dir, tmp_path / "plain"))
    sampled = train_mod.train(config(data, tiny_model_dir, tmp_path / "sampled", generate_during_eval=3,
                                     max_new_tokens=6))
    rows = [json.loads((tmp_path / d / "dpo_metrics" / "log_history.json").read_text()) for d in ("plain", "sampled")]
    for a, b in zip(*rows):
        assert {k: v for k, v in a.items() if k != "tokens_per_second"} == \
            {k: v for k, v in b.items() if k not in ("tokens_per_second", "eval_completion_length")}
    assert plain["final"]["eval_loss"] == sampled["final"]["eval_loss"]


def test_precomputed_reference_covers_every_named_set(data, tiny_model_dir, tmp_path):
    live = train_mod.train(config(data, tiny_model_dir, tmp_path / "live", max_steps=2))
    pre = train_mod.train(config(data, tiny_model_dir, tmp_path / "pre", max_steps=2, precompute_ref_log_probs=True,
                                 ref_logps_cache_dir=str(tmp_path / "cache")))
    assert pre["final"]["eval_ood_loss"] == pytest.approx(live["final"]["eval_ood_loss"], rel=1e-4)


def test_length_growth_signal():
    history = [{"step": 0, "eval_loss": 0.7, "eval_completion_length": 10.0},
               {"step": 2, "eval_loss": 0.6, "eval_completion_length": 12.0},
               {"step": 4, "eval_loss": 0.5, "eval_completion_length": 18.0}]
    signal = next(s for s in health.check(history, TrainConfig().health_thresholds)
                  if s["name"] == "completion_length_growth")
    assert signal["fired"] and signal["step"] == 4 and signal["value"] == pytest.approx(1.8)


@pytest.mark.parametrize("value", [{}, {"in domain": "a.jsonl"}, {"a": 3}])
def test_bad_eval_set_mappings_are_one_line(value):
    with pytest.raises(ConfigError, match="eval_dataset as a mapping needs names"):
        from_dict({"eval_dataset": value})
