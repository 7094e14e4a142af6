"""Every format users bring, read into the same normalized pairs; bad input named precisely."""

import json

import pytest

from preftune.cli import main
from preftune.config import from_dict
from preftune.data import PreferencePair, UnpairedExample, load_pairs, read_dataset, read_examples
from preftune.errors import DataError

GOOD = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}
SYSTEM = {"role": "system", "content": "Be brief."}


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def test_conversational_trl_format(tmp_path):
    path = write_jsonl(tmp_path / "conv.jsonl", [
        {"prompt": [user("Hi?")], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]},
        {"prompt": [SYSTEM, user("2+2?"), assistant("4"), user("times 3?")],
         "chosen": [assistant("12")], "rejected": [assistant("7")]},
    ])
    single, multi = read_dataset(path, "data")
    assert (single.prompt, single.chosen, single.rejected, single.messages) == ("Hi?", "Hello!", "Go away.", None)
    assert multi.system == "Be brief." and multi.messages == [user("2+2?"), assistant("4"), user("times 3?")]
    assert (multi.chosen, multi.rejected) == ("12", "7")


def test_full_conversations_ultrafeedback_shape(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [
        {"prompt_id": "x", "chosen": [user("Name a color."), assistant("Blue.")],
         "rejected": [user("Name a color."), assistant("Seven.")], "score_chosen": 8.0},
        {"chosen": [SYSTEM, user("a"), assistant("b"), user("c"), assistant("good")],
         "rejected": [SYSTEM, user("a"), assistant("b"), user("c"), assistant("bad")]},
    ])
    one, two = read_dataset(path, "data")
    assert (one.prompt, one.chosen, one.rejected, one.messages) == ("Name a color.", "Blue.", "Seven.", None)
    assert two.system == "Be brief." and two.messages == [user("a"), assistant("b"), user("c")]
    assert (two.chosen, two.rejected) == ("good", "bad")
    bad = write_jsonl(tmp_path / "uf_bad.jsonl", [{"chosen": [user("a"), assistant("b")], "rejected": [user("z"), assistant("c")]}])
    with pytest.raises(DataError, match=r"uf_bad.jsonl:1: chosen and rejected must be the same conversation"):
        read_dataset(bad, "data")


def test_ultrafeedback_binarized_with_its_prompt_copy(tmp_path):
    """The real HuggingFaceH4/ultrafeedback_binarized rows carry `prompt` as well as the whole
    conversations; the prompt must agree with the conversations' last user turn."""
    path = write_jsonl(tmp_path / "ufb.jsonl", [
        {"prompt": "Name a color.", "prompt_id": "x", "chosen": [user("Name a color."), assistant("Blue.")],
         "rejected": [user("Name a color."), assistant("Seven.")], "score_chosen": 8.0, "score_rejected": 2.0},
        {"prompt": "c", "chosen": [SYSTEM, user("a"), assistant("b"), user("c"), assistant("good")],
         "rejected": [SYSTEM, user("a"), assistant("b"), user("c"), assistant("bad")]},
    ])
    one, two = read_dataset(path, "data")
    assert (one.prompt, one.chosen, one.rejected, one.messages) == ("Name a color.", "Blue.", "Seven.", None)
    assert two.system == "Be brief." and two.messages == [user("a"), assistant("b"), user("c")]
    bad = write_jsonl(tmp_path / "ufb_bad.jsonl", [{"prompt": "Other question", "chosen": [user("a"), assistant("b")],
                                                    "rejected": [user("a"), assistant("c")]}])
    with pytest.raises(DataError, match=r"ufb_bad.jsonl:1: field 'prompt' differs from the last user turn"):
        read_dataset(bad, "data")


def test_a_prompt_in_a_file_read_as_whole_conversations_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "mix.jsonl", [
        {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]},
        {"prompt": "ignored?", "chosen": [user("q2"), assistant("a")], "rejected": [user("q2"), assistant("b")]},
    ])
    with pytest.raises(DataError, match=r"mix.jsonl:2: has a 'prompt' field, but the first record \(.*mix.jsonl:1\)"):
        read_dataset(path, "data")


