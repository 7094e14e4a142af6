"""DPO on Qwen2-VL pairs without torchvision (preftune/vision.py `images_only`; docs/vision.md, Qwen2-VL).

A tiny random-init Qwen2VLForConditionalGeneration (a 1-layer vision tower on 8x8 patches merged 2x2: an image is
resized to sides of 16 or 32 pixels, 1 to 4 image tokens; a 2-layer Qwen2-VL text model with M-RoPE), saved as a
Qwen2-VL checkpoint is: the tokenizer with Qwen2-VL's vision tokens, the image processor's
preprocessor_config.json, Qwen2-VL-Instruct's chat template and processor_config.json naming Qwen2VLProcessor.
transformers 5.23 cannot build Qwen2VLProcessor without torchvision (its video processor); preftune loads the same
class without its video processor. Pairs and images as tests/test_vision.py's.

Qwen2.5-VL (a tiny one, windowed attention in its vision tower) goes through the processor and masking tests too.

* test_processor_without_video: the processor loads from the folder without torchvision, its ids,
  pixel_values, image_grid_thw and mm_token_type_ids are what Qwen2-VL's processing gives, and it saves as
  Qwen2VLProcessor.
* test_steps_match_trl: 3 steps of preftune train and of TRL 1.16's DPOTrainer (fed the same processor): the
  same loss and statistics at every step.
* test_image_and_prompt_tokens_are_never_scored: the completion mask is TRL's and holds no image token; the
  image reaches the completion's log-probs.
* test_lora_on_the_language_model: LoRA with LLaMA-Factory's freeze defaults, against the adapter-off reference.
* test_llamafactory_template_name: LLaMA-Factory's `template: qwen2_vl` is accepted (the processor's chat
  template renders the pairs, as LLaMA-Factory's qwen2_vl does).
"""

import json

import pytest
import torch

from preftune.config import from_dict
from preftune.demo_vision import QWEN2VL_CHAT_TEMPLATE, QWEN2VL_VISION_TOKENS
from test_vision import assert_trl_rows, collated_with_trl, square, trl_vision_rows, write_vision_pairs

# Qwen2-VL-Instruct's chat template and vision tokens: the demo's copy (preftune/demo_vision.py)
CHAT_TEMPLATE, VISION_TOKENS = QWEN2VL_CHAT_TEMPLATE, QWEN2VL_VISION_TOKENS


PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}


def build_qwen2vl(tokenizer, folder, family: str = "qwen2_vl", seed: int = 0):
    """A tiny random-init Qwen2-VL (or Qwen2.5-VL) model saved in `folder` with its processor's files."""
    import copy

    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tokenizer.convert_tokens_to_ids(VISION_TOKENS)))
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [1, 1, 2]},
            "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id}
    patches = {"patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if family == "qwen2_vl":
        config_class, model_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, **patches}
    else:  # Qwen2.5-VL: windowed attention in the vision tower (2x2 merged patches a window), the last block full
        config_class, model_class = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
                  "window_size": 32, "fullatt_block_indexes": [1], **patches}
    torch.manual_seed(seed)
    model_class(config_class(vision_config=vision, text_config=text, tie_word_embeddings=True, **ids)
                ).save_pretrained(folder)
    # 8x8 patches, 2x2 merged: an image is resized to a multiple of 16 pixels a side, between 16x16 and 32x32
    Qwen2VLImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": 32 * 32}, patch_size=8,
                             merge_size=2, temporal_patch_size=2).save_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    # what a Qwen2-VL checkpoint's processor files say (written by hand: the processor needs torchvision)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": PROCESSOR_CLASS[family]}))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def qwen2vl_dir(tmp_path_factory, tiny_tokenizer):
    return build_qwen2vl(tiny_tokenizer, tmp_path_factory.mktemp("qwen2vl"))


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def family_dir(request, qwen2vl_dir, tmp_path_factory, tiny_tokenizer):
    """Qwen2-VL's folder, then a Qwen2.5-VL one: the same processor path, another model."""
    if request.param == "qwen2_vl":
        return qwen2vl_dir
    return build_qwen2vl(tiny_tokenizer, tmp_path_factory.mktemp("qwen2_5_vl"), request.param)


