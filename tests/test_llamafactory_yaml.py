"""LLaMA-Factory's current DPO and KTO examples (examples/train_lora/qwen3_lora_dpo.yaml and
qwen3_lora_kto.yaml at its latest commit) run with their keys and values as they are: only the paths point
at a tiny local model, a local dataset_dir holding dpo_en_demo / kto_en_demo entries shaped as LLaMA-Factory's
data/dataset_info.json has them, and a temporary output_dir."""

import json

import pytest
import yaml

from preftune.batching import collate_unpaired
from preftune.cli import main
from preftune.tokenization import TokenizedExample, kl_neighbours

QWEN3_LORA_DPO = """\
### model
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
trust_remote_code: true

### method
stage: dpo
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
pref_beta: 0.1
pref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]

### dataset
dataset: dpo_en_demo
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/lora/dpo
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""

QWEN3_LORA_KTO = """\
### model
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
trust_remote_code: true

### method
stage: kto
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
pref_beta: 0.1

### dataset
dataset: kto_en_demo
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: saves/qwen3-4b/lora/kto
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
"""

# LLaMA-Factory's data/dataset_info.json entries of the two demo sets
DATASET_INFO = {
    "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": True, "formatting": "sharegpt",
                    "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
    "kto_en_demo": {"file_name": "kto_en_demo.json", "formatting": "sharegpt",
                    "columns": {"messages": "messages", "kto_tag": "label"},
                    "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant"}},
}


def lf_project(tmp_path, model_dir, pairs, example: str):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps(DATASET_INFO))
    (data / "dpo_en_demo.json").write_text(json.dumps([
        {"conversations": [{"from": "human", "value": p["prompt"]}], "chosen": {"from": "gpt", "value": p["chosen"]},
         "rejected": {"from": "gpt", "value": p["rejected"]}} for p in pairs]))
    (data / "kto_en_demo.json").write_text(json.dumps([
        {"messages": [{"content": p["prompt"], "role": "user"},
                      {"content": p["chosen" if i % 2 else "rejected"], "role": "assistant"}], "label": bool(i % 2)}
        for i, p in enumerate(pairs)]))
    config = yaml.safe_load(example)
    config.update(model_name_or_path=str(model_dir), dataset_dir=str(data), output_dir=str(tmp_path / "out"))
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("example", [QWEN3_LORA_DPO, QWEN3_LORA_KTO], ids=["dpo", "kto"])
def test_llamafactory_example_runs_unchanged(tmp_path, tiny_model_dir, demo_pairs, example):
    path, config = lf_project(tmp_path, tiny_model_dir, demo_pairs[:16], example)
    assert config["template"] == "qwen3_nothink" and config["per_device_train_batch_size"] == 1
    # the YAML as it is; --max_steps only keeps the test short (one step of 8 micro-batches of one)
    assert main(["train", str(path), "--max_steps", "1"]) == 0
    metrics = tmp_path / "out" / "dpo_metrics"
    summary = json.loads((metrics / "summary.json").read_text())
    assert summary["data"]["train"] == 16 and summary["steps"]["done"] == 1
    assert summary["data"]["rendering"]["used"] == "template qwen3_nothink"  # its ChatML on the tokenizer
    assert (metrics / "training_curves.png").is_file()  # plot_loss
    assert (tmp_path / "out" / "model.safetensors").is_file()  # LoRA, merged (save_adapter_only unset)


def test_a_kto_micro_batch_of_one_pairs_with_its_neighbour_in_the_data():
    """Batch size 1 (LLaMA-Factory's KTO example): a micro-batch has no other completion, so its KL row takes
    the previous example's (LLaMA-Factory's feedback.py pairs example i with example i-1's response), never
    its own, which would make z_ref the example's own reward."""
    examples = kl_neighbours([TokenizedExample([1, 2, 10, 11], 2, True), TokenizedExample([3, 20], 1, False),
                              TokenizedExample([1, 2, 30], 2, False)])
    # cyclic: the first takes the last but one, skipping the last, which has its prompt (1, 2)
    assert [e.kl_completion for e in examples] == [[20], [10, 11], [20]]
    batch = collate_unpaired(examples[1:2], pad_token_id=0)
    assert batch["kl_input_ids"].tolist() == [[3, 10]] and batch["kl_completion_mask"].tolist() == [[0, 1]]
    two = collate_unpaired(examples[:2], pad_token_id=0)  # within a batch, the batch's own rotation as before
    assert two["kl_input_ids"].tolist() == [[1, 2, 20, 0], [3, 10, 11, 0]]
