"""Every GPU check in one run, each step timed out on its own, and one markdown report of the figures.

    bash benchmarks/gpu_check.sh              # on a CUDA machine: about 7.5 minutes on one H100/H200
    bash benchmarks/gpu_check.sh --smoke      # anywhere, on CPU: tiny sizes, the same steps, a few minutes

gpu_check.sh prepares the environment (wheels from .whl/, PYTHONPATH) and runs this file; run it
through the script. The steps, most important first (on CPU a step that needs CUDA prints a
'skipped: no CUDA' row; on a GPU a step left without time prints 'skipped: time budget'; the smoke
run has no time budget and runs every step):

  a1, a2  bf16 DPO, preftune vs TRL at equal settings (benchmarks/bench_dpo.py, one child process per
          framework) on Qwen2.5-0.5B's and Qwen2.5-1.5B's shapes: tokens/s, peak GPU memory, MFU
  d       QLoRA (finetuning_type lora, quantization_bit 4) on the 0.5B shape: tokens/s, peak memory,
          finite loss, adapter written
  b       padding_free on vs off (preftune, 0.5B, sdpa)
  c       sdpa vs flash_attention_2, padded and padding-free, where flash_attn is installed
  i       activation_offloading vs none, both with gradient checkpointing (preftune, 0.5B): peak memory,
          tokens/s (smoke: the offloaded run alone; nothing to offload on a CPU)
  e1      two processes (`torchrun --nproc_per_node 2 -m preftune train`) where there are 2+ GPUs
  e2      `accelerate launch` with an FSDP2 config, 2 steps, one process per GPU (smoke: 2 CPU
          processes): the row says over how many processes preftune sharded the policy and reference
  e3      `accelerate launch` with a DeepSpeed ZeRO-3 config (examples/accelerate/zero3.yaml's settings),
          2 steps, one process per GPU (smoke: 2 CPU processes): the row says over how many processes
          ZeRO-3 partitioned the policy and the reference
  f       fp16 autocast with accelerate's GradScaler on the tiny model: 6 steps, finite losses, scaler.json in
          the checkpoints, and a run stopped after its step-3 checkpoint and resumed ends as the uninterrupted
          one (rows, weights, the scaler's state) (smoke: preftune refuses fp16 on a CPU, so a CPU GradScaler
          under float16 autocast stands in, as tests/test_fp16.py)
  g       Liger: enable_liger_kernel vs the plain path on the tiny model, 4 steps in float32: Liger's Triton
          layer kernels applied on CUDA and the losses equal within 1e-3 (smoke: its fused DPO loss only)
  h       vLLM: `preftune sample --infer_backend vllm` on the 0.5B shape: every prompt gets its scored
          candidates (skipped, 'not installed', where vllm is absent: its wheel is not carried)
  a3      precomputed reference log-probs on the 1.5B shape (MFU at 6N)
  c2      exploratory: padding_free with flex_attention (compiled kernels) on the 0.5B shape

With one GPU, e1 is skipped and e2/e3 run one process over NCCL: they prove the FSDP2 and ZeRO-3 engines'
code paths run on CUDA (wrapping, gathers, saves), not that anything is split across devices.

Every step runs under `timeout`; a failing step is recorded as failed with its error's last line and
the run goes on. The report (the machine, the versions, the figures' tables, then the steps' table)
goes to $OUT/gpu_check.md when OUT is set (a remote runner collects what is written there; with
gpu_check.json, the raw figures, and gpu_check_logs.tar.gz, every log),
else to benchmarks/_work/gpu_check.md; the console ends with the steps' table: step, what it proves,
passed/failed/skipped (with the result or the reason), seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BENCH = HERE / "bench_dpo.py"
RESERVE_S = 10  # kept back from the budget for the report (and, per run, the grace before SIGKILL)
MIN_RUN_S = 25  # a run with less time than this left is skipped, not started (GPU runs: smoke runs have no budget)
TARGETS = {"tokens": 1.5, "memory": 0.6, "mfu": 0.35}  # preftune/TRL tokens/s >=, peak memory <=, MFU at 1.5B >=

# bench_dpo.py sizes of each model's runs (both frameworks of a comparison use the same); "pairs" and "seq-len"
# make the data, so the runs that share a model keep the same --pairs and --seq-len (the assets are cached by them)
SIZES = {
    "qwen2.5-0.5b": {"batch-size": 16, "seq-len": 1024, "steps": 10, "warmup-steps": 3, "pairs": 160},
    "qwen2.5-1.5b": {"batch-size": 8, "seq-len": 1024, "steps": 10, "warmup-steps": 3, "pairs": 80},
    "qlora": {"batch-size": 16, "seq-len": 1024, "steps": 8, "warmup-steps": 3, "pairs": 160},  # the 0.5B's data
    "tiny": {"batch-size": 2, "seq-len": 64, "steps": 3, "warmup-steps": 1, "pairs": 6},  # and every smoke run
}
# seconds a run may take at most on the GPU (the budget may leave less); smoke runs get SMOKE_CAP_S
CAPS = {"assets": 120, "bench": 180, "bench_small": 130, "qlora": 150, "launch": 150, "sharded": 90, "child": 90,
        "vllm": 150}
SMOKE_CAP_S = 900  # a smoke run takes seconds; this only stops a hung one (generous: a loaded CPU is slow)
FP16_TOLERANCE = 1e-4  # step f on CUDA: resumed vs uninterrupted (rows, weights; a CUDA run need not be bitwise)
LIGER_TOLERANCE = 1e-3  # step g: loss with vs without Liger, float32
SMOKE_PEAK_TFLOPS = 1.0  # a nominal CPU "peak" so that the smoke run goes through the MFU code too


class StepFailed(Exception):
    """A step's command failed; the message is the line the report shows."""


class Skipped(Exception):
    """A step that did not run; the message says why."""


