"""`preftune sample` with infer_backend vllm, against a stand-in `vllm` module (vLLM needs a CUDA GPU,
which the tests do not have): the engine gets the prompts' token ids as training renders them, the
sampling settings stated in full and a seed per prompt, its outputs go through the same rewards,
pairs and resume as transformers' generation; auto picks it only with a GPU; a missing package is
one line. A vision-language model's prompts with images go in as vLLM's multimodal input and give the
records of transformers' generation."""

import importlib.machinery
import json
import sys
import types

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.config import TORCH_DTYPES, from_dict
from preftune.generate import backend, vllm_sample
from preftune.models import load_tokenizer
from preftune.tokenization import encode_prompts, stop_ids
from stand_ins import bind, check_bounds, record
from test_sample import REWARD, args, lines, project  # noqa: F401  (the prompts and reward fixture)


def sampling_params(*args, **kwargs):
    """vLLM's SamplingParams: its fields as vLLM's signature binds them, the ranges it checks checked."""
    p = bind("vllm", "SamplingParams", *args, **kwargs)
    check_bounds("vllm", {key: p[key] for key in ("n", "temperature", "top_p", "top_k", "max_tokens")})
    assert all(isinstance(t, int) for t in p["stop_token_ids"] or []), p["stop_token_ids"]
    assert all(isinstance(t, int) and isinstance(b, float) for t, b in (p["logit_bias"] or {}).items()), \
        f"vllm SamplingParams: logit_bias {p['logit_bias']!r} is not a dict of token id -> float"
    return types.SimpleNamespace(**p)


# vllm.inputs: the keys of a TextPrompt and of a TokensPrompt (TypedDicts: another key is a bad request)
TEXT_PROMPT = {"prompt", "multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids", "cache_salt"}
TOKENS_PROMPT = {"prompt_token_ids", "token_type_ids", "multi_modal_data", "mm_processor_kwargs", "multi_modal_uuids",
                 "cache_salt"}
MM_DEFAULT_LIMIT = 999  # vLLM's MultiModalConfig.get_limit_per_prompt where limit_mm_per_prompt names no modality


