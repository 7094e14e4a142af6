"""docs/llamafactory-keys.md: every key of LLaMA-Factory's DPO/KTO/SFT example configs and the common
TrainingArguments / TRL keys loads through preftune's config with the outcome the table states."""

import re
from pathlib import Path

import pytest
import yaml

from preftune.config import ALIASES, NOT_HONOURED, TrainConfig, from_dict
from preftune.errors import ConfigError

TABLE = Path(__file__).resolve().parents[1] / "docs" / "llamafactory-keys.md"
ROW = re.compile(r"^\| `(?P<key>[a-z_0-9]+)` \| (?P<where>[^|]+) \| `(?P<example>[^`]+)` \| (?P<status>.+) \|$")

# The keys of LLaMA-Factory's examples/train_{full,lora,qlora} DPO, KTO and SFT configs (qwen3_* today,
# llama3_* before), commented-out ones included.
LLAMAFACTORY_EXAMPLE_KEYS = """
model_name_or_path trust_remote_code stage do_train finetuning_type lora_rank lora_target pref_beta pref_loss
deepspeed dataset dataset_dir template cutoff_len max_samples overwrite_cache preprocessing_num_workers
dataloader_num_workers output_dir logging_steps save_steps plot_loss overwrite_output_dir save_only_model report_to
per_device_train_batch_size gradient_accumulation_steps learning_rate num_train_epochs lr_scheduler_type
warmup_ratio bf16 ddp_timeout resume_from_checkpoint eval_dataset val_size per_device_eval_batch_size eval_strategy
eval_steps quantization_bit quantization_method double_quantization weight_decay max_grad_norm gradient_checkpointing
gradient_checkpointing_kwargs use_reentrant_gc enable_liger_kernel rope_scaling flash_attn pure_bf16 mask_history
pad_to_multiple_of packing group_by_length freeze_vision_tower freeze_multi_modal_projector freeze_language_model
image_max_pixels video_max_pixels video_fps video_maxlen ray_num_workers ray_run_name ray_storage_path
ray_init_kwargs resources_per_worker placement_strategy runtime_env env_vars pip
""".split()

# Every key of LLaMA-Factory's hparams/data_args.py, finetuning_args.py and model_args.py that a DPO, KTO or SFT run
# can carry: not its PPO, reward-model, export, vLLM/SGLang-server and KTransformers keys, nor internal fields.
# moe_aux_loss_coef (MoE) is documented with that feature.
LLAMAFACTORY_ARGUMENT_KEYS = """
enable_thinking preserve_thinking template dataset eval_dataset dataset_dir media_dir cutoff_len train_on_prompt mask_history streaming buffer_size
mix_strategy interleave_probs overwrite_cache preprocessing_batch_size preprocessing_num_workers max_samples
eval_num_beams ignore_pad_token_for_loss val_size eval_on_each_dataset packing neat_packing tool_format
default_system tokenized_path data_shared_file_system freeze_trainable_layers freeze_trainable_modules
freeze_extra_modules additional_target lora_alpha lora_dropout lora_rank lora_target loraplus_lr_ratio
loraplus_lr_embedding use_rslora use_dora pissa_init pissa_iter pissa_convert create_new_adapter module_dropout
oft_rank oft_block_size oft_target pref_beta pref_ftx pref_bco_weight pref_loss dpo_label_smoothing
kto_chosen_weight kto_rejected_weight simpo_gamma ref_model ref_model_adapters ref_model_quantization_bit ld_alpha
use_galore galore_target galore_rank galore_update_interval galore_scale galore_proj_type galore_layerwise
use_apollo apollo_target apollo_rank apollo_update_interval apollo_scale apollo_proj apollo_proj_type
apollo_scale_type apollo_layerwise apollo_scale_front use_badam badam_mode badam_start_block badam_switch_mode
badam_switch_interval badam_update_ratio badam_mask_mode badam_verbose use_swanlab swanlab_project
swanlab_workspace swanlab_run_name swanlab_mode swanlab_api_key swanlab_logdir swanlab_lark_webhook_url
swanlab_lark_secret pure_bf16 stage finetuning_type use_llama_pro use_adam_mini use_mca use_megatron_bridge
megatron_bridge_args use_hyper_parallel hyper_parallel_args hyper_parallel_cp_size use_muon use_dft_loss
use_asft_loss asft_alpha use_eaft_loss eaft_alpha freeze_vision_tower freeze_multi_modal_projector
freeze_language_model compute_accuracy disable_shuffling early_stopping_steps plot_loss
include_effective_tokens_per_second model_name_or_path adapter_name_or_path adapter_folder cache_dir
use_fast_tokenizer resize_vocab split_special_tokens add_tokens add_special_tokens new_special_tokens_config
init_special_tokens model_revision low_cpu_mem_usage rope_scaling flash_attn shift_attn mixture_of_depths
use_unsloth use_unsloth_gc enable_liger_kernel disable_gradient_checkpointing use_reentrant_gc upcast_layernorm
upcast_lmhead_output train_from_scratch infer_backend offload_folder use_kv_cache use_v1_kernels hf_hub_token
ms_hub_token om_hub_token print_param_status trust_remote_code quantization_method quantization_bit
quantization_type double_quantization quantization_device_map image_max_pixels image_min_pixels
image_do_pan_and_scan crop_to_patches video_max_pixels video_min_pixels video_fps video_maxlen use_audio_in_video
audio_sampling_rate vllm_gpu_util vllm_enforce_eager
""".split()


