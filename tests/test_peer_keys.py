"""Issue 20's LLaMA-Factory and TRL keys: mix_strategy / interleave_probs (the same examples in the same
order as datasets.interleave_datasets, which LLaMA-Factory calls), default_system, mask_history,
pad_to_multiple_of (wider batches, the same numbers), model_init_kwargs, and the one-line refusals of
streaming and tool_format. docs/llamafactory-keys.md states each; test_llamafactory_keys checks its rows."""

import json

import pytest
import torch
from datasets import Dataset, interleave_datasets
from transformers import AutoModelForCausalLM

from preftune.batching import collate, collate_shared, collate_unpaired
from preftune.config import from_dict
from preftune.data import PreferencePair, UnpairedExample, load_pairs
from preftune.data.load import mix
from preftune.errors import ConfigError
from preftune.logps import get_batch_logps, model_inputs
from preftune.models import load_model
from preftune.tokenization import prompt_messages, tokenize_examples, tokenize_pairs

STRATEGIES = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted",
              "interleave_once": "all_exhausted_without_replacement"}  # LLaMA-Factory's data_utils.merge_dataset


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("probs,seed", [(None, 42), ([0.5, 0.3, 0.2], 42), ([0.1, 0.1, 0.8], 7)])
def test_mix_gives_what_datasets_interleave_gives(strategy, probs, seed):
    sources = [[f"a{i}" for i in range(3)], [f"b{i}" for i in range(4)], [f"c{i}" for i in range(5)]]
    expected = interleave_datasets([Dataset.from_dict({"x": s}) for s in sources], probabilities=probs, seed=seed,
                                   stopping_strategy=STRATEGIES[strategy])["x"]
    assert mix(sources, strategy, probs, seed) == expected
    assert mix(sources, "concat", None, seed) == [x for s in sources for x in s]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture
def two_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "chosen": "y", "rejected": "n"} for i in range(2)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}", "chosen": "y", "rejected": "n", "system": "Own."}
                                           for i in range(4)])
    return f"{a},{b}"


def test_a_run_reads_its_entries_mixed_and_with_the_default_system(two_files):
    cfg = from_dict({"dataset": two_files, "mix_strategy": "interleave_under", "default_system": "Be kind."})
    train, _, report = load_pairs(cfg)
    assert [p.prompt for p in train] == ["a0", "b0", "a1", "b1"] and report.read == 4  # undersampled to the shorter
    assert [p.system for p in train] == ["Be kind.", "Own.", "Be kind.", "Own."]  # a record's own system stays
    assert prompt_messages(train[0])[0] == {"role": "system", "content": "Be kind."}
    over = load_pairs(from_dict({"dataset": two_files, "mix_strategy": "interleave_over"}))[0]
    assert [p.prompt for p in over] == ["a0", "b0", "a1", "b1", "a0", "b2", "a1", "b3"]
    assert [p.system for p in over][:2] == [None, "Own."]
    # a comma list in eval_dataset is mixed the same way, with the same probabilities (as LLaMA-Factory)
    _, val, _ = load_pairs(from_dict({"dataset": two_files, "eval_dataset": two_files, "seed": 3,
                                      "mix_strategy": "interleave_once", "interleave_probs": [0.5, 0.5]}))
    assert sorted(p.prompt for p in val) == ["a0", "a1", "b0", "b1", "b2", "b3"]
    assert [p.prompt for p in val] == mix([["a0", "a1"], ["b0", "b1", "b2", "b3"]], "interleave_once", [0.5, 0.5], 3)


@pytest.mark.parametrize("raw,message", [
    ({"dataset": "a,b", "interleave_probs": "0.5,0.5"}, r"^interleave_probs: only with an interleaved mix_strategy"),
    ({"dataset": "a,b", "mix_strategy": "interleave_under", "interleave_probs": [1.0]},
     r"^interleave_probs: 1 probabilities for 2 dataset entries"),
    ({"dataset": "a,b", "mix_strategy": "interleave_under", "interleave_probs": [0.5, 0.6]}, r"sum to 1"),
    ({"dataset": "a,b", "mix_strategy": "interleave_over", "interleave_probs": [1.0, 0.0]}, r"probability 0 never"),
    ({"dataset": "a,b", "eval_dataset": "c,d,e", "mix_strategy": "interleave_under", "interleave_probs": "0.5,0.5"},
     r"eval_dataset has 3 entries"),
    ({"dataset": "a", "mix_strategy": "interleave"}, r"^mix_strategy: unknown value 'interleave'"),
    ({"stage": "sft", "mask_history": False}, r"^mask_history: false trains LLaMA-Factory's sft on every assistant"),
    ({"pad_to_multiple_of": 8, "padding_free": True}, r"^pad_to_multiple_of: padding_free"),
    ({"pad_to_multiple_of": 0}, r"^pad_to_multiple_of must be at least 1"),
    ({"model_init_kwargs": {"dtype": "bfloat16"}}, r"^model_init_kwargs: dtype is set by preftune from torch_dtype"),
    ({"model_init_kwargs": {"attn_implementation": "eager"}}, r"^model_init_kwargs: attn_implementation is set"),
    ({"streaming": True}, r"^cfg.yaml: streaming: True is not honoured: preftune reads, checks and tokenizes"),
    ({"tool_format": "glm4"}, r"^cfg.yaml: tool_format: 'glm4' is not honoured: tool definitions and calls"),
])
def test_each_key_refuses_in_one_line(raw, message):
    with pytest.raises(ConfigError, match=message) as err:
        from_dict(raw, "cfg.yaml")
    assert "\n" not in str(err.value)