class FakeVLLM:
    """The part of vLLM's API preftune uses (LLM(...).generate(prompts, params), SamplingParams), bound
    to vLLM's signatures (tests/stand_ins.py) with the values vLLM validates checked, and answered by
    transformers' generate with each request's seed; every call is recorded.

    A vision-language model (a config with a vision_config) is loaded with its AutoProcessor, as vLLM loads
    it. Its prompts are vLLM's multimodal input, checked as vLLM checks them: a TextPrompt or TokensPrompt
    dict; multi_modal_data {"image": a PIL image or a list of them} (vLLM's MultiModalDataDict; no other
    modality here); at most limit_mm_per_prompt["image"] images; a text prompt holding exactly one image
    placeholder (the processor's image_token) per image, tokenized with the special tokens unless
    tokenization_kwargs says add_special_tokens False. Its n samples are n rows of the processor's output
    for the prompt and its images (as vLLM, unlike generate's num_return_sequences, keeps each sample's images)."""

    def __init__(self):
        self.llm_kwargs, self.calls, self.outputs = [], [], []
        module = types.ModuleType("vllm")
        module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        module.SamplingParams = sampling_params
        module.LLM = self.make_llm
        self.module = module

    def make_llm(self, *args, **kwargs):
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        call = bind("vllm", "LLM.__init__", None, *args, **kwargs)
        engine = call.pop("kwargs", {})  # LLM hands the other keywords on to EngineArgs(...), a dataclass
        unknown = set(engine) - set(record()["vllm"]["engine_args"])
        assert not unknown, f"vllm.LLM: EngineArgs takes no {sorted(unknown)}"
        dtype = call["dtype"]  # vLLM lower-cases a name; a torch.dtype is taken as it is
        assert isinstance(dtype, torch.dtype) or dtype.lower() in record()["vllm"]["dtypes"], \
            f"vllm.LLM: dtype {dtype!r} is not one of {record()['vllm']['dtypes']} (ValueError: Unknown dtype)"
        check_bounds("vllm", {"gpu_memory_utilization": call["gpu_memory_utilization"]})
        limits = engine.get("limit_mm_per_prompt") or {}
        assert isinstance(limits, dict) and all(isinstance(v, int) and v >= 0 for v in limits.values()), \
            f"vllm.LLM: limit_mm_per_prompt {limits!r} is not a dict of modality -> count"
        self.llm_kwargs.append({**{k: v for k, v in call.items() if k != "self"}, **engine})
        vision = hasattr(AutoConfig.from_pretrained(call["model"]), "vision_config")
        model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(call["model"]).eval()
        processor = AutoProcessor.from_pretrained(call["model"]) if vision else None
        fake = self

        def images_of(prompt) -> list:
            assert set(prompt) <= (TEXT_PROMPT if "prompt" in prompt else TOKENS_PROMPT), \
                f"vllm: a prompt dict has keys {sorted(prompt)}, not those of a TextPrompt or TokensPrompt"
            data = prompt.get("multi_modal_data")
            if data is None:
                return []
            assert vision, f"vllm: {call['model']} is not a multimodal model; it takes no multi_modal_data"
            assert isinstance(data, dict) and set(data) <= {"image"}, f"vllm: multi_modal_data {data!r}"
            images = data["image"] if isinstance(data["image"], list) else [data["image"]]
            assert images and all(isinstance(im, Image.Image) for im in images), f"vllm: images {images!r}"
            limit = limits.get("image", MM_DEFAULT_LIMIT)
            if len(images) > limit:
                raise ValueError(f"At most {limit} image(s) may be provided in one prompt (limit_mm_per_prompt)")
            if "prompt" in prompt and prompt["prompt"].count(processor.image_token) != len(images):
                raise ValueError(f"vllm: the prompt holds {prompt['prompt'].count(processor.image_token)} image "
                                 f"placeholder(s) {processor.image_token!r} for {len(images)} image(s)")
            return images

        class LLM:
            def generate(self, *args, **kwargs):
                call = bind("vllm", "LLM.generate", self, *args, **kwargs)
                prompts, params = call["prompts"], call["sampling_params"]
                special = (call["tokenization_kwargs"] or {}).get("add_special_tokens", True)
                fake.calls.append((prompts, params))
                results = []
                for prompt, p in zip(prompts, params, strict=True):
                    images = images_of(prompt)
                    torch.manual_seed(p.seed)
                    settings = dict(do_sample=True, temperature=p.temperature, top_p=p.top_p,
                                    top_k=0 if p.top_k == -1 else p.top_k, max_new_tokens=p.max_tokens,
                                    eos_token_id=p.stop_token_ids, pad_token_id=p.stop_token_ids[0])
                    if p.logit_bias:  # added to the logits, as vLLM's logit_bias processor adds it
                        settings["sequence_bias"] = {(t,): b for t, b in p.logit_bias.items()}
                    if "prompt" in prompt:  # text: vLLM tokenizes it and expands its placeholders (its processor)
                        assert vision, "the stand-in answers text prompts for vision-language models only"
                        inputs = processor(text=[prompt["prompt"]] * p.n, images=[images] * p.n if images else None,
                                           add_special_tokens=special, return_tensors="pt")
                    else:
                        ids = torch.tensor([prompt["prompt_token_ids"]] * (p.n if vision else 1))
                        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
                        settings["num_return_sequences"] = 1 if vision else p.n
                    with torch.no_grad():
                        out = model.generate(**inputs, **settings)
                    width = inputs["input_ids"].shape[1]
                    # a RequestOutput: the prompt's ids as the engine ran them (placeholders expanded), the samples
                    results.append(types.SimpleNamespace(prompt_token_ids=inputs["input_ids"][0].tolist(), outputs=[
                        types.SimpleNamespace(token_ids=tuple(row[width:].tolist())) for row in out]))
                fake.outputs.append(results)
                return results

        return LLM()


@pytest.fixture
def fake_vllm(monkeypatch):
    fake = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    return fake


