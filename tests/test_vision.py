"""DPO on vision-language pairs (preftune/vision.py, preftune/data/images.py; docs/vision.md).

A tiny random-init LLaVA (a CLIP vision tower, 16x16 images in 4 patches of 8x8, and a Qwen2 text model
on the tests' tokenizer with an `<image>` token), built here and saved with its LlavaProcessor (the PIL
CLIP image processor: no torchvision). Pairs in TRL's vision format, with coloured squares as images:
0, 1 or 2 images per pair, so text-only pairs are mixed in and some prompts have two images.

* test_steps_match_trl: 3 steps of preftune train and of TRL 1.16's DPOTrainer on the same model folder,
  data and optimizer: the same loss and statistics at every step.
* test_image_and_prompt_tokens_are_never_scored: the completion mask covers the completion only; every
  image token and prompt token is outside it, and an image changes the completion's log-probs.
* test_freeze_keys: LLaMA-Factory's freeze_vision_tower, freeze_multi_modal_projector, freeze_language_model,
  for full fine-tuning (which weights train) and LoRA (which modules get adapters; the reference is the policy
  with its adapter off, through the whole multimodal backbone).
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


def trl_vision_rows(model_dir, processor, data, tmp_path, common) -> list[dict]:
    """TRL 1.16's DPOTrainer on the pairs of `data` (their images opened as PIL images, as TRL takes them) with the
    settings `common` shares with the preftune run: its logged training rows."""
    import datasets
    import trl
    from PIL import Image

    records = [json.loads(line) for line in data.read_text().splitlines()]
    for r in records:
        r["images"] = [Image.open(data.parent / name).copy() for name in r["images"]]
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type="sigmoid", weight_decay=0.0,
                         report_to="none", max_length=None, use_cpu=True, save_strategy="no", seed=0, bf16=False,
                         dataloader_num_workers=0, activation_checkpointing=False,
                         model_init_kwargs={"dtype": torch.float32}, **common)
    trainer = trl.DPOTrainer(model=str(model_dir), args=args, train_dataset=datasets.Dataset.from_list(records),
                             processing_class=processor)
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r and "rewards/chosen" in r]


def assert_trl_rows(ours: list[dict], theirs: list[dict]) -> None:
    """preftune's rows equal TRL's at steps 1-3 (STATS within 1e-4; accuracies past step 1), and the policy learned."""
    assert [r["step"] for r in ours] == [r["step"] for r in theirs] == [1, 2, 3]
    for mine, trl_row in zip(ours, theirs):
        for key in STATS:
            assert mine[key] == pytest.approx(trl_row[key], abs=1e-4, rel=1e-5), (mine["step"], key, mine[key],
                                                                                   trl_row[key])
        if mine["step"] > 1:  # at step 1 policy = reference: every pair a tie, 0.5 here, 0 in TRL (trl-differences.md)
            assert mine["rewards/accuracies"] == trl_row["rewards/accuracies"]
    assert ours[-1]["loss"] < ours[0]["loss"] - 0.05, "the policy learned nothing: the test would not see a difference"


def test_steps_match_trl(llava_dir, demo_pairs, tmp_path):
    """3 steps of preftune train and of TRL 1.16's DPOTrainer on the same tiny LLaVA, pairs and images (8 pairs
    in one batch: 3 with no image, 3 with one, 2 with two; SGD at a constant rate, so float noise stays noise):
    the same loss, rewards, log-probs and gradient norm at every step, within 1e-4."""
    from transformers import AutoProcessor

    from preftune import train as train_mod

    pairs = demo_pairs[:8]
    data = write_vision_pairs(tmp_path / "data", pairs)
    common = {"learning_rate": 0.5, "optim": "sgd", "lr_scheduler_type": "constant", "max_grad_norm": 0,
              "per_device_train_batch_size": 8, "max_steps": 3, "logging_steps": 1}
    train_mod.train(from_dict({"model_name_or_path": str(llava_dir), "dataset": str(data), "torch_dtype": "float32",
                               "progress_bar": False, "plot_loss": False, "save_strategy": "no",
                               "output_dir": str(tmp_path / "ours"), **common,
                               # TRL trains every weight; LLaMA-Factory's defaults (and preftune's) freeze these
                               "freeze_vision_tower": False, "freeze_multi_modal_projector": False}))
    ours = [r for r in json.loads((tmp_path / "ours" / "dpo_metrics" / "log_history.json").read_text()) if "loss" in r]

    assert_trl_rows(ours, trl_vision_rows(llava_dir, AutoProcessor.from_pretrained(llava_dir), data, tmp_path, common))


def collated_with_trl(processor, examples, items) -> tuple[dict, dict]:
    """preftune's batch of `items` and TRL's vision collator's batch of the same `examples` (rebuilt in TRL's format)."""
    import trl.trainer.dpo_trainer as trl_dpo

    from preftune.vision import collate_vision

    batch = collate_vision(items, processor.tokenizer.pad_token_id, processor=processor)
    trl_rows = [{"images": [ref.load() for ref in e.images],
                 "prompt": [{"role": "user", "content": e.messages[0]["content"]}],
                 "chosen": [{"role": "assistant", "content": e.chosen}],
                 "rejected": [{"role": "assistant", "content": e.rejected}]} for e in examples]
    return batch, trl_dpo.DataCollatorForVisionPreference(processor)(trl_rows)


def _vision_items(llava_dir, pairs, folder):
    from transformers import AutoProcessor

    from preftune.data import read_dataset
    from preftune.vision import tokenize_vision_pairs

    processor = AutoProcessor.from_pretrained(llava_dir)
    examples = read_dataset(str(write_vision_pairs(folder, pairs)), "data")
    cfg = from_dict({"cutoff_len": 4096})
    return processor, examples, tokenize_vision_pairs(processor, examples, cfg)


def test_image_and_prompt_tokens_are_never_scored(llava_dir, demo_pairs, tmp_path):
    """The completion mask is exactly the completion: its ids are TRL's completion ids, the ids before it
    TRL's prompt ids (image tokens expanded by the processor: 4 per image), and no image token is ever in
    it. The image reaches the completion's log-probs: another colour changes them, and a text-only pair's
    are those of the language model alone."""
    from transformers import AutoModelForImageTextToText

    from preftune.logps import get_batch_logps, model_inputs

    processor, examples, items = _vision_items(llava_dir, demo_pairs[:6], tmp_path / "data")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    batch, theirs = collated_with_trl(processor, examples, items)
    # TRL's collator gives each row's images, so each pair's twice; preftune gives them once (encoded once, placed in
    # both rows: tests/test_vision_encode_once.py)
    assert batch["pixel_values"].shape[0] == sum(len(e.images) for e in examples) == 6
    torch.testing.assert_close(batch["pixel_values"].repeat(2, 1, 1, 1), theirs["pixel_values"], rtol=0, atol=0)
    for row in range(12):
        ids, mask = batch["input_ids"][row], batch["completion_mask"][row].bool()
        t_ids = theirs["input_ids"][row][theirs["attention_mask"][row].bool()]
        t_mask = theirs["completion_mask"][row][theirs["attention_mask"][row].bool()].bool()
        n = int(batch["attention_mask"][row].sum())
        assert ids[:n].tolist() == t_ids.tolist() and mask[:n].tolist() == t_mask.tolist(), row
        assert not mask[n:].any()  # padding is never scored
        assert mask[:n].nonzero().min() == (~mask[:n]).sum()  # one span: the completion, after every prompt token
        assert (ids[mask] != image_id).all()
        assert (ids == image_id).sum() == 4 * len(examples[row % 6].images)

    model = AutoModelForImageTextToText.from_pretrained(llava_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logps = get_batch_logps(model, **model_inputs(batch)).logps
        other = [type(ref)(square((60, 60, 60)), ref.digest + "x", ref.size) for e in examples for ref in e.images]
        recoloured = batch | processor.image_processor(images=[ref.load() for ref in other], return_tensors="pt")
        changed = get_batch_logps(model, **model_inputs(recoloured)).logps
        text_only = [i for i, e in enumerate(examples) if not e.images]
        text_batch = {k: batch[k][text_only + [6 + i for i in text_only]] for k in ("input_ids", "attention_mask",
                                                                                      "completion_mask")}
        alone = get_batch_logps(model, **model_inputs(text_batch)).logps  # the language model alone
    with_images = torch.tensor([bool(examples[i % 6].images) for i in range(12)])
    assert ((logps - changed).abs() > 1e-4)[with_images].all()
    assert torch.equal(logps[~with_images], changed[~with_images])
    torch.testing.assert_close(alone, logps[~with_images], rtol=1e-5, atol=1e-4)


def _bad_record(folder, case: str) -> dict:
    """A record of TRL's vision format broken as `case` says."""
    folder.mkdir(parents=True, exist_ok=True)
    square(COLOURS[0]).save(folder / "good.png")
    (folder / "notes.png").write_text("not an image")
    (folder / "cut.png").write_bytes((folder / "good.png").read_bytes()[:60])
    image = {"missing": "nowhere.png", "not_an_image": "notes.png", "truncated": "cut.png"}.get(case, "good.png")
    parts = [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]
    if case == "two_placeholders":
        parts = [{"type": "image"}] + parts
    if case == "literal_placeholder":
        parts = parts[:1] + [{"type": "text", "text": "What colour is <image>?"}]
    return {"images": [image], "prompt": [{"role": "user", "content": parts}],
            "chosen": [{"role": "assistant", "content": "Red."}],
            "rejected": [{"role": "assistant", "content": "Blue."}]}


