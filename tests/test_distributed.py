"""Several processes (torchrun, gloo on CPU): each trains on its own share of every global batch, and
the run equals a one-process run whose per-device batch is the global one; evaluation is sharded
and pooled (every pair counted once); only the main process writes; a SIGKILLed 2-process run
resumes to the same weights; a checkpoint resumes only with the process count that wrote it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from paused import paused_preftune
from safetensors.torch import load_file

from preftune import train as train_mod
from preftune.config import from_dict
from preftune.demo import make_pairs
from preftune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# (the training rows' kl_per_sequence is left out: each process scores up to 512 tokens of its own micro-batch
# (train.KL_TRAIN_TOKENS), a sample that differs from one process's by design; the evaluation's is exact)
COMPARED = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "nll_loss", "kl_per_token", "grad_norm", "learning_rate", "eval_loss",
            "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen", "eval_kl_per_token",
            "eval_kl_per_sequence", "logits/chosen", "logits/rejected", "entropy", "eval_logits/chosen", "eval_entropy"]


def raw_config(tmp_path, model_dir, **over):
    """33 training pairs in global micro-batches of 8: an epoch is 8, 8, 8, 8, 1, so with 2 processes the
    last micro-batch leaves one process without a pair. 13 validation pairs in batches of 4: 4, 4, 4, 1,
    an odd number of batches for 2 processes."""
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir(parents=True)
        for name, pairs in (("train", make_pairs(33, 0)), ("val", make_pairs(13, 1))):
            (data / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    raw = {"model_name_or_path": str(model_dir), "dataset": str(data / "train.jsonl"),
           "eval_dataset": str(data / "val.jsonl"), "learning_rate": 1e-3, "per_device_train_batch_size": 8,
           "per_device_eval_batch_size": 4, "max_steps": 7, "logging_steps": 1, "eval_steps": 3,
           "cutoff_len": 64, "torch_dtype": "float32", "progress_bar": False, "plot_loss": False,
           "pref_ftx": 0.1}
    return {**raw, **over}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, raw: dict, name: str, script: str | None = None, **popen):
    """`torchrun --nproc_per_node 2 -m preftune train <config>` (or `script train <config>`), one thread
    per process (2 cores)."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    target = [script] if script else ["-m", "preftune"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *target, "train", str(config)]
    if popen:
        return subprocess.Popen(command, env=env, **popen)
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)  # a hang guard only
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def kill_tree(proc) -> None:
    """SIGKILL a launcher and every process under it, at once. torchrun starts each worker in a session
    of its own, so killing the launcher's process group would leave the workers running."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    tree, grew = {proc.pid}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree, grew = tree | more, bool(more)
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 300  # until the kernel has reaped them (no assertion rides on it)
    while time.monotonic() < deadline and any(map(_running, tree)):
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def same_histories(one: Path, two: Path) -> tuple[list[dict], list[dict]]:
    """The two runs' logged rows, asserted equal step by step in every COMPARED metric (1e-5)."""
    rows_one, rows_two = history(one), history(two)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]
    for row_one, row_two in zip(rows_one, rows_two):
        for key in COMPARED:
            if key in row_one:
                assert row_two[key] == pytest.approx(row_one[key], abs=1e-5, rel=1e-5), (row_one["step"], key)
    return rows_one, rows_two


def same_weights(one: Path, two: Path, file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    """The two runs' saved weights, asserted equal tensor by tensor (1e-5); the first run's returned."""
    weights_one, weights_two = load_file(one / file), load_file(two / file)
    assert weights_one.keys() == weights_two.keys() and weights_one
    for name, w in weights_one.items():
        torch.testing.assert_close(weights_two[name], w, atol=1e-5, rtol=0, msg=name)
    return weights_one


def history(out: Path) -> list[dict]:
    return json.loads((out / "dpo_metrics" / "log_history.json").read_text())


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    one = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"))
    train_mod.train(from_dict(one))
    two = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"), per_device_train_batch_size=4)
    result = torchrun(tmp_path, two, "two")
    assert "processes: 2 (MULTI_CPU); global batch 8 pairs per step = 4 per device x 1 accumulation x 2" \
        in result.stderr
    assert result.stderr.count(" eval_loss=") == 4  # evaluations at steps 0, 3, 6, 7: the main process's log only

    rows_one, _ = same_histories(tmp_path / "one", tmp_path / "two")
    assert [r["step"] for r in rows_one] == [0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 7]
    assert rows_one[-1]["eval_loss"] < rows_one[0]["eval_loss"] - 0.01  # it trained: not a comparison of constants
    weights_one = same_weights(tmp_path / "one", tmp_path / "two")
    assert (weights_one["model.embed_tokens.weight"] - load_file(tiny_model_dir / "model.safetensors")[
        "model.embed_tokens.weight"]).abs().max() > 1e-3  # the weights moved
    # the metric files hold each logged row once
    csv_steps = [line.split(",")[0] for line in (tmp_path / "two/dpo_metrics/training_metrics.csv").read_text()
                 .splitlines()[1:]]
    assert csv_steps == [str(s) for s in range(8)]


@pytest.mark.slow
def test_sigkilled_two_process_run_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    over = {"save_steps": 2, "save_total_limit": 5, "dropout": 0.1, "per_device_train_batch_size": 4}
    torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "whole"), **over), "whole")

    out = tmp_path / "killed"
    script, _ = paused_preftune(tmp_path, after_step=3)  # both processes held after step 3 until killed
    proc = torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(out), **over), "killed",
                    script=script, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 1800  # a guard against a hang only: the run waits for the kill
    while not (out / "checkpoint-2").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_tree(proc)  # the launcher and both workers at once
    assert (out / "checkpoint-2").is_dir() and not (out / "model.safetensors").exists()  # killed before the end
    logged = [r["step"] for r in history(out)]  # live metric files: every row logged so far, once
    assert len(logged) >= 3 and logged == [0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 7][:len(logged)]
    assert {"rng_state_0.json", "rng_state_1.json"} <= {p.name for p in (out / "checkpoint-2").iterdir()}

    with pytest.raises(ConfigError, match="written by 2 process\\(es\\) and this run has 1; resume with the same"):
        train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(out),
                                             resume_from_checkpoint=True, **over)))
    torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(out), resume_from_checkpoint=True,
                                  **over), "resumed")
    whole, resumed = history(tmp_path / "whole"), history(out)
    timing = {"tokens_per_second"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in timing} for r in whole]
    weights, expected = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
