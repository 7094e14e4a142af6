"""Each pair's images are encoded once, not once for its chosen row and once for its rejected row (preftune/logps.py
`_rows_media`; docs/vision.md). The other way, every row's images encoded (what a backbone without
`mm_encoder_outputs` gets, what TRL does and what preftune did before), is the one compared against.

* test_same_log_probs_and_gradients: one batch of 8 pairs with 0, 1 and 2 images through the tiny LLaVA and the tiny
  Qwen2-VL: the same log-probs and the same gradient of every weight, the vision tower's included, within 1e-5,
  and the vision tower encodes each pair's images once instead of twice.
* test_same_steps: 2 steps on the tiny Qwen2-VL (M-RoPE, whose positions need every row's image grid), vision tower
  and projector trained: the same logged numbers at each step, within 1e-5.
"""

import inspect
import json

import pytest
import torch

from preftune import logps as logps_mod
from preftune.config import from_dict
from test_vision import build_llava, write_vision_pairs
from test_vision_qwen2vl import build_qwen2vl


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def vlm(request, tmp_path_factory, tiny_tokenizer):
    """(the model folder, its backbone class, the argument of get_image_features that has a row per image)"""
    from transformers.models.llava.modeling_llava import LlavaModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "llava":
        return build_llava(tiny_tokenizer, folder), LlavaModel, "pixel_values"
    return build_qwen2vl(tiny_tokenizer, folder), Qwen2VLModel, "image_grid_thw"


def counting(monkeypatch, backbone_class, per_image: str) -> list[int]:
    """The images each call of the backbone's get_image_features encodes, as they come."""
    encoded, real = [], backbone_class.get_image_features

    def get_image_features(self, *args, **kwargs):
        encoded.append(inspect.signature(real).bind(self, *args, **kwargs).arguments[per_image].shape[0])
        return real(self, *args, **kwargs)

    monkeypatch.setattr(backbone_class, "get_image_features", get_image_features)
    return encoded


def test_same_log_probs_and_gradients(vlm, demo_pairs, tmp_path, monkeypatch):
    from transformers import AutoModelForImageTextToText

    from preftune.data import read_dataset
    from preftune.logps import get_batch_logps, model_inputs
    from preftune.vision import collate_vision, load_processor, tokenize_vision_pairs

    folder, backbone_class, per_image = vlm
    encoded = counting(monkeypatch, backbone_class, per_image)
    cfg = from_dict({"model_name_or_path": str(folder), "cutoff_len": 4096})
    processor = load_processor(cfg)
    examples = read_dataset(str(write_vision_pairs(tmp_path / "data", demo_pairs[:8])), "data")  # 7 images
    batch = collate_vision(tokenize_vision_pairs(processor, examples, cfg), processor.tokenizer.pad_token_id,
                           processor=processor)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)

    def logps_and_gradients():
        model.zero_grad()
        logps = get_batch_logps(model, **model_inputs(batch)).logps  # (16,)
        (logps * torch.linspace(-1, 1, 16)).sum().backward()  # chosen and rejected rows weighted apart
        return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    once, once_grads = logps_and_gradients()
    monkeypatch.setattr(logps_mod, "_takes_encoder_outputs", lambda backbone: False)
    twice, twice_grads = logps_and_gradients()
    assert encoded == [7, 14]
    torch.testing.assert_close(once, twice, rtol=1e-5, atol=1e-5)
    assert once_grads.keys() == twice_grads.keys() and any("vision" in n or "visual" in n for n in once_grads)
    for name, grad in once_grads.items():
        torch.testing.assert_close(grad, twice_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_same_steps(demo_pairs, tmp_path, monkeypatch, tiny_tokenizer):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    from preftune import train as train_mod

    folder = build_qwen2vl(tiny_tokenizer, tmp_path / "qwen2vl")
    encoded = counting(monkeypatch, Qwen2VLModel, "image_grid_thw")
    data = write_vision_pairs(tmp_path / "data", demo_pairs[:8])  # pair i has i % 3 images: 7 in all

    def run(name):
        encoded.clear()
        train_mod.train(from_dict({
            "model_name_or_path": str(folder), "dataset": str(data), "eval_strategy": "no",
            "torch_dtype": "float32", "progress_bar": False, "plot_loss": False, "save_strategy": "no",
            "output_dir": str(tmp_path / name), "learning_rate": 0.5, "optim": "sgd", "max_grad_norm": 0,
            "per_device_train_batch_size": 8, "max_steps": 2, "logging_steps": 1,
            "freeze_vision_tower": False, "freeze_multi_modal_projector": False}))
        return json.loads((tmp_path / name / "dpo_metrics" / "log_history.json").read_text()), list(encoded)

    once, once_encoded = run("once")
    monkeypatch.setattr(logps_mod, "_takes_encoder_outputs", lambda backbone: False)
    twice, twice_encoded = run("twice")
    assert once_encoded == [7, 7, 7, 7] and twice_encoded == [14, 14, 14, 14]  # 2 steps, policy and reference
    assert [r["step"] for r in once] == [r["step"] for r in twice] == [1, 2]
    for row_once, row_twice in zip(once, twice):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
                    "logps/rejected", "grad_norm", "kl_per_token"):
            assert row_once[key] == pytest.approx(row_twice[key], rel=1e-5, abs=1e-5), (row_once["step"], key)
    assert once[-1]["loss"] < once[0]["loss"] - 0.01  # it trained: not a comparison of constants