def test_vllm_gets_the_training_rendering_full_settings_and_a_seed_per_prompt(project, tiny_model_dir, fake_vllm):
    assert main(args(project, tiny_model_dir, "out", "--infer_backend", "vllm", "--seed", "7")) == 0
    (kwargs,) = fake_vllm.llm_kwargs
    assert kwargs["model"] == str(tiny_model_dir) and kwargs["gpu_memory_utilization"] == 0.7
    (prompts, params), = fake_vllm.calls  # 6 prompts: one call
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "dataset": str(project / "prompts.jsonl")})
    tokenizer = load_tokenizer(str(tiny_model_dir))
    from preftune.data import read_prompts
    expected = encode_prompts(tokenizer, read_prompts(cfg.dataset, cfg.dataset_dir, None, None), cfg.template)
    assert [p["prompt_token_ids"] for p in prompts] == expected
    assert kwargs["max_model_len"] == max(map(len, expected)) + 12
    assert [p.seed for p in params] == [7 * 1_000_003 + i for i in range(6)]
    assert {(p.n, p.temperature, p.top_p, p.top_k, p.max_tokens) for p in params} == {(3, 1.0, 1.0, -1, 12)}
    assert params[0].stop_token_ids == stop_ids(tokenizer)
    records = lines(project / "out" / "samples.jsonl")
    assert [r["id"] for r in records] == [str(i) for i in range(6)]
    assert all(len(r["completions"]) == 3 and all(c["score"] == len(c["text"]) % 7 for c in r["completions"])
               for r in records)
    summary = json.loads((project / "out" / "summary.json").read_text())
    assert summary["backend"] == "vllm" and summary["pairs"] + sum(summary["skipped"].values()) == 6


def test_a_killed_vllm_run_resumes_with_only_the_missing_prompts(project, tiny_model_dir, fake_vllm):
    vllm = ("--infer_backend", "vllm")
    assert main(args(project, tiny_model_dir, "whole", *vllm)) == 0
    assert main(args(project, tiny_model_dir, "killed", *vllm)) == 0
    killed = project / "killed" / "samples.jsonl"
    text = killed.read_text().splitlines(keepends=True)
    killed.write_text("".join(text[:4]) + text[4][:25])
    assert main(args(project, tiny_model_dir, "killed", *vllm)) == 0
    prompts, params = fake_vllm.calls[-1]
    assert [p.seed for p in params] == [42 * 1_000_003 + 4, 42 * 1_000_003 + 5]  # the default seed, prompts 4 and 5
    assert lines(killed) == lines(project / "whole" / "samples.jsonl")
    n_calls = len(fake_vllm.llm_kwargs)
    assert main(args(project, tiny_model_dir, "killed", *vllm)) == 0  # nothing to do: vLLM is not even started
    assert len(fake_vllm.llm_kwargs) == n_calls and len(lines(killed)) == 6


def test_auto_picks_vllm_only_when_installed_with_a_gpu_and_unquantized(fake_vllm, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backend(from_dict({})) == "huggingface"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend(from_dict({})) == "vllm"
    assert backend(from_dict({"infer_backend": "huggingface"})) == "huggingface"
    assert backend(from_dict({"finetuning_type": "lora", "quantization_bit": 4})) == "huggingface"
    monkeypatch.delitem(sys.modules, "vllm")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert backend(from_dict({})) == "huggingface"


def test_vllm_asked_for_but_missing_is_one_line(project, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    assert main(args(project, tiny_model_dir, "out", "--infer_backend", "vllm")) == 2
    err = capsys.readouterr().err.strip()
    assert "infer_backend: vllm needs the vllm package" in err and "infer_backend: huggingface" in err
    assert "\n" not in err and not (project / "out" / "samples.jsonl").exists()


@pytest.mark.parametrize("torch_dtype", TORCH_DTYPES)
def test_every_torch_dtype_reaches_vllm_as_a_name_it_takes(torch_dtype, tiny_model_dir, fake_vllm):
    """preftune's names (bf16, fp32, ...) are not all vLLM's: LLM(dtype=...) gets the same dtype in vLLM's
    spelling, as the huggingface backend would load the weights (pure_bf16 makes auto bfloat16)."""
    expected = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16"}[torch_dtype]
    pure = {"pure_bf16": True, "bf16": True}
    for over, dtype in (({}, expected), (pure, "bfloat16" if torch_dtype == "auto" else expected)):
        if over and torch_dtype not in ("auto", "bfloat16", "bf16"):
            continue  # pure_bf16 refuses the other dtypes
        cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "torch_dtype": torch_dtype, "num_samples": 1,
                         "max_new_tokens": 2, **over})
        assert len(list(vllm_sample(str(tiny_model_dir), load_tokenizer(str(tiny_model_dir)), [[1, 2, 3]], cfg))) == 1
        assert fake_vllm.llm_kwargs[-1]["dtype"] == dtype


