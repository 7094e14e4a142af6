"""How data is rendered: plain strings are raw text unless `template` is set, conversations always go
through the chat template, `template: none` is raw text whatever the tokenizer holds; every command
renders a prompt through the same function; an empty completion is an answer."""

import copy
import json
import logging

import pytest

from preftune import train as train_mod
from preftune.config import from_dict, load_config
from preftune.data import DataReport, check_pairs, read_dataset, read_examples, read_prompts
from preftune.errors import ConfigError, DataError
from preftune.tokenization import (RAW_TEMPLATES, TokenizeReport, describe_rendering, encode_prompts,
                                   tokenize_examples, tokenize_pairs)

QUESTION, ANSWER, OTHER = "How should I learn chess?", " Start with the basics.", " Whatever."
# one record of every shape, each with the question as its (last) prompt turn and ANSWER as the completion
PLAIN = {  # plain strings: raw text unless template is set
    "standard": {"prompt": QUESTION, "chosen": ANSWER, "rejected": OTHER},
    "alpaca": {"instruction": QUESTION, "input": "", "chosen": ANSWER, "rejected": OTHER},
    "unpaired": {"prompt": QUESTION, "completion": ANSWER, "label": True},
    "sft completion": {"prompt": QUESTION, "completion": ANSWER},
    "sft alpaca": {"instruction": QUESTION, "input": "", "output": ANSWER},
}
CONVERSATIONAL = {  # messages: always the chat template
    "trl": {"prompt": [{"role": "user", "content": QUESTION}], "chosen": [{"role": "assistant", "content": ANSWER}],
            "rejected": [{"role": "assistant", "content": OTHER}]},
    "whole conversations": {"chosen": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
                            "rejected": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": OTHER}]},
    "sharegpt": {"conversations": [{"from": "human", "value": QUESTION}], "chosen": {"from": "gpt", "value": ANSWER},
                 "rejected": {"from": "gpt", "value": OTHER}},
    "unpaired": {"prompt": [{"role": "user", "content": QUESTION}], "completion": [{"role": "assistant", "content": ANSWER}],
                 "label": True},
    "sft messages": {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]},
}
CHATML_PROMPT = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"


def read_one(tmp_path, record):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (example,) = read_examples(str(path), str(tmp_path), sft=True)
    return example


def rendered(tokenizer, example, template):
    """(prompt text, completion text) as training tokenizes the example."""
    t = tokenize_examples(tokenizer, [example], 512, template)[0]  # a pair gives chosen, then rejected
    return tokenizer.decode(t.ids[:t.start]), tokenizer.decode(t.ids[t.start:])


@pytest.mark.parametrize("shape", list(PLAIN))
def test_plain_strings_are_raw_text_unless_template_is_set(tmp_path, tiny_tokenizer, shape):
    tokenizer = copy.deepcopy(tiny_tokenizer)  # a tokenizer with a ChatML template, as many base models carry
    example = read_one(tmp_path, PLAIN[shape])
    assert not example.conversational
    assert rendered(tokenizer, example, None) == (QUESTION, ANSWER + "<|im_end|>")  # EOS appended, no markup
    for raw in RAW_TEMPLATES:
        assert rendered(tokenizer, example, raw) == (QUESTION, ANSWER + "<|im_end|>")
    # a LLaMA-Factory config names its template: then plain strings go through it too
    assert rendered(tokenizer, example, "qwen") == (CHATML_PROMPT, ANSWER + "<|im_end|>\n")


@pytest.mark.parametrize("shape", list(CONVERSATIONAL))
def test_conversations_always_go_through_the_chat_template(tmp_path, tiny_tokenizer, shape):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    example = read_one(tmp_path, CONVERSATIONAL[shape])
    assert example.conversational
    for template in (None, "qwen"):
        prompt, completion = rendered(tokenizer, example, template)
        assert prompt == CHATML_PROMPT and completion == ANSWER + "<|im_end|>\n"
    # template: none is raw text whatever the tokenizer holds (a single user turn is its text)
    assert rendered(tokenizer, example, "none") == (QUESTION, ANSWER + "<|im_end|>")
    # a tokenizer without a template, none named: the turns' text (LLaMA-Factory's `empty` does the same)
    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    assert rendered(plain, example, None)[0] == QUESTION