class Check:
    """Runs the steps, each command under `timeout`, within one time budget (on a GPU)."""

    def __init__(self, args):
        self.args = args
        self.smoke = args.smoke
        self.python = args.python
        self.start = args.start or time.time()
        self.deadline = self.start + args.budget
        self.work = Path(args.work)
        self.logs = self.work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {}
        self.steps: list[dict] = []
        self.results: dict[str, dict] = {}  # run name -> bench JSON (or launch outcome)

    # -- running ----------------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.deadline - time.time()

    def run(self, name: str, cmd: list[str], cap: float, env: dict | None = None, need: float = MIN_RUN_S,
            grace: int = 10) -> str:
        """Run cmd under `timeout`, output to logs/<name>.log; returns the log text, raises StepFailed.
        On a GPU, with less than `need` seconds left in the budget the run is skipped rather than cut short.
        The smoke run has no budget: it checks that every step's command runs, so every step runs whatever
        the time (a loaded machine is slow, not wrong), each under SMOKE_CAP_S, a guard against a hang. A run
        past its time gets SIGTERM, then SIGKILL `grace` seconds later (launchers need time to stop their
        workers, which run in sessions of their own)."""
        if self.smoke:
            limit = SMOKE_CAP_S
        else:
            limit = int(min(cap, self.remaining() - RESERVE_S - grace))
            if limit < need:
                raise Skipped(f"skipped: time budget ({max(0, self.remaining()):.0f} s left of "
                              f"{self.args.budget:.0f})")
        log_path = self.logs / f"{name}.log"
        shown = shlex.join(cmd)
        print(f"[gpu_check]   {name}: {shown if len(shown) < 400 else shown[:200] + ' ...'} (timeout {limit} s)",
              flush=True)
        t0 = time.time()
        with open(log_path, "w") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.run(["timeout", "-k", str(grace), str(limit), *cmd], stdout=log, stderr=subprocess.STDOUT,
                                  cwd=ROOT, env={**os.environ, **(env or {})})
        text = log_path.read_text(errors="replace")
        if proc.returncode in (124, 137):
            raise StepFailed(f"timed out after {time.time() - t0:.0f} s (log: {log_path.name})")
        if proc.returncode != 0:
            raise StepFailed(f"exit {proc.returncode}: {last_error(text)}")
        return text

    def sizes(self, arch: str, sizes: str | None = None) -> tuple[str, list[str]]:
        """The model a run uses (the tiny one in smoke mode) and its bench_dpo.py size flags."""
        arch = "tiny" if self.smoke else arch
        size = SIZES["tiny" if arch == "tiny" else sizes or arch]
        return arch, [x for k, v in size.items() for x in (f"--{k}", str(v))]

    def bench(self, name: str, arch: str, only: str, *extra: str, sizes: str | None = None, cap: str = "bench",
              need: float = MIN_RUN_S):
        """One framework of benchmarks/bench_dpo.py; returns its result dict (also kept in self.results)."""
        arch, size = self.sizes(arch, sizes)
        out = self.work / f"{name}.json"
        out.unlink(missing_ok=True)
        cmd = [self.python, str(BENCH), "--arch", arch, "--only", only, "--work", str(self.work / arch),
               "--run-name", name, "--json-out", str(out), "--quiet-wait", "0", "--repeats", "1", "--retries", "0",
               *size, *extra]
        peak = SMOKE_PEAK_TFLOPS if self.smoke else self.args.peak_tflops
        if peak:
            cmd += ["--peak-tflops", str(peak)]
        self.run(name, cmd, CAPS[cap], need=need)
        data = json.loads(out.read_text())
        result = {**data["results"][only], "assets": data["assets"], "peak_flops": data.get("peak_flops"),
                  "args": data["args"]}
        self.results[name] = result
        return result

    def assets(self, arch: str) -> dict:
        """The model and data of `arch` in its work folder (bench_dpo.py --assets-only; cached there)."""
        arch, size = self.sizes(arch)
        text = self.run(f"assets_{arch}", [self.python, str(BENCH), "--arch", arch, "--assets-only", "--work",
                                          str(self.work / arch), *size], CAPS["assets"])
        line = [x for x in text.splitlines() if x.startswith("BENCH_ASSETS ")][-1]
        return json.loads(line[len("BENCH_ASSETS "):])

    def step(self, sid: str, title: str, fn) -> None:
        """Run one step (`title`: what it proves): fn() returns (result line, data) or raises; its row is
        recorded whatever happens."""
        if self.args.steps and sid not in self.args.steps:
            row = {"id": sid, "proves": title, "status": "skipped", "result": "skipped: not selected (--steps)",
                   "seconds": 0.0}
        else:
            print(f"[gpu_check] {sid}: {title} ...", flush=True)
            t0 = time.time()
            try:
                line, data = fn()
                status = "passed"
            except Skipped as e:
                status, line, data = "skipped", str(e), {}
            except StepFailed as e:
                status, line, data = "failed", str(e), {}
            except Exception as e:  # noqa: BLE001 - a bug in a step must not stop the others
                status, line, data = "failed", f"{type(e).__name__}: {e}".splitlines()[0], {}
            row = {"id": sid, "proves": title, "status": status, "result": line, "seconds": time.time() - t0,
                   "data": data}
        self.steps.append(row)
        status = "" if row["result"].startswith("skipped") else row["status"] + ": "
        print(f"[gpu_check] {sid}: {status}{row['result']} ({row['seconds']:.0f} s)", flush=True)

    def need_cuda(self) -> None:
        if not self.env.get("cuda"):
            raise Skipped("skipped: no CUDA")

    # -- the steps --------------------------------------------------------------------------------

    def compare(self, tag: str, arch: str, mfu_target: bool):
        """a1/a2: preftune vs TRL, bf16 autocast over fp32 weights, default (sdpa) attention, live reference."""
        failures = []
        for framework in ("preftune", "trl"):
            try:
                self.bench(f"{tag}_{framework}", arch, framework, "--bf16")
            except StepFailed as e:
                failures.append(f"{framework}: {e}")
        p, t = self.results.get(f"{tag}_preftune"), self.results.get(f"{tag}_trl")
        if p is None and t is None:
            raise StepFailed("; ".join(failures))
        line = comparison_line(p, t, mfu_target)
        if failures:
            raise StepFailed(line + "; FAILED " + "; ".join(failures))
        return line, {"preftune": tag + "_preftune", "trl": tag + "_trl"}

    def step_a1(self):
        self.assets("qwen2.5-0.5b")
        return self.compare("a1", "qwen2.5-0.5b", mfu_target=False)

    def step_a2(self):
        if self.smoke and "a1_preftune" in self.results and "a1_trl" in self.results:
            # smoke: a2's runs would be a1's, command for command (both shapes are the tiny model): its row is
            # formatted from them, which keeps the smoke run's time for the steps that check something else
            for framework in ("preftune", "trl"):
                self.results[f"a2_{framework}"] = self.results[f"a1_{framework}"]
            line = comparison_line(self.results["a2_preftune"], self.results["a2_trl"], mfu_target=True)
            return "smoke: a1's runs (the same tiny model): " + line, {"preftune": "a1_preftune", "trl": "a1_trl"}
        self.assets("qwen2.5-1.5b")
        return self.compare("a2", "qwen2.5-1.5b", mfu_target=True)

    def step_d(self):
        self.need_cuda()
        r = self.bench("d_qlora", "qwen2.5-0.5b", "preftune", "--bf16", "--dtype", "bfloat16", "--finetuning-type",
                       "lora", "--quantization-bit", "4", sizes="qlora", cap="qlora")
        finite = r.get("loss_mean") is not None and math.isfinite(r["loss_mean"])
        files = set(r.get("output_files", []))
        adapter = "adapter_model.safetensors" in files and "model.safetensors" not in files
        line = (f"{r['tokens_per_s']:.0f} tokens/s, peak {fmt_mem(r)}, MFU {fmt_pct(r.get('mfu'))} (6N), "
                f"loss {r.get('loss_mean')!s:.6} ({'finite' if finite else 'NOT finite'}), "
                f"{'adapter written' if adapter else 'NO adapter file: ' + ', '.join(sorted(files))}")
        if not (finite and adapter):
            raise StepFailed(line)
        return line, {"run": "d_qlora"}

    def step_b(self):
        base = self.results.get("a1_preftune")
        r = self.bench("b_padding_free", "qwen2.5-0.5b", "preftune", "--bf16", "--padding-free", cap="bench_small")
        line = f"padding-free {r['tokens_per_s']:.0f} tokens/s, peak {fmt_mem(r)}"
        if base:
            line += (f"; padded (a1) {base['tokens_per_s']:.0f} tokens/s, peak {fmt_mem(base)}: "
                     f"{ratio(r['tokens_per_s'], base['tokens_per_s'])} tokens/s, "
                     f"{ratio(mem(r), mem(base))} memory; mean loss {r['loss_mean']:.4f} vs {base['loss_mean']:.4f}")
        else:
            line += "; no padded run to compare (a1 failed)"
        return line, {"run": "b_padding_free", "base": "a1_preftune"}

    def step_i(self):
        """Activation offloading against none, both with gradient checkpointing (offloading then moves the
        checkpoints' inputs, what checkpointing leaves on the device): peak memory and tokens/s. On a CPU there
        is nothing to offload: the smoke mode runs the offloaded configuration alone, to check it runs."""
        flags = ("--bf16", "--gradient-checkpointing")
        r = self.bench("i_offload", "qwen2.5-0.5b", "preftune", *flags, "--activation-offloading", cap="bench_small")
        line = f"offloaded {r['tokens_per_s']:.0f} tokens/s, peak {fmt_mem(r)}"
        if not self.env.get("cuda"):
            return line + " (CPU: nothing to offload; it runs)", {"run": "i_offload"}
        base = self.bench("i_checkpointing", "qwen2.5-0.5b", "preftune", *flags, cap="bench_small")
        line += (f"; not offloaded {base['tokens_per_s']:.0f} tokens/s, peak {fmt_mem(base)}: "
                 f"{ratio(r['tokens_per_s'], base['tokens_per_s'])} tokens/s, {ratio(mem(r), mem(base))} memory; "
                 f"mean loss {r['loss_mean']:.4f} vs {base['loss_mean']:.4f}")
        return line, {"run": "i_offload", "base": "i_checkpointing"}

    def step_c(self):
        self.need_cuda()
        if not self.env.get("flash_attn"):
            raise Skipped("skipped: flash_attn is not installed (no wheel on PyPI: it builds from source against "
                          "the local torch and CUDA; carry a prebuilt wheel in .whl/ to measure it)")
        parts = []
        for name, extra, base in (("c_fa2", [], "a1_preftune"), ("c_fa2_padding_free", ["--padding-free"],
                                                                    "b_padding_free")):
            r = self.bench(name, "qwen2.5-0.5b", "preftune", "--bf16", "--attn", "flash_attention_2", *extra,
                           cap="bench_small")
            b = self.results.get(base)
            parts.append(f"{name[2:]}: {r['tokens_per_s']:.0f} tokens/s, peak {fmt_mem(r)}"
                         + (f" ({ratio(r['tokens_per_s'], b['tokens_per_s'])} of sdpa's {base})" if b else ""))
        return "; ".join(parts), {"runs": ["c_fa2", "c_fa2_padding_free"]}

    def train_config(self, assets: dict, name: str, steps: int, batch: int, extra: dict | None = None) -> Path:
        """A preftune train config on `assets`, for the launcher steps (JSON: preftune reads it as YAML's subset)."""
        cfg = {"model_name_or_path": assets["model_dir"], "dataset": assets["data"],
               "output_dir": str(self.work / f"out_{name}"), "overwrite_output_dir": True,
               "per_device_train_batch_size": batch, "max_steps": steps, "logging_steps": 1,
               "cutoff_len": assets["max_length"] + 8, "eval_strategy": "no", "plot_loss": False,
               "progress_bar": False, "bf16": True, "torch_dtype": "float32", "disable_dropout": True,
               "learning_rate": 1e-5, "template": "chatml", **(extra or {})}  # as bench_dpo renders the pairs
        path = self.work / f"{name}.json"
        path.write_text(json.dumps(cfg, indent=1))
        return path

    def launch_outcome(self, name: str, cmd: list[str], env: dict | None = None, cap: str = "launch"):
        """Run a launcher command; (its row, what it found)."""
        text = self.run(name, cmd, CAPS[cap], env=env, grace=40)  # torchrun gives its workers 30 s
        found = re.findall(r"processes: (\d+) \((\w+)\)", text)
        summary_path = self.work / f"out_{name}" / "dpo_metrics" / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        tps = summary.get("timings", {}).get("mean_tokens_per_second")
        line = (f"exit 0; preftune saw {found[-1][0]} process(es), accelerate type {found[-1][1]}" if found
                else "exit 0; no 'processes:' line in the log")
        shards = re.findall(r"fsdp: the (policy|reference) \(\w+\) sharded over (\d+) processes", text)
        zero = re.findall(r"deepspeed: the (policy) under ZeRO stage \d over (\d+) processes", text) + \
            re.findall(r"deepspeed: the (reference) \(\w+\) partitioned over (\d+) processes", text)
        if name.startswith("e2"):
            line += (f"; FSDP2 sharded {' and '.join(f'the {w} over {n}' for w, n in shards)} process(es)" if shards
                     else "; NOT sharded (no 'fsdp: ... sharded' line in the log)")
        elif name.startswith("e3"):
            line += (f"; ZeRO-3 partitioned {' and '.join(f'the {w} over {n}' for w, n in zero)} process(es)" if zero
                     else "; NOT partitioned (no 'deepspeed: ...' line in the log)")
        if tps:
            line += f"; {tps:.0f} tokens/s (preftune's own figure, all processes)"
        return line, {"processes": found[-1] if found else None, "summary": bool(summary)}

    def step_e1(self):
        if self.smoke:  # the same command over gloo: checks the launch line, not the GPUs
            assets, label = self.assets("tiny"), "smoke: 2 CPU processes over gloo; "
            env = {"OMP_NUM_THREADS": "1"}
        else:
            count = self.env.get("device_count", 0)
            if count < 2:
                raise Skipped(f"skipped: one GPU (torch.cuda.device_count() = {count}); needs 2 or more")
            assets, label, env = self.assets("qwen2.5-0.5b"), "", None
        cfg = self.train_config(assets, "e1_torchrun", steps=4, batch=2 if self.smoke else 8)
        line, data = self.launch_outcome("e1_torchrun", [self.python, "-m", "torch.distributed.run", "--standalone",
                                                         "--nproc_per_node", "2", "-m", "preftune", "train", str(cfg)],
                                         env)
        return label + line, data

    def step_e2(self):
        return self.sharded("e2_fsdp2", {
            "distributed_type": "FSDP",
            "fsdp_config": {"fsdp_version": 2, "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                            "fsdp_transformer_layer_cls_to_wrap": "Qwen2DecoderLayer",
                            "fsdp_reshard_after_forward": True, "fsdp_state_dict_type": "FULL_STATE_DICT",
                            "fsdp_cpu_ram_efficient_loading": False, "fsdp_offload_params": False,
                            "fsdp_activation_checkpointing": False},
        })

    def step_e3(self):
        if not self.env.get("deepspeed"):
            raise Skipped("skipped: deepspeed is not installed (bash benchmarks/fetch_wheels.sh builds its wheel)")
        return self.sharded("e3_zero3", {
            "distributed_type": "DEEPSPEED",
            "deepspeed_config": {"zero_stage": 3, "offload_optimizer_device": "none", "offload_param_device": "none",
                                 "zero3_init_flag": False, "zero3_save_16bit_model": True},
        })

    def sharded(self, name: str, engine: dict):
        """`accelerate launch` with a sharded-engine config around `preftune train`, 2 steps on the tiny model,
        one process per GPU (smoke: 2 CPU processes over gloo): the row says over how many processes FSDP2
        (e2, preftune/engines/fsdp.py) or ZeRO-3 (e3, preftune/engines/zero.py) sharded the policy and the reference."""
        processes = 2 if self.smoke else max(1, self.env.get("device_count", 1))
        config = {"compute_environment": "LOCAL_MACHINE", **engine, "mixed_precision": "bf16",
                  "num_machines": 1, "num_processes": processes, "machine_rank": 0, "main_training_function": "main",
                  "rdzv_backend": "static", "same_network": True, "use_cpu": False}
        config_path = self.work / f"{name}_accelerate.json"  # accelerate reads .json configs as JSON
        config_path.write_text(json.dumps(config, indent=1))
        cfg = self.train_config(self.assets("tiny"), name, steps=2, batch=2)
        line, data = self.launch_outcome(name, [self.python, "-m", "accelerate.commands.launch", "--config_file",
                                                str(config_path), "--main_process_port", str(free_port()), "-m", "preftune",
                                                "train", str(cfg)], {"OMP_NUM_THREADS": "1"} if self.smoke else None,
                                         cap="sharded")
        label = f"{processes} process(es)" + (" (smoke: CPU, gloo)" if self.smoke else "")
        if processes == 1:  # NCCL takes one process per GPU: a second on the same device is refused
            label += (" on one GPU over NCCL (the engine's code path on CUDA; nothing is split across devices: "
                      "that needs 2+ GPUs)")
        return f"{label}: {line}", data

    def step_a3(self):
        r = self.bench("a3_precompute", "qwen2.5-1.5b", "preftune", "--bf16", "--precompute")
        base = self.results.get("a2_preftune")
        line = f"{r['tokens_per_s']:.0f} tokens/s, peak {fmt_mem(r)}, MFU {fmt_pct(r.get('mfu'))} (6N)"
        if base:
            line += (f"; live reference (a2): {base['tokens_per_s']:.0f} tokens/s, peak {fmt_mem(base)}, "
                     f"MFU {fmt_pct(base.get('mfu'))} (8N)")
        return line, {"run": "a3_precompute", "base": "a2_preftune"}

    def step_c2(self):
        self.need_cuda()
        r = self.bench("c2_flex_padding_free", "qwen2.5-0.5b", "preftune", "--bf16", "--padding-free", "--attn",
                       "flex_attention", cap="bench", need=90)  # compiling the kernels alone takes a while
        base = self.results.get("b_padding_free")
        line = f"flex_attention padding-free {r['tokens_per_s']:.0f} tokens/s, peak {fmt_mem(r)}"
        if base:
            line += f" ({ratio(r['tokens_per_s'], base['tokens_per_s'])} of sdpa padding-free)"
        return line + " (exploratory: compile time falls in the warm-up steps)", {"run": "c2_flex_padding_free"}

    def child(self, name: str, kind: str, cfg: Path, stand_in: bool = False) -> dict:
        """One of this file's children (--child fp16|liger) on a train config; its GPU_CHECK_RESULT dict."""
        out = self.work / f"out_{name}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [self.python, str(Path(__file__).resolve()), "--child", kind, "--child-config", str(cfg),
               "--work", str(out)] + (["--stand-in"] if stand_in else [])
        text = self.run(name, cmd, CAPS["child"])
        lines = [x for x in text.splitlines() if x.startswith(CHILD_MARK)]
        if not lines:
            raise StepFailed(f"no {CHILD_MARK.strip()} line: {last_error(text)}")
        self.results[name] = json.loads(lines[-1][len(CHILD_MARK):])
        return self.results[name]

    def step_f(self):
        stand_in = not self.env.get("cuda")
        cfg = self.train_config(self.assets("tiny"), "f_fp16", steps=6, batch=2)
        r = self.child("f_fp16", "fp16", cfg, stand_in=stand_in)
        tolerance = 0.0 if stand_in else FP16_TOLERANCE  # one CPU process is bitwise; CUDA's atomics need not be
        line = (("smoke: a CPU GradScaler under float16 autocast stands in (preftune refuses fp16 on a CPU); "
                 if stand_in else "")
                + f"losses {', '.join(f'{x:.4f}' for x in r['losses'])} "
                + f"({'finite' if r['loss_finite'] else 'NOT finite'}), {r['overflow_steps']} of 6 steps skipped by "
                f"the scaler; scaler.json at step 3: scale {r['checkpoint_scale']}; resumed from step "
                f"{r['resumed_step']}: rows max diff {r['rows_max_diff']:.2g}, weights {r['weights_max_diff']:.2g} "
                f"(tolerance {tolerance:g}), scaler state {'equal' if r['scaler_equal'] else 'DIFFERENT'}")
        ok = (r["loss_finite"] and r["resumed_step"] == 3 and r["scaler_equal"] and r["checkpoint_scale"] is not None
              and r["rows_max_diff"] <= tolerance and r["weights_max_diff"] <= tolerance)
        if not ok:
            raise StepFailed(line)
        return line, {"run": "f_fp16"}

    def step_g(self):
        if not self.env.get("liger_kernel"):
            raise Skipped("skipped: liger-kernel is not installed (bash benchmarks/fetch_wheels.sh carries its wheel)")
        cfg = self.train_config(self.assets("tiny"), "g_liger", steps=4, batch=2)
        r = self.child("g_liger", "liger", cfg)
        line = (f"losses without / with enable_liger_kernel: max diff {r['loss_max_diff']:.2g} over 4 steps "
                f"(tolerance {LIGER_TOLERANCE:g}); " + ("Liger's Triton layer kernels applied" if r["kernels_applied"]
                                                         else f"smoke: {r['message']}" if self.smoke
                                                         else f"Triton layer kernels NOT applied: {r['message']}"))
        if r["loss_max_diff"] > LIGER_TOLERANCE or (self.env.get("cuda") and not r["kernels_applied"]):
            raise StepFailed(line)
        return line, {"run": "g_liger"}

    def step_h(self):
        if not self.env.get("vllm"):
            raise Skipped("skipped: vllm is not installed (not carried in .whl/: its wheels are ~400 MiB and pin "
                          "their own torch; install it on the GPU machine to check this)")
        self.need_cuda()
        assets = self.assets("qwen2.5-0.5b")
        folder = self.work / "h_vllm"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        rows = [json.loads(x) for x in Path(assets["data"]).read_text().splitlines()[:8]]
        (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
        (folder / "rewards.py").write_text("def length(prompts, completions):\n"
                                           "    return [float(len(c)) for c in completions]\n")
        out = folder / "out"
        self.run("h_vllm", [self.python, "-m", "preftune", "sample", "--model_name_or_path", assets["model_dir"],
                            "--dataset", str(folder / "prompts.jsonl"), "--template", "chatml", "--num_samples", "2",
                            "--max_new_tokens", "32", "--infer_backend", "vllm", "--vllm_enforce_eager", "true",
                            "--vllm_gpu_util", "0.3", "--reward", f"{folder / 'rewards.py'}:length",
                            "--output_dir", str(out)], CAPS["vllm"], need=60)
        summary = json.loads((out / "summary.json").read_text())
        records = [json.loads(x) for x in (out / "samples.jsonl").read_text().split("\n") if x.strip()]
        complete = len(records) == len(rows) and all(len(r["completions"]) == 2 for r in records)
        line = (f"backend {summary.get('backend')}: {len(records)} of {len(rows)} prompts with 2 scored candidates "
                f"each{'' if complete else ' (INCOMPLETE)'}")
        if not complete or summary.get("backend") != "vllm":
            raise StepFailed(line)
        return line, {"run": "h_vllm"}

    # -- the whole run ----------------------------------------------------------------------------

    def probe(self) -> None:
        """Versions and the device, from a child process: a broken torch still leaves a report."""
        code = r'''
import importlib.metadata as md, importlib.util, json, os, platform, subprocess
out = {"python": platform.python_version(), "cpus": os.cpu_count()}
for dist in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "flash_attn",
             "deepspeed", "tokenizers", "safetensors", "liger_kernel", "triton", "vllm"):
    try:
        out[dist + "_version"] = md.version(dist)
    except md.PackageNotFoundError:
        out[dist + "_version"] = None
out["flash_attn"] = importlib.util.find_spec("flash_attn") is not None
out["deepspeed"] = importlib.util.find_spec("deepspeed") is not None
out["liger_kernel"] = importlib.util.find_spec("liger_kernel") is not None
out["vllm"] = importlib.util.find_spec("vllm") is not None
try:
    import torch
    out["cuda"] = torch.cuda.is_available()
    out["device_count"] = torch.cuda.device_count() if out["cuda"] else 0
    out["torch_cuda"] = torch.version.cuda
    if out["cuda"]:
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=p.total_memory / 2**30)
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.split()[0]
        except Exception:
            out["driver"] = None
except Exception as e:
    out["error"] = f"torch: {type(e).__name__}: {e}".splitlines()[0]
for mod in ("trl", "preftune"):
    try:
        __import__(mod)
        out[mod + "_imports"] = True
    except Exception as e:
        out[mod + "_imports"] = f"{type(e).__name__}: {e}".splitlines()[0]
print("PROBE " + json.dumps(out))
'''
        try:
            text = self.run("probe", [self.python, "-c", code], cap=120, need=5)
            self.env = json.loads([x for x in text.splitlines() if x.startswith("PROBE ")][-1][6:])
        except (StepFailed, Skipped, IndexError) as e:
            self.env = {"error": str(e)}
        try:
            self.env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                                text=True, timeout=10).stdout.strip() or None
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            if self.env["commit"] and dirty:
                self.env["commit"] += " (with uncommitted changes)"
        except (OSError, subprocess.SubprocessError):
            self.env["commit"] = None

    def main(self) -> int:
        self.probe()
        if not self.smoke and not self.env.get("cuda"):
            print("[gpu_check] no CUDA device: running the smoke sizes", flush=True)
            self.smoke = True
        for sid, proves, fn in (
                ("a1", "bf16 DPO at the Qwen2.5-0.5B shape: preftune's tokens/s, memory, MFU against TRL's",
                 self.step_a1),
                ("a2", "the same at the 1.5B shape, with the MFU target", self.step_a2),
                ("d", "QLoRA: CUDA bitsandbytes 4-bit weights train (finite loss) and save an adapter", self.step_d),
                ("f", "fp16: autocast + GradScaler train finite; scaler.json saved; a resume ends as uninterrupted",
                 self.step_f),
                ("g", "Liger: its Triton kernels apply on CUDA, with the plain path's losses", self.step_g),
                ("b", "padding_free runs; its speed and memory against padded (a1)", self.step_b),
                ("c", "flash_attention_2 runs, padded and padding-free; its speed against sdpa", self.step_c),
                ("i", "activation_offloading: peak memory and speed against none (both gradient checkpointing)",
                 self.step_i),
                ("e1", "DDP: torchrun with 2 processes over NCCL (2+ GPUs)", self.step_e1),
                ("e2", "FSDP2: accelerate launch (examples/accelerate/fsdp2.yaml's settings) runs preftune's FSDP2 "
                       "engine on NCCL, sharded over the processes", self.step_e2),
                ("e3", "ZeRO-3: accelerate launch (examples/accelerate/zero3.yaml's settings) runs preftune's ZeRO "
                       "engine on NCCL, partitioned over the processes", self.step_e3),
                ("h", "vLLM: preftune sample --infer_backend vllm generates and scores every prompt", self.step_h),
                ("a3", "precomputed reference at the 1.5B shape: tokens/s, MFU (6N)", self.step_a3),
                ("c2", "exploratory: flex_attention compiles and runs padding-free", self.step_c2)):
            self.step(sid, proves, fn)
        text = report(self)
        out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else self.work.parent
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_check.md").write_text(text)
        (out_dir / "gpu_check.json").write_text(json.dumps({"env": self.env, "steps": self.steps,
                                                            "results": self.results}, indent=1, default=str))
        with tarfile.open(out_dir / "gpu_check_logs.tar.gz", "w:gz") as tar:
            for log in sorted(self.work.glob("*/*.log")):  # logs/ and each model's bench child logs
                tar.add(log, arcname=str(log.relative_to(self.work)))
        print(f"\n[gpu_check] report: {out_dir / 'gpu_check.md'} (the figures' tables; raw: gpu_check.json, logs: "
              "gpu_check_logs.tar.gz)\n")
        print(steps_table(self))
        failed = [s["id"] for s in self.steps if s["status"] == "failed"]
        print(f"\n[gpu_check] {len(self.steps) - len(failed)} of {len(self.steps)} steps without failure"
              + (f"; failed: {', '.join(failed)}" if failed else "") + f"; {time.time() - self.start:.0f} s in all")
        return 0


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------

