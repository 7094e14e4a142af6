"""DPO on Gemma 3 pairs (docs/vision.md, Gemma 3): a tiny random-init Gemma3ForConditionalGeneration, no torchvision.

The model: a 1-layer SigLIP vision tower on 16x16 images in 4x4 patches of 4 pixels, pooled 2x2 into 4 soft tokens
an image (mm_tokens_per_image), and a 2-layer Gemma 3 text model (a sliding-window layer over 16 tokens, then a full-attention one), saved with
its Gemma3Processor and the PIL Gemma3ImageProcessorPil (transformers picks it without torchvision). The tokenizer
is the tests' with Gemma 3's special tokens: a BOS the chat template writes, `<start_of_image>` (the placeholder
the template writes for an image part), `<image_soft_token>` (what the processor expands it into, wrapped in
`\\n\\n<start_of_image>...<end_of_image>\\n\\n`, where the features go) and `<end_of_image>`. Pairs and images as
tests/test_vision.py's.

* test_image_and_prompt_tokens_are_never_scored: the rows, completion masks, pixel_values and token_type_ids
  (1 on the soft tokens: Gemma 3's image tokens attend to each other both ways) are TRL's collator's; no
  image or prompt token is scored; the image reaches the completion's log-probs, and token_type_ids change them.
* test_a_cut_into_the_soft_tokens_is_one_line: cutoff_len / max_prompt_length through an image's soft tokens;
  padding_free refused.
* test_steps_match_trl: 3 steps of preftune train and of TRL 1.16's DPOTrainer: the same loss and statistics.
"""

import copy
import json

import pytest
import torch

from preftune.config import from_dict
from test_vision import assert_trl_rows, collated_with_trl, square, trl_vision_rows, write_vision_pairs

