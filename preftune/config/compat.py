"""Other tools' ways of writing a config: TRL's and other common key names (`ALIASES`), values that
are translated rather than renamed (accelerate's `mixed_precision`, TrainingArguments'
`resume_from_checkpoint: true`, ...), and the keys of LLaMA-Factory and transformers' TrainingArguments
that preftune does not honour (`NOT_HONOURED`), accepted at the values where they change nothing,
and the few accepted at any value because what they tune is not a step preftune has (`INERT`).
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
    "dataset_num_proc": "preprocessing_num_workers",  # TRL's spelling
    "early_stopping_steps": "early_stopping_patience",  # LLaMA-Factory's (EarlyStoppingCallback's patience)
    "health_max_kl": "health_max_kl_per_token",  # preftune's name before the KL per completion had its own
}

# Keys whose values are translated, not just renamed (`translate`).
SPECIAL = ("mixed_precision",)

_NO_VIDEO = ("not supported: vision-language models train on images (image_max_pixels, image_min_pixels), not on "
             "videos or audio (docs/vision.md)")
_IMAGE_AS_GIVEN = ("not supported: an image reaches the processor whole, resized by image_max_pixels / image_min_pixels "
                   "only (docs/vision.md)")
_OPTIMIZER = ("the optimizer is optim (AdamW, Adafactor, SGD, bitsandbytes' 8-bit AdamW); other optimizers are not "
              "built in")
_SFT_LOSS = ("preftune sft minimises the negative log-likelihood of the completion tokens; other SFT losses are not "
             "built in")
_MEGATRON = ("preftune runs on accelerate's engines (DDP, FSDP2, DeepSpeed ZeRO), not Megatron; shard with fsdp: "
             "full_shard or a ZeRO-3 deepspeed config (docs/distributed.md)")
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
    "train_on_prompt": ((None, False), "the loss is over completion tokens only"),
    "streaming": ((None, False), "preftune reads, checks and tokenizes (and caches) every example before the "
                                 "first step: the epoch order, val_size, group_by_length, precompute_ref_log_probs "
                                 "and exact resuming all need the whole set; cap a large dataset with max_samples, "
                                 "tokenize in parallel with preprocessing_num_workers"),
    "buffer_size": ((None, 16384), "it is streaming's shuffle buffer, and preftune does not stream; shuffle: true "
                                   "shuffles the whole set"),
    "tool_format": ((None,), "tool definitions and calls are written by the chat template (the model's own, or "
                             "template: qwen's ChatML for a tokenizer without one), as the model was trained to read "
                             "them; LLaMA-Factory's tool_format swaps in its own tool-call syntax, which preftune "
                             "does not implement"),
    "packing": ((None, False), "sequences are not concatenated across examples; padding_free: true puts a "
                               "micro-batch's sequences in one row without letting them attend to each other"),
    "use_reentrant_gc": ((None, False), "gradient checkpointing is non-reentrant by default; for the reentrant "
                                        "variant set gradient_checkpointing_kwargs: {use_reentrant: true}"),
    "video_max_pixels": ((None,), _NO_VIDEO),
    "video_min_pixels": ((None,), _NO_VIDEO),
    "video_fps": ((None,), _NO_VIDEO),
    "video_maxlen": ((None,), _NO_VIDEO),
    "ray_run_name": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "runtime_env": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "env_vars": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "pip": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "ray_storage_path": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "ray_num_workers": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "resources_per_worker": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "placement_strategy": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    "ray_init_kwargs": ((None,), f"Ray is not supported; {_ONE_PROCESS_GROUP}"),
    # LLaMA-Factory's data arguments
    "eval_num_beams": ((None,), "evaluation scores pairs; generation (preftune sample, generate_during_eval) samples, "
                                "without beam search"),
    "ignore_pad_token_for_loss": ((None, True), "padding is never part of a loss"),
    "eval_on_each_dataset": ((None, False), "give eval_dataset as a mapping of names to data ({a: a.jsonl, b: "
                                            "b.jsonl}): each set is evaluated and logged on its own"),
    "neat_packing": ((None, False), "sequences are not concatenated across examples; padding_free: true puts a "
                                    "micro-batch's sequences in one row without letting them attend to each other"),
    "tokenized_path": ((None,), "tokenized data is cached by preftune itself (tokenized_cache_dir), keyed by the "
                                "data, tokenizer and settings, and reused by every run that matches"),
    "data_shared_file_system": ((None, False, True), "each process tokenizes through the same cache; the main "
                                                     "process writes it"),
    # LLaMA-Factory's fine-tuning arguments
    "loraplus_lr_ratio": ((None,), "LoRA+ (a higher learning rate for LoRA's B matrices) is not built in; every "
                                   "trained weight takes learning_rate"),
    "loraplus_lr_embedding": ((None, 1e-6), "LoRA+ is not built in; every trained weight takes learning_rate"),
    "pissa_init": ((None, False), "PiSSA initialisation is not built in: LoRA adapters start as peft initialises them"),
    "pissa_iter": ((None, 16), "PiSSA initialisation is not built in"),
    "pissa_convert": ((None, False), "PiSSA initialisation is not built in"),
    "create_new_adapter": ((None, False), "the last adapter of adapter_name_or_path continues training and the "
                                          "others are merged; to start a new adapter on top, merge them all first "
                                          "(preftune export) and start from the merged model"),
    "module_dropout": ((None, 0, 0.0), "OFT is not built in (finetuning_type: full, freeze or lora)"),
    "oft_rank": ((None, 0), "OFT is not built in (finetuning_type: full, freeze or lora)"),
    "oft_block_size": ((None, 32), "OFT is not built in (finetuning_type: full, freeze or lora)"),
    "oft_target": ((None, "all"), "OFT is not built in (finetuning_type: full, freeze or lora)"),
    **{key: ((None, False), _OPTIMIZER) for key in ("use_galore", "use_apollo", "use_badam", "use_adam_mini",
                                                    "use_muon", "galore_layerwise", "apollo_layerwise",
                                                    "apollo_scale_front")},
    **{key: ((None, default), _OPTIMIZER) for key, default in (
        ("galore_target", "all"), ("galore_rank", 16), ("galore_update_interval", 200), ("galore_scale", 2.0),
        ("galore_proj_type", "std"), ("apollo_target", "all"), ("apollo_rank", 16), ("apollo_update_interval", 200),
        ("apollo_scale", 32.0), ("apollo_proj", "random"), ("apollo_proj_type", "std"),
        ("apollo_scale_type", "channel"), ("badam_mode", "layer"), ("badam_switch_mode", "ascending"),
        ("badam_switch_interval", 50), ("badam_update_ratio", 0.05), ("badam_mask_mode", "adjacent"),
        ("badam_verbose", 0), ("badam_start_block", None))},
    "use_llama_pro": ((None, False), "LLaMA Pro's block expansion is not built in; finetuning_type: freeze trains "
                                     "chosen layers"),
    **{key: ((None, False), _MEGATRON) for key in ("use_mca", "use_megatron_bridge", "use_hyper_parallel")},
    "megatron_bridge_args": ((None,), _MEGATRON),
    "hyper_parallel_args": ((None,), _MEGATRON),
    "hyper_parallel_cp_size": ((None, 1), _MEGATRON),
    **{key: ((None, False), _SFT_LOSS) for key in ("use_dft_loss", "use_asft_loss", "use_eaft_loss")},
    "asft_alpha": ((None, 0.1), _SFT_LOSS),
    "eaft_alpha": ((None, 1.0), _SFT_LOSS),
    "compute_accuracy": ((None, False), "sft evaluation logs loss and perplexity, not token accuracy"),
    "disable_shuffling": ((None, False), "each epoch's order is shuffled by seed (group_by_length groups it); the "
                                         "order within a file matters only to max_samples and val_size"),
    "include_effective_tokens_per_second": ((None, False, True), "tokens_per_second is always logged"),
    **{key: ((None, False), "SwanLab is not a tracker here; report_to takes tensorboard, wandb, mlflow, trackio")
       for key in ("use_swanlab",)},
    **{key: ((None, default), "SwanLab is not a tracker here; report_to takes tensorboard, wandb, mlflow, trackio")
       for key, default in (("swanlab_project", "llamafactory"), ("swanlab_workspace", None),
                            ("swanlab_run_name", None), ("swanlab_mode", "cloud"), ("swanlab_api_key", None), ("swanlab_logdir", None),
                            ("swanlab_lark_webhook_url", None), ("swanlab_lark_secret", None))},
    # LLaMA-Factory's model arguments
    "adapter_folder": ((None,), "name each adapter folder in adapter_name_or_path (a comma list)"),
    "cache_dir": ((None,), "models and datasets download to the Hugging Face cache; set HF_HOME to move it"),
    "use_fast_tokenizer": ((None, True), "the tokenizer loads as transformers' AutoTokenizer gives it (fast where "
                                         "there is one)"),
    "resize_vocab": ((None, False), "the vocabulary is the model's; preftune adds no tokens"),
    "split_special_tokens": ((None, False), "special tokens in the text are read as special tokens, as the "
                                            "tokenizer does"),
    "add_tokens": ((None,), "preftune adds no tokens: train on a model whose tokenizer has them"),
    "add_special_tokens": ((None,), "preftune adds no tokens: train on a model whose tokenizer has them"),
    "new_special_tokens_config": ((None,), "preftune adds no tokens: train on a model whose tokenizer has them"),
    "init_special_tokens": ((None, "noise_init"), "preftune adds no tokens: train on a model whose tokenizer has them"),
    "model_revision": ((None, "main"), "give model_name_or_path a local snapshot of that revision (hf download "
                                       "NAME --revision R --local-dir DIR)"),
    "low_cpu_mem_usage": ((None, True, False), "transformers loads weights without a second copy in memory"),
    "shift_attn": ((None, False), "LongLoRA's shifted sparse attention is not built in"),
    "mixture_of_depths": ((None,), "mixture-of-depths conversion is not built in"),
    "use_unsloth": ((None, False), "Unsloth's kernels are not used; enable_liger_kernel fuses the LM head and the "
                                   "loss"),
    "use_unsloth_gc": ((None, False), "Unsloth's gradient checkpointing is not used; use gradient_checkpointing: true"),
    "disable_gradient_checkpointing": ((None, True), "gradient checkpointing is off unless gradient_checkpointing: "
                                                     "true (LLaMA-Factory turns it on by default)"),
    "upcast_layernorm": ((None, False), "norms stay in the dtype the weights load in; bf16: true keeps trainable "
                                        "weights in float32"),
    "upcast_lmhead_output": ((None, False), "log-probs are computed from the LM head's logits in float32 already"),
    "train_from_scratch": ((None, False), "preference training starts from a trained model's weights"),
    "offload_folder": ((None, "offload"), "weights are not offloaded to disk; fsdp: offload or a ZeRO config's "
                                          "offload_param put them on the CPU"),
    "use_kv_cache": ((None, True, False), "generation always uses the KV cache; training never does"),
    "use_v1_kernels": ((None, False), "LLaMA-Factory's kernels are not used; enable_liger_kernel uses Liger's"),
    "hf_hub_token": ((None,), "log in with `hf auth login` or set HF_TOKEN to download; hub_token is for pushing"),
    "ms_hub_token": ((None,), "ModelScope is not a source here"),
    "om_hub_token": ((None,), "Modelers (openMind) is not a source here"),
    "print_param_status": ((None, False), "parameter names and dtypes are not printed; load the model in Python "
                                          "to inspect it"),
    "quantization_type": ((None, "nf4"), "QLoRA loads 4-bit weights as nf4"),
    "quantization_device_map": ((None,), "each process loads its quantized model on its own GPU"),
    "image_do_pan_and_scan": ((None, False), _IMAGE_AS_GIVEN),
    "crop_to_patches": ((None, False), _IMAGE_AS_GIVEN),
    "use_audio_in_video": ((None, False), _NO_VIDEO),
    "audio_sampling_rate": ((None, 16000), _NO_VIDEO),
}


# Keys accepted with any value, without effect: what they tune is not a step preftune has.
INERT: dict[str, str] = {
    "preprocessing_batch_size": "records are tokenized one at a time (preprocessing_num_workers sets the processes)",
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
    if key == "pad_to_multiple_of" and value == "auto":
        value = None  # TRL's default: a multiple of 128 on Neuron (which preftune does not run on), else none
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
    if key in INERT:
        return {}
    return None