NOISE = re.compile(r"^(W\d{4} |Failed to load .*torchao|\s*warnings\.warn|Writing model shards)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def last_error(text: str) -> str:
    """The line of a log that says what went wrong: the last exception or error line, else the last line."""
    lines = [x.strip() for x in text.splitlines() if x.strip() and not NOISE.match(x)]
    for line in reversed(lines):
        if re.search(r"(Error|Exception|error:|Killed|out of memory)", line):
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def mem(r: dict) -> float:
    """Peak memory of a run in MiB: GPU (torch.cuda.max_memory_allocated) on CUDA, else the child's peak RSS."""
    return r["cuda_peak_mib"] if r.get("cuda_peak_mib") is not None else r["peak_rss_mib"]


def fmt_mem(r: dict) -> str:
    if r.get("cuda_peak_mib") is not None:
        return f"{r['cuda_peak_mib'] / 1024:.1f} GiB"
    return f"{r['peak_rss_mib']:.0f} MiB RSS"


def millions(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 1e8 else f"{n / 1e6:.2g}M"


def fmt_pct(x) -> str:
    return "-" if x is None else f"{x:.1%}"


def ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def verdict(value, target, at_least: bool) -> str:
    if value is None:
        return "unknown"
    return "met" if (value >= target if at_least else value <= target) else "NOT met"


def comparison_line(p: dict | None, t: dict | None, mfu_target: bool) -> str:
    if p is None or t is None:
        r, name = (p, "preftune") if p else (t, "TRL")
        return f"{name} only: {r['tokens_per_s']:.0f} tokens/s, peak {fmt_mem(r)}, MFU {fmt_pct(r.get('mfu'))}"
    tok, memory = p["tokens_per_s"] / t["tokens_per_s"], mem(p) / mem(t)
    line = (f"tokens/s {p['tokens_per_s']:.0f} vs TRL {t['tokens_per_s']:.0f} = {tok:.2f}x "
            f"(target >= {TARGETS['tokens']}x: {verdict(tok, TARGETS['tokens'], True)}); "
            f"peak {fmt_mem(p)} vs {fmt_mem(t)} = {memory:.2f}x "
            f"(target <= {TARGETS['memory']}x: {verdict(memory, TARGETS['memory'], False)}); "
            f"MFU {fmt_pct(p.get('mfu'))} vs {fmt_pct(t.get('mfu'))}")
    if mfu_target:
        line += f" (target >= {TARGETS['mfu']:.0%}: {verdict(p.get('mfu'), TARGETS['mfu'], True)})"
    return line


def settings_line(r: dict) -> str:
    a, s = r["args"], r["assets"]
    tuning = "" if a["finetuning_type"] == "full" else ", " + a["finetuning_type"]
    if a["quantization_bit"]:
        tuning += f" on {a['quantization_bit']}-bit weights"
    return (f"{s['arch']} ({millions(s['params'])} parameters, N = {millions(s['flops_params'])}), "
            f"{a['dtype']} weights{', bf16 autocast' if a['bf16'] else ''}, attention {a['attn'] or 'sdpa (default)'}"
            f"{', padding-free' if a['padding_free'] else ''}{', precomputed reference' if a['precompute'] else ''}"
            f"{tuning}; "
            f"batch {a['batch_size']} pairs, {a['steps']} steps ({a['warmup_steps']} warm-up, not timed); "
            f"{s['pairs']} pairs of {s['seq_len_min']}-{s['seq_len_max']} tokens (mean {s['seq_len_mean']:.0f})")


ROWS = [  # (label, key of a bench result, format); the last column divides the first two runs' values
    ("tokens/s (non-padding)", "tokens_per_s", "{:.0f}"),
    ("padded tokens/s", "padded_tokens_per_s", "{:.0f}"),
    ("pairs/s", "pairs_per_s", "{:.2f}"),
    ("peak GPU memory, max_memory_allocated (GiB)", "cuda_peak_gib", "{:.2f}"),
    ("peak RSS, whole child (MiB)", "peak_rss_mib", "{:.0f}"),
    ("MFU", "mfu", "{:.1%}"),
    ("model FLOPs per token (GFLOP)", "gflops_per_token", "{:.2f}"),
    ("timed steps", "timed_steps", "{}"),
    ("timed seconds", "seconds", "{:.2f}"),
    ("mean train loss", "loss_mean", "{:.4f}"),
]
NO_RATIO = ("mfu", "gflops_per_token", "timed_steps", "seconds", "loss_mean")


def table(runs: dict[str, dict | None], ratio_of: tuple[str, str] | None = None) -> str:
    """A metric x run table; with ratio_of=(a, b), a column a / b."""
    names = list(runs)
    head = "| metric | " + " | ".join(names) + (f" | {ratio_of[0]} / {ratio_of[1]} |" if ratio_of else " |")
    lines = [head, "|---|" + "---:|" * (len(names) + bool(ratio_of))]
    for label, key, fmt in ROWS:
        values = {}
        for n, r in runs.items():
            r = dict(r or {})
            if r.get("cuda_peak_mib") is not None:
                r["cuda_peak_gib"] = r["cuda_peak_mib"] / 1024
            if r.get("model_flops_per_token"):
                r["gflops_per_token"] = r["model_flops_per_token"] / 1e9
            values[n] = r.get(key)
        if all(v is None for v in values.values()):
            continue
        cells = ["-" if values[n] is None else fmt.format(values[n]) for n in names]
        extra = ""
        if ratio_of:
            a, b = values[ratio_of[0]], values[ratio_of[1]]
            extra = f" {a / b:.2f}x |" if key not in NO_RATIO and a is not None and b else " |"
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + extra)
    return "\n".join(lines)


def report(check: Check) -> str:
    env, smoke = check.env, check.smoke
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    title = ("GPU check: SMOKE (CPU, tiny sizes): numbers are meaningless" if smoke
             else f"GPU check: {env.get('device', 'unknown device')}")
    if env.get("cuda"):
        machine = (f"{env['device']} x {env['device_count']} ({env['memory_gib']:.0f} GiB, compute capability "
                   f"{env['capability']}), driver {env.get('driver') or 'unknown'}, CUDA {env.get('torch_cuda')} "
                   f"(torch's build), {env.get('cpus')} CPUs")
    else:
        machine = f"no CUDA device, {env.get('cpus')} CPUs"
    peak = next((r["peak_flops"] for r in check.results.values() if r.get("peak_flops")), None)
    versions = ", ".join(f"{d} {env.get(d + '_version')}" for d in ("torch", "transformers", "trl", "peft",
                                                                       "accelerate", "datasets", "bitsandbytes"))
    command = os.environ.get("GPU_CHECK_COMMAND") or "bash benchmarks/gpu_check.sh"
    out = [f"## {title} ({date})", "", "Command (from the repository root):", "", f"    {command}", ""]
    if smoke:
        out += ["**SMOKE (CPU, tiny sizes): numbers are meaningless.** This run only checks that every step's "
                "command runs; the steps that need CUDA print `skipped: no CUDA`.", ""]
    if env.get("error"):
        out += [f"**The environment probe failed:** {env['error']}", ""]
    for mod in ("trl", "preftune"):
        if isinstance(env.get(mod + "_imports"), str):
            out += [f"**`import {mod}` failed:** {env[mod + '_imports']}", ""]
    out += [f"- **Machine:** {machine}.",
            f"- **Versions:** Python {env.get('python')}, {versions}; "
            f"preftune at commit {env.get('commit') or 'unknown'}.",
            f"- **Wall time:** {time.time() - check.start:.0f} s"
            + (" (smoke: no time budget)." if smoke else f" of a {check.args.budget:.0f} s budget."),
            "- **MFU** = model FLOP/s / peak dense bf16 FLOP/s"
            + (f" ({peak / 1e12:.0f} TFLOP/s{', a nominal figure for the smoke run' if smoke else ''})" if peak
               else " (peak unknown for this device: pass --peak-tflops)")
            + ". Model FLOPs per trained non-padding token: 8N with a live reference (policy forward + backward 6N, "
            "reference forward 2N), 6N with precomputed reference log-probs; QLoRA 6N (frozen base: backward 2N, "
            "adapter-off reference 2N). N = the parameters without the input embedding, plus the LM head "
            "(vocabulary x hidden, once even where tied), the usual convention; attention's own FLOPs are "
            "left out. Padding tokens are not counted, so MFU is the useful work.",
            f"- **Targets:** preftune >= {TARGETS['tokens']}x TRL's tokens/s, <= {TARGETS['memory']}x TRL's peak "
            f"memory, >= {TARGETS['mfu']:.0%} MFU at 1.5B."]
    r = check.results
    for tag, label in (("a1", "Qwen2.5-0.5B shape"), ("a2", "Qwen2.5-1.5B shape")):
        p, t = r.get(f"{tag}_preftune"), r.get(f"{tag}_trl")
        if p or t:
            out += ["", f"### {tag}: preftune vs TRL, {label}", "", f"Settings: {settings_line(p or t)}.", "",
                    table({"preftune": p, "TRL": t}, ("preftune", "TRL") if p and t else None)]
    extra = {name: r[name] for name in ("a1_preftune", "b_padding_free", "c_fa2", "c_fa2_padding_free",
                                         "c2_flex_padding_free", "d_qlora") if name in r}
    if len(extra) > 1 or (extra and "a1_preftune" not in extra):
        out += ["", "### b, c, d: preftune alone on the 0.5B shape", ""]
        out += [f"- `{name}`: {settings_line(x)}" for name, x in extra.items()]
        out += ["", table(extra)]
    if "a3_precompute" in r:
        runs = {name: r[name] for name in ("a2_preftune", "a3_precompute") if name in r}
        out += ["", "### a3: live vs precomputed reference, 1.5B shape (preftune)", "",
                f"Settings: {settings_line(r['a3_precompute'])}.", "", table(runs)]
    failed = [s for s in check.steps if s["status"] == "failed"]
    if failed:
        out += ["", "### Failures", ""]
        for s in failed:
            out.append(f"- **{s['id']}**: {s['result']} (logs in gpu_check_logs.tar.gz)")
    out += ["", "### Steps", "", steps_table(check)]
    return "\n".join(out) + "\n"


def steps_table(check: Check) -> str:
    """The one table a run ends with: a row per step."""
    lines = ["| step | what it proves | status | result | seconds |", "|---|---|---|---|---:|"]
    for s in check.steps:
        result = s["result"].replace("|", "/")
        lines.append(f"| {s['id']} | {s['proves']} | {s['status']} | {result} | {s['seconds']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes (automatic without a CUDA device)")
    p.add_argument("--budget", type=float, default=450.0,
                   help="seconds for the whole GPU run, from --start (default 450); a smoke run has no budget")
    p.add_argument("--start", type=float, default=None, help="epoch seconds the run started (gpu_check.sh's start)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense bf16 TFLOP/s for the MFU (default: from the device name, H100/H200 989, A100 312)")
    p.add_argument("--steps", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], default=None,
                   help="comma list of step ids to run (a1,a2,d,f,g,b,c,e1,e2,e3,h,a3,c2); the others print a "
                        "skipped row")
    p.add_argument("--work", default=str(HERE / "_work" / "gpu_check"), help="work folder (models, data, logs)")
    p.add_argument("--python", default=sys.executable, help="the Python that runs the steps")
    p.add_argument("--child", choices=["fp16", "liger"], help=argparse.SUPPRESS)  # steps f and g's child process
    p.add_argument("--child-config", help=argparse.SUPPRESS)
    p.add_argument("--stand-in", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# children: steps f (fp16) and g (Liger) train in one child process each, with preftune in-process
# ------------------------------------------------------------------------------------------------

CHILD_MARK = "GPU_CHECK_RESULT "
FP16_STAND_IN_SCALE = 2.0 ** 20  # the CPU stand-in's first scale: on the tiny model some steps overflow, some do not


def _rows(out: Path) -> list[dict]:
    """A run's log_history.json rows without the wall-clock columns."""
    rows = json.loads((out / "dpo_metrics" / "log_history.json").read_text())
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows]


