"""The commands around VLM training (docs/vision.md): export, on the tests' tiny LLaVA (test_vision.build_llava).

* test_export_of_a_vlm_run_loads_as_a_vlm: a trained run's output_dir exported in bf16 loads back with
  AutoProcessor + AutoModelForImageTextToText and gives the run's logits on a prompt with an image, to bf16
  tolerance; its held-out pairs (with and without images) are measured through the processor.
* test_sample_with_images: prompt-only records with 0, 1, 2 images sampled through the processor with their
  pixel_values (transformers' generate's completions); samples and pairs keep the images, read back the same.
* test_eval_on_image_pairs_is_trainings_evaluation: eval on the run's held-out pairs = its last evaluation.
* test_eval_prompts_with_images: eval --prompts samples and scores prompts with their images.
* test_image_prompts_on_a_text_model_are_one_line.
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


REWARD = "def length(prompts, completions):\n    return [float(len(c)) for c in completions]\n"


def test_sample_with_images(llava_dir, demo_pairs, tmp_path, monkeypatch):
    """preftune sample on TRL-format prompts with 0, 1 and 2 images: each prompt is rendered by the processor and
    generated with its pixel_values (the completions of the two-image prompt are transformers' own generate on
    the processor's inputs, with the same seed), and the samples and pairs keep the images as paths, which the
    data reader reads back as the same images."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from preftune import vision
    from preftune.commands.sample import run
    from preftune.data import read_dataset

    pixels = []  # the pixel_values generate gets, per batch of one prompt x num_samples rows
    media = vision.media
    monkeypatch.setattr(vision, "media", lambda *a: pixels.append(media(*a).get("pixel_values")) or media(*a))

    pairs_file = write_vision_pairs(tmp_path / "data", demo_pairs[:3])  # pair i has i images
    data = tmp_path / "data" / "prompts.jsonl"  # prompt-only records: the images and the prompt
    data.write_text("".join(json.dumps({k: r[k] for k in ("images", "prompt")}) + "\n" for r in
                            map(json.loads, pairs_file.read_text().splitlines())))
    (tmp_path / "rewards.py").write_text(REWARD)
    cfg = from_dict({"model_name_or_path": str(llava_dir), "dataset": str(data), "num_samples": 3,
                     "max_new_tokens": 6, "per_device_eval_batch_size": 1, "reward": f"{tmp_path / 'rewards.py'}:length",
                     "output_dir": str(tmp_path / "out"), "infer_backend": "huggingface"})
    summary = run(cfg)
    assert pixels[0] is None and [tuple(p.shape) for p in pixels[1:]] == [(3, 3, 16, 16), (6, 3, 16, 16)]
    assert summary["prompts"] == 3 and summary["pairs"] == 3, summary
    records = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [len(r["images"]) for r in records] == [0, 1, 2]
    assert records[2]["images"] == [str((tmp_path / "data" / f"img_2_{k}.png").resolve()) for k in range(2)]

    # the two-image prompt (position 2, its own batch): transformers' generate on the processor's inputs
    processor = AutoProcessor.from_pretrained(llava_dir)
    model = AutoModelForImageTextToText.from_pretrained(llava_dir).eval()
    messages = records[2]["prompt"]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generate(images):
        inputs = processor(text=[text] * 3, images=[images] * 3, return_tensors="pt")
        torch.manual_seed(cfg.seed * 1_000_003 + 2)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=True, temperature=cfg.temperature, top_p=1.0, top_k=0,
                                 max_new_tokens=6, pad_token_id=processor.tokenizer.pad_token_id)
        return [processor.tokenizer.decode(row[inputs["input_ids"].shape[1]:], skip_special_tokens=True)
                for row in out]

    from PIL import Image

    files = [Image.open(path).convert("RGB") for path in records[2]["images"]]
    assert [c["text"] for c in records[2]["completions"]] == generate(files)

    pairs = read_dataset(str(tmp_path / "out" / "pairs.jsonl"), "data")
    originals = read_dataset(str(pairs_file), "data")
    assert [p.images for p in pairs] == [p.images or [] for p in originals]  # the same pixels (ImageRef digests)