@pytest.mark.parametrize("case, message", [
    ("missing", r"pairs.jsonl:1: image 0: no such file '.*nowhere.png' \(a relative path is read from the data "
                r"file's folder\)"),
    ("not_an_image", r"pairs.jsonl:1: image 0 '.*notes.png' is not a readable image"),
    ("truncated", r"pairs.jsonl:1: image 0 '.*cut.png' is not a readable image"),
    ("two_placeholders", r"pairs.jsonl:1: 2 image placeholder\(s\) .* but 1 image\(s\) in 'images'"),
    ("literal_placeholder", r"pairs.jsonl:1: the rendered prompt holds 2 image token\(s\) '<image>' for 1 image"),
    ("text_only_model", r"pairs.jsonl:1: a pair with 1 image\(s\), read as text: the model is a text-only one"),
])
def test_bad_images_are_one_line(case, message, llava_dir, tiny_model_dir, tmp_path):
    """Each bad image is one line naming the record (and the file), before any training step."""
    from preftune import train as train_mod
    from preftune.errors import DataError

    folder = tmp_path / "data"
    record = _bad_record(folder, case)
    (folder / "pairs.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(_bad_record(folder, "good")) + "\n")
    model = tiny_model_dir if case == "text_only_model" else llava_dir
    with pytest.raises(DataError, match=message) as raised:
        train_mod.train(from_dict({"model_name_or_path": str(model), "dataset": str(folder / "pairs.jsonl"),
                                   "output_dir": str(tmp_path / "out"), "max_steps": 1, "progress_bar": False}))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out" / "dpo_metrics").exists()


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_freeze_keys(finetuning_type, llava_dir, demo_pairs, tmp_path):
    """Defaults (LLaMA-Factory's): the language model trains, the vision tower and projector do not; each key
    turns its part on or off. LoRA: adapters only in the parts that train; one step runs against the adapter-off
    reference, whose log-probs at step 1 equal the policy's (loss log 2), and the merged output loads with
    its processor, changed in the trained parts only."""
    from preftune import train as train_mod
    from preftune.models import load_policy

    def trained(**keys):
        policy = load_policy(from_dict({"model_name_or_path": str(llava_dir), "finetuning_type": finetuning_type,
                                        **keys}))
        names = [n for n, p in policy.named_parameters() if p.requires_grad]
        return {part for part in ("vision_tower", "multi_modal_projector", "language_model") if
                any(f".{part}." in n for n in names)}

    assert trained() == {"language_model"}
    assert trained(freeze_vision_tower=False) == {"vision_tower", "language_model"}
    assert trained(freeze_multi_modal_projector=False, freeze_language_model=True) == {"multi_modal_projector"}
    if finetuning_type == "lora":
        data = write_vision_pairs(tmp_path / "data", demo_pairs[:5])
        train_mod.train(from_dict({"model_name_or_path": str(llava_dir), "dataset": str(data), "max_steps": 1,
                                   "finetuning_type": "lora", "freeze_vision_tower": False, "progress_bar": False,
                                   "plot_loss": False, "save_strategy": "no", "output_dir": str(tmp_path / "out"),
                                   "torch_dtype": "float32", "per_device_train_batch_size": 3, "val_size": 2}))
        rows = json.loads((tmp_path / "out" / "dpo_metrics" / "log_history.json").read_text())
        row = next(r for r in rows if "loss" in r)
        assert row["loss"] == pytest.approx(0.693147, abs=1e-6) and row["grad_norm"] > 0
        # evaluation with images too (the held-out pairs have 1 and 0 images): at step 0 the policy is its reference
        assert rows[0]["step"] == 0 and rows[0]["eval_loss"] == pytest.approx(0.693147, abs=1e-6)
        assert rows[0]["eval_kl_per_token"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["eval_loss"] < 0.7
        # the output (merged) loads as the vision-language model it is, with its processor
        from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaProcessor

        assert isinstance(AutoProcessor.from_pretrained(tmp_path / "out"), LlavaProcessor)
        merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
        start = AutoModelForImageTextToText.from_pretrained(llava_dir)
        moved = {n for n, p in merged.named_parameters() if not torch.equal(p, start.get_parameter(n))}
        assert moved and all(".language_model." in n or ".vision_tower." in n for n in moved), sorted(moved)[:5]


def test_images_from_a_datasets_folder_are_the_files_images(llava_dir, demo_pairs, tmp_path):
    """The datasets Image feature (a save_to_disk folder, images embedded as bytes) reads into the same pairs,
    the same ids and the same image digests (fingerprints) as the files it was made from."""
    import datasets

    from preftune.cache import data_fingerprint

    processor, from_files, items = _vision_items(llava_dir, demo_pairs[:5], tmp_path / "files")
    records = vision_records(demo_pairs[:5], tmp_path / "files", paths=False)
    features = datasets.Dataset.from_list(records).features.copy()
    features["images"] = datasets.Sequence(datasets.Image())
    datasets.Dataset.from_list(records, features=features).save_to_disk(str(tmp_path / "hf"))
    from preftune.data import read_dataset
    from preftune.vision import tokenize_vision_pairs

    from_folder = read_dataset(str(tmp_path / "hf"), "data")
    assert [len(p.images) for p in from_folder] == [0, 1, 2, 0, 1]
    assert not any(isinstance(ref.source, str) for p in from_folder for ref in p.images)  # held as decoded images
    assert data_fingerprint(from_folder) == data_fingerprint(from_files)
    again = tokenize_vision_pairs(processor, from_folder, from_dict({"cutoff_len": 4096}))
    assert [(t.chosen_ids, t.chosen_start, t.rejected_ids, t.rejected_start) for t in again] == \
        [(t.chosen_ids, t.chosen_start, t.rejected_ids, t.rejected_start) for t in items]


@pytest.mark.parametrize("over, key", [
    ({"stage": "rm"}, "stage/pref_loss rm"), ({"stage": "sft", "padding_free": True}, "padding_free"),
    ({"prefix_sharing": True}, "prefix_sharing"), ({"sequence_parallel_size": 2}, "sequence_parallel_size"),
    ({"finetuning_type": "freeze"}, "finetuning_type: freeze"),
    ({"generate_during_eval": 2, "val_size": 0.5}, "generate_during_eval"),
])
def test_what_is_not_built_yet_is_refused_in_one_line(over, key, llava_dir):
    from preftune.errors import ConfigError
    from preftune.vision import load_processor

    with pytest.raises(ConfigError, match=f"^{key}: not with a vision-language model yet") as raised:
        load_processor(from_dict({"model_name_or_path": str(llava_dir), **over}))
    assert "\n" not in str(raised.value)
    assert load_processor(from_dict({"model_name_or_path": str(llava_dir)})) is not None


def test_a_top_level_system_text_is_the_pairs_system_turn(tmp_path):
    """`preftune sample` writes its image pairs with a top-level `system` (as text records have it): it is the
    pair's system turn, never dropped; the same text also given as the prompt's first message is one system
    turn, and two different ones are refused in one line."""
    from preftune.data import read_dataset
    from preftune.errors import DataError

    folder = tmp_path / "data"
    record = _bad_record(folder, "good")
    rows = [{**record, "system": "Be brief."},
            {**record, "system": "Be brief.", "prompt": [{"role": "system", "content": "Be brief."}] + record["prompt"]}]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = read_dataset(str(folder / "pairs.jsonl"), "data")
    assert [e.system for e in examples] == ["Be brief.", "Be brief."]
    assert [len(e.images) for e in examples] == [1, 1]
    rows[1]["system"] = "Be long."
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"pairs.jsonl:2: a system text in both field 'system' and the prompt's first"):
        read_dataset(str(folder / "pairs.jsonl"), "data")
