"""What keeps a running training loop honest: a non-finite step stops it (or is skipped, up to
`skip_nonfinite_steps`), SIGINT and SIGTERM stop it cleanly, and the hardware can do the precision asked.

    with StopSignals() as stop:          # train(): SIGINT/SIGTERM set a flag while the loop runs
        ...
        if guard.check(step, losses_finite, grad_norm):   # True: drop this step's gradients
            ...
        if stop.requested(accelerator):
            stop.stop(step, checkpoint, metrics)   # writes the checkpoint (when on), raises Stopped

A clean stop finishes the current optimizer step (its metrics are logged as usual), writes a
checkpoint when checkpointing is on (save_steps), and leaves the metric files up to the last logged
step; `resume_from_checkpoint: true` then continues to the numbers of an uninterrupted run
(docs/checkpoints.md). The CLI turns `Stopped` into exit status 130 (SIGINT) or 143 (SIGTERM), and
`NonFiniteStep` into one line and status 2.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs

from preftune import sharding, zero
from preftune.cache import data_fingerprint  # noqa: F401 - train.py calls runtime.data_fingerprint
from preftune.tracking import make_trackers
from preftune.checkpoints import latest_checkpoint
from preftune.errors import ConfigError, PreftuneError

log = logging.getLogger("preftune")


class Stopped(PreftuneError):
    """The run was stopped by a signal; exit_code 128 + the signal's number, as a shell reports it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class NonFiniteStep(PreftuneError):
    """A step's loss or gradient norm was NaN or infinite (and no skip was left)."""


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


def make_accelerator(cfg) -> Accelerator:
    """accelerate's Accelerator for cfg's mixed precision (and, under torchrun without a GPU, gloo)."""
    # accelerate keeps its state per process; a second train() in one process (a sweep, the tests)
    # may ask for another precision, so the mixed-precision part is reset, not the distributed one
    AcceleratorState._reset_state(reset_partial_state=False)
    # accelerate starts a CPU process group (gloo) only when asked for the CPU: without a GPU, a
    # torchrun/accelerate launch with several processes would otherwise run N unrelated copies
    world = int(os.environ.get("WORLD_SIZE", "1"))
    several = world > 1
    zero_settings = sharding.launched_zero(cfg)  # DeepSpeed ZeRO: accelerate's engine, with the run's values
    plugin = zero.make_plugin(cfg, zero_settings, world) if zero_settings else None
    # DeepSpeed on CPU processes (its CPU accelerator): accelerate finds no backend of its own there and
    # would count one process; gloo, named, makes it count the launcher's
    zero_cpu = [InitProcessGroupKwargs(backend="gloo")] if plugin and not torch.cuda.is_available() else None
    try:
        with sharding.hidden_from_accelerate():  # an FSDP2 config is preftune's to apply (sharding.py)
            return Accelerator(mixed_precision=cfg.mixed_precision, log_with=make_trackers(cfg) or None,
                               cpu=several and not torch.cuda.is_available() and plugin is None,
                               deepspeed_plugin=plugin, kwargs_handlers=zero_cpu)
    except ValueError as e:  # e.g. fp16 where the hardware has no fp16 support
        raise ConfigError(f"mixed precision '{cfg.mixed_precision}': {str(e).splitlines()[0]}") from None


def _last_checkpoint_text(cfg) -> str:
    found = latest_checkpoint(Path(cfg.output_dir))
    return (f"the last good checkpoint is {found} (resume_from_checkpoint: true continues from it)" if found
            else "no checkpoint was written (set save_steps to keep some)")


