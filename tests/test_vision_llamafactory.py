"""LLaMA-Factory's image data (preftune/data/images.py, records.py, registry.py; docs/vision.md).

Its sharegpt and alpaca ranking shapes with an `images` column and `<image>` placeholders, registered in
dataset_info.json with relative paths (read from media_dir, which defaults to dataset_dir), read into the
pairs TRL's vision format gives; the tiny LLaVA of test_vision.py. 6 pairs, pair i with i % 3 coloured
rectangles of 40x36 and 44x36 pixels (inside LLaMA-Factory's default bounds: not resized), so text-only
pairs are mixed in and some prompts have two images.

* test_both_shapes_equal_trl_format: the same token ids, completion starts and pixel_values as TRL's format.
* test_one_step_equals_trl_format: one training step on the sharegpt entry equals one on TRL's file.
* test_bad_records_are_one_line: a placeholder count that differs from the images, a missing file, a
  placeholder in a completion, a videos column: one line naming the record (and the file).
* test_resize_is_llamafactorys: image_max_pixels / image_min_pixels, and their defaults per format.
* test_inspect_reports_images: counts per pair, sizes, and the processor's tokens per image.
"""

import json
import math

import pytest
import torch

from preftune.config import from_dict
from test_vision import COLOURS, build_llava, square

SHAREGPT = {"file_name": "lf_sharegpt.json", "ranking": True, "formatting": "sharegpt",
            "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "images": "images"}}


ALPACA = {"file_name": "lf_alpaca.jsonl", "ranking": True,
          "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected", "images": "images"}}


def write_data(folder, pairs: list[dict], extra_sharegpt: list[dict] = ()) -> dict:
    """The pairs three ways in `folder`: TRL's format (trl.jsonl, paths relative to its folder) and
    LLaMA-Factory's sharegpt and alpaca entries of dataset_info.json (paths relative to media_dir)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    trl, sharegpt, alpaca = [], [], []
    for i, p in enumerate(pairs):
        images = []
        for k in range(i % 3):
            name = f"img/p{i}_{k}.png"
            square(COLOURS[(i + 2 * k) % len(COLOURS)], (40 + 4 * k, 36)).save(folder / name)
            images.append(name)
        parts = [{"type": "image"} for _ in images] + [{"type": "text", "text": p["prompt"]}]
        trl.append({"images": images, "prompt": [{"role": "user", "content": parts}],
                    "chosen": [{"role": "assistant", "content": p["chosen"]}],
                    "rejected": [{"role": "assistant", "content": p["rejected"]}]})
        text = "<image>" * len(images) + p["prompt"]
        sharegpt.append({"conversations": [{"from": "human", "value": text}], "images": images,
                         "chosen": {"from": "gpt", "value": p["chosen"]},
                         "rejected": {"from": "gpt", "value": p["rejected"]}})
        alpaca.append({"instruction": text, "input": "", "chosen": p["chosen"], "rejected": p["rejected"],
                       "images": images})
    (folder / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl))
    (folder / "lf_sharegpt.json").write_text(json.dumps(sharegpt + list(extra_sharegpt)))
    (folder / "lf_alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    (folder / "dataset_info.json").write_text(json.dumps({"lf_sharegpt": SHAREGPT, "lf_alpaca": ALPACA}))
    return {"trl": str(folder / "trl.jsonl"), "sharegpt": "lf_sharegpt", "alpaca": "lf_alpaca",
            "sharegpt_file": str(folder / "lf_sharegpt.json")}  # a plain file in its shape, without the entry


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tiny_tokenizer):
    """test_vision.py's tiny LLaVA and its processor."""
    return build_llava(tiny_tokenizer, tmp_path_factory.mktemp("llava"))


def _read(spec, folder, **keys):
    from preftune.data import read_dataset
    from preftune.data.images import image_options

    cfg = from_dict({"dataset_dir": str(folder), **keys})
    return read_dataset(spec, cfg.dataset_dir, images=image_options(cfg))


