"""The health report: each signal fires on a metric history made to show it, stays quiet on a healthy
one, says when it cannot be measured, and reaches summary.json, the log and the plot of a real run; across
seeds of one configuration, a seed whose KL is far above the others is named (and preftune eval says so)."""

import csv
import json

import pytest

from preftune import health
from preftune.best import BestModel
from preftune import train as train_mod
from preftune.config import TrainConfig, from_dict

THRESHOLDS = TrainConfig().health_thresholds
THRESHOLDS_SEED = TrainConfig().health_max_seed_kl_ratio  # the seed spread: a ratio to the other seeds' median KL


def run_history(eval_losses, train_losses=None, kl=0.1, accuracy=0.9, chosen=(-20.0,), rejected=(-22.0,),
                margins=(0.0,), kl_name="kl_per_token"):
    """Logged rows as a run writes them: a training row and an evaluation row per step (step 0: baseline)."""
    rows = [{"step": 0, "eval_loss": 0.69, f"eval_{kl_name}": 0.0, "eval_rewards/accuracies": 0.5}]
    train_losses = train_losses or eval_losses
    for i, (e, t) in enumerate(zip(eval_losses, train_losses), 1):
        rows.append({"step": i, "loss": t, kl_name: kl, "logps/chosen": chosen[min(i - 1, len(chosen) - 1)],
                     "logps/rejected": rejected[min(i - 1, len(rejected) - 1)],
                     "rewards/margins": margins[min(i - 1, len(margins) - 1)]})
        rows.append({"step": i, "eval_loss": e, f"eval_{kl_name}": kl, "eval_rewards/accuracies": accuracy,
                     "eval_train_gap_pct": 100 * (e - t) / t})
    return rows


def fired(history):
    return {s["name"]: s["step"] for s in health.check(history, THRESHOLDS) if s["fired"]}


def test_a_healthy_run_fires_nothing():
    assert fired(run_history([0.6, 0.5, 0.45])) == {}


