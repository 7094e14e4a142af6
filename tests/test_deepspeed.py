"""DeepSpeed ZeRO on CPU processes (DeepSpeed's CPU accelerator, gloo): a 2-process ZeRO-2 or ZeRO-3 run
equals a one-process run with the global batch (per-step metrics and final weights), ZeRO-3 leaves each
process half of every weight (the reference's too), a ZeRO-3 checkpoint resumes to the same weights,
LLaMA-Factory's JSON configs and accelerate's DeepSpeed configs both work, every "auto" is filled from
the run's config, and what is not supported yet is refused before any model loads."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune import train as train_mod
from preftune.config import from_dict
from preftune.errors import ConfigError
from preftune.engines.zero import check, make_plugin, zero_settings
from test_distributed import ROOT, free_port, history, raw_config, same_histories, same_weights, torchrun

EXAMPLES = ROOT / "examples" / "deepspeed"

# printed by each process after the policy is prepared: the share of its weights' elements it holds
SHARE_PROBE = """
import sys
from preftune.engines.zero import ZeRO
from preftune.cli import main

prepare = ZeRO.prepare

def probed(self, policy_logps, make_optimizer, reference):
    engine, optimizer = prepare(self, policy_logps, make_optimizer, reference)
    params = list(engine.module.parameters())
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    whole = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    print(f"SHARE {local / whole:.3f}", file=sys.stderr)
    return engine, optimizer

ZeRO.prepare = probed
sys.exit(main(sys.argv[1:]))
"""


def write_config(tmp_path, **values) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(values))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("stage,config", [(2, "ds_z2_offload_config.json"), (3, "ds_z3_config.json")])
def test_two_zero_processes_equal_one_process_with_the_global_batch(tmp_path, tiny_model_dir, stage, config):
    """ZeRO-2 with the optimizer state offloaded to CPU memory, ZeRO-3 as LLaMA-Factory's config has it."""
    torch.set_num_threads(1)
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"))))
    script = tmp_path / "probe.py"
    script.write_text(SHARE_PROBE)
    two = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"), per_device_train_batch_size=4,
                     deepspeed=str(EXAMPLES / config))
    result = torchrun(tmp_path, two, "two", script=str(script))
    shares = [float(s) for s in re.findall(r"SHARE ([0-9.]+)", result.stderr)]
    assert len(shares) == 2, result.stderr[-2000:]
    # ZeRO-3: each process holds half of every weight (padded partitions: about half); ZeRO-2: all of them
    assert all((0.45 < s < 0.6) if stage == 3 else s == 1.0 for s in shares), shares
    assert f"deepspeed: the policy under ZeRO stage {stage} over 2 processes" in result.stderr
    assert ("the reference (Qwen2ForCausalLM) partitioned over 2 processes" in result.stderr) == (stage == 3)
    assert "before `optimizer.step()`" not in result.stderr  # the schedule steps after the engine's update

    same_histories(tmp_path / "one", tmp_path / "two")
    weights_one = same_weights(tmp_path / "one", tmp_path / "two")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two")  # whole, not a partition
    assert model.model.embed_tokens.weight.shape == weights_one["model.embed_tokens.weight"].shape


@pytest.mark.slow
def test_liger_under_zero2_equals_one_process(tmp_path, tiny_model_dir):
    """Liger's fused loss reads the LM head's weight and computes its gradient in the forward: under ZeRO-2
    (weights whole on every process) DeepSpeed's gradient hooks take that gradient as any other."""
    torch.set_num_threads(1)
    over = {"enable_liger_kernel": True, "pref_ftx": 0.0, "max_steps": 3, "eval_strategy": "no"}
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"), **over)))
    result = torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"),
                                           per_device_train_batch_size=4, deepspeed=str(EXAMPLES / "ds_z2_config.json"),
                                           **over), "two")
    assert "deepspeed: the policy under ZeRO stage 2 over 2 processes" in result.stderr
    assert "Liger" in result.stderr or "liger" in result.stderr, result.stderr[-2000:]
    same_histories(tmp_path / "one", tmp_path / "two")
    same_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_sequences_split_over_two_processes_equal_one_process(tmp_path, tiny_model_dir):
    """sequence_parallel_size: 2 over 2 processes under ZeRO-3 (DeepSpeed's Ulysses attention, gloo): each
    process runs half of every row, both train on the same pairs; per-step metrics (KL and the token statistics
    included), evaluation and final weights equal a one-process run's. Rows are 61 tokens wide (cutoff_len),
    padded to 62 for the split. (ZeRO-1 and ZeRO-2, and 4 processes as 2 groups of 2, equal it too: docs/distributed.md.)"""
    torch.set_num_threads(1)
    over = {"max_steps": 2, "eval_steps": 2, "cutoff_len": 61}
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"), **over)))
    split = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "split"), sequence_parallel_size=2,
                       deepspeed=str(EXAMPLES / "ds_z3_config.json"), **over)
    result = torchrun(tmp_path, split, "split")
    assert "each sequence split over 2 processes (Ulysses): data-parallel world 1" in result.stderr
    assert "global batch 8 pairs per step = 8 per device x 1 accumulation x 2 processes / 2 per sequence" in result.stderr
    rows_one, _ = same_histories(tmp_path / "one", tmp_path / "split")
    trained = next(r for r in rows_one if "loss" in r)
    assert "kl_per_token" in trained and "logits/chosen" in trained and "eval_loss" in rows_one[-1]
    same_weights(tmp_path / "one", tmp_path / "split")


