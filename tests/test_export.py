"""`preftune export`: each dtype reloads with plain transformers, shrinks, drifts little; errors are one line."""

import json
import pickle
import shutil
import sys

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune import train as train_mod
from preftune.cli import main
from preftune.commands import export as export_mod
from preftune.commands.export import quality
from preftune.config import from_dict
from preftune.demo import build_model
from preftune.errors import ConfigError, DataError, ModelError


def export(model, dtype="bf16", out=None, overwrite=False, data=None, ref=None, batch_size=None, **keys):
    """`preftune export MODEL --data .. --ref .. --batch_size ..` as a library call: MODEL and the
    keys go through the one typed config, as the command line's do."""
    keys.update(model_name_or_path=model, eval_dataset=data, ref_model=ref, per_device_eval_batch_size=batch_size)
    return export_mod.export(from_dict(keys), dtype, out, overwrite)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory, demo_pairs):
    path = tmp_path_factory.mktemp("heldout") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs[:16]))
    return path


def base_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def randomize_lora(model, seed):
    """LoRA's B starts at zero (adapter = no-op); give every adapter weight a visible value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def save_adapter(model_dir, folder, seed, **lora):
    peft_model = get_peft_model(base_model(model_dir), LoraConfig(**{"r": 4, "target_modules": "all-linear", **lora}))
    randomize_lora(peft_model, seed)
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory):
    """A saved LoRA adapter on the tiny base with non-zero weights: the 'SFT model' is base + this."""
    return save_adapter(tiny_model_dir, tmp_path_factory.mktemp("sft_adapter"), seed=1)


def run_folder(folder, model, tokenizer_dir, **config):
    """A run's output_dir as training leaves it: the model (or adapter), tokenizer, preftune_config.yaml."""
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    (folder / "preftune_config.yaml").write_text(yaml.safe_dump({"torch_dtype": "float32", **config}))
    return folder


