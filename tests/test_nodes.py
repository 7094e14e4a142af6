"""Several machines, tested on one: two launches of two processes each (`torchrun --nnodes 2 --nproc_per_node
2 --node_rank 0|1 --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT`, or accelerate's `--num_machines 2
--machine_rank 0|1`), as two machines of two devices run them, train as one run of four processes whose
global batch is a one-process run's batch: the same logged rows and weights, for DDP, FSDP2 and ZeRO-3.
`ddp_timeout` bounds how long the other processes wait for one that stopped answering (SIGSTOP, the case
that only the timeout ends); one that dies (SIGKILL) closes its connections and is noticed at once. Either
way the others stop, each with one line, and the last checkpoint resumes on the same layout.
The machine has 2 cores, so the 4 processes (one thread each) share them: slower, the same numbers."""

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from paused import paused_preftune
from test_distributed import ROOT, free_port, kill_tree, raw_config, same_histories, same_weights

from preftune import train as train_mod
from preftune.config import from_dict
from preftune.engines import process_group_kwargs

GENEROUS = 120  # seconds: a bound on a wait that the run ends by itself, far above what it takes
MULTI_NODE = str(ROOT / "examples" / "accelerate" / "multi-node.yaml")


def two_nodes(tmp_path: Path, raw: dict, name: str, script: str | None = None,
              launcher: str = "torchrun") -> list[subprocess.Popen]:
    """Machine 0 and machine 1 of a 2 x 2 run of `train <config>` on loopback, each launcher and its two
    workers in a session of their own, its output in <name>.node<k>.log: `torchrun --nnodes 2
    --nproc_per_node 2 --node_rank k` (c10d: the rendezvous decides which machine has rank 0), or
    `accelerate launch` with examples/accelerate/multi-node.yaml as a user runs it, `--machine_rank k`, on 4
    CPU processes and this machine's address (static: machine 0 has rank 0)."""
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    target = [script] if script else ["-m", "preftune"]
    port = free_port()
    procs = []
    for node in (0, 1):
        if launcher == "torchrun":
            command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                       "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"]
        else:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", MULTI_NODE,
                       "--machine_rank", str(node), "--num_processes", "4", "--main_process_ip", "127.0.0.1",
                       "--main_process_port", str(port), "--mixed_precision", "no"]
        log = (tmp_path / f"{name}.node{node}.log").open("w")
        procs.append(subprocess.Popen([*command, *target, "train", str(config)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def finished(procs: list[subprocess.Popen]) -> list[int]:
    try:
        return [p.wait(timeout=1800) for p in procs]  # a hang guard only
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_tree(p)
        raise


def workers(launcher: subprocess.Popen) -> dict[int, int]:
    """{RANK: pid} of the workers a launcher started: the rendezvous, not --node_rank, decides their ranks."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != launcher.pid:
                continue
            env = dict(line.split("=", 1) for line in (stat.parent / "environ").read_text().split("\0") if "=" in line)
        except (OSError, ValueError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(stat.parent.name)
    assert len(found) == 2, f"workers under launcher {launcher.pid}: {found}"
    return found


OVER = {"save_steps": 2, "ddp_timeout": 20}
ENGINES = {"ddp": {}, "fsdp2": {"fsdp": "full_shard"},
           "zero3": {"deepspeed": str(ROOT / "examples" / "deepspeed" / "ds_z3_config.json")}}
ROWS = [0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 7]  # logged steps: a row per step, evaluations at 0, 3, 6 and the end


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir) -> Path:
    """The output folder of the run the two-machine runs must equal: one process with the global batch (8)."""
    folder, threads = tmp_path_factory.mktemp("one_process"), torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the four processes runs
    try:
        train_mod.train(from_dict(raw_config(folder, tiny_model_dir, output_dir=str(folder / "one"), **OVER)))
    finally:
        torch.set_num_threads(threads)
    return folder / "one"


def the_one_process_run(one: Path, out: Path, logs: str) -> None:
    """Every logged row and the final weights of the 4-process run in `out` equal the one-process run's: the
    two launches trained as one run with the global batch (2 per process; the epoch's last micro-batch, one
    pair, leaves three processes without one)."""
    assert "global batch 8 pairs per step = 2 per device x 1 accumulation x 4 processes" in logs
    rows, _ = same_histories(one, out)
    assert [r["step"] for r in rows] == ROWS
    same_weights(one, out)


@pytest.mark.slow
@pytest.mark.parametrize("engine,launcher", [("ddp", "accelerate"), ("fsdp2", "torchrun")])
def test_two_machines_of_two_processes_equal_one_process(tmp_path, tiny_model_dir, one_process, engine, launcher):
    """DDP through accelerate's multi-machine form (the example config unchanged but for the address, the
    process count, 4 CPU processes rather than 16 GPUs, and the precision), FSDP2 through torchrun's: the rows
    and weights of one process."""
    out = tmp_path / "two"
    two = raw_config(tmp_path, tiny_model_dir, output_dir=str(out), per_device_train_batch_size=2, **OVER,
                     **ENGINES[engine])
    assert finished(two_nodes(tmp_path, two, "run", launcher=launcher)) == [0, 0]
    the_one_process_run(one_process, out, "".join((tmp_path / f"run.node{k}.log").read_text() for k in (0, 1)))


@pytest.mark.slow
@pytest.mark.parametrize("engine,stop", [("zero3", signal.SIGSTOP), ("ddp", signal.SIGKILL)],
                         ids=["zero3-hung", "ddp-killed"])
def test_a_lost_process_stops_the_others_within_ddp_timeout_and_the_same_layout_resumes_to_one_process(
        tmp_path, tiny_model_dir, one_process, engine, stop):
    """The last process, on the machine without rank 0, lost after checkpoint-2: SIGSTOPped under ZeRO-3 (it
    hangs, which only the timeout ends), or SIGKILLed under DDP (its connections close: noticed at once). The
    others stop with one line each; the hung run is then resumed on the same layout to the end, every logged
    row and the final weights equal to a one-process run (the killed one's resume is the same code)."""
    out = tmp_path / "two"
    two = raw_config(tmp_path, tiny_model_dir, output_dir=str(out), per_device_train_batch_size=2, **OVER,
                     **ENGINES[engine])
    script, go = paused_preftune(tmp_path, after_step=3)  # every process held after step 3 (checkpoint-2 written)
    nodes = two_nodes(tmp_path, two, "lost", script=script)
    try:
        deadline = time.monotonic() + 1800  # a hang guard only: the run waits for the test
        while not (out / "checkpoint-2").is_dir() and all(p.poll() is None for p in nodes) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "checkpoint-2").is_dir(), [p.poll() for p in nodes]
        ranks = [workers(p) for p in nodes]
        lost = next(k for k in (0, 1) if 3 in ranks[k])  # the machine without rank 0 loses its process 3
        os.kill(ranks[lost][3], stop)
        go.touch()  # the others go on into step 4, whose collectives process 3 never answers
        survivor = nodes[1 - lost]
        survivor.wait(timeout=GENEROUS)  # TimeoutExpired: it hangs, which ddp_timeout is there to prevent
        assert survivor.returncode != 0
    finally:
        for p in nodes:
            kill_tree(p)  # the lost machine's launcher (process 3 stopped) and anything left
    # with four processes a line cannot name the one lost. The first to stop sees a timeout (nothing has closed
    # yet); those after it may see the first one's connection close
    said = [line for k in (0, 1) for line in (tmp_path / f"lost.node{k}.log").read_text().splitlines()
            if line.startswith("preftune:")]
    one_line = re.compile(rf"preftune: error: process [012] of 4 stopped: one of the other 3 processes .+\. No final "
                          rf"model was saved; the last checkpoint is {re.escape(str(out / 'checkpoint-2'))} "
                          rf"\(resume_from_checkpoint: true continues from it, with 4 processes again\)")
    assert said and all(one_line.fullmatch(s) for s in said), said
    assert not (out / "model.safetensors").exists()
    if stop == signal.SIGKILL:
        return
    assert any("one of the other 3 processes did not answer within ddp_timeout=20 s (it hangs, or its machine is "
               "unreachable)." in s for s in said), said

    resumed = finished(two_nodes(tmp_path, {**two, "resume_from_checkpoint": True}, "resumed"))
    assert resumed == [0, 0]
    logs = "".join((tmp_path / f"{n}.node{k}.log").read_text() for n in ("lost", "resumed") for k in (0, 1))
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in logs
    the_one_process_run(one_process, out, logs)


def test_ddp_timeout_is_what_accelerate_passes_to_init_process_group(tmp_path):
    """accelerate passes on only the fields that differ from its own defaults (600 s, NCCL's): 600 s too must
    reach gloo and DeepSpeed, whose own default is 30 minutes."""
    def kwargs(deepspeed=False, **over):
        cfg = from_dict({"model_name_or_path": str(tmp_path / "absent"), "dataset": "x.jsonl", **over})
        group = process_group_kwargs(cfg, deepspeed)
        return group and group.to_kwargs()

    assert kwargs(ddp_timeout=20) == {"timeout": timedelta(seconds=20)}
    assert kwargs(ddp_timeout=600)["timeout"].seconds == 600
    assert kwargs(ddp_timeout=180000000) == {"timeout": timedelta(seconds=180000000)}  # LLaMA-Factory's examples
    assert kwargs() is None  # unset: torch's defaults
    if not torch.cuda.is_available():  # DeepSpeed's CPU processes: gloo, named
        assert kwargs(deepspeed=True)["backend"] == "gloo"


def test_the_accelerate_multi_node_config_starts_torchrun_as_one_of_two_machines():
    """examples/accelerate/multi-node.yaml as accelerate reads it, and the torchrun arguments its launcher makes
    on the second machine (accelerate's own functions; nothing is started)."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    file = str(ROOT / "examples" / "accelerate" / "multi-node.yaml")
    config = load_config_from_file(file)
    assert isinstance(config, ClusterConfig) and config.num_machines == 2 and config.num_processes % 2 == 0
    args = launch_command_parser().parse_args(["--config_file", file, "--machine_rank", "1", "-m", "preftune",
                                               "train", "cfg.yaml"])
    _validate_launch_command(args)
    prepare_multi_gpu_env(args)
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, str(config.num_processes // 2))
    assert args.rdzv_endpoint == f"{config.main_process_ip}:{config.main_process_port}"
    assert (args.module, args.training_script, args.training_script_args) == (True, "preftune", ["train", "cfg.yaml"])


def test_the_slurm_script_starts_one_torchrun_per_machine(tmp_path):
    """examples/slurm/preftune.sbatch run by bash under a stand-in Slurm (srun writes down its arguments,
    scontrol names the job's machines): one torchrun per machine, with the job's values, that torchrun's own
    parser accepts."""
    script = ROOT / "examples" / "slurm" / "preftune.sbatch"
    directives = [line.split()[1] for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "--nodes=2" in directives and "--ntasks-per-node=1" in directives
    bin_dir, said = tmp_path / "bin", tmp_path / "srun.args"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {said}\n')
    hostnames = '[ "$*" = "show hostnames gpu[07-08]" ] && printf "gpu07\\ngpu08\\n"'
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\n{hostnames}\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2",
           "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "4"}
    subprocess.run(["bash", str(script), "cfg.yaml"], cwd=ROOT, env=env, check=True, timeout=60)
    args = said.read_text().splitlines()
    assert args[:2] == ["--kill-on-bad-exit=1", ".venv/bin/torchrun"]
    from torch.distributed.run import get_args_parser

    run = get_args_parser().parse_args(args[2:])
    assert (run.nnodes, run.nproc_per_node, run.rdzv_id, run.rdzv_backend, run.rdzv_endpoint) == \
        ("2", "4", "4242", "c10d", "gpu07:29500")
    assert (run.module, run.training_script, run.training_script_args) == (True, "preftune", ["train", "cfg.yaml"])


@pytest.mark.parametrize("world,text,said", [
    (2, "[third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 20000ms for recv operation "
        "to complete", "process 1 did not answer within ddp_timeout=20 s (it hangs, or its machine is unreachable)"),
    # (as gloo words it when the timeout strikes while a pair is being read: seen under ZeRO-3 with a hung peer)
    (2, "Application timeout caused pair closure",
     "process 1 did not answer within ddp_timeout=20 s (it hangs, or its machine is unreachable)"),
    (2, "[third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [10.0.0.2]:41234",
     "process 1 closed its connection (it died: its launcher's log says why)"),
    (4, "[third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer",
     "one of the other 3 processes closed its connection"),
    (2, "gloo: unexpected op", "a collective with process 1 failed (gloo: unexpected op)"),
    (2, "CUDA out of memory", None),  # not a collective's failure: the error as it is
    (1, "[gloo] Timed out", None),  # one process: nothing to lose
])
def test_a_failed_collective_is_one_line_naming_the_other_process(tmp_path, monkeypatch, world, text, said):
    """runtime.lost_process on the errors torch's gloo raises (the end-to-end runs above make them for real)."""
    from preftune import runtime

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(runtime, "latest_checkpoint", lambda out: out / "checkpoint-4")  # (checkpoints' business)
    cfg = from_dict({"model_name_or_path": str(tmp_path / "absent"), "dataset": "x.jsonl", "ddp_timeout": 20,
                     "output_dir": str(tmp_path / "out")})
    lost = runtime.lost_process(RuntimeError(text), cfg)
    if said is None:
        assert lost is None
        return
    message = str(lost)
    assert message.startswith(f"process 0 of {world} stopped: {said}") and "\n" not in message
    assert message.endswith(f"the last checkpoint is {tmp_path / 'out' / 'checkpoint-4'} (resume_from_checkpoint: "
                            f"true continues from it, with {world} processes again)")