@pytest.mark.slow
def test_a_zero3_checkpoint_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    over = {"save_steps": 3, "save_total_limit": 5, "per_device_train_batch_size": 4,
            "deepspeed": str(EXAMPLES / "ds_z3_config.json"), "gradient_accumulation_steps": 2, "max_steps": 5}
    torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "whole"), **over), "whole")
    checkpoint = tmp_path / "whole" / "checkpoint-3"
    assert (checkpoint / "deepspeed").is_dir() and not (checkpoint / "optimizer.pt").exists()
    AutoModelForCausalLM.from_pretrained(checkpoint)  # the checkpoint's weights are whole too
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(checkpoint, out / "checkpoint-3")
    torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(out), resume_from_checkpoint=True,
                                  **over), "resumed")
    timing = {"tokens_per_second"}
    resumed, whole = history(out), history(tmp_path / "whole")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed if r["step"] > 3] == \
        [{k: v for k, v in r.items() if k not in timing} for r in whole if r["step"] > 3]
    weights, expected = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    with pytest.raises(ConfigError, match="written with deepspeed; resume with the setting"):
        train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(out), resume_from_checkpoint=True,
                                             **{**over, "deepspeed": None})))


@pytest.mark.slow
def test_bf16_under_zero3_follows_a_one_process_bf16_run(tmp_path, tiny_model_dir):
    """bf16: DeepSpeed's own mixed precision (bf16 weights, fp32 master copies in the optimizer) against
    preftune's (bf16 autocast over fp32 weights): the same run within bf16's rounding. Under ZeRO-3 the
    weights load already partitioned (transformers uses zero.Init): no process holds the whole model."""
    torch.set_num_threads(1)
    over = {"bf16": True, "max_steps": 3}
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"), **over)))
    result = torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"),
                                           per_device_train_batch_size=4, deepspeed=str(EXAMPLES / "ds_z3_config.json"),
                                           **over), "two")
    assert "weights held and computed in bf16, fp32 master copies in the optimizer" in result.stderr
    assert "weights loaded partitioned (zero.Init)" in result.stderr
    for row_one, row_two in zip(history(tmp_path / "one"), history(tmp_path / "two"), strict=True):
        for key in ("loss", "eval_loss", "rewards/margins"):
            if key in row_one:
                assert row_two[key] == pytest.approx(row_one[key], abs=2e-3), (row_one["step"], key)
    # ZeRO-3 loads through DeepSpeed's zero.Init, in the engine's dtype: bf16 in, bf16 out
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "two").dtype == torch.bfloat16


@pytest.mark.slow
def test_zero3_offload_with_frozen_layers_equals_one_process(tmp_path, tiny_model_dir):
    """ds_z3_offload_config.json (optimizer state and weights in CPU memory) with finetuning_type freeze
    and padding-free batches: frozen partitioned weights stay as loaded, the trained layer equals a
    one-process run."""
    torch.set_num_threads(1)
    freeze = {"finetuning_type": "freeze", "freeze_trainable_layers": 1, "max_steps": 3, "padding_free": True}
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"), **freeze)))
    result = torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"),
                                           per_device_train_batch_size=4,
                                           deepspeed=str(EXAMPLES / "ds_z3_offload_config.json"), **freeze), "two")
    assert "ZeRO stage 3 over 2 processes" in result.stderr and "optimizer and param offloaded to the CPU" \
        in result.stderr
    same_histories(tmp_path / "one", tmp_path / "two")
    weights_one = same_weights(tmp_path / "one", tmp_path / "two")
    start = load_file(tiny_model_dir / "model.safetensors")
    moved = [k for k in weights_one if not torch.equal(weights_one[k], start[k])]
    assert moved and all(".layers.1." in k for k in moved)  # only the last layer trained