def test_implicit_prompt_hh_rlhf(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
        {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: times 3?\n\nAssistant: 12",
         "rejected": "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: times 3?\n\nAssistant: 7"},
        # the answers share a first word: the prompt still ends at the marker, not inside the answer
        {"chosen": "\n\nHuman: Q\n\nAssistant: It is A.", "rejected": "\n\nHuman: Q\n\nAssistant: It is B."},
    ])
    one, multi, shared = read_dataset(path, "data")
    assert (one.prompt, one.chosen, one.rejected) == ("\n\nHuman: Hi\n\nAssistant:", " Hello there.", " Go away.")
    assert multi.prompt == "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: times 3?\n\nAssistant:"
    assert (multi.chosen, multi.rejected) == (" 12", " 7")
    assert (shared.chosen, shared.rejected) == (" It is A.", " It is B.")
    # the turns, for a chat template
    assert one.messages == [user("Hi")] and one.from_text
    assert multi.messages == [user("2+2?"), assistant("4"), user("times 3?")]
    bad = write_jsonl(tmp_path / "nomarker.jsonl", [{"chosen": "yes", "rejected": "no"}])
    with pytest.raises(DataError, match=r"nomarker.jsonl:1: no 'prompt' field.*'\\n\\nAssistant:'.*columns"):
        read_dataset(bad, "data")


def test_llama_factory_sharegpt_and_alpaca_history(tmp_path):
    (tmp_path / "sg.json").write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "gpt", "value": "Hello!"},
         "rejected": {"from": "gpt", "value": "No."}},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "a"},
                           {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"}],
         "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}},
    ]))
    (tmp_path / "odd.json").write_text(json.dumps([
        {"msgs": [{"role": "user", "content": "Hi?"}], "sys": "S", "better": {"role": "assistant", "content": "Y"},
         "worse": {"role": "assistant", "content": "N"}},
    ]))
    (tmp_path / "alp.json").write_text(json.dumps([
        {"instruction": "and now?", "input": "", "history": [["first", "one"]], "chosen": "good", "rejected": "bad"},
    ]))
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "sg": {"file_name": "sg.json", "formatting": "sharegpt", "ranking": True,
               "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}},
        "odd": {"file_name": "odd.json", "formatting": "sharegpt", "ranking": True,
                "columns": {"messages": "msgs", "system": "sys", "chosen": "better", "rejected": "worse"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant"}},
        "alp": {"file_name": "alp.json", "ranking": True, "columns": {"history": "history"}},
    }))
    one, two = read_dataset("sg", str(tmp_path))
    assert (one.prompt, one.chosen, one.rejected, one.messages, one.system) == ("Hi?", "Hello!", "No.", None, None)
    assert two.system == "Be brief." and two.messages == [user("a"), assistant("b"), user("c")]
    (odd,) = read_dataset("odd", str(tmp_path))
    assert (odd.prompt, odd.system, odd.chosen, odd.rejected) == ("Hi?", "S", "Y", "N")
    (alp,) = read_dataset("alp", str(tmp_path))
    assert alp.messages == [user("first"), assistant("one"), user("and now?")] and alp.chosen == "good"
    # a sharegpt file read directly (LLaMA-Factory's default tags)
    assert read_dataset(str(tmp_path / "sg.json"), "data")[1].messages == two.messages