def test_hh_rlhf_text_is_verbatim_unless_template_is_set(tmp_path, tiny_tokenizer):
    prompt = f"\n\nHuman: {QUESTION}\n\nAssistant:"
    example = read_one(tmp_path, {"chosen": prompt + ANSWER, "rejected": prompt + OTHER})
    assert not example.conversational
    assert rendered(copy.deepcopy(tiny_tokenizer), example, None) == (prompt, ANSWER + "<|im_end|>")
    assert rendered(copy.deepcopy(tiny_tokenizer), example, "qwen")[0] == CHATML_PROMPT


def test_template_none_is_a_setting_and_several_turns_need_a_template(tmp_path, tiny_tokenizer):
    assert from_dict({"template": "none"}).template == "none"  # not read as null (unset)
    assert load_config(None, ["--template", "none"]).template == "none"
    assert from_dict({"template": None}).template is None and from_dict({"template": "null"}).template is None
    history = {"prompt": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                          {"role": "user", "content": "times 3?"}],
               "chosen": [{"role": "assistant", "content": "12"}], "rejected": [{"role": "assistant", "content": "7"}]}
    with pytest.raises(ConfigError, match=r"d.jsonl:1: a multi-turn conversation needs a chat template .*template: "
                                          r"none renders raw text; unset it or name a chat template \(e.g. llama3\)"):
        tokenize_pairs(copy.deepcopy(tiny_tokenizer), [read_one(tmp_path, history)], 512, "none")


def test_the_rendering_is_described_with_the_reason_and_how_to_apply_a_template(tmp_path, tiny_tokenizer):
    plain, conv = read_one(tmp_path, PLAIN["standard"]), read_one(tmp_path, CONVERSATIONAL["trl"])
    tok = copy.deepcopy(tiny_tokenizer)
    d = describe_rendering(tok, None, [plain])
    assert d["used"] == "raw" and "no template set" in d["why"]
    assert d["hint"] == ("the tokenizer has a chat template, which plain-string data does not use; if the model was "
                         "trained with it, set template: qwen (or give prompts as messages)")
    assert describe_rendering(tok, None, [conv]) == {
        "used": "chat template (tokenizer)", "why": "conversational data (messages) always goes through the chat template"}
    assert describe_rendering(tok, None, [plain, conv])["used"] == \
        "raw (plain strings), chat template (tokenizer) (conversations)"
    d = describe_rendering(tok, "llama3", [plain])  # named, but the tokenizer's own template is the model's
    assert d["used"] == "chat template (tokenizer)" and "template: llama3 is set" in d["why"] and "hint" not in d
    d = describe_rendering(tok, "none", [plain, conv])
    assert d["used"] == "raw" and "template: none: raw text whatever the tokenizer holds" in d["why"]
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    assert describe_rendering(bare, None, [plain]) == {"used": "raw", "why": describe_rendering(tok, None, [plain])["why"]}
    assert describe_rendering(bare, "qwen", [plain])["used"] == "template qwen"


def write_pairs(folder, pairs):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


def test_a_run_says_once_how_it_renders_and_summary_json_records_it(tmp_path, tiny_model_dir, demo_pairs, caplog):
    data = write_pairs(tmp_path, demo_pairs[:16])
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "dataset": str(data), "val_size": 4,
                     "output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 4,
                     "cutoff_len": 64, "torch_dtype": "float32", "progress_bar": False, "plot_loss": False,
                     "tokenized_cache_dir": str(tmp_path / "cache")})
    with caplog.at_level(logging.INFO, logger="preftune"):
        summary = train_mod.train(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("rendering: ")]
    assert lines == ["rendering: raw (plain-string data and no template set: raw text (BOS as the tokenizer adds it, "
                     "EOS after each completion), as TRL renders plain strings); hint: the tokenizer has a chat "
                     "template, which plain-string data does not use; if the model was trained with it, set template: "
                     "qwen (or give prompts as messages)"]
    assert summary["data"]["rendering"]["used"] == "raw"
    written = json.loads((tmp_path / "out" / "dpo_metrics" / "summary.json").read_text())
    assert written["data"]["rendering"] == summary["data"]["rendering"]


