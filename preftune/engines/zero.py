"""DeepSpeed ZeRO through accelerate: stage 2 partitions gradients and optimizer state over the
processes, stage 3 the weights too (optionally offloaded to the CPU), so a model too large for one
GPU's memory trains on several.

    settings = zero_settings(cfg)        # None, or {"stage": 3, "config": {...}, "source": ...}
    engine = ZeRO(cfg, settings)         # the Accelerator with DeepSpeed's plugin, every "auto" filled
    policy_logps, optimizer = engine.prepare(LogpsModule(policy), make_optimizer, reference)  # a DeepSpeedEngine

Where ZeRO comes from, as in LLaMA-Factory and transformers:

- `deepspeed: examples/deepspeed/ds_z3_config.json` (a DeepSpeed JSON config; "auto" values are
  filled from the run's config), or
- an accelerate config with `distributed_type: DEEPSPEED` (`accelerate launch --config_file
  examples/accelerate/zero3.yaml`), read from the environment accelerate sets.

DeepSpeed's engine does what the other engines leave to torch: `ZeRO.backward` calls its backward (the
gradient accumulation boundary said explicitly by `accumulate`, no rescaling by the accumulation count:
the loss is already the step's mean) and `ZeRO.update` its step, which clips (`gradient_clipping` =
max_grad_norm), updates and zeroes the gradients; the learning-rate schedule is preftune's, stepped by
the loop. The gradients are
averaged over processes as DDP averages them, so a step computes what a one-process run with the
global batch computes. The reference is a frozen engine of its own under stage 3 (partitioned, as
TRL prepares it), a plain copy per process under stages 0-2.

Checkpoints keep preftune's format (whole weights as safetensors, scheduler, RNG states, trainer
state) plus DeepSpeed's own files of the partitioned optimizer state in `deepspeed/` (written and
read by DeepSpeed; a resume needs the same number of processes).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import warnings
from pathlib import Path

import torch

from preftune.adapters import is_peft_model
from preftune.checkpoints.weights import read_weights
from preftune.engines.single import OneProcess
from preftune.errors import ConfigError
from preftune.logps import LogpsModule, SequenceSplit, split_sequences
from preftune.models import LOADED_DTYPE

log = logging.getLogger("preftune")

ENGINE_DIR = "deepspeed"  # a checkpoint's folder of DeepSpeed's own (partitioned) state
_TAG = "state"


def _read_config(path: str) -> dict:
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"deepspeed: {path} is not a file; give the path of a DeepSpeed JSON config "
                          "(examples/deepspeed/ds_z3_config.json)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"deepspeed: {path} is not valid JSON ({e}); fix the file") from None
    if not isinstance(config, dict):
        raise ConfigError(f"deepspeed: {path} holds {type(config).__name__}, not a JSON object of DeepSpeed settings")
    return config


def zero_settings(cfg) -> dict | None:
    """{"stage", "config", "source"} when ZeRO is asked for (the `deepspeed` key or an accelerate DeepSpeed
    config in the environment), else None. The config's own sections that preftune makes itself
    (optimizer, scheduler) are refused."""
    from_accelerate = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not cfg.deepspeed and not from_accelerate:
        return None
    if cfg.fsdp:
        raise ConfigError("deepspeed and fsdp are two sharding engines; use one of them")
    if cfg.deepspeed:
        source, config = cfg.deepspeed, _read_config(cfg.deepspeed)
    else:  # accelerate's launcher: a config file it names, or the zero_stage etc. of its own config
        from accelerate.utils import DeepSpeedPlugin

        source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the accelerate config"
        config = _read_config(source) if source != "the accelerate config" else \
            copy.deepcopy(DeepSpeedPlugin().deepspeed_config)
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ConfigError(f"deepspeed: {source} has a \"{section}\" section; preftune makes the optimizer and "
                              "the learning-rate schedule from optim, learning_rate, lr_scheduler_type and warmup: "
                              f"remove \"{section}\" from the file")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed: zero_optimization.stage in {source} is {stage!r}; use 0, 1, 2 or 3")
    return {"stage": stage, "config": config, "source": source}


def check(cfg, settings: dict | None) -> None:
    """What this first ZeRO version does not do, refused before any model loads."""
    if settings is None:
        return
    if cfg.skip_nonfinite_steps:
        raise ConfigError("deepspeed: skip_nonfinite_steps is not available (DeepSpeed's step cannot be undone or "
                          "skipped from outside); set skip_nonfinite_steps: 0 (a non-finite step stops the run)")
    if cfg.activation_offloading:  # its partitioned weights are gathered by its own hooks, which ours would copy
        raise ConfigError("deepspeed: activation_offloading is not combined with ZeRO; use DeepSpeed's own offload "
                          "(offload_param / offload_optimizer in its config, e.g. ds_z3_offload_config.json), or "
                          "unset deepspeed")
    if cfg.enable_liger_kernel and settings["stage"] == 3:
        # Liger's fused loss reads the LM head's weight itself instead of calling the head, and computes its
        # gradient in the forward; ZeRO-3 holds that weight partitioned. Gathering it around the loss
        # (GatheredParameters) fails where it is tied to the input embeddings, still held by their module.
        # (ZeRO-2 keeps every weight whole: tested equal to one process.)
        raise ConfigError("deepspeed: enable_liger_kernel is not combined with ZeRO-3 (Liger's fused loss reads the "
                          "LM head's weight, which ZeRO-3 partitions); use ZeRO-2 (ds_z2_config.json), or remove "
                          "enable_liger_kernel")
    for key in ("quantization_bit", "torch_compile"):
        if getattr(cfg, key):
            raise ConfigError(f"deepspeed: {key} is not combined with ZeRO yet; remove it, or unset deepspeed")
    if cfg.finetuning_type == "lora" and settings["stage"] == 3 and not cfg.save_adapter_only:
        # a merge needs every base weight whole in one place
        raise ConfigError("deepspeed: LoRA under ZeRO-3 writes the adapter: set save_adapter_only: true (then "
                          "`preftune export` merges it into the base), or use ZeRO-2 (ds_z2_config.json)")
    if cfg.generate_during_eval and settings["stage"] == 3:
        raise ConfigError("deepspeed: generate_during_eval samples on the main process alone, which a ZeRO-3 "
                          "model cannot do; set generate_during_eval: 0")


def _fill(config: dict, key: str, value, source: str) -> None:
    """config[key] (dotted) = value where it is "auto" or absent; a different explicit value is refused:
    DeepSpeed would silently train with another batch, accumulation or clipping than the run's."""
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif current != value and not (isinstance(value, float) and isinstance(current, (int, float))
                                   and float(current) == value):
        raise ConfigError(f"deepspeed: {key} is {current!r} in {source} but {value!r} in this run's config; set it "
                          "to \"auto\" there (preftune fills it) or make the two agree")


