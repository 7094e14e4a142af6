"""The health report: each signal fires on a metric history made to show it, stays quiet on a healthy
one, says when it cannot be measured, and reaches summary.json, the log and the plot of a real run."""

import csv
import json

import pytest

from preftune import health
from preftune import train as train_mod
from preftune.config import TrainConfig, from_dict

THRESHOLDS = TrainConfig().health_thresholds


def run_history(eval_losses, train_losses=None, kl=0.1, accuracy=0.9, chosen=(-20.0,), rejected=(-22.0,),
                margins=(0.0,), kl_name="kl_per_token"):
    """Logged rows as a run writes them: a training row and an evaluation row per step (step 0: baseline)."""
    rows = [{"step": 0, "eval_loss": 0.69, f"eval_{kl_name}": 0.0, "eval_rewards/accuracies": 0.5}]
    train_losses = train_losses or eval_losses
    for i, (e, t) in enumerate(zip(eval_losses, train_losses), 1):
        k = min(i - 1, len(chosen) - 1)
        rows.append({"step": i, "loss": t, kl_name: kl, "logps/chosen": chosen[min(i - 1, len(chosen) - 1)],
                     "logps/rejected": rejected[min(i - 1, len(rejected) - 1)],
                     "rewards/margins": margins[min(k, len(margins) - 1)]})
        rows.append({"step": i, "eval_loss": e, f"eval_{kl_name}": kl, "eval_rewards/accuracies": accuracy,
                     "eval_train_gap_pct": 100 * (e - t) / t})
    return rows


def fired(history):
    return {s["name"]: s["step"] for s in health.check(history, THRESHOLDS) if s["fired"]}


def test_a_healthy_run_fires_nothing():
    assert fired(run_history([0.6, 0.5, 0.45])) == {}


@pytest.mark.parametrize("history,name,step", [
    (run_history([0.6, 0.55], train_losses=[0.6, 0.4]), "train_val_gap", 2),
    (run_history([0.6, 0.5], kl=2.0), "kl_to_reference", 1),
    (run_history([0.6, 0.5], accuracy=0.4), "heldout_accuracy", 2),
    (run_history([0.6, 0.4, 0.45, 0.5]), "val_loss_rising", 3),
    (run_history([0.6, 0.5, 0.45], chosen=(-20.0, -23.0, -30.0), margins=(0.0, 1.0, 3.0)), "likelihood_displacement", 3),
    (run_history([0.6, 0.5, 0.45], rejected=(-22.0, -35.0, -50.0)), "rejected_collapse", 3),
])
def test_each_signal_fires_on_the_history_that_shows_it(history, name, step):
    signals = {s["name"]: s for s in health.check(history, THRESHOLDS)}
    assert signals[name]["fired"] and signals[name]["step"] == step, signals[name]
    assert signals[name]["remedy"] and signals[name]["threshold"] == THRESHOLDS[name]
    assert fired(history).keys() <= {name, "train_val_gap", "val_loss_rising"}  # a rising val loss widens the gap


def test_the_kl_signal_is_in_nats_per_token_and_reads_histories_from_before_the_unit():
    """kl_to_reference watches the per-token KL, says so in its line, and fires on a log_history.json written
    when the metric was still called kl / eval_kl (`preftune eval` reads older runs' histories)."""
    for kl_name in ("kl_per_token", "kl"):
        signals = {s["name"]: s for s in health.check(run_history([0.6, 0.5], kl=2.0, kl_name=kl_name), THRESHOLDS)}
        assert signals["kl_to_reference"]["fired"] and signals["kl_to_reference"]["value"] == 2.0, kl_name
    assert signals["kl_to_reference"]["unit"] == "nats per token"
    (line,) = [line for line in health.format_report(list(signals.values())) if "kl_to_reference" in line]
    assert line.startswith("health: kl_to_reference = 2 (threshold 1.5, nats per token) from step 1: ")
    # a per-sequence KL above the threshold does not fire it: it is not the unit the threshold is in
    per_sequence = [{"step": 1, "eval_loss": 0.5, "eval_kl_per_sequence": 20.0, "eval_kl_per_token": 0.1}]
    assert "kl_to_reference" not in fired(per_sequence)


def test_chosen_falling_with_flat_margins_is_not_displacement():
    assert "likelihood_displacement" not in fired(run_history([0.6, 0.5], chosen=(-20.0, -30.0), margins=(1.0, 1.0)))


def test_what_a_run_cannot_show_is_not_measured_not_healthy():
    no_eval = [{"step": 1, "loss": 0.6, "logps/chosen": -20.0, "logps/rejected": -22.0}]
    signals = {s["name"]: s for s in health.check(no_eval, THRESHOLDS)}
    assert signals["heldout_accuracy"]["value"] is None and not signals["heldout_accuracy"]["fired"]
    assert signals["kl_to_reference"]["value"] is None
    assert any("not measured in this run: train_val_gap, kl_to_reference" in line
               for line in health.format_report(list(signals.values())))


def test_a_run_writes_its_health_report(tmp_path, tiny_model_dir, demo_pairs, caplog):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs[:40]))
    # a KL threshold of 0 fires as soon as the policy moves: the report, the log and the plot carry it
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "dataset": str(data), "val_size": 8,
                     "output_dir": str(tmp_path / "out"), "learning_rate": 5e-3, "max_steps": 3, "eval_steps": 3,
                     "cutoff_len": 128, "torch_dtype": "float32", "progress_bar": False, "health_max_kl": 0.0})
    with caplog.at_level("INFO", logger="preftune"):
        summary = train_mod.train(cfg)
    signals = {s["name"]: s for s in summary["health"]}
    assert set(signals) == set(health.SIGNALS)
    assert signals["kl_to_reference"]["fired"] and signals["kl_to_reference"]["step"] == 3
    assert "health: kl_to_reference" in caplog.text and "(threshold 0, nats per token)" in caplog.text
    # the KL in both units, under their names, in the summary and the CSV
    for key in ("kl_per_token", "kl_per_sequence", "eval_kl_per_token", "eval_kl_per_sequence"):
        assert summary["final"][key] > 0, key
    with open(tmp_path / "out" / "dpo_metrics" / "training_metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    assert {"kl_per_token", "kl_per_sequence", "eval_kl_per_token", "eval_kl_per_sequence"} <= columns
    assert "kl" not in columns and "eval_kl" not in columns
    assert "nats per token" in summary["metric_notes"]["kl_per_token"]
    assert json.loads((tmp_path / "out" / "dpo_metrics" / "summary.json").read_text())["health"] == summary["health"]
    assert (tmp_path / "out" / "dpo_metrics" / "training_curves.png").is_file()
