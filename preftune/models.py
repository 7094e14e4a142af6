"""Loading the policy, the reference and the tokenizer through `transformers` (and `peft`).

Weights are read by `from_pretrained`: safetensors, or for old `.bin` checkpoints
`torch.load(weights_only=True)`, never a full unpickle. `trust_remote_code` is passed as the
config says (default False) to every load: tokenizer, policy, reference.

Precision: the policy's trainable weights are held in float32 whatever dtype they load in
(`hold_trainable_weights`; pure_bf16: bfloat16), frozen weights and the reference stay as loaded,
and the final save writes each weight back in its loaded dtype (`restore_loaded_dtypes`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                          AutoModelForSequenceClassification, AutoTokenizer)
from transformers.integrations import is_deepspeed_zero3_enabled

from preftune import adapters
from preftune.adapters import (apply_freeze, apply_lora, freeze_vision_parts, is_vision_config, split_names,
                               with_adapters)
from preftune.errors import ConfigError, ModelError
from preftune.guard import TOKENIZER_FILES, check_model_dir

log = logging.getLogger("preftune")

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# Set on a trainable weight that training holds in float32 although it was loaded in another dtype:
# that dtype, for the final save (`restore_loaded_dtypes`). On the parameter itself, because the
# names change when a LoRA policy is merged, and the parameter objects do not.
LOADED_DTYPE = "preftune_loaded_dtype"


def load_dtype(cfg):
    """The dtype every model of the run is loaded in: torch_dtype, where pure_bf16 makes auto bfloat16."""
    dtype = DTYPES[cfg.torch_dtype]
    return torch.bfloat16 if cfg.pure_bf16 and dtype == "auto" else dtype


def check_attention(cfg) -> None:
    """flash_attention_2 needs the flash_attn package: one line naming the key before any model
    loads, not transformers' ImportError from deep inside from_pretrained."""
    if cfg.attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        key = "flash_attn: fa2" if cfg.flash_attn == "fa2" else "attn_implementation: flash_attention_2"
        raise ModelError(f"{key} needs the flash_attn package, which is not installed; pip install flash-attn "
                         "(CUDA), or flash_attn: sdpa")


def _check_reachable(name: str | None, what: str, tokenizer: bool = False) -> None:
    """A path-looking name that does not exist is a typo, not a hub id; a local folder must hold what
    is loaded from it, intact (guard.check_model_dir): said before transformers builds anything."""
    if not name:
        raise ConfigError(f"{what} is not set; give a hub id or a model folder")
    check_model_dir(name, what, tokenizer=tokenizer, weights=not tokenizer)


