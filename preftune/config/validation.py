"""Every value preftune cannot train with, refused in one line before anything loads.

`validate(cfg)` runs the checks by topic: fixed sets of values, the numeric bounds (`BOUNDS`: the
range of every numeric key, also listed in docs/config.md), the fine-tuning type, the losses and their
options, precision and attention, data, options that could not act, saving and tracking, Liger.
The first check that fails raises `ConfigError`; options that only change less than the user wrote
are warned once.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import math
from typing import Any

from preftune.config.names import (F_DIVERGENCE_LOSSES, FLASH_ATTN, LABEL_SMOOTHING_LOSSES, LIGER_LOSSES, LOSS_NAMES,
                                   RAW_TEMPLATE_NAMES, REFERENCE_FREE, TEMPLATE_NAMES, TRACKERS,
                                   VISION_TEMPLATES)
from preftune.config.schema import FIELDS, TYPES_BASE, TrainConfig
from preftune.errors import ConfigError

log = logging.getLogger("preftune")

# The range of every numeric key, as an interval ("[" closed, "(" open); `validate` refuses a value
# outside it, and NaN or infinity in any float key, before anything loads (NaN passes `x <= 0`
# checks). Integer keys: the bounds are integers. A key that is None (unset) is not checked.
INF = math.inf
BOUNDS: dict[str, str] = {
    # model and adapters
    "lora_rank": "[1, inf)", "lora_alpha": "(0, inf)", "lora_dropout": "[0, 1)",
    # preference objective
    "pref_beta": "(0, inf)", "label_smoothing": "[0, 0.5)", "discopop_tau": "(0, inf)", "simpo_gamma": "[0, inf)",
    "pref_bco_weight": "[0, inf)", "pref_ftx": "[0, inf)", "kto_chosen_weight": "[0, inf)",
    "kto_rejected_weight": "[0, inf)", "f_alpha_divergence_coef": "(-inf, inf)", "ld_alpha": "[0, 1]",
    "ref_model_mixup_alpha": "(0, 1]", "ref_model_sync_steps": "[1, inf)", "router_aux_loss_coef": "[0, inf)",
    "center_rewards_coefficient": "[0, inf)",
    # data
    "val_size": "[0, inf)", "max_samples": "[1, inf)", "image_max_pixels": "[1, inf)", "image_min_pixels": "[1, inf)", "cutoff_len": "[2, inf)", "max_prompt_length": "[1, inf)",
    "preprocessing_num_workers": "[1, inf)", "pad_to_multiple_of": "[1, inf)",
    # optimisation
    "per_device_train_batch_size": "[1, inf)", "per_device_eval_batch_size": "[1, inf)",
    "gradient_accumulation_steps": "[1, inf)", "num_train_epochs": "[0, inf)", "max_steps": "[-1, inf)",
    "learning_rate": "(0, 1e30]", "weight_decay": "[0, inf)", "adam_beta1": "[0, 1)", "adam_beta2": "[0, 1)",
    "adam_epsilon": "(0, inf)", "warmup_ratio": "[0, 1)", "warmup_steps": "[0, inf)", "max_grad_norm": "[0, inf)",
    "dropout": "[0, 1)", "seed": "[0, 4294967295]", "logps_chunk_size": "[1, inf)",
    # sampling and evaluation
    "num_samples": "[1, inf)", "max_new_tokens": "[1, inf)", "temperature": "(0, inf)", "top_p": "(0, 1]",
    "vllm_gpu_util": "(0, 1]", "rounds": "[1, inf)", "label_port": "[0, 65535]", "label_min_pairs": "[0, inf)",
    "top_k": "[1, inf)", "min_margin": "[0, inf)", "generate_during_eval": "[0, inf)",
    **{f"health_{name}": "[0, inf)" for name in ("max_length_growth", "max_train_val_gap", "max_kl_per_sequence",
                                                 "max_kl_per_token", "max_margin", "min_accuracy",
                                                 "max_val_loss_rise", "max_chosen_drop", "max_rejected_drop")},
    "health_max_seed_kl_ratio": "[1, inf)",  # a ratio to the other seeds' median: below 1 half the seeds would fire
    # logging, saving, the run
    "logging_steps": "[1, inf)", "eval_steps": "[1, inf)", "early_stopping_patience": "[1, inf)",
    "save_steps": "[1, inf)", "save_total_limit": "[1, inf)", "dataloader_num_workers": "[0, inf)",
    "ddp_timeout": "[1, inf)", "sequence_parallel_size": "[1, inf)", "skip_nonfinite_steps": "[0, inf)", "neftune_noise_alpha": "(0, inf)",
}
# What a bound means where a bare interval would not say it
BOUND_NOTES = {"max_steps": "-1 or 0: num_train_epochs decides", "val_size": "a share in (0, 1) or a count >= 1",
               "seed": "numpy's seed range", "learning_rate": "fine-tuning uses about 1e-6 to 1e-4",
               "max_grad_norm": "0 turns clipping off",
               "label_smoothing": "a share of flipped labels; robust divides by 1 - 2 * label_smoothing",
               "ld_alpha": "the weight of the tokens beyond the shorter completion",
               "ref_model_mixup_alpha": "the policy's share of the updated reference"}


def _parse_interval(text: str) -> tuple[float, float, bool, bool]:
    """"[0, 1)" -> (0.0, 1.0, low closed, high open)."""
    low, high = (float(part) for part in text[1:-1].split(","))
    return low, high, text[0] == "[", text[-1] == "]"


def describe_bounds(name: str) -> str:
    """The allowed values of numeric key `name` in words, for messages and docs."""
    low, high, low_in, high_in = _parse_interval(BOUNDS[name])
    integer = TYPES_BASE[name] is int
    if high == INF and low == -INF:
        words = "a finite number"
    elif high == INF:
        if integer:
            words = f"at least {int(low) if low_in else int(low) + 1}"
        else:
            words = "a positive number" if (low, low_in) == (0, False) else \
                f"a number {'>=' if low_in else '>'} {low:g}"
    else:
        words = f"{'an integer ' if integer else ''}in {BOUNDS[name]}"
    return words + (f" ({BOUND_NOTES[name]})" if name in BOUND_NOTES else "")


def _check_bounds(values: dict[str, Any]) -> None:
    """Every numeric key against BOUNDS, and finiteness for every float (lists and mappings included)."""
    for name, value in values.items():
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, (list, dict)):
            numbers = value.values() if isinstance(value, dict) else value
            if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
                raise ConfigError(f"{name}: NaN and infinity are not allowed; got {value}")
            continue
        if name not in BOUNDS or not isinstance(value, (int, float)):
            continue
        low, high, low_in, high_in = _parse_interval(BOUNDS[name])
        inside = (low <= value if low_in else low < value) and (value <= high if high_in else value < high)
        if not (math.isfinite(value) and inside):
            raise ConfigError(f"{name} must be {describe_bounds(name)}; got {value}")



def validate(cfg: TrainConfig) -> None:
    """One clear line for every value preftune cannot train with (the first that fails)."""
    if not cfg.do_train:
        raise ConfigError("do_train: false has nothing to do in preftune train; set do_train: true")
    _validate_choices(cfg)
    _check_bounds(vars(cfg))  # first: every later check may assume finite numbers in range
    if cfg.val_size >= 1 and not float(cfg.val_size).is_integer():
        raise ConfigError(f"val_size must be {describe_bounds('val_size')}; got {cfg.val_size}")
    _validate_adapters(cfg)
    _validate_losses(cfg)
    validate_loss_options(cfg)
    _validate_precision(cfg)
    _validate_data_and_schedule(cfg)
    _validate_inert(cfg)
    _validate_saving_and_tracking(cfg)
    _validate_liger(cfg)
    _validate_sequence_parallel(cfg)


def _validate_choices(cfg: TrainConfig) -> None:
    """Keys with a fixed set of values (a field's `choices`)."""
    values = vars(cfg)
    for name, f in FIELDS.items():
        choices = f.metadata.get("choices")
        if choices and values[name] not in choices:
            raise ConfigError(f"{name}: unknown value '{values[name]}'; use {', '.join(choices[:-1])} or {choices[-1]}")


def _validate_losses(cfg: TrainConfig) -> None:
    """stage: sft's keys, the names in pref_loss, loss_weights, label_smoothing, and the keys that need a reference."""
    def bad(msg: str) -> None:
        raise ConfigError(msg)

    values = vars(cfg)
    if cfg.stage == "rm":
        _validate_reward_model(cfg)
    elif cfg.center_rewards_coefficient is not None:
        bad(f"center_rewards_coefficient: only stage: rm (a reward model) has rewards to center, not stage "
            f"{cfg.stage}; remove it")
    if cfg.stage == "sft":
        for key, default in (("pref_loss", "sigmoid"), ("ref_model", None), ("precompute_ref_log_probs", False),
                             ("loss_weights", None)):
            if values[key] != default:
                bad(f"{key}: stage: sft trains on completions alone, with no preference loss or reference; remove "
                    f"{key} (or use stage: dpo)")
    names = cfg.pref_losses
    for name in names:
        if name not in LOSS_NAMES:
            match = difflib.get_close_matches(name, LOSS_NAMES, n=1)
            hint = f" Did you mean '{match[0]}'?" if match else ""
            bad(f"pref_loss: unknown loss '{name}'; choose one of {', '.join(LOSS_NAMES)}.{hint}")
    if len(set(names)) < len(names):
        bad(f"pref_loss: '{cfg.pref_loss}' names a loss twice; weight it with loss_weights instead")
    if cfg.loss_weights is not None:
        if len(cfg.loss_weights) != len(names):
            bad(f"loss_weights: {len(cfg.loss_weights)} weights for {len(names)} losses in pref_loss ({cfg.pref_loss}); "
                "give one per loss")
        if not all(w >= 0 for w in cfg.loss_weights):
            bad(f"loss_weights must be numbers >= 0; got {cfg.loss_weights}")
    if cfg.label_smoothing > 0 and not any(name in LABEL_SMOOTHING_LOSSES for name in names):
        bad(f"label_smoothing: pref_loss {cfg.pref_loss} does not use it; set it to 0 or choose one of "
            f"{', '.join(LABEL_SMOOTHING_LOSSES)}")
    if "exo_pair" in names and cfg.label_smoothing == 0:
        bad("label_smoothing: exo_pair needs label_smoothing > 0 (its loss has log(label_smoothing)); the paper uses 1e-3")
    if cfg.ref_model and not cfg.uses_reference:
        bad(f"ref_model: pref_loss {cfg.pref_loss} is reference-free and loads no reference model; remove ref_model")
    if cfg.precompute_ref_log_probs and not cfg.uses_reference:
        bad(f"precompute_ref_log_probs: pref_loss {cfg.pref_loss} is reference-free and has no reference to "
            "precompute; remove precompute_ref_log_probs")
    _validate_sync_ref_model(cfg)
    if cfg.pref_bco_weight > 0 and not cfg.uses_reference:
        bad(f"pref_bco_weight: BCO needs the reference and pref_loss {cfg.pref_loss} is reference-free "
            "(LLaMA-Factory ignores it there); set it to 0")


# The objective and reference keys stage: rm reads (every other one is DPO's, refused when set)
RM_KEYS = ("stage", "do_train", "center_rewards_coefficient")


def _validate_reward_model(cfg: TrainConfig) -> None:
    """stage: rm trains a sequence-classification model with its own forward pass on padded rows: no
    reference, no preference loss, no log-prob options (docs/reward-model.md)."""
    values = vars(cfg)
    for name, f in FIELDS.items():
        if f.metadata["group"] in ("reference", "objective") and name not in RM_KEYS and values[name] != f.default:
            raise ConfigError(f"{name}: stage: rm trains a reward model with the Bradley-Terry loss, with no reference "
                              f"or preference loss; remove {name} (or use stage: dpo)")
    for name in ("padding_free", "prefix_sharing", "enable_liger_kernel"):
        if values[name]:
            raise ConfigError(f"{name}: stage: rm scores padded rows through the model's own forward pass (the "
                              f"reward at each row's last token); remove {name}")


def _validate_sync_ref_model(cfg: TrainConfig) -> None:
    """TR-DPO's moving reference (reference.sync_reference): there must be a live reference whose weights can mix."""
    if not cfg.sync_ref_model:
        for key in ("ref_model_mixup_alpha", "ref_model_sync_steps"):
            if vars(cfg)[key] != FIELDS[key].default:
                _warn_once(f"{key}: used only with sync_ref_model: true, so it changes nothing")
        return
    why = None
    if not cfg.uses_reference:
        why = (f"pref_loss {cfg.pref_loss} is reference-free (stage {cfg.stage}): there is no reference to update; "
               "remove sync_ref_model")
    elif cfg.precompute_ref_log_probs:
        why = ("precompute_ref_log_probs scores the reference once, before training, and a moving reference "
               "makes those log-probs stale; remove one of the two")
    elif cfg.ref_model_quantization_bit:
        why = ("a 4/8-bit reference (ref_model_quantization_bit) cannot take the policy's weights mixed in; "
               "remove ref_model_quantization_bit")
    elif cfg.finetuning_type == "lora" and cfg.ref_model:
        why = ("with LoRA the reference is a second adapter mixed from the trained one, and ref_model loads a "
               "separate model instead; remove ref_model")
    if why:
        raise ConfigError(f"sync_ref_model: {why}")


def _validate_data_and_schedule(cfg: TrainConfig) -> None:
    """The training length, the data's columns, the fsdp modes, and early stopping's evaluation."""
    if cfg.num_train_epochs == 0 and cfg.max_steps <= 0:
        raise ConfigError("num_train_epochs must be positive (or set max_steps)")
    if cfg.columns:
        known = ("prompt", "chosen", "rejected", "system", "completion", "label", "margin")
        for key in cfg.columns:
            if key not in known:
                raise ConfigError(f"columns: '{key}' is not a standard field; map your field names to "
                                  f"{', '.join(known)}")
    unknown = set(cfg.fsdp.replace(",", " ").split()) - {"full_shard", "shard_grad_op", "offload", "auto_wrap"}
    if unknown:
        raise ConfigError(f"fsdp: {', '.join(sorted(unknown))} is not a sharding mode here; use full_shard, "
                          "shard_grad_op, offload (or leave fsdp empty for data parallelism)")
    if cfg.early_stopping_patience and cfg.eval_strategy == "no":
        raise ConfigError("early_stopping_patience needs evaluation; remove eval_strategy: no")
    _validate_mix(cfg)
    # LLaMA-Factory's check, on its defaults (768*768, 32*32) where a key is unset
    max_pixels, min_pixels = cfg.image_max_pixels or 768 * 768, cfg.image_min_pixels or 32 * 32
    if (cfg.image_max_pixels or cfg.image_min_pixels) and max_pixels < min_pixels:
        raise ConfigError(f"image_max_pixels {max_pixels} is smaller than image_min_pixels {min_pixels}"
                          f"{'' if cfg.image_max_pixels and cfg.image_min_pixels else ' (LLaMA-Factory default)'}; "
                          "raise image_max_pixels or lower image_min_pixels")
    if cfg.mask_history is False and cfg.stage == "sft":
        raise ConfigError("mask_history: false trains LLaMA-Factory's sft on every assistant turn; preftune sft trains "
                          "on the final assistant turn only (mask_history: true): remove mask_history, or make a "
                          "record of each turn to train")
    if cfg.pad_to_multiple_of is not None and cfg.padding_free:
        raise ConfigError("pad_to_multiple_of: padding_free puts a micro-batch in one row without padding, so there is "
                          "no padded width to round; remove one of the two")
    _validate_model_init_kwargs(cfg)


# What preftune passes to from_pretrained itself, and the key that sets it (model_init_kwargs may not)
MODEL_INIT_OWNED = {"torch_dtype": "torch_dtype", "dtype": "torch_dtype", "attn_implementation":
                    "attn_implementation (or flash_attn)", "quantization_config": "quantization_bit",
                    "load_in_4bit": "quantization_bit", "load_in_8bit": "quantization_bit",
                    "trust_remote_code": "trust_remote_code", "device_map": "the launcher (each process loads "
                    "on its own device)", "pretrained_model_name_or_path": "model_name_or_path"}


def _validate_model_init_kwargs(cfg: TrainConfig) -> None:
    """model_init_kwargs: TRL's free-form from_pretrained arguments, minus the ones preftune sets from its own keys."""
    for key in cfg.model_init_kwargs or {}:
        if key in MODEL_INIT_OWNED:
            raise ConfigError(f"model_init_kwargs: {key} is set by preftune from {MODEL_INIT_OWNED[key]}; "
                              f"use that key, and remove {key} from model_init_kwargs")


def _validate_mix(cfg: TrainConfig) -> None:
    """mix_strategy and interleave_probs, as LLaMA-Factory checks them (hparams/data_args.py)."""
    probs = cfg.interleave_probs
    if probs is None:
        return
    if cfg.mix_strategy == "concat":
        raise ConfigError("interleave_probs: only with an interleaved mix_strategy (interleave_under, "
                          "interleave_over, interleave_once); set one, or remove interleave_probs")
    n = len([s for s in (cfg.dataset or "").split(",") if s.strip()])
    if len(probs) != n:
        raise ConfigError(f"interleave_probs: {len(probs)} probabilities for {n} dataset entries; give one per entry")
    evals = [s for s in cfg.eval_dataset.split(",") if s.strip()] if isinstance(cfg.eval_dataset, str) else []
    if len(evals) > 1 and len(evals) != n:
        raise ConfigError(f"interleave_probs: eval_dataset has {len(evals)} entries, and the probabilities are for "
                          f"{n}; mix as many (LLaMA-Factory mixes both with the same probabilities)")
    if any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-8:
        raise ConfigError(f"interleave_probs: {probs} must be at least 0 each and sum to 1")
    if cfg.mix_strategy == "interleave_over" and 0 in probs:
        raise ConfigError("interleave_probs: interleave_over stops when every entry has run out, and an entry of "
                          "probability 0 never does; give it a probability, or use interleave_under")


# The warnings given in this process, each once: a config is validated more than once in some commands.
WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in WARNED:
        WARNED.add(message)
        log.warning("%s", message)


def _validate_inert(cfg: TrainConfig) -> None:
    """Options that could not act with the rest of the config: refused when the user would lose what they
    asked for (early stopping, sampled completions), warned once when the run is only not what they wrote."""
    validation = bool(cfg.eval_dataset) or cfg.val_size > 0
    if cfg.template and cfg.template not in TEMPLATE_NAMES + RAW_TEMPLATE_NAMES + tuple(VISION_TEMPLATES):
        raise ConfigError(f"template: unknown name '{cfg.template}'; use one of {', '.join(TEMPLATE_NAMES)} "
                          f"(chat templates), {', '.join(VISION_TEMPLATES)} (vision-language models) or "
                          f"{', '.join(RAW_TEMPLATE_NAMES)} (raw text), or remove template")
    if not validation:
        for key in ("early_stopping_patience", "generate_during_eval"):
            if vars(cfg)[key]:
                raise ConfigError(f"{key}: needs validation data, and there is none; set eval_dataset (a file) or "
                                  f"val_size (a share or count of the training pairs), or remove {key}")
        if cfg.eval_steps:
            _warn_once("eval_steps: no validation data (eval_dataset or val_size), so nothing is evaluated")
        if cfg.load_best_model_at_end:
            _warn_once("load_best_model_at_end: no validation data (eval_dataset or val_size) to pick the best model "
                       "by, so the last step's model is kept")
    if cfg.eval_steps and cfg.eval_strategy != "steps":
        _warn_once(f"eval_steps: ignored with eval_strategy: {cfg.eval_strategy}")
    if cfg.warmup_steps > 0 and cfg.warmup_ratio > 0:
        _warn_once(f"warmup_ratio: {cfg.warmup_ratio} is ignored, warmup_steps: {cfg.warmup_steps} sets the warmup")
    if cfg.save_only_model and not cfg.saves_checkpoints:
        _warn_once("save_only_model: no checkpoints are written (save_strategy: no, or save_steps: null), so it "
                   "changes nothing")
    if cfg.generate_during_eval and cfg.eval_strategy == "no":
        raise ConfigError("generate_during_eval samples at each evaluation, and eval_strategy is no; remove one")
    if cfg.overwrite_output_dir and cfg.resume_from_checkpoint:
        _warn_once("overwrite_output_dir: ignored when resuming (the checkpoints in output_dir are the run's own)")


def _validate_saving_and_tracking(cfg: TrainConfig) -> None:
    """report_to, the best-model keys and the NEFTune / gradient checkpointing options."""
    for name in cfg.trackers:
        if name not in (*TRACKERS, "all"):
            raise ConfigError(f"report_to: unknown tracker '{name}'; use {', '.join(TRACKERS)}, all or none "
                              "(a comma list or YAML list for several)")
    if cfg.load_best_model_at_end and cfg.eval_strategy == "no":
        raise ConfigError("load_best_model_at_end needs evaluation to pick the best model; remove eval_strategy: no")
    if cfg.neftune_noise_alpha is not None and not (cfg.neftune_noise_alpha > 0 and math.isfinite(cfg.neftune_noise_alpha)):
        raise ConfigError(f"neftune_noise_alpha must be a positive number (the paper uses 5), or unset; "
                          f"got {cfg.neftune_noise_alpha}")
    if cfg.gradient_checkpointing_kwargs is not None and not cfg.gradient_checkpointing:
        raise ConfigError("gradient_checkpointing_kwargs: used only with gradient_checkpointing: true; set it or "
                          "remove gradient_checkpointing_kwargs")


def validate_loss_options(cfg: TrainConfig) -> None:
    """KTO, f-DPO, LD-DPO and WPO: the losses each applies to, one line per misuse."""
    names = cfg.pref_losses
    if "kto" in names and len(names) > 1:
        bad = [n for n in names if n != "kto"]
        raise ConfigError(f"pref_loss: kto trains on unpaired examples and cannot be combined with the paired "
                          f"loss(es) {', '.join(bad)}; use pref_loss: kto alone")
    for key, value in (("kto_chosen_weight", cfg.kto_chosen_weight), ("kto_rejected_weight", cfg.kto_rejected_weight)):
        if value != 1.0 and not cfg.is_kto:
            raise ConfigError(f"{key}: only pref_loss: kto weighs desirable/undesirable examples; "
                              f"pref_loss is {cfg.pref_loss}; remove {key}")
    if cfg.prefix_sharing:
        if cfg.padding_free:
            raise ConfigError("prefix_sharing and padding_free are two layouts of a batch; choose one (prefix_sharing "
                              "saves the prompt's second pass, padding_free the padding)")
        if cfg.is_kto or cfg.stage == "sft":
            raise ConfigError("prefix_sharing: shares a pair's prompt between chosen and rejected; "
                              f"{'pref_loss: kto' if cfg.is_kto else 'stage: sft'} has no pairs; set prefix_sharing: false")
        if cfg.attention in ("flash_attention_2", "flex_attention"):
            raise ConfigError(f"prefix_sharing: needs a 4D attention mask, which attn_implementation {cfg.attention} "
                              "does not take; use sdpa (or eager), or padding_free for flash-attn")
    if cfg.is_kto:
        if cfg.padding_free:
            raise ConfigError("padding_free: not supported with pref_loss: kto (its KL rows are built per padded batch); "
                              "set padding_free: false")
        if cfg.loss_weights is not None:
            raise ConfigError("loss_weights: weighs several losses, and kto runs alone; remove it (kto_chosen_weight / "
                              "kto_rejected_weight weigh its two kinds of example)")
        if cfg.pref_ftx or cfg.pref_bco_weight:
            key = "pref_ftx" if cfg.pref_ftx else "pref_bco_weight"
            raise ConfigError(f"{key}: not supported with pref_loss: kto (its terms need chosen/rejected pairs); set it to 0")
        if cfg.precompute_ref_log_probs:
            raise ConfigError("precompute_ref_log_probs: not supported with pref_loss: kto (its KL baseline scores "
                              "mismatched prompt/completion rows formed per batch); remove precompute_ref_log_probs")
    if cfg.f_divergence_type != "reverse_kl":  # f-DPO replaces the log-ratios in DPO's margin h (as TRL 1.16 allows)
        unfit = [n for n in names if n not in F_DIVERGENCE_LOSSES and n != "sft"]
        if unfit or names == ["sft"]:
            raise ConfigError(f"f_divergence_type: {cfg.f_divergence_type} replaces the log-ratios in DPO's margin, "
                              f"which {', '.join(unfit or names)} does not use (it scores each completion on its own, "
                              f"sorts, or has no reference; TRL refuses it too); use one of "
                              f"{', '.join(F_DIVERGENCE_LOSSES)}, or f_divergence_type: reverse_kl")
    if cfg.f_alpha_divergence_coef != 0.5 and cfg.f_divergence_type != "alpha_divergence":
        raise ConfigError(f"f_alpha_divergence_coef: used only with f_divergence_type: alpha_divergence "
                          f"(it is {cfg.f_divergence_type}); set that or remove f_alpha_divergence_coef")
    if cfg.ld_alpha is not None:
        unfit = [n for n in names if n in REFERENCE_FREE or n == "kto"]
        if unfit:
            raise ConfigError(f"ld_alpha: LD-DPO weights the log-ratios of a pair's completions and does not apply "
                              f"to {', '.join(unfit)} (reference-free or unpaired); remove ld_alpha")
    if cfg.use_weighting:
        unfit = [n for n in names if n in ("aot", "aot_unpaired", "kto")]
        if unfit:
            raise ConfigError(f"use_weighting: WPO's per-pair weights do not apply to {', '.join(unfit)} "
                              "(aot sorts the pairs, as TRL refuses; kto is unpaired); set use_weighting: false")


def _validate_liger(cfg: TrainConfig) -> None:
    """enable_liger_kernel: the package, and what Liger's fused DPO loss can compute as preftune does."""
    if not cfg.enable_liger_kernel:
        return
    key = "enable_liger_kernel"
    if importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(f"{key}: needs the liger-kernel package, which is not installed; pip install liger-kernel, "
                          f"or remove {key}")
    if cfg.objective != "dpo":
        what = f"stage: {cfg.stage}" if cfg.stage in ("sft", "rm") else "pref_loss: kto"
        raise ConfigError(f"{key}: Liger's fused loss here is its DPO loss on pairs, not {what}; remove {key}")
    names = cfg.pref_losses
    if len(names) > 1 or names[0] not in LIGER_LOSSES:
        raise ConfigError(f"{key}: Liger's fused DPO loss computes one of {', '.join(LIGER_LOSSES)}, not pref_loss: "
                          f"{cfg.pref_loss}; choose one of those, or remove {key} (the chunked LM head, "
                          "logps_chunk_size, bounds the logits memory too)")
    if names == ["sigmoid"] and cfg.label_smoothing > 0:
        raise ConfigError(f"{key}: Liger's sigmoid loss has no label smoothing (cDPO); use pref_loss: robust for "
                          f"noisy labels, or remove {key}")
    if cfg.f_divergence_type != "reverse_kl":
        raise ConfigError(f"{key}: Liger's sigmoid loss is DPO's reverse KL only, not f_divergence_type: "
                          f"{cfg.f_divergence_type}; remove one of the two")
    for option, on, why in (("ld_alpha", cfg.ld_alpha is not None, "weighs tokens in the log-probs"),
                            ("use_weighting", cfg.use_weighting, "weighs each pair's loss"),
                            ("pref_ftx", cfg.pref_ftx > 0, "adds an SFT term"),
                            ("pref_bco_weight", cfg.pref_bco_weight > 0, "mixes in BCO with its reward shift"),
                            ("padding_free", cfg.padding_free, "packs the sequences into one row"),
                            ("prefix_sharing", cfg.prefix_sharing, "shares the prompt in one row per pair")):
        if on:
            raise ConfigError(f"{key}: not with {option} ({option} {why}; Liger's fused loss takes padded pairs and "
                              f"one plain loss); remove one of the two")


def _validate_sequence_parallel(cfg: TrainConfig) -> None:
    """sequence_parallel_size: what a pass split along the sequence cannot do (engines/zero.py `use_ulysses`; the
    engine checks deepspeed, the process count and the model's heads)."""
    if cfg.sequence_parallel_size == 1:
        return
    key = f"sequence_parallel_size: {cfg.sequence_parallel_size}"
    if cfg.objective != "dpo":
        what = "stage: sft" if cfg.stage == "sft" else "pref_loss: kto"
        raise ConfigError(f"{key} trains preference pairs (DPO and its paired losses), not {what} yet; remove it")
    if cfg.attention == "eager":
        raise ConfigError(f"{key} masks attention causally by positions, and eager attention needs a full mask "
                          "(the memory sequence parallelism saves); use attn_implementation: sdpa")
    for option, on, why in (
            ("padding_free", cfg.padding_free, "packed rows need an attention that reads sequence starts from "
             "the gathered positions (flash-attn varlen), not wired in yet"),
            ("prefix_sharing", cfg.prefix_sharing, "its mask keeps each completion from the other, which the "
             "split attention, masking by positions only, cannot"),
            ("ld_alpha", cfg.ld_alpha is not None, "LD-DPO weighs tokens by their place in the whole completion, "
             "which a slice does not know"),
            ("enable_liger_kernel", cfg.enable_liger_kernel, "Liger's fused loss takes whole rows"),
            ("generate_during_eval", cfg.generate_during_eval > 0, "sampling runs whole sequences through the "
             "split attention")):
        if on:
            raise ConfigError(f"{key}: not with {option} ({why}); remove one of the two")


def _validate_precision(cfg: TrainConfig) -> None:
    """bf16 and fp16, pure_bf16, and the two spellings of the attention implementation."""
    if cfg.bf16 and cfg.fp16:
        raise ConfigError("bf16 and fp16 are both true; choose one")
    if cfg.pure_bf16:
        if not cfg.bf16:
            raise ConfigError("pure_bf16: true needs bf16: true (it trains bfloat16 weights under bfloat16 autocast); "
                              "set bf16: true, or remove pure_bf16")
        if cfg.torch_dtype not in ("auto", "bfloat16", "bf16"):
            raise ConfigError(f"pure_bf16: true trains the weights in bfloat16, but torch_dtype: {cfg.torch_dtype} "
                              "loads them otherwise; set torch_dtype: auto (or bfloat16), or remove pure_bf16")
        if cfg.quantization_bit:
            raise ConfigError("pure_bf16: not with quantization_bit (QLoRA keeps peft's float32 adapter and norms); "
                              "remove pure_bf16")
    from_flash_attn = FLASH_ATTN[cfg.flash_attn]  # a known value: validate checked the choices first
    if cfg.attn_implementation and from_flash_attn and cfg.attn_implementation != from_flash_attn:
        raise ConfigError(f"flash_attn: {cfg.flash_attn} means attn_implementation {from_flash_attn}, but "
                          f"attn_implementation is {cfg.attn_implementation}; keep one of the two keys")


def _validate_adapters(cfg: TrainConfig) -> None:
    """The fine-tuning type keys (LoRA, freeze, quantization, adapters) and the reference they imply."""
    def bad(msg: str) -> None:
        raise ConfigError(msg)

    lora = cfg.finetuning_type == "lora"
    values = vars(cfg)
    if "lm_head" in [m.strip() for m in cfg.lora_target.split(",")]:
        # preftune applies the LM head itself, chunked (logps.py), reading its weight directly
        bad("lora_target: lm_head cannot get a LoRA adapter; train it fully with additional_target: lm_head")
    for key in ("use_dora", "use_rslora", "additional_target", "adapter_name_or_path", "save_adapter_only",
                "quantization_bit"):
        if values[key] and not lora:
            bad(f"{key} needs finetuning_type: lora (it is {cfg.finetuning_type})")
    if cfg.freeze_trainable_layers == 0:
        bad("freeze_trainable_layers: 0 trains nothing; use N > 0 for the last N layers, N < 0 for the first -N")
    for key in ("quantization_bit", "ref_model_quantization_bit"):
        if values[key] not in (None, 4, 8):
            bad(f"{key} must be 4 or 8 (or unset); got {values[key]}")
    if cfg.ref_model_adapters and not cfg.ref_model:
        bad("ref_model_adapters needs ref_model (the checkpoint they are merged into)")
    separate_reference = cfg.uses_reference and (cfg.ref_model or not lora or cfg.precompute_ref_log_probs)
    if cfg.ref_model_quantization_bit and not separate_reference:
        bad("ref_model_quantization_bit: no separate reference is loaded (LoRA uses the policy with its adapter "
            "off, a reference-free loss none); set ref_model or remove it")
    if cfg.quantization_bit and cfg.save_adapter_only is False:
        bad("save_adapter_only: false with quantization_bit: merging into 4/8-bit weights loses precision; keep the "
            "adapter (unset save_adapter_only) and merge it into the unquantized base with peft's merge_and_unload")
    if cfg.save_adapter_only and cfg.adapter_name_or_path and "," in cfg.adapter_name_or_path:
        bad("save_adapter_only: the adapter would apply to the base with the first adapters of adapter_name_or_path "
            "merged in, which no folder holds; save merged weights (save_adapter_only: false)")