@pytest.mark.parametrize("history,name,step", [
    (run_history([0.6, 0.55], train_losses=[0.6, 0.4]), "train_val_gap", 2),
    (run_history([0.6, 0.5], kl=2.0), "kl_per_token", 1),
    (run_history([0.6, 0.5, 0.45], margins=(1.0, 3.0, 6.0)), "margin_explosion", 3),
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


def test_the_kl_signals_are_per_completion_and_per_token_and_read_histories_from_before_the_unit():
    """kl_per_token watches the per-token KL, kl_per_sequence the per-completion KL, each says its unit in its
    line; the per-token one fires on a log_history.json written when the metric was still called kl / eval_kl
    (`preftune eval` reads older runs' histories)."""
    for kl_name in ("kl_per_token", "kl"):
        signals = {s["name"]: s for s in health.check(run_history([0.6, 0.5], kl=2.0, kl_name=kl_name), THRESHOLDS)}
        assert signals["kl_per_token"]["fired"] and signals["kl_per_token"]["value"] == 2.0, kl_name
    assert signals["kl_per_token"]["unit"] == "nats per token"
    (line,) = [line for line in health.format_report(list(signals.values())) if "kl_per_token" in line]
    assert line.startswith("health: kl_per_token = 2 (threshold 0.4, nats per token) from step 1: ")
    assert "lower the learning_rate, raise pref_beta, or stop before step 1" in line
    # the same drift, longer completions: the per-completion KL passes its threshold, the per-token one does not
    per_sequence = [{"step": 1, "eval_loss": 0.5, "eval_kl_per_sequence": 20.0, "eval_kl_per_token": 0.1}]
    signals = {s["name"]: s for s in health.check(per_sequence, THRESHOLDS)}
    assert fired(per_sequence).keys() == {"kl_per_sequence"}
    assert signals["kl_per_sequence"]["unit"] == "nats per completion"
    assert signals["kl_per_sequence"]["metric"] == "eval_kl_per_sequence"
    assert health.first_drift(list(signals.values())) == ("kl_per_sequence", 1)


def test_the_thresholds_sit_between_healthy_and_drifted_runs():
    """Defaults against the figures they come from (config/schema.py): issue 22's healthy seeds (1.5-1.9 nats per
    completion) and the demo's healthy validation KL (2.4-2.9 per completion, 0.16-0.20 per token, margins
    0.6-1.0) stay quiet; the drifted seed (7.2 per completion, 0.59 per token) fires both KL signals."""
    assert 2.9 < THRESHOLDS["kl_per_sequence"] < 7.2 and 0.2 < THRESHOLDS["kl_per_token"] < 0.59
    assert 1.0 < THRESHOLDS["margin_explosion"]
    assert from_dict({"health_max_kl": 0.3}).health_max_kl_per_token == 0.3  # the key's name before the unit


def test_chosen_falling_with_flat_margins_is_not_displacement():
    assert "likelihood_displacement" not in fired(run_history([0.6, 0.5], chosen=(-20.0, -30.0), margins=(1.0, 1.0)))


def test_what_a_run_cannot_show_is_not_measured_not_healthy():
    no_eval = [{"step": 1, "loss": 0.6, "logps/chosen": -20.0, "logps/rejected": -22.0}]
    signals = {s["name"]: s for s in health.check(no_eval, THRESHOLDS)}
    assert signals["heldout_accuracy"]["value"] is None and not signals["heldout_accuracy"]["fired"]
    assert signals["kl_per_token"]["value"] is None and signals["kl_per_sequence"]["value"] is None
    assert any("not measured in this run: train_val_gap, kl_per_sequence, kl_per_token, margin_explosion" in line
               for line in health.format_report(list(signals.values())))


def test_a_run_writes_its_health_report(tmp_path, tiny_model_dir, demo_pairs, caplog):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs[:40]))
    # a KL threshold of 0 fires as soon as the policy moves: the report, the log and the plot carry it
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "dataset": str(data), "val_size": 8,
                     "output_dir": str(tmp_path / "out"), "learning_rate": 5e-3, "max_steps": 3, "eval_steps": 3,
                     "cutoff_len": 128, "torch_dtype": "float32", "progress_bar": False, "health_max_kl_per_token": 0.0})
    with caplog.at_level("INFO", logger="preftune"):
        summary = train_mod.train(cfg)
    signals = {s["name"]: s for s in summary["health"]}
    assert set(signals) == set(health.SIGNALS)
    assert signals["kl_per_token"]["fired"] and signals["kl_per_token"]["step"] == 3
    assert "health: kl_per_token" in caplog.text and "(threshold 0, nats per token)" in caplog.text
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


def training_rows(lengths):
    return [{"step": i, "loss": 0.6, "length/chosen": n, "length/rejected": n + 2.0} for i, n in enumerate(lengths, 1)]


def test_length_growth_is_measured_from_the_training_batches_when_nothing_is_sampled():
    """Without generate_during_eval the training rows' completion lengths are compared, a trailing quarter of the
    rows against the first quarter: it fires at the row where that window passes 1.5x, not on batch noise."""
    signals = {s["name"]: s for s in health.check(training_rows([10, 12, 9, 11] * 4), THRESHOLDS)}
    assert not signals["completion_length_growth"]["fired"]
    assert signals["completion_length_growth"]["value"] == pytest.approx(1.0)  # measured, not "not measured"
    # mean of chosen and rejected: 11, 13, 10, 12, 11, 13, 10, 12, 21, 25, ...; window 3 rows, the first 34 / 3
    growing = training_rows([10, 12, 9, 11, 10, 12, 9, 11, 20, 24, 30, 36])
    signal = next(s for s in health.check(growing, THRESHOLDS) if s["name"] == "completion_length_growth")
    # the window ending at row 9: (12 + 10 + 21) / 34 = 1.26; at row 10: (12 + 21 + 25) / 34 = 1.71
    assert signal["fired"] and signal["step"] == 10 and signal["value"] == pytest.approx(58 / 34)
    assert "stop before step 10" in signal["remedy"]


class _Engine:  # what BestModel asks of an engine, on a process that writes nothing
    is_main = False

    def whole_weights(self, model):
        return None

    def wait(self):
        pass