@torch.no_grad()
def logits(model):
    return model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits.float()


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "int8"])
def test_export_reloads_with_dtype_smaller_and_close(tiny_model_dir, heldout, tmp_path, monkeypatch, dtype):
    out = tmp_path / "exported"
    # one batch of 6 pairs: bf16/fp16 matmuls are slow on CPUs without native half precision
    report = export(str(tiny_model_dir), dtype, str(out), data=str(heldout), max_samples=6, batch_size=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no temporary folder left
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()
    assert json.loads((out / "export_report.json").read_text()) == report

    # plain transformers reads it back, and reading never unpickles anything
    def no_unpickling(*a, **k):
        raise AssertionError("unpickled while loading the export")
    for name in ("load", "loads"):
        monkeypatch.setattr(pickle, name, no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    model = AutoModelForCausalLM.from_pretrained(out)
    monkeypatch.undo()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if dtype == "int8":
        quantized = [m for m in linears if type(m.weight).__name__ == "Int8Tensor"]
        assert len(quantized) == len(linears) - 1  # every linear layer but the LM head
        assert type(model.get_output_embeddings().weight).__name__ != "Int8Tensor"
        w = quantized[0].weight
        assert w.qdata.dtype == torch.int8 and w.scale.shape == (w.shape[0], 1)  # one scale per output row
    else:
        want = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        assert {p.dtype for p in model.parameters()} == {want}
    assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()

    # half precision halves fp32 weights; int8 keeps fp32 embeddings here, so it lands between
    ratio = report["weight_bytes_after"] / report["weight_bytes_before"]
    assert ratio == pytest.approx(report["size_ratio"])
    assert 0.49 < ratio < 0.52 if dtype != "int8" else 0.5 < ratio < 0.8
    h = report["heldout"]
    assert h["pairs"] == 6 and h["accuracy_kind"] == "logps" and h["reference"] is None
    assert 0 < h["logps_drift_per_token"] < 0.05 and h["logps_drift_per_sequence"] < 1.0
    assert h["flipped_pairs"] <= 1


def test_int8_scales_are_per_row_absmax(tiny_model_dir, tmp_path):
    """torchao's symmetric int8: scale = max|W_row| / 127.5 (its range is [-128, 127]), q = round(W / scale)."""
    export(str(tiny_model_dir), "int8", str(tmp_path / "q"))
    w = AutoModelForCausalLM.from_pretrained(tmp_path / "q").model.layers[0].mlp.up_proj.weight
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[0].mlp.up_proj.weight.detach()
    scale = original.abs().amax(dim=1, keepdim=True) / 127.5
    torch.testing.assert_close(w.scale, scale)
    q = torch.clamp(torch.round(original / scale), -128, 127)
    # equal but for float ties (|W / scale| = 127.5 rounds either way): every weight within half a step
    assert (w.qdata.float() - q).abs().max() <= 1 and (w.qdata.float() != q).float().mean() < 0.01
    assert ((w.qdata.float() * w.scale - original).abs() <= scale * 0.5001).all()


def test_quality_definitions():
    original = torch.tensor([[-10.0, -12.0], [-8.0, -7.0]])  # (N, 2) [chosen, rejected]
    exported = torch.tensor([[-10.5, -12.0], [-8.0, -9.0]])
    lengths = torch.tensor([[5, 4], [2, 2]])
    q = quality(original, exported, lengths)
    assert q["accuracy_original"] == 0.5 and q["accuracy_exported"] == 1.0 and q["flipped_pairs"] == 1
    assert q["logps_drift_per_sequence"] == pytest.approx((0.5 + 0 + 0 + 2) / 4)
    assert q["logps_drift_per_token"] == pytest.approx((0.5 / 5 + 0 + 0 + 2 / 2) / 4)
    # with a reference, accuracy is the DPO implicit reward's: (pi - ref)(chosen) > (pi - ref)(rejected)
    q = quality(original, exported, lengths, reference=torch.tensor([[-9.0, -14.0], [-8.0, -8.0]]))
    assert q["accuracy_kind"] == "implicit_reward" and q["accuracy_original"] == 0.0
    # a model equal to its reference ties on every pair: 50%, as training's eval_rewards/accuracies counts
    # ties; moving off a tie is not a flip
    q = quality(original, exported, lengths, reference=original)
    assert q["accuracy_original"] == 0.5 and q["accuracy_exported"] == 0.5 and q["flipped_pairs"] == 0


def test_run_folder_gives_its_heldout_split_and_reference(tiny_model_dir, heldout, tmp_path):
    """A run's output folder: held-out pairs, cutoff and reference come from its preftune_config.yaml."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run)
    (run / "preftune_config.yaml").write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset: {heldout}\neval_dataset: {heldout}\ncutoff_len: 64\n")
    report = export(str(run), "bf16", max_samples=4, batch_size=4)
    assert (tmp_path / "run-bf16" / "export_report.json").is_file()  # default out: MODEL-<dtype>
    h = report["heldout"]
    assert h["pairs"] == 4 and str(heldout) in h["data"]
    assert h["accuracy_kind"] == "implicit_reward" and h["reference"] == str(tiny_model_dir)


def test_missing_torchao_is_one_clear_line(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    assert main(["export", str(tiny_model_dir), "--dtype", "int8", "--out", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "needs torchao" in err and "pip install 'preftune[export]'" in err
    assert not (tmp_path / "q").exists()


def test_bad_model_path_and_existing_out(tiny_model_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope"), "--dtype", "bf16"]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no config.json \(nor adapter_config.json\)"):
        export(str(tmp_path / "empty"))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="has no weight files"):
        export(str(tmp_path / "adapter"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        export(str(tiny_model_dir), "bf16", str(tmp_path / "taken"))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_out_is_written_to_a_temporary_folder_then_renamed(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous export")
    seen = {}

    def failing_check(model, dtype, vocab_id):
        seen["tmp_files"] = sorted(p.name for p in (tmp_path / ".out.tmp").iterdir())
        seen["out_files"] = sorted(p.name for p in out.iterdir())
        raise ModelError("simulated failure after writing")

    monkeypatch.setattr(export_mod, "check_export", failing_check)
    with pytest.raises(ModelError, match="simulated"):
        export(str(tiny_model_dir), "fp16", str(out), overwrite=True)
    assert "model.safetensors" in seen["tmp_files"] and seen["out_files"] == ["old.txt"]
    # a failed export leaves the previous one untouched and no temporary folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "old.txt").is_file()
    monkeypatch.undo()
    export(str(tiny_model_dir), "fp16", str(out), overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- a kto run: its held-out split is unpaired ----------------------------------------------

def test_kto_run_measures_its_pairs_or_asks_for_them(tiny_model_dir, demo_pairs, heldout, tmp_path):
    unpaired = [{"prompt": p["prompt"], "completion": p["chosen"], "label": i % 2 == 0} for i, p in
                enumerate(demo_pairs[:8])]
    (tmp_path / "kto.jsonl").write_text("".join(json.dumps(e) + "\n" for e in unpaired))
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run)
    config = {"model_name_or_path": str(tiny_model_dir), "pref_loss": "kto", "dataset": str(tmp_path / "kto.jsonl"),
              "cutoff_len": 64}
    (run / "preftune_config.yaml").write_text(yaml.safe_dump({**config, "val_size": 4}))
    with pytest.raises(DataError, match=r"^the held-out split of the run in .*run holds unpaired .* --data PAIRS$"):
        export(str(run), "bf16", str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kto.jsonl", "run"]  # failed before writing anything
    with pytest.raises(DataError, match=r"^--data '.*kto.jsonl' holds unpaired .* pass --data PAIRS$"):
        export(str(run), "bf16", str(tmp_path / "out"), data=str(tmp_path / "kto.jsonl"))

    # pairs beside the unpaired examples (kto reads both): the pairs are measured, the others counted
    both = f"{tmp_path / 'kto.jsonl'},{heldout}"
    (run / "preftune_config.yaml").write_text(yaml.safe_dump({**config, "eval_dataset": both}))
    h = export(str(run), "bf16", str(tmp_path / "out"), max_samples=4, batch_size=4)["heldout"]
    assert h["pairs"] == 4 and "(8 unpaired examples skipped)" in h["data"]
    assert h["reference"] == str(tiny_model_dir)


# --- the reference is the run's own -----------------------------------------------------------

@pytest.mark.parametrize("kind", ["lora_from_sft_adapter", "ref_model_with_adapters"])
def test_reference_is_the_one_the_run_trained_against(kind, tiny_model_dir, tiny_tokenizer, sft_adapter, heldout,
                                                      tmp_path):
    """A run whose training did not move the policy equals its reference: every pair ties, 50% (the
    run's own eval_rewards/accuracies at step 0)."""
    if kind == "lora_from_sft_adapter":  # starts from base + SFT adapter: its reference is that, not the base
        start = tiny_model_dir
        config = {"model_name_or_path": str(tiny_model_dir), "finetuning_type": "lora",
                  "adapter_name_or_path": str(sft_adapter)}
    else:  # ref_model + ref_model_adapters: that checkpoint with the adapter merged in
        start = tmp_path / "other"
        build_model(len(tiny_tokenizer), seed=7, hidden=32, layers=2).save_pretrained(start)
        config = {"model_name_or_path": str(tiny_model_dir), "ref_model": str(start),
                  "ref_model_adapters": str(sft_adapter)}
    unmoved = PeftModel.from_pretrained(base_model(start), sft_adapter).merge_and_unload()
    run = run_folder(tmp_path / "run", unmoved, tiny_model_dir, dataset=str(heldout), eval_dataset=str(heldout),
                     cutoff_len=64, **config)
    h = export(str(run), "bf16", max_samples=8, batch_size=8)["heldout"]
    assert h["reference"] == f"{start} + {sft_adapter}" and h["accuracy_kind"] == "implicit_reward"
    assert h["accuracy_original"] == 0.5
    if kind == "lora_from_sft_adapter":  # --ref an adapter folder: merged into its base the same way
        h = export(str(run), "bf16", str(tmp_path / "vs-adapter"), ref=str(sft_adapter), max_samples=8,
                   batch_size=8)["heldout"]
        assert h["reference"] == str(sft_adapter) and h["accuracy_original"] == 0.5


# --- --out never replaces what export reads ---------------------------------------------------

def test_out_that_is_or_holds_model_or_is_a_file_is_refused(tiny_model_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    shutil.copytree(tiny_model_dir, runs / "a")
    (runs / "notes.txt").write_text("keep")
    before = sorted(p.name for p in (runs / "a").iterdir())
    for out, verb in ((runs, "contains"), (runs / "a", "is"), (tmp_path, "contains")):
        with pytest.raises(ConfigError, match=f"^--out '{out}' {verb} MODEL '{runs / 'a'}', and export replaces "
                                              "--out as a whole; choose a folder outside it$"):
            export(str(runs / "a"), "bf16", str(out), overwrite=True)
    assert sorted(p.name for p in (runs / "a").iterdir()) == before and (runs / "notes.txt").read_text() == "keep"
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        assert main(["export", str(runs / "a"), "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"'{tmp_path / 'afile'}' is a file, not a folder" in err
    assert (tmp_path / "afile").read_text() == "x"


# --- a LoRA adapter as MODEL ------------------------------------------------------------------

def test_adapter_only_lora_run_is_merged_then_exported(tiny_model_dir, sft_adapter, heldout, tmp_path):
    """save_adapter_only: true (as QLoRA's output always is): MODEL is an adapter, merged into its base in
    float32 first; the export is a plain model, and the report measures against the run's reference."""
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "torch_dtype": "float32", "finetuning_type": "lora",
                     "adapter_name_or_path": str(sft_adapter), "save_adapter_only": True, "dataset": str(heldout),
                     "eval_dataset": str(heldout), "output_dir": str(tmp_path / "run"), "cutoff_len": 64,
                     "learning_rate": 1e-2, "max_steps": 1, "max_samples": 8, "progress_bar": False,
                     "plot_loss": False})
    final = train_mod.train(cfg)["final"]
    run = tmp_path / "run"
    assert (run / "adapter_config.json").is_file() and not (run / "config.json").exists()

    report = export(str(run), "bf16", batch_size=8)
    out = tmp_path / "run-bf16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run-bf16"]  # the merged float32 folder is gone
    model = AutoModelForCausalLM.from_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    merged = PeftModel.from_pretrained(base_model(tiny_model_dir), run).merge_and_unload()
    torch.testing.assert_close(logits(model), logits(merged), atol=0.05, rtol=0.05)
    assert report["merged"] == {"base": str(tiny_model_dir), "adapters": [str(run)], "dtype": "float32"}
    # "before" is the merged float32 model: the size of the base's own float32 weights
    assert report["weight_bytes_before"] == (tiny_model_dir / "model.safetensors").stat().st_size
    h = report["heldout"]
    assert h["reference"] == f"{tiny_model_dir} + {sft_adapter}"
    assert h["pairs"] == 8 and h["accuracy_original"] == pytest.approx(final["eval_rewards/accuracies"])


def test_adapter_after_several_starting_adapters_has_the_earlier_merged_first(tiny_model_dir, sft_adapter, heldout,
                                                                            tmp_path):
    """adapter_name_or_path sft,second: the run trains `second` on base + sft, so its adapter applies there."""
    second = save_adapter(tiny_model_dir, tmp_path / "second", seed=2, r=2, target_modules=["q_proj", "v_proj"])
    trained = PeftModel.from_pretrained(base_model(tiny_model_dir), second)  # the run left `second` as it was
    run = run_folder(tmp_path / "run", trained, tiny_model_dir, model_name_or_path=str(tiny_model_dir),
                     finetuning_type="lora", adapter_name_or_path=f"{sft_adapter},{second}", dataset=str(heldout),
                     eval_dataset=str(heldout), cutoff_len=64)
    report = export(str(run), "fp16", str(tmp_path / "out"), max_samples=8, batch_size=8)
    assert report["merged"]["adapters"] == [str(sft_adapter), str(run)]
    expected = PeftModel.from_pretrained(
        PeftModel.from_pretrained(base_model(tiny_model_dir), sft_adapter).merge_and_unload(), second)
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out")), logits(expected),
                               atol=0.02, rtol=0.02)
    assert report["heldout"]["accuracy_original"] == 0.5  # equal to its reference, base + sft + second


def test_ref_on_another_vocabulary_is_one_clear_error(tiny_model_dir, tiny_tokenizer, heldout, tmp_path):
    other = tmp_path / "small_vocab"
    build_model(len(tiny_tokenizer) // 2, seed=3, hidden=32, layers=1).save_pretrained(other)
    with pytest.raises(ModelError, match=r"^--ref: its vocabulary has \d+ tokens but the policy's tokenizer"):
        export(str(tiny_model_dir), "bf16", str(tmp_path / "out"), data=str(heldout), ref=str(other))
    assert not (tmp_path / "out").exists()
