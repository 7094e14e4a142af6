"""padding_free with a vision-language model (preftune/vision.py `collate_vision(packed=True)`; docs/vision.md).

* test_packed_equals_padded: a batch of 8 pairs with 0, 1 and 2 images packed in one row, as training collates it
  with padding_free, through the tiny LLaVA of tests/test_vision.py: the same log-probs, lengths and gradient of
  every weight (the vision tower's included) as the padded rows, within 1e-5.
* test_mrope_models_refuse_padding_free: Qwen2-VL's M-RoPE positions are computed per padded row: one line.
"""

import pytest

from preftune.config import from_dict
from test_vision import build_llava, write_vision_pairs
from test_vision_qwen2vl import build_qwen2vl


def test_packed_equals_padded(demo_pairs, tmp_path, tiny_tokenizer):
    import torch
    from transformers import AutoModelForImageTextToText

    from preftune.data import read_dataset
    from preftune.logps import get_batch_logps, model_inputs
    from preftune.step import PreferenceStep
    from preftune.vision import collate_vision, load_processor, tokenize_vision_pairs

    folder = build_llava(tiny_tokenizer, tmp_path / "llava")
    cfg = from_dict({"model_name_or_path": str(folder), "cutoff_len": 4096, "padding_free": True})
    processor = load_processor(cfg)
    examples = read_dataset(str(write_vision_pairs(tmp_path / "data", demo_pairs[:8])), "data")  # 7 images
    items = tokenize_vision_pairs(processor, examples, cfg)
    packed = PreferenceStep(cfg, None, processor).collate(items, processor.tokenizer.pad_token_id)  # training's
    padded = collate_vision(items, processor.tokenizer.pad_token_id, processor=processor)
    assert packed["input_ids"].shape == (1, int(padded["attention_mask"].sum()))
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])  # each pair's images once, in pair order
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)

    def logps_and_gradients(batch):
        model.zero_grad()
        out = get_batch_logps(model, **model_inputs(batch))  # (16,)
        (out.logps * torch.linspace(-1, 1, 16)).sum().backward()  # chosen and rejected rows weighted apart
        return out.logps.detach(), out.lengths, {n: p.grad.clone() for n, p in model.named_parameters()
                                                 if p.grad is not None}

    (packed_logps, packed_lengths, packed_grads), (padded_logps, padded_lengths, padded_grads) = \
        logps_and_gradients(packed), logps_and_gradients(padded)
    torch.testing.assert_close(packed_logps, padded_logps, rtol=1e-5, atol=1e-5)
    assert torch.equal(packed_lengths, padded_lengths)
    assert packed_grads.keys() == padded_grads.keys() and any(".vision_tower." in n for n in packed_grads)
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_mrope_models_refuse_padding_free(tmp_path, tiny_tokenizer):
    from preftune.errors import ConfigError
    from preftune.vision import load_processor

    folder = build_qwen2vl(tiny_tokenizer, tmp_path / "qwen2vl")
    with pytest.raises(ConfigError, match=r"^padding_free: not with a qwen2_vl model yet \(its M-RoPE") as raised:
        load_processor(from_dict({"model_name_or_path": str(folder), "padding_free": True}))
    assert "\n" not in str(raised.value)