def test_steps_match_trl(qwen2vl_dir, demo_pairs, tmp_path):
    """3 steps of preftune train and of TRL 1.16's DPOTrainer on the same tiny Qwen2-VL, pairs and images (8 pairs
    in one batch, 0, 1 or 2 images each; SGD at a constant rate), TRL fed the same processor: the same loss,
    rewards, log-probs and gradient norm at every step, within 1e-4."""
    from preftune import train as train_mod
    from preftune.vision import load_processor

    data = write_vision_pairs(tmp_path / "data", demo_pairs[:8])
    common = {"learning_rate": 0.5, "optim": "sgd", "lr_scheduler_type": "constant", "max_grad_norm": 0,
              "per_device_train_batch_size": 8, "max_steps": 3, "logging_steps": 1}
    cfg = from_dict({"model_name_or_path": str(qwen2vl_dir), "dataset": str(data), "torch_dtype": "float32",
                     "template": "qwen2_vl",  # a LLaMA-Factory config's, unchanged
                     "progress_bar": False, "plot_loss": False, "save_strategy": "no",
                     "output_dir": str(tmp_path / "ours"), **common,
                     "freeze_vision_tower": False, "freeze_multi_modal_projector": False})  # TRL trains every weight
    train_mod.train(cfg)
    ours = [r for r in json.loads((tmp_path / "ours" / "dpo_metrics" / "log_history.json").read_text()) if "loss" in r]
    # the output is a Qwen2-VL checkpoint whose processor loads (here without torchvision; with it, as the real one)
    assert type(load_processor(from_dict({"model_name_or_path": str(tmp_path / "ours")}))).__name__ == \
        "Qwen2VLProcessor" and (tmp_path / "ours" / "preprocessor_config.json").exists()

    assert_trl_rows(ours, trl_vision_rows(qwen2vl_dir, load_processor(cfg), data, tmp_path, common))


def test_processor_without_video(family_dir, tmp_path, monkeypatch):
    """Without torchvision, load_processor gives Qwen2VLProcessor (Qwen2_5_VLProcessor) less its video processor, and
    its output is Qwen2-VL's: each image is its image processor's pixel_values and image_grid_thw (t, h, w
    patches), its placeholder becomes h * w / 2^2 <|image_pad|> tokens, and mm_token_type_ids is 1 exactly on
    them. Saved, it names its class and loads again here (and, with torchvision, as the real one:
    docs/vision.md). A processor that does not load without torchvision says what to install, in one line."""
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from preftune import vision
    from preftune.errors import ModelError

    processor_class = getattr(transformers, json.loads((family_dir / "processor_config.json").read_text())[
        "processor_class"])
    processor = vision.load_processor(from_dict({"model_name_or_path": str(family_dir)}))
    assert isinstance(processor, processor_class) and not hasattr(processor, "video_processor")
    images = [square((200, 30, 30), (20, 24)), square((30, 30, 200), (48, 16))]  # (width, height)
    text = "<|vision_start|><|image_pad|><|vision_end|>a<|vision_start|><|image_pad|><|vision_end|>b"
    out = processor(text=[text], images=[images], add_special_tokens=False, return_tensors="pt")
    alone = Qwen2VLImageProcessorPil.from_pretrained(family_dir)(images=images, return_tensors="pt")
    assert torch.equal(out["pixel_values"], alone["pixel_values"])
    # resized to 16x32 and 48x16 (sides a multiple of 8 * 2): 4 x 2 and 2 x 6 patches, merged 2x2: 2 and 3 tokens
    assert out["image_grid_thw"].tolist() == alone["image_grid_thw"].tolist() == [[1, 4, 2], [1, 2, 6]]
    expanded = text.replace("<|image_pad|>", "{}").format("<|image_pad|>" * 2, "<|image_pad|>" * 3)
    ids, image_id = out["input_ids"][0], processor.image_token_id
    assert ids.tolist() == processor.tokenizer(expanded, add_special_tokens=False)["input_ids"]
    assert out["mm_token_type_ids"][0].tolist() == (ids == image_id).long().tolist()

    processor.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "processor_config.json").read_text())
    assert saved["processor_class"] == processor_class.__name__
    assert (tmp_path / "saved" / "preprocessor_config.json").exists()
    again = vision.images_only(processor_class).from_pretrained(tmp_path / "saved")
    assert again(text=[text], images=[images], add_special_tokens=False)["input_ids"] == [ids.tolist()]

    monkeypatch.setattr(vision, "_images_only_processor", lambda folder, config: None)  # where it cannot be built
    with pytest.raises(ModelError, match=r"its processor does not load .*; it needs torchvision \(pip install "
                                         r"torchvision, built for your torch\)$") as raised:
        vision.load_processor(from_dict({"model_name_or_path": str(family_dir)}))
    assert "\n" not in str(raised.value)


