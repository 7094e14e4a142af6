"""Prefix sharing (one row per pair, [prompt | chosen | rejected], each completion masked to the prompt and
itself): the padded path's log-probs, gradients, hidden states and KL, fewer tokens through the model,
also where the tokenizer merged across the prompt boundary differently for chosen and rejected; a
training run equals the padded run; what it cannot combine with is refused."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from test_padding_free import same_logps_and_gradients

from preftune import train as train_mod
from preftune.batching import collate, collate_shared
from preftune.config import from_dict
from preftune.data import PreferencePair
from preftune.errors import ConfigError
from preftune.logps import completion_kl, get_batch_logps, model_inputs
from preftune.tokenization import TokenizedPair, tokenize_pairs


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer, demo_pairs):
    """5 pairs with a long shared prompt (a few sentences of context), plus one whose chosen and rejected
    split the prompt differently: their common prefix ends before the prompt does."""
    long = [PreferencePair(**{**p, "prompt": " ".join(q["prompt"] for q in demo_pairs[i:i + 4])})
            for i, p in enumerate(demo_pairs[:5])]
    tokenized = tokenize_pairs(tiny_tokenizer, long, 512, None)
    p = tokenized[0]
    merged = TokenizedPair(chosen_ids=p.chosen_ids, chosen_start=p.chosen_start,
                           rejected_ids=p.rejected_ids[:p.rejected_start - 2] + [7] + p.rejected_ids[p.rejected_start:],
                           rejected_start=p.rejected_start - 1)
    return sorted(tokenized, key=lambda p: -len(p.chosen_ids)) + [merged]


def test_shared_rows_hold_each_prompt_once(pairs, tiny_tokenizer):
    padded, shared = collate(pairs, tiny_tokenizer.pad_token_id), collate_shared(pairs, tiny_tokenizer.pad_token_id)
    tokens = int(padded["attention_mask"].sum())
    prompts = sum(p.chosen_start for p in pairs[:-1])
    assert shared["input_ids"].shape[0] == len(pairs)
    assert int(shared["attention_mask"][:, 0].diagonal(dim1=-2, dim2=-1).sum()) == shared["input_ids"].numel()
    real = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) - sum(
        p.chosen_start for p in pairs[:-1]) - (pairs[-1].rejected_start - 1)
    assert real < tokens and tokens - real >= prompts  # every prompt but the odd one's tail runs once
    assert shared["score_rows"].tolist() == sorted(shared["score_rows"].tolist())  # grouped by sequence, in order


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_logps_and_gradients_equal_the_padded_ones(pairs, tiny_model_dir, tiny_tokenizer, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    padded, shared = collate(pairs, tiny_tokenizer.pad_token_id), collate_shared(pairs, tiny_tokenizer.pad_token_id)
    pad_out, shared_out = same_logps_and_gradients(model, padded, shared)
    kl_pad, kl_shared = completion_kl(model, model, pad_out.hidden, pad_out.hidden), \
        completion_kl(model, model, shared_out.hidden, shared_out.hidden)
    assert kl_shared[1] == kl_pad[1]
    # without the mask, the rejected tail would see the chosen one: the mask is what makes it right
    causal = shared["attention_mask"].clone()
    causal[:] = torch.ones_like(causal[0, 0]).tril()
    leaky = get_batch_logps(model, **{**model_inputs(shared), "attention_mask": causal}, chunk_size=7)
    assert (leaky.logps - pad_out.logps).abs().max() > 1e-3


def test_prefix_sharing_run_equals_the_padded_run(tmp_path, tiny_model_dir, demo_pairs):
    data = tmp_path / "pairs.jsonl"
    records = [{**p, "prompt": " ".join(q["prompt"] for q in demo_pairs[i:i + 3])} for i, p in enumerate(demo_pairs[:40])]
    data.write_text("".join(json.dumps(p) + "\n" for p in records))
    raw = {"model_name_or_path": str(tiny_model_dir), "dataset": str(data), "val_size": 8, "learning_rate": 1e-3,
           "per_device_train_batch_size": 8, "max_steps": 4, "logging_steps": 1, "eval_steps": 2, "cutoff_len": 256,
           "torch_dtype": "float32", "progress_bar": False, "plot_loss": False}
    train_mod.train(from_dict({**raw, "output_dir": str(tmp_path / "padded")}))
    train_mod.train(from_dict({**raw, "output_dir": str(tmp_path / "shared"), "prefix_sharing": True}))
    rows = [json.loads((tmp_path / d / "dpo_metrics" / "log_history.json").read_text()) for d in ("padded", "shared")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    for padded, shared in zip(*rows):
        for key in ("loss", "rewards/margins", "logps/chosen", "kl_per_token", "kl_per_sequence", "grad_norm",
                    "eval_loss", "eval_logps/rejected", "eval_kl_per_token", "eval_kl_per_sequence"):
            if key in padded:
                assert shared[key] == pytest.approx(padded[key], abs=1e-5, rel=1e-5), (padded["step"], key)
    assert rows[0][-1]["eval_loss"] < rows[0][0]["eval_loss"]  # it trained


@pytest.mark.parametrize("over,message", [
    ({"padding_free": True}, "prefix_sharing and padding_free are two layouts"),
    ({"pref_loss": "kto"}, "pref_loss: kto has no pairs"),
    ({"stage": "sft"}, "stage: sft has no pairs"),
    ({"attn_implementation": "flash_attention_2"}, "needs a 4D attention mask"),
])
def test_what_prefix_sharing_cannot_combine_with_is_refused(over, message):
    with pytest.raises(ConfigError, match=message):
        from_dict({"prefix_sharing": True, **over})
