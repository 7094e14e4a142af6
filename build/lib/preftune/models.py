"""Loading the policy, the reference and the tokenizer through `transformers` (and `peft`).

Weights are read by `from_pretrained`: safetensors, or for old `.bin` checkpoints
`torch.load(weights_only=True)`, never a full unpickle. `trust_remote_code` is passed as the
config says (default False) to every load: tokenizer, policy, reference.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune import adapters
from preftune.adapters import apply_freeze, apply_lora, split_names, with_adapters
from preftune.errors import ModelError

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _check_reachable(name: str, what: str) -> None:
    """A path-looking name that does not exist is a typo, not a hub id: say so before transformers does."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub ids are 'name' or 'org/name'
    if looks_local and not Path(name).expanduser().exists():
        raise ModelError(f"{what}: '{name}' does not exist (a local folder was expected)")


def _load_error(name: str, what: str, err: Exception) -> ModelError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelError(f"{what}: cannot load '{name}': {first}. Check the id or folder (and network access or "
                      "HF_HUB_OFFLINE for hub ids)")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    _check_reachable(name, "model_name_or_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(name, "model_name_or_path", e) from None
    if tokenizer.pad_token_id is None:
        # padding is masked out everywhere; any id will do, EOS is the usual choice
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, cfg, what: str = "model_name_or_path"):
    """The policy (what = model_name_or_path) or a separately loaded reference (any other `what`),
    quantized as quantization_bit / ref_model_quantization_bit say."""
    _check_reachable(name, what)
    policy = what == "model_name_or_path"
    quantization_key = "quantization_bit" if policy else "ref_model_quantization_bit"
    quantization_bit = cfg.quantization_bit if policy else cfg.ref_model_quantization_bit
    kwargs = {"dtype": DTYPES[cfg.torch_dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if quantization_bit:
        kwargs["device_map"] = adapters.quantized_device_map(quantization_bit, quantization_key)
        kwargs["quantization_config"] = adapters.quantization_config(quantization_bit, quantization_key,
                                                                     kwargs["dtype"])
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(name, what, e) from None


def check_vocabulary(model, tokenizer, what: str,
                     fix: str = "a reference must use the policy's tokenizer (same model family)") -> None:
    """The model must have an embedding row for every token id the tokenizer produces: a reference
    (or export --ref) built on another tokenizer would fail deep in the embedding lookup instead.
    Rows beyond the tokenizer are fine (checkpoints pad their vocabulary, e.g. Qwen2.5 sizes differ)."""
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ModelError(f"{what}: its vocabulary has {rows} tokens but the policy's tokenizer has {len(tokenizer)}; "
                         f"{fix}")


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Set every dropout probability: nn.Dropout modules and the functional attention dropout."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p


def load_policy(cfg, reference_adapter: bool = False):
    """The policy to train: a peft model for finetuning_type: lora, with frozen layers for freeze,
    dropout set as the config says. `reference_adapter`: a LoRA policy that starts from
    adapter_name_or_path also loads a frozen copy of its last adapter, for the reference
    (`adapters.AdapterReference`; `reference.load_models` decides)."""
    policy = load_model(cfg.model_name_or_path, cfg)
    if cfg.dropout is not None:
        set_dropout(policy, cfg.dropout)
    elif cfg.disable_dropout:
        set_dropout(policy, 0.0)
    if cfg.gradient_checkpointing:
        # transformers 5 renamed it (the old name warns); the first argument is the checkpoint kwargs in both
        enable = getattr(policy, "activation_checkpointing_enable", None) or policy.gradient_checkpointing_enable
        enable({"use_reentrant": False})
        policy.config.use_cache = False
    if cfg.finetuning_type == "lora":
        if cfg.gradient_checkpointing:
            # the embeddings are frozen under LoRA: without this, checkpointed blocks would see
            # inputs that need no gradient and pass none back to the adapters
            policy.enable_input_require_grads()
        policy = apply_lora(policy, cfg, reference_adapter=reference_adapter)
    elif cfg.finetuning_type == "freeze":
        apply_freeze(policy, cfg)
    return policy


def reference_adapters(cfg) -> str | None:
    """The comma list of adapters a separately loaded reference has merged in."""
    if cfg.ref_model:
        return cfg.ref_model_adapters
    return cfg.adapter_name_or_path if cfg.finetuning_type == "lora" else None


def load_reference(cfg):
    """The frozen reference as a model of its own: `ref_model` (+ `ref_model_adapters` merged in),
    else a copy of the starting policy. A LoRA run that starts from adapter_name_or_path starts
    from base + those adapters, so its copy has them merged in (precompute_ref_log_probs loads it
    so; a live LoRA reference is the adapter-off policy instead)."""
    reference = load_model(cfg.ref_model or cfg.model_name_or_path, cfg,
                           "ref_model" if cfg.ref_model else "model_name_or_path (reference copy)")
    adapters = reference_adapters(cfg)
    if adapters:
        reference = with_adapters(reference, split_names(adapters),
                                  "ref_model_adapters" if cfg.ref_model else "adapter_name_or_path")
    reference.requires_grad_(False)
    reference.eval()
    return reference