def _load_error(name: str, what: str, err: Exception) -> ModelError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelError(f"{what}: cannot load '{name}': {first}. Check the id or folder (and network access or "
                      "HF_HUB_OFFLINE for hub ids)")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    _check_reachable(name, "model_name_or_path", tokenizer=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # tokenizers, sentencepiece and transformers raise many types for a bad file
        raise _load_error(name, "model_name_or_path", e) from None
    if len(tokenizer) == 0:
        raise ModelError(f"model_name_or_path: '{name}': its tokenizer has no vocabulary; copy the tokenizer files "
                         "from the model it was trained from")
    if tokenizer.pad_token_id is None:
        # padding is masked out everywhere; any id will do, EOS is the usual choice
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_kwargs(cfg, policy: bool) -> dict:
    """from_pretrained's keyword arguments for the policy (policy=True) or a separately loaded reference."""
    quantization_key = "quantization_bit" if policy else "ref_model_quantization_bit"
    quantization_bit = cfg.quantization_bit if policy else cfg.ref_model_quantization_bit
    kwargs = {"dtype": load_dtype(cfg), "trust_remote_code": cfg.trust_remote_code}
    if cfg.attention:
        kwargs["attn_implementation"] = cfg.attention
    if quantization_bit:
        kwargs["device_map"] = adapters.quantized_device_map(quantization_bit, quantization_key)
        kwargs["quantization_config"] = adapters.quantization_config(quantization_bit, quantization_key,
                                                                     kwargs["dtype"])
    return kwargs


def whole_load_reason(name: str, cfg, what: str = "model_name_or_path") -> str | None:
    """Why model `name` can only be built by reading its weights, or None where it can be built without
    them from its config (`empty_model`): a model quantized as it loads, or one loaded with torch_dtype auto
    whose config names no dtype."""
    policy = what == "model_name_or_path"
    if cfg.quantization_bit if policy else cfg.ref_model_quantization_bit:
        return "it is quantized as it loads"
    if cfg.model_init_kwargs:
        return "model_init_kwargs are from_pretrained's"
    if load_dtype(cfg) != "auto":
        return None
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise _load_error(name, what, e) from None
    return "torch_dtype auto, and its config names no dtype" if config.dtype is None else None


def load_model(name: str, cfg, what: str = "model_name_or_path", read_weights: bool = True):
    """The policy (what = model_name_or_path) or a separately loaded reference (any other `what`),
    quantized as quantization_bit / ref_model_quantization_bit say. `read_weights` False: build it
    without reading any weight (`empty_model`: parameters on the meta device), for an engine that fills
    them from another process (FSDP2's main process reads them); only where `whole_load_reason` is None."""
    _check_reachable(name, what)
    check_attention(cfg)
    kwargs = _load_kwargs(cfg, policy=what == "model_name_or_path")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)
        auto, labels = auto_class(config), {}
        if cfg.stage == "rm" and what == "model_name_or_path":
            # a reward model: the backbone with a score head of one output (r(x, y)), as TRL's RewardTrainer and
            # LLaMA-Factory load it; from a causal LM checkpoint the head is new (initialised by seed), from a
            # reward model's folder it is read
            auto, labels = AutoModelForSequenceClassification, {"num_labels": 1}
        if read_weights:  # model_init_kwargs: TRL's, for the policy and a reference loaded from a path alike
            # under ZeRO-3 transformers builds the model on real tensors (zero.Init), where a module's own draw in
            # __init__ (CLIP's class_embedding: torch.randn) moves the RNG that a one-process load (a meta-device
            # build) leaves alone: LoRA's initial weights would differ from a one-process run's
            with torch.random.fork_rng(devices=[]) if is_deepspeed_zero3_enabled() else contextlib.nullcontext():
                return auto.from_pretrained(name, **kwargs, **labels, **(cfg.model_init_kwargs or {}))
        if labels:  # (from_config takes no num_labels: the config carries it)
            config.num_labels = 1
        return empty_model(config, kwargs, auto)
    except Exception as e:  # safetensors, torch, transformers (a missing optional package) raise many types
        raise _load_error(name, what, e) from None


def auto_class(config):
    """transformers' image-text-to-text auto class for a vision-language model (vision.py), else the causal LM's."""
    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


def empty_model(config, kwargs: dict, auto=None):
    """The model `from_pretrained(**kwargs)` builds from `config`, without reading any weight: parameters
    on the meta device (no memory), buffers real (rotary inv_freq is computed from the config, and is
    not in the checkpoint), tied as from_pretrained ties them, in eval mode as it leaves them."""
    from accelerate import init_empty_weights

    kwargs = {**kwargs, "dtype": config.dtype if kwargs["dtype"] == "auto" else kwargs["dtype"]}
    with init_empty_weights(include_buffers=False):
        model = (auto or auto_class(config)).from_config(config, **kwargs)
    model.tie_weights()  # from_config does not tie meta parameters
    return model.eval()


def check_vocabulary(model, tokenizer, what: str,
                     fix: str = "a reference must use the policy's tokenizer (same model family)") -> None:
    """The model must have an embedding row for every token id the tokenizer produces: a reference
    (or export --ref) built on another tokenizer would fail deep in the embedding lookup instead.
    Rows beyond the tokenizer are fine (checkpoints pad their vocabulary, e.g. Qwen2.5 sizes differ)."""
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ModelError(f"{what}: its vocabulary has {rows} tokens but the policy's tokenizer has {len(tokenizer)}; "
                         f"{fix}")


