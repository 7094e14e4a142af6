"""Fine-tuning types beyond full: LoRA through `peft`, freezing layers, QLoRA loading, and the
reference model a LoRA policy carries inside itself.

Key names and semantics follow LLaMA-Factory (`lora_rank`, `lora_target: all`,
`freeze_trainable_layers`, `adapter_name_or_path`, ...). `models.load_policy`
calls these; the training loop never needs to know which type it trains, because the
optimizer takes the parameters that require gradients and `get_batch_logps` reads any model
through its backbone (`get_decoder()`) and LM head (`get_output_embeddings()`).

The reference of a LoRA run is the policy with its adapter switched off (`AdapterReference`):
no second copy of the weights. When the run starts from base + an SFT adapter, switching the
adapter off would give the bare base, not the SFT model the run starts from; a frozen copy of
that adapter (adapter-sized) is loaded under the name `reference` and the reference runs with
it instead.

A vision-language model (docs/vision.md): LLaMA-Factory's freeze_vision_tower, freeze_multi_modal_projector and
freeze_language_model name the parts that do not train: frozen under full fine-tuning (`freeze_vision_parts`),
without adapters under LoRA (`lora_excluded`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import sys
from pathlib import Path

import torch

from preftune.errors import ConfigError, ModelError

TRAINED_ADAPTER = "default"  # peft's name for the adapter it creates or loads first
REFERENCE_ADAPTER = "reference"  # the frozen copy of a starting adapter (the SFT model)


def is_peft_model(model) -> bool:
    """Whether `model` is a peft model. peft is imported only by a run that makes one (it costs seconds and,
    with bitsandbytes installed, its kernels): a model cannot be one while peft is not imported."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def split_names(value: str | None) -> list[str]:
    """A comma list of names or paths as a list (empty for None)."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _load_adapter(model, path: str, key: str, **kwargs):
    from peft import PeftModel

    if not (Path(path).expanduser() / "adapter_config.json").is_file() and path.startswith((".", "/", "~")):
        raise ModelError(f"{key}: '{path}' is not an adapter folder (no adapter_config.json)")
    try:
        return PeftModel.from_pretrained(model, path, **kwargs)
    except Exception as e:  # peft, safetensors and torch raise several types for a bad adapter folder
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{key}: cannot load adapter '{path}': {first}") from None


def with_adapters(model, paths: list[str], key: str):
    """`model` with each LoRA adapter in `paths` merged into its weights, in order. A quantized
    model takes one adapter, kept beside the weights: merging into 4/8-bit weights loses precision."""
    if getattr(model, "is_quantized", False) and paths:
        if len(paths) > 1:
            raise ConfigError(f"{key}: a quantized model takes one adapter (merging into quantized weights loses "
                              f"precision); got {len(paths)}")
        return _load_adapter(model, paths[0], key)
    for path in paths:
        model = _load_adapter(model, path, key).merge_and_unload()
    return model


def quantized_device_map(bits: int, key: str) -> dict:
    """Where a bitsandbytes-quantized model is placed (bitsandbytes quantizes as it places): the
    current CUDA GPU, or one clear line without one. bitsandbytes >= 0.46 also runs on CPU, and the
    tests run QLoRA there by replacing this function; training a quantized model on CPU is far too
    slow to offer users."""
    if not torch.cuda.is_available():
        raise ModelError(f"{key}: {bits}: bitsandbytes quantization needs a CUDA GPU and this machine has none; "
                         f"remove {key} (or train on a GPU)")
    return {"": torch.cuda.current_device()}


def quantization_config(bits: int, key: str, torch_dtype):
    """transformers' BitsAndBytesConfig for `bits`, or one clear line where it cannot run."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"{key}: {bits}: needs the bitsandbytes package; pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch_dtype if isinstance(torch_dtype, torch.dtype) else (
        torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16)
    # NF4 with double quantization: the QLoRA paper's setting, and LLaMA-Factory's default
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def apply_lora(model, cfg, reference_adapter: bool):
    """The policy as a peft model whose only trainable weights are the LoRA adapter
    (plus `additional_target` modules).

    adapter_name_or_path a,b,c: a and b are merged into the base, c continues training (its
    own rank and targets; the lora_* keys then do not apply). With `reference_adapter`, a
    frozen copy of c is loaded too, for the reference (module docstring).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_quantized", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=cfg.gradient_checkpointing_kwargs
                                                or {"use_reentrant": False})
    paths = split_names(cfg.adapter_name_or_path)
    if paths:
        if getattr(model, "is_quantized", False) and len(paths) > 1:
            raise ConfigError("adapter_name_or_path: a quantized policy takes one adapter (merging into quantized "
                              f"weights loses precision); got {len(paths)}")
        model = with_adapters(model, paths[:-1], "adapter_name_or_path")
        model = _load_adapter(model, paths[-1], "adapter_name_or_path", is_trainable=True)
        if reference_adapter:
            model.load_adapter(paths[-1], adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            model.set_adapter(TRAINED_ADAPTER)
        return model
    target = "all-linear" if cfg.lora_target.strip() == "all" else split_names(cfg.lora_target)
    # a reward model (stage: rm) is a sequence classifier: peft's SEQ_CLS trains and saves its new score head whole
    # (modules_to_save), as TRL's RewardTrainer advises
    lora = LoraConfig(task_type="SEQ_CLS" if cfg.stage == "rm" else "CAUSAL_LM", r=cfg.lora_rank, lora_alpha=cfg.lora_alpha or 2 * cfg.lora_rank,
                      lora_dropout=cfg.lora_dropout, target_modules=target, use_dora=cfg.use_dora,
                      use_rslora=cfg.use_rslora, modules_to_save=split_names(cfg.additional_target) or None,
                      exclude_modules=lora_excluded(model, cfg))  # a vision-language model's frozen parts
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:  # a target that names no module of this model
        linear = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        first = str(e).strip().splitlines()[0]
        raise ConfigError(f"lora_target / additional_target: {first}. Linear modules of this model: "
                          f"{', '.join(linear)}") from None
    if reference_adapter:  # a moving reference (sync_ref_model) starts as a frozen copy of the new adapter
        model.add_adapter(REFERENCE_ADAPTER, lora)
        with torch.no_grad():
            for reference, trained in adapter_pairs(model):
                if not trained.is_meta:  # (built without weights, FSDP2: the main process's copy fills it)
                    reference.copy_(trained)
        model.set_adapter(TRAINED_ADAPTER)  # the trained adapter active and trainable, the copy frozen
    return model


def adapter_pairs(model) -> list[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(the `reference` adapter's weight, the trained adapter's same weight) for every weight of the trained
    adapter (lora_A, lora_B, DoRA's magnitudes, additional_target's module copies): peft names them alike but
    for the adapter's name, e.g. `...q_proj.lora_A.default.weight` and `...q_proj.lora_A.reference.weight`."""
    params = dict(model.named_parameters())
    pairs = []
    for name, param in params.items():
        parts = name.split(".")
        if TRAINED_ADAPTER not in parts:
            continue
        twin = ".".join(REFERENCE_ADAPTER if part == TRAINED_ADAPTER else part for part in parts)
        if twin not in params or params[twin].shape != param.shape:
            raise ModelError(f"the reference adapter has no weight {twin} of the trained adapter's shape "
                             f"{tuple(param.shape)}: it must have the trained adapter's rank and targets")
        pairs.append((params[twin], param))
    return pairs