def test_image_and_prompt_tokens_are_never_scored(family_dir, demo_pairs, tmp_path):
    """The rows, completion masks, pixel_values, image_grid_thw (each pair's images once here, once per row in TRL)
    and mm_token_type_ids are TRL's collator's for the same pairs and processor; no image token (nor any prompt token) is in a completion mask; the image
    reaches the completion's log-probs (another colour changes them), and a text-only pair's are those of the
    language model alone."""
    from transformers import AutoModelForImageTextToText

    from preftune.data import read_dataset
    from preftune.logps import get_batch_logps, model_inputs
    from preftune.vision import load_processor, tokenize_vision_pairs

    cfg = from_dict({"model_name_or_path": str(family_dir), "cutoff_len": 4096})
    processor = load_processor(cfg)
    examples = read_dataset(str(write_vision_pairs(tmp_path / "data", demo_pairs[:6])), "data")
    items = tokenize_vision_pairs(processor, examples, cfg)
    batch, theirs = collated_with_trl(processor, examples, items)
    # TRL's collator gives each row's images (each pair's twice), preftune each pair's once (test_vision_encode_once.py)
    torch.testing.assert_close(batch["pixel_values"].repeat(2, 1), theirs["pixel_values"], rtol=0, atol=0)
    assert torch.equal(batch["image_grid_thw"].repeat(2, 1), theirs["image_grid_thw"])
    image_id = processor.image_token_id
    for row in range(12):
        ids, mask = batch["input_ids"][row], batch["completion_mask"][row].bool()
        real = theirs["attention_mask"][row].bool()
        n = int(batch["attention_mask"][row].sum())
        assert ids[:n].tolist() == theirs["input_ids"][row][real].tolist(), row
        assert mask[:n].tolist() == theirs["completion_mask"][row][real].bool().tolist(), row
        assert batch["mm_token_type_ids"][row][:n].tolist() == theirs["mm_token_type_ids"][row][real].tolist(), row
        assert not mask[n:].any() and mask[:n].nonzero().min() == (~mask[:n]).sum()  # one span, after the prompt
        assert (ids[mask] != image_id).all() and (ids == image_id).any() == bool(examples[row % 6].images)

    model = AutoModelForImageTextToText.from_pretrained(family_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logps = get_batch_logps(model, **model_inputs(batch)).logps
        grey = [square((60, 60, 60), ref.size) for e in examples for ref in e.images]
        changed = get_batch_logps(model, **model_inputs(batch | processor.image_processor(images=grey,
                                                                                          return_tensors="pt"))).logps
        text_only = [i for i, e in enumerate(examples) if not e.images]
        text_batch = {k: batch[k][text_only + [6 + i for i in text_only]] for k in ("input_ids", "attention_mask",
                                                                                      "completion_mask")}
        alone = get_batch_logps(model, **model_inputs(text_batch)).logps  # the language model alone
    with_images = torch.tensor([bool(examples[i % 6].images) for i in range(12)])
    assert ((logps - changed).abs() > 1e-4)[with_images].all()
    assert torch.equal(logps[~with_images], changed[~with_images])
    torch.testing.assert_close(alone, logps[~with_images], rtol=1e-5, atol=1e-4)


def test_llamafactory_template_name(qwen2vl_dir, tiny_model_dir, caplog):
    """LLaMA-Factory's `template: qwen2_vl` is taken for a Qwen2-VL model, whose processor's chat template renders
    a pair as LLaMA-Factory's qwen2_vl template does (its slots, copied here: the default system text, the image
    placeholder expanded in place where LLaMA-Factory's `<image>` stands); with a text-only model it is one line."""
    from preftune.errors import ConfigError
    from preftune.vision import _structured, load_processor

    with caplog.at_level("WARNING", logger="preftune"):
        processor = load_processor(from_dict({"model_name_or_path": str(qwen2vl_dir), "template": "qwen2_vl"}))
    assert "template" not in caplog.text

    def llamafactory(system, user, answer):  # format_system, format_user, format_assistant of its qwen2_vl
        return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
                f"{answer}<|im_end|>\n")

    image = "<|vision_start|><|image_pad|><|vision_end|>"  # LLaMA-Factory's <image>, before the plugin expands it
    user = [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]
    for system in (None, "Answer in one word."):
        messages = [{"role": "system", "content": system}] * bool(system) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": "Red."}]
        assert processor.apply_chat_template(_structured(messages), tokenize=False) == llamafactory(
            system or "You are a helpful assistant.", image + "What colour is it?", "Red.")

    with pytest.raises(ConfigError, match="^template: qwen2_vl is LLaMA-Factory's template for a vision-language "
                                          "model .* a text-only qwen2 model") as raised:
        load_processor(from_dict({"model_name_or_path": str(tiny_model_dir), "template": "qwen2_vl"}))
    assert "\n" not in str(raised.value)


def test_lora_on_the_language_model(qwen2vl_dir, demo_pairs, tmp_path):
    """LoRA (LLaMA-Factory's defaults: the vision tower `visual` and its projector `merger` frozen, no adapters in
    them): one step against the adapter-off reference through the whole multimodal backbone, whose log-probs at
    step 1 equal the policy's (loss log 2); the merged output changed in the language model only."""
    from transformers import AutoModelForImageTextToText

    from preftune import train as train_mod

    data = write_vision_pairs(tmp_path / "data", demo_pairs[:4])
    train_mod.train(from_dict({"model_name_or_path": str(qwen2vl_dir), "dataset": str(data), "max_steps": 1,
                               "finetuning_type": "lora", "lora_target": "all", "progress_bar": False,
                               "plot_loss": False, "save_strategy": "no", "output_dir": str(tmp_path / "out"),
                               "torch_dtype": "float32", "per_device_train_batch_size": 4, "learning_rate": 0.01}))
    row = next(r for r in json.loads((tmp_path / "out" / "dpo_metrics" / "log_history.json").read_text())
               if "loss" in r)
    assert row["loss"] == pytest.approx(0.693147, abs=1e-6) and row["grad_norm"] > 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    start = AutoModelForImageTextToText.from_pretrained(qwen2vl_dir)
    moved = {n for n, p in merged.named_parameters() if not torch.equal(p, start.get_parameter(n))}
    assert moved and all(".language_model." in n for n in moved), sorted(moved)[:5]
