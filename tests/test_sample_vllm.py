"""`preftune sample` with infer_backend vllm, against a stand-in `vllm` module (vLLM needs a CUDA GPU,
which the tests do not have): the engine gets the prompts' token ids as training renders them, the
sampling settings stated in full and a seed per prompt, its outputs go through the same rewards,
pairs and resume as transformers' generation; auto picks it only with a GPU; a missing package is
one line."""

import importlib.machinery
import json
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune.cli import main
from preftune.config import TORCH_DTYPES, from_dict
from preftune.generate import backend, vllm_sample
from preftune.models import load_tokenizer
from preftune.tokenization import encode_prompts, stop_ids
from stand_ins import bind, check_bounds, record
from test_sample import args, lines, project  # noqa: F401  (the prompts and reward fixture)


def sampling_params(*args, **kwargs):
    """vLLM's SamplingParams: its fields as vLLM's signature binds them, the ranges it checks checked."""
    p = bind("vllm", "SamplingParams", *args, **kwargs)
    check_bounds("vllm", {key: p[key] for key in ("n", "temperature", "top_p", "top_k", "max_tokens")})
    assert all(isinstance(t, int) for t in p["stop_token_ids"] or []), p["stop_token_ids"]
    return types.SimpleNamespace(**p)


class FakeVLLM:
    """The part of vLLM's API preftune uses (LLM(...).generate(prompts, params), SamplingParams), bound
    to vLLM's signatures (tests/stand_ins.py) with the values vLLM validates checked, and answered by
    transformers' generate with each request's seed; every call is recorded."""

    def __init__(self):
        self.llm_kwargs, self.calls = [], []
        module = types.ModuleType("vllm")
        module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
        module.SamplingParams = sampling_params
        module.LLM = self.make_llm
        self.module = module

    def make_llm(self, *args, **kwargs):
        call = bind("vllm", "LLM.__init__", None, *args, **kwargs)
        engine = call.pop("kwargs", {})  # LLM hands the other keywords on to EngineArgs(...), a dataclass
        unknown = set(engine) - set(record()["vllm"]["engine_args"])
        assert not unknown, f"vllm.LLM: EngineArgs takes no {sorted(unknown)}"
        dtype = call["dtype"]  # vLLM lower-cases a name; a torch.dtype is taken as it is
        assert isinstance(dtype, torch.dtype) or dtype.lower() in record()["vllm"]["dtypes"], \
            f"vllm.LLM: dtype {dtype!r} is not one of {record()['vllm']['dtypes']} (ValueError: Unknown dtype)"
        check_bounds("vllm", {"gpu_memory_utilization": call["gpu_memory_utilization"]})
        self.llm_kwargs.append({**{k: v for k, v in call.items() if k != "self"}, **engine})
        model = AutoModelForCausalLM.from_pretrained(call["model"])
        fake = self

        class LLM:
            def generate(self, *args, **kwargs):
                call = bind("vllm", "LLM.generate", self, *args, **kwargs)
                prompts, params = call["prompts"], call["sampling_params"]
                fake.calls.append((prompts, params))
                results = []
                for prompt, p in zip(prompts, params, strict=True):
                    torch.manual_seed(p.seed)
                    ids = torch.tensor([prompt["prompt_token_ids"]])
                    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                         temperature=p.temperature, top_p=p.top_p,
                                         top_k=0 if p.top_k == -1 else p.top_k, max_new_tokens=p.max_tokens,
                                         num_return_sequences=p.n, eos_token_id=p.stop_token_ids,
                                         pad_token_id=p.stop_token_ids[0])
                    results.append(types.SimpleNamespace(outputs=[
                        types.SimpleNamespace(token_ids=tuple(row[ids.shape[1]:].tolist())) for row in out]))
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
