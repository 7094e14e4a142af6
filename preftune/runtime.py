"""What keeps a running training loop honest: a non-finite step stops it (or is skipped, up to
`skip_nonfinite_steps`), and SIGINT and SIGTERM stop it cleanly.

    with StopSignals() as stop:          # train(): SIGINT/SIGTERM set a flag while the loop runs
        ...
        engine.update(..., skip=lambda norm: nonfinite.check(step, losses_finite, norm))  # True: skip the update
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
import signal
import threading
from pathlib import Path

import torch

from preftune.checkpoints.folders import latest_checkpoint
from preftune.errors import PreftuneError

log = logging.getLogger("preftune")


class Stopped(PreftuneError):
    """The run was stopped by a signal; exit_code 128 + the signal's number, as a shell reports it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class NonFiniteStep(PreftuneError):
    """A step's loss or gradient norm was NaN or infinite (and no skip was left)."""


class LostProcess(PreftuneError):
    """Another process of the run died or stopped answering (a collective failed or timed out)."""


def lost_process(error: RuntimeError, cfg) -> LostProcess | None:
    """The one line for a collective that failed because another process died (gloo: its connection
    closed) or hangs (no answer within the process group's timeout, `ddp_timeout`); None for any other
    error. NCCL's watchdog ends a process whose collective timed out itself, with its own message naming
    the rank, the operation and the timeout. The rank that stopped is known when there is only one other."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    text = str(error)
    # (gloo's "Application timeout caused pair closure" names neither gloo nor NCCL: a pair is gloo's connection)
    if not (isinstance(error, dist.DistError) or "gloo" in text or "NCCL" in text or "pair closure" in text):
        return None
    rank, world = dist.get_rank(), dist.get_world_size()
    other = f"process {1 - rank}" if world == 2 else f"one of the other {world - 1} processes"
    timeout = (f"ddp_timeout={cfg.ddp_timeout} s" if cfg.ddp_timeout else
               "the default timeout (ddp_timeout unset: 30 minutes on gloo, 10 on NCCL)")
    if "timed out" in text.lower() or "timeout" in text.lower():
        what = f"{other} did not answer within {timeout} (it hangs, or its machine is unreachable)"
    elif "closed" in text or "reset" in text or "Broken pipe" in text:
        what = f"{other} closed its connection (it died: its launcher's log says why)"
    else:
        what = f"a collective with {other} failed ({text.strip().splitlines()[0][:200]})"
    found = latest_checkpoint(Path(cfg.output_dir))
    resume = (f"the last checkpoint is {found} (resume_from_checkpoint: true continues from it, with {world} "
              "processes again)" if found else "no checkpoint was written (set save_steps to keep some)")
    return LostProcess(f"process {rank} of {world} stopped: {what}. No final model was saved; {resume}")


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