def make_plugin(cfg, settings: dict, world: int):
    """accelerate's DeepSpeedPlugin for `settings`, every "auto" the run decides filled in."""
    from accelerate.utils import DeepSpeedPlugin

    # DeepSpeed's collectives call torch APIs that torch deprecates, one warning per call otherwise
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)

    config, source = copy.deepcopy(settings["config"]), settings["source"]
    _fill(config, "train_micro_batch_size_per_gpu", cfg.per_device_train_batch_size, source)
    _fill(config, "gradient_accumulation_steps", cfg.gradient_accumulation_steps, source)
    _fill(config, "train_batch_size", cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world,
          source)
    _fill(config, "gradient_clipping", float(cfg.max_grad_norm or 0.0), source)
    _fill(config, "bf16.enabled", bool(cfg.bf16), source)
    _fill(config, "fp16.enabled", bool(cfg.fp16), source)
    zero = config.setdefault("zero_optimization", {})
    zero.setdefault("stage", settings["stage"])
    config["zero_allow_untested_optimizer"] = True  # preftune's torch optimizer (optim), not DeepSpeed's own
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # the optimizer steps on the CPU: torch's AdamW there, not DeepSpeedCPUAdam (a C++ op built at run time)
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    # transformers sees this config (accelerate registers it) and under ZeRO-3 loads every model through
    # DeepSpeed's zero.Init: partitioned as it is read, in the engine's dtype (bf16 with bf16 on), so no
    # process ever holds a whole model. accelerate's own zero.Init switch stays off: preftune loads itself
    # the accelerate config's DeepSpeed fields are in `config` already (zero_settings read them); with them
    # still named in the environment, accelerate would refuse a config given beside them
    fields = os.environ.pop("ACCELERATE_CONFIG_DS_FIELDS", None)
    try:
        return DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=False)
    finally:
        if fields is not None:
            os.environ["ACCELERATE_CONFIG_DS_FIELDS"] = fields


