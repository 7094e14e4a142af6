"""DPO on vision-language pairs (preftune/vision.py, preftune/data/images.py; docs/vision.md).

A tiny random-init LLaVA (a CLIP vision tower, 16x16 images in 4 patches of 8x8, and a Qwen2 text model
on the tests' tokenizer with an `<image>` token), built here and saved with its LlavaProcessor (the PIL
CLIP image processor: no torchvision). Pairs in TRL's vision format, with coloured squares as images:
0, 1 or 2 images per pair, so text-only pairs are mixed in and some prompts have two images.

* test_steps_match_trl: 3 steps of preftune train and of TRL 1.16's DPOTrainer on the same model folder,
  data and optimizer: the same loss and statistics at every step.
* test_image_and_prompt_tokens_are_never_scored: the completion mask covers the completion only; every
  image token and prompt token is outside it, and an image changes the completion's log-probs.
* test_bad_images_are_one_line: a missing file, a file that is not an image, a truncated image, a
  placeholder count that differs from the images, an image on a text-only model: one line each.
"""

import json

import pytest
import torch

from preftune.config import from_dict

COLOURS = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (240, 200, 0), (128, 0, 128), (0, 200, 200)]
CHAT_TEMPLATE = (  # ChatML; an image part is the processor's <image> placeholder
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}{{ '<image>' }}{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def build_llava(tokenizer, folder, seed: int = 0):
    """A tiny random-init LlavaForConditionalGeneration and its processor, saved in `folder`."""
    import copy

    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, Qwen2Config
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids(
        "<image>"), vision_feature_select_strategy="default", vision_feature_layer=-1)
    torch.manual_seed(seed)
    LlavaForConditionalGeneration(config).save_pretrained(folder)
    # default strategy: the CLS feature is dropped, so an image is (16 / 8)^2 = 4 <image> tokens
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 16},
                                                                     crop_size={"height": 16, "width": 16}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(folder)
    return folder


def square(colour, size=(20, 20)):
    from PIL import Image

    return Image.new("RGB", size, colour)


def vision_records(pairs: list[dict], folder, paths: bool = True) -> list[dict]:
    """The pairs in TRL's vision format, pair i with i % 3 coloured squares (0: text-only) in front of its
    question; the images as PNG files in `folder` (paths relative to it), or as PIL images."""
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for i, p in enumerate(pairs):
        images = []
        for k in range(i % 3):
            colour = COLOURS[(i + 2 * k) % len(COLOURS)]
            name = f"img_{i}_{k}.png"
            square(colour, (20 + 4 * k, 24)).save(folder / name)
            images.append(name if paths else str(folder / name))
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": p["prompt"]}]
        records.append({"images": images, "prompt": [{"role": "user", "content": content}],
                        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": p["chosen"]}]}],
                        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": p["rejected"]}]}]})
    return records


def write_vision_pairs(folder, pairs: list[dict]):
    records = vision_records(pairs, folder)
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tiny_tokenizer):
    return build_llava(tiny_tokenizer, tmp_path_factory.mktemp("llava"))


STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm")


def test_steps_match_trl(llava_dir, demo_pairs, tmp_path):
    """3 steps of preftune train and of TRL 1.16's DPOTrainer on the same tiny LLaVA, pairs and images (8 pairs
    in one batch: 3 with no image, 3 with one, 2 with two; SGD at a constant rate, so float noise stays noise):
    the same loss, rewards, log-probs and gradient norm at every step, within 1e-4."""
    import datasets
    import trl
    from transformers import AutoProcessor

    from preftune import train as train_mod
    from preftune.data.images import ImageRef  # noqa: F401 (the images TRL gets are the files preftune reads)

    pairs = demo_pairs[:8]
    data = write_vision_pairs(tmp_path / "data", pairs)
    common = {"learning_rate": 0.5, "optim": "sgd", "lr_scheduler_type": "constant", "max_grad_norm": 0,
              "per_device_train_batch_size": 8, "max_steps": 3, "logging_steps": 1}
    train_mod.train(from_dict({"model_name_or_path": str(llava_dir), "dataset": str(data), "torch_dtype": "float32",
                               "progress_bar": False, "plot_loss": False, "save_strategy": "no",
                               "output_dir": str(tmp_path / "ours"), **common}))
    ours = [r for r in json.loads((tmp_path / "ours" / "dpo_metrics" / "log_history.json").read_text()) if "loss" in r]

    from PIL import Image

    records = [json.loads(line) for line in data.read_text().splitlines()]
    for r in records:
        r["images"] = [Image.open(tmp_path / "data" / name).copy() for name in r["images"]]
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type="sigmoid", weight_decay=0.0,
                         report_to="none", max_length=None, use_cpu=True, save_strategy="no", seed=0, bf16=False,
                         dataloader_num_workers=0, activation_checkpointing=False,
                         model_init_kwargs={"dtype": torch.float32}, **common)
    trainer = trl.DPOTrainer(model=str(llava_dir), args=args, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=AutoProcessor.from_pretrained(llava_dir))
    trainer.train()
    theirs = [r for r in trainer.state.log_history if "loss" in r and "rewards/chosen" in r]

    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [1, 2, 3]
    for mine, trl_row in zip(ours, theirs):
        for key in STATS:
            assert mine[key] == pytest.approx(trl_row[key], abs=1e-4, rel=1e-5), (mine["step"], key, mine[key],
                                                                                   trl_row[key])
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.05, "the policy learned nothing: the test would not see a difference"
