"""report_to: every logged row reaches the tracker under the metric files' names, read back from what
the tracker wrote (TensorBoard's event files; wandb's offline run file; an MLflow file store; trackio's
SQLite database), all inside tmp_path and offline; a tracker that is not installed is one line naming
the pip extra."""

import json
import sqlite3
import struct
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from preftune import tracking
from preftune import train as train_mod
from preftune.config import from_dict
from preftune.errors import ConfigError
from preftune.demo import make_pairs


def config(tmp_path, model_dir, **over):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for name, pairs in (("train", make_pairs(64, 0)), ("val", make_pairs(16, 1))):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    raw = {"model_name_or_path": str(model_dir), "dataset": str(data / "train.jsonl"),
           "eval_dataset": {"validation": str(data / "val.jsonl"), "ood": str(data / "val.jsonl")},
           "output_dir": str(tmp_path / "out"), "learning_rate": 2e-3, "per_device_train_batch_size": 16,
           "max_steps": 4, "logging_steps": 1, "eval_steps": 2, "cutoff_len": 96, "torch_dtype": "float32",
           "progress_bar": False, "plot_loss": False}
    return from_dict({**raw, **over})


def logged_values(history: list[dict]) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} of every numeric value in log_history.json."""
    out: dict[str, dict[int, float]] = {}
    for row in history:
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                out.setdefault(key, {})[row["step"]] = value
    return out


def test_tensorboard_receives_every_row_under_trl_names(tmp_path, tiny_model_dir):
    from tensorboard.backend.event_processing import event_accumulator  # the test extra: never skipped
    cfg = config(tmp_path, tiny_model_dir, report_to="tensorboard", logging_dir=str(tmp_path / "tb"),
                 generate_during_eval=2, max_new_tokens=4)
    summary = train_mod.train(cfg)
    assert summary["outputs"]["tensorboard"].rstrip("/") == str(tmp_path / "tb")

    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    history = json.loads((Path(cfg.output_dir) / "dpo_metrics" / "log_history.json").read_text())
    expected = logged_values(history)
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "kl_per_token", "learning_rate", "grad_norm", "eval_loss", "eval_rewards/accuracies",
                 "eval_ood_loss", "eval_completion_length"):
        assert name in expected, name
    for name, by_step in expected.items():  # every value of every row, at its step
        assert name in scalars, f"{name} not sent to TensorBoard"
        for step, value in by_step.items():
            assert scalars[name][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (name, step)
    assert set(scalars["eval_loss"]) == {0, 2, 4}  # the baseline and both evaluations
    # the summary values at the last step, and the sampled completions as a text table
    assert scalars["train_runtime"][4] == pytest.approx(summary["timings"]["elapsed_seconds"], abs=0.01)
    assert scalars["kept_model_step"][4] == 4
    text = events.Tensors("completions/text_summary")
    assert [e.step for e in text] == [0, 2, 4]
    assert "| prompt | completion | tokens |" in text[0].tensor_proto.string_val[0].decode()


def wandb_records(path: Path) -> list:
    """The records of a wandb run file (`run-<id>.wandb`): a 7-byte header, then LevelDB's log format
    (32 KiB blocks of chunks: crc32 (4 bytes), length (2), type (1: full, 2: first, 3: middle, 4: last))."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunk, records = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's trailer
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_wandb_offline_run_holds_every_row(tmp_path, tiny_model_dir, monkeypatch):
    import wandb  # noqa: F401  (the test extra: a broken install fails, never skips)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config(tmp_path, tiny_model_dir, report_to=["wandb"], run_name="tiny-dpo", generate_during_eval=2,
                 max_new_tokens=4)
    train_mod.train(cfg)
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    deadline = time.monotonic() + 600  # wandb's service writes the file in the background: wait for the run's
    # end (generous: a loaded machine is slow, which is not what this test is about)
    while True:
        try:
            records = wandb_records(run_file)
        except Exception:  # a record half written
            records = []
        if "exit" in [r.WhichOneof("record_type") for r in records]:
            break
        assert time.monotonic() < deadline, "the wandb run file has no exit record"
        time.sleep(0.2)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "tiny-dpo"
    config_keys = {item.key for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert {"pref_beta", "learning_rate", "report_to"} <= config_keys
    logged: dict[str, dict[int, float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                logged.setdefault(item.key or "/".join(item.nested_key), {})[r.history.step.num] = json.loads(item.value_json)
    history = json.loads((Path(cfg.output_dir) / "dpo_metrics" / "log_history.json").read_text())
    for name, by_step in logged_values(history).items():
        for step, value in by_step.items():
            assert logged[name][step] == pytest.approx(value, rel=1e-6), (name, step)
    assert logged["kept_model_step"] == {4: 4}
    # the sampled completions: a wandb Table at each evaluation (the run file holds its fields, the rows a media file)
    assert logged["completions/_type"] == {0: "table-file", 2: "table-file", 4: "table-file"}
    assert logged["completions/nrows"] == {0: 2, 2: 2, 4: 2}


SUMMARY_KEYS = {"train_runtime", "train_loss", "kept_model_step"}  # logged at the last step by Trackers.finish


def test_mlflow_run_holds_every_row(tmp_path, tiny_model_dir, monkeypatch):
    import mlflow  # the test extra (mlflow-skinny): a broken install fails, never skips
    store = (tmp_path / "mlruns").as_uri()
    # a file store: mlflow 3's default, sqlite:///mlflow.db in the working directory, needs SQLAlchemy,
    # which mlflow-skinny lacks; mlflow 3 takes a file store only when allowed
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # mlflow 3 sends usage telemetry otherwise
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = config(tmp_path, tiny_model_dir, report_to="mlflow", run_name="tiny-dpo")
    summary = train_mod.train(cfg)
    assert summary["outputs"]["mlflow"] == store
    assert mlflow.active_run() is None  # finished, not left open in the process

    client = mlflow.MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("preftune").experiment_id])
    assert run.info.run_name == "tiny-dpo" and run.info.status == "FINISHED"
    assert run.data.params["pref_beta"] == str(cfg.pref_beta)  # the config as the run's parameters
    assert run.data.params["learning_rate"] == str(cfg.learning_rate)
    history = json.loads((Path(cfg.output_dir) / "dpo_metrics" / "log_history.json").read_text())
    expected = logged_values(history)
    assert set(run.data.metrics) == set(expected) | SUMMARY_KEYS  # TRL's names, "/" kept ("rewards/chosen")
    for name, by_step in expected.items():  # every value of every row, at its step
        logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}
        assert logged == pytest.approx(by_step, rel=1e-6), name
    assert set(expected["eval_loss"]) == {0, 2, 4}
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train_runtime")}
    assert logged == {4: pytest.approx(summary["timings"]["elapsed_seconds"], abs=0.01)}
    assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "kept_model_step")} == {4: 4}


