"""Hostile but realistic inputs around the flow (issue 19), through the `preftune` command in-process:
models that do not belong together, a resumed `sample` with other settings, prompts longer than the
model's context, rewards that return text or parse the command line at import, an SFT run on pairs,
eval's missing --prompts file.

Each refusal follows tests/hostile.py's rule: a non-zero exit, one error line naming the file/key and
the fix, no traceback, nothing outside output_dir changed.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
from hostile import run_in_process, run_refused

from preftune.demo import build_model, build_tokenizer

REWARDS = '''
def length(prompts, completions):
    return [len(c) % 7 for c in completions]

def digits(prompts, completions):
    return "".join(str(len(c) % 10) for c in completions)

def texts(prompts, completions):
    return [str(len(c)) for c in completions]

def one_number(prompts, completions):
    return 1.5
'''

ARGPARSE_AT_IMPORT = '''
import argparse
parser = argparse.ArgumentParser()
parser.add_argument("--judge_url", required=True)
args = parser.parse_args()

def score(prompts, completions):
    return [0.0 for c in completions]
'''


@pytest.fixture(scope="module")
def p(tmp_path_factory, tiny_model_dir, tiny_tokenizer, demo_pairs):
    """A model, a model of the same size whose tokenizer has two ids swapped, a smaller-vocabulary model,
    pairs, prompts and reward files."""
    root = tmp_path_factory.mktemp("hostile_flow")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    permuted = root / "permuted"
    shutil.copytree(tiny_model_dir, permuted)
    spec = json.loads((permuted / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (200, 201))
    vocab[a], vocab[b] = vocab[b], vocab[a]  # the same tokens and size, two ids swapped
    (permuted / "tokenizer.json").write_text(json.dumps(spec))
    small = root / "small"
    small_tokenizer = build_tokenizer([d[k] for d in demo_pairs for k in ("prompt", "chosen")], vocab_size=300)
    build_model(len(small_tokenizer), seed=1, hidden=32, layers=2).save_pretrained(small)
    small_tokenizer.save_pretrained(small)
    no_tokenizer = root / "no_tokenizer"  # weights alone: compared by vocabulary size
    build_model(len(small_tokenizer), seed=1, hidden=32, layers=2).save_pretrained(no_tokenizer)
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(d) + "\n" for d in demo_pairs[:8]))
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": d["prompt"]}) + "\n" for d in demo_pairs[:3]))
    (root / "rewards.py").write_text(REWARDS)
    (root / "judge.py").write_text(ARGPARSE_AT_IMPORT)
    return SimpleNamespace(root=root, model=model, permuted=permuted, small=small, no_tokenizer=no_tokenizer,
                           pairs=pairs, prompts=prompts, rewards=root / "rewards.py", judge=root / "judge.py")


def refused(p, args, out, expect):
    return run_refused(args, cwd=p.root, watch=[p.root], expect=expect, output_dir=out, in_process=True)


# --- 1. models that do not belong together are never compared -------------------------------------------


@pytest.mark.parametrize("other,detail", [("permuted", "the same 400 tokens in size, but 2 of them with other ids"),
                                          ("small", "300 tokens against 400")])
def test_eval_refuses_a_reference_on_another_tokenizer(p, other, detail):
    out = p.root / f"eval_{other}"
    message = refused(p, ["eval", "--model_name_or_path", str(p.model), "--ref_model", str(getattr(p, other)),
                          "--dataset", str(p.pairs), "--output_dir", str(out)], out,
                      [f"ref_model '{getattr(p, other)}' has another tokenizer than model_name_or_path '{p.model}'",
                       detail, "same model family"])
    assert "IndexError" not in message


def test_eval_refuses_a_second_model_on_another_tokenizer(p):
    out = p.root / "eval_sweep"
    refused(p, ["eval", "--model_name_or_path", f"{p.model},{p.permuted}", "--ref_model", str(p.model),
                "--dataset", str(p.pairs), "--output_dir", str(out)], out,
            [f"model_name_or_path '{p.permuted}' has another tokenizer than the first model '{p.model}'",
             "separate runs"])


def test_a_reference_without_tokenizer_files_is_checked_by_size_not_indexerror(p):
    out = p.root / "eval_no_tokenizer"
    refused(p, ["eval", "--model_name_or_path", str(p.model), "--ref_model", str(p.no_tokenizer),
                "--dataset", str(p.pairs), "--output_dir", str(out)], out,
            [f"ref_model '{p.no_tokenizer}': its vocabulary has 300 tokens but the policy's tokenizer has 400"])


def test_train_and_export_refuse_a_reference_on_another_tokenizer(p):
    out = p.root / "train_permuted"
    refused(p, ["train", "--model_name_or_path", str(p.model), "--ref_model", str(p.permuted), "--dataset",
                str(p.pairs), "--max_steps", "1", "--progress_bar", "false", "--plot_loss", "false",
                "--output_dir", str(out)], out,
            [f"ref_model '{p.permuted}' has another tokenizer than model_name_or_path '{p.model}'"])
    out = p.root / "export_permuted"
    refused(p, ["export", str(p.model), "--ref", str(p.small), "--data", str(p.pairs), "--out", str(out)], out,
            [f"--ref '{p.small}' has another tokenizer than MODEL '{p.model}'"])



def sample_args(p, out, *extra, model=None, prompts=None):
    return ["sample", "--model_name_or_path", str(model or p.model), "--dataset", str(prompts or p.prompts),
            "--num_samples", "2", "--max_new_tokens", "4", "--reward", f"{p.rewards}:length",
            "--output_dir", str(out), *extra]


def with_reward(args, reward):
    args = list(args)
    args[args.index("--reward") + 1] = reward
    return args


# --- 4. rewards that mislead ------------------------------------------------------------------------------


@pytest.mark.parametrize("fn,returned", [("digits", "returned a str ("), ("texts", "item 0 is a str ("),
                                         ("one_number", "returned a float (1.5)")])
def test_a_reward_must_return_numbers_not_text(p, fn, returned):
    out = p.root / f"reward_{fn}"
    refused(p, with_reward(sample_args(p, out, "--max_samples", "1"), f"{p.rewards}:{fn}"), out,
            [f"reward {p.rewards}:{fn} returned", returned, "return a list with one number per completion"])


def test_a_reward_file_that_parses_the_command_line_at_import_is_named(p):
    out = p.root / "reward_argparse"
    message = refused(p, with_reward(sample_args(p, out), f"{p.judge}:score"), out,
                      [f"reward: importing '{p.judge}' exited (SystemExit 2)", "--judge_url",
                       "if __name__ == \"__main__\""])
    assert "usage:" not in message


# --- 2. a resumed sample with other settings ---------------------------------------------------------------


def test_sample_resumed_with_other_settings_is_refused_and_nothing_changes(p):
    out = p.root / "resumed"
    first = sample_args(p, out, "--max_samples", "2")
    assert run_in_process(first, p.root).returncode == 0
    assert json.loads((out / "sample_settings.json").read_text())["num_samples"] == 2
    again = list(first)
    again[again.index("--num_samples") + 1] = "3"
    refused(p, again + ["--temperature", "0.7"], None,
            [f"{out / 'samples.jsonl'} holds 2 prompts sampled with other settings (num_samples 2 -> 3, temperature "
             "1.0 -> 0.7)", "resume with the earlier values, or use another output_dir"])
    # samples of an earlier preftune (no settings file): their completion count is compared
    (out / "sample_settings.json").unlink()
    refused(p, again, None, ["(num_samples 2 -> 3)"])


# --- 3. prompts longer than the model's context -------------------------------------------------------------


@pytest.fixture(scope="module")
def short(p, demo_pairs):
    """The model with a context of 40 positions (its config says so; the weights do not care), and prompts of
    which one is far longer."""
    folder = p.root / "short_context"
    shutil.copytree(p.model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 40}))
    prompts = p.root / "long_prompts.jsonl"
    records = [{"prompt": demo_pairs[0]["prompt"]}, {"prompt": " ".join(d["prompt"] for d in demo_pairs[:12])}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    return SimpleNamespace(model=folder, prompts=prompts)


@pytest.fixture
def widths(monkeypatch):
    """The prompt width of every generate call (left-padded batches: the longest prompt's length)."""
    from transformers import Qwen2ForCausalLM

    seen, generate = [], Qwen2ForCausalLM.generate

    def spy(self, *args, **kwargs):
        seen.append(kwargs["input_ids"].shape[1])
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(Qwen2ForCausalLM, "generate", spy)
    return seen


def test_sample_cuts_a_prompt_longer_than_the_context_from_the_left_and_counts_it(p, short, widths):
    out = p.root / "cut"
    result = run_in_process(sample_args(p, out, "--max_new_tokens", "8", model=short.model, prompts=short.prompts),
                            p.root)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts_cut_to_context"] == 1
    assert widths and max(widths) + 8 <= 40  # prompt and completion within the 40 positions
    # the record keeps the prompt as the data gave it: nothing of the user's is rewritten
    long_prompt = json.loads(short.prompts.read_text().splitlines()[1])["prompt"]
    assert [json.loads(line)["prompt"] for line in (out / "samples.jsonl").read_text().splitlines()][1] == long_prompt


def test_eval_cuts_prompts_to_the_smallest_context_and_counts_them(p, short, widths):
    out = p.root / "eval_cut"
    result = run_in_process(["eval", "--model_name_or_path", str(short.model), "--ref_model", str(p.model),
                             "--prompts", str(short.prompts), "--reward", f"{p.rewards}:length", "--num_samples", "2",
                             "--max_new_tokens", "6", "--output_dir", str(out)], p.root)
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "eval.json").read_text())["reference"]["prompts_cut_to_context"] == 1
    assert widths and max(widths) + 6 <= 40