class NonFiniteGuard:
    """Checks every optimizer step's loss and gradient norm before the optimizer uses them.

    A non-finite step stops the run with one line naming the step and the likely cause, before the
    optimizer step: the weights (and any checkpoint) stay those of the last finite step, and no final
    model is written. With skip_nonfinite_steps: N the first N such steps are skipped instead: their
    gradients are dropped, the optimizer and the learning-rate schedule do not step (as transformers
    does for an fp16 overflow), their statistics are not logged; the step still counts (its data is
    consumed), and summary.json lists the skipped steps. With fp16 an infinite gradient norm is the
    loss scaler's business (it skips the update and lowers the scale), so only the loss is checked.
    """

    def __init__(self, cfg, accelerator, metrics):
        self.cfg, self.accelerator, self.metrics = cfg, accelerator, metrics
        self.skipped = metrics.skipped_steps  # summary.json: nonfinite_steps_skipped

    def check(self, step: int, losses_finite: torch.Tensor | bool, grad_norm) -> bool:
        """True when this step must be skipped (the caller calls `skip`); raises when none may be."""
        grad_norm = float(grad_norm)
        bad_loss = not bool(losses_finite)
        bad_grad = not math.isfinite(grad_norm) and self.accelerator.scaler is None
        flags = torch.tensor([float(bad_loss), float(bad_grad)], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:  # every process must take the same decision
            flags = self.accelerator.reduce(flags, reduction="sum")
        bad_loss, bad_grad = (bool(f) for f in flags.tolist())
        if not (bad_loss or bad_grad):
            return False
        what = "loss" if bad_loss else "gradient norm"
        value = "non-finite" if what == "loss" else grad_norm
        if len(self.skipped) < self.cfg.skip_nonfinite_steps:
            self.skipped.append(step)
            log.warning("step %d: the %s is %s; step skipped (%d of skip_nonfinite_steps: %d)", step, what, value,
                        len(self.skipped), self.cfg.skip_nonfinite_steps)
            return True
        message = (f"training stopped at step {step}: the {what} is {value} (NaN or infinite). Likely cause: "
                   f"{self.likely_cause(step)}. No final model was saved; {_last_checkpoint_text(self.cfg)}. "
                   "skip_nonfinite_steps: N skips up to N such steps")
        if self.accelerator.is_main_process:
            self.metrics.write_summary(status=f"failed: non-finite {what} at step {step}")
        raise NonFiniteStep(message)

    def likely_cause(self, step: int) -> str:
        cfg = self.cfg
        if cfg.learning_rate >= 1e-2:
            return f"learning_rate {cfg.learning_rate:g} is far too high for fine-tuning (try 1e-6 to 1e-4)"
        if cfg.fp16:
            return "a float16 overflow (fp16); bf16: true has float32's range"
        if step == 1:
            return ("a bad data record or a broken model: the very first step is non-finite (check the data with "
                    "preftune inspect, and the model's weights)")
        return (f"a learning rate too high for this model and data (learning_rate {cfg.learning_rate:g}; lower it "
                "or set max_grad_norm), or a bad data record in this step's batch")

    def check_weights(self, model, step: int) -> None:
        """The final model is never written with a NaN or infinite weight (an update can overflow on the
        last step, when no later loss would show it)."""
        bad = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
        if bad is not None:
            raise NonFiniteStep(f"training stopped after step {step}: weight {bad} is not finite (NaN or infinite). "
                                f"Likely cause: {self.likely_cause(step)}. No final model was saved; "
                                f"{_last_checkpoint_text(self.cfg)}")

    def skip(self, optimizer) -> None:
        """Drop this step's gradients; with fp16 the scaler still takes note (it lowers the scale)."""
        optimizer.zero_grad(set_to_none=True)
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.update()


SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class StopSignals:
    """SIGINT and SIGTERM while `train()` runs. Before the loop (`armed` False) a signal stops at once;
    in the loop the first one lets the current step finish and the loop stop cleanly (`requested`);
    a second one stops at once, abandoning the step (the last checkpoint stays). Handlers are
    installed only from the main thread (Python's rule) and restored on exit."""

    def __init__(self):
        self.received: int | None = None
        self.armed = False
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNAL_NAMES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        name = SIGNAL_NAMES[signum]
        if not self.armed or self.received is not None:
            raise Stopped(f"stopped by {name}" + (" (a second signal: the current step was abandoned)"
                                                   if self.received else " before training started"), signum)
        self.received = signum
        log.warning("%s received: finishing the current step, then stopping (send it again to stop at once)", name)

    def requested(self, accelerator) -> bool:
        """Whether a signal asked to stop; agreed by every process (torchrun signals each of them)."""
        flag = self.received is not None
        if accelerator.num_processes > 1:
            flag = bool(accelerator.reduce(torch.tensor(float(flag), device=accelerator.device),
                                           reduction="sum").item())
        return flag

    def stop(self, step: int, checkpoint, metrics, cfg, accelerator) -> None:
        """End the run after `step`: a checkpoint (when `checkpoint` is given: save_steps is set and
        this step was not saved yet), the metric files and summary.json, then raise Stopped."""
        signum = self.received if self.received is not None else signal.SIGTERM  # another process got it
        if checkpoint is not None:
            checkpoint(step)
        if accelerator.is_main_process:
            metrics.write_summary(status=f"stopped by {SIGNAL_NAMES[signum]} after step {step}")
        raise Stopped(f"stopped by {SIGNAL_NAMES[signum]} after step {step}; metrics are in {metrics.dir}; "
                      + _last_checkpoint_text(cfg), signum)