@pytest.mark.parametrize("template", [None, "chatml", "none"])
def test_sample_and_eval_render_a_prompt_exactly_as_training_does(tmp_path, tiny_model_dir, demo_pairs, template,
                                                                  monkeypatch):
    """The prompt ids `preftune sample` and `preftune eval` generate from are the prompt part of the ids
    training scores, for plain-string data (raw text, or the template when one is named)."""
    import preftune.generate
    from preftune.commands import eval as eval_cmd
    from preftune.commands import sample as sample_cmd
    from preftune.models import load_tokenizer

    data = write_pairs(tmp_path, demo_pairs[:3] + [{**demo_pairs[3], "system": "Be kind."}])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    trained = tokenize_pairs(tokenizer, read_dataset(str(data), "data"), 512, template)
    expected = [t.chosen_ids[:t.chosen_start] for t in trained]
    assert (tokenizer.decode(expected[0]).startswith("<|im_start|>")) == (template == "chatml")

    seen = []

    def fake_sample(model, tokenizer, prompts, cfg, device, skip=frozenset(), images=None, processor=None):
        seen.append(prompts)
        yield 0, [[[tokenizer.eos_token_id]] * cfg.num_samples for _ in prompts]

    monkeypatch.setattr(preftune.generate, "sample", fake_sample)
    reward = tmp_path / "rewards.py"
    reward.write_text("def score(prompts, completions):\n    return [0.0] * len(completions)\n")
    keys = {"model_name_or_path": str(tiny_model_dir), "template": template, "num_samples": 2,
            "reward": f"{reward}:score", "torch_dtype": "float32"}
    sample_cmd.run(from_dict({**keys, "dataset": str(data), "output_dir": str(tmp_path / "sampled")}))
    model = preftune.models.load_model(str(tiny_model_dir), from_dict(keys))
    eval_cmd.eval_prompts({"m": model}, model, tokenizer, from_dict({**keys, "prompts": str(data)}))
    assert seen[0] == expected  # sample
    assert seen[1] == seen[2] == expected  # eval: the reference, then the model
    assert encode_prompts(tokenizer, read_prompts(str(data), "data"), template) == expected  # generate_during_eval


def test_sample_writes_a_conversational_prompt_as_messages_so_its_pairs_render_alike(tmp_path, tiny_model_dir):
    """A single-turn conversation is sampled through the chat template; the pairs it gives must be
    conversational too, or training would render them as raw text."""
    from preftune.commands.sample import prompt_record

    path = write_pairs(tmp_path, [CONVERSATIONAL["trl"], PLAIN["standard"]])
    conv, plain = read_prompts(str(path), "data")
    assert prompt_record(conv)["prompt"] == [{"role": "user", "content": QUESTION}]
    assert prompt_record(plain)["prompt"] == QUESTION
    hh = read_one(tmp_path, {"chosen": f"\n\nHuman: {QUESTION}\n\nAssistant: a", "rejected": f"\n\nHuman: {QUESTION}"
                                                                                          "\n\nAssistant: b"})
    assert prompt_record(hh)["prompt"] == f"\n\nHuman: {QUESTION}\n\nAssistant:"  # its text, as training renders it


# --- empty completions ----------------------------------------------------------------------------

def test_an_empty_completion_is_an_answer_and_chosen_equal_to_rejected_is_an_error(tmp_path, tiny_tokenizer):
    records = [{"prompt": QUESTION, "chosen": ANSWER, "rejected": ""},
               {"prompt": [{"role": "user", "content": QUESTION}], "chosen": [{"role": "assistant", "content": ""}],
                "rejected": [{"role": "assistant", "content": OTHER}]}]
    pairs = [read_one(tmp_path, r) for r in records]
    assert check_pairs(pairs, drop_invalid=False, report=DataReport()) == pairs
    tokenizer = copy.deepcopy(tiny_tokenizer)
    raw, templated = tokenize_pairs(tokenizer, pairs, 512, None)
    assert raw.rejected_ids[raw.rejected_start:] == [tokenizer.eos_token_id]  # EOS alone
    assert tokenizer.decode(templated.chosen_ids[templated.chosen_start:]) == "<|im_end|>\n"  # the end of turn alone
    with pytest.raises(DataError, match=r"1 with chosen == rejected .*drop_invalid_pairs"):
        check_pairs([read_one(tmp_path, {"prompt": QUESTION, "chosen": "", "rejected": ""})], drop_invalid=False,
                    report=DataReport())
    kto = read_one(tmp_path, {"prompt": QUESTION, "completion": "", "label": False})
    (t,) = tokenize_examples(tokenizer, [kto], 512, None, TokenizeReport())
    assert t.ids[t.start:] == [tokenizer.eos_token_id] and not t.label