def is_vision_config(config) -> bool:
    """A vision-language model's config: one with a vision tower (LLaVA, Qwen2-VL, Gemma 3, Idefics3, ...)."""
    return getattr(config, "vision_config", None) is not None


# The parts a vision-language model's parameters belong to, by a component of their names (LLaMA-Factory's
# vision_model_keys / projector_key / language_model_keys), the freeze_* key of each: LLaVA's names, and Qwen2-VL's
# (its projector, `merger`, lives inside `visual`: the projector is looked for first). Others: none frozen.
PARTS = (("freeze_multi_modal_projector", ("multi_modal_projector", "merger")),
         ("freeze_vision_tower", ("vision_tower", "visual", "vision_model")),
         ("freeze_language_model", ("language_model", "lm_head")))


def frozen_by(name: str, cfg) -> str | None:
    """The freeze_* key that keeps parameter or module `name` of a vision-language model from training, or None."""
    parts = name.split(".")
    key = next((key for key, names in PARTS if any(n in parts for n in names)), None)
    return key if key is not None and getattr(cfg, key) else None


def freeze_vision_parts(model, cfg) -> None:
    """finetuning_type full: the parts of a vision-language model their freeze_* keys name are not trained
    (LLaMA-Factory's defaults: the vision tower and the projector frozen, the language model trained)."""
    if not is_vision_config(model.config):
        if cfg.freeze_language_model:
            raise ConfigError("freeze_language_model: true on a text-only model would leave nothing to train; "
                              "remove it")
        return
    for name, param in model.named_parameters():
        if frozen_by(name, cfg):
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("freeze_vision_tower, freeze_multi_modal_projector, freeze_language_model: every part of "
                          "the model is frozen; set one of them to false")


