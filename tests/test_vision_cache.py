"""The tokenization cache and checkpoints of a vision-language model's run (docs/vision.md), on the tiny LLaVA of
tests/test_vision.py (8 pairs with 0, 1 and 2 images).

* test_second_run_reads_pairs_and_images_from_the_cache: a second run makes no processor call and opens no image
  file (the ids and the resized pixels come from the cache file) and logs the same numbers; a recoloured image, or
  another image_max_pixels, misses the cache; so does another processor setting (its key).
* test_checkpoints_hold_the_processor_and_resume_exactly: checkpoint-<step>/ and best_model/ load with
  AutoProcessor as the model's processor; a run stopped after its checkpoint at step 1 and resumed equals the
  uninterrupted 2-step run (rows and weights).
"""

import json

import numpy
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from preftune import cache as cache_mod
from preftune import checkpoints, vision
from preftune import train as train_mod
from preftune.config import from_dict
from preftune.data.images import ImageRef, StoredPixels
from test_vision import build_llava, square, write_vision_pairs

TIMING = {"tokens_per_second"}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tiny_tokenizer):
    return build_llava(tiny_tokenizer, tmp_path_factory.mktemp("llava"))


def run_cfg(llava_dir, data, out, **over):
    return from_dict({
        "model_name_or_path": str(llava_dir), "dataset": str(data), "torch_dtype": "float32", "progress_bar": False,
        "plot_loss": False, "save_strategy": "no", "output_dir": str(out), "learning_rate": 0.05,
        "per_device_train_batch_size": 4, "max_steps": 2, "logging_steps": 1, **over})


def history(out):
    rows = json.loads((out / "dpo_metrics" / "log_history.json").read_text())
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_second_run_reads_pairs_and_images_from_the_cache(llava_dir, demo_pairs, tmp_path, monkeypatch):
    encoded, opened = [], []  # pairs through the processor; image files opened (the data read opens bytes)
    real_encode, real_open = vision.encode_vision_pair, PIL.Image.open

    def counting_encode(*args, **kwargs):
        encoded.append(1)
        return real_encode(*args, **kwargs)

    def counting_open(fp, *args, **kwargs):
        if isinstance(fp, str):
            opened.append(fp)
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(vision, "encode_vision_pair", counting_encode)
    monkeypatch.setattr(PIL.Image, "open", counting_open)
    data = write_vision_pairs(tmp_path / "data", demo_pairs[:8])  # 8 images in 5 pairs
    cache = tmp_path / "cache"

    train_mod.train(run_cfg(llava_dir, data, tmp_path / "first", tokenized_cache_dir=str(cache)))
    assert len(encoded) == 8 and len(opened) > 8  # tokenizing, storing and each batch read the files
    (file,) = cache.glob("*.safetensors")
    stored = {k: v for k, v in load_file(file).items() if k.startswith("image.")}
    # each distinct image once (equal squares in several pairs are one), as the model gets it: (H, W, RGB) bytes
    assert 1 < len(stored) <= 8 and {(v.shape, v.dtype) for v in stored.values()} == \
        {((24, 20, 3), torch.uint8), ((24, 24, 3), torch.uint8)}

    # a stored image as a batch reads it; where the cache file does not give it, the image file instead
    name = next(iter(stored))
    ref = ImageRef(StoredPixels(str(file), name, "RGB", "unused"), "d", tuple(stored[name].shape[1::-1]))
    assert torch.equal(torch.from_numpy(numpy.asarray(ref.load())), stored[name])
    png = tmp_path / "data" / "img_1_0.png"
    for source in (StoredPixels(str(file), "image.absent", "RGB", str(png)),
                   StoredPixels(str(tmp_path / "gone.safetensors"), name, "RGB", str(png))):
        assert numpy.array_equal(numpy.asarray(ImageRef(source, "d", (20, 24)).load()),
                                 numpy.asarray(real_open(png).convert("RGB")))

    encoded.clear(), opened.clear()
    train_mod.train(run_cfg(llava_dir, data, tmp_path / "second", tokenized_cache_dir=str(cache)))
    assert encoded == [] and opened == []  # no processor call, no image file read or resized
    assert history(tmp_path / "second") == history(tmp_path / "first")  # the same numbers, exactly
    assert [r["step"] for r in history(tmp_path / "first")] == [1, 2]

    square((90, 30, 200), (20, 24)).save(tmp_path / "data" / "img_4_0.png")  # pair 4's image, another colour
    train_mod.train(run_cfg(llava_dir, data, tmp_path / "recoloured", tokenized_cache_dir=str(cache), max_steps=1))
    assert len(encoded) == 8 and len(list(cache.glob("*.safetensors"))) == 2
    encoded.clear()
    train_mod.train(run_cfg(llava_dir, data, tmp_path / "bounded", tokenized_cache_dir=str(cache), max_steps=1,
                            image_max_pixels=400, image_min_pixels=16))  # 20x24 images become 18x21: another key
    assert len(encoded) == 8 and len(list(cache.glob("*.safetensors"))) == 3

    cfg = run_cfg(llava_dir, data, tmp_path / "unused")  # the processor's settings are in the key too
    processor = vision.load_processor(cfg)
    keys = {cache_mod.vision_cache_key(processor, [], cfg)}
    processor.image_processor.image_mean = [0.5, 0.5, 0.5]  # pixel_values change, the token ids do not
    keys.add(cache_mod.vision_cache_key(processor, [], cfg))
    processor.chat_template += " "
    keys.add(cache_mod.vision_cache_key(processor, [], cfg))
    assert len(keys) == 3


