"""`preftune eval`: on pairs it reproduces training's own evaluation against the run's reference; on
prompts it samples, scores, and estimates the KL (exactly 0 for the reference itself); a sweep of
models becomes a table and the reward-vs-KL plot."""

import csv
import json

import pytest

from preftune import train as train_mod
from preftune.cli import main
from preftune.config import from_dict

REWARD = '''
def length(prompts, completions):
    return [len(c) % 5 for c in completions]
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, demo_pairs):
    """A short DPO run with a validation set: its output folder and summary."""
    root = tmp_path_factory.mktemp("eval_run")
    for name, pairs in (("train", demo_pairs[:40]), ("val", demo_pairs[40:56])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (root / "rewards.py").write_text(REWARD)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in demo_pairs[:6]))
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "dataset": str(root / "train.jsonl"),
                     "eval_dataset": str(root / "val.jsonl"), "output_dir": str(root / "run"), "learning_rate": 5e-3,
                     "per_device_train_batch_size": 8, "max_steps": 5, "eval_steps": 5, "cutoff_len": 128,
                     "torch_dtype": "float32", "progress_bar": False, "plot_loss": False})
    return root, train_mod.train(cfg)


def test_eval_on_pairs_reproduces_the_runs_own_evaluation(trained, capsys):
    root, summary = trained
    assert main(["eval", "--model_name_or_path", str(root / "run"), "--dataset", str(root / "val.jsonl"),
                 "--cutoff_len", "128", "--output_dir", str(root / "eval_pairs")]) == 0
    report = json.loads((root / "eval_pairs" / "eval.json").read_text())
    (row,) = report["models"]
    assert row["reference"] == str(summary["config"]["model_name_or_path"])  # the run's own reference
    final = summary["final"]
    for key in ("loss", "rewards/accuracies", "rewards/margins", "kl_per_token", "kl_per_sequence"):
        assert row["pairs"][key] == pytest.approx(final[f"eval_{key}"], abs=1e-5), key
    assert final["eval_rewards/accuracies"] > 0.5  # a real run, not a tie
    assert "accuracy" in capsys.readouterr().out
    assert {s["name"] for s in row["health"]} == {s["name"] for s in summary["health"]}  # the run's own report
    assert main(["eval", "--model_name_or_path", str(root / "run"), "--dataset", str(root / "val.jsonl"),
                 "--cutoff_len", "128", "--health_max_kl", "0", "--output_dir", str(root / "eval_pairs")]) == 0
    assert "health   kl_per_token" in capsys.readouterr().out  # with this command's thresholds (--health_max_kl: the
    # name of health_max_kl_per_token before the KL per completion had its own)


def test_eval_on_prompts_sweeps_models_into_a_table_and_frontier(trained, tiny_model_dir):
    root, _ = trained
    out = root / "sweep"
    assert main(["eval", "--model_name_or_path", f"{tiny_model_dir},{root / 'run'}", "--ref_model", str(tiny_model_dir),
                 "--prompts", str(root / "prompts.jsonl"), "--reward", f"{root / 'rewards.py'}:length",
                 "--num_samples", "2", "--max_new_tokens", "10", "--output_dir", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    same, trained_row = (r["prompts"] for r in report["models"])
    # the reference against itself: the same seeded samples, so every comparison ties and the KL is 0
    assert same["kl_per_sequence"] == 0.0 and same["win_rate_vs_reference"] == 0.5
    assert same["reward"] == report["reference"]["reward"]
    assert trained_row["kl_per_sequence"] != 0.0 and trained_row["samples"] == 12
    assert report["reference"]["prompts"] == 6
    rows = list(csv.DictReader((out / "eval.csv").open()))
    assert [r["model"] for r in rows] == [str(tiny_model_dir), str(root / "run")]
    assert float(rows[1]["prompts/kl_per_sequence"]) == pytest.approx(trained_row["kl_per_sequence"])
    # the completions behind the numbers, a line per prompt: the reference's and each model's, scored
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 6 and records[0]["prompt"]
    assert records[0]["models"][str(tiny_model_dir)] == records[0]["reference"]  # the same seeded samples
    rewards = [c["reward"] for r in records for c in r["models"][str(root / "run")]]
    assert sum(rewards) / len(rewards) == pytest.approx(trained_row["reward"])
    assert (out / "frontier.png").stat().st_size > 1000


@pytest.mark.parametrize("extra,message", [
    (["--prompts", "p.jsonl"], "prompts: scoring samples needs reward"),
    ([], "needs something to measure on"),
])
def test_eval_refuses_incomplete_requests_in_one_line(trained, capsys, extra, message):
    root, _ = trained
    assert main(["eval", "--model_name_or_path", str(root / "run"), "--output_dir", str(root / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_eval_without_a_known_reference_asks_for_ref_model(trained, tiny_model_dir, capsys):
    root, _ = trained
    assert main(["eval", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(root / "val.jsonl"),
                 "--output_dir", str(root / "x")]) == 2
    err = capsys.readouterr().err
    assert "no reference known" in err and "set ref_model" in err
