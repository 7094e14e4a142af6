"""Loading the policy, the frozen reference and the tokenizer through `transformers`."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

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
    _check_reachable(name, what)
    kwargs = {"dtype": DTYPES[cfg.torch_dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(name, what, e) from None


def set_dropout(model: torch.nn.Module, p: float) -> None:
    """Set every dropout probability: nn.Dropout modules and the functional attention dropout."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = p


def load_policy_and_reference(cfg, with_reference: bool = True):
    """The policy, and the frozen reference, or None when `with_reference` is false (a
    reference-free loss: no second model in memory)."""
    policy = load_model(cfg.model_name_or_path, cfg)
    if cfg.dropout is not None:
        set_dropout(policy, cfg.dropout)
    elif cfg.disable_dropout:
        set_dropout(policy, 0.0)
    if not with_reference:
        return policy, None
    return policy, load_reference(cfg)


def load_reference(cfg):
    """The frozen reference: `ref_model`, else a second copy of the starting policy."""
    reference = load_model(cfg.ref_model or cfg.model_name_or_path, cfg,
                           "ref_model" if cfg.ref_model else "model_name_or_path (reference copy)")
    reference.requires_grad_(False)
    reference.eval()
    return reference