def test_eval_on_image_pairs_is_trainings_evaluation(llava_run, tmp_path):
    """preftune eval on the run's held-out pairs (one with an image, one without), against the run's reference:
    the loss and accuracy training logged at its last evaluation."""
    from preftune.commands.eval import run
    from preftune.data import load_pairs
    from preftune.saved import run_config

    val = load_pairs(run_config(llava_run))[1]
    assert sorted(len(p.images or []) for p in val) == [0, 1]
    data = val[0].where.rsplit(":", 1)[0]
    lines = open(data).read().splitlines()
    heldout = type(tmp_path)(data).with_name("heldout.jsonl")  # beside the images its records name
    heldout.write_text("".join(lines[int(p.where.rsplit(":", 1)[1]) - 1] + "\n" for p in val))
    report = run(from_dict({"model_name_or_path": str(llava_run), "dataset": str(heldout),
                            "output_dir": str(tmp_path / "eval"), "per_device_eval_batch_size": 2}))
    pairs = report["models"][0]["pairs"]
    logged = [r for r in json.loads((llava_run / "dpo_metrics" / "log_history.json").read_text()) if "eval_loss" in r]
    assert pairs["pairs"] == 2
    assert pairs["loss"] == pytest.approx(logged[-1]["eval_loss"], abs=1e-5)
    assert pairs["rewards/accuracies"] == logged[-1]["eval_rewards/accuracies"]


def test_eval_prompts_with_images(llava_run, demo_pairs, tmp_path, monkeypatch):
    """preftune eval --prompts on prompts with 0, 1 and 2 images: the run and its reference sample them with their
    images (as preftune sample does) and the KL's log-probs of each sample are taken with its prompt's images (the
    pixel_values of every scoring batch); samples.jsonl keeps the images as paths."""
    from preftune import evaluate
    from preftune.commands.eval import run

    images_per_batch = []
    logps = evaluate.get_batch_logps

    def spy(*args, media=None, **kwargs):
        images_per_batch.append(0 if media is None else media["pixel_values"].shape[0])
        return logps(*args, media=media, **kwargs)

    monkeypatch.setattr(evaluate, "get_batch_logps", spy)
    pairs_file = write_vision_pairs(tmp_path / "data", demo_pairs[:3])  # pair i has i images
    data = tmp_path / "data" / "prompts.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("images", "prompt")}) + "\n" for r in
                            map(json.loads, pairs_file.read_text().splitlines())))
    (tmp_path / "rewards.py").write_text(REWARD)
    report = run(from_dict({"model_name_or_path": str(llava_run), "prompts": str(data), "num_samples": 2,
                            "max_new_tokens": 4, "per_device_eval_batch_size": 1, "output_dir": str(tmp_path / "eval"),
                            "reward": f"{tmp_path / 'rewards.py'}:length"}))
    stats = report["models"][0]["prompts"]
    assert stats["samples"] == 6 and stats["kl_per_sequence"] != 0.0, stats
    assert images_per_batch == [0, 0, 1, 1, 2, 2] * 2  # 3 prompts x 2 samples, one a batch: the policy's, the reference's
    records = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [len(r.get("images", [])) for r in records] == [0, 1, 2]
    assert records[2]["images"] == [str((tmp_path / "data" / f"img_2_{k}.png").resolve()) for k in range(2)]
    assert all(len(r["reference"]) == 2 and len(r["models"][str(llava_run)]) == 2 for r in records)


def test_image_prompts_on_a_text_model_are_one_line(tiny_model_dir, demo_pairs, tmp_path):
    from preftune.commands.sample import run
    from preftune.errors import DataError

    data = write_vision_pairs(tmp_path / "data", demo_pairs[:2])
    with pytest.raises(DataError, match=r"pairs.jsonl:2: a prompt with images, for a text-only model") as e:
        run(from_dict({"model_name_or_path": str(tiny_model_dir), "dataset": str(data), "num_samples": 2,
                       "output_dir": str(tmp_path / "out"), "infer_backend": "huggingface"}))
    assert "\n" not in str(e.value)
