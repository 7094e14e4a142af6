"""`preftune sample`: prompts rendered as training renders them, seeded and resumable sampling,
rewards that fail in one line, pairing rules that count what they skip, outputs training reads."""

import json

import pytest

from preftune.cli import main
from preftune.commands import sample as sample_cmd
from preftune.config import from_dict
from preftune.data import PreferencePair, read_dataset, read_prompts
from preftune.generate import cut_at_stop
from preftune.tokenization import TokenizeReport, encode_pair, encode_prompts, setup_rendering, stop_ids

REWARD = '''
def length(prompts, completions):
    return [len(c) % 7 for c in completions]

def wrong_count(prompts, completions):
    return [1.0]

def raises(prompts, completions):
    raise RuntimeError("scorer is down")

def nan(prompts, completions):
    return [float("nan")] * len(completions)
'''


@pytest.fixture
def project(tmp_path, demo_pairs):
    (tmp_path / "rewards.py").write_text(REWARD)
    records = [{"prompt": p["prompt"]} for p in demo_pairs[:5]]  # prompt-only records
    records.append({"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "Any tips for chess?"}], "system": "Be brief."})
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def args(project, model_dir, out="out", *extra):
    return ["sample", "--model_name_or_path", str(model_dir), "--dataset", str(project / "prompts.jsonl"),
            "--num_samples", "3", "--max_new_tokens", "12", "--per_device_eval_batch_size", "4",
            "--reward", f"{project / 'rewards.py'}:length", "--output_dir", str(project / out), *extra]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_prompts_are_rendered_as_training_renders_them(tiny_model_dir):
    from preftune.models import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    pair = PreferencePair(prompt="How should I learn chess?", chosen="Practice.", rejected="No.", system="Be kind.")
    for template in (None, "chatml", "none"):  # raw text, the chat template, raw text
        rendering = setup_rendering(tokenizer, template)
        encoded = encode_pair(tokenizer, pair, rendering, TokenizeReport())
        assert encode_prompts(tokenizer, [pair], template)[0] == encoded.chosen_ids[:encoded.chosen_start]
    assert stop_ids(tokenizer)[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert cut_at_stop([5, 6, 9, 7, 9], [9]) == [5, 6, 9] and cut_at_stop([5, 6], [9]) == [5, 6]


def test_sample_writes_scored_candidates_pairs_and_summary(project, tiny_model_dir):
    assert main(args(project, tiny_model_dir)) == 0
    out = project / "out"
    records = lines(out / "samples.jsonl")
    assert [r["id"] for r in records] == [str(i) for i in range(6)]
    assert all(len(r["completions"]) == 3 and all(c["score"] == len(c["text"]) % 7 for c in r["completions"])
               for r in records)
    assert records[5]["prompt"][-1]["content"] == "Any tips for chess?" and records[5]["system"] == "Be brief."
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs"] + sum(summary["skipped"].values()) == 6  # best_worst: one pair or one skip per prompt
    pairs = read_dataset(str(out / "pairs.jsonl"), "data")  # training reads them as they are
    assert len(pairs) == summary["pairs"] > 0
    assert summary["completions_per_second"] > 0


def test_a_killed_run_resumes_to_the_same_samples_without_duplicates(project, tiny_model_dir):
    assert main(args(project, tiny_model_dir, "whole")) == 0
    assert main(args(project, tiny_model_dir, "killed")) == 0
    killed = project / "killed" / "samples.jsonl"
    text = killed.read_text().splitlines(keepends=True)
    killed.write_text("".join(text[:2]) + text[2][:25])  # two prompts done, the third cut mid-line by the kill
    assert main(args(project, tiny_model_dir, "killed")) == 0
    assert lines(killed) == lines(project / "whole" / "samples.jsonl")  # seeded per batch: the same completions
    assert (project / "killed" / "pairs.jsonl").read_text() == (project / "whole" / "pairs.jsonl").read_text()
    assert main(args(project, tiny_model_dir, "killed")) == 0  # nothing left to do: nothing appended
    assert len(lines(killed)) == 6


def test_other_prompts_in_the_output_dir_are_refused(project, tiny_model_dir, capsys):
    assert main(args(project, tiny_model_dir)) == 0
    (project / "prompts.jsonl").write_text(json.dumps({"prompt": "Something else?"}) + "\n")
    assert main(args(project, tiny_model_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert "holds samples of another prompt list" in err and "\n" not in err


@pytest.mark.parametrize("reward,message", [
    ("wrong_count", "returned 1 scores for 3 completions; return one per completion"),
    ("raises", "raised RuntimeError: scorer is down"),
    ("nan", "returned a non-finite score"),
    ("missing", "has no function 'missing'"),
])
def test_a_bad_reward_is_one_line_naming_itself(project, tiny_model_dir, capsys, reward, message):
    argv = args(project, tiny_model_dir)
    argv[argv.index("--reward") + 1] = f"{project / 'rewards.py'}:{reward}"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "rewards.py" in err and "\n" not in err and "Traceback" not in err


def test_without_a_reward_it_writes_candidates_for_people(project, tiny_model_dir, capsys):
    argv = args(project, tiny_model_dir)
    i = argv.index("--reward")
    assert main(argv[:i] + argv[i + 2:]) == 0
    assert all(c["score"] is None for r in lines(project / "out" / "samples.jsonl") for c in r["completions"])
    assert not (project / "out" / "pairs.jsonl").exists() and "preftune label" in capsys.readouterr().out


def test_pairing_rules_count_what_they_skip():
    def rec(i, *scores):
        return {"id": str(i), "prompt": "p", "system": None,
                "completions": [{"text": f"t{i}-{k}", "score": s} for k, s in enumerate(scores)]}

    records = [rec(0, 1.0, 3.0, 2.0), rec(1, 2.0, 2.0, 2.0), rec(2, 1.0, 1.2, 5.0)]
    pairs, skipped = sample_cmd.make_pairs(records, from_dict({"pairing": "best_worst", "min_margin": 0.5}))
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("t0-1", "t0-0"), ("t2-2", "t2-0")]
    assert skipped == {"ties": 1, "below_min_margin": 0, "identical_texts": 0}
    pairs, skipped = sample_cmd.make_pairs(records, from_dict({"pairing": "all", "min_margin": 0.5}))
    assert len(pairs) == 3 + 2 and skipped == {"ties": 3, "below_min_margin": 1, "identical_texts": 0}
    pairs, _ = sample_cmd.make_pairs(records, from_dict({"pairing": "random", "seed": 3}))
    again, _ = sample_cmd.make_pairs(records, from_dict({"pairing": "random", "seed": 3}))
    assert pairs == again and all(p["chosen"] != p["rejected"] for p in pairs)


def test_prompts_from_any_training_file(tmp_path, demo_pairs):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs[:3]))
    assert [p.prompt for p in read_prompts(str(path), "data")] == [p["prompt"] for p in demo_pairs[:3]]
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(Exception, match="no text to sample a completion for"):
        read_prompts(str(empty), "data")


def test_a_reward_model_scores_through_its_chat_template(tmp_path, tiny_tokenizer):
    """A sequence-classification reward model (a local folder): one score per completion, the same as
    scoring the chat-rendered text by hand; a folder that is not one is a one-line error."""
    import torch
    from transformers import AutoModelForSequenceClassification, Qwen2Config, Qwen2ForSequenceClassification

    from preftune.errors import ModelError
    from preftune.rewards import load_reward

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    Qwen2ForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    score = load_reward(str(tmp_path / "rm"))
    scores = score(["Hi?", "Hi?"], ["Hello there.", "Go away."])
    assert len(scores) == 2 and scores[0] != scores[1]
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    text = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "Hi?"},
                                               {"role": "assistant", "content": "Hello there."}], tokenize=False)
    with torch.no_grad():
        expected = model(**tiny_tokenizer(text, return_tensors="pt")).logits[0, 0].item()
    assert scores[0] == pytest.approx(expected, abs=1e-5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="reward: cannot load the reward model"):
        load_reward(str(tmp_path / "empty"))


