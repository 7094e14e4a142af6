"""Other tools' ways of writing a config: TRL's and other common key names (`ALIASES`), values that
are translated rather than renamed (accelerate's `mixed_precision`, TrainingArguments'
`resume_from_checkpoint: true`, ...), and the keys of LLaMA-Factory and transformers' TrainingArguments
that preftune does not honour (`NOT_HONOURED`), accepted at the values where they change nothing.
docs/config.md lists the aliases, docs/llamafactory-keys.md the keys not honoured.
"""

from __future__ import annotations

from typing import Any

from preftune.config.schema import FIELDS
from preftune.errors import ConfigError

# Other common spellings (TRL's, short ones) -> the canonical field. Listed in docs/config.md.
ALIASES: dict[str, str] = {
    "beta": "pref_beta",
    "loss_type": "pref_loss",
    "moe_aux_loss_coef": "router_aux_loss_coef",  # LLaMA-Factory's name
    "model_name": "model_name_or_path",
    "model": "model_name_or_path",
    "max_length": "cutoff_len",
    "train_data_path": "dataset",
    "val_data_path": "eval_dataset",
    "batch_size": "per_device_train_batch_size",
    "num_epochs": "num_train_epochs",
    "eval_every": "eval_steps",
    "save_every": "save_steps",
    "log_every": "logging_steps",
    "dpo_label_smoothing": "label_smoothing",  # LLaMA-Factory's spelling
    "desirable_weight": "kto_chosen_weight",  # TRL's KTOConfig spelling
    "undesirable_weight": "kto_rejected_weight",
    "optimizer": "optim",  # preftune's earlier name
    "evaluation_strategy": "eval_strategy",  # transformers' name before 4.46
    "use_liger_kernel": "enable_liger_kernel",  # TrainingArguments' spelling (LLaMA-Factory's is the field)
}

# Keys whose values are translated, not just renamed (`translate`).
SPECIAL = ("mixed_precision",)

_TEXT_ONLY = "images and videos are not supported: preftune trains text-only causal language models"
_ONE_PROCESS_GROUP = ("preftune trains on several processes through accelerate launch / torchrun "
                      "(docs/distributed.md), sharded with fsdp: full_shard when the model does not fit")
# Keys of transformers' TrainingArguments and LLaMA-Factory that preftune does not honour, with why
# and what to use instead. Each is accepted at the values in `off` (what the key does when absent:
# null, false, none, or the only behaviour preftune has), so configs that carry them unchanged load;
# any other value is refused with the message. docs/llamafactory-keys.md lists every key.
NOT_HONOURED: dict[str, tuple[tuple, str]] = {
    "fsdp_config": ((None, {}), "set the FSDP2 mode with fsdp: full_shard, shard_grad_op or offload, or launch "
                                "with an accelerate FSDP2 config (docs/distributed.md)"),
    "do_predict": ((None, False), "prediction is `preftune sample` (or `preftune eval` to score completions)"),
    "do_eval": ((None, False, True), "evaluation runs whenever there is validation data (val_size, eval_dataset)"),
    "predict_with_generate": ((None, False), "generation is `preftune sample`; generate_during_eval samples at "
                                             "each evaluation"),
    "logging_strategy": ((None, "steps"), "logging is every logging_steps optimizer steps; set logging_steps"),
    "logging_first_step": ((None, False, True), "step 0 is always evaluated (the baseline) when there is "
                                                "validation data"),
    "logging_nan_inf_filter": ((None, True, False), "every logged value is the mean of what the step computed"),
    "log_level": ((None, "passive", "info", "warning"), "preftune logs at info level (Python's logger "
                                                        "'preftune'); remove log_level"),
    "disable_tqdm": ((None, False), "use progress_bar: false"),
    "save_safetensors": ((None, True), "preftune writes safetensors only"),
    "remove_unused_columns": ((None, True, False), "preftune reads only the columns it needs"),
    "dataloader_pin_memory": ((None, True, False), "batches are built in-process and moved to the device directly"),
    "dataloader_drop_last": ((None, False), "an epoch's last short batch is trained, not dropped; set max_samples "
                                            "to a multiple of the global batch"),
    "dataloader_persistent_workers": ((None, False, True), "batches are built in-process (no workers)"),
    "ddp_find_unused_parameters": ((None, False, True), "set by accelerate"),
    "ddp_backend": ((None, "nccl", "gloo"), "accelerate chooses NCCL with GPUs, gloo without"),
    "include_num_input_tokens_seen": ((None, False, True), "tokens_per_second is always logged"),
    "tf32": ((None, False), "TF32 matmuls are not switched on; set torch.backends.cuda.matmul.allow_tf32 in your "
                            "own launcher, or train in bf16: true"),
    "auto_find_batch_size": ((None, False), "the batch size is the one you set; lower per_device_train_batch_size "
                                            "and raise gradient_accumulation_steps to fit"),
    "eval_accumulation_steps": ((None,), "evaluation pools sums per batch and never holds all predictions"),
    "label_smoothing_factor": ((None, 0, 0.0), "for preference losses use label_smoothing (cDPO / robust DPO)"),
    "optim_args": ((None, ""), "the optimizer takes adam_beta1, adam_beta2, adam_epsilon and weight_decay"),
    "use_cpu": ((None, False, True), "preftune uses the GPU when there is one; hide it with CUDA_VISIBLE_DEVICES="),
    "full_determinism": ((None, False), "a run is deterministic on CPU for a given seed; on GPU set "
                                        "CUBLAS_WORKSPACE_CONFIG and torch.use_deterministic_algorithms yourself"),
    "data_seed": ((None,), "seed sets the data order too"),
    "eval_on_start": ((None, False, True), "step 0 is always evaluated (the baseline) when there is validation data"),
    "save_on_each_node": ((None, False), "the main process writes every file; use a shared output_dir"),
    "average_tokens_across_devices": ((None, False, True), "losses are means over pairs (or completion tokens "
                                                           "for sft) of every process"),
    "quantization_method": ((None, "bnb", "bitsandbytes"), "quantization_bit loads through bitsandbytes only"),
    "double_quantization": ((None, True), "QLoRA always uses double quantization (bitsandbytes nf4 with a "
                                          "quantized scale)"),
    "rope_scaling": ((None,), "context extension by RoPE scaling is not applied; use a model whose config "
                              "already sets it"),
    "mask_history": ((None, False), "multi-turn training data trains on the last assistant turn only"),
    "train_on_prompt": ((None, False), "the loss is over completion tokens only"),
    "pad_to_multiple_of": ((None,), "batches are padded to their longest sequence; padding_free: true removes "
                                    "padding altogether"),
    "packing": ((None, False), "sequences are not concatenated across examples; padding_free: true puts a "
                               "micro-batch's sequences in one row without letting them attend to each other"),
    "use_reentrant_gc": ((None, False), "gradient checkpointing is non-reentrant by default; for the reentrant "
                                        "variant set gradient_checkpointing_kwargs: {use_reentrant: true}"),
    "freeze_vision_tower": ((None, True), _TEXT_ONLY),
    "freeze_multi_modal_projector": ((None, True), _TEXT_ONLY),
    "freeze_language_model": ((None, False), _TEXT_ONLY),
    "image_max_pixels": ((None,), _TEXT_ONLY),
    "image_min_pixels": ((None,), _TEXT_ONLY),
    "video_max_pixels": ((None,), _TEXT_ONLY),
    "video_min_pixels": ((None,), _TEXT_ONLY),
    "video_fps": ((None,), _TEXT_ONLY),
    "video_maxlen": ((None,), _TEXT_ONLY),
    "ray_run_name": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "runtime_env": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "env_vars": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "pip": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "ray_storage_path": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "ray_num_workers": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "resources_per_worker": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "placement_strategy": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "ray_init_kwargs": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
}