def test_both_shapes_equal_trl_format(llava_dir, demo_pairs, tmp_path):
    """Both LLaMA-Factory shapes (entries of dataset_info.json, and a plain sharegpt file) read into TRL's pairs:
    the same images (by pixels), token ids, completion starts and pixel_values."""
    from transformers import AutoProcessor

    from preftune.vision import collate_vision, tokenize_vision_pairs

    specs = write_data(tmp_path / "data", demo_pairs[:6])
    processor = AutoProcessor.from_pretrained(llava_dir)
    cfg = from_dict({"cutoff_len": 4096})
    out = {}
    for name, spec in specs.items():
        pairs = _read(spec, tmp_path / "data")
        assert [len(p.images) for p in pairs] == [0, 1, 2, 0, 1, 2], name
        items = tokenize_vision_pairs(processor, pairs, cfg)
        out[name] = (pairs, items, collate_vision(items, processor.tokenizer.pad_token_id, processor=processor))
    trl_pairs, trl_items, trl_batch = out["trl"]
    assert trl_batch["pixel_values"].shape[0] == 6  # each pair's images, once
    for name in ("sharegpt", "alpaca", "sharegpt_file"):
        pairs, items, batch = out[name]
        assert [p.images for p in pairs] == [p.images for p in trl_pairs]  # ImageRefs compare by pixels
        assert [(t.chosen_ids, t.chosen_start, t.rejected_ids, t.rejected_start) for t in items] == \
            [(t.chosen_ids, t.chosen_start, t.rejected_ids, t.rejected_start) for t in trl_items], name
        assert batch.keys() == trl_batch.keys()
        for key in batch:
            assert torch.equal(batch[key], trl_batch[key]), (name, key)


def test_one_step_equals_trl_format(llava_dir, demo_pairs, tmp_path):
    """One DPO step on the sharegpt entry (relative paths read from dataset_dir) logs what one step on the same
    pairs in TRL's format logs."""
    from preftune import train as train_mod

    specs = write_data(tmp_path / "data", demo_pairs[:6])
    logged = {}
    for name in ("trl", "sharegpt"):
        train_mod.train(from_dict({"model_name_or_path": str(llava_dir), "dataset": specs[name],
                                   "dataset_dir": str(tmp_path / "data"), "torch_dtype": "float32", "max_steps": 1,
                                   "per_device_train_batch_size": 6, "learning_rate": 0.5, "optim": "sgd",
                                   "progress_bar": False, "plot_loss": False, "save_strategy": "no",
                                   "output_dir": str(tmp_path / name)}))
        rows = json.loads((tmp_path / name / "dpo_metrics" / "log_history.json").read_text())
        logged[name] = next(r for r in rows if "loss" in r)
    for key in ("loss", "logps/chosen", "logps/rejected", "grad_norm"):
        assert logged["sharegpt"][key] == logged["trl"][key], key
    assert logged["trl"]["grad_norm"] > 0


def _bad(folder, pairs, case: str) -> tuple[str, dict]:
    record = {"conversations": [{"from": "human", "value": "<image>What colour is it?"}], "images": ["img/p1_0.png"],
              "chosen": {"from": "gpt", "value": "Red."}, "rejected": {"from": "gpt", "value": "Blue."}}
    entry = "lf_sharegpt"
    if case == "two_placeholders":
        record["conversations"][0]["value"] = "<image>What colour is <image>?"
    elif case == "missing":
        record["images"] = ["img/nowhere.png"]
    elif case == "placeholder_in_chosen":
        record["chosen"]["value"] = "Red, as <image> shows."
    write_data(folder, pairs, [record])
    if case == "videos_column":
        info = json.loads((folder / "dataset_info.json").read_text())
        info["lf_sharegpt"]["columns"]["videos"] = "videos"
        (folder / "dataset_info.json").write_text(json.dumps(info))
    return entry, record


@pytest.mark.parametrize("case, message", [
    ("two_placeholders", r"lf_sharegpt.json record 3: 2 '<image>' placeholder\(s\) in the messages but 1 image\(s\) "
                         r"in 'images'; give one image per placeholder"),
    ("missing", r"lf_sharegpt.json record 3: image 0: no such file 'img/nowhere.png' \(looked in media_dir '.*data', "
                r"then from the current folder"),
    ("placeholder_in_chosen", r"lf_sharegpt.json record 3: the chosen answer holds '<image>'"),
    ("videos_column", r"entry 'lf_sharegpt': column 'videos': videos are not supported \(images are"),
])
def test_bad_records_are_one_line(case, message, demo_pairs, tmp_path):
    from preftune.errors import DataError

    entry, _ = _bad(tmp_path / "data", demo_pairs[:3], case)
    with pytest.raises(DataError, match=message) as raised:
        _read(entry, tmp_path / "data")
    assert "\n" not in str(raised.value)