def test_a_temperature_vllm_refuses_is_one_line_and_auto_samples_with_transformers(project, tiny_model_dir,
                                                                                 fake_vllm, monkeypatch, capsys):
    """vLLM's SamplingParams takes temperatures in [0, 2]; preftune's in (0, inf)."""
    assert main(args(project, tiny_model_dir, "out", "--infer_backend", "vllm", "--temperature", "2.5")) == 2
    err = capsys.readouterr().err.strip()
    assert "infer_backend: vllm samples at temperatures up to 2 (vLLM's limit); got temperature: 2.5" in err
    assert "\n" not in err and not (project / "out" / "samples.jsonl").exists() and not fake_vllm.llm_kwargs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backend(from_dict({"temperature": 2.5})) == "huggingface"
    assert backend(from_dict({"temperature": 2.0})) == "vllm"


def test_the_stand_in_refuses_what_vllm_refuses(fake_vllm):
    """The stand-in is bound to vLLM's signatures: a misspelt keyword or a value vLLM rejects fails here."""
    with pytest.raises(TypeError, match="^vllm 0.33.0 SamplingParams: got an unexpected keyword argument 'max_new_"):
        fake_vllm.module.SamplingParams(max_new_tokens=4)
    with pytest.raises(ValueError, match=r"temperature must be in \[0, 2\], got 3"):
        fake_vllm.module.SamplingParams(temperature=3)
    with pytest.raises(AssertionError, match="dtype 'bf16' is not one of"):
        fake_vllm.module.LLM(model="m", dtype="bf16")
    with pytest.raises(AssertionError, match=r"EngineArgs takes no \['max_model_length'\]"):
        fake_vllm.module.LLM(model="m", max_model_length=64)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tiny_tokenizer):
    from test_vision import build_llava

    return build_llava(tiny_tokenizer, tmp_path_factory.mktemp("llava"))


def _image_prompts(folder, demo_pairs):
    """Prompt-only records in TRL's vision format with 0, 1 and 2 images (test_vision's coloured squares)."""
    from test_vision import write_vision_pairs

    pairs_file = write_vision_pairs(folder, demo_pairs[:3])
    data = folder / "prompts.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("images", "prompt")}) + "\n" for r in
                            map(json.loads, pairs_file.read_text().splitlines())))
    return data


