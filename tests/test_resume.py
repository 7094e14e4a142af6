"""Checkpoints and exact resume: a run stopped after a checkpoint (by an exception, a failed write, or
a real SIGKILL of `preftune train`) and resumed reaches the same metrics and weights, bitwise on CPU."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from paused import paused_preftune
from safetensors.torch import load_file

from preftune import best as best_model, checkpoints
from preftune import train as train_mod
from preftune.config import from_dict
from preftune.demo import make_pairs
from preftune.errors import ConfigError
from preftune.report import MetricsLog

TIMING = {"tokens_per_second"}  # wall-clock columns: the only ones allowed to differ


def write_data(folder, n_train, n_val):
    folder.mkdir(parents=True, exist_ok=True)
    for name, pairs in (("train", make_pairs(n_train, 0)), ("val", make_pairs(n_val, 1))):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return folder / "train.jsonl", folder / "val.jsonl"


def resume_raw(tmp_path, model_dir, **over):
    """64 pairs in micro-batches of 8, 2 per step: 4 steps per epoch, 10 steps. Checkpoint every 3 steps
    (mid-epoch, between logging steps); dropout on (RNG matters), BCO running shift (loss state),
    early stopping bookkeeping, evaluation every 4 steps."""
    train_file, val_file = write_data(tmp_path / "data", n_train=64, n_val=16)
    raw = {"model_name_or_path": str(model_dir), "dataset": str(train_file), "eval_dataset": str(val_file),
           "output_dir": str(tmp_path / "out"), "learning_rate": 2e-3, "per_device_train_batch_size": 8,
           "gradient_accumulation_steps": 2, "max_steps": 10, "logging_steps": 4, "eval_steps": 4,
           "save_steps": 3, "save_total_limit": 5, "cutoff_len": 64, "torch_dtype": "float32",
           "progress_bar": False, "plot_loss": False, "warmup_ratio": 0.2, "dropout": 0.1,
           "pref_bco_weight": 0.5, "early_stopping_patience": 5}
    return {**raw, **over}


def outputs(out: Path):
    history = json.loads((out / "dpo_metrics" / "log_history.json").read_text())
    csv_rows = (out / "dpo_metrics" / "training_metrics.csv").read_text().splitlines()
    summary = json.loads((out / "dpo_metrics" / "summary.json").read_text())
    weights = load_file(out / "model.safetensors")
    return history, csv_rows, summary, weights


def assert_same_run(resumed: Path, reference: Path):
    history, csv_rows, summary, weights = outputs(resumed)
    ref_history, ref_csv, ref_summary, ref_weights = outputs(reference)
    assert [{k: v for k, v in r.items() if k not in TIMING} for r in history] == \
        [{k: v for k, v in r.items() if k not in TIMING} for r in ref_history]
    header = csv_rows[0].split(",")
    assert header == ref_csv[0].split(",") and len(csv_rows) == len(ref_csv)
    timing = [header.index(k) for k in TIMING]
    for row, ref_row in zip(csv_rows[1:], ref_csv[1:]):
        assert [v for i, v in enumerate(row.split(",")) if i not in timing] == \
            [v for i, v in enumerate(ref_row.split(",")) if i not in timing]
    assert summary["final"].keys() == ref_summary["final"].keys()
    assert summary["steps"] == ref_summary["steps"]
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
    return summary


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    train_mod.train(from_dict(resume_raw(tmp, tiny_model_dir)))
    return tmp / "out"


class Killed(Exception):
    pass


def test_stopped_after_a_checkpoint_resumes_exactly(tmp_path, tiny_model_dir, uninterrupted, monkeypatch):
    real_save = checkpoints.save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        if args[6] == 6:  # step 6: epoch 2, micro-batch 4 of 8, two steps after a logging step
            raise Killed

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_mod.train(from_dict(resume_raw(tmp_path, tiny_model_dir)))
    monkeypatch.undo()
    out = tmp_path / "out"
    state = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert (state["epoch"], state["micro_batch"], state["running_keys"][0]) == (1, 4, "loss")
    assert state["loss_state"]["bco_shift"]["count"] == 12  # the BCO shift has seen 12 micro-batches
    # the metric files are written as the run goes: every row logged before the stop is there, once
    assert [r["step"] for r in json.loads((out / "dpo_metrics" / "log_history.json").read_text())] == [0, 4, 4]
    assert [line.split(",")[0] for line in (out / "dpo_metrics" / "training_metrics.csv").read_text().splitlines()] \
        == ["step", "0", "4"]
    assert not (out / "model.safetensors").exists()

    summary = train_mod.train(from_dict(resume_raw(tmp_path, tiny_model_dir, resume_from_checkpoint=True)))
    assert summary["resumed_from"] == {"checkpoint": str(out / "checkpoint-6"), "step": 6}
    assert_same_run(out, uninterrupted)
    steps = [r["step"] for r in json.loads((out / "dpo_metrics" / "log_history.json").read_text())]
    assert steps == [0, 4, 4, 8, 8, 10, 10]  # no row lost or repeated across the restart


def test_failed_checkpoint_write_leaves_the_previous_one_usable(tmp_path, tiny_model_dir, uninterrupted,
                                                                monkeypatch):
    real_torch_save = torch.save

    def fail_at_step_6(obj, path, *args, **kwargs):
        if ".checkpoint-6.tmp" in str(path):
            raise Killed  # as a kill in the middle of writing checkpoint-6
        return real_torch_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fail_at_step_6)
    with pytest.raises(Killed):
        train_mod.train(from_dict(resume_raw(tmp_path, tiny_model_dir)))
    monkeypatch.undo()
    out = tmp_path / "out"
    assert (out / ".checkpoint-6.tmp").is_dir() and not (out / "checkpoint-6").exists()
    assert checkpoints.resume_dir(from_dict(resume_raw(tmp_path, tiny_model_dir, resume_from_checkpoint=True))) \
        == out / "checkpoint-3"

    summary = train_mod.train(from_dict(resume_raw(tmp_path, tiny_model_dir, resume_from_checkpoint=True)))
    assert summary["resumed_from"]["step"] in (3, 6, 9)  # the latest checkpoint (3 unless the kill came late)
    assert_same_run(out, uninterrupted)
    assert not (out / ".checkpoint-6.tmp").exists()  # the leftover was replaced by the real checkpoint-6


def test_checkpoint_files_are_read_without_unpickling(uninterrupted):
    folder = uninterrupted / "checkpoint-9"
    assert not list(folder.rglob("*.pkl")) and not list(folder.rglob("*.bin"))
    torch.load(folder / "optimizer.pt", weights_only=True)  # raises on anything but tensors and plain data
    for name in ("scheduler.json", "trainer_state.json", "rng_state_0.json"):
        json.loads((folder / name).read_text())


def test_resume_errors_name_what_is_missing(tmp_path, tiny_model_dir):
    raw = resume_raw(tmp_path, tiny_model_dir)
    with pytest.raises(ConfigError, match="holds no checkpoint-N folder; set save_steps"):
        checkpoints.resume_dir(from_dict({**raw, "resume_from_checkpoint": True}))
    with pytest.raises(ConfigError, match="is not a folder"):
        checkpoints.resume_dir(from_dict({**raw, "resume_from_checkpoint": str(tmp_path / "nope")}))
    broken = tmp_path / "out" / "checkpoint-4"
    broken.mkdir(parents=True)
    (broken / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="checkpoint-4' is not a complete preftune checkpoint: it lacks "
                                          "trainer_state.json, optimizer.pt, scheduler.json, rng_state_0.json"):
        checkpoints.resume_dir(from_dict({**raw, "resume_from_checkpoint": str(broken)}))
    with pytest.raises(ConfigError, match="no checkpoint in .* is complete \\(checkpoint-4 lacks trainer_state"):
        checkpoints.resume_dir(from_dict({**raw, "resume_from_checkpoint": "true"}))
    assert from_dict({**raw, "resume_from_checkpoint": False}).resume_from_checkpoint is None
    cfg = from_dict(raw)
    best_model.check_best_model(cfg, None, 6)  # no early-stopping best yet: nothing to check
    with pytest.raises(ConfigError, match="best model \\(step 4\\) is not in"):
        best_model.check_best_model(cfg, 4, 6)
    best = Path(cfg.output_dir) / "best_model"
    best.mkdir()
    for saved, ok in ((4, True), (8, True), (2, False)):  # 8: a later best the resumed run will rewrite
        (best / "preftune_step.json").write_text(json.dumps({"step": saved}))
        if ok:
            best_model.check_best_model(cfg, 4, 6)
        else:
            with pytest.raises(ConfigError):
                best_model.check_best_model(cfg, 4, 6)
    assert MetricsLog(from_dict(raw)).resumed_from is None


CLI = [sys.executable, "-m", "preftune", "train"]


def cli_runs(tmp_path, model_dir):
    """The environment and a config writer (`config(name, **over)` -> path) for `python -m preftune
    train` subprocess runs, after the uninterrupted run ("uninterrupted") that the others must equal."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}

    def config(name, **over):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(resume_raw(tmp_path, model_dir, output_dir=str(tmp_path / name), **over)))
        return str(path)

    subprocess.run(CLI + [config("uninterrupted")], env=env, check=True, capture_output=True)
    return env, config