def test_pairs_with_an_empty_completion_train(tmp_path, tiny_model_dir, demo_pairs):
    """TRL trains on them; so does preftune: the empty side's log-prob is that of ending at once."""
    pairs = [{**p, "rejected": ""} if i % 2 else p for i, p in enumerate(demo_pairs[:16])]
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "dataset": str(write_pairs(tmp_path, pairs)),
                     "output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 8,
                     "logging_steps": 1, "cutoff_len": 64, "torch_dtype": "float32", "progress_bar": False,
                     "plot_loss": False, "tokenized_cache_dir": str(tmp_path / "cache")})
    summary = train_mod.train(cfg)
    assert summary["data"]["train"] == 16 and summary["data"]["skipped_identical"] == 0
    assert summary["final"]["loss"] > 0 and summary["final"]["logps/rejected"] < 0


def test_sft_trains_on_an_empty_completion_but_refuses_a_record_without_one(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": QUESTION, "completion": ""}) + "\n")
    (example,) = read_dataset(str(path), "data", sft=True)
    assert example.chosen == "" and check_pairs([example], False, DataReport(), sft=True) == [example]
    path.write_text(json.dumps({"prompt": QUESTION}) + "\n")
    with pytest.raises(DataError, match=r"sft.jsonl:1: a prompt without a completion; SFT trains on a completion"):
        read_dataset(str(path), "data", sft=True)
    assert read_prompts(str(path), "data")[0].prompt == QUESTION  # a prompt to sample from


def test_sample_and_eval_take_the_template_of_the_run_that_wrote_the_model(tmp_path, tiny_model_dir, demo_pairs,
                                                                          monkeypatch):
    """A model trained with template: chatml is sampled and evaluated through it unless told otherwise."""
    import shutil

    import preftune.generate
    from preftune.commands import sample as sample_cmd
    from preftune.saved import run_config, with_run_template
    from preftune.models import load_tokenizer

    model_dir = tmp_path / "run"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "preftune_config.yaml").write_text(f"model_name_or_path: {tiny_model_dir}\ntemplate: chatml\n")
    assert with_run_template(from_dict({}), run_config(model_dir)).template == "chatml"
    assert with_run_template(from_dict({"template": "none"}), run_config(model_dir)).template == "none"
    data = write_pairs(tmp_path, demo_pairs[:2])
    seen = []

    def fake_sample(model, tokenizer, prompts, cfg, device, skip=frozenset(), images=None, processor=None):
        seen.append(prompts)
        yield 0, [[[tokenizer.eos_token_id]] * cfg.num_samples for _ in prompts]

    monkeypatch.setattr(preftune.generate, "sample", fake_sample)
    sample_cmd.run(from_dict({"model_name_or_path": str(model_dir), "dataset": str(data), "num_samples": 2,
                              "output_dir": str(tmp_path / "sampled")}))
    tokenizer = load_tokenizer(str(model_dir))
    assert tokenizer.decode(seen[0][0]).startswith("<|im_start|>user\n")
    summary = json.loads((tmp_path / "sampled" / "summary.json").read_text())
    assert summary["rendering"]["used"] == "template chatml"  # the tiny tokenizer holds the built-in ChatML itself
    assert seen[0] == encode_prompts(tokenizer, read_prompts(str(data), "data"), "chatml")


def test_alpaca_history_needs_template_and_says_how(tmp_path, tiny_tokenizer):
    """alpaca is plain strings: raw text unless template is set, and a history has no raw rendering."""
    record = {"instruction": "times 3?", "input": "", "chosen": "12", "rejected": "7", "history": [["2+2?", "4"]]}
    (tmp_path / "a.json").write_text(json.dumps([record]))
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"a": {"file_name": "a.json", "ranking": True, "columns": {"history": "history"}}}))
    (pair,) = read_dataset("a", str(tmp_path))
    assert not pair.conversational and len(pair.messages) == 3
    with pytest.raises(ConfigError, match=r"needs a chat template .*plain-string data is raw text unless template "
                                          r"is set: set it \(e.g. qwen, llama3\)$"):
        tokenize_pairs(copy.deepcopy(tiny_tokenizer), [pair], 512, None)
    (t,) = tokenize_pairs(copy.deepcopy(tiny_tokenizer), [pair], 512, "qwen")
    assert tiny_tokenizer.decode(t.chosen_ids[:t.chosen_start]).endswith(
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\ntimes 3?<|im_end|>\n"
        "<|im_start|>assistant\n")
