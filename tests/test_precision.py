"""Mixed precision on a bfloat16 checkpoint: the weights being trained are held in float32 (the
optimizer's small updates are kept), frozen weights and the reference stay bfloat16, the final
model comes back bfloat16 while checkpoints keep the float32 master weights (exact resume);
pure_bf16 trains bfloat16 weights on request. Also flash_attn -> attn_implementation.

The models are tiny (hidden 32, 2 layers) and runs 3 steps long: bf16 autocast is slow on CPUs."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from preftune import checkpoints, engines, final, runtime
from preftune import train as train_mod
from preftune.adapters import AdapterReference
from preftune.config import from_dict
from preftune.demo import build_model, make_pairs
from preftune.errors import ConfigError, ModelError
from preftune.models import load_tokenizer
from preftune.reference import load_models

TIMING = {"tokens_per_second"}


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, tiny_tokenizer):
    """A checkpoint stored in bfloat16, as most released models are."""
    folder = tmp_path_factory.mktemp("bf16_model")
    build_model(len(tiny_tokenizer), seed=0, hidden=32, layers=2).to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("precision_data") / "train.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(24, 0)))
    return path


def run_raw(model_dir, data, out, **over):
    """3 steps of 8 pairs at DPO's usual learning rate under bf16 mixed precision (torch_dtype: auto,
    the default, loads the checkpoint's bfloat16); a checkpoint at step 2."""
    return {"model_name_or_path": str(model_dir), "dataset": str(data), "output_dir": str(out), "bf16": True,
            "learning_rate": 5e-6, "max_steps": 3, "per_device_train_batch_size": 8, "logging_steps": 1,
            "save_steps": 2, "cutoff_len": 64, "progress_bar": False, "plot_loss": False, **over}


def train_capturing(raw):
    """Train; return the summary and the policy's parameters as training left them (before the final
    save casts anything back): the weights the optimizer actually updated."""
    captured = {}
    real_save_final = final.save_final

    def capture(model, tokenizer, cfg, *rest):
        captured.update({name: p.detach().clone() for name, p in model.named_parameters()})
        real_save_final(model, tokenizer, cfg, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(final, "save_final", capture)
        summary = train_mod.train(from_dict(raw))
    return summary, captured


def changed_share(weights, start):
    """Share of the starting weights' elements that training changed (compared in float32)."""
    changed = sum(int((weights[k].float() != start[k].float()).sum()) for k in start)
    return changed / sum(start[k].numel() for k in start)


@pytest.fixture(scope="module")
def start_weights(bf16_model_dir):
    return load_file(bf16_model_dir / "model.safetensors")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory, bf16_model_dir, data_file):
    out = tmp_path_factory.mktemp("bf16_run") / "out"
    summary, master = train_capturing(run_raw(bf16_model_dir, data_file, out))
    return out, summary, master


def test_bf16_run_updates_float32_master_weights(bf16_run, start_weights):
    _, summary, master = bf16_run
    assert {w.dtype for w in master.values()} == {torch.float32}
    assert start_weights.keys() <= master.keys()
    # each AdamW step moves every weight with a gradient by about the learning rate; held in
    # bfloat16 most of those moves round away (on this model ~10% of the elements would change)
    assert changed_share(master, start_weights) > 0.99
    assert summary["precision"] == {"policy_trainable": "float32", "policy_frozen": "none",
                                    "compute": "bf16 autocast", "reference": "bfloat16"}