def redirect_trackio(monkeypatch, folder: Path) -> None:
    """trackio's folder to `folder`: TRACKIO_DIR, which trackio reads once, when imported (default
    $HF_HOME/trackio), so also the copies its modules already hold."""
    monkeypatch.setenv("TRACKIO_DIR", str(folder))
    import trackio  # noqa: F401
    for module in [m for n, m in sys.modules.items() if n == "trackio" or n.startswith("trackio.")]:
        for name, path in (("TRACKIO_DIR", folder), ("MEDIA_DIR", folder / "media"),
                           ("ARTIFACTS_DIR", folder / "artifacts")):
            if isinstance(getattr(module, name, None), Path):
                monkeypatch.setattr(module, name, path)


def test_trackio_database_holds_every_row(tmp_path, tiny_model_dir, monkeypatch):
    import trackio  # noqa: F401  (the test extra: a broken install fails, never skips)
    folder = tmp_path / "trackio"
    redirect_trackio(monkeypatch, folder)
    monkeypatch.delenv("TRACKIO_SPACE_ID", raising=False)  # local only: no Space, no server
    monkeypatch.delenv("TRACKIO_SERVER_URL", raising=False)
    threads = set(threading.enumerate())
    cfg = config(tmp_path, tiny_model_dir, report_to="trackio", run_name="tiny-dpo")
    summary = train_mod.train(cfg)
    assert summary["outputs"]["trackio"] == str(folder)
    assert [t.name for t in set(threading.enumerate()) - threads] == []  # its sender and monitors stopped
    import trackio.context_vars
    assert trackio.context_vars.current_run.get() is None  # finished, not left to be finished again at exit

    with sqlite3.connect(folder / "preftune.db") as db:  # the project's database: a row per log call
        rows = db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY id").fetchall()
        configs = db.execute("SELECT run_name, config FROM configs").fetchall()
    assert {name for name, _, _ in rows} == {"tiny-dpo"}
    [(_, run_config)] = configs
    assert json.loads(run_config)["pref_beta"] == cfg.pref_beta
    logged: dict[str, dict[int, float]] = {}
    for _, step, values in rows:
        for name, value in json.loads(values).items():
            logged.setdefault(name, {})[step] = value
    history = json.loads((Path(cfg.output_dir) / "dpo_metrics" / "log_history.json").read_text())
    expected = logged_values(history)
    assert set(logged) == set(expected) | SUMMARY_KEYS
    for name, by_step in expected.items():
        assert logged[name] == pytest.approx(by_step, rel=1e-6), name
    assert logged["train_runtime"] == {4: pytest.approx(summary["timings"]["elapsed_seconds"], abs=0.01)}
    assert logged["kept_model_step"] == {4: 4}