def check_same_tokenizer(tokenizer, name: str, what: str, fix: str, trust_remote_code: bool = False,
                         against: str | None = None) -> None:
    """The model `name` (named by the key `what`) must read token ids as `tokenizer` writes them: a
    reference or a second evaluated model scores the policy's token ids, and on another tokenizer those
    ids stand for other text (a KL or log-ratio that means nothing, exit 0), or run past its vocabulary.

    The check is exact and cheap: the two tokenizers' vocabularies (token text -> id, added tokens
    included) must be equal. Special-token roles are not compared: the other model only scores ids the
    policy's tokenizer wrote, so a base and its instruct model (same ids, eos <|endoftext|> vs
    <|im_end|>) belong together. A model whose tokenizer cannot be read (no tokenizer files) is
    compared by vocabulary size alone (`check_vocabulary`), with a warning."""
    against = against or f"model_name_or_path '{tokenizer.name_or_path}'"
    folder_without = Path(name).expanduser().is_dir() and not any(
        (Path(name).expanduser() / f).is_file() for f in TOKENIZER_FILES)
    try:
        if folder_without:
            raise OSError("no tokenizer files")
        other = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - whatever stops reading it, the size check below still holds
        log.warning("%s '%s': its tokenizer cannot be read (%s), so it is not compared with %s's; only the "
                    "vocabulary size is checked", what, name, str(e).strip().splitlines()[0] if str(e).strip()
                    else type(e).__name__, against)
        return
    mine, theirs = tokenizer.get_vocab(), other.get_vocab()
    if mine == theirs:
        return
    moved = sum(1 for t, i in mine.items() if theirs.get(t) != i)
    detail = (f"the same {len(mine)} tokens in size, but {moved} of them with other ids" if len(mine) == len(theirs)
              else f"{len(theirs)} tokens against {len(mine)}, {moved} of them missing or with other ids")
    raise ModelError(f"{what} '{name}' has another tokenizer than {against} ({detail}): its log-probs of these "
                     f"token ids would mean nothing; {fix}")


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Set every dropout probability: nn.Dropout modules and the functional attention dropout."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p


def load_policy(cfg, reference_adapter: bool = False, read_weights: bool = True):
    """The policy to train: a peft model for finetuning_type: lora, with frozen layers for freeze,
    dropout set as the config says. `reference_adapter`: a LoRA policy that starts from
    adapter_name_or_path also loads a frozen copy of its last adapter, for the reference
    (`adapters.AdapterReference`; `reference.load_models` decides). `read_weights`: see `load_model`."""
    if cfg.padding_free and cfg.attention not in ("flash_attention_2", "flex_attention"):
        log.warning("padding_free with %s attention: the same numbers, but attention runs over the whole packed row "
                    "(a mask keeps the sequences apart); flash_attention_2 or flex_attention make it pay",
                    cfg.attention or "the default (sdpa)")
    policy = load_model(cfg.model_name_or_path, cfg, read_weights=read_weights)
    if cfg.dropout is not None:
        set_dropout(policy, cfg.dropout)
    elif cfg.disable_dropout:
        set_dropout(policy, 0.0)
    if cfg.gradient_checkpointing:
        # transformers 5 renamed it (the old name warns); the first argument is the checkpoint kwargs in both
        enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
        enable(cfg.gradient_checkpointing_kwargs or {"use_reentrant": False})
        policy.config.use_cache = False
    if cfg.neftune_noise_alpha:
        add_neftune(policy, cfg.neftune_noise_alpha)
    if cfg.finetuning_type == "lora":
        if cfg.gradient_checkpointing:
            # the embeddings are frozen under LoRA: without this, checkpointed blocks would see
            # inputs that need no gradient and pass none back to the adapters
            policy.enable_input_require_grads()
        policy = apply_lora(policy, cfg, reference_adapter=reference_adapter)
    elif cfg.finetuning_type == "freeze":
        apply_freeze(policy, cfg)
        if cfg.stage == "rm":  # a reward model's score head is new: trained whatever else is frozen
            for name, param in policy.named_parameters():
                if name.split(".")[0] in ("score", "classifier"):  # transformers' names of the head
                    param.requires_grad_(True)
    else:  # full: a vision-language model's frozen parts (freeze_vision_tower, ...)
        freeze_vision_parts(policy, cfg)
    hold_trainable_weights(policy, cfg)
    apply_liger_kernels(policy, cfg)
    compile_layers(policy, cfg)
    return policy


def router_aux_coef(cfg, model) -> float:
    """router_aux_loss_coef resolved against the policy, as TRL 1.16 resolves it: the weight of a
    mixture-of-experts model's load-balancing loss in the objective (`step.add_router_aux`), the value set or,
    unset, the model config's own router_aux_loss_coef (0.001 for Qwen2-MoE and Mixtral); 0 (off) for a model
    whose config has no output_router_logits, which returns no router logits (not MoE). Setting it for such a
    model, or with prefix_sharing, is refused in one line (docs/moe.md)."""
    text = model.config.get_text_config()
    moe = hasattr(text, "output_router_logits")
    if cfg.router_aux_loss_coef and not moe:
        raise ConfigError(f"router_aux_loss_coef: {type(model).__name__} is not a mixture-of-experts model that returns "
                          "router logits (its config has no output_router_logits), so it has no load-balancing loss "
                          "to weight; remove router_aux_loss_coef (LLaMA-Factory: moe_aux_loss_coef)")
    coef = getattr(text, "router_aux_loss_coef", 0.0) if cfg.router_aux_loss_coef is None else cfg.router_aux_loss_coef
    coef = float(coef or 0.0) if moe else 0.0
    if coef and cfg.prefix_sharing:
        raise ConfigError(f"router_aux_loss_coef: {coef} (set, or {type(model).__name__}'s own): the load-balancing "
                          "loss averages over every token of the pass, and prefix_sharing runs a pair's prompt once "
                          "for both completions, so it would count once what TRL counts twice; use padding_free (the "
                          "same loss), or set router_aux_loss_coef: 0 to train without it")
    return coef


