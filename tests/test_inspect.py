"""`preftune inspect`: counts, lengths, cutoff, duplicates, bias and rendered examples."""

import json

from preftune.cli import main
from preftune.commands.inspect import BOUNDARY
from preftune.commands.inspect import inspect_data as inspect_config
from preftune.config import from_dict


def inspect_data(data, model=None, **keys):
    """`preftune inspect DATA --model M --key value` as a library call: through the one typed config."""
    return inspect_config(from_dict({"dataset": data, "model_name_or_path": model, **keys}))

CONV = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4"}, {"role": "user", "content": "times 3?"}],
        "chosen": [{"role": "assistant", "content": "twelve"}], "rejected": [{"role": "assistant", "content": "7"}]}
PAIR = {"prompt": "How should I learn chess?", "chosen": "Start with the basics.", "rejected": "Whatever, really."}


def write(tmp_path):
    records = [PAIR, CONV, PAIR, {"prompt": "Q", "chosen": "same", "rejected": "same"},
               {"prompt": "Q2", "chosen": "long " * 60, "rejected": "short"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "e.jsonl").write_text(json.dumps({"prompt": "x", "completion": "y", "label": True}) + "\n")
    return f"{tmp_path / 'd.jsonl'},{tmp_path / 'e.jsonl'}"


def test_statistics_in_characters_without_a_model(tmp_path):
    stats = inspect_data(write(tmp_path))
    assert (stats["records"], stats["pairs"], stats["unpaired"], stats["unit"]) == (6, 5, 1, "characters")
    assert list(stats["sources"].values()) == [5, 1]
    assert stats["duplicates"] == 1 and stats["chosen_equals_rejected"] == 1
    assert stats["empty"] == {"prompt": 0, "chosen": 0, "rejected": 0}
    # chosen longer in pairs 1, 2 (twelve > 7), 3 and 5; equal in 4
    assert stats["length_bias"] == {"chosen_longer": 0.8, "equal": 0.2, "rejected_longer": 0.0}
    assert stats["lengths"]["chosen"]["max"] == 300 and stats["lengths"]["prompt"]["min"] == 1
    assert f"[user] times 3?\n[assistant] {BOUNDARY}twelve" in stats["examples"][1]["chosen"]


def test_token_lengths_cutoff_and_rendered_examples_with_a_model(tmp_path, tiny_model_dir):
    stats = inspect_data(write(tmp_path), model=str(tiny_model_dir), cutoff_len=60)
    assert stats["unit"] == "tokens"
    # plain strings raw, the conversation through the tokenizer's template: said as a run says it
    assert stats["rendering"]["used"] == "raw (plain strings), chat template (tokenizer) (conversations)"
    assert "set template: qwen" in stats["rendering"]["hint"]
    assert stats["truncated"] == 2 and stats["truncated_completion"] == 1 and stats["dropped"] == 0
    ex = stats["examples"][1]["chosen"]
    assert ex.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n")
    assert ex.endswith(f"<|im_start|>user\ntimes 3?<|im_end|>\n<|im_start|>assistant\n{BOUNDARY}twelve<|im_end|>\n")
    assert stats["lengths"]["rejected"]["min"] >= 2  # completion + end-of-turn tokens
    # what the plot draws against cutoff_len: whole sequences; those over it are the truncated pairs
    sequences = stats["_sequence_lengths_raw"]
    over = [c > 60 or r > 60 for c, r in zip(sequences["prompt + chosen"], sequences["prompt + rejected"])]
    assert sum(over) == stats["truncated"] == 2
    assert all(s >= p + c for s, p, c in zip(sequences["prompt + chosen"], stats["_lengths_raw"]["prompt"],
                                             stats["_lengths_raw"]["chosen"]))


def test_inspect_command_text_json_and_plot(tmp_path, tiny_model_dir, capsys):
    data = write(tmp_path)
    assert main(["inspect", data]) == 0
    out = capsys.readouterr().out
    assert "6 records: 5 preference pairs, 1 unpaired" in out and "chosen longer in 80.0%" in out
    png = tmp_path / "len.png"
    assert main(["inspect", data, "--model", str(tiny_model_dir), "--cutoff_len", "60", "--json",
                 "--plot", str(png)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["truncated"] == 2 and png.stat().st_size > 1000
    assert not [k for k in stats if k.endswith("_raw")]  # the plot's raw lengths are not part of the JSON
    (tmp_path / "odd.jsonl").write_text(json.dumps({"q": "Q", "good": "yes!", "bad": "no"}) + "\n")
    assert main(["inspect", str(tmp_path / "odd.jsonl"), "--columns", "{prompt: q, chosen: good, rejected: bad}",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["length_bias"]["chosen_longer"] == 1.0
    assert main(["inspect", str(tmp_path / "missing.jsonl")]) == 2
    assert "preftune: error: dataset" in capsys.readouterr().err


def test_inspect_cutoff_uses_the_runs_truncation_rule_and_counts_drops(tmp_path, tiny_model_dir, capsys):
    data = write(tmp_path)
    # cutoff 2: the long pair's completion gets int(2 * c / (p + c)) = 0 tokens, so the run would drop it
    stats = inspect_data(data, model=str(tiny_model_dir), cutoff_len=2)
    assert stats["dropped"] >= 1 and stats["truncated"] + stats["dropped"] == stats["pairs"]
    assert main(["inspect", data, "--model", str(tiny_model_dir), "--cutoff_len", "12", "--truncation_mode",
                 "keep_end", "--max_prompt_length", "4"]) == 0
    out = capsys.readouterr().out
    assert "cutoff_len 12 (keep_end):" in out and "dropped (no completion token fits)" in out
    assert "rendering: raw (plain strings), chat template (tokenizer) (conversations) (" in out  # as the run logs it
    assert "hint: the tokenizer has a chat template" in out


def test_unpaired_examples_are_measured_and_cut_as_a_run_cuts_them(tmp_path, tiny_model_dir):
    """kto data: the unpaired examples get lengths and truncation counts, the same counts the
    run's tokenization reports."""
    from transformers import AutoTokenizer

    from preftune.data import read_examples
    from preftune.tokenization import TokenizeReport, tokenize_examples

    rows = [{"prompt": f"Question {i}?", "completion": "word " * (5 + 10 * i), "label": i % 2 == 0} for i in range(6)]
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = inspect_data(str(tmp_path / "kto.jsonl"), model=str(tiny_model_dir), cutoff_len=30)
    report = TokenizeReport()
    tokenize_examples(AutoTokenizer.from_pretrained(tiny_model_dir), read_examples(str(tmp_path / "kto.jsonl"), "."),
                      30, None, report)
    assert stats["unpaired"] == 6 and stats["unpaired_truncated"] == report.truncated > 0
    assert stats["unpaired_dropped"] == report.dropped
    assert stats["lengths"]["unpaired completion"]["max"] > 30 > stats["lengths"]["unpaired completion"]["min"]
    stats = inspect_data(str(tmp_path / "kto.jsonl"))
    assert stats["lengths"]["unpaired completion"]["max"] == len("word " * 55)