MM_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
# Gemma 3's chat template, shortened (no system turn folding): BOS, <start_of_turn>user / model turns, an image
# part as <start_of_image>
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}"
    "{% for p in m['content'] %}{% if p['type'] == 'image' %}{{ '<start_of_image>' }}{% elif p['type'] == 'text' %}"
    "{{ p['text'] | trim }}{% endif %}{% endfor %}{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def build_gemma3(tokenizer, folder, seed: int = 0):
    """A tiny random-init Gemma3ForConditionalGeneration and its Gemma3Processor, saved in `folder`."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor, Gemma3TextConfig,
                              SiglipVisionConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [*MM_TOKENS.values(), "<start_of_turn>",
                                                                "<end_of_turn>", "<bos>"]})
    tokenizer.bos_token = "<bos>"
    tokenizer.add_bos_token = True  # as Gemma's: a BOS in front unless add_special_tokens=False (the template writes one)
    tokenizer.update_post_processor()
    tokenizer._set_model_specific_special_tokens(MM_TOKENS)  # tokenizer.boi_token, ..., as Gemma 3's tokenizer has
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=4)
    text = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                            sliding_window=16, layer_types=["sliding_attention", "full_attention"],
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                          image_token_index=tokenizer.image_token_id)
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # Gemma 3 starts its projector at 0 (every image the same 0 features): random instead
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    model.save_pretrained(folder)
    Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 16, "width": 16}), tokenizer=tokenizer,
                    chat_template=CHAT_TEMPLATE, image_seq_length=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory, tiny_tokenizer):
    return build_gemma3(tiny_tokenizer, tmp_path_factory.mktemp("gemma3"))


def test_image_and_prompt_tokens_are_never_scored(gemma3_dir, demo_pairs, tmp_path):
    """The rows, completion masks, pixel_values (each pair's images once here, once per row in TRL) and
    token_type_ids are TRL's collator's for the same pairs and processor; each image is `\\n\\n<start_of_image>` + 4 soft tokens + `<end_of_image>\\n\\n` in the prompt, its soft
    tokens (token_type_ids 1) never scored, nor any prompt token. The image reaches the completion's log-probs
    (another colour changes them); without token_type_ids (each image attended causally) they change too, so the
    batch must carry them; a text-only pair's are those of the language model alone."""
    from transformers import AutoModelForImageTextToText, Gemma3Processor

    from preftune.data import read_dataset
    from preftune.logps import get_batch_logps, model_inputs
    from preftune.vision import load_processor, tokenize_vision_pairs

    cfg = from_dict({"model_name_or_path": str(gemma3_dir), "cutoff_len": 4096})
    processor = load_processor(cfg)
    assert isinstance(processor, Gemma3Processor) and type(processor.image_processor).__name__ == \
        "Gemma3ImageProcessorPil"
    examples = read_dataset(str(write_vision_pairs(tmp_path / "data", demo_pairs[:6])), "data")
    items = tokenize_vision_pairs(processor, examples, cfg)
    batch, theirs = collated_with_trl(processor, examples, items)
    # each pair's images once here (for both its rows), once per row in TRL
    torch.testing.assert_close(batch["pixel_values"].repeat(2, 1, 1, 1), theirs["pixel_values"], rtol=0, atol=0)
    assert "mm_token_type_ids" not in batch
    tok = processor.tokenizer
    soft, boi, eoi = tok.image_token_id, tok.boi_token_id, tok.eoi_token_id
    for row in range(12):
        ids, mask = batch["input_ids"][row], batch["completion_mask"][row].bool()
        real = theirs["attention_mask"][row].bool()
        n = int(batch["attention_mask"][row].sum())
        assert ids[:n].tolist() == theirs["input_ids"][row][real].tolist(), row
        assert mask[:n].tolist() == theirs["completion_mask"][row][real].bool().tolist(), row
        assert batch["token_type_ids"][row][:n].tolist() == theirs["token_type_ids"][row][real].tolist(), row
        assert batch["token_type_ids"][row].tolist() == (ids == soft).long().tolist()
        assert not mask[n:].any() and mask[:n].nonzero().min() == (~mask[:n]).sum()  # one span, after the prompt
        assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1  # the template's, not doubled
        k = len(examples[row % 6].images)
        assert ((ids == soft).sum(), (ids == boi).sum(), (ids == eoi).sum()) == (4 * k, k, k)
        assert not (mask & ((ids == soft) | (ids == boi) | (ids == eoi))).any()

    model = AutoModelForImageTextToText.from_pretrained(gemma3_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logps = get_batch_logps(model, **model_inputs(batch)).logps
        grey = [square((60, 60, 60), ref.size) for e in examples for ref in e.images]
        grey_pixels = processor.image_processor(images=grey, return_tensors="pt")["pixel_values"]
        changed = get_batch_logps(model, **model_inputs(batch | {"pixel_values": grey_pixels})).logps
        causal = get_batch_logps(model, **model_inputs({k: v for k, v in batch.items() if k != "token_type_ids"}))
        text_only = [i for i, e in enumerate(examples) if not e.images]
        text_batch = {k: batch[k][text_only + [6 + i for i in text_only]] for k in ("input_ids", "attention_mask",
                                                                                      "completion_mask")}
        alone = get_batch_logps(model, **model_inputs(text_batch)).logps  # the language model alone
    with_images = torch.tensor([bool(examples[i % 6].images) for i in range(12)])
    assert ((logps - changed).abs() > 1e-4)[with_images].all()
    assert ((logps - causal.logps).abs() > 1e-5)[with_images].all()
    assert torch.equal(logps[~with_images], changed[~with_images])
    torch.testing.assert_close(alone, logps[~with_images], rtol=1e-5, atol=1e-4)


def test_a_cut_into_the_soft_tokens_is_one_line(gemma3_dir, demo_pairs, tmp_path):
    """A prompt cut (max_prompt_length) that keeps an image's <start_of_image> but drops some of its soft tokens, where
    the features go, is refused in one line (the model would fail on 4 features for 2 tokens); so is padding_free
    (untested with Gemma 3's token_type_ids mask)."""
    from preftune.data import read_dataset
    from preftune.errors import ConfigError, DataError
    from preftune.vision import load_processor, tokenize_vision_pairs

    cfg = from_dict({"model_name_or_path": str(gemma3_dir), "cutoff_len": 4096})
    processor = load_processor(cfg)
    pairs = read_dataset(str(write_vision_pairs(tmp_path / "data", demo_pairs[:2])), "data")[1:]  # one image
    (whole,) = tokenize_vision_pairs(processor, pairs, cfg)
    keep = whole.chosen_ids.index(processor.tokenizer.boi_token_id) + 3  # <start_of_image> and 2 of 4 soft tokens
    with pytest.raises(DataError, match=r"pairs.jsonl:2: cutoff_len 4096 \(or max_prompt_length\) cuts into its 4 "
                                        r"image tokens") as raised:
        tokenize_vision_pairs(processor, pairs, from_dict({"cutoff_len": 4096, "max_prompt_length": keep}))
    assert "\n" not in str(raised.value)
    with pytest.raises(ConfigError, match="^padding_free: not with a gemma3 model yet") as raised:
        load_processor(from_dict({"model_name_or_path": str(gemma3_dir), "padding_free": True}))
    assert "\n" not in str(raised.value)


def test_steps_match_trl(gemma3_dir, demo_pairs, tmp_path):
    """3 steps of preftune train and of TRL 1.16's DPOTrainer on the same tiny Gemma 3, pairs and images (8 pairs in
    one batch, 0, 1 or 2 images each; SGD at a constant rate): the same loss, rewards, log-probs and gradient norm
    at every step, within 1e-4."""
    from preftune import train as train_mod
    from preftune.vision import load_processor

    data = write_vision_pairs(tmp_path / "data", demo_pairs[:8])
    common = {"learning_rate": 0.5, "optim": "sgd", "lr_scheduler_type": "constant", "max_grad_norm": 0,
              "per_device_train_batch_size": 8, "max_steps": 3, "logging_steps": 1}
    cfg = from_dict({"model_name_or_path": str(gemma3_dir), "dataset": str(data), "torch_dtype": "float32",
                     "progress_bar": False, "plot_loss": False, "save_strategy": "no",
                     "output_dir": str(tmp_path / "ours"), **common,
                     "freeze_vision_tower": False, "freeze_multi_modal_projector": False})  # TRL trains every weight
    train_mod.train(cfg)
    ours = [r for r in json.loads((tmp_path / "ours" / "dpo_metrics" / "log_history.json").read_text()) if "loss" in r]
    assert_trl_rows(ours, trl_vision_rows(gemma3_dir, load_processor(cfg), data, tmp_path, common))
