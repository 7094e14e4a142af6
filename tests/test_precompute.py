"""precompute_ref_log_probs: same numbers as the live reference, no reference in memory while
training, a disk cache that is hit, missed and rebuilt when it should be."""

import gc
import json
import weakref

import pytest
import torch
from accelerate import Accelerator
from stand_ins import bind

from preftune import cache as cache_mod
from preftune import models
from preftune import reference as reference_mod
from preftune import step as step_mod
from preftune import train as train_mod
from preftune.config import from_dict
from preftune.data import PreferencePair
from preftune.demo import build_model, make_pairs
from preftune.engines import OneProcess
from preftune.errors import ConfigError, ModelError
from preftune.tokenization import tokenize_pairs

COMPARED = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected", "nll_loss", "grad_norm", "eval_loss", "eval_rewards/chosen", "eval_rewards/rejected",
            "eval_rewards/accuracies", "eval_rewards/margins"]


def config(tmp_path, model_dir, **over):
    data = tmp_path / "data"
    if not data.exists():
        data.mkdir(parents=True)
        for name, pairs in (("train", make_pairs(48, 0)), ("val", make_pairs(16, 1))):
            (data / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    raw = {"model_name_or_path": str(model_dir), "dataset": str(data / "train.jsonl"),
           "eval_dataset": str(data / "val.jsonl"), "output_dir": str(tmp_path / "out"), "learning_rate": 5e-3,
           "per_device_train_batch_size": 8, "max_steps": 4, "logging_steps": 1, "eval_steps": 2,
           "cutoff_len": 128, "torch_dtype": "float32", "progress_bar": False, "plot_loss": False,
           "ref_logps_cache_dir": str(tmp_path / "cache")}
    return from_dict({**raw, **over})


@pytest.fixture
def counted(monkeypatch):
    """Counts reference forwards of the precompute pass (the pair scorer's) and keeps a weak reference to
    every model loaded."""
    seen = {"forwards": 0, "loaded": []}
    real_pair_logps, real_load = reference_mod.pair_logps, models.load_model

    def counting_pair_logps(scorer, *args, **kwargs):
        def counting_scorer(*inputs, **options):
            seen["forwards"] += 1
            return scorer(*inputs, **options)

        return real_pair_logps(counting_scorer, *args, **kwargs)

    def recording_load(*args, **kwargs):
        model = real_load(*args, **kwargs)
        seen["loaded"].append(weakref.ref(model))
        return model

    monkeypatch.setattr(reference_mod, "pair_logps", counting_pair_logps)
    monkeypatch.setattr(models, "load_model", recording_load)
    return seen


def test_precomputed_training_matches_the_live_reference(tmp_path, tiny_model_dir, counted):
    live = train_mod.train(config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "live")))
    assert counted["forwards"] == 0 and len(counted["loaded"]) == 2
    pre = train_mod.train(config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "pre"),
                                 precompute_ref_log_probs=True))
    assert counted["forwards"] == 6 + 2  # 48 train pairs / 8, 16 validation pairs / 8
    rows_live = json.loads((tmp_path / "live/dpo_metrics/log_history.json").read_text())
    rows_pre = json.loads((tmp_path / "pre/dpo_metrics/log_history.json").read_text())
    assert [r["step"] for r in rows_pre] == [r["step"] for r in rows_live] == [0, 1, 2, 2, 3, 4, 4]
    for row_live, row_pre in zip(rows_live, rows_pre):
        for key in COMPARED:
            if key in row_live:
                assert row_pre[key] == pytest.approx(row_live[key], rel=1e-4, abs=1e-5), (row_live["step"], key)
        assert not any("kl_per" in key for key in row_pre)  # no reference distribution: no KL column
    assert rows_live[-1]["eval_loss"] < rows_live[0]["eval_loss"]  # it trained: the comparison is not of constants
    assert pre["final"]["eval_loss"] == pytest.approx(live["final"]["eval_loss"], rel=1e-4)