def test_max_new_tokens_beyond_the_context_is_refused(p, short):
    out = p.root / "no_room"
    refused(p, sample_args(p, out, "--max_new_tokens", "40", model=short.model, prompts=short.prompts), out,
            ["max_new_tokens: 40 leaves no room for a prompt in the model's context of 40 tokens",
             "lower max_new_tokens"])


# --- 5. sft on pairs, eval's missing --prompts ----------------------------------------------------------------


def test_sft_on_pairs_says_their_rejected_answers_are_not_used(p, caplog):
    out = p.root / "sft_pairs"
    with caplog.at_level("INFO", logger="preftune"):
        result = run_in_process(["sft", "--model_name_or_path", str(p.model), "--dataset", str(p.pairs),
                                 "--max_steps", "1", "--progress_bar", "false", "--plot_loss", "false",
                                 "--output_dir", str(out)], p.root)
    assert result.returncode == 0, result.stderr
    said = [r.getMessage() for r in caplog.records if "rejected answers are not used" in r.getMessage()]
    assert said == ["sft: 8 of the 8 training records are preference pairs: trained on their chosen answers; their "
                    "rejected answers are not used (preftune train trains on both)"]
    # SFT records (read as pairs whose rejected is the chosen) are not pairs: nothing said
    from preftune.data.load import _say_rejected_unused, read_dataset

    sft_file = p.root / "sft.jsonl"
    sft_file.write_text(json.dumps({"prompt": "Hi", "completion": "Hello"}) + "\n"
                        + json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                   {"role": "assistant", "content": "Hey"}]}) + "\n")
    caplog.clear()
    with caplog.at_level("INFO", logger="preftune"):
        _say_rejected_unused(read_dataset(str(sft_file), "data", sft=True), "training")
    assert not caplog.records


def test_eval_names_a_missing_prompts_file_prompts(p):
    out = p.root / "eval_no_prompts"
    message = refused(p, ["eval", "--model_name_or_path", str(p.model), "--ref_model", str(p.model), "--prompts",
                          "missing.jsonl", "--reward", f"{p.rewards}:length", "--output_dir", str(out)], out,
                      ["prompts 'missing.jsonl': not a name in"])
    assert "dataset" not in message.split(":")[0]