def test_a_tracker_not_installed_names_the_pip_extra(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(tracking, "installed", lambda name: name != "wandb")
    cfg = config(tmp_path, tiny_model_dir, report_to="tensorboard,wandb")
    with pytest.raises(ConfigError, match=r"report_to: wandb is not installed; pip install 'preftune\[wandb\]'"):
        train_mod.train(cfg)
    assert not (tmp_path / "out" / "dpo_metrics").exists()  # refused before anything ran
    assert tracking.tracker_names(config(tmp_path, tiny_model_dir, report_to="all")) == [
        n for n in ("tensorboard", "mlflow", "trackio") if tracking.installed(n)]


def test_report_to_values(tmp_path, tiny_model_dir):
    assert config(tmp_path, tiny_model_dir, report_to=None).trackers == []
    assert config(tmp_path, tiny_model_dir, report_to="none").trackers == []
    assert config(tmp_path, tiny_model_dir, report_to=["tensorboard", "wandb"]).trackers == ["tensorboard", "wandb"]
    assert config(tmp_path, tiny_model_dir, report_to="tensorboard, mlflow").trackers == ["tensorboard", "mlflow"]
    with pytest.raises(ConfigError, match="report_to: unknown tracker 'comet'; use tensorboard, wandb, mlflow, "
                                          "trackio, all or none"):
        config(tmp_path, tiny_model_dir, report_to="comet")


@pytest.mark.slow
def test_two_processes_report_once_and_keep_the_best(tmp_path, tiny_model_dir):
    """torchrun with 2 processes: one TensorBoard writer (the main process's) with every row of the
    pooled metrics, and the best model kept through the processes' synchronisation."""
    from tensorboard.backend.event_processing import event_accumulator  # the test extra: never skipped
    from safetensors.torch import load_file
    from test_distributed import raw_config, torchrun

    out = tmp_path / "two"
    torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(out), per_device_train_batch_size=4,
                                  learning_rate=0.05, eval_steps=1, report_to="tensorboard",
                                  logging_dir=str(tmp_path / "tb"), load_best_model_at_end=True), "two")
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1  # one writer
    events = event_accumulator.EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    history = json.loads((out / "dpo_metrics" / "log_history.json").read_text())
    for name, by_step in logged_values(history).items():
        assert {e.step: e.value for e in events.Scalars(name)} == pytest.approx(by_step, rel=1e-5, abs=1e-6), name
    summary = json.loads((out / "dpo_metrics" / "summary.json").read_text())
    assert summary["kept_model"]["step"] == summary["best"]["step"]
    final, best = load_file(out / "model.safetensors"), load_file(out / "best_model" / "model.safetensors")
    assert all(torch.equal(final[k], best[k]) for k in best)


def test_mlflow_and_trackio_get_the_run_name(tmp_path, tiny_model_dir, monkeypatch):
    """What preftune hands accelerate for them, without their packages (the trackers import theirs when
    started); the runs themselves are read back above."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker

    monkeypatch.setattr(tracking, "installed", lambda name: True)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    cfg = config(tmp_path, tiny_model_dir, report_to="mlflow,trackio,tensorboard", run_name="dpo-a")
    mlflow, trackio, tensorboard = tracking.make_trackers(cfg)
    assert isinstance(mlflow, MLflowTracker) and mlflow.run_name == "dpo-a" and mlflow.experiment_name == "preftune"
    assert isinstance(trackio, TrackioTracker) and trackio.init_kwargs == {"name": "dpo-a"}
    assert isinstance(tensorboard, TensorBoardTracker)
    default = Path(tensorboard.logging_dir_param)  # transformers' default: <output_dir>/runs/<date>_<host>
    assert default.parent == Path(cfg.output_dir) / "runs"
