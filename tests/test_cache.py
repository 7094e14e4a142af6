"""The tokenization cache and parallel tokenization: hits, misses, rebuilds, and identical output."""

import copy
import json
import logging

import pytest

from preftune import cache as cache_mod
from preftune.cache import cache_dir, cache_key, data_fingerprint, key_of, tokenize_cached
from preftune.config import from_dict
from preftune.data import PreferencePair
from preftune.demo import make_pairs
from preftune.tokenization import TokenizedExample, TokenizedPair, TokenizeReport, tokenize_pairs

LONG = PreferencePair(prompt="word " * 80 + "end?", chosen=" fine answer", rejected=" no", where="a")


@pytest.fixture
def pairs(demo_pairs):
    return [PreferencePair(**p, where=f"d.jsonl:{i}") for i, p in enumerate(demo_pairs[:40])] + [LONG]


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls that really tokenize (the cache wraps `tokenize_pairs`)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return tokenize_pairs(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "tokenize_pairs", counting)
    return calls


def cfg_for(tmp_path, **over):
    return from_dict({"tokenized_cache_dir": str(tmp_path / "cache"), "cutoff_len": 128, **over})


def test_second_run_loads_from_the_cache(tmp_path, tiny_tokenizer, pairs, counted, caplog):
    cfg = cfg_for(tmp_path)
    first_report, second_report = TokenizeReport(), TokenizeReport()
    first = tokenize_cached(copy.deepcopy(tiny_tokenizer), pairs, cfg, first_report)
    assert counted == [len(pairs)] and first_report.truncated == 1
    with caplog.at_level(logging.INFO, logger="preftune"):
        second = tokenize_cached(copy.deepcopy(tiny_tokenizer), pairs, cfg, second_report)
    assert counted == [len(pairs)]  # not tokenized again
    assert "loaded 41 tokenized pairs" in caplog.text
    assert second == first and vars(second_report) == vars(first_report)
    assert len(list(cache_dir(cfg).glob("*.safetensors"))) == 1
    tokenize_cached(copy.deepcopy(tiny_tokenizer), pairs, cfg_for(tmp_path, overwrite_cache=True), TokenizeReport())
    assert counted == [len(pairs)] * 2  # overwrite_cache rebuilds


def test_every_key_component_changes_the_key(tmp_path, tiny_tokenizer, pairs, monkeypatch):
    base = cfg_for(tmp_path)
    tok = copy.deepcopy(tiny_tokenizer)
    keys = {"base": cache_key(tok, pairs, base)}
    version = cache_mod.CACHE_VERSION
    keys["data"] = cache_key(tok, pairs[:-1] + [PreferencePair(LONG.prompt, LONG.chosen + ".", LONG.rejected)], base)
    keys["order"] = cache_key(tok, pairs[::-1], base)
    for name, value in (("cutoff_len", 127), ("template", "chatml"), ("truncation_mode", "keep_end"),
                        ("max_prompt_length", 30)):
        keys[name] = cache_key(tok, pairs, cfg_for(tmp_path, **{name: value}))
    templated = copy.deepcopy(tiny_tokenizer)
    templated.chat_template = tok.chat_template.replace("\n", "\n\n")
    keys["chat_template"] = cache_key(templated, pairs, base)
    vocab = copy.deepcopy(tiny_tokenizer)
    vocab.add_tokens(["chess"])
    keys["vocab"] = cache_key(vocab, pairs, base)
    monkeypatch.setattr(cache_mod, "CACHE_VERSION", "999")
    keys["version"] = cache_key(tok, pairs, base)
    assert len(set(keys.values())) == len(keys), keys
    # where the data came from is not part of the key: a moved file still hits
    moved = [PreferencePair(**{**vars(p), "where": "elsewhere"}) for p in pairs]
    monkeypatch.setattr(cache_mod, "CACHE_VERSION", version)
    assert cache_key(tok, moved, base) == keys["base"]


def test_the_data_fingerprint_is_the_one_checkpoints_store():
    """Checkpoints store `data_fingerprint` and a resume compares it: these values were computed by the
    function before it moved here from runtime.py, so a change to how it hashes (which would make every
    saved run refuse to resume) fails here."""
    train = [TokenizedPair([1, 2, 3], 1, [1, 2, 4, 5], 1, False), TokenizedPair([7, 8], 1, [7, 9], 1, True)]
    val = [TokenizedPair([5, 6], 1, [5, 7], 1)]
    assert data_fingerprint(train, {"validation": val, "ood": []}) == "e9c9a55a85ad54c5"
    assert data_fingerprint([TokenizedExample([1, 2, 3], 1, True), TokenizedExample([4, 5], 1, False)],
                            {"validation": []}) == "7c9a8ac9cd8d9102"
    assert data_fingerprint(train) == data_fingerprint(train, {}) == "b3db1973ff62008d"
    others = [data_fingerprint(train[::-1]), data_fingerprint([train[0]]), data_fingerprint(train, {"validation": val}),
              data_fingerprint(train, {"test": val}), data_fingerprint([TokenizedPair([1, 2, 3], 2, [1, 2, 4, 5], 1)])]
    assert len(set(others) | {"b3db1973ff62008d"}) == len(others) + 1


def test_a_cache_key_is_its_parts_in_any_order():
    assert key_of({"a": 1, "b": [2, "x"]}) == key_of({"b": [2, "x"], "a": 1})
    assert len({key_of({"a": 1}), key_of({"a": 2}), key_of({"a": "1"}), key_of({"b": 1}), key_of({})}) == 5
    assert len(key_of({})) == 32