class Killed(Exception):
    pass


def test_checkpoints_hold_the_processor_and_resume_exactly(llava_dir, demo_pairs, tmp_path, monkeypatch):
    from transformers import AutoProcessor

    data = write_vision_pairs(tmp_path / "data", demo_pairs[:8])
    val = write_vision_pairs(tmp_path / "val", demo_pairs[8:12])

    def cfg(out, **over):  # a checkpoint at each step, evaluations keeping the best model
        return run_cfg(llava_dir, data, tmp_path / out, save_strategy="steps", save_steps=1, eval_dataset=str(val),
                       eval_steps=1, load_best_model_at_end=True, dropout=0.1, tokenized_cache_dir=str(tmp_path / "c"),
                       **over)

    train_mod.train(cfg("whole"))
    real_save = checkpoints.save_checkpoint

    def save_then_die(*args):
        real_save(*args)
        if args[6] == 1:
            raise Killed

    monkeypatch.setattr(checkpoints, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_mod.train(cfg("resumed"))
    monkeypatch.undo()
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    summary = train_mod.train(cfg("resumed", resume_from_checkpoint=True))
    assert summary["resumed_from"]["step"] == 1
    assert history(tmp_path / "resumed") == history(tmp_path / "whole")
    ours, theirs = load_file(tmp_path / "resumed" / "model.safetensors"), load_file(tmp_path / "whole" /
                                                                                   "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    # the best evaluation was step 1's: the final model is best_model/'s, loaded back into the policy
    assert json.loads((tmp_path / "resumed" / "best_model" / "preftune_step.json").read_text())["step"] == 1
    best = load_file(tmp_path / "resumed" / "best_model" / "model.safetensors")
    assert best.keys() == ours.keys() and all(torch.equal(best[k], ours[k]) for k in ours)
    for folder in ("checkpoint-1", "checkpoint-2", "best_model", "."):
        processor = AutoProcessor.from_pretrained(tmp_path / "resumed" / folder)
        assert type(processor).__name__ == "LlavaProcessor" and processor.image_token == "<image>", folder
        assert processor.image_processor.crop_size == {"height": 16, "width": 16}
