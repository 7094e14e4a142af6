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


def test_no_refused_key_is_a_config_key():
    """A key preftune comes to honour leaves NOT_HONOURED (it would be refused before reaching its field)."""
    assert not set(NOT_HONOURED) & set(TrainConfig.__dataclass_fields__)


def test_a_far_fetched_suggestion_is_never_made_for_these_keys():
    """data_seed used to be answered with "did you mean 'seed'?", which does something else."""
    with pytest.raises(ConfigError, match="data_seed: 7 is not honoured: seed sets the data order too"):
        from_dict({"data_seed": 7})