@pytest.mark.slow
def test_lora_under_zero2_and_zero3_equals_one_process_and_resumes(tmp_path, tiny_model_dir):
    """LoRA (with prefix sharing): the adapter-off reference runs through the policy (partitioned under
    ZeRO-3); the adapter equals a one-process run's at ZeRO-2 and ZeRO-3, and a ZeRO-3 checkpoint resumes
    to the same adapter."""
    torch.set_num_threads(1)
    lora = {"finetuning_type": "lora", "lora_rank": 4, "save_adapter_only": True, "learning_rate": 5e-3,
            "max_steps": 5, "save_steps": 3, "save_total_limit": 5, "prefix_sharing": True}
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"), **lora)))
    for stage in (2, 3):
        two = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / f"z{stage}"), per_device_train_batch_size=4,
                         deepspeed=str(EXAMPLES / f"ds_z{stage}_config.json"), **lora)
        torchrun(tmp_path, two, f"z{stage}")
        same_histories(tmp_path / "one", tmp_path / f"z{stage}")
        same_weights(tmp_path / "one", tmp_path / f"z{stage}", "adapter_model.safetensors")
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(tmp_path / "z3" / "checkpoint-3", out / "checkpoint-3")
    torchrun(tmp_path, {**two, "output_dir": str(out), "resume_from_checkpoint": True}, "resumed")
    resumed, expected = load_file(out / "adapter_model.safetensors"), load_file(tmp_path / "z3" / "adapter_model.safetensors")
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)


@pytest.mark.slow
def test_precomputed_reference_under_zero3_equals_one_process(tmp_path, tiny_model_dir):
    """The reference pass of precompute_ref_log_probs runs through a ZeRO-3 engine of its own."""
    torch.set_num_threads(1)
    over = {"precompute_ref_log_probs": True, "max_steps": 3}
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"),
                                         ref_logps_cache_dir=str(tmp_path / "cache_one"), **over)))
    result = torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"),
                                           per_device_train_batch_size=4, deepspeed=str(EXAMPLES / "ds_z3_config.json"),
                                           ref_logps_cache_dir=str(tmp_path / "cache_two"), **over), "two")
    assert "the reference (Qwen2ForCausalLM) partitioned over 2" in result.stderr and "computed, cached" in result.stderr
    same_histories(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_the_accelerate_zero3_example_config_partitions(tmp_path, tiny_model_dir):
    """`accelerate launch --config_file examples/accelerate/zero3.yaml` (2 CPU processes): the same run as
    `deepspeed: examples/deepspeed/ds_z3_config.json` would give, from accelerate's settings."""
    raw = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "acc"), per_device_train_batch_size=4,
                     max_steps=3)
    config = tmp_path / "acc.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(ROOT / "examples/accelerate/zero3.yaml"), "--num_processes", "2", "--mixed_precision",
                             "no", "--main_process_port", str(free_port()), "-m", "preftune", "train", str(config)],
                            env=env, capture_output=True, text=True, timeout=1800)  # a guard against a hang only
    assert result.returncode == 0, result.stderr[-3000:]
    assert "deepspeed: the policy under ZeRO stage 3 over 2 processes (the accelerate config;" in result.stderr
    assert "the reference (Qwen2ForCausalLM) partitioned over 2 processes" in result.stderr
    torch.set_num_threads(1)
    train_mod.train(from_dict({**raw, "output_dir": str(tmp_path / "one"), "per_device_train_batch_size": 8}))
    assert history(tmp_path / "acc")[-1]["eval_loss"] == pytest.approx(history(tmp_path / "one")[-1]["eval_loss"],
                                                                     abs=1e-5)


def test_auto_values_are_filled_from_the_run(tmp_path):
    path = write_config(tmp_path, train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
                        gradient_clipping="auto", train_batch_size="auto", bf16={"enabled": "auto"},
                        zero_optimization={"stage": 3, "reduce_bucket_size": "auto"})
    cfg = from_dict({"deepspeed": path, "per_device_train_batch_size": 3, "gradient_accumulation_steps": 2,
                     "max_grad_norm": 0.5, "bf16": True})
    settings = zero_settings(cfg)
    assert settings["stage"] == 3 and settings["source"] == path
    ds = make_plugin(cfg, settings, world=4).deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_allow_untested_optimizer"] is True
    # LLaMA-Factory's own files load as they are
    for name in ("ds_z2_config.json", "ds_z2_offload_config.json", "ds_z3_config.json", "ds_z3_offload_config.json"):
        cfg = from_dict({"deepspeed": str(EXAMPLES / name)})
        ds = make_plugin(cfg, zero_settings(cfg), world=2).deepspeed_config
        assert ds["train_batch_size"] == cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * 2
    assert ds["zero_force_ds_cpu_optimizer"] is False  # offload: torch's AdamW steps on the CPU