def test_csv_rows_are_read_field_by_field(tmp_path):
    """Quoted commas and line breaks stay inside their field; a row with an unquoted comma (one field
    too many) is an error naming its line, never a silent shift of the columns."""
    (tmp_path / "ok.csv").write_text('prompt,chosen,rejected\n"two\nlines",a,b\n\nQ,"Fine, thanks",z\n')
    first, second = read_dataset(str(tmp_path / "ok.csv"), "data")
    assert (first.prompt, first.chosen, second.prompt, second.chosen) == ("two\nlines", "a", "Q", "Fine, thanks")
    assert second.where.endswith("ok.csv row 2")
    (tmp_path / "comma.csv").write_text("prompt,chosen,rejected\nHi,Hello,Bye\nHow are you?,Fine, thanks,Go away\n")
    with pytest.raises(DataError, match=r"comma.csv:3: row 2 has 4 fields but the header has 3 .*quote fields"):
        read_dataset(str(tmp_path / "comma.csv"), "data")
    (tmp_path / "dup.csv").write_text("prompt,chosen,chosen\nHi,a,b\n")
    with pytest.raises(DataError, match=r"dup.csv:1: column 'chosen' appears twice"):
        read_dataset(str(tmp_path / "dup.csv"), "data")


def test_csv_parquet_saved_folder_and_hf_dataset(tmp_path):
    import datasets
    import pandas as pd

    rows = [{"prompt": f"Q{i}", "chosen": "42", "rejected": f"no {i}"} for i in range(3)]
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "p.parquet")
    conv = [{"prompt": [user("Hi?")], "chosen": [assistant("Hello!")], "rejected": [assistant("No.")]}]
    datasets.Dataset.from_list(conv).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "test": datasets.Dataset.from_list(rows[:1])}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "hub_like" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "hub_like" / "data" / "train.jsonl", rows)
    write_jsonl(tmp_path / "hub_like" / "data" / "test.jsonl", rows[:2])

    csv = read_dataset(str(tmp_path / "p.csv"), "data")
    assert [p.chosen for p in csv] == ["42"] * 3 and csv[0].where.endswith("p.csv row 1")  # "42" stays text
    assert [p.prompt for p in read_dataset(str(tmp_path / "p.parquet"), "data")] == ["Q0", "Q1", "Q2"]
    (saved,) = read_dataset(str(tmp_path / "saved"), "data")
    assert (saved.prompt, saved.chosen) == ("Hi?", "Hello!")
    assert len(read_dataset(f"{tmp_path / 'dd'}:test", "data")) == 1
    assert len(read_dataset(str(tmp_path / "dd"), "data")) == 3
    assert len(read_dataset(f"{tmp_path / 'hub_like'}:test", "data")) == 2  # through datasets.load_dataset
    with pytest.raises(DataError, match=r"no split 'dev' \(splits: train, test\)"):
        read_dataset(f"{tmp_path / 'dd'}:dev", "data")
    with pytest.raises(DataError, match=r"dataset 'nobody/nothing' \(split 'train'\): datasets could not load it"):
        read_dataset("nobody/nothing", "data")


def test_columns_map_and_shuffle(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl",
                       [{"question": f"Q{i}", "good": "y", "bad": "n", "id": i} for i in range(10)])
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    assert read_dataset(path, "data", columns=columns)[3].prompt == "Q3"
    with pytest.raises(DataError, match=r"odd.jsonl:1: missing field 'answer' \(named in `columns`\)"):
        read_dataset(path, "data", columns={"prompt": "question", "chosen": "answer", "rejected": "bad"})
    cfg = {"dataset": path, "columns": columns, "shuffle": True, "seed": 1}
    order = [p.prompt for p in load_pairs(from_dict(cfg))[0]]
    assert sorted(order) == sorted(f"Q{i}" for i in range(10)) and order != [f"Q{i}" for i in range(10)]
    assert order == [p.prompt for p in load_pairs(from_dict(cfg))[0]]  # seeded
    assert order != [p.prompt for p in load_pairs(from_dict({**cfg, "seed": 2}))[0]]