def fill_model_sizes(config: dict, hidden_size: int) -> dict:
    """The bucket sizes DeepSpeed's configs leave "auto", from the model's hidden size (accelerate's rule)."""
    zero = config.get("zero_optimization", {})
    for key, value in (("reduce_bucket_size", hidden_size * hidden_size),
                       ("stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size)),
                       ("stage3_param_persistence_threshold", 10 * hidden_size)):
        if zero.get(key) == "auto":
            zero[key] = value
    return config


def keep_used_conversions(model) -> None:
    """The checkpoint key renames a save reverts: those the load used, as from_pretrained keeps them. Loaded under
    zero.Init, transformers 5.23 (integrations.deepspeed `_load_state_dict_into_zero3_model`) keeps every rename of
    the model's mapping, so a save would also apply the reverse of renames the checkpoint never needed: a
    LLaVA would be written as language_model.model.model.layers..., vision_tower.vision_model..., not the names it
    was read with (and that a one-process run writes)."""
    base = model.get_base_model() if is_peft_model(model) else model
    conversions = getattr(base, "_weight_conversions", None)
    if conversions:
        base._weight_conversions = [c for c in conversions if c.was_used()]


def reference_engine(root, accelerator):
    """A frozen model (its `LogpsModule`) under ZeRO-3, partitioned over the processes as the
    policy is, in evaluation mode: the config of the run without optimizer (as TRL prepares its
    reference). Call after the Accelerator exists (it holds the filled config)."""
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    fill_model_sizes(config, root.model.config.get_text_config().hidden_size)  # (a VLM: its language model's)
    config["zero_optimization"]["stage3_prefetch_bucket_size"] = 0  # as TRL: no prefetching for an eval-only engine
    for key in ("optimizer", "scheduler", "zero_force_ds_cpu_optimizer"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    engine, *_ = deepspeed.initialize(model=root, config=config)
    engine.eval()
    log.info("deepspeed: the reference (%s) partitioned over %d processes (ZeRO-3, evaluation only)",
             type(root.model).__name__, accelerator.num_processes)
    return engine


def use_ulysses(model, sequence_parallel_size: int) -> None:
    """Sequence parallelism for every pass of this process: DeepSpeed's Ulysses attention (ALST) in place of the
    model's attention function (sdpa, flash-attn or flex), over groups of `sequence_parallel_size` consecutive
    processes (DeepSpeed's `parallel_state_sp`), and the log-prob passes split each row over the group
    (`logps.split_sequences`, with the group's differentiable sum). Around attention an all-to-all swaps the
    sequence split for a head split, so each process attends over the whole sequence for its heads; masks are
    dropped (a full-length one is the memory this exists to save) and attention is causal by the gathered
    positions, which right-padded rows allow. What DeepSpeed's `register_with_transformers` does, with any
    number of rows per pass (its attention fixes one: training, evaluation and reference batches differ)."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    class AnyRows(UlyssesSPAttentionHF):
        def forward(self, module, query, *args, **kwargs):  # query (rows, heads, T/S, head size)
            rows = query.size(0)
            self.batch_size = rows
            self.required_query_shape, self.required_key_value_shape, self.required_context_shape = (
                torch.Size([shape[0], rows, *shape[2:]]) for shape in
                (self.required_query_shape, self.required_key_value_shape, self.required_context_shape))
            return super().forward(module, query, *args, **kwargs)

    text = model.config.get_text_config()
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(text, key)
        if heads % sequence_parallel_size and (key == "num_attention_heads" or sequence_parallel_size % heads):
            raise ConfigError(f"sequence_parallel_size: {sequence_parallel_size} processes split the attention heads "
                              f"between them, and this model's {key} is {heads}; use a size that divides it")
    implementation = model.config._attn_implementation
    if implementation not in ALL_ATTENTION_FUNCTIONS:  # eager: no function to wrap, and it needs the masks
        raise ConfigError(f"sequence_parallel_size: the model runs attn_implementation {implementation}, which "
                          "Ulysses cannot split; use sdpa, flash_attention_2 or flex_attention")
    parallel_state_sp.initialize_sequence_parallel(sequence_parallel_size)
    group = parallel_state_sp.get_sequence_parallel_group()
    attention = AnyRows(ALL_ATTENTION_FUNCTIONS[implementation], batch_size=1,
                        attn_head_count=text.num_attention_heads,
                        attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
                        kv_head_count=text.num_key_value_heads, num_hidden_layers=text.num_hidden_layers,
                        process_group=group, seq_length_is_variable=True)
    attention.core_attn_implementation = implementation

    def split_attention(module, query, key, value, attention_mask, *args, **kwargs):
        return attention(module, query, key, value, None, *args, **kwargs)  # (the mask: of the slice, dropped)

    def total(partial: torch.Tensor) -> torch.Tensor:
        from torch.distributed.nn.functional import all_reduce  # differentiable: its backward all-reduces too

        return all_reduce(partial, group=group)

    ALL_ATTENTION_FUNCTIONS[implementation] = split_attention
    split_sequences(SequenceSplit(parallel_state_sp.get_sequence_parallel_rank(), sequence_parallel_size, total))


def describe(settings: dict, world: int, mixed_precision: str = "no", sequence_parallel: int = 1) -> str:
    zero = settings["config"].get("zero_optimization", {})
    offload = [what for what in ("optimizer", "param") if zero.get(f"offload_{what}", {}).get("device", "none") != "none"]
    parts = [settings["source"]] + ([f"{' and '.join(offload)} offloaded to the CPU"] if offload else [])
    if settings["stage"] == 3:  # transformers loads under zero.Init when it sees a ZeRO-3 config (make_plugin)
        parts.append("weights loaded partitioned (zero.Init)")
    if mixed_precision in ("bf16", "fp16"):  # DeepSpeed's mixed precision: not autocast over fp32 weights
        parts.append(f"weights held and computed in {mixed_precision}, fp32 master copies in the optimizer")
    if sequence_parallel > 1:
        parts.append(f"each sequence split over {sequence_parallel} processes (Ulysses): data-parallel world "
                     f"{world // sequence_parallel}")
    return f"deepspeed: the policy under ZeRO stage {settings['stage']} over {world} processes ({'; '.join(parts)})"


# --- the engine -----------------------------------------------------------------------------------


def _partitioned(param) -> bool:
    return hasattr(param, "ds_id")  # a ZeRO-3 parameter: each process holds only its part (ds_tensor)


class ZeRO(OneProcess):
    """DeepSpeed ZeRO over every process of the launcher (module docstring)."""

    checkpoint_format = "deepspeed"  # DeepSpeed's own partitioned files in the checkpoint's deepspeed/
    lockstep = True

    def __init__(self, cfg, settings: dict, log_with=None):
        from preftune.engines import make_accelerator

        world = int(os.environ.get("WORLD_SIZE", "1"))
        plugin = make_plugin(cfg, settings, world)
        # (on CPU processes make_accelerator names gloo for DeepSpeed's process group: process_group_kwargs)
        super().__init__(cfg, make_accelerator(cfg, log_with, deepspeed_plugin=plugin))
        self.settings = settings
        self.sequence_parallel = cfg.sequence_parallel_size  # processes per sequence (use_ulysses)
        if world % self.sequence_parallel:
            raise ConfigError(f"sequence_parallel_size: {self.sequence_parallel} does not divide the {world} processes "
                              "of this launch; launch a multiple of it")
        self.held_dtypes: dict[str, torch.dtype] = {}  # the policy's dtypes before DeepSpeed's cast (bf16): saved in these
        self.policy_engine = None  # the DeepSpeedEngine `prepare` made

    @property
    def data_shard(self) -> tuple[int, int]:
        # sequence parallelism: consecutive processes form a group that takes one share (the same pairs)
        return self.rank // self.sequence_parallel, self.world // self.sequence_parallel

    def check(self, cfg) -> None:
        check(cfg, self.settings)

    def prepare_reference(self, model, chunk_size: int):
        if self.settings["stage"] < 3:  # a plain copy per process, as TRL does
            return super().prepare_reference(model, chunk_size)
        # ZeRO-3 weights are whole only inside their module's call: the LM head is called, never read
        return reference_engine(LogpsModule(model, chunk_size, call_head=True), self.accelerator)

    def prepare(self, policy_logps, make_optimizer, reference):
        model = policy_logps.model
        # before the engine casts the weights (bf16)
        self.loaded_dtypes = {n: getattr(p, LOADED_DTYPE) for n, p in model.named_parameters() if hasattr(p, LOADED_DTYPE)}
        self.held_dtypes = {n: p.dtype for n, p in model.named_parameters()}
        fill_model_sizes(self.accelerator.state.deepspeed_plugin.deepspeed_config,
                             model.config.get_text_config().hidden_size)
        keep_used_conversions(model)
        # ZeRO-3 weights are whole only inside their module's call: the LM heads are called, never read (the
        # policy's, and the policy's own as a LoRA reference reads it)
        policy_logps.call_head = reference.call_head = self.settings["stage"] == 3
        if self.sequence_parallel > 1:
            if policy_logps.router_aux_loss_coef:
                raise ConfigError("sequence_parallel_size: a mixture-of-experts model's load-balancing loss "
                                  "(router_aux_loss_coef) counts each process's slice only; set router_aux_loss_coef: "
                                  "0, or sequence_parallel_size: 1")
            # the gradients stay averaged over every process: within a group the differentiable sum of the
            # log-probs (logps) gives each process sequence_parallel_size x its slice's share, which the
            # average over all processes turns into the data-parallel mean
            use_ulysses(model, self.sequence_parallel)
        engine, optimizer = self.accelerator.prepare(policy_logps, make_optimizer())
        log.info("%s", describe(self.settings, self.world, self.accelerator.mixed_precision, self.sequence_parallel))
        self.policy_engine = engine
        return engine, optimizer

    def unwrap(self, policy_logps):
        return getattr(policy_logps, "module", policy_logps)  # a DeepSpeedEngine holds it as .module

    @contextlib.contextmanager
    def accumulate(self, policy_logps, sync: bool):
        # the engine reduces the gradients in the backward of the step's last micro-batch
        policy_logps.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, policy_logps, loss: torch.Tensor) -> None:
        policy_logps.backward(loss, scale_wrt_gas=False)

    def update(self, policy_logps, optimizer, max_grad_norm: float, skip) -> tuple[float, bool]:
        """DeepSpeed's step clips (gradient_clipping = max_grad_norm), updates and zeroes the gradients, and
        cannot be skipped from outside (`check` refuses skip_nonfinite_steps): the loss is checked before it
        (`skip` with a norm of 0.0, not known yet), the gradient norm after; a non-finite one stops the run.
        Returns (the norm, whether the weights changed: not after an fp16 overflow)."""
        skip(0.0)
        policy_logps.step()
        # accelerate's wrapper of the optimizer does nothing here (DeepSpeed stepped it just above); called so that
        # the learning-rate schedule, made on the wrapper, knows a step happened (torch warns otherwise)
        optimizer.step()
        if not policy_logps.was_step_applied():
            # fp16: DeepSpeed's loss scaler skipped an update whose gradients overflowed (and lowered the scale);
            # the weights did not change, so neither does the schedule, and the overflow is not a non-finite
            # step (the one-process engine: the same)
            return float("nan"), False
        norm = policy_logps.get_global_grad_norm()
        grad_norm = float("nan") if norm is None else float(norm)
        skip(grad_norm)
        return grad_norm, True

    @contextlib.contextmanager
    def gathered(self, *modules):
        """The LM heads of ZeRO-3 models whole (a DeepSpeedEngine holds the log-prob module as .module)."""
        models = [getattr(getattr(m, "module", m), "model", None) for m in modules if m is not None]
        params = [p for m in models if m is not None for p in m.get_output_embeddings().parameters() if _partitioned(p)]
        if not params:
            yield
            return
        from deepspeed import zero

        with zero.GatheredParameters(params):
            yield

    def settle(self) -> None:
        """ZeRO-3 prefetches weights for a next forward; those still in flight could not be gathered: release
        them first."""
        if self.policy_engine is not None:
            self.policy_engine.empty_partition_cache()

    @contextlib.contextmanager
    def mixing(self, ref, weight):
        """ZeRO-3: both weights gathered whole, one pair at a time (as TRL mixes them), the reference's update
        kept from the main process's; ZeRO-1/2: the weights themselves (whole on every process)."""
        from deepspeed import zero

        if not _partitioned(ref):
            yield ref, weight
            return
        with zero.GatheredParameters([weight]), zero.GatheredParameters([ref], modifier_rank=0):
            yield ref.data, weight.data

    def whole_tensor(self, param):
        from deepspeed import zero

        with zero.GatheredParameters([param]) if _partitioned(param) else contextlib.nullcontext():
            return param.data.detach().cpu().clone() if self.is_main else None

    def load_whole(self, param, tensor) -> None:
        from deepspeed import zero

        with zero.GatheredParameters([param], modifier_rank=0) if _partitioned(param) else contextlib.nullcontext():
            with torch.no_grad():
                param.data.copy_(tensor.to(param.dtype))

    def whole_weights(self, model, loaded_dtypes: bool = False) -> dict[str, torch.Tensor]:
        """As the model holds them (ZeRO writes each step's update back into them; under bf16, rounded from the
        fp32 master copies), in the dtypes it had before the engine. ZeRO-3 weights are gathered one at a
        time, so no process ever holds the whole model; a LoRA model: only its trained adapter."""
        from deepspeed import zero

        self.settle()
        ignore_frozen = is_peft_model(model)
        state = {}
        for name, param in model.named_parameters():  # (each parameter once: a tied one under its first name)
            if ignore_frozen and not param.requires_grad:
                continue
            with zero.GatheredParameters([param]) if _partitioned(param) else contextlib.nullcontext():
                if self.is_main:  # in the dtype the model had before DeepSpeed's bf16 cast (the masters' bf16 rounding)
                    state[name] = param.data.detach().cpu().to(self.held_dtypes.get(name, param.dtype))
        return self.as_saved(model, state, loaded_dtypes)

    def load_weights(self, model, folder: Path) -> None:
        """Every process reads the whole weights; ZeRO-3 ones are partitioned again after. For a model that
        is only saved afterwards (the best model kept at the end): ZeRO's fp32 master copies in the optimizer
        are not updated."""
        from deepspeed import zero

        self.settle()
        state = read_weights(model, folder)
        for name, param in model.named_parameters():
            if name not in state:
                continue
            with zero.GatheredParameters([param], modifier_rank=0) if _partitioned(param) else contextlib.nullcontext():
                with torch.no_grad():
                    param.data.copy_(state[name].to(param.dtype))

    def save_optimizer(self, policy_logps, optimizer, folder: Path) -> None:
        """DeepSpeed's partitioned optimizer state (and its view of the weights) into folder/deepspeed."""
        policy_logps.save_checkpoint(str(folder / ENGINE_DIR), tag=_TAG, save_latest=False)

    def load_checkpoint(self, policy_logps, optimizer, model, folder: Path) -> None:
        """The weights and optimizer state `save_optimizer` wrote (same number of processes): DeepSpeed's
        own files hold both, so the fp32 master copies come back exactly."""
        path = folder / ENGINE_DIR
        if not (path / _TAG).is_dir():
            raise ConfigError(f"resume_from_checkpoint: {folder} has no {ENGINE_DIR}/ folder (it was not written "
                              "under deepspeed); resume with the setting it was written with")
        loaded, _ = policy_logps.load_checkpoint(str(path), tag=_TAG, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False, load_module_strict=True)
        if loaded is None:
            raise ConfigError(f"resume_from_checkpoint: DeepSpeed could not read {path}; resume with the same "
                              "deepspeed config and number of processes it was written with")