def rows():
    found = [m.groupdict() for line in TABLE.read_text(encoding="utf-8").splitlines() if (m := ROW.match(line))]
    assert len(found) > 100
    return found


def test_every_llamafactory_example_key_is_in_the_table():
    listed = {r["key"] for r in rows()}
    assert not [k for k in LLAMAFACTORY_EXAMPLE_KEYS if k not in listed]


@pytest.mark.parametrize("row", rows(), ids=lambda r: f"{r['key']}:{r['example']}")
def test_each_key_loads_as_the_table_says(row):
    raw = yaml.safe_load(row["example"])
    assert isinstance(raw, dict) and row["key"] in raw
    status = row["status"]
    if status.startswith("refused"):
        with pytest.raises(ConfigError) as err:
            from_dict(raw, "cfg.yaml")
        message = str(err.value)
        assert re.match(rf"cfg\.yaml: {row['key']}\b", message), message  # names the key, first
        assert "Did you mean" not in message and "\n" not in message
        if row["key"] in NOT_HONOURED:  # accepted at its off value(s), the ones in brackets
            off = NOT_HONOURED[row["key"]][0]
            from_dict({**raw, row["key"]: off[0]}, "cfg.yaml")
            for value in re.findall(r"`([^`]+)`", status.split(")")[0]) if status.startswith("refused (") else []:
                from_dict({**raw, row["key"]: yaml.safe_load(value)}, "cfg.yaml")
        return
    cfg = from_dict(raw, "cfg.yaml")
    if status.startswith("alias of"):
        target = re.match(r"alias of `([a-z_0-9]+)`", status).group(1)
        assert ALIASES[row["key"]] == target
        rest = {k: v for k, v in raw.items() if k != row["key"]}
        assert getattr(cfg, target) == getattr(from_dict({**rest, target: raw[row["key"]]}), target)
    elif status.startswith("honoured"):
        assert row["key"] in cfg.to_dict() or row["key"] == "mixed_precision"
    else:
        assert status.startswith("accepted without effect"), status
        without = from_dict({k: v for k, v in raw.items() if k != row["key"]}).to_dict()
        without.pop(row["key"], None)
        assert {k: v for k, v in cfg.to_dict().items() if k != row["key"]} == without  # nothing else changes


def test_every_llamafactory_argument_key_is_in_the_table():
    listed = {r["key"] for r in rows()}
    assert not [k for k in LLAMAFACTORY_ARGUMENT_KEYS if k not in listed]


def test_no_refused_key_is_a_config_key():
    """A key preftune comes to honour leaves NOT_HONOURED (it would be refused before reaching its field)."""
    assert not set(NOT_HONOURED) & set(TrainConfig.__dataclass_fields__)


def test_a_far_fetched_suggestion_is_never_made_for_these_keys():
    """data_seed used to be answered with "did you mean 'seed'?", which does something else."""
    with pytest.raises(ConfigError, match="data_seed: 7 is not honoured: seed sets the data order too"):
        from_dict({"data_seed": 7})