def test_image_prompts_through_vllm_give_the_huggingface_records(demo_pairs, tiny_tokenizer, tmp_path, fake_vllm):
    """A VLM's prompts with 0, 1 and 2 images sampled with infer_backend vllm: a prompt with images is vLLM's
    multimodal input (its chat-template text, one placeholder per image, and its PIL images), the text-only one
    its token ids; limit_mm_per_prompt allows the 2 images. With one prompt per batch (the same seeds),
    samples.jsonl and pairs.jsonl are those of transformers' generate, images kept as paths. On the tiny Gemma 3,
    whose chat template writes a BOS (vLLM must not add one: add_special_tokens False) and whose placeholder
    `<start_of_image>` is not the token its features go to."""
    from preftune.commands.sample import run
    from test_vision_gemma3 import build_gemma3

    model_dir = build_gemma3(tiny_tokenizer, tmp_path / "gemma3")
    data = _image_prompts(tmp_path / "data", demo_pairs)
    (tmp_path / "rewards.py").write_text(REWARD)
    common = {"model_name_or_path": str(model_dir), "dataset": str(data), "num_samples": 3, "max_new_tokens": 6,
              "per_device_eval_batch_size": 1, "reward": f"{tmp_path / 'rewards.py'}:length"}
    for engine in ("huggingface", "vllm"):
        assert run(from_dict({**common, "infer_backend": engine, "output_dir": str(tmp_path / engine)}))["backend"] \
            == engine
    (kwargs,) = fake_vllm.llm_kwargs
    assert kwargs["limit_mm_per_prompt"] == {"image": 2}
    (prompts, params), = fake_vllm.calls
    assert set(prompts[0]) == {"prompt_token_ids"}
    tokenizer = load_tokenizer(str(model_dir))  # no image token sampled: <start_of_image>, <image_soft_token>
    assert {p_.logit_bias.keys() == {tokenizer.boi_token_id, tokenizer.image_token_id} for p_ in params} == {True}
    assert [len(p["multi_modal_data"]["image"]) for p in prompts[1:]] == [1, 2]
    assert [p["prompt"].count("<start_of_image>") for p in prompts[1:]] == [1, 2]
    assert prompts[2]["prompt"].startswith("<bos><start_of_turn>user\n<start_of_image><start_of_image>")
    # the ids vLLM ran are those transformers' generate got: one BOS, each image's soft tokens in place
    from preftune.data import read_prompts
    from preftune.vision import encode_vision_prompts, load_processor

    cfg = from_dict(common)
    expected = encode_vision_prompts(load_processor(cfg), read_prompts(cfg.dataset, cfg.dataset_dir, None, None))
    assert [out.prompt_token_ids for out in fake_vllm.outputs[0]] == expected
    for name in ("samples.jsonl", "pairs.jsonl"):
        assert lines(tmp_path / "vllm" / name) == lines(tmp_path / "huggingface" / name), name
    records = lines(tmp_path / "vllm" / "samples.jsonl")
    assert [len(r["images"]) for r in records] == [0, 1, 2]
    assert records[2]["images"] == [str((tmp_path / "data" / f"img_2_{k}.png").resolve()) for k in range(2)]
    assert len({c["text"] for r in records for c in r["completions"]}) > 3  # sampled, not one text repeated


def test_the_stand_in_refuses_what_vllm_refuses_with_images(llava_dir, tiny_model_dir, fake_vllm):
    """vLLM's multimodal checks: placeholders against images, limit_mm_per_prompt, the prompt dict's keys, images
    for a text-only model."""
    from test_vision import square

    params = fake_vllm.module.SamplingParams(max_tokens=2, seed=0, stop_token_ids=[0])
    text = "<|im_start|>user\n<image>What colour?<|im_end|>\n<|im_start|>assistant\n"
    two = [square((255, 0, 0)), square((0, 0, 255))]
    llm = fake_vllm.module.LLM(model=str(llava_dir), limit_mm_per_prompt={"image": 2})
    with pytest.raises(ValueError, match=r"holds 1 image placeholder\(s\) '<image>' for 2 image"):
        llm.generate([{"prompt": text, "multi_modal_data": {"image": two}}], [params])
    with pytest.raises(ValueError, match=r"At most 2 image\(s\) may be provided in one prompt"):
        llm.generate([{"prompt": text.replace("<image>", "<image>" * 3), "multi_modal_data": {"image": two * 2}}],
                     [params])
    with pytest.raises(AssertionError, match="not those of a TextPrompt or TokensPrompt"):
        llm.generate([{"prompt": text, "images": two[:1]}], [params])
    with pytest.raises(AssertionError, match="not a multimodal model"):
        fake_vllm.module.LLM(model=str(tiny_model_dir)).generate(
            [{"prompt_token_ids": [1, 2], "multi_modal_data": {"image": two[:1]}}], [params])
    assert len(llm.generate([{"prompt": text, "multi_modal_data": {"image": two[:1]}}], [params])[0].outputs) == 1
