"""Fully sharded data parallelism (FSDP2): each of N processes holds 1/N of every weight, gradient and
optimizer state, so a model too large for one GPU trains across several.

    settings = fsdp_settings(cfg)              # None: plain data parallelism (DDP)
    shard(PolicyLogps(model), settings, device)   # each decoder layer, then the rest, before the optimizer
    state = full_state_dict(model)             # collective: whole tensors on the main process, {} elsewhere

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

Only the main process reads the checkpoint: the others build the model on the meta device
(`models.load_model`) and `shard` broadcasts the main process's weights into every shard.

The gradient of a step is reduce-scattered as DDP all-reduces it (mean over processes), so a step
computes what a DDP run computes: the numbers equal a one-process run with the global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

from preftune.errors import ConfigError, ModelError

log = logging.getLogger("preftune")

_warned = False  # the one-process warning of `active`, once per process


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
    if from_accelerate:  # accelerate's FSDP_* variables: FULL_SHARD reshards after forward, SHARD_GRAD_OP not
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


def active(cfg) -> dict | None:
    """The sharding engine's settings where there is a process group to shard over (a launcher started
    this process): fsdp_settings with "engine": "fsdp", or `zero.zero_settings` with "engine":
    "deepspeed"; else None: a plain run (with a warning when sharding was asked for)."""
    global _warned
    settings = launched_zero(cfg)
    settings = {"engine": "deepspeed", **settings} if settings else fsdp_settings(cfg)
    if settings is not None and settings.get("engine") is None:
        settings = {"engine": "fsdp", **settings}
    if settings is not None and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        if not _warned:
            _warned = True
            log.warning("%s: this process was not started by a launcher (accelerate launch / torchrun), so there is "
                        "nothing to shard across; training unsharded", settings["engine"])
        return None
    return settings


def launched_zero(cfg) -> dict | None:
    """ZeRO's settings (`zero.zero_settings`) when a launcher started this process, else None (with a
    warning when ZeRO was asked for): DeepSpeed needs the launcher's process group, even of one process."""
    from preftune import zero

    settings = zero.zero_settings(cfg)
    if settings is not None and "WORLD_SIZE" not in os.environ:
        global _warned
        if not _warned:
            _warned = True
            log.warning("deepspeed: this process was not started by a launcher (accelerate launch / torchrun), so "
                        "there is nothing to shard across; training unsharded")
        return None
    return settings


def check(cfg, settings: dict | None) -> None:
    """What this first FSDP2 (or ZeRO, `zero.check`) version does not do, refused before any model loads."""
    if settings is None:
        return
    if settings.get("engine") == "deepspeed":
        from preftune import zero

        return zero.check(cfg, settings)
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


def _units(model) -> list[torch.nn.Module]:
    """The decoder layers (the classes transformers marks as not to be split)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard(root, settings: dict, device: torch.device, mixed_precision: str | None = None,
          what: str = "the policy") -> None:
    """Shard `root.model` in place over every process: each decoder layer is one unit (gathered for
    its forward and backward, freed after), the embeddings, final norm and LM head the root unit.
    The root is the `logps.PolicyLogps` around the model, whose forward is the whole log-prob pass:
    the chunked LM head runs inside it, so the root's weights are gathered there. Call before the
    optimizer is made: it must hold the sharded parameters. A model only the main process read
    (models.FROM_MAIN) gets every process's shards from the main process's weights here."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from preftune.models import FROM_MAIN

    model = root.model
    from_main = getattr(model, FROM_MAIN, False)
    whole = match_main(root) if from_main else None  # the main process's weights (tensors there, {} elsewhere)
    mark_loaded_dtypes(model)  # fully_shard replaces the parameters, and their marks
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


def _layout(root) -> dict[str, tuple]:
    """Each parameter's (shape, dtype, requires_grad, the first name it has: a tied one has several)."""
    first: dict[int, str] = {}
    return {name: (tuple(p.shape), p.dtype, p.requires_grad, first.setdefault(id(p), name))
            for name, p in root.named_parameters(remove_duplicate=False)}


def match_main(root) -> dict[str, torch.Tensor]:
    """Before `fully_shard`, for a model only the main process read (models.FROM_MAIN): checks that every
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


def share_policy_passes(reference, root) -> None:
    """A LoRA run's reference is the policy with its adapter off (`adapters.AdapterReference`); sharded,
    its passes must go through the policy's root too, with the adapter switched off around them."""
    from preftune.adapters import AdapterReference

    if isinstance(reference.model, AdapterReference):
        active = reference.model.active

        def run(**inputs):
            with active():
                return root(**inputs)

        reference.runner = run


def is_sharded(model) -> bool:
    """Whether `model` is trained sharded (FSDP2 or ZeRO): its whole weights must be gathered to be saved."""
    return hasattr(model, "preftune_loaded_dtypes")


def mark_loaded_dtypes(model) -> None:
    """The dtypes to save the final weights in, noted before the engine replaces (FSDP2) or casts
    (ZeRO with bf16) the parameters, and their marks."""
    from preftune.models import LOADED_DTYPE

    model.preftune_loaded_dtypes = {n: getattr(p, LOADED_DTYPE) for n, p in model.named_parameters()
                                    if hasattr(p, LOADED_DTYPE)}


