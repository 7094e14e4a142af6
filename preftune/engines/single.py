"""One process: a run with nothing to synchronise, and the base every other engine extends.

An engine owns what differs between ways of running (engines/__init__.py): accelerate's Accelerator
(the device, mixed precision, the trackers), preparing the models and the optimizer, backward with or
without gradient synchronisation, the update, gathering weights that are sharded, the whole weights
for saving, the optimizer state in checkpoints, and which process writes. Here every one of those is
the plain thing: the model holds its whole weights, the optimizer is torch's, this process writes.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from preftune.checkpoints.folders import OPTIMIZER_FILE
from preftune.checkpoints.weights import load_weights_into


class OneProcess:
    """The engine of a plain run; its methods are the surface the loop, the reference and the
    checkpoints call (engines/__init__.py lists it)."""

    # trainer_state.json's "engine": how a checkpoint keeps the optimizer state (None: optimizer.pt of one
    # process's optimizer, as a data-parallel run keeps it too); a resume needs the same
    checkpoint_format: str | None = None
    # whether every process must take part in every forward of a model, because its weights are sharded and
    # gathered collectively: then no process may skip a batch or an evaluation pass the others run
    lockstep = False

    def __init__(self, cfg, accelerator):
        self.cfg, self.accelerator = cfg, accelerator
        # the dtype each trainable policy weight was loaded in, where an engine replaces or casts the parameters
        # (and their models.LOADED_DTYPE marks): noted by `prepare`, for the final save (`as_saved`)
        self.loaded_dtypes: dict[str, torch.dtype] = {}

    # --- the processes ---------------------------------------------------------------------------

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def data_shard(self) -> tuple[int, int]:
        """(this process's share, the number of shares) of every global batch: the data-parallel rank and world
        (sequence parallelism gives a group of processes one share: engines/zero.py)."""
        return self.rank, self.world

    @property
    def is_main(self) -> bool:
        """The process that writes files (checkpoints, the final model, the metric files)."""
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def reads_weights_of(self, name: str, cfg, what: str) -> bool:
        """Whether this process reads the weights of model `name` (named by config key `what`) from disk, or
        builds the model without them for the engine to fill (FSDP2: only the main process reads them)."""
        return True

    def autocast(self):
        return self.accelerator.autocast()

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    def check(self, cfg) -> None:
        """What this way of running does not do, refused before any model loads."""

    # --- models and optimizer --------------------------------------------------------------------

    def prepare_reference(self, model, chunk_size: int):
        """A frozen model (a separately loaded reference) on the device, never trained. Returns the
        module its passes must go through (a sharded root), or None: they call the model itself. Not
        registered with the Accelerator, which would hold it: a precomputing reference must be freed."""
        if not getattr(model, "hf_device_map", None):  # (a quantized model was placed as it loaded)
            model.to(self.device)
        return None

    def prepare(self, policy_logps, make_optimizer, reference):
        """The policy's log-prob module (`logps.LogpsModule`) and its optimizer (`make_optimizer()`,
        called once the parameters are final) as the loop uses them. `reference`: the run's
        `reference.Reference`, for an engine whose reference passes must go through the policy's module."""
        return self.accelerator.prepare(policy_logps, make_optimizer())

    def unwrap(self, policy_logps):
        """The log-prob module without the wrapper `prepare` may have put around it (itself when unwrapped).
        Not accelerate's unwrap_model: it imports DeepSpeed (and its trackers) wherever it is installed."""
        return policy_logps

    # --- a step ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def accumulate(self, policy_logps, sync: bool):
        """Around one micro-batch's forward and backward; `sync`: the step's last, whose backward
        completes the step's gradients (one process: nothing to synchronise)."""
        yield

    def backward(self, policy_logps, loss: torch.Tensor) -> None:
        """loss.backward(), loss scaling (fp16) included. The loss is already this micro-batch's share of
        the step's mean: nothing divides it by the accumulation count."""
        self.accelerator.backward(loss)

    def update(self, policy_logps, optimizer, max_grad_norm: float, skip) -> tuple[float, bool]:
        """The optimizer step: the gradients clipped to max_grad_norm (0: not clipped), then, unless
        `skip(grad_norm)` says this step must not update (a non-finite step, runtime.NonFiniteGuard),
        the weights updated; the gradients zeroed either way. Returns (the gradient norm before
        clipping, whether the weights changed)."""
        grad_norm = self.clip_gradients(policy_logps, max_grad_norm)
        stepped = not skip(grad_norm)
        if stepped:
            optimizer.step()
            # fp16: the loss scaler skips an update whose gradients overflowed (and lowers the scale); the weights
            # did not change, so neither does the learning-rate schedule (transformers' Trainer: the same)
            stepped = not self.accelerator.optimizer_step_was_skipped
        elif self.accelerator.scaler is not None:  # fp16: the scaler still takes note (it lowers the scale)
            self.accelerator.scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, stepped

    def clip_gradients(self, policy_logps, max_grad_norm: float) -> float:
        """Clip the gradients to max_grad_norm (0: no clipping); their norm before clipping."""
        return float(self.accelerator.clip_grad_norm_(policy_logps.parameters(), max_grad_norm or math.inf))

    @contextlib.contextmanager
    def gathered(self, *modules):
        """The whole weights of sharded log-prob modules (the policy's, a reference's runner) for code that
        reads them outside their forward (the KL reads both LM heads); None entries are ignored."""
        yield

    # --- a moving reference (sync_ref_model: reference.sync_reference, Reference.save_synced) ----------

    def settle(self) -> None:
        """Every sharded model's weights back in the parts each process holds (a forward may leave some
        gathered), before code reads their parameters by name."""

    @contextlib.contextmanager
    def mixing(self, ref: torch.Tensor, weight: torch.Tensor):
        """(ref, weight), two parameters of one shape, as the tensors to mix element by element in place
        (TR-DPO's update): what is written into the first is kept in ref. Here the parameters themselves."""
        yield ref, weight

    def whole_tensor(self, param: torch.Tensor) -> torch.Tensor | None:
        """Collective: `param` whole, on the CPU, on the main process (None elsewhere)."""
        return param.detach().cpu() if self.is_main else None

    def load_whole(self, param: torch.Tensor, tensor: torch.Tensor) -> None:
        """Collective: `tensor` (whole, given on every process) into `param`; each process keeps its part."""
        with torch.no_grad():
            param.copy_(tensor)

    # --- saving and loading ----------------------------------------------------------------------

    def whole_weights(self, model, loaded_dtypes: bool = False) -> dict[str, torch.Tensor] | None:
        """Collective: the whole weights to save of `model` (a LoRA model: its trained adapter), on the
        main process; None where the model holds them whole itself (save it as it is). loaded_dtypes: in
        the dtypes they were loaded in (the final save)."""
        return None

    def as_saved(self, model, state: dict[str, torch.Tensor], loaded_dtypes: bool) -> dict[str, torch.Tensor]:
        """Gathered weights (engines that shard) as a save writes them: tied weights (lm_head = embeddings),
        which gather as two copies, once, as transformers saves them; with loaded_dtypes each in the dtype
        it was loaded in (`self.loaded_dtypes`, noted by `prepare` before the engine replaced the parameters)."""
        seen = set()
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in seen:
                state.pop(name, None)
            seen.add(id(param))
        if loaded_dtypes:
            for name, dtype in self.loaded_dtypes.items():
                if name in state:
                    state[name] = state[name].to(dtype)
        return state

    def load_weights(self, model, folder: Path) -> None:
        """The weights a checkpoint or best_model/ folder holds, into `model` (every process)."""
        load_weights_into(model, folder)

    def save_optimizer(self, policy_logps, optimizer, folder: Path) -> None:
        """Collective: the optimizer state into a checkpoint folder being written."""
        if self.is_main:
            torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)

    def load_optimizer(self, policy_logps, optimizer, folder: Path) -> None:
        """Collective: the optimizer state `save_optimizer` wrote."""
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True))

    def load_checkpoint(self, policy_logps, optimizer, model, folder: Path) -> None:
        """Collective: the weights and the optimizer state of a checkpoint folder, to resume from it."""
        self.load_weights(model, folder)
        self.load_optimizer(policy_logps, optimizer, folder)