def test_a_runs_rendering_is_carried_unless_set(project, tiny_model_dir):
    """The run that wrote a model fixes its template, thinking settings and default_system for sample
    (and eval, export, inspect: one rule, saved.with_run_template); a value the command sets wins."""
    import shutil

    import yaml

    from preftune.saved import with_run_template

    run = from_dict({"template": "chatml", "enable_thinking": False, "preserve_thinking": True,
                     "default_system": "Be brief."})
    carried = with_run_template(from_dict({}), run)
    assert (carried.template, carried.enable_thinking, carried.preserve_thinking, carried.default_system) == (
        "chatml", False, True, "Be brief.")
    assert carried.chat_template_kwargs == {"enable_thinking": False, "preserve_thinking": True}
    mine = with_run_template(from_dict({"enable_thinking": True, "preserve_thinking": False,
                                        "default_system": "Be kind."}), run)
    assert (mine.enable_thinking, mine.preserve_thinking, mine.default_system) == (True, False, "Be kind.")

    model = project / "model"  # a folder a run wrote: the weights and its preftune_config.yaml
    shutil.copytree(tiny_model_dir, model)
    (model / "preftune_config.yaml").write_text(yaml.safe_dump(run.to_dict()))
    assert main(args(project, model, "out", "--num_samples", "2", "--max_new_tokens", "2")) == 0
    settings = json.loads((project / "out" / "sample_settings.json").read_text())
    assert (settings["template"], settings["enable_thinking"], settings["default_system"]) == (
        "chatml", False, "Be brief.")
    # a prompt without a system prompt was sampled with the run's
    assert lines(project / "out" / "samples.jsonl")[0]["system"] == "Be brief."