def test_mask_history_true_and_dpo_false_load():
    assert from_dict({"stage": "sft", "mask_history": True}).mask_history is True
    assert from_dict({"mask_history": False}).mask_history is False  # dpo: the history is the prompt either way
    assert from_dict({"dataset_num_proc": 4}).preprocessing_num_workers == 4  # TRL's spelling
    assert from_dict({"pad_to_multiple_of": "auto"}).pad_to_multiple_of is None  # TRL's default: none off Neuron
    assert from_dict({"streaming": False, "tool_format": None, "buffer_size": 16384}).mix_strategy == "concat"


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer, demo_pairs):
    return tokenize_pairs(tiny_tokenizer, [PreferencePair(**p) for p in demo_pairs[:3]], 256, None)


def test_pad_to_multiple_of_widens_the_batch_and_keeps_the_log_probs(pairs, tiny_tokenizer, tiny_model_dir):
    pad = tiny_tokenizer.pad_token_id
    plain, wide = collate(pairs, pad), collate(pairs, pad, multiple=64)
    assert plain["input_ids"].shape[1] % 64 and wide["input_ids"].shape[1] % 64 == 0
    assert wide["input_ids"].shape[1] > plain["input_ids"].shape[1]
    assert collate_shared(pairs, pad, multiple=64)["input_ids"].shape[1] % 64 == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    out = [get_batch_logps(model, **model_inputs(b), chunk_size=7) for b in (plain, wide)]
    torch.testing.assert_close(out[1].logps, out[0].logps, atol=1e-5, rtol=0)
    assert torch.equal(out[1].lengths, out[0].lengths)


def test_pad_to_multiple_of_keeps_ktos_mismatched_rows(tiny_tokenizer, demo_pairs):
    examples = [UnpairedExample(prompt=p["prompt"], completion=p["chosen"], label=i % 2 == 0)
                for i, p in enumerate(demo_pairs[:4])]
    toks = tokenize_examples(tiny_tokenizer, examples, 256, None)
    plain, wide = (collate_unpaired(toks, tiny_tokenizer.pad_token_id, multiple=m) for m in (None, 64))
    assert wide["kl_input_ids"].shape[1] % 64 == 0
    width = plain["kl_input_ids"].shape[1]
    for key in ("kl_input_ids", "kl_completion_mask", "input_ids"):  # the same tokens, then only padding
        assert torch.equal(wide[key][:, :width], plain[key])
    assert not wide["kl_attention_mask"][:, width:].any()


def test_model_init_kwargs_reach_from_pretrained(tiny_model_dir):
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "model_init_kwargs": {"use_cache": False}})
    assert load_model(str(tiny_model_dir), cfg).config.use_cache is False
    assert load_model(str(tiny_model_dir), from_dict({"model_name_or_path": str(tiny_model_dir)})).config.use_cache


def test_logits_and_entropy_metrics_equal_trls(pairs, tiny_tokenizer, tiny_model_dir):
    """logits/chosen, logits/rejected and entropy of a step equal TRL 1.16's: its fused LM head's per-token
    mean_logits and entropy on the same model and rows, reduced as DPOTrainer reduces them."""
    from trl.trainer.utils import add_fused_lm_head

    from preftune.reference import Reference
    from preftune.step import LogpsModule, PreferenceStep

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="eager")
    batch = collate(pairs, tiny_tokenizer.pad_token_id)
    step, policy, reference = PreferenceStep(from_dict({})), LogpsModule(model, 7), Reference(model, chunk_size=7)
    with torch.no_grad():
        assert "entropy" not in step(policy, reference, batch).stats  # only on the batches a row logs (kl=True)
        stats = step(policy, reference, batch, kl=True).stats
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits"))
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                    fused_lm_head=True)
    mask = batch["completion_mask"][:, 1:]  # DPOTrainer's shift_completion_mask
    chosen_mask, rejected_mask = mask.chunk(2, dim=0)
    chosen_mean_logits, rejected_mean_logits = out.mean_logits.chunk(2, dim=0)
    trl = {"entropy": (out.entropy * mask).sum() / mask.sum(),
           "logits/chosen": chosen_mean_logits[chosen_mask.bool()].sum() / chosen_mask.sum(),
           "logits/rejected": rejected_mean_logits[rejected_mask.bool()].sum() / rejected_mask.sum()}
    for key, value in trl.items():
        torch.testing.assert_close(stats[key].mean(), value, atol=1e-5, rtol=1e-5, msg=key)
    assert stats["entropy"].numel() == int(mask.sum()) and 0 < float(stats["entropy"].mean()) < 6  # log(400) = 6.0