def _not_honoured(key: str, value: Any, source: str) -> None:
    """A NOT_HONOURED key: accepted (and without effect) at an off value, else one line with why."""
    off, why = NOT_HONOURED[key]
    if isinstance(value, str) and value.lower() in ("null", "none", "~", "false", "true"):
        value = {"null": None, "none": None, "~": None, "false": False, "true": True}[value.lower()]
    if not any(value == o and type(value) is type(o) for o in off if o is not None) and not (value is None and None in off):
        raise ConfigError(f"{source}: {key}: {value!r} is not honoured: {why}")


def plain_value(key: str, value: Any) -> Any:
    """`value` as preftune spells it where YAML or LLaMA-Factory write it otherwise."""
    field_ = FIELDS.get(ALIASES.get(key, key))
    choices = field_.metadata.get("choices", ()) if field_ else ()
    if value is False and (key == "mixed_precision" or "no" in choices):
        value = "no"  # YAML 1.1 reads a bare `no` as false: for a key whose values include "no", it meant "no"
    if key == "report_to" and value is None:
        value = "none"
    if key == "deepspeed" and (value is None or str(value).strip().lower() == "none"):
        value = ""  # LLaMA-Factory's way of saying no DeepSpeed
    if key == "metric_for_best_model" and isinstance(value, str) and (value == "kl" or value.endswith("_kl")):
        value += "_per_token"  # kl, eval_kl, eval_<set>_kl: preftune's name for the per-token KL before it had its unit
    return value


def translate(key: str, value: Any, source: str) -> dict[str, Any] | None:
    """Another tool's key or value that is not a plain rename, as the fields it sets ({} for a key not
    honoured, at a value where it changes nothing); None when `key` is none of them. One line for a
    value that has no translation."""
    if key == "mixed_precision":  # accelerate's spelling: 'fp16' | 'bf16' | 'no'
        mp = str(value).lower()
        if mp not in ("no", "fp16", "bf16", "fp32", "none"):
            raise ConfigError(f"{source}: mixed_precision must be one of no, fp16, bf16; got {value!r}")
        return {"bf16": mp == "bf16", "fp16": mp == "fp16"}
    if key == "rpo_alpha":  # older TRL: not the same normalisation, so not an alias
        raise ConfigError(f"{source}: rpo_alpha (older TRL) averages the NLL over all chosen tokens of the batch; "
                          "preftune's pref_ftx (LLaMA-Factory) averages it per pair. Use pref_ftx")
    if key == "resume_from_checkpoint" and (isinstance(value, bool) or str(value).lower() in ("true", "false")):
        # true: the latest checkpoint in output_dir (resolved by checkpoints.resume_dir)
        return {key: "true" if str(value).lower() == "true" else None}
    if key == "ref_model" and value == "same_as_policy":
        return {"ref_model": None}
    if key == "stage" and value == "kto":  # LLaMA-Factory's KTO stage: the kto loss of the dpo stage here
        return {"stage": "dpo"}  # from_dict sets pref_loss: kto, once it knows no other pref_loss was given
    if key in NOT_HONOURED:
        _not_honoured(key, value, source)
        return {}
    return None