def test_a_changed_setting_misses_the_cache(tmp_path, tiny_tokenizer, pairs, counted):
    tokenize_cached(copy.deepcopy(tiny_tokenizer), pairs, cfg_for(tmp_path), TokenizeReport())
    out = tokenize_cached(copy.deepcopy(tiny_tokenizer), pairs, cfg_for(tmp_path, truncation_mode="keep_end"),
                          TokenizeReport())
    assert len(counted) == 2
    # keep_end's result, not keep_start's: the prompt (raw text: plain strings) still ends with its question
    prompt = tiny_tokenizer.decode(out[-1].chosen_ids[:out[-1].chosen_start])
    assert prompt.endswith("word end?") and not prompt.startswith(LONG.prompt[:20])


@pytest.mark.parametrize("damage", ["cut", "flip", "garbage"])
def test_a_corrupt_cache_file_is_rebuilt_not_trusted(tmp_path, tiny_tokenizer, pairs, counted, caplog, damage):
    cfg = cfg_for(tmp_path)
    first = tokenize_cached(copy.deepcopy(tiny_tokenizer), pairs, cfg, TokenizeReport())
    (path,) = cache_dir(cfg).glob("*.safetensors")
    raw = path.read_bytes()
    if damage == "cut":
        path.write_bytes(raw[:len(raw) // 2])  # a partial write
    elif damage == "flip":
        path.write_bytes(raw[:-3] + bytes([raw[-3] ^ 0xFF]) + raw[-2:])  # a token id changed in place
    else:
        path.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="preftune"):
        again = tokenize_cached(copy.deepcopy(tiny_tokenizer), pairs, cfg, TokenizeReport())
    assert "tokenization cache: ignoring" in caplog.text
    assert len(counted) == 2 and again == first
    assert tokenize_cached(copy.deepcopy(tiny_tokenizer), pairs, cfg, TokenizeReport()) == first  # rewritten
    assert len(counted) == 2


def test_parallel_tokenization_equals_serial(tiny_tokenizer):
    pairs = [PreferencePair(**p) for p in make_pairs(600, seed=3)] + [LONG] * 3
    serial_report, parallel_report = TokenizeReport(), TokenizeReport()
    serial = tokenize_pairs(copy.deepcopy(tiny_tokenizer), pairs, 128, None, serial_report)
    parallel = tokenize_pairs(copy.deepcopy(tiny_tokenizer), pairs, 128, None, parallel_report, num_workers=2)
    assert parallel == serial and vars(parallel_report) == vars(serial_report)
    assert serial_report.truncated == 3


def test_a_run_reports_truncated_and_dropped_and_reuses_the_cache(tmp_path, tiny_model_dir, caplog):
    from preftune.train import train

    data = tmp_path / "d.jsonl"
    records = make_pairs(8, seed=0) + [{"prompt": "word " * 80, "chosen": "a b c d", "rejected": "e f g"},
                                       {"prompt": "w " * 400, "chosen": "x " * 400, "rejected": "y"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "dataset": str(data), "cutoff_len": 40,
                     "output_dir": str(tmp_path / "out"), "max_steps": 1, "progress_bar": False,
                     "eval_strategy": "no", "plot_loss": False, "tokenized_cache_dir": str(tmp_path / "cache")})
    with caplog.at_level(logging.INFO, logger="preftune"):
        summary = train(cfg)
    saved = json.loads((tmp_path / "out" / "dpo_metrics" / "summary.json").read_text())
    assert saved["data"]["truncated"] == summary["data"]["truncated"] >= 2
    assert "dropped" in saved["data"]
    assert "truncated to cutoff_len=40" in caplog.text and "tokenized 10 pairs" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="preftune"):
        train(cfg)
    assert "loaded 10 tokenized pairs" in caplog.text


@pytest.mark.parametrize("key, value, message", [
    ("truncation_mode", "keep_middle", "truncation_mode: unknown value 'keep_middle'; use keep_start or keep_end"),
    ("max_prompt_length", 0, "max_prompt_length must be at least 1"),
    ("preprocessing_num_workers", 0, "preprocessing_num_workers must be at least 1"),
])
def test_bad_truncation_and_worker_settings_are_one_line_errors(key, value, message):
    from preftune.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        from_dict({key: value})


def test_cache_command_lists_and_clears_only_its_own_files(tmp_path, capsys):
    import os
    import time

    from preftune.cli import main

    tok, ref = tmp_path / "tok", tmp_path / "ref"
    for folder in (tok, ref):
        folder.mkdir()
    (tok / "old.safetensors").write_bytes(b"x" * 2048)
    (tok / "new.safetensors").write_bytes(b"x" * 1024)
    (ref / "a.safetensors").write_bytes(b"x" * 10)
    (tok / "notes.txt").write_text("mine")  # not a cache file: never touched
    old = time.time() - 40 * 86400
    os.utime(tok / "old.safetensors", (old, old))
    dirs = ["--tokenized_cache_dir", str(tok), "--ref_logps_cache_dir", str(ref),
            "--demo_cache_dir", str(tmp_path / "demo")]  # never the user's own demo cache
    assert main(["cache", "list", *dirs]) == 0
    out = capsys.readouterr().out
    assert f"tokenized  {tok}: 2 files" in out and f"ref_logps  {ref}: 1 files" in out
    assert main(["cache", "clear", "--older_than_days", "30", *dirs]) == 0
    assert sorted(p.name for p in tok.iterdir()) == ["new.safetensors", "notes.txt"] and (ref / "a.safetensors").exists()
    assert main(["cache", "clear", *dirs]) == 0
    assert [p.name for p in tok.iterdir()] == ["notes.txt"] and not list(ref.iterdir())
    assert main(["cache", "purge"]) == 2 and "list or clear" in capsys.readouterr().err
