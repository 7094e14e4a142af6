"""What a run saved, read back: a model folder (a LoRA adapter folder merged into its base), the config
the run wrote beside it, and the template it was trained in. train, eval, export, inspect and sample
read the models they are given through this; the reference a run trained against is reference.py's (`run_reference`).

    run_cfg = run_config(folder)                # its preftune_config.yaml, or None (model_run_config: by name)
    model = load_full(folder, run_cfg)          # as saved, or base + adapter merged in float32
    is_reward_model(folder)                     # a sequence classifier (preftune rm's): loaded as one
    cfg = with_run_template(cfg, run_cfg)       # sampled and scored in the format it was trained in
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from preftune.config import load_config
from preftune.errors import ConfigError, ModelError

log = logging.getLogger("preftune")


def is_adapter(folder: Path) -> bool:
    """A peft LoRA adapter folder (a save_adapter_only or QLoRA run's output_dir), not a full model."""
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def is_reward_model(folder: Path) -> bool:
    """A sequence classifier (a `preftune rm` run's output, or any reward model): its config.json's
    architectures end with ForSequenceClassification; a LoRA adapter folder: peft's task_type SEQ_CLS."""
    try:
        if is_adapter(folder):
            return json.loads((folder / "adapter_config.json").read_text()).get("task_type") == "SEQ_CLS"
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return False
    return any(str(a).endswith("ForSequenceClassification") for a in architectures)


def is_vision_folder(folder: Path) -> bool:
    """A saved vision-language model (its config.json has a vision_config, as `adapters.is_vision_config`);
    False for anything else, a hub id or an unreadable folder (loading it says what is wrong)."""
    try:
        return isinstance(json.loads((folder / "config.json").read_text()).get("vision_config"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def load_folder(folder: Path | str, dtype="auto", quantization_config=None, what: str = "",
                classifier: bool | None = None):
    """A saved transformers model (a folder, or a hub id) in eval mode; a failure in one line naming it.
    A causal LM (a vision-language model through transformers' image-text-to-text auto class, `is_vision_folder`),
    or a sequence classifier where `classifier` says so (None: where the folder is one, `is_reward_model`; True
    on a causal LM checkpoint: one output, on a new head)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForSequenceClassification

    local = Path(folder).expanduser()
    saved_classifier = local.is_dir() and is_reward_model(local)  # read once: its head, or a new one-output head
    if classifier is None:
        classifier = saved_classifier
    auto, extra = AutoModelForCausalLM, {}
    if classifier:
        auto, extra = AutoModelForSequenceClassification, ({} if saved_classifier else {"num_labels": 1})
    elif is_vision_folder(local):
        auto = AutoModelForImageTextToText
    # quantization_config=None would override the one a quantized folder's config.json holds
    if quantization_config is not None:
        extra["quantization_config"] = quantization_config
    try:
        model = auto.from_pretrained(folder, dtype=dtype, **extra)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"cannot load {what}'{folder}': {first}") from None
    return model.eval()


def run_config(src: Path):
    """The resolved config of the run that wrote `src` (its preftune_config.yaml), or None."""
    path = src / "preftune_config.yaml"
    if not path.is_file():
        return None
    try:
        return load_config(str(path))
    except ConfigError as e:  # e.g. written by another preftune version: --data still works
        log.warning("ignoring %s: %s", path, e)
        return None


def model_run_config(name: str | None):
    """The resolved config of the run that wrote the model `name` (a model_name_or_path): its folder's
    preftune_config.yaml; None for a hub id or a folder no preftune run wrote."""
    folder = Path(name).expanduser() if name else None
    return run_config(folder) if folder is not None and folder.is_dir() else None


# how a model's data and prompts are rendered: each a run that wrote the model fixes, unless cfg sets it
RENDERING_KEYS = ("template", "enable_thinking", "preserve_thinking", "default_system")


def with_run_template(cfg, run_cfg):
    """cfg, with the rendering of the run that wrote the model (run_cfg) where cfg sets none: its `template`,
    thinking settings (`enable_thinking`, `preserve_thinking`) and `default_system`, so a model is trained
    on, sampled, evaluated and exported in the format it was trained in. The one rule of every command that
    reads a model (train and sft continuing from a run, sample, eval, export, inspect --model); a value
    cfg sets wins (`--template none` still asks for raw text, `--enable_thinking true` thinks)."""
    if run_cfg is None:
        return cfg
    carried = {}
    for key in RENDERING_KEYS:
        mine, theirs = getattr(cfg, key), getattr(run_cfg, key, None)
        if theirs is None:
            continue
        if mine is None:
            carried[key] = theirs
            log.info("%s: %r, as the run that wrote the model was trained", key, theirs)
        elif mine != theirs:
            log.info("%s: %r, as set (the run that wrote the model was trained with %r)", key, mine, theirs)
    return dataclasses.replace(cfg, **carried) if carried else cfg


def adapter_base(src: Path, run_cfg) -> tuple[str, list[str]]:
    """The base model a LoRA adapter folder applies to, and the adapters to merge into it first.

    The base is adapter_config.json's base_model_name_or_path (peft writes it), else the run's
    model_name_or_path. A run started from adapter_name_or_path a,b trained on base + a with b
    continued, so its output adapter applies to base + a: a is merged first (models/adapters do
    the same when training)."""
    from preftune.adapters import split_names

    try:
        base = json.loads((src / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError) as e:
        raise ModelError(f"{src / 'adapter_config.json'} cannot be read ({e}); is MODEL a peft adapter?") from None
    base = base or (run_cfg.model_name_or_path if run_cfg else None)
    if not base:
        raise ModelError(f"{src / 'adapter_config.json'} names no base_model_name_or_path; set it to the base model "
                         "the adapter was trained on")
    if run_cfg is None:
        log.warning("%s has no preftune_config.yaml: its adapter is merged into %s alone (a run started from "
                    "several adapters needs the earlier ones merged too)", src, base)
        return base, []
    return base, split_names(run_cfg.adapter_name_or_path)[:-1] if run_cfg.finetuning_type == "lora" else []


def merged_adapter(src: Path, base: str, earlier: list[str]):
    """base (+ the earlier adapters) + the adapter in `src`, merged in float32: the full model the
    adapter stands for, at full precision whatever the run trained on (QLoRA's 4-bit base included)."""
    import torch

    from preftune.adapters import with_adapters

    looks_local = base.startswith((".", "/", "~")) or base.count("/") > 1  # hub ids are 'name' or 'org/name'
    if looks_local and not Path(base).expanduser().is_dir():
        raise ModelError(f"MODEL '{src}' is a LoRA adapter on '{base}', which does not exist; put the base model "
                         f"there or fix base_model_name_or_path in {src / 'adapter_config.json'}")
    # a reward model's adapter (peft's SEQ_CLS, `preftune rm`): base + a one-output head, which the adapter's
    # trained copy of the head (modules_to_save) replaces
    classifier = is_reward_model(src)
    model = load_folder(base, torch.float32, what=f"the base model of the LoRA adapter in '{src}', ",
                        classifier=classifier)
    model = with_adapters(model, earlier, "adapter_name_or_path (preftune_config.yaml)")
    model = with_adapters(model, [str(src)], "MODEL").eval()
    if classifier:  # its score is read at the last non-pad token: the pad id its run set (models._checked_policy)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src if (src / "tokenizer_config.json").is_file() else base)
        model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            tokenizer.eos_token_id
    return model


def load_full(folder: Path, run_cfg=None):
    """A saved model as it is, or a LoRA adapter folder merged into its base (float32); a reward model's
    as the sequence classifier it is."""
    if is_adapter(folder):
        return merged_adapter(folder, *adapter_base(folder, run_cfg))
    return load_folder(folder)
