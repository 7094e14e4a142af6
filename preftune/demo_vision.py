"""The vision demo's assets (`preftune demo --vision`): coloured shapes, questions whose preferred answer needs
the image, and a tiny Qwen2-VL made locally, no download.

Each image is one shape (square, circle or triangle) of one of COLOURS on a light background, its size and
place random. Every question asks for the shape's colour; the chosen answer names the shape's colour, the
rejected one another colour. The ordered (chosen, rejected) colour pairs are dealt in turn, so every colour is
chosen as often as it is rejected, against every other colour, under every question: the text alone (question
and both answers) tells nothing, and a model can only prefer the right answer by looking at the image. The pairs
are written in LLaMA-Factory's format (sharegpt, `<image>` placeholder, dataset_info.json with its `images`
column, image paths relative to the data folder), as a user's data would come.

The model (`build_model`) is a random-init Qwen2VLForConditionalGeneration saved as a Qwen2-VL checkpoint is:
config and weights, its PIL image processor's preprocessor_config.json, a BPE tokenizer with Qwen2-VL's vision
tokens and Qwen2-VL-Instruct's chat template, processor_config.json naming Qwen2VLProcessor. preftune loads it
without torchvision (vision.images_only).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# name -> RGB; far apart, so that a frozen random vision tower still tells them apart
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (235, 210, 40)}
SHAPES = ("square", "circle", "triangle")
QUESTIONS = ["What colour is the shape?", "What colour is the {shape}?", "Which colour is this {shape}?",
             "Tell me the colour of the shape in the picture."]
ANSWERS = ["It is {colour}.", "The {shape} is {colour}.", "{Colour}."]
IMAGE_SIZE = 64  # pixels a side: 8 x 8 patches of 8, merged 2 x 2 into 16 image tokens
DATASETS = {"train": "shapes_train", "val": "shapes_val"}  # names in data/dataset_info.json

# Qwen2-VL-Instruct's chat template, verbatim (its default system turn; an image part is
# <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to one <|image_pad|> per merged patch)
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
QWEN2VL_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]


def draw_shape(rng: random.Random, shape: str, colour: str):
    """A IMAGE_SIZE x IMAGE_SIZE RGB image: `shape` in `colour`, 7/16 to 13/16 of the image across, anywhere
    it fits, on a light grey background that varies a little."""
    from PIL import Image, ImageDraw

    grey = rng.randint(225, 250)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (grey, grey, grey))
    draw = ImageDraw.Draw(image)
    side = rng.randint(IMAGE_SIZE * 7 // 16, IMAGE_SIZE * 13 // 16)
    x, y = rng.randint(0, IMAGE_SIZE - side), rng.randint(0, IMAGE_SIZE - side)
    box = (x, y, x + side - 1, y + side - 1)
    if shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    elif shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    else:
        draw.polygon([(x + side // 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=COLOURS[colour])
    return image


def make_pairs(folder: Path, split: str, n: int, seed: int) -> list[dict]:
    """`n` pairs in LLaMA-Factory's sharegpt shape; their images are written to folder/images/<split>_<i>.png.
    Pair i takes the i-th ordered (chosen, rejected) colour pair in turn and the i-th question and answer
    wording in turn (a separate cycle, so each wording meets every colour pair), a random shape and place."""
    rng = random.Random(seed)
    ordered = [(c, r) for c in COLOURS for r in COLOURS if r != c]
    rng.shuffle(ordered)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n):
        chosen, rejected = ordered[i % len(ordered)]
        shape = rng.choice(SHAPES)
        name = f"images/{split}_{i:04d}.png"
        draw_shape(rng, shape, chosen).save(folder / name)
        question = QUESTIONS[(i // len(ordered)) % len(QUESTIONS)].format(shape=shape)
        answer = ANSWERS[(i // len(ordered)) % len(ANSWERS)]

        def say(colour):
            return answer.format(shape=shape, colour=colour, Colour=colour.capitalize())
        pairs.append({"conversations": [{"from": "human", "value": "<image>" + question}],
                      "chosen": {"from": "gpt", "value": say(chosen)},
                      "rejected": {"from": "gpt", "value": say(rejected)}, "images": [name]})
    return pairs


def write_data(folder: Path, n_train: int, n_val: int, seed: int) -> Path:
    """data/shapes_{train,val}.json, their images and dataset_info.json registering both under DATASETS' names
    (sharegpt, ranking, an `images` column); the held-out pairs have images of their own. Returns the folder."""
    info = {}
    for split, n, split_seed in (("train", n_train, seed), ("val", n_val, seed + 1)):
        file_name = f"shapes_{split}.json"
        (folder / file_name).parent.mkdir(parents=True, exist_ok=True)
        pairs = make_pairs(folder, split, n, split_seed)
        (folder / file_name).write_text(json.dumps(pairs, indent=1), encoding="utf-8")
        info[DATASETS[split]] = {"file_name": file_name, "formatting": "sharegpt", "ranking": True,
                                 "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected",
                                             "images": "images"}}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return folder


def texts() -> list[str]:
    """Every text the model reads, for its tokenizer: the questions, the answers, the default system turn."""
    out = ["system", "user", "assistant", "You are a helpful assistant."]
    for shape in SHAPES:
        out += [q.format(shape=shape) for q in QUESTIONS]
        out += [a.format(shape=shape, colour=c, Colour=c.capitalize()) for a in ANSWERS for c in COLOURS]
    return out


def build_model(folder: Path, seed: int, hidden: int = 64, layers: int = 2) -> Path:
    """A random-init Qwen2-VL saved in `folder` with its processor's files (module docstring): a 1-block vision
    tower on 8x8 patches merged 2x2, a `layers`-layer text model of `hidden` width with M-RoPE."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from preftune.demo import build_tokenizer

    tokenizer = build_tokenizer(texts(), vocab_size=1024)  # more than the texts need: a word is a token
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN2VL_VISION_TOKENS})
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tokenizer.convert_tokens_to_ids(QWEN2VL_VISION_TOKENS)))
    text = {"vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id,
            # M-RoPE: the rotary halves of a head (hidden / 4 / 2) split over time, height and width
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                "mrope_section": [hidden // 32, hidden // 32, hidden // 8 - 2 * (hidden // 32)]}}
    vision = {"depth": 1, "embed_dim": 32, "hidden_size": hidden, "num_heads": 2, "mlp_ratio": 2,
              "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2}
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(Qwen2VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True,
                                                  **ids)).save_pretrained(folder)
    # 8x8 patches merged 2x2: sides a multiple of 16 pixels, up to IMAGE_SIZE x IMAGE_SIZE
    Qwen2VLImageProcessorPil(size={"shortest_edge": 16 * 16, "longest_edge": IMAGE_SIZE * IMAGE_SIZE}, patch_size=8,
                             merge_size=2, temporal_patch_size=2).save_pretrained(folder)
    tokenizer.chat_template = QWEN2VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    # what a Qwen2-VL checkpoint's processor files say (written by hand: building the processor needs torchvision)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    (folder / "chat_template.jinja").write_text(QWEN2VL_CHAT_TEMPLATE)
    return folder