def test_final_model_is_saved_in_the_dtype_it_was_loaded_in(bf16_run, bf16_model_dir):
    out, _, master = bf16_run
    saved = load_file(out / "model.safetensors")
    assert {w.dtype for w in saved.values()} == {torch.bfloat16}
    assert all(torch.equal(saved[k], master[k].to(torch.bfloat16)) for k in saved)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    size, start_size = (out / "model.safetensors").stat().st_size, (bf16_model_dir / "model.safetensors").stat().st_size
    assert size < 1.05 * start_size  # not doubled to float32
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_checkpoints_keep_the_float32_master_weights(bf16_run):
    out, _, _ = bf16_run
    weights = load_file(out / "checkpoint-2" / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_resume_continues_the_master_weights_exactly(tmp_path, bf16_model_dir, data_file, bf16_run, monkeypatch):
    class Killed(Exception):
        pass

    real_save = checkpoints.save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        raise Killed  # the first checkpoint is step 2's

    raw = run_raw(bf16_model_dir, data_file, tmp_path / "out")
    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_mod.train(from_dict(raw))
    monkeypatch.undo()
    summary, master = train_capturing({**raw, "resume_from_checkpoint": True})
    reference_out, _, reference_master = bf16_run
    assert summary["resumed_from"]["step"] == 2
    assert master.keys() == reference_master.keys()
    assert all(torch.equal(master[k], reference_master[k]) for k in master)  # bitwise, not merely close
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    history = json.loads((tmp_path / "out" / "dpo_metrics" / "log_history.json").read_text())
    reference_history = json.loads((reference_out / "dpo_metrics" / "log_history.json").read_text())
    assert strip(history) == strip(reference_history)


def test_bf16_run_on_cpu_multiplies_the_lm_head_in_float32_backward_included(tmp_path, bf16_model_dir, data_file):
    """On CPU the LM head is multiplied in float32 under autocast (logps._logits), and the loop runs
    backward outside autocast, so the head's backward GEMMs stay float32 too: inside autocast they were
    recast to bfloat16, which CPUs without native bf16 GEMMs run ~50x slower (benchmarks/RESULTS.md)."""
    head = tuple(AutoModelForCausalLM.from_pretrained(bf16_model_dir).get_output_embeddings().weight.shape)  # (V, H)
    head_matmuls = []  # (dtype, in backward) of every matmul with the head's weight, or its transpose, as an operand

    class RecordHeadMatmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
                shapes = {tuple(a.shape) for a in args if isinstance(a, torch.Tensor)}
                if head in shapes or head[::-1] in shapes:
                    head_matmuls.append((args[-1].dtype, torch._C._current_autograd_node() is not None))
            return func(*args, **(kwargs or {}))

    with RecordHeadMatmuls():
        train_mod.train(from_dict(run_raw(bf16_model_dir, data_file, tmp_path / "out", max_steps=1, save_steps=None)))
    assert any(backward for _, backward in head_matmuls)
    assert {dtype for dtype, _ in head_matmuls} == {torch.float32}


def test_pure_bf16_trains_bfloat16_weights(tmp_path, bf16_model_dir, data_file, start_weights):
    summary, weights = train_capturing(run_raw(bf16_model_dir, data_file, tmp_path / "out", pure_bf16=True,
                                               save_steps=None))
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    assert summary["precision"]["policy_trainable"] == "bfloat16"
    assert changed_share(weights, start_weights) < 0.5  # what pure_bf16 costs: most small updates are lost
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert {w.dtype for w in saved.values()} == {torch.bfloat16}


def dtypes(params):
    return {p.dtype for p in params}


@pytest.mark.parametrize("finetuning_type", ["freeze", "lora"])
def test_only_the_trained_weights_are_float32(bf16_model_dir, finetuning_type):
    cfg = from_dict({"model_name_or_path": str(bf16_model_dir), "bf16": True, "finetuning_type": finetuning_type,
                     "freeze_trainable_layers": 1})
    policy, reference = load_models(cfg)
    assert dtypes(p for p in policy.parameters() if p.requires_grad) == {torch.float32}
    assert dtypes(p for p in policy.parameters() if not p.requires_grad) == {torch.bfloat16}  # the memory saving
    if finetuning_type == "freeze":
        assert dtypes(reference.model.parameters()) == {torch.bfloat16}
    else:
        assert isinstance(reference.model, AdapterReference)


def test_pure_bf16_lora_adapter_is_bfloat16(bf16_model_dir):
    cfg = from_dict({"model_name_or_path": str(bf16_model_dir), "bf16": True, "pure_bf16": True,
                     "finetuning_type": "lora"})
    policy, _ = load_models(cfg)
    assert dtypes(policy.parameters()) == {torch.bfloat16}  # peft would make a new adapter float32


@pytest.mark.parametrize("over", [{"finetuning_type": "freeze"},
                                  {"finetuning_type": "lora", "additional_target": "norm"}],
                         ids=["freeze", "lora-merged"])
def test_freeze_and_merged_lora_outputs_come_back_bfloat16(tmp_path, bf16_model_dir, over):
    cfg = from_dict({"model_name_or_path": str(bf16_model_dir), "bf16": True, "output_dir": str(tmp_path), **over})
    policy, _ = load_models(cfg)
    upcast = [p for p in policy.parameters() if p.requires_grad and p.dtype == torch.float32]
    assert upcast  # the trained layers, or LoRA's fully trained norm copies
    final.save_final(policy, load_tokenizer(str(bf16_model_dir)), cfg)
    assert dtypes(load_file(tmp_path / "model.safetensors").values()) == {torch.bfloat16}


def test_freeze_run_trains_first_layer_in_float32_beside_bfloat16(tmp_path, bf16_model_dir, data_file):
    """The first layer trainable: its float32 output feeds a frozen bfloat16 layer, which autocast bridges."""
    summary, master = train_capturing(run_raw(bf16_model_dir, data_file, tmp_path / "out", max_steps=2,
                                              save_steps=None, finetuning_type="freeze",
                                              freeze_trainable_layers=-1))
    assert {master[k].dtype for k in master if ".layers.0." in k} == {torch.float32}
    assert {master[k].dtype for k in master if ".layers.1." in k} == {torch.bfloat16}
    assert summary["precision"]["policy_frozen"] == "bfloat16"
    assert dtypes(load_file(tmp_path / "out" / "model.safetensors").values()) == {torch.bfloat16}


def test_full_run_without_mixed_precision_trains_float32(bf16_model_dir):
    cfg = from_dict({"model_name_or_path": str(bf16_model_dir)})
    policy, reference = load_models(cfg)
    assert dtypes(policy.parameters()) == {torch.float32}
    assert dtypes(reference.model.parameters()) == {torch.bfloat16}


def test_freeze_without_mixed_precision_is_one_line(bf16_model_dir):
    cfg = from_dict({"model_name_or_path": str(bf16_model_dir), "finetuning_type": "freeze"})
    with pytest.raises(ModelError, match="needs mixed precision; set bf16: true") as err:
        load_models(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_bf16_on_a_cpu_without_fast_bf16_matmul_is_said_once(monkeypatch, caplog, fast_bf16):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engines, "cpu_multiplies_bf16", lambda: fast_bf16)
    with caplog.at_level(logging.WARNING, logger="preftune"):
        engines.check_hardware(from_dict({"bf16": True}))
        engines.check_hardware(from_dict({}))
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ([] if fast_bf16 else
                        ["bf16: this CPU has no fast bfloat16 matmul (it needs AVX-512 or AVX-NE-CONVERT), so bf16 "
                         "autocast trains several times slower than float32 here; bf16: false is faster "
                         "(docs/precision.md)"])


def test_fast_bf16_matmul_is_off_where_onednn_is_capped_at_avx2():
    """ONEDNN_MAX_CPU_ISA=AVX2 hides oneDNN's bf16 kernels, as a CPU with AVX2 only has none (oneDNN reads it
    once, when it first runs: hence a fresh process)."""
    code = "from preftune.engines import cpu_multiplies_bf16; print(cpu_multiplies_bf16())"
    path = os.pathsep.join(filter(None, [str(Path(runtime.__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    capped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": path})
    assert capped.stdout.split()[-1:] == ["False"]


@pytest.mark.parametrize("raw,message", [
    ({"pure_bf16": True}, "pure_bf16: true needs bf16: true"),
    ({"pure_bf16": True, "fp16": True}, "pure_bf16: true needs bf16: true"),
    ({"pure_bf16": True, "bf16": True, "torch_dtype": "float32"}, "torch_dtype: float32 loads them otherwise"),
    ({"pure_bf16": True, "bf16": True, "finetuning_type": "lora", "quantization_bit": 4}, "not with quantization_bit"),
    ({"flash_attn": "fa3"}, "flash_attn: unknown value 'fa3'; use auto, disabled, sdpa or fa2"),
    ({"flash_attn": "sdpa", "attn_implementation": "eager"}, "flash_attn: sdpa means attn_implementation sdpa, but"),
])
def test_precision_keys_give_one_clear_line(raw, message):
    with pytest.raises(ConfigError, match=message) as err:
        from_dict(raw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("raw,expected", [
    ({}, None), ({"flash_attn": "disabled"}, "eager"), ({"flash_attn": "sdpa"}, "sdpa"),
    ({"flash_attn": "fa2"}, "flash_attention_2"), ({"attn_implementation": "sdpa"}, "sdpa"),
    ({"flash_attn": "sdpa", "attn_implementation": "sdpa"}, "sdpa"),
])
def test_flash_attn_sets_attn_implementation(raw, expected):
    assert from_dict(raw).attention == expected


def test_flash_attn_reaches_transformers(bf16_model_dir):
    policy, _ = load_models(from_dict({"model_name_or_path": str(bf16_model_dir), "flash_attn": "disabled",
                                       "pref_loss": "simpo"}))
    assert policy.config._attn_implementation == "eager"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed")
@pytest.mark.parametrize("raw,key", [({"flash_attn": "fa2"}, "flash_attn: fa2"),
                                     ({"attn_implementation": "flash_attention_2"},
                                      "attn_implementation: flash_attention_2")])
def test_flash_attention_2_without_the_package_is_one_line(bf16_model_dir, raw, key):
    with pytest.raises(ModelError, match=f"{key} needs the flash_attn package.*pip install flash-attn \\(CUDA\\), "
                                         "or flash_attn: sdpa"):
        load_models(from_dict({"model_name_or_path": str(bf16_model_dir), **raw}))


def test_export_measures_a_flash_attention_run_with_the_default_attention(bf16_model_dir):
    """A run's config may ask for fa2; export re-reads it on a machine that may lack flash-attn."""
    from preftune.reference import load_run_reference

    reference = load_run_reference(from_dict({"model_name_or_path": str(bf16_model_dir), "flash_attn": "fa2"}))
    assert reference.config._attn_implementation != "flash_attention_2"