def wait_for(path, proc, seconds: float = 1800) -> None:
    """Until `path` exists (a checkpoint in place), the process ends, or `seconds` pass (a guard against a
    hang only: the paused run waits for the test, however long the machine takes to get there)."""
    deadline = time.monotonic() + seconds
    while not path.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.one_process
def test_sigkilled_cli_run_resumes_exactly(tmp_path, tiny_model_dir):
    """A real kill: `python -m preftune train cfg.yaml` is SIGKILLed after checkpoint-3 is in place and
    before the run ends (it is held after step 4), then resumed with resume_from_checkpoint: true; its
    outputs equal those of an uninterrupted run of the same command. Both runs are subprocesses with the
    same environment."""
    env, config = cli_runs(tmp_path, tiny_model_dir)

    out = tmp_path / "killed"
    script, _ = paused_preftune(tmp_path, after_step=4)  # the same command, held after step 4 until killed
    proc = subprocess.Popen([sys.executable, script, "train", config("killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(out / "checkpoint-3", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (out / "checkpoint-3").is_dir() and not (out / "model.safetensors").exists()  # killed before the end

    subprocess.run(CLI + [config("killed", resume_from_checkpoint=True)], env=env, check=True,
                   capture_output=True)
    summary = assert_same_run(out, tmp_path / "uninterrupted")
    assert summary["resumed_from"]["step"] == 3  # the latest checkpoint


def test_resume_refuses_a_different_data_order(tmp_path, tiny_model_dir, uninterrupted):
    raw = resume_raw(uninterrupted.parent, tiny_model_dir, resume_from_checkpoint=str(uninterrupted / "checkpoint-9"),
                     output_dir=str(tmp_path / "out"), per_device_train_batch_size=4)
    message = "written with other per_device_train_batch_size \\(per_device_train_batch_size=8\\)"
    with pytest.raises(ConfigError, match=message):
        train_mod.train(from_dict(raw))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft's save
def test_adapter_checkpoint_loads_back_into_a_peft_model(tmp_path, tiny_model_dir):
    """A peft policy's save_pretrained writes only the adapter; resuming loads it into the adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def lora_model():
        torch.manual_seed(0)
        return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                              LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    trained = lora_model()
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.add_(1.0)
    trained.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "adapter_model.safetensors").is_file() and not (tmp_path / "model.safetensors").exists()
    fresh = lora_model()
    checkpoints.load_weights_into(fresh, tmp_path)
    expected = dict(trained.named_parameters())
    assert all(torch.equal(p, expected[name]) for name, p in fresh.named_parameters())


def test_a_signal_stops_after_the_step_and_the_resume_is_exact(tmp_path, tiny_model_dir, uninterrupted, monkeypatch):
    """SIGTERM during step 5 (between checkpoints and logging steps): the step finishes, checkpoint-5 is
    written, the metric files hold steps 0 and 4, and the resume reaches the uninterrupted run's numbers."""
    from preftune import runtime

    real_step = torch.optim.AdamW.step
    count = []

    def step_then_signal(self, *args, **kwargs):
        count.append(1)
        if len(count) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    with pytest.raises(runtime.Stopped, match="^stopped by SIGTERM after step 5") as err:
        train_mod.train(from_dict(resume_raw(tmp_path, tiny_model_dir)))
    monkeypatch.undo()
    assert err.value.exit_code == 143
    out = tmp_path / "out"
    assert (out / "checkpoint-5").is_dir() and not (out / "model.safetensors").exists()
    assert [r["step"] for r in json.loads((out / "dpo_metrics" / "log_history.json").read_text())] == [0, 4, 4]

    summary = train_mod.train(from_dict(resume_raw(tmp_path, tiny_model_dir, resume_from_checkpoint=True)))
    assert summary["resumed_from"] == {"checkpoint": str(out / "checkpoint-5"), "step": 5}
    assert_same_run(out, uninterrupted)
    steps = [r["step"] for r in json.loads((out / "dpo_metrics" / "log_history.json").read_text())]
    assert steps == [0, 4, 4, 8, 8, 10, 10]


@pytest.mark.slow
@pytest.mark.one_process
def test_sigterm_to_a_cli_run_checkpoints_exits_143_and_resumes_exactly(tmp_path, tiny_model_dir):
    """A real SIGTERM to `python -m preftune train cfg.yaml` (held after step 4) after checkpoint-3: the
    step in progress finishes, a checkpoint of it is written, exit status 143 with one line, the metric
    files hold every logged step once; resumed, the outputs equal an uninterrupted run's."""
    env, config = cli_runs(tmp_path, tiny_model_dir)

    out = tmp_path / "stopped"
    script, go = paused_preftune(tmp_path, after_step=4)
    proc = subprocess.Popen([sys.executable, script, "train", config("stopped")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(out / "checkpoint-3", proc)
    proc.send_signal(signal.SIGTERM)
    go.touch()  # the run goes on from step 4: the signal is in before it could end
    stderr = proc.communicate(timeout=1800)[1]  # a guard against a hang only
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("preftune: stopped by SIGTERM after step ")
    stopped_at = int(last.split("after step ")[1].split(";")[0])
    assert (out / f"checkpoint-{stopped_at}").is_dir() and not (out / "model.safetensors").exists()
    steps = [r["step"] for r in json.loads((out / "dpo_metrics" / "log_history.json").read_text())]
    expected = [0, 4, 4, 8, 8, 10, 10]
    assert steps == [s for s in expected if s <= stopped_at]  # every logged step, once

    subprocess.run(CLI + [config("stopped", resume_from_checkpoint=True)], env=env, check=True,
                   capture_output=True)
    summary = assert_same_run(out, tmp_path / "uninterrupted")
    assert summary["resumed_from"]["step"] == stopped_at
    assert [r["step"] for r in json.loads((out / "dpo_metrics" / "log_history.json").read_text())] == expected