def _max_diff(a: list[dict], b: list[dict], keys=None) -> float:
    """The largest absolute difference between two runs' numbers, row by row (inf where the rows differ)."""
    if [r["step"] for r in a] != [r["step"] for r in b]:
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        for k in keys or set(x) | set(y):
            u, v = x.get(k), y.get(k)
            if isinstance(u, (int, float)) and isinstance(v, (int, float)):
                if not (math.isfinite(u) and math.isfinite(v)):
                    worst = max(worst, 0.0 if u == v or (u != u and v != v) else math.inf)
                else:
                    worst = max(worst, abs(u - v))
            elif u != v:
                return math.inf
    return worst


def child_fp16(cfg: dict, out: Path, stand_in: bool) -> dict:
    """fp16 autocast with accelerate's GradScaler: 6 steps uninterrupted (checkpoints at 3 and 6), then the same
    run stopped after its step-3 checkpoint and resumed; the two must agree (rows, weights, the scaler's state).
    stand_in (CPU, where preftune refuses fp16 and accelerate would leave it inert): accelerate's fp16 code
    driven by torch's CPU GradScaler under float16 autocast (tests/test_fp16.py does the same)."""
    import torch
    from safetensors.torch import load_file

    from preftune import checkpoints, engines, train as train_mod
    from preftune.config import from_dict

    made = []
    real_make = engines.make_accelerator

    def recorded(c, log_with=None, **kwargs):
        accelerator = real_make(c, log_with, **kwargs)
        if stand_in:
            accelerator.native_amp = True
            accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=FP16_STAND_IN_SCALE, growth_interval=2)
        made.append(accelerator)
        return accelerator

    engines.make_accelerator = recorded
    if stand_in:
        train_mod.check_hardware = lambda c: None
    cfg = {k: v for k, v in cfg.items() if k != "overwrite_output_dir"}  # the resume reads the stopped run's folder
    raw = {**cfg, "bf16": False, "fp16": True, "torch_dtype": "float32", "max_steps": 6, "save_steps": 3,
           "logging_steps": 1, "learning_rate": 1e-3}

    train_mod.train(from_dict({**raw, "output_dir": str(out / "uninterrupted")}))
    if made[-1].scaler is None:
        raise RuntimeError("fp16: accelerate built no GradScaler")
    scaler_a = made[-1].scaler.state_dict()

    class Stop(Exception):
        pass

    real_save = checkpoints.save_checkpoint

    def save_then_stop(*args):
        real_save(*args)
        raise Stop

    checkpoints.save_checkpoint = save_then_stop
    try:
        train_mod.train(from_dict({**raw, "output_dir": str(out / "resumed")}))
    except Stop:
        pass
    checkpoints.save_checkpoint = real_save
    saved = json.loads((out / "resumed" / "checkpoint-3" / "scaler.json").read_text())
    summary = train_mod.train(from_dict({**raw, "output_dir": str(out / "resumed"), "resume_from_checkpoint": True}))
    scaler_b = made[-1].scaler.state_dict()
    a, b = _rows(out / "uninterrupted"), _rows(out / "resumed")
    wa, wb = load_file(out / "uninterrupted" / "model.safetensors"), load_file(out / "resumed" / "model.safetensors")
    losses = [r["loss"] for r in a if "loss" in r]
    return {"resumed_step": (summary.get("resumed_from") or {}).get("step"), "checkpoint_scale": saved.get("scale"),
            "final_scale": scaler_a.get("scale"), "scaler_equal": scaler_a == scaler_b,
            "overflow_steps": 6 - len(losses), "losses": losses,
            "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses),
            "rows_max_diff": _max_diff(a, b),
            "weights_max_diff": max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
            if wa.keys() == wb.keys() else math.inf}