def test_unpaired_kto_data_is_read_and_needs_kto(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"prompt": "Q?", "completion": "good", "label": True},
        {"prompt": [user("Q?")], "completion": [assistant("bad")], "label": False},
    ])
    a, b = read_examples(path, "data")
    assert isinstance(a, UnpairedExample) and (a.prompt, a.completion, a.label) == ("Q?", "good", True)
    assert (b.prompt, b.completion, b.label) == ("Q?", "bad", False)
    with pytest.raises(DataError, match=r"kto.jsonl:1: unpaired \(KTO-style.* needs pref_loss: kto \(2 such records\)"):
        load_pairs(from_dict({"dataset": path}))
    train, _, report = load_pairs(from_dict({"dataset": path, "pref_loss": "kto"}))
    assert [(e.completion, e.label) for e in train] == [("good", True), ("bad", False)] and report.train == 2
    bad = write_jsonl(tmp_path / "kto_bad.jsonl", [{"prompt": "Q", "completion": "c", "label": "yes"}])
    with pytest.raises(DataError, match=r"kto_bad.jsonl:1: field 'label' is str, expected true .* or false"):
        read_examples(bad, "data")


@pytest.mark.parametrize("name,content,message", [
    ("latin.jsonl", b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n',
     r"latin.jsonl:1: not UTF-8 text \(byte 15: b'\\xe9'\); re-save the file as UTF-8"),
    ("utf16.jsonl", '{"prompt": "a"}\n'.encode("utf-16"), r"utf16.jsonl: UTF-16 text .* re-save the file as UTF-8"),
    ("array.jsonl", json.dumps([GOOD, GOOD], indent=1).encode(),
     r"array.jsonl: a JSON array, but a .jsonl file holds one JSON object per line; rename it to .json"),
    ("cut.jsonl", (json.dumps(GOOD) + "\n" + '{"prompt": "Q", "cho').encode(),
     r"cut.jsonl:2: the last line is cut off .* looks truncated: re-export it, or delete that line"),
    ("null.jsonl", b'{"prompt": "Q", "chosen": null, "rejected": "b"}\n',
     r"null.jsonl:1: missing field 'chosen' is null \(expected a string\)"),
    ("number.jsonl", b'{"prompt": "Q", "chosen": 42, "rejected": "b"}\n',
     r"number.jsonl:1: field 'chosen' is int, expected a string; quote it"),
    ("norole.jsonl", json.dumps({"prompt": [{"content": "Hi"}], "chosen": [assistant("a")],
                                 "rejected": [assistant("b")]}).encode() + b"\n",
     r"norole.jsonl:1: field 'prompt' message 0: 'role' is missing, expected a string \(each message needs 'role' "
     r"and 'content'; keys present: content\)"),
    ("badrole.jsonl", json.dumps({"prompt": [{"role": "usr", "content": "Hi"}], "chosen": [assistant("a")],
                                  "rejected": [assistant("b")]}).encode() + b"\n",
     r"badrole.jsonl:1: field 'prompt' message 0: role 'usr' is not one of system, user, assistant, tool"),
    ("badprompt.jsonl", b'{"prompt": 7, "chosen": "a", "rejected": "b"}\n',
     r"badprompt.jsonl:1: field 'prompt' is int, expected a string or a list of"),
    ("twomsgs.jsonl", json.dumps({"prompt": [user("Hi")], "chosen": [assistant("a"), user("b")],
                                  "rejected": [assistant("b")]}).encode() + b"\n",
     r"twomsgs.jsonl:1: field 'chosen' must be assistant messages .* ending on an assistant answer, got roles "
     r"\['assistant', 'user'\]"),
    ("sg_ends.json", json.dumps([{"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}],
                                  "chosen": {"from": "gpt", "value": "c"},
                                  "rejected": {"from": "gpt", "value": "d"}}]).encode(),
     r"sg_ends.json record 0: 'conversations' ends on an assistant turn; for ranking data the conversation ends on "
     r"the human turn and 'chosen'/'rejected' hold the competing gpt answers"),
    ("sg_roles.json", json.dumps([{"conversations": [{"from": "gpt", "value": "a"}],
                                   "chosen": {"from": "gpt", "value": "c"},
                                   "rejected": {"from": "gpt", "value": "d"}}]).encode(),
     r"sg_roles.json record 0: 'conversations' message 0 has from 'gpt', expected 'human'.*set `tags`"),
])
def test_bad_input_names_file_record_field_and_fix(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_dataset(str(tmp_path / name), "data")


def test_bom_is_not_part_of_the_data(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes("\ufeff".encode() + json.dumps(GOOD).encode() + b"\n")
    (tmp_path / "bom.csv").write_bytes("\ufeffprompt,chosen,rejected\nQ?,a,b\n".encode())
    assert read_dataset(str(tmp_path / "bom.jsonl"), "data")[0].prompt == "Q?"
    assert read_dataset(str(tmp_path / "bom.csv"), "data")[0].prompt == "Q?"


def test_multi_turn_without_a_chat_template_is_refused(tiny_tokenizer):
    import copy

    from preftune.errors import ConfigError
    from preftune.tokenization import tokenize_pairs

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = None
    pair = PreferencePair(prompt="c", chosen="x", rejected="y", where="f.jsonl:3",
                          messages=[user("a"), assistant("b"), user("c")])
    with pytest.raises(ConfigError, match=r"f.jsonl:3: a multi-turn conversation needs a chat template"):
        tokenize_pairs(tok, [pair], 64, None)


def test_dataset_info_hf_hub_url_with_split(tmp_path):
    (tmp_path / "hub" / "data").mkdir(parents=True)
    write_jsonl(tmp_path / "hub" / "data" / "test.jsonl",
                [{"instruction": "Q", "input": "", "chosen": "good", "rejected": "bad"}])
    write_jsonl(tmp_path / "hub" / "data" / "train.jsonl",
                [{"instruction": "T", "input": "", "chosen": "good", "rejected": "bad"}])
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "hub": {"hf_hub_url": str(tmp_path / "hub"), "split": "test", "ranking": True}}))
    (pair,) = read_dataset("hub", str(tmp_path))
    assert (pair.prompt, pair.chosen, pair.where) == ("Q", "good", f"{tmp_path / 'hub'}[test] record 0")