def apply_liger_kernels(model, cfg) -> None:
    """enable_liger_kernel: Liger's Triton kernels (RMSNorm, SwiGLU, RoPE, ...) in place of the layers' own,
    on a CUDA GPU, where Liger has them for the architecture; its fused cross-entropy stays off, as TRL,
    since preftune computes its own loss (Liger's fused DPO loss, logps.fused_dpo_logps). Triton needs a
    GPU: on a CPU only the fused loss is used. A model with final logit soft-capping (Gemma 2) is refused:
    Liger's DPO loss projects without it."""
    if not cfg.enable_liger_kernel:
        return
    if getattr(model.config.get_text_config(), "final_logit_softcapping", None) is not None:
        raise ConfigError(f"enable_liger_kernel: {model.config.model_type} caps its final logits "
                          "(final_logit_softcapping), which Liger's fused DPO loss does not; "
                          "remove enable_liger_kernel")
    if not torch.cuda.is_available():
        _log_once("enable_liger_kernel: no CUDA GPU, so Liger's Triton layer kernels are not applied; the fused DPO "
                  "loss (LM head + loss) is used")
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model.config.model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        _log_once(f"enable_liger_kernel: Liger has no layer kernels for {model.config.model_type}; the fused DPO "
                  "loss (LM head + loss) is used")
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the transformers model
    # switches an architecture's function does not take are dropped by Liger
    _apply_liger_kernel_to_instance(model=base, fused_linear_cross_entropy=False, cross_entropy=False)
    _log_once(f"enable_liger_kernel: Liger's layer kernels applied ({model.config.model_type}), and its fused "
              "DPO loss")


_logged: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _logged:  # the policy and a separate reference both pass here
        _logged.add(message)
        log.info("%s", message)


def compile_layers(model, cfg) -> None:
    """torch_compile: the backbone (get_decoder) compiled in place, with dynamic shapes since every
    batch has its own length; the chunked LM head and the losses stay eager (they are cheap and shaped
    by the number of completion tokens)."""
    if not cfg.torch_compile:
        return
    model.get_decoder().compile(backend=cfg.torch_compile_backend or "inductor", mode=cfg.torch_compile_mode,
                                dynamic=True)


def neftune_noise(module, inputs, embeddings):
    """NEFTune (Jain et al. 2023, "NEFTune: Noisy Embeddings Improve Instruction Finetuning"), as
    transformers' hook: while the embedding layer is in training mode, add uniform noise in
    [-alpha / sqrt(L * d), alpha / sqrt(L * d)] to the input embeddings (L: the padded sequence
    length of the batch, d: the hidden size). Evaluation and generation (eval mode) are untouched, so
    is a separately loaded reference (always in eval mode); a LoRA policy's reference, the policy
    with its adapter off, trains in the same mode and gets noise too, as in TRL."""
    if not module.training:
        return embeddings
    bound = module.neftune_noise_alpha / (embeddings.size(1) * embeddings.size(2)) ** 0.5
    return embeddings + torch.zeros_like(embeddings).uniform_(-bound, bound)


def add_neftune(policy, alpha: float) -> None:
    embeddings = policy.get_input_embeddings()
    embeddings.neftune_noise_alpha = alpha
    embeddings.register_forward_hook(neftune_noise)


