"""The ways a run uses its processes: one class each, behind the one small surface the loop calls.

    check_hardware(cfg)                                   # the precision asked for, on this machine
    engine = make_engine(cfg, trackers)                   # which one, from the config and the launcher
    engine.check(cfg)                                     # what it cannot do: refused before any model loads
    policy_logps, optimizer = engine.prepare(LogpsModule(policy), make_optimizer, reference)
    with engine.accumulate(policy_logps, sync=last):      # one micro-batch: its forward, then
        engine.backward(policy_logps, loss)               #   its backward (synchronised on the last)
    grad_norm, stepped = engine.update(policy_logps, optimizer, max_grad_norm, skip)
    weights = engine.whole_weights(policy)                # collective: for a save (None: the model holds them)

    engine             runs when                                                 single.py's base, plus
    OneProcess         no launcher, or a launcher of one process                 -
    DataParallel       a launcher (accelerate launch, torchrun) of N processes    gradients averaged (DDP)
    FSDP2              fsdp: full_shard, or an accelerate FSDP2 config           weights, gradients, optimizer
                                                                                 state sharded (torch FSDP2)
    ZeRO               deepspeed: ds_z3_config.json, or an accelerate            DeepSpeed's engine (ZeRO 0-3)
                       DeepSpeed config

Each engine owns accelerate's Accelerator, so the device, mixed precision, the trackers and which
process writes come from it too (`engine.device`, `engine.autocast()`, `engine.is_main`). The loop, the
step, the losses and the log-prob code never name an engine: what they need of one (the LM heads
gathered for the KL, whether every process must take part in every forward) is handed to them.
Sharding asked for in a process no launcher started is said in a warning, and the run is plain.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs

from preftune.engines.ddp import DataParallel
from preftune.engines.fsdp import FSDP2, fsdp_settings, hidden_from_accelerate
from preftune.engines.single import OneProcess
from preftune.engines.zero import ZeRO, zero_settings
from preftune.errors import ConfigError

log = logging.getLogger("preftune")

__all__ = ["OneProcess", "DataParallel", "FSDP2", "ZeRO", "make_engine", "make_accelerator", "check_hardware",
           "process_group_kwargs"]


def make_engine(cfg, log_with: list | None = None) -> OneProcess:
    """The engine this process runs under: ZeRO or FSDP2 when the config (or an accelerate config) asks for
    them and a launcher started this process, else DDP over the launcher's processes, else one process.
    `log_with`: accelerate's trackers (tracking.make_trackers)."""
    zero = zero_settings(cfg)  # (a bad DeepSpeed config, or deepspeed beside fsdp, is refused here)
    fsdp = fsdp_settings(cfg)
    launched = "WORLD_SIZE" in os.environ
    if cfg.sequence_parallel_size > 1 and not (zero and launched):
        raise ConfigError(f"sequence_parallel_size: {cfg.sequence_parallel_size} splits each sequence over processes "
                          "through DeepSpeed's Ulysses attention, so it needs deepspeed (a ZeRO config) and a launcher "
                          "(accelerate launch / torchrun) of a multiple of that many processes; DDP and FSDP2 have no "
                          "sequence parallelism here")
    if (zero or fsdp) and not launched:
        log.warning("%s: this process was not started by a launcher (accelerate launch / torchrun), so there is "
                    "nothing to shard across; training unsharded", "deepspeed" if zero else "fsdp")
    elif zero:  # DeepSpeed needs the launcher's process group, even of one process
        return ZeRO(cfg, zero, log_with)
    accelerator = make_accelerator(cfg, log_with)
    if fsdp and launched and torch.distributed.is_available() and torch.distributed.is_initialized():
        return FSDP2(cfg, fsdp, accelerator)
    if fsdp and launched:
        log.warning("fsdp: accelerate started no process group here, so there is nothing to shard across; training "
                    "unsharded")
    return DataParallel(cfg, accelerator) if accelerator.num_processes > 1 else OneProcess(cfg, accelerator)