def test_the_accelerate_deepspeed_settings_are_read(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "cpu")
    settings = zero_settings(from_dict({}))
    assert settings["stage"] == 3 and settings["source"] == "the accelerate config"
    assert settings["config"]["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("values,over,message", [
    ({"gradient_accumulation_steps": 4}, {"gradient_accumulation_steps": 2},
     r"deepspeed: gradient_accumulation_steps is 4 in .*ds.json but 2 in this run's config; set it to \"auto\""),
    ({"optimizer": {"type": "AdamW"}}, {}, r"has a \"optimizer\" section; preftune makes the optimizer"),
    ({"scheduler": {"type": "WarmupLR"}}, {}, r"has a \"scheduler\" section"),
    ({"zero_optimization": {"stage": 4}}, {}, r"zero_optimization.stage in .* is 4; use 0, 1, 2 or 3"),
    ({}, {"fsdp": "full_shard"}, "deepspeed and fsdp are two sharding engines; use one of them"),
])
def test_config_files_that_would_mislead_are_refused(tmp_path, values, over, message):
    cfg = from_dict({"deepspeed": write_config(tmp_path, **values), **over})
    with pytest.raises(ConfigError, match=message):
        make_plugin(cfg, zero_settings(cfg), world=2)


def test_unreadable_config_files_and_null(tmp_path):
    with pytest.raises(ConfigError, match="deepspeed: .*absent.json is not a file"):
        zero_settings(from_dict({"deepspeed": str(tmp_path / "absent.json")}))
    (tmp_path / "bad.json").write_text("{stage: 3")
    with pytest.raises(ConfigError, match="bad.json is not valid JSON"):
        zero_settings(from_dict({"deepspeed": str(tmp_path / "bad.json")}))
    for off in (None, "none", ""):  # LLaMA-Factory's `deepspeed: null`
        assert zero_settings(from_dict({"deepspeed": off})) is None


@pytest.mark.parametrize("over,stage,message", [
    ({"skip_nonfinite_steps": 2}, 2, "skip_nonfinite_steps is not available"),
    ({"quantization_bit": 4, "finetuning_type": "lora"}, 2, "quantization_bit is not combined with ZeRO yet"),
    ({"finetuning_type": "lora"}, 3, "LoRA under ZeRO-3 writes the adapter: set save_adapter_only: true"),
    ({"enable_liger_kernel": True}, 3, "enable_liger_kernel is not combined with ZeRO-3 .Liger's fused loss reads"),
    ({"generate_during_eval": 2, "val_size": 0.1}, 3, "generate_during_eval samples on the main process alone"),
])
def test_what_zero_does_not_do_yet_is_refused(tmp_path, over, stage, message):
    cfg = from_dict({"model_name_or_path": str(tmp_path / "absent"), "dataset": "x.jsonl",
                     "deepspeed": write_config(tmp_path, zero_optimization={"stage": stage}), **over})
    with pytest.raises(ConfigError, match=message):
        check(cfg, zero_settings(cfg))


@pytest.mark.parametrize("over,message", [
    ({"padding_free": True}, "sequence_parallel_size: 2: not with padding_free"),
    ({"prefix_sharing": True}, "sequence_parallel_size: 2: not with prefix_sharing"),
    ({"ld_alpha": 0.5}, "sequence_parallel_size: 2: not with ld_alpha"),
    ({"generate_during_eval": 2, "val_size": 0.1}, "sequence_parallel_size: 2: not with generate_during_eval"),
    ({"flash_attn": "disabled"}, "eager attention needs a full mask"),
    ({"pref_loss": "kto"}, "not pref_loss: kto yet"),
    ({"sequence_parallel_size": 0}, "sequence_parallel_size must be at least 1"),
])
def test_what_sequence_parallelism_cannot_do_is_refused(over, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"model_name_or_path": "m", "dataset": "x.jsonl", "sequence_parallel_size": 2, **over})


def test_sequence_parallelism_needs_deepspeed_and_a_launcher(monkeypatch):
    from preftune.engines import make_engine

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = from_dict({"model_name_or_path": "m", "dataset": "x.jsonl", "sequence_parallel_size": 2})
    with pytest.raises(ConfigError, match="needs deepspeed .a ZeRO config. and a launcher"):
        make_engine(cfg)


def test_a_run_without_deepspeed_installed_never_imports_it(tmp_path, tiny_model_dir, monkeypatch):
    """deepspeed is optional: a plain run (KL and evaluation included, which pass through the ZeRO-3
    gathering code) must not import it."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # `import deepspeed` now raises ImportError
    torch.set_num_threads(1)
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "out"), max_steps=2)))
    assert "kl_per_token" in history(tmp_path / "out")[1]