def hold_trainable_weights(policy, cfg) -> None:
    """Hold the trainable weights in float32 (bfloat16 with pure_bf16); frozen ones stay as loaded.

    Why: AdamW moves a weight by about learning_rate per step (5e-6 is usual for DPO), while
    bfloat16 resolves only about 1/256 of a weight's size (1e-4 for a weight of 0.02), so a
    bfloat16 weight rounds most updates back to its old value: on the demo model, 3 steps at 5e-6
    changed 8% of bfloat16 weights and all float32 ones. float32 master weights take every update,
    and bf16/fp16 autocast still runs the matmuls in half precision. Frozen weights keep the loaded
    dtype: that is the memory freeze and LoRA save. LLaMA-Factory does the same (peft already does
    it for new LoRA adapters). A quantized (QLoRA) policy keeps what peft's
    prepare_model_for_kbit_training chose (adapters.apply_lora)."""
    if getattr(policy, "is_quantized", False):
        return
    hold = torch.bfloat16 if cfg.pure_bf16 else torch.float32
    for param in policy.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != hold:
            if hold == torch.float32:
                setattr(param, LOADED_DTYPE, param.dtype)
            param.data = param.data.to(hold)
    if cfg.mixed_precision == "no":
        _check_one_compute_dtype(policy, cfg)


def _check_one_compute_dtype(policy, cfg) -> None:
    """Without autocast a float32 module cannot feed a frozen half-precision one (a freeze run's
    layers, LoRA's additional_target): refuse that in one line instead of a dtype error mid-step.
    LoRA adapters themselves are fine: peft casts their input and output."""
    frozen_half = {str(p.dtype).removeprefix("torch.") for p in policy.parameters()
                   if not p.requires_grad and p.dtype in (torch.bfloat16, torch.float16)}
    upcast = [n for n, p in policy.named_parameters() if hasattr(p, LOADED_DTYPE) and "lora_" not in n]
    if frozen_half and upcast:
        dtype = sorted(frozen_half)[0]
        raise ModelError(f"bf16: the weights load as {dtype} (torch_dtype: {cfg.torch_dtype}) and this "
                         f"{cfg.finetuning_type} run trains some in float32 beside frozen {dtype} ones, which needs "
                         "mixed precision; set bf16: true (or fp16: true), or torch_dtype: float32")


def restore_loaded_dtypes(model) -> None:
    """Every weight `hold_trainable_weights` upcast, back in the dtype it was loaded in: for the
    final save, so a bfloat16 checkpoint comes back bfloat16, not doubled in size. Checkpoints keep
    the float32 master weights (resume is exact). Modifies the model in place."""
    for param in model.parameters():
        dtype = getattr(param, LOADED_DTYPE, None)
        if dtype is not None:
            param.data = param.data.to(dtype)
            delattr(param, LOADED_DTYPE)


def weight_dtypes(params) -> str | None:
    """The dtypes of `params` for the precision log line: 'bfloat16', or 'float32 + bfloat16' most
    elements first; bitsandbytes-quantized weights as 4-bit / 8-bit; None for no parameters."""
    names = {torch.uint8: "4-bit", torch.int8: "8-bit"}  # bitsandbytes packs 4-bit weights in uint8
    counts: dict[str, int] = {}
    for p in params:
        name = names.get(p.dtype, str(p.dtype).removeprefix("torch."))
        counts[name] = counts.get(name, 0) + p.numel()
    return " + ".join(sorted(counts, key=counts.get, reverse=True)) or None


def reference_adapters(cfg) -> str | None:
    """The comma list of adapters a separately loaded reference has merged in."""
    if cfg.ref_model:
        return cfg.ref_model_adapters
    return cfg.adapter_name_or_path if cfg.finetuning_type == "lora" else None


def reference_name(cfg) -> tuple[str, str]:
    """(the model a separately loaded reference is read from, the config key that names it)."""
    return (cfg.ref_model, "ref_model") if cfg.ref_model else (cfg.model_name_or_path,
                                                              "model_name_or_path (reference copy)")


def load_reference(cfg, read_weights: bool = True):
    """The frozen reference as a model of its own: `ref_model` (+ `ref_model_adapters` merged in),
    else a copy of the starting policy. A LoRA run that starts from adapter_name_or_path starts
    from base + those adapters, so its copy has them merged in (precompute_ref_log_probs loads it
    so; a live LoRA reference is the adapter-off policy instead). `read_weights`: see `load_model`."""
    name, what = reference_name(cfg)
    reference = load_model(name, cfg, what, read_weights=read_weights)
    adapters = reference_adapters(cfg)
    if adapters:
        reference = with_adapters(reference, split_names(adapters),
                                  "ref_model_adapters" if cfg.ref_model else "adapter_name_or_path")
    reference.requires_grad_(False)
    reference.eval()
    apply_liger_kernels(reference, cfg)  # the same kernels as the policy: log-ratios 0 at the start
    compile_layers(reference, cfg)
    return reference