def child_liger(cfg: dict, out: Path) -> dict:
    """The same 4 steps (float32, no mixed precision) without and with enable_liger_kernel; Liger's own log line
    says whether its Triton layer kernels were applied (on CUDA) or only its fused DPO loss ran (CPU)."""
    import logging

    from preftune import train as train_mod
    from preftune.config import from_dict

    said = []

    class Keep(logging.Handler):
        def emit(self, record):
            if "enable_liger_kernel" in record.getMessage():
                said.append(record.getMessage())

    logging.getLogger("preftune").addHandler(Keep())
    logging.getLogger("preftune").setLevel(logging.INFO)  # models.py says which Liger parts ran at INFO
    raw = {**cfg, "bf16": False, "torch_dtype": "float32", "max_steps": 4, "logging_steps": 1,
           "learning_rate": 1e-3}
    train_mod.train(from_dict({**raw, "output_dir": str(out / "plain")}))
    train_mod.train(from_dict({**raw, "output_dir": str(out / "liger"), "enable_liger_kernel": True}))
    a, b = _rows(out / "plain"), _rows(out / "liger")
    return {"message": said[-1] if said else None, "kernels_applied": any("layer kernels applied" in m for m in said),
            "loss_max_diff": _max_diff(a, b, keys=("loss",)), "losses": [r.get("loss") for r in a],
            "liger_losses": [r.get("loss") for r in b]}


def child_main(args) -> int:
    cfg = json.loads(Path(args.child_config).read_text())
    out = Path(args.work)
    result = child_fp16(cfg, out, args.stand_in) if args.child == "fp16" else child_liger(cfg, out)
    print(CHILD_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    ARGS = parse_args()
    sys.exit(child_main(ARGS) if ARGS.child else Check(ARGS).main())
