"""FSDP2 on CPU processes (gloo): a 2-process sharded run equals a one-process run with the global batch
(the same per-step metrics and final weights), each process holds half of every weight, the reference
is sharded too, a checkpoint of a sharded run resumes to the same weights, the saved model is whole
and loads in transformers; what is not sharded yet is refused before any model loads."""

import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from preftune import train as train_mod
from preftune.config import from_dict
from preftune.errors import ConfigError
from preftune.engines.fsdp import fsdp_settings
from test_distributed import ROOT, free_port, history, raw_config, same_histories, same_weights, torchrun

# logged by each process after sharding: the share of the policy's and the reference's elements it holds
SHARE_PROBE = """
import sys
from preftune.engines import fsdp
from preftune.cli import main

shard = fsdp.shard

def probed(model, *args, **kwargs):
    shard(model, *args, **kwargs)
    local = sum(p.to_local().numel() for p in model.parameters())
    whole = sum(p.numel() for p in model.parameters())
    print(f"SHARE {type(model).__name__} {local / whole:.3f}", file=sys.stderr)

fsdp.shard = probed
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_sharded_processes_equal_one_process_with_the_global_batch(tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    one = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"))
    train_mod.train(from_dict(one))
    script = tmp_path / "probe.py"
    script.write_text(SHARE_PROBE)
    two = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"), per_device_train_batch_size=4,
                     fsdp="full_shard")
    result = torchrun(tmp_path, two, "two", script=str(script))
    # two processes write to one stderr, so a line may hold pieces of both: find the marks, not lines
    shares = re.findall(r"SHARE \w+ ([0-9.]+)", result.stderr)
    assert len(shares) == 4 and all(0.4 < float(s) < 0.6 for s in shares), shares  # policy + reference, 2 processes

    same_histories(tmp_path / "one", tmp_path / "two")
    weights_one = same_weights(tmp_path / "one", tmp_path / "two")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two")  # whole, not a shard
    assert model.model.embed_tokens.weight.shape == weights_one["model.embed_tokens.weight"].shape


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_to_the_same_weights(tmp_path, tiny_model_dir):
    over = {"save_steps": 3, "save_total_limit": 5, "per_device_train_batch_size": 4, "fsdp": "full_shard",
            "early_stopping_patience": 10}
    torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "whole"), **over), "whole")
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", out / "checkpoint-3")
    shutil.copytree(tmp_path / "whole" / "best_model", out / "best_model")
    torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(out), resume_from_checkpoint=True,
                                  **over), "resumed")
    timing = {"tokens_per_second"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in history(out)][4:] == \
        [{k: v for k, v in r.items() if k not in timing} for r in history(tmp_path / "whole")][4:]
    weights, expected = load_file(out / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    with pytest.raises(ConfigError, match="written with fsdp; resume with the setting"):
        train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(out), resume_from_checkpoint=True,
                                             **{**over, "fsdp": ""})))


def test_fsdp_settings_from_the_key_and_from_an_accelerate_config(monkeypatch):
    assert fsdp_settings(from_dict({})) is None
    assert fsdp_settings(from_dict({"fsdp": "full_shard auto_wrap"})) == {"reshard_after_forward": True,
                                                                        "offload": False}
    assert fsdp_settings(from_dict({"fsdp": "shard_grad_op offload"})) == {"reshard_after_forward": False,
                                                                         "offload": True}
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    assert fsdp_settings(from_dict({})) == {"reshard_after_forward": True, "offload": True}
    with pytest.raises(ConfigError, match="fsdp: hybrid_shard is not a sharding mode here; use full_shard"):
        from_dict({"fsdp": "hybrid_shard"})
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP version 1; preftune shards with FSDP2"):
        fsdp_settings(from_dict({}))


@pytest.mark.parametrize("over,message", [
    ({"finetuning_type": "lora"}, "fsdp with finetuning_type lora writes the adapter: set save_adapter_only: true"),
    ({"finetuning_type": "lora", "save_adapter_only": True, "quantization_bit": 4}, "quantization_bit is not sharded yet"),
    ({"generate_during_eval": 2, "val_size": 0.1}, "generate_during_eval samples on the main process alone"),
])
def test_what_is_not_sharded_yet_is_refused(tmp_path, over, message):
    cfg = from_dict({"model_name_or_path": str(tmp_path / "absent"), "dataset": "x.jsonl", "fsdp": "full_shard",
                     **over})
    from preftune.engines.fsdp import check
    with pytest.raises(ConfigError, match=message):
        check(cfg)


@pytest.mark.slow
def test_the_accelerate_fsdp2_example_config_shards(tmp_path, tiny_model_dir):
    """`accelerate launch --config_file examples/accelerate/fsdp2.yaml` (2 CPU processes): sharded, and the
    same run as `fsdp: full_shard` under torchrun."""
    raw = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "acc"), per_device_train_batch_size=4,
                     max_steps=3)
    config = tmp_path / "acc.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                             str(ROOT / "examples/accelerate/fsdp2.yaml"), "--num_processes", "2", "--main_process_port",
                             str(free_port()), "-m", "preftune", "train", str(config)],
                            env=env, capture_output=True, text=True, timeout=1800)  # a guard against a hang only
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fsdp: the policy (Qwen2ForCausalLM) sharded over 2 processes (FSDP2: 2 Qwen2DecoderLayer units" \
        in result.stderr
    assert "fsdp: the reference (Qwen2ForCausalLM) sharded over 2" in result.stderr
    torchrun(tmp_path, {**raw, "output_dir": str(tmp_path / "key"), "fsdp": "full_shard"}, "key")
    assert history(tmp_path / "acc")[-1]["eval_loss"] == pytest.approx(history(tmp_path / "key")[-1]["eval_loss"],
                                                                     abs=1e-6)


@pytest.mark.slow
def test_precomputed_reference_under_fsdp_equals_one_process(tmp_path, tiny_model_dir):
    """The reference pass of precompute_ref_log_probs runs sharded (every process in every forward)."""
    torch.set_num_threads(1)
    over = {"precompute_ref_log_probs": True, "max_steps": 3}
    one = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"),
                     ref_logps_cache_dir=str(tmp_path / "cache_one"), **over)
    train_mod.train(from_dict(one))
    two = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"), per_device_train_batch_size=4,
                     fsdp="full_shard", ref_logps_cache_dir=str(tmp_path / "cache_two"), **over)
    result = torchrun(tmp_path, two, "two")
    assert "fsdp: the reference (Qwen2ForCausalLM) sharded" in result.stderr and "computed, cached" in result.stderr
    for row_one, row_two in zip(history(tmp_path / "one"), history(tmp_path / "two"), strict=True):
        for key in ("loss", "rewards/margins", "eval_loss", "eval_rewards/accuracies"):
            if key in row_one:
                assert row_two[key] == pytest.approx(row_one[key], abs=1e-5, rel=1e-5), (row_one["step"], key)


@pytest.mark.slow
def test_a_sharded_lora_run_equals_one_process_and_resumes(tmp_path, tiny_model_dir):
    """LoRA under FSDP2: the adapter-off reference runs through the policy's sharded root; the metrics and
    the saved adapter equal a one-process run's; a checkpoint resumes to the same adapter."""
    torch.set_num_threads(1)
    lora = {"finetuning_type": "lora", "lora_rank": 4, "save_adapter_only": True, "learning_rate": 5e-3,
            "save_steps": 3, "save_total_limit": 5}
    one = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"), **lora)
    train_mod.train(from_dict(one))
    two = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"), per_device_train_batch_size=4,
                     fsdp="full_shard", **lora)
    result = torchrun(tmp_path, two, "two")
    assert "fsdp: the policy (PeftModelForCausalLM) sharded over 2" in result.stderr
    rows_one, _ = same_histories(tmp_path / "one", tmp_path / "two")
    assert rows_one[-1]["eval_loss"] < rows_one[0]["eval_loss"] - 0.01  # the adapter trained
    same_weights(tmp_path / "one", tmp_path / "two", "adapter_model.safetensors")
    adapter_two = load_file(tmp_path / "two" / "adapter_model.safetensors")

    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(tmp_path / "two" / "checkpoint-3", out / "checkpoint-3")
    torchrun(tmp_path, {**two, "output_dir": str(out), "resume_from_checkpoint": True}, "resumed")
    resumed = load_file(out / "adapter_model.safetensors")
    assert all(torch.equal(resumed[k], adapter_two[k]) for k in adapter_two)


