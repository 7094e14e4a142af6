"""`preftune export`: each dtype reloads with plain transformers, shrinks, drifts little; errors are one line."""

import json
import pickle
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune import export as export_mod
from preftune.cli import main
from preftune.errors import ConfigError, ModelError
from preftune.export import export, quality


@pytest.fixture(scope="module")
def heldout(tmp_path_factory, demo_pairs):
    path = tmp_path_factory.mktemp("heldout") / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs[:16]))
    return path


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
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="no config.json.*LoRA adapter"):
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
