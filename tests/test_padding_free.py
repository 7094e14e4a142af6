"""Padding-free batches (all sequences of a micro-batch back to back in one row, position ids restarting
per sequence) give the padded path's log-probs, gradients, KL and training numbers; group_by_length
batches similar lengths together without changing what an epoch holds."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from preftune import train as train_mod
from preftune.batching import collate, collate_packed, epoch_batches
from preftune.config import from_dict
from preftune.data import PreferencePair
from preftune.errors import ConfigError
from preftune.logps import completion_kl, get_batch_logps, model_inputs
from preftune.tokenization import tokenize_pairs


@pytest.fixture(scope="module")
def pairs(tiny_tokenizer, demo_pairs):
    """5 pairs of different lengths, the longest first (so padding is real)."""
    tokenized = tokenize_pairs(tiny_tokenizer, [PreferencePair(**p) for p in demo_pairs[:5]], 256, None)
    return sorted(tokenized, key=lambda p: -len(p.chosen_ids) - len(p.rejected_ids))


def test_packed_batch_holds_the_padded_sequences_back_to_back(pairs, tiny_tokenizer):
    padded, packed = collate(pairs, tiny_tokenizer.pad_token_id), collate_packed(pairs, tiny_tokenizer.pad_token_id)
    lengths = padded["attention_mask"].sum(dim=1)
    assert packed["sequence_lengths"].tolist() == lengths.tolist()
    assert packed["input_ids"].shape == (1, int(lengths.sum())) < padded["input_ids"].shape  # no pad tokens
    rows = [padded["input_ids"][r, :n] for r, n in enumerate(lengths.tolist())]
    assert torch.equal(packed["input_ids"][0], torch.cat(rows))
    assert torch.equal(packed["completion_mask"][0],
                       torch.cat([padded["completion_mask"][r, :n] for r, n in enumerate(lengths.tolist())]))
    assert torch.equal(packed["position_ids"][0], torch.cat([torch.arange(n) for n in lengths.tolist()]))


def same_logps_and_gradients(model, padded: dict, other: dict):
    """Both batch layouts' outputs (`BatchLogps` with hidden states and WPO weights, ld_alpha 0.5, LM-head
    chunks of 7), asserted equal to the padded one's, the gradients of their summed log-probs too."""
    results = []
    for batch in (padded, other):
        model.zero_grad()
        out = get_batch_logps(model, **model_inputs(batch), chunk_size=7, ld_alpha=0.5, wpo=True, return_hidden=True)
        out.logps.sum().backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (pad_out, pad_grads), (out, grads) = results
    torch.testing.assert_close(out.logps, pad_out.logps, atol=1e-5, rtol=0)
    assert torch.equal(out.lengths, pad_out.lengths)
    torch.testing.assert_close(out.wpo_weights, pad_out.wpo_weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.hidden, pad_out.hidden, atol=1e-5, rtol=1e-5)
    for name, grad in pad_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    return pad_out, out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logps_and_gradients_equal_the_padded_ones(pairs, tiny_model_dir, tiny_tokenizer, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    padded, packed = collate(pairs, tiny_tokenizer.pad_token_id), collate_packed(pairs, tiny_tokenizer.pad_token_id)
    pad_out, pack_out = same_logps_and_gradients(model, padded, packed)
    kl_pad = completion_kl(model, model, pad_out.hidden, pad_out.hidden)
    assert kl_pad[1] == pack_out.hidden.size(0)  # every completion token scored, none of another sequence
    # a packed row without position ids would let sequences attend to each other: the restart is what matters
    leaky = get_batch_logps(model, **{**model_inputs(packed), "position_ids": None}, chunk_size=7)
    assert (leaky.logps - pad_out.logps).abs().max() > 1e-3


def test_padding_free_run_equals_the_padded_run(tmp_path, tiny_model_dir, demo_pairs):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs[:40]))
    raw = {"model_name_or_path": str(tiny_model_dir), "dataset": str(data), "val_size": 8, "learning_rate": 1e-3,
           "per_device_train_batch_size": 8, "max_steps": 4, "logging_steps": 1, "eval_steps": 2, "cutoff_len": 128,
           "torch_dtype": "float32", "progress_bar": False, "plot_loss": False}
    train_mod.train(from_dict({**raw, "output_dir": str(tmp_path / "padded")}))
    train_mod.train(from_dict({**raw, "output_dir": str(tmp_path / "packed"), "padding_free": True}))
    rows = [json.loads((tmp_path / d / "dpo_metrics" / "log_history.json").read_text()) for d in ("padded", "packed")]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    for padded, packed in zip(*rows):
        for key in ("loss", "rewards/margins", "logps/chosen", "kl_per_token", "kl_per_sequence", "grad_norm",
                    "eval_loss", "eval_logps/rejected", "eval_kl_per_token", "eval_kl_per_sequence"):
            if key in padded:
                assert packed[key] == pytest.approx(padded[key], abs=1e-5, rel=1e-5), (padded["step"], key)
    assert rows[0][-1]["eval_loss"] < rows[0][0]["eval_loss"]  # it trained


def test_group_by_length_keeps_the_epoch_and_groups_lengths():
    lengths = [(i * 37) % 101 for i in range(1000)]
    plain = epoch_batches(1000, 4, seed=3, epoch=1)
    grouped = epoch_batches(1000, 4, seed=3, epoch=1, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(1000))  # the same items, each once
    assert grouped == epoch_batches(1000, 4, seed=3, epoch=1, lengths=lengths)  # seeded
    assert grouped != epoch_batches(1000, 4, seed=3, epoch=2, lengths=lengths)  # reshuffled per epoch

    def spread(batches):  # mean range of lengths within a batch
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)

    assert spread(grouped) < spread(plain) / 10


def test_padding_free_with_kto_is_refused():
    with pytest.raises(ConfigError, match="^padding_free: not supported with pref_loss: kto"):
        from_dict({"pref_loss": "kto", "padding_free": True})
