"""Fully sharded data parallelism (FSDP2): each of N processes holds 1/N of every weight, gradient and
optimizer state, so a model too large for one GPU trains across several.

    settings = fsdp_settings(cfg)        # None: no sharding asked for
    engine = FSDP2(cfg, settings, accelerator)
    policy_logps, optimizer = engine.prepare(LogpsModule(policy), make_optimizer, reference)

The engine is torch's FSDP2 (`fully_shard`, DTensor parameters) and the checkpoint API of
torch.distributed.checkpoint; the processes come from the launcher (`accelerate launch`, `torchrun`)
as for data parallelism. preftune calls `fully_shard` itself instead of through accelerate's FSDP
plugin because accelerate takes its FSDP path only on GPUs: this way the one code path that runs on a
node of GPUs is also the one tested on CPU processes (gloo). Where sharding comes from:

- `fsdp: full_shard` (TrainingArguments' words: `full_shard`, `shard_grad_op` = keep the gathered
  weights from forward to backward, `offload` = parameters on the CPU between uses; `auto_wrap` is
  implied: every decoder layer is its own unit), or
- an accelerate config with `distributed_type: FSDP` and `fsdp_version: 2` (`accelerate launch
  --config_file examples/accelerate/fsdp2.yaml`), read from the environment accelerate sets.

Only the main process reads the checkpoint (`reads_weights_of`): the others build the model on the
meta device (`models.load_model`) and `shard` broadcasts the main process's weights into every shard.

The gradient of a step is reduce-scattered as DDP all-reduces it (mean over processes), so a step
computes what a DDP run computes: the numbers equal a one-process run with the global batch. The
gradients are reduce-scattered after every micro-batch (FSDP2 has no no_sync).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import torch

from preftune.adapters import is_peft_model
from preftune.checkpoints.folders import OPTIMIZER_FILE
from preftune.checkpoints.weights import read_weights
from preftune.engines.single import OneProcess
from preftune.errors import ConfigError, ModelError
from preftune.logps import LogpsModule
from preftune.models import LOADED_DTYPE, whole_load_reason

log = logging.getLogger("preftune")


def fsdp_settings(cfg) -> dict | None:
    """{"reshard_after_forward": bool, "offload": bool} when sharding is asked for (the `fsdp` key or an
    accelerate FSDP2 config), else None."""
    words = set(cfg.fsdp.replace(",", " ").split()) if cfg.fsdp else set()
    from_accelerate = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if from_accelerate and os.environ.get("FSDP_VERSION", "1") != "2":
        raise ConfigError("the accelerate config asks for FSDP version 1; preftune shards with FSDP2: set "
                          "fsdp_version: 2 in it (see examples/accelerate/fsdp2.yaml)")
    if not words and not from_accelerate:
        return None
    if from_accelerate:
        # transformers would build the model on the meta device on every process but each node's first, for
        # accelerate's FSDP to broadcast; preftune does that itself (models.load_model, `shard`), from the
        # one main process
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
        # accelerate's FSDP_* variables: FULL_SHARD reshards after forward, SHARD_GRAD_OP not
        strategy = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", os.environ.get("FSDP_SHARDING_STRATEGY", "true"))
        reshard = strategy.lower() not in ("false", "shard_grad_op", "2")
        offload = os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true"
    else:
        reshard, offload = "shard_grad_op" not in words, "offload" in words
    return {"reshard_after_forward": reshard, "offload": offload}


@contextlib.contextmanager
def hidden_from_accelerate():
    """accelerate's FSDP switch off while the Accelerator is made: on GPUs it would otherwise take its
    own FSDP path (and prepare the model its way); the settings stay readable by `fsdp_settings`."""
    saved = os.environ.get("ACCELERATE_USE_FSDP")
    if saved is not None:
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def check(cfg) -> None:
    """What this first FSDP2 version does not do, refused before any model loads."""
    if cfg.finetuning_type == "lora":
        if not cfg.save_adapter_only:  # a merge needs every base weight whole in one place
            raise ConfigError("fsdp with finetuning_type lora writes the adapter: set save_adapter_only: true (then "
                              "`preftune export` merges it into the base)")
        for key in ("quantization_bit", "additional_target"):
            if getattr(cfg, key):
                raise ConfigError(f"fsdp: {key} is not sharded yet; remove it, or unset fsdp")
    if cfg.torch_compile:
        raise ConfigError("fsdp: torch_compile is not combined with sharding yet (compiled layers would need to be "
                          "sharded first); set torch_compile: false")
    if cfg.enable_liger_kernel:  # Liger reads the LM head's weight whole and returns its gradient itself
        raise ConfigError("fsdp: enable_liger_kernel is not combined with sharding yet; remove enable_liger_kernel "
                          "(the chunked LM head, logps_chunk_size, bounds the logits memory too)")
    if cfg.generate_during_eval:
        raise ConfigError("fsdp: generate_during_eval samples on the main process alone, which a sharded model "
                          "cannot do; set generate_during_eval: 0")


class FSDP2(OneProcess):
    """FSDP2 over every process of the launcher (module docstring)."""

    checkpoint_format = "fsdp"  # optimizer.pt holds the whole optimizer state, keyed by parameter name
    lockstep = True

    def __init__(self, cfg, settings: dict, accelerator):
        super().__init__(cfg, accelerator)
        self.settings = settings
        self.roots: list[torch.nn.Module] = []  # the modules `shard` made roots of (the policy's, a reference's)

    def check(self, cfg) -> None:
        check(cfg)

    def reads_weights_of(self, name: str, cfg, what: str) -> bool:
        """Only the main process reads the weights of `name` (the model config key `what` names); the others
        build the model without them, and `shard` broadcasts the main process's. A model only its weights
        can describe is read by every process."""
        whole = whole_load_reason(name, cfg, what)
        if whole:
            log.info("fsdp: every process reads the weights of %s (%s)", name, whole)
        return bool(whole) or self.is_main

    def prepare_reference(self, model, chunk_size: int):
        root = LogpsModule(model, chunk_size)  # the whole pass in one root unit, as the policy's
        shard(root, self.settings, self.device, self.cfg.mixed_precision, "the reference")
        self.roots.append(root)
        return root

    def prepare(self, policy_logps, make_optimizer, reference):
        self.loaded_dtypes = {n: getattr(p, LOADED_DTYPE) for n, p in policy_logps.model.named_parameters()
                              if hasattr(p, LOADED_DTYPE)}  # fully_shard replaces the parameters, and their marks
        # sharded before the optimizer is made: it must hold the sharded parameters
        shard(policy_logps, self.settings, self.device, self.cfg.mixed_precision)
        self.roots.append(policy_logps)
        if reference.reads_policy_weights:
            # a LoRA run's reference is the policy with its adapter off: its passes must go through the policy's
            # root too (which gathers the embeddings and the LM head), with the adapter switched off around them
            active = reference.model.active

            def run(**inputs):
                with active():
                    return policy_logps(**inputs)

            reference.runner = run
        return policy_logps, self.accelerator.prepare(make_optimizer())

    def clip_gradients(self, policy_logps, max_grad_norm: float) -> float:
        norm = self.accelerator.clip_grad_norm_(policy_logps.parameters(), max_grad_norm or math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # a DTensor: the whole norm

    @contextlib.contextmanager
    def gathered(self, *modules):
        from torch.distributed.fsdp import FSDPModule

        roots = [m for m in modules if isinstance(m, FSDPModule)]
        for root in roots:
            root.unshard()
        try:
            yield
        finally:
            for root in roots:
                root.reshard()

    def settle(self) -> None:
        """A forward without backward leaves gathered what does not reshard after it (the root units; every unit
        with shard_grad_op): its parameters are then the gathered copies, not the shards. Resharded here."""
        from torch.distributed.fsdp import FSDPModule

        for root in self.roots:
            for module in root.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

    @contextlib.contextmanager
    def mixing(self, ref, weight):
        """The two weights' local shards: the reference is sharded as the policy is (`shard`: one mesh, the same
        units, dim 0), so a weight's shard on this process holds the same elements in both, and the mix needs
        no gather."""
        ref_part, weight_part = ref.to_local(), weight.to_local()  # views of the shards: writes stay in ref
        if ref.placements != weight.placements or ref_part.shape != weight_part.shape:
            raise ModelError(f"fsdp: sync_ref_model: a reference weight is sharded as {ref.placements} "
                             f"{tuple(ref_part.shape)} and the policy's as {weight.placements} "
                             f"{tuple(weight_part.shape)}; they must be sharded alike")
        yield ref_part, weight_part

    def whole_tensor(self, param):
        whole = param.full_tensor()  # (collective: an all-gather)
        return whole.cpu() if self.is_main else None

    def load_whole(self, param, tensor) -> None:
        from torch.distributed.tensor import distribute_tensor

        # every process holds the whole tensor: each cuts its own shard out, with no communication
        part = distribute_tensor(tensor.to(param.device_mesh.device_type), param.device_mesh, param.placements,
                                 src_data_rank=None)
        with torch.no_grad():
            param.to_local().copy_(part.to_local())

    def whole_weights(self, model, loaded_dtypes: bool = False) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # a LoRA model is saved as its adapter: the frozen base is not gathered at all
        options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                   ignore_frozen_params=is_peft_model(model))
        return self.as_saved(model, get_model_state_dict(model, options=options), loaded_dtypes)

    def load_weights(self, model, folder: Path) -> None:
        """Every process reads the whole weights and keeps its shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, read_weights(model, folder), options=StateDictOptions(full_state_dict=True,
                                                                                          strict=False))

    def save_optimizer(self, policy_logps, optimizer, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        # the optimizer state of the whole model keyed by parameter name, gathered onto the main process
        state = get_optimizer_state_dict(policy_logps.model, optimizer.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            torch.save(state, folder / OPTIMIZER_FILE)

    def load_optimizer(self, policy_logps, optimizer, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = torch.load(folder / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        set_optimizer_state_dict(policy_logps.model, optimizer.optimizer, state,
                                 options=StateDictOptions(full_state_dict=True))


# --- sharding a model -----------------------------------------------------------------------------


def _units(model) -> list[torch.nn.Module]:
    """The decoder layers (the classes transformers marks as not to be split)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(root, settings: dict, device: torch.device, mixed_precision: str | None = None,
          what: str = "the policy") -> None:
    """Shard `root.model` in place over every process: each decoder layer is one unit (gathered for
    its forward and backward, freed after), the embeddings, final norm and LM head the root unit.
    The root is the `logps.LogpsModule` around the model, whose forward is the whole log-prob pass:
    the chunked LM head runs inside it, so the root's weights are gathered there. Call before the
    optimizer is made: it must hold the sharded parameters. Where some process built the model
    without its weights (`FSDP2.reads_weights_of`), every shard is filled from the main process's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    model = root.model
    from_main = _built_without_weights(root)
    whole = match_main(root) if from_main else None  # the main process's weights (tensors there, {} elsewhere)
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    kwargs = {"mesh": mesh, "reshard_after_forward": settings["reshard_after_forward"]}
    if mixed_precision == "bf16":  # gather weights in bf16 (half the traffic), reduce gradients in fp32
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if settings["offload"] and device.type == "cuda":
        kwargs["offload_policy"] = CPUOffloadPolicy()
    elif not from_main:  # (meta parameters cannot move: fully_shard moves each unit's parameters and buffers)
        root.to(device)
    units = _units(model)
    if not units:
        raise ConfigError(f"fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules); it "
                          "cannot be sharded layer by layer")
    unit_name = type(units[0]).__name__
    for unit in units:
        fully_shard(unit, **kwargs)
    fully_shard(root, **kwargs)
    if from_main:
        fill_from_main(root, whole, offload="offload_policy" in kwargs)
    log.info("fsdp: %s (%s) sharded over %d processes (FSDP2: %d %s units and the root; reshard_after_forward=%s, "
             "offload=%s; %s)", what, type(model).__name__, mesh.size(), len(units), unit_name,
             settings["reshard_after_forward"], "offload_policy" in kwargs,
             "weights read by the main process alone" if from_main else "weights read by every process")


def _built_without_weights(root) -> bool:
    """Whether some process built the model on the meta device (the main process never does)."""
    flags = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(flags, any(p.is_meta for p in root.parameters()))
    return any(flags)


def _layout(root) -> dict[str, tuple]:
    """Each parameter's (shape, dtype, requires_grad, the first name it has: a tied one has several)."""
    first: dict[int, str] = {}
    return {name: (tuple(p.shape), p.dtype, p.requires_grad, first.setdefault(id(p), name))
            for name, p in root.named_parameters(remove_duplicate=False)}


def match_main(root) -> dict[str, torch.Tensor]:
    """Before `fully_shard`, for a model the other processes built without weights: checks that every
    process built the same model (names, shapes, trainable set, ties) and gives each meta parameter the
    main process's dtype. Returns the main process's whole weights (its state dict), {} elsewhere."""
    main = [_layout(root)]
    torch.distributed.broadcast_object_list(main, src=0)
    mine, main = _layout(root), main[0]
    differ = sorted(n for n in mine.keys() | main.keys()
                    if n not in mine or n not in main or mine[n][:1] + mine[n][2:] != main[n][:1] + main[n][2:])
    differs = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(differs, differ)  # every process raises, none waits in a broadcast
    if any(differs):
        rank, names = next((r, d) for r, d in enumerate(differs) if d)
        raise ModelError(f"fsdp: the model process {rank} built without weights differs from the main process's "
                         f"at {', '.join(names[:3])}; please report this (with the model's config)")
    for name, param in root.named_parameters():
        if param.is_meta and param.dtype != main[name][1]:  # free on the meta device
            param.data = param.data.to(main[name][1])
    return root.state_dict() if torch.distributed.get_rank() == 0 else {}


def fill_from_main(root, whole: dict[str, torch.Tensor], offload: bool) -> None:
    """After `fully_shard`: every process's shards from the main process's whole weights (`match_main`),
    broadcast one tensor at a time (torch.distributed.checkpoint's broadcast_from_rank0); meta
    parameters are replaced, so the ties are made again. Non-persistent buffers (rotary inv_freq) are not
    in a state dict: each process computed its own when it built the model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    tied = {name: first for name, (*_, first) in _layout(root).items() if name != first}
    set_model_state_dict(root, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               cpu_offload=offload))
    for name, first in tied.items():
        module, _, leaf = name.rpartition(".")
        setattr(root.get_submodule(module), leaf, root.get_parameter(first))