def test_resize_is_llamafactorys(tmp_path):
    """LLaMA-Factory's _preprocess_image: above image_max_pixels scaled down, below image_min_pixels scaled up, the
    aspect ratio kept and each side rounded down; defaults 768*768 and 32*32 for its format, none for TRL's; the
    pixels a batch gets are those of the size decided when the data was read."""
    from PIL import Image

    from preftune.data.images import ImageOptions, image_ref, resize

    big, small = square(COLOURS[1], (1200, 900)), square(COLOURS[2], (20, 10))
    big.save(tmp_path / "big.png")
    small.save(tmp_path / "small.png")

    def lf_size(w, h, bound):  # the formula, written out
        f = math.sqrt(bound / (w * h))
        return int(w * f), int(h * f)

    def read(name, llamafactory, **bounds):
        return image_ref(name, "r", 0, tmp_path, ImageOptions(str(tmp_path), None, **bounds), llamafactory)

    assert read("big.png", True).size == lf_size(1200, 900, 768 * 768) == (886, 665)
    assert read("small.png", True).size == lf_size(20, 10, 32 * 32) == (45, 22)
    assert read("big.png", True, max_pixels=10_000).size == (115, 86)
    assert read("small.png", True, min_pixels=4096).size == lf_size(20, 10, 4096)
    assert read("big.png", False).size == (1200, 900) and read("small.png", False).size == (20, 10)  # TRL's: as is
    assert read("big.png", False, max_pixels=10_000).size == (115, 86)  # unless a bound is set
    ref = read("big.png", True, max_pixels=10_000)
    loaded = ref.load()
    assert loaded.size == (115, 86) and loaded.mode == "RGB"
    assert loaded.tobytes() == big.resize((115, 86)).tobytes() == resize(Image.open(tmp_path / "big.png"),
                                                                         10_000, None).tobytes()
    assert read("big.png", True, max_pixels=10_000).digest != read("big.png", True).digest  # fingerprints see it
    from preftune.errors import ConfigError

    with pytest.raises(ConfigError, match="image_max_pixels 512 is smaller than image_min_pixels 1024"):
        from_dict({"image_max_pixels": 512})


def test_inspect_reports_images(llava_dir, demo_pairs, tmp_path):
    """inspect on LLaMA-Factory image data: images per pair and their sizes; with the VLM, the processor's tokens
    per image (4 for the tiny LLaVA: (16 / 8)^2 patches) and pairs rendered by its processor."""
    from preftune.commands.inspect import format_report, inspect_data

    specs = write_data(tmp_path / "data", demo_pairs[:6])
    cfg = {"dataset": specs["sharegpt"], "dataset_dir": str(tmp_path / "data")}
    stats = inspect_data(from_dict(cfg))
    images = stats["images"]
    assert images["total"] == 6 and images["per_pair"] == {"0": 2, "1": 2, "2": 2}
    assert images["width"]["min"] == 40 and images["width"]["max"] == 44 and images["height"]["max"] == 36
    assert "tokens_per_image" not in images
    assert "images: 6 (6 distinct); pairs with 0 images: 2, 1 image: 2, 2 images: 2" in format_report(stats)
    stats = inspect_data(from_dict({**cfg, "model_name_or_path": str(llava_dir)}))
    assert stats["images"]["tokens_per_image"]["min"] == stats["images"]["tokens_per_image"]["max"] == 4
    assert stats["images"]["image_tokens_per_pair"]["max"] == 8
    assert stats["untokenizable"]["count"] == 0 and stats["examples"][2]["images"] == 2
    assert stats["examples"][2]["chosen"].count("<image>") == 8  # the processor's expansion, before the boundary
    assert "tokens per image" in format_report(stats)