def lora_excluded(model, cfg) -> list[str] | None:
    """finetuning_type lora: the linear modules of a vision-language model's frozen parts, which get no adapter
    (peft's exclude_modules); None for a text-only model."""
    if not is_vision_config(model.config):
        if cfg.freeze_language_model:
            raise ConfigError("freeze_language_model: true on a text-only model would leave nothing to train; "
                              "remove it")
        return None
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and frozen_by(name, cfg)] or None


def apply_freeze(model, cfg) -> None:
    """Freeze every parameter but those of the trainable layers (LLaMA-Factory's freeze tuning):
    freeze_trainable_layers N > 0 trains the last N layers, N < 0 the first -N; within them only
    the modules in freeze_trainable_modules (or all); plus freeze_extra_modules outside the layers."""
    n_layers = model.config.get_text_config().num_hidden_layers
    k = cfg.freeze_trainable_layers
    layer_ids = set(range(max(0, n_layers - k), n_layers) if k > 0 else range(min(-k, n_layers)))
    modules, extra = split_names(cfg.freeze_trainable_modules), split_names(cfg.freeze_extra_modules)
    in_layer, outside = set(), set()
    located = {}  # parameter name -> (layer index, module name inside the layer) or None outside the layers
    for name, _ in model.named_parameters():
        # the first numeric component of a name is its layer index: model.layers.3.mlp.up_proj.weight
        m = re.search(r"\.(\d+)\.([^.]+)", name)
        located[name] = (int(m.group(1)), m.group(2)) if m else None
        if m:
            in_layer.add(m.group(2))
        else:
            outside.add(name.split(".")[-2] if name.count(".") else name)
    for key, names, known in (("freeze_trainable_modules", modules, in_layer), ("freeze_extra_modules", extra, outside)):
        for module in names:
            if module != "all" and module not in known:
                raise ConfigError(f"{key}: no module '{module}' in this model; choose from {', '.join(sorted(known))}")
    for name, param in model.named_parameters():
        where = located[name]
        if where is None:
            trainable = (name.split(".")[-2] if name.count(".") else name) in extra
        else:
            trainable = where[0] in layer_ids and ("all" in modules or where[1] in modules)
        param.requires_grad_(trainable)


def _reference_head(head: torch.nn.Module, adapter: str | None) -> torch.nn.Module:
    """The LM head as the reference sees it: the original one when `additional_target` trains a copy."""
    from peft.utils import ModulesToSaveWrapper

    if isinstance(head, ModulesToSaveWrapper):
        return head.modules_to_save[adapter] if adapter in head.modules_to_save else head.original_module
    return head


class _UnderContext(torch.nn.Module):
    """`module`, with every call run inside `context()` (the reference's adapter setting)."""

    def __init__(self, module: torch.nn.Module, context):
        super().__init__()
        self.module, self.context = module, context

    def forward(self, *args, **kwargs):
        with self.context():
            return self.module(*args, **kwargs)

    def get_image_features(self, *args, **kwargs):
        """A vision-language backbone's image features (logps encodes each pair's images once), in the context."""
        with self.context():
            return self.module.get_image_features(*args, **kwargs)


class AdapterReference:
    """The reference model read from a LoRA policy's own weights, for `get_batch_logps` and
    `completion_kl`: the backbone runs with the trained adapter off (or with the frozen
    `reference` adapter on), in eval mode (no dropout), and the LM head is the original one.
    Not an nn.Module on purpose: it holds no weights of its own, so nothing prepares, moves or
    saves it twice."""

    def __init__(self, policy, adapter: str | None = None):
        self.policy, self.adapter = policy, adapter
        self.config = policy.config

    @contextlib.contextmanager
    def active(self):
        was_training = self.policy.training
        self.policy.eval()
        try:
            if self.adapter is None:
                with self.policy.disable_adapter():
                    yield
            else:
                self.policy.set_adapter(self.adapter, inference_mode=True)
                try:
                    yield
                finally:
                    self.policy.set_adapter(TRAINED_ADAPTER)  # the trained adapter requires grad again
        finally:
            self.policy.train(was_training)

    def get_decoder(self) -> torch.nn.Module:
        return _UnderContext(self.policy.get_decoder(), self.active)

    def multimodal_backbone(self) -> torch.nn.Module:
        """A vision-language policy's whole backbone (logps.multimodal_backbone), under the same adapter setting."""
        from preftune.logps import multimodal_backbone

        return _UnderContext(multimodal_backbone(self.policy), self.active)

    def get_output_embeddings(self) -> torch.nn.Module:
        return _reference_head(self.policy.get_output_embeddings(), self.adapter)