def test_training_holds_no_reference_model(tmp_path, tiny_model_dir, counted, monkeypatch):
    real_step, calls = step_mod.PreferenceStep.__call__, []

    def checking_step(self, policy, reference, batch, *args, **kwargs):
        gc.collect()
        reference_model = counted["loaded"][0]()  # the precompute pass loads the reference first
        calls.append((reference.model, reference_model, reference.logps(batch).logps))
        return real_step(self, policy, reference, batch, *args, **kwargs)

    monkeypatch.setattr(step_mod.PreferenceStep, "__call__", checking_step)
    train_mod.train(config(tmp_path, tiny_model_dir, precompute_ref_log_probs=True))
    assert len(counted["loaded"]) == 2 and len(calls) == 4 + 3 * 2  # 4 steps; 3 evaluations of 2 batches
    for reference, reference_model, reference_logps in calls:
        assert reference is None and reference_model is None  # freed, not merely unused
        assert reference_logps is not None and reference_logps.shape == (16,) and (reference_logps < 0).all()


def test_second_run_hits_the_cache_and_changes_miss_it(tmp_path, tiny_model_dir, counted):
    first = train_mod.train(config(tmp_path, tiny_model_dir, precompute_ref_log_probs=True, max_steps=1))
    assert counted["forwards"] == 8 and len(counted["loaded"]) == 2
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # train and validation
    second = train_mod.train(config(tmp_path, tiny_model_dir, precompute_ref_log_probs=True, max_steps=1,
                                    output_dir=str(tmp_path / "out2")))
    assert counted["forwards"] == 8 and len(counted["loaded"]) == 3  # no reference forward, only the policy loaded
    assert {k: v for k, v in second["final"].items() if k != "tokens_per_second"} == \
        {k: v for k, v in first["final"].items() if k != "tokens_per_second"}
    train_mod.train(config(tmp_path, tiny_model_dir, precompute_ref_log_probs=True, max_steps=1,
                           torch_dtype="bfloat16", output_dir=str(tmp_path / "out3")))
    assert counted["forwards"] == 16 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 4


def tokenized(tokenizer, n=8, seed=0, cutoff_len=128):
    pairs = [PreferencePair(**p) for p in make_pairs(n, seed)]
    return tokenize_pairs(tokenizer, pairs, cutoff_len, None)


def test_cache_key_changes_with_model_data_and_precision(tmp_path, tiny_tokenizer):
    model_dir, other_dir = tmp_path / "model", tmp_path / "other"
    for folder in (model_dir, other_dir):
        build_model(len(tiny_tokenizer), seed=0, hidden=32, layers=2).save_pretrained(folder)
    pairs = tokenized(tiny_tokenizer)

    def key(pairs=pairs, **over):
        return reference_mod.cache_key(config(tmp_path, model_dir, **over), pairs, "cpu")

    base = key()
    assert key() == base and key(torch_dtype="fp32") == base  # deterministic; one key per dtype, however spelled
    assert key(pairs=tokenized(tiny_tokenizer)) == base  # the same token ids, from new objects
    misses = {
        "data": key(pairs=tokenized(tiny_tokenizer, seed=1)),
        "cutoff_len": key(pairs=tokenized(tiny_tokenizer, cutoff_len=24)),
        "one pair fewer": key(pairs=pairs[:-1]),
        "torch_dtype": key(torch_dtype="bfloat16"),
        "mixed precision": key(bf16=True),
        "attn_implementation": key(attn_implementation="eager"),
        "ref_model": key(ref_model=str(other_dir)),
    }
    build_model(len(tiny_tokenizer), seed=1, hidden=32, layers=2).save_pretrained(model_dir)  # new weights, same folder
    misses["re-saved weights"] = key()
    assert len(set(misses.values()) | {base}) == len(misses) + 1, misses