def full_state_dict(model, loaded_dtypes: bool = False) -> dict[str, torch.Tensor]:
    """Every process must call this (it gathers): the whole weights on the CPU on the main process
    ({} on the others); with loaded_dtypes, each in the dtype it was loaded in (the final save)."""
    from peft import PeftModel
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from preftune import zero

    # a LoRA model is saved as its adapter: the frozen base is not gathered at all
    if zero.is_zero(model):
        state = zero.full_state_dict(model, ignore_frozen=isinstance(model, PeftModel))
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                   ignore_frozen_params=isinstance(model, PeftModel))
        state = get_model_state_dict(model, options=options)
    seen = set()  # tied weights (lm_head = embeddings) gather as two copies; saved once, as transformers does
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            state.pop(name, None)
        seen.add(id(param))
    if loaded_dtypes:
        for name, dtype in model.preftune_loaded_dtypes.items():
            if name in state:
                state[name] = state[name].to(dtype)
    return state


def load_full_state_dict(model, state: dict[str, torch.Tensor]) -> None:
    """Every process calls this with the whole weights (each read them): each keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    from preftune import zero

    if zero.is_zero(model):
        return zero.load_full_state_dict(model, state)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def full_optimizer_state(model, optimizer) -> dict:
    """Collective: the optimizer state of the whole model keyed by parameter name, on the main process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(model, optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def gathered(*roots):
    """The whole weights of each sharded root (`shard`) for code that uses a model's weights outside
    its forward (the KL to the reference reads both LM heads after the passes); resharded after.
    Other roots (None, unsharded models) pass through."""
    from torch.distributed.fsdp import FSDPModule

    from preftune import zero

    sharded = [r for r in roots if isinstance(r, FSDPModule)]
    for root in sharded:
        root.unshard()
    try:  # ZeRO-3 engines: their LM heads gathered (a DeepSpeedEngine holds the root as .module)
        with zero.gathered_heads(*(getattr(getattr(r, "module", r), "model", None) for r in roots if r is not None)):
            yield
    finally:
        for root in sharded:
            root.reshard()


def shard_reference(model, settings: dict | None, accelerator, chunk_size: int, mixed_precision: str | None):
    """The frozen reference under the run's engine: the root its passes go through (`Reference.runner`),
    or None where the model runs as it is, on the device (no sharding; ZeRO stages 0-2, as TRL does)."""
    from preftune import zero
    from preftune.logps import PolicyLogps

    if settings is None or (settings["engine"] == "deepspeed" and settings["stage"] < 3):
        model.to(accelerator.device)
        return None
    root = PolicyLogps(model, chunk_size)
    if settings["engine"] == "fsdp":
        shard(root, settings, accelerator.device, mixed_precision, "the reference")
        return root
    model.preftune_engine = "deepspeed"
    return zero.reference_engine(root, accelerator)


def prepare(accelerator, policy, optimizer, settings: dict | None):
    """The policy's root and optimizer as the loop uses them: through accelerate (DDP, or a
    DeepSpeedEngine under ZeRO, which then steps the optimizer itself), or, sharded by FSDP2 already
    (`shard`), only the optimizer. Make the learning-rate schedule after, on the returned optimizer:
    ZeRO regroups the parameters (accelerate would wrap a schedule to step once per process)."""
    if settings is not None and settings["engine"] == "fsdp":
        return policy, accelerator.prepare(optimizer)
    if settings is not None:  # deepspeed
        from preftune import zero

        mark_loaded_dtypes(policy.model)  # before the engine casts the weights (bf16)
        policy.model.preftune_dtypes = {n: p.dtype for n, p in policy.model.named_parameters()}  # saved in these
        zero.fill_model_sizes(accelerator.state.deepspeed_plugin.deepspeed_config, policy.model.config.hidden_size)
        policy.model.preftune_engine = "deepspeed"
        engine, optimizer = accelerator.prepare(policy, optimizer)
        log.info("%s", zero.describe(settings, accelerator.num_processes, accelerator.mixed_precision))
        policy.model.preftune_settle = engine.empty_partition_cache  # see zero.full_state_dict
        return engine, optimizer
    return accelerator.prepare(policy, optimizer)


def backward(accelerator, policy, loss: torch.Tensor, last: bool, settings: dict | None) -> None:
    """loss.backward() through the engine. Under ZeRO the engine is told whether this is the step's last
    micro-batch (the gradients are reduced then) and does not divide by the accumulation count: the
    loss is already the step's mean."""
    if settings is not None and settings["engine"] == "deepspeed":
        policy.set_gradient_accumulation_boundary(last)
        policy.backward(loss, scale_wrt_gas=False)
    else:
        accelerator.backward(loss)


def clip_and_norm(accelerator, policy, model, max_grad_norm: float, settings: dict | None) -> float:
    """Clip the step's gradients to max_grad_norm (0: no clipping) and return their norm before clipping.
    Under ZeRO this is DeepSpeed's step itself (it clips, updates and zeroes the gradients): the
    optimizer's and the schedule's own step are no-ops there."""
    if settings is not None and settings["engine"] == "deepspeed":
        policy.step()
        norm = policy.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)
    return float(local_value(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)))


def local_value(t):
    """A gradient norm FSDP2 returns as a DTensor, as a plain tensor (the same on every process)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
