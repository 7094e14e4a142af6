"""A model's weights in a folder, and back: what checkpoints, best_model/ and the final save write.

    save_model(model, tokenizer, folder, step)     # atomically: weights (or a LoRA adapter) + tokenizer
    load_weights_into(model, folder)               # the weights a folder holds, into a model that holds them whole
    state = read_weights(model, folder)            # the whole weights, named as `model`'s parameters

Weights are safetensors; nothing here unpickles a model. A LoRA (peft) model is saved as its trained
adapter (adapter_config.json + adapter_model.safetensors), the frozen `reference` adapter left out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from preftune.adapters import TRAINED_ADAPTER, is_peft_model
from preftune.checkpoints.folders import saving
from preftune.errors import ModelError
from preftune.files import fresh_tmp_dir, replace_dir, write_atomic


def save_weights(model, folder: Path, merge: bool = False, state_dict: dict | None = None) -> None:
    """A transformers model's weights (+ config, generation config), or a peft model's trained
    adapter (adapter_config.json + adapter_model.safetensors; the frozen `reference` adapter is
    not part of the result). merge=True writes a peft model as merged full weights instead; that
    merges in place, so the peft model is spent afterwards. state_dict: the weights to write in
    place of the model's own (a sharded model's, gathered by its engine: `whole_weights`)."""
    if not is_peft_model(model):
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        if state_dict:  # config.json names the dtype of the model's own parameters, which a sharding engine
            _config_dtype(folder, state_dict)  # may hold in another (DeepSpeed's bf16): name the saved one
        return
    if merge:
        model.merge_and_unload(adapter_names=[TRAINED_ADAPTER]).save_pretrained(folder, safe_serialization=True)
        return
    given = {} if state_dict is None else {"state_dict": state_dict}  # sharded: the gathered adapter weights
    model.save_pretrained(folder, safe_serialization=True, selected_adapters=[TRAINED_ADAPTER], **given)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _config_dtype(folder: Path, state_dict: dict[str, torch.Tensor]) -> None:
    dtypes = [t.dtype for t in state_dict.values() if t.is_floating_point()]
    path = folder / "config.json"
    if not dtypes or not path.is_file():
        return
    name = str(max(set(dtypes), key=dtypes.count)).removeprefix("torch.")  # the weights' common dtype
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("dtype", name) != name:
        config["dtype"] = name
        write_atomic(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_model(model, tokenizer, dest: Path, step: int, state_dict: dict | None = None) -> None:
    """`model`'s weights (`save_weights`) and `tokenizer` into the folder `dest` (best_model/), atomically."""
    with saving(dest.name, dest.parent, dest.with_name(f".{dest.name}.tmp")):
        tmp = fresh_tmp_dir(dest)
        save_weights(model, tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        (tmp / "preftune_step.json").write_text(json.dumps({"step": step}))
        replace_dir(tmp, dest)


def _adapter_file(model, folder: Path) -> Path:
    adapter = folder / "adapter_model.safetensors"
    if not adapter.is_file():
        raise ModelError(f"{folder} holds no adapter_model.safetensors, but the policy is a LoRA model; resume "
                         "a LoRA run from its own checkpoints")
    return adapter


def _model_files(folder: Path, model=None) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(folder.glob("model*.safetensors")):  # not running_<process>.safetensors of a checkpoint
        state.update(load_file(shard))
    return state if model is None else _model_names(model, state)


def _model_names(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state`, as save_pretrained wrote it, named as `model`'s weights. transformers saves some models under their
    original checkpoint's names (a LLaVA loaded by from_pretrained: language_model.model.* for
    model.language_model.*, `revert_weight_conversion`); its renaming of the model's own weights, each tensor passed
    through unchanged, is the map back."""
    own = model.state_dict()
    if not set(state) - set(own):
        return state
    try:
        from transformers.core_model_loading import revert_weight_conversion

        saved = revert_weight_conversion(model, dict(own))
    except Exception:  # noqa: BLE001 - no conversion known: the names are reported as they are
        return state
    name_of = {id(t): name for name, t in own.items()}
    rename = {k: name_of[id(t)] for k, t in saved.items() if id(t) in name_of}
    return {rename.get(k, k): v for k, v in state.items()}


def load_weights_into(model, folder: Path) -> None:
    """Load the safetensors weights `save_pretrained` wrote in `folder` into `model` (same architecture),
    which holds its whole weights; for a peft model, the trained adapter it saved (`save_weights`)."""
    if is_peft_model(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(_adapter_file(model, folder)), TRAINED_ADAPTER)
        if result.unexpected_keys:
            raise ModelError(f"adapter in {folder} does not match the policy: unexpected {result.unexpected_keys[:3]}")
        return
    missing, unexpected = model.load_state_dict(_model_files(folder, model), strict=False)
    # tied weights (lm_head = embeddings) are stored once, so they may be reported missing
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
        raise ModelError(f"weights in {folder} do not match the policy: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")


def read_weights(model, folder: Path) -> dict[str, torch.Tensor]:
    """The whole weights `folder` holds, named as `model`'s parameters are (a peft model: its trained
    adapter's), for an engine that scatters them into shards itself."""
    if not is_peft_model(model):
        return _model_files(folder, model)
    # peft saves the adapter's weights without the adapter's name: lora_A.weight for lora_A.default.weight
    state = {re.sub(r"\.(lora_[A-Za-z_]+)\.", rf".\1.{TRAINED_ADAPTER}.", k): v
             for k, v in load_file(_adapter_file(model, folder)).items()}
    unknown = sorted(set(state) - {n for n, _ in model.named_parameters()})
    if unknown:
        raise ModelError(f"adapter in {folder} does not match the policy: unexpected {unknown[:3]}")
    return state