def test_with_best_model_before_drift_no_evaluation_after_a_drift_signal_becomes_the_best_model(tmp_path):
    """best_model_before_drift: the evaluations at and after the step a drift signal fired are not candidates,
    however low their loss; with early stopping they count as evaluations without gain. Without it (the default,
    transformers' rule) the best metric wins wherever it is (and a warning names the signal)."""
    evaluations = ((10, 0.5, None), (20, 0.4, None), (30, 0.3, ("kl_per_sequence", 30)),
                   (40, 0.2, ("kl_per_sequence", 30)))
    for guard, kept, stops, why in (
            (True, 20, [False, False, False, True], "best evaluation before step 30, where the health signal "
                                                    "kl_per_sequence fired: lowest eval_loss (early stopping)"),
            (False, 40, [False] * 4, "best evaluation: lowest eval_loss (early stopping)")):
        cfg = from_dict({"output_dir": str(tmp_path), "early_stopping_patience": 2, "val_size": 8,
                         "best_model_before_drift": guard})
        best = BestModel(cfg)
        stopped = [best.update({"eval_loss": loss}, step, _Engine(), None, None, drift)
                   for step, loss, drift in evaluations]
        assert best.step == kept and stopped == stops and best.why() == why, guard


def tiny_run(tmp_path, tiny_model_dir, demo_pairs, name, learning_rate, beta, max_steps):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs))
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "dataset": str(data), "val_size": 8,
                     "output_dir": str(tmp_path / name), "learning_rate": learning_rate, "pref_beta": beta,
                     "max_steps": max_steps, "eval_steps": 5, "logging_steps": 1, "per_device_train_batch_size": 4,
                     "lr_scheduler_type": "constant", "load_best_model_at_end": True, "best_model_before_drift": True,
                     "cutoff_len": 128, "torch_dtype": "float32", "progress_bar": False, "plot_loss": False})
    summary = train_mod.train(cfg)
    history = json.loads((tmp_path / name / "dpo_metrics" / "log_history.json").read_text())
    return summary, history


def test_a_drifting_run_fires_at_the_step_it_drifts_and_a_healthy_one_does_not(tmp_path, tiny_model_dir, demo_pairs):
    """The drift class of issue 22 on the tiny model: a high, constant learning rate and a small beta (5e-3, 0.05)
    for 20 steps. The validation KL per completion passes 5 nats at an evaluation mid-run; the report fires there, names
    the remedy, and load_best_model_at_end with best_model_before_drift keeps the best evaluation before it,
    although the validation loss keeps falling after it. The same run at 1e-4 and beta 0.1 fires nothing (and
    keeps its last evaluation, its best)."""
    summary, history = tiny_run(tmp_path, tiny_model_dir, demo_pairs, "drift", 5e-3, 0.05, 20)
    evals = [r for r in history if "eval_loss" in r and r["step"] > 0]
    limit = THRESHOLDS["kl_per_sequence"]
    drifted = next(r["step"] for r in evals if r["eval_kl_per_sequence"] > limit)
    assert 5 < drifted < 20  # mid-run: the evaluations before it are below the threshold
    signals = {s["name"]: s for s in summary["health"]}
    assert signals["kl_per_sequence"]["fired"] and signals["kl_per_sequence"]["step"] == drifted
    assert f"stop before step {drifted}" in signals["kl_per_sequence"]["remedy"]
    # the training batches' completion lengths are logged, so length growth is measured (the data's: it does not grow)
    assert signals["completion_length_growth"]["value"] is not None and not signals["completion_length_growth"]["fired"]
    # the validation loss is lowest after the drift; the kept model is the best evaluation before it
    assert min(evals, key=lambda r: r["eval_loss"])["step"] > drifted
    kept = summary["kept_model"]
    assert kept["step"] == min((r for r in evals if r["step"] < drifted), key=lambda r: r["eval_loss"])["step"]
    assert f"before step {drifted}, where the health signal kl_per_sequence fired" in kept["why"]

    summary, _ = tiny_run(tmp_path, tiny_model_dir, demo_pairs, "healthy", 1e-4, 0.1, 20)
    assert [s["name"] for s in summary["health"] if s["fired"]] == []
    assert summary["kept_model"]["step"] == 20 and "health" not in summary["kept_model"]["why"]


# --- the spread between seeds ------------------------------------------------------------------------

