"""The whole flow in one run, on a tiny local model: sft -> sample (scored by a reward) -> dpo on the
sampled pairs with the SFT model as reference -> eval of the DPO model against it."""

import json

import pytest

from preftune.cli import main

REWARD = '''
def politeness(prompts, completions):
    good = ("practice", "goal", "teacher", "steps", "guide", "improve", "enjoy", "luck", "help", "sure")
    return [sum(w in c.lower() for w in good) + len(c) / 1000 for c in completions]
'''


@pytest.mark.slow
@pytest.mark.one_process
def test_sft_sample_reward_dpo_eval(tmp_path, tiny_model_dir, demo_pairs):
    (tmp_path / "rewards.py").write_text(REWARD)
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p["chosen"]}) + "\n"
                                              for p in demo_pairs))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in demo_pairs))
    reward = f"{tmp_path / 'rewards.py'}:politeness"
    common = ["--cutoff_len", "96", "--torch_dtype", "float32", "--progress_bar", "false", "--plot_loss", "false"]

    assert main(["sft", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(tmp_path / "sft.jsonl"),
                 "--val_size", "8", "--learning_rate", "3e-3", "--per_device_train_batch_size", "8",
                 "--num_train_epochs", "3", "--output_dir", str(tmp_path / "sft"), *common]) == 0
    sft = json.loads((tmp_path / "sft" / "sft_metrics" / "summary.json").read_text())
    assert sft["final"]["eval_perplexity"] < sft["baseline"]["eval_perplexity"]

    assert main(["sample", "--model_name_or_path", str(tmp_path / "sft"), "--dataset", str(tmp_path / "prompts.jsonl"),
                 "--num_samples", "4", "--max_new_tokens", "24", "--reward", reward,
                 "--output_dir", str(tmp_path / "sampled")]) == 0
    sampled = json.loads((tmp_path / "sampled" / "summary.json").read_text())
    assert sampled["pairs"] >= 32  # most prompts give a pair

    assert main(["train", "--model_name_or_path", str(tmp_path / "sft"), "--dataset",
                 str(tmp_path / "sampled" / "pairs.jsonl"), "--val_size", "8", "--learning_rate", "2e-3",
                 "--per_device_train_batch_size", "8", "--num_train_epochs", "3", "--pref_beta", "0.1",
                 "--output_dir", str(tmp_path / "dpo"), *common]) == 0
    dpo = json.loads((tmp_path / "dpo" / "dpo_metrics" / "summary.json").read_text())
    assert dpo["final"]["rewards/accuracies"] > 0.6  # it learns the reward's preferences on its own samples

    assert main(["eval", "--model_name_or_path", str(tmp_path / "dpo"), "--prompts", str(tmp_path / "prompts.jsonl"),
                 "--max_samples", "24", "--reward", reward, "--num_samples", "2", "--max_new_tokens", "24",
                 "--output_dir", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    (row,) = report["models"]
    assert row["reference"] == str(tmp_path / "sft")  # the DPO run's reference, from its preftune_config.yaml
    assert row["prompts"]["kl_per_sequence"] > 0 and 0 <= row["prompts"]["win_rate_vs_reference"] <= 1
    assert (tmp_path / "eval" / "frontier.png").is_file()
