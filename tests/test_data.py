"""Reading pairs: formats, dataset_info.json, and a message naming file, line and field for bad input."""

import json

import pytest

from preftune.config import from_dict
from preftune.data import DataReport, check_pairs, load_pairs, read_dataset
from preftune.errors import DataError

GOOD = {"prompt": "Q?", "chosen": " yes", "rejected": " no"}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_and_json_array_and_bom(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [GOOD, {**GOOD, "system": "Be brief."}])
    (tmp_path / "b.json").write_text("\ufeff" + json.dumps([GOOD] * 3), encoding="utf-8")
    pairs = read_dataset(f"{tmp_path / 'a.jsonl'},{tmp_path / 'b.json'}", "data")
    assert len(pairs) == 5 and pairs[1].system == "Be brief." and pairs[0].where.endswith("a.jsonl:1")
    assert pairs[4].where.endswith("b.json record 2")


def test_json_lines_in_a_json_file(tmp_path):
    write_jsonl(tmp_path / "c.json", [GOOD, GOOD])
    assert len(read_dataset(str(tmp_path / "c.json"), "data")) == 2


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + '{"prompt": "x", "chosen": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON line"):
        read_dataset(str(path), "data")


@pytest.mark.parametrize("record,message", [
    ({"prompt": "x", "chosen": "a"}, r"bad.jsonl:1: missing field 'rejected' \(expected a string\); fields present: chosen, prompt"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, r"bad.jsonl:1: field 'chosen' is int, expected a string"),
    ({"prompt": None, "chosen": "a", "rejected": "b"}, r"missing field 'prompt'"),
    ([1, 2], r"bad.jsonl:1: expected a JSON object, got list"),
])
def test_missing_or_wrong_field_names_record_and_field(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_dataset(str(path), "data")


def test_non_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        read_dataset(str(path), "data")


def test_identical_pairs_fail_unless_dropped_and_are_counted_and_an_empty_completion_is_an_answer(tmp_path):
    records = [GOOD, {**GOOD, "chosen": ""}, {**GOOD, "rejected": GOOD["chosen"]}, {**GOOD, "chosen": "", "rejected": ""},
               {**GOOD, "rejected": "  "}, GOOD]
    pairs = read_dataset(str(write_jsonl(tmp_path / "d.jsonl", records)), "data")
    with pytest.raises(DataError, match=r"^2 with chosen == rejected \(first: .*d.jsonl:3, .*d.jsonl:4\)\. "
                                        r"Fix the data, or set drop_invalid_pairs: true"):
        check_pairs(pairs, drop_invalid=False, report=DataReport())
    report = DataReport()
    kept = check_pairs(pairs, drop_invalid=True, report=report)
    # an empty (or blank) completion is a valid answer, kept; both empty is chosen == rejected
    assert [p.where.rsplit(":", 1)[1] for p in kept] == ["1", "2", "5", "6"] and report.skipped_identical == 2


def test_llama_factory_dataset_info_alpaca_ranking(tmp_path):
    (tmp_path / "prefs.json").write_text(json.dumps([
        {"instruction": "解释量子纠缠", "input": "", "chosen": "量子纠缠是...", "rejected": "就是连在一起。"},
        {"instruction": "Translate", "input": "hello", "chosen": "bonjour", "rejected": "hola"},
        {"q": "Odd", "better": "b", "worse": "w"},
    ]), encoding="utf-8")
    (tmp_path / "dataset_info.json").write_text(json.dumps({
        "my_dpo_data": {"file_name": "prefs.json", "ranking": True},
        "renamed": {"file_name": "prefs.json", "ranking": True,
                    "columns": {"prompt": "q", "chosen": "better", "rejected": "worse"}},
        "sft_only": {"file_name": "prefs.json"},
    }))
    pairs = read_dataset("my_dpo_data", str(tmp_path), max_samples=2)
    assert [p.prompt for p in pairs] == ["解释量子纠缠", "Translate\nhello"]  # instruction + "\n" + input
    assert pairs[1].chosen == "bonjour"
    with pytest.raises(DataError, match="record 0: missing field 'q'"):
        read_dataset("renamed", str(tmp_path))
    with pytest.raises(DataError, match="not a preference dataset"):
        read_dataset("sft_only", str(tmp_path))
    with pytest.raises(DataError, match=r"dataset 'nope': not a name in .*dataset_info.json \(registered there: "
                                        r"my_dpo_data, renamed, sft_only\)"):
        read_dataset("nope", str(tmp_path))


def test_val_split_is_seeded_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{**GOOD, "prompt": f"Q{i}"} for i in range(20)])
    cfg = from_dict({"dataset": str(path), "val_size": 0.25, "seed": 3})
    train, val, report = load_pairs(cfg)
    again = load_pairs(cfg)
    assert (len(train), len(val), report.train, report.eval, report.read) == (15, 5, 15, 5, 20)
    assert [p.prompt for p in val] == [p.prompt for p in again[1]]
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    with pytest.raises(DataError, match="leaves no training pairs"):
        load_pairs(from_dict({"dataset": str(path), "val_size": 20}))
