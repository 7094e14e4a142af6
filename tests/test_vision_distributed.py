"""FSDP2 and ZeRO-3 with a vision-language model (docs/vision.md): 2 CPU processes (gloo) train the tiny LLaVA of
test_vision.py (and, under FSDP2, the tiny Qwen2-VL of test_vision_qwen2vl.py) on pairs with 0, 1 or 2 images each,
as a one-process run with the global batch does: the same per-step metrics and final weights (1e-5). The vision
tower and projector train too (not LLaMA-Factory's default), so their sharded gradients are compared; a process
whose share of a batch has no image still runs the vision tower (`logps`: lockstep engines), else the other would
wait for it (at step 2 here, one process's share has no image). SGD: Adam's first steps turn the float noise of a
gradient near 0 (a key bias) into a full-size update."""

import pytest
import torch
from safetensors.torch import load_file

from preftune import train as train_mod
from preftune.config import from_dict
from test_deepspeed import EXAMPLES
from test_distributed import same_histories, same_weights, torchrun
from test_vision import build_llava, write_vision_pairs
from test_vision_gemma3 import build_gemma3
from test_vision_qwen2vl import build_qwen2vl


FSDP2 = {"fsdp": "full_shard"}
ZERO3 = {"deepspeed": str(EXAMPLES / "ds_z3_config.json")}  # LLaMA-Factory's, prefetching and reuse on


@pytest.mark.slow
@pytest.mark.parametrize("engine, family, objective", [
    (FSDP2, "llava", {}), (FSDP2, "qwen2_vl", {}), (ZERO3, "llava", {}), (ZERO3, "qwen2_vl", {}), (FSDP2, "gemma3", {}),
    (ZERO3, "llava", {"pref_loss": "kto"})],
    ids=["fsdp2-llava", "fsdp2-qwen2_vl", "zero3-llava", "zero3-qwen2_vl", "fsdp2-gemma3", "zero3-llava-kto"])
def test_two_sharded_processes_equal_one_process(engine, family, objective, tiny_tokenizer, demo_pairs, tmp_path):
    """(kto: each row its own images, and a process whose micro-batch has none runs the blank image too)"""
    torch.set_num_threads(1)
    build = {"llava": build_llava, "qwen2_vl": build_qwen2vl, "gemma3": build_gemma3}[family]
    model = build(tiny_tokenizer, tmp_path / family)
    data = write_vision_pairs(tmp_path / "data", demo_pairs[:8])  # pairs 0, 3, 6 text-only
    raw = {"model_name_or_path": str(model), "dataset": str(data), "torch_dtype": "float32",
           "learning_rate": 0.5, "optim": "sgd",
           "per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1, "progress_bar": False,
           "plot_loss": False, "freeze_vision_tower": False, "freeze_multi_modal_projector": False, **objective}
    train_mod.train(from_dict({**raw, "output_dir": str(tmp_path / "one")}))
    result = torchrun(tmp_path, {**raw, "output_dir": str(tmp_path / "two"), "per_device_train_batch_size": 2,
                                 **engine}, "two")
    assert ("sharded over 2" if "fsdp" in engine else "partitioned over 2") in result.stderr
    rows, _ = same_histories(tmp_path / "one", tmp_path / "two")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    weights = same_weights(tmp_path / "one", tmp_path / "two")
    start = load_file(model / "model.safetensors")
    vision = "visual" if family == "qwen2_vl" else "vision_tower"
    assert any(not torch.equal(weights[n], start[n]) for n in weights if vision in n)  # the tower trained