@pytest.mark.slow
def test_a_sharded_freeze_run_equals_one_process(tmp_path, tiny_model_dir):
    torch.set_num_threads(1)
    freeze = {"finetuning_type": "freeze", "freeze_trainable_layers": 1, "max_steps": 3}
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"), **freeze)))
    torchrun(tmp_path, raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"), fsdp="full_shard",
                                  per_device_train_batch_size=4, **freeze), "two")
    weights_one = same_weights(tmp_path / "one", tmp_path / "two")
    start = load_file(tiny_model_dir / "model.safetensors")
    moved = [k for k in weights_one if not torch.equal(weights_one[k], start[k])]
    assert moved and all(".layers.1." in k for k in moved)  # only the last layer trained


# logged by each process: every weight file transformers opens, and the share of meta parameters of each
# model it hands to `shard` (1.00: built without weights, filled from the main process while sharding)
READ_PROBE = """
import os
import sys
import transformers.modeling_utils
from preftune.engines import fsdp
from preftune.cli import main

rank, safe_open, shard = os.environ["RANK"], transformers.modeling_utils.safe_open, fsdp.shard

def recorded(path, *args, **kwargs):
    print(f"READ {rank} {os.path.basename(str(path))}", file=sys.stderr)
    return safe_open(path, *args, **kwargs)

def probed(root, *args, **kwargs):
    params = list(root.parameters())
    print(f"META {rank} {sum(p.is_meta for p in params) / len(params):.2f}", file=sys.stderr)
    shard(root, *args, **kwargs)

transformers.modeling_utils.safe_open, fsdp.shard = recorded, probed
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_only_the_main_process_reads_the_weights(tmp_path, tiny_model_dir):
    """Under FSDP2 the other processes build the policy and the reference on the meta device and get
    their shards from the main process: the run still equals a one-process run."""
    torch.set_num_threads(1)
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"), max_steps=3)))
    script = tmp_path / "probe.py"
    script.write_text(READ_PROBE)
    two = raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "two"), per_device_train_batch_size=4,
                     fsdp="full_shard", max_steps=3)
    result = torchrun(tmp_path, two, "two", script=str(script))
    reads = re.findall(r"READ (\d) (\S+)", result.stderr)
    assert reads == [("0", "model.safetensors")] * 2, reads  # the policy and the reference copy, by the main process
    meta = sorted(re.findall(r"META (\d) ([0-9.]+)", result.stderr))
    assert meta == [("0", "0.00")] * 2 + [("1", "1.00")] * 2, meta
    same_histories(tmp_path / "one", tmp_path / "two")
    same_weights(tmp_path / "one", tmp_path / "two")