def test_train_refuses_unpaired_data_in_one_line(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "kto.jsonl").write_text(json.dumps({"prompt": "x", "completion": "y", "label": True}) + "\n")
    assert main(["train", "--model_name_or_path", str(tiny_model_dir), "--dataset", str(tmp_path / "kto.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unpaired (KTO-style" in err[0] and "needs pref_loss: kto" in err[0]


def test_train_runs_on_multi_turn_sharegpt_parquet_with_columns_and_shuffle(tmp_path, tiny_model_dir, capsys):
    """The new formats reach the loop: a sharegpt dataset_info entry plus a Parquet file of
    conversational pairs with odd field names, shuffled, trained for two steps."""
    import pandas as pd

    from preftune.demo import make_pairs

    demo = make_pairs(24, 0)
    sg = [{"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi, ask away."},
                             {"from": "human", "value": p["prompt"]}],
           "chosen": {"from": "gpt", "value": p["chosen"]}, "rejected": {"from": "gpt", "value": p["rejected"]}}
          for p in demo[:12]]
    (tmp_path / "sg.json").write_text(json.dumps(sg))
    (tmp_path / "dataset_info.json").write_text(json.dumps(
        {"sg": {"file_name": "sg.json", "formatting": "sharegpt", "ranking": True}}))
    pd.DataFrame([{"q": p["prompt"], "good": p["chosen"], "bad": p["rejected"]} for p in demo[12:]]).to_parquet(
        tmp_path / "p.parquet")
    args = ["train", "--model_name_or_path", str(tiny_model_dir), "--dataset", f"sg,{tmp_path / 'p.parquet'}",
            "--dataset_dir", str(tmp_path), "--columns", "{prompt: q, chosen: good, rejected: bad}",
            "--shuffle", "true", "--max_steps", "2", "--val_size", "4", "--progress_bar", "false",
            "--output_dir", str(tmp_path / "out")]
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "dpo_metrics" / "summary.json").read_text())
    assert summary["data"]["train"] == 20 and summary["data"]["eval"] == 4
    assert summary["config"]["columns"] == {"prompt": "q", "chosen": "good", "rejected": "bad"}