def test_hub_id_is_keyed_by_its_commit(monkeypatch):
    import huggingface_hub

    def snapshot_download(*args, **kwargs):  # bound to huggingface_hub's signature (tests/stand_ins.py)
        name = bind("huggingface_hub", "snapshot_download", *args, **kwargs)["repo_id"]
        return f"/cache/models--org--m/snapshots/{'a' * 40 if name == 'org/m' else 'b' * 40}"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert cache_mod.model_fingerprint("org/m") == "hub:org/m@" + "a" * 40
    assert cache_mod.model_fingerprint("org/m") != cache_mod.model_fingerprint("org/other")

    def offline(*args, **kwargs):
        bind("huggingface_hub", "snapshot_download", *args, **kwargs)
        raise OSError("We have no connection or you passed local_files_only")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelError, match="cannot find the commit of 'org/m'"):
        cache_mod.model_fingerprint("org/m")


def test_corrupt_or_foreign_cache_file_is_rebuilt(tmp_path, tiny_model_dir, tiny_tokenizer, counted, caplog):
    cfg = config(tmp_path, tiny_model_dir)
    engine = OneProcess(cfg, Accelerator(cpu=True))

    def run():
        pairs = tokenized(tiny_tokenizer)
        tables = reference_mod.precompute_reference_logps(cfg, {"train": pairs}, tiny_tokenizer.pad_token_id,
                                                          engine)
        return tmp_path / "cache" / f"{reference_mod.cache_key(cfg, pairs, 'cpu')}.safetensors", tables["train"]

    path, expected = run()
    assert counted["forwards"] == 1 and expected.shape == (8, 2)  # 8 pairs: one evaluation-size batch
    path.write_bytes(path.read_bytes()[:40])  # a truncated file, as a crash without the atomic rename would leave
    assert torch.equal(run()[1], expected) and counted["forwards"] == 2
    assert "unreadable" in caplog.text
    other = tmp_path / "cache" / "other.safetensors"
    cache_mod.write_ref_logps(other, "another-key", torch.zeros(8, 2))
    path.write_bytes(other.read_bytes())  # a valid file, but not the one for this key
    assert torch.equal(run()[1], expected) and counted["forwards"] == 3
    assert "does not match" in caplog.text
    assert torch.equal(run()[1], expected) and counted["forwards"] == 3  # the rebuilt file is trusted again
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def test_precompute_with_a_reference_free_loss_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="precompute_ref_log_probs: pref_loss simpo is reference-free"):
        config(tmp_path, tiny_model_dir, pref_loss="simpo", precompute_ref_log_probs=True)


def test_precompute_with_kto_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="precompute_ref_log_probs: not supported with pref_loss: kto"):
        config(tmp_path, tiny_model_dir, pref_loss="kto", precompute_ref_log_probs=True)


def test_precomputed_ld_alpha_matches_the_live_reference(tmp_path, tiny_model_dir):
    """LD-DPO weights the reference's tokens too, so the precompute pass must apply ld_alpha (and key on it)."""
    over = {"ld_alpha": 0.3, "max_steps": 2, "eval_steps": 2}
    train_mod.train(config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "live"), **over))
    train_mod.train(config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "pre"), precompute_ref_log_probs=True,
                           **over))
    rows_live = json.loads((tmp_path / "live/dpo_metrics/log_history.json").read_text())
    rows_pre = json.loads((tmp_path / "pre/dpo_metrics/log_history.json").read_text())
    for row_live, row_pre in zip(rows_live, rows_pre):
        for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/margins"):
            if key in row_live:
                assert row_pre[key] == pytest.approx(row_live[key], rel=1e-4, abs=1e-5), (row_live["step"], key)
    pairs = tokenize_pairs(models.load_tokenizer(str(tiny_model_dir)), [PreferencePair("a", "b", "c")], 32, "chatml")
    cfg = config(tmp_path, tiny_model_dir)
    assert reference_mod.cache_key(cfg, pairs, "cpu") != reference_mod.cache_key(
        config(tmp_path, tiny_model_dir, ld_alpha=0.3), pairs, "cpu")