def make_accelerator(cfg, log_with: list | None = None, **kwargs) -> Accelerator:
    """accelerate's Accelerator for cfg's mixed precision (and, under torchrun without a GPU, gloo);
    `kwargs`: the engine's own (ZeRO's DeepSpeed plugin)."""
    # accelerate keeps its state per process; a second train() in one process (a sweep, the tests)
    # may ask for another precision, so the mixed-precision part is reset, not the distributed one
    AcceleratorState._reset_state(reset_partial_state=False)
    # accelerate starts a CPU process group (gloo) only when asked for the CPU: without a GPU, a
    # torchrun/accelerate launch with several processes would otherwise run N unrelated copies
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    deepspeed = kwargs.get("deepspeed_plugin") is not None
    cpu = several and not torch.cuda.is_available() and not deepspeed
    group = process_group_kwargs(cfg, deepspeed)
    try:
        with hidden_from_accelerate():  # an FSDP2 config is preftune's to apply (engines/fsdp.py)
            return Accelerator(mixed_precision=cfg.mixed_precision, log_with=log_with or None, cpu=cpu,
                               kwargs_handlers=[group] if group else None, **kwargs)
    except ValueError as e:  # e.g. fp16 where the hardware has no fp16 support
        raise ConfigError(f"mixed precision '{cfg.mixed_precision}': {str(e).splitlines()[0]}") from None


def process_group_kwargs(cfg, deepspeed: bool) -> InitProcessGroupKwargs | None:
    """How torch.distributed's process group is made, for accelerate to pass to init_process_group (or
    DeepSpeed's init_distributed): `ddp_timeout` seconds as the timeout of every collective, so a process
    that died or hangs stops the others within it (train.py says which, in one line) instead of never; and
    gloo for DeepSpeed on CPU processes (its CPU accelerator: accelerate finds no backend of its own there
    and would count one process; gloo, named, makes it count the launcher's). None: accelerate's defaults
    (torch's timeouts: 10 minutes for NCCL, 30 for gloo)."""
    kwargs = {}
    if deepspeed and not torch.cuda.is_available():
        kwargs["backend"] = "gloo"
    if cfg.ddp_timeout:
        # accelerate passes on only what differs from its own default (600 s, NCCL's), which gloo and
        # DeepSpeed do not share (30 minutes): 600 s is passed as a microsecond more
        kwargs["timeout"] = timedelta(seconds=cfg.ddp_timeout, microseconds=int(cfg.ddp_timeout == 600))
    return InitProcessGroupKwargs(**kwargs) if kwargs else None


def cpu_multiplies_bf16() -> bool:
    """Whether torch multiplies bfloat16 on this CPU with oneDNN's kernels, which need AVX-512 or AVX-NE-CONVERT
    (and honour ONEDNN_MAX_CPU_ISA). Without them a bf16 matmul takes ATen's fallback loop, 10-50x slower than
    float32 (benchmarks/RESULTS.md, CPU note 3)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def check_hardware(cfg) -> None:
    """fp16 and bf16 where the machine cannot run them: refused before anything loads, not left inert;
    bf16 where the CPU only emulates it: said once, since float32 is then the faster choice."""
    if cfg.fp16 and not torch.cuda.is_available():
        raise ConfigError("fp16: float16 mixed precision needs a CUDA GPU and this machine has none; remove fp16 "
                          "(bf16: true runs on CPUs)")
    if cfg.bf16 and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"bf16: {torch.cuda.get_device_name()} has no bfloat16 support; use fp16: true, or no "
                          "mixed precision")
    if cfg.bf16 and not torch.cuda.is_available() and not cpu_multiplies_bf16():
        log.warning("bf16: this CPU has no fast bfloat16 matmul (it needs AVX-512 or AVX-NE-CONVERT), so bf16 "
                    "autocast trains several times slower than float32 here; bf16: false is faster (docs/precision.md)")