def test_a_seed_whose_kl_is_twice_the_others_median_is_named_with_its_remedy():
    """Issue 22's seeds: 1.5, 1.7 and 1.9 nats per completion healthy, one at 7.2 (4.2x the others' median 1.7);
    the drifted one alone fires, with the figures that place it; fewer than 3 runs compare nothing."""
    runs = {"s0": {"kl_per_sequence": 1.5, "reward": 0.80, "mean_length": 15.0},
            "s1": {"kl_per_sequence": 1.9, "reward": 0.82, "mean_length": 16.0},
            "s2": {"kl_per_sequence": 7.2, "reward": 0.95, "mean_length": 31.0},
            "s3": {"kl_per_sequence": 1.7, "reward": 0.79, "mean_length": 15.0}}
    signals = {s["run"]: s for s in health.seed_outliers(runs, THRESHOLDS_SEED)}
    assert [n for n, s in signals.items() if s["fired"]] == ["s2"]
    s2 = signals["s2"]
    assert s2["value"] == pytest.approx(7.2 / 1.7) and s2["others_kl_per_sequence"] == 1.7  # median of 1.5, 1.9, 1.7
    assert s2["reward_vs_others"] == [0.95, 0.80] and s2["mean_length_vs_others"] == [31.0, 15.0]
    assert signals["s1"]["value"] == pytest.approx(1.9 / 1.7) and signals["s1"]["remedy"] is None
    line = health.describe_seed_outlier(s2)
    assert line.startswith("seed_spread: s2's KL per completion 7.2 nats is 4.2x the median of the other seeds "
                           "(1.7; threshold 2x), reward 0.95 against 0.8, mean length 31 against 15: ")
    assert "lower the learning_rate or raise pref_beta" in line
    # healthy seeds, and too few to compare
    healthy = {n: f for n, f in runs.items() if n != "s2"}
    assert not any(s["fired"] for s in health.seed_outliers(healthy, THRESHOLDS_SEED))
    assert health.seed_outliers({"s0": runs["s0"], "s2": runs["s2"]}, THRESHOLDS_SEED) == []


def test_runs_are_seeds_of_one_configuration_when_only_seed_and_where_they_wrote_differ():
    base = {"learning_rate": 2e-4, "pref_beta": 0.1, "seed": 0, "output_dir": "a"}
    configs = {"a": base, "b": {**base, "seed": 1, "output_dir": "b", "run_name": "b"},
               "c": {**base, "seed": 2, "output_dir": "c"}, "d": {**base, "seed": 3, "pref_beta": 0.5},
               "e": {**base, "output_dir": "e"}}  # d: another beta; e: a's seed again
    assert health.seed_groups(configs) == []  # a, b, c, e share a config, but e repeats a seed
    del configs["e"]
    assert health.seed_groups(configs) == [["a", "b", "c"]]


def test_eval_reports_the_seed_spread_of_the_runs_it_evaluated(capsys, monkeypatch):
    """preftune eval: runs of one configuration compared on the prompts' KL; the drifted one named in its output
    (the evaluation itself stood in for by its report)."""
    from preftune.cli import main
    from preftune.commands import eval as eval_cmd

    cfg = TrainConfig()
    base = {"learning_rate": 2e-4, "seed": 0}
    rows = [{"model": f"s{i}", "reference": "sft", "health": None,
             "prompts": {"kl_per_sequence": kl, "reward": 0.8, "mean_length": 15.0}} for i, kl in enumerate((1.5, 7.2, 1.9))]
    spread = eval_cmd.seed_spread(rows, {f"s{i}": {**base, "seed": i} for i in range(3)}, cfg)
    assert [(g["runs"], g["source"]) for g in spread] == [(["s0", "s1", "s2"], "prompts")]
    assert [s["run"] for s in spread[0]["signals"] if s["fired"]] == ["s1"]
    for row in rows:
        row["prompts"].update(reward_stderr=0.01, win_rate_vs_reference=0.6)
    report = {"models": rows, "reference": None, "seed_spread": spread, "config": {"output_dir": "out"}}
    monkeypatch.setattr(eval_cmd, "run", lambda cfg: report)
    assert main(["eval", "--model_name_or_path", "s0,s1,s2"]) == 0
    out = capsys.readouterr().out
    assert "seeds    3 runs of one configuration, KL per completion (prompts) 1.5 to 7.2 nats" in out
    assert "  health   seed_spread: s1's KL per completion 7.2 nats is 4.2x the median of the other seeds (1.7;" in out
