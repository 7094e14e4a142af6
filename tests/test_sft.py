"""`preftune sft` (stage: sft): every SFT data shape, a loss on completion tokens only equal to
transformers' own, and a run through the same loop whose held-out perplexity falls."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune.cli import main
from preftune.config import from_dict
from preftune.data import load_pairs, read_dataset
from preftune.errors import ConfigError, DataError
from preftune.reference import Reference
from preftune.step import STEPS, LogpsModule, SFTStep
from preftune.tokenization import tokenize_pairs


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_every_sft_shape_reads_as_prompt_and_completion(tmp_path):
    files = {
        "completion": [{"prompt": "Hi?", "completion": "Hello.", "system": "Be kind."}],
        "messages": [{"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
                                   {"role": "assistant", "content": "Hey."}, {"role": "user", "content": "More?"},
                                   {"role": "assistant", "content": "Hello."}]}],
        "alpaca": [{"instruction": "Say hi", "input": "politely", "output": "Hello."}],
        "sharegpt": [{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}],
        "pairs": [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}],
    }
    for name, records in files.items():
        (example,) = read_dataset(write_jsonl(tmp_path / f"{name}.jsonl", records), "data", sft=True)
        assert example.chosen == "Hello.", name
    (conversation,) = read_dataset(str(tmp_path / "messages.jsonl"), "data", sft=True)
    assert conversation.system == "Be kind." and [m["content"] for m in conversation.messages] == ["Hi?", "Hey.", "More?"]
    (alpaca,) = read_dataset(str(tmp_path / "alpaca.jsonl"), "data", sft=True)
    assert alpaca.prompt == "Say hi\npolitely"  # LLaMA-Factory joins instruction and input
    with pytest.raises(DataError, match="labelled \\(KTO-style\\) examples: SFT trains on every completion"):
        read_dataset(write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "a", "completion": "b", "label": False}]),
                     "data", sft=True)
    with pytest.raises(DataError, match="bad.jsonl:1: field 'messages': SFT trains on the last message, which must be"):
        read_dataset(write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"}]}]),
                     "data", sft=True)
    with pytest.raises(DataError):  # a DPO run does not take SFT records
        read_dataset(str(tmp_path / "completion.jsonl"), "data")


def test_dataset_info_sft_entries(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{"q": "Say hi", "a": "Hello."}])
    write_jsonl(data / "s.jsonl", [{"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}])
    (data / "dataset_info.json").write_text(json.dumps({
        "my_alpaca": {"file_name": "a.jsonl", "columns": {"prompt": "q", "response": "a"}},
        "my_sharegpt": {"file_name": "s.jsonl", "formatting": "sharegpt"}}))
    examples = read_dataset("my_alpaca,my_sharegpt", str(data), sft=True)
    assert [(e.prompt, e.chosen) for e in examples] == [("Say hi", "Hello."), ("Hi?", "Hello.")]
    with pytest.raises(DataError, match="not a preference dataset"):  # DPO still needs ranking entries
        read_dataset("my_alpaca", str(data))


def test_sft_loss_is_transformers_completion_nll(tiny_model_dir):
    """The loop's mean of SFTStep's losses over a micro-batch equals transformers' causal-LM loss with
    the prompt and padding labels masked (-100): the NLL per completion token of the batch."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = read_dataset(write_jsonl(tiny_model_dir.parent / "sft_nll.jsonl", [
        {"prompt": "How do I learn chess?", "completion": "Practice a little every day."},
        {"prompt": "Tips?", "completion": "Start small and keep going, you will improve steadily."},
        {"prompt": "Cook?", "completion": "Yes."}]), "data", sft=True)
    step = SFTStep(from_dict({"stage": "sft"}))
    batch = step.collate(tokenize_pairs(tokenizer, pairs, 128, None), tokenizer.pad_token_id)
    with torch.no_grad():
        losses = step(LogpsModule(model, 1024), Reference(), batch).losses
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    assert losses.shape == (3,)
    assert losses.mean().item() == pytest.approx(expected.item(), rel=1e-5)
    packed = SFTStep(from_dict({"stage": "sft", "padding_free": True}))
    with torch.no_grad():
        packed_losses = packed(LogpsModule(model, 1024), Reference(),
                               packed.collate(tokenize_pairs(tokenizer, pairs, 128, None), tokenizer.pad_token_id)).losses
    torch.testing.assert_close(packed_losses, losses, atol=1e-5, rtol=1e-5)


def test_sft_config_needs_no_reference_and_refuses_preference_keys():
    cfg = from_dict({"stage": "sft"})
    assert cfg.objective == "sft" and not cfg.uses_reference and STEPS[cfg.objective] is SFTStep
    with pytest.raises(ConfigError, match="^ref_model: stage: sft trains on completions alone"):
        from_dict({"stage": "sft", "ref_model": "x"})


def lf_sft_project(tmp_path, model_dir, demo_pairs):
    """A LLaMA-Factory-style SFT project: an alpaca dataset_info entry and `stage: sft` YAML."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "sft.jsonl", [{"instruction": p["prompt"], "input": "", "output": p["chosen"]} for p in demo_pairs])
    (data / "dataset_info.json").write_text(json.dumps({"advice": {"file_name": "sft.jsonl"}}))
    config = {"model_name_or_path": str(model_dir), "stage": "sft", "do_train": True, "finetuning_type": "full",
              "dataset": "advice", "dataset_dir": str(data), "cutoff_len": 128, "val_size": 16,
              "per_device_train_batch_size": 8, "learning_rate": 3e-3, "num_train_epochs": 2, "logging_steps": 2,
              "eval_steps": 3, "output_dir": str(tmp_path / "out"), "progress_bar": False, "torch_dtype": "float32"}
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_preftune_sft_runs_llama_factory_yaml_and_perplexity_falls(tmp_path, tiny_model_dir, demo_pairs, capsys):
    config = lf_sft_project(tmp_path, tiny_model_dir, demo_pairs)
    assert main(["sft", str(config)]) == 0
    out = tmp_path / "out"
    assert "held-out perplexity:" in capsys.readouterr().out
    summary = json.loads((out / "sft_metrics" / "summary.json").read_text())
    assert {"training_metrics.csv", "log_history.json", "training_curves.png"} <= {
        p.name for p in (out / "sft_metrics").iterdir()}
    assert not (out / "dpo_metrics").exists()
    base, final = summary["baseline"], summary["final"]
    assert final["eval_perplexity"] < 0.7 * base["eval_perplexity"]
    assert final["eval_perplexity"] == pytest.approx(2.718281828 ** final["eval_loss"], rel=1e-6)
    assert "eval_rewards/accuracies" not in final and "kl_per_token" not in final  # no pairs, no reference
    model = AutoModelForCausalLM.from_pretrained(out)  # a plain transformers model
    assert model.config.vocab_size > 0
    # `preftune train` on the same YAML (stage: sft) is the same run
    assert main(["train", str(config), "--output_dir", str(tmp_path / "again"), "--max_steps", "2"]) == 0
    assert (tmp_path / "again" / "sft_metrics" / "summary.json").is_file()


def test_sft_on_a_preference_set_trains_on_chosen(tmp_path, tiny_model_dir, demo_pairs):
    data = write_jsonl(tmp_path / "pairs.jsonl", demo_pairs[:20])
    cfg = from_dict({"stage": "sft", "model_name_or_path": str(tiny_model_dir), "dataset": data, "val_size": 4})
    train, val, report = load_pairs(cfg)
    assert sorted(p.chosen for p in train + val) == sorted(p["chosen"] for p in demo_pairs[:20])
    assert report.skipped_identical == 0
