"""The commands around VLM training (docs/vision.md): export, on the tests' tiny LLaVA (test_vision.build_llava).

* test_export_of_a_vlm_run_loads_as_a_vlm: a trained run's output_dir exported in bf16 loads back with
  AutoProcessor + AutoModelForImageTextToText and gives the run's logits on a prompt with an image, to bf16
  tolerance; its held-out pairs (with and without images) are measured through the processor.
"""

import json

import pytest
import torch

from preftune.config import from_dict
from test_vision import build_llava, square, write_vision_pairs


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tiny_tokenizer):
    return build_llava(tiny_tokenizer, tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="module")
def llava_run(llava_dir, demo_pairs, tmp_path_factory):
    """A 2-step full fine-tuning run on 6 pairs (2 held out: one with an image, one without)."""
    from preftune import train as train_mod

    folder = tmp_path_factory.mktemp("llava_run")
    data = write_vision_pairs(folder / "data", demo_pairs[:6])
    train_mod.train(from_dict({"model_name_or_path": str(llava_dir), "dataset": str(data), "max_steps": 2,
                               "learning_rate": 0.01, "progress_bar": False, "plot_loss": False,
                               "save_strategy": "no", "output_dir": str(folder / "out"), "torch_dtype": "float32",
                               "per_device_train_batch_size": 4, "val_size": 2}))
    return folder / "out"


def _image_logits(model, processor):
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                          "text": "which colour?"}]}], tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[[square((0, 0, 255))]], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits.float()


def test_export_of_a_vlm_run_loads_as_a_vlm(llava_run, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaProcessor

    from preftune.commands.export import export

    out = tmp_path / "exported"
    report = export(from_dict({"model_name_or_path": str(llava_run)}), "bf16", str(out))
    assert report["heldout"]["pairs"] == 2 and report["heldout"]["logps_drift_max"] < 0.5, report["heldout"]
    processor = AutoProcessor.from_pretrained(out)
    assert isinstance(processor, LlavaProcessor) and processor.chat_template
    exported = AutoModelForImageTextToText.from_pretrained(out)
    assert {p.dtype for p in exported.parameters()} == {torch.bfloat16}
    original = AutoModelForImageTextToText.from_pretrained(llava_run, dtype=torch.float32)
    want = _image_logits(original, AutoProcessor.from_pretrained(llava_run))
    exported_logits = _image_logits(exported.float(), processor)
    assert want.shape == exported_logits.shape
    assert torch.allclose(exported_logits, want, atol=0.05), (exported_logits - want).abs().max()
    assert json.loads((out / "export_report.json").read_text())["dtype"] == "bf16"
