"""Parity with TRL 1.16's DPOTrainer: same tiny model, reference and batch -> same numbers.

What is checked:

* test_dpo_metrics_match_trl[sigmoid|hinge|ipo]: TRL tokenizes and collates B=4 pairs; that very
  batch (input_ids, attention_mask, completion_mask) goes through TRL's `compute_loss` and through
  preftune's `preference_step`, so only the math is compared: the loss and every `rewards/*` and
  `logps/*` statistic, for the batch (TRL logs batch means) and for each pair on its own
  (a one-pair batch through both), within atol 1e-5.
* test_tokenization_matches_trl[plain|chat]: preftune's `tokenize_pairs` gives the same prompt,
  chosen and rejected token ids as TRL's dataset preparation for all demo pairs, and preftune's
  `collate` gives TRL's collated batch, for plain-text pairs and for conversational pairs rendered
  with the tokenizer's ChatML template.

Deliberate difference: preftune counts a reward tie as 0.5 in `rewards/accuracies`, TRL as 0.
The reference here has other weights than the policy (another seed), so there are no ties, and
the test asserts that no margin is small enough for float noise to make one.

Tolerance: atol 1e-5, plus rtol 1e-6 for the summed log-probs (about -200 to -300 in float32,
where one ulp is 1.5e-5 to 3e-5): the two implementations sum the same per-token log-probs in a
different order (index_add vs sum over a padded row), which moves single sums by 1-4 ulps
(observed up to 6.1e-5 on a -301 sum). All other quantities are O(1) and held to atol 1e-5.
"""

import copy

import pytest
import torch

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from preftune.batching import collate  # noqa: E402
from preftune.data import PreferencePair  # noqa: E402
from preftune.demo import build_model  # noqa: E402
from preftune.losses import LOSSES  # noqa: E402
from preftune.tokenization import tokenize_pairs  # noqa: E402
from preftune.train import PolicyLogps, preference_step  # noqa: E402

B = 4
# Per loss, a beta that keeps the numbers O(1) and exercises the loss's shape: for hinge, beta=1
# puts one of these pairs past the margin (loss clipped to 0) and the others inside it; for IPO,
# 1/(2*beta)=1 keeps the squared loss near 1 (with beta=0.1 it would be ~25, where float32
# rounding alone is 2e-6).
BETAS = {"sigmoid": 0.1, "hinge": 1.0, "ipo": 0.5}
STAT_KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected"]
BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask")
CHUNK_SIZE = 16  # preftune's LM-head chunk: small, so a batch spans several chunks


def _close(actual: float, expected: float, key: str, where: str):
    rtol = 1e-6 if key.startswith("logps/") else 0.0
    assert abs(actual - expected) <= 1e-5 + rtol * abs(expected), \
        f"{where} {key}: preftune {actual!r} vs TRL {expected!r} (diff {actual - expected:.3g})"


def _as_trl_dataset(pairs: list[dict], conversational: bool):
    if conversational:  # TRL renders these with the tokenizer's chat template
        pairs = [{"prompt": [{"role": "user", "content": p["prompt"]}],
                  "chosen": [{"role": "assistant", "content": p["chosen"]}],
                  "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    else:
        pairs = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
    return datasets.Dataset.from_list(pairs)


def _trl_trainer(tmp_path, policy, reference, tokenizer, pairs, loss_type="sigmoid", beta=0.1,
                 conversational=True):
    """A DPOTrainer on private copies of the models and tokenizer: TRL patches the models'
    forward (fused LM head) and sets pad ids on them, which must not reach preftune's models."""
    args = trl.DPOConfig(
        output_dir=str(tmp_path / f"trl_{loss_type}"), beta=beta, loss_type=loss_type,
        per_device_train_batch_size=B, report_to="none", max_length=None, bf16=False, fp16=False,
        use_cpu=True, gradient_checkpointing=False, save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, seed=0)
    trainer = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                             train_dataset=_as_trl_dataset(pairs, conversational),
                             processing_class=copy.deepcopy(tokenizer))
    assert trainer.model is not policy and trainer.ref_model is not reference
    return trainer


def _trl_step(trainer, batch) -> dict[str, float]:
    """TRL's loss and logged statistics (batch means) for one collated batch."""
    trainer.model.train()  # `_compute_loss` logs under _metrics["train"] in train mode
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    out = {k: v[-1] for k, v in trainer._metrics["train"].items() if k in STAT_KEYS}
    out["loss"] = loss.item()
    assert set(out) == set(STAT_KEYS), sorted(out)
    return out


def _preftune_step(policy, reference, batch, loss_type, beta):
    batch = {k: batch[k] for k in BATCH_KEYS}
    policy.train()  # the training path: grad enabled, LM head chunks recomputed in backward
    _, stats = preference_step(PolicyLogps(policy, CHUNK_SIZE), reference, batch, LOSSES[loss_type], beta,
                               CHUNK_SIZE)
    return stats


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_tokenizer):
    """(policy, reference): the saved tiny Qwen2 and another random init, both float32."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = build_model(len(tiny_tokenizer), seed=1, hidden=32, layers=2).to(torch.float32).eval()
    assert not torch.equal(policy.get_output_embeddings().weight, reference.get_output_embeddings().weight)
    return policy, reference


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_metrics_match_trl(loss_type, models, tiny_tokenizer, demo_pairs, tmp_path):
    policy, reference = models
    beta = BETAS[loss_type]
    pairs = demo_pairs[:B]
    trainer = _trl_trainer(tmp_path, policy, reference, tiny_tokenizer, pairs, loss_type, beta)
    rows = [trainer.train_dataset[i] for i in range(B)]
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape[0] == 2 * B
    assert batch["attention_mask"].sum() > batch["completion_mask"].sum() > 0
    assert (batch["attention_mask"] == 0).any(), "no padding in the batch: the test would not cover it"

    # the whole batch: TRL logs means over the B pairs
    expected = _trl_step(trainer, batch)
    stats = _preftune_step(policy, reference, batch, loss_type, beta)
    for key in STAT_KEYS:
        assert stats[key].shape == (B,), key
        _close(stats[key].float().mean().item(), expected[key], key, f"{loss_type} batch mean")

    # the test can fail: real, distinct, tie-free numbers
    margins = stats["rewards/margins"]
    assert (margins.abs() > 1e-4).all(), f"a near-tie makes accuracy parity fragile: {margins.tolist()}"
    assert (stats["rewards/chosen"] != 0).all() and (stats["rewards/rejected"] != 0).all()
    assert 0 < stats["rewards/accuracies"].mean() < 1, "both right and wrong pairs, so accuracy is tested"
    assert (stats["logps/chosen"] < -1).all() and (stats["logps/rejected"] < -1).all()
    assert stats["loss"].abs().sum() > 1e-3
    if loss_type == "hinge":  # both branches of max(0, 1 - beta*h)
        assert (stats["loss"] == 0).any() and (stats["loss"] > 0).any(), stats["loss"].tolist()

    # each pair on its own (means over 4 pairs could hide a per-pair error that cancels)
    for i in range(B):
        one = trainer.data_collator([rows[i]])
        expected = _trl_step(trainer, one)
        stats = _preftune_step(policy, reference, one, loss_type, beta)
        for key in STAT_KEYS:
            _close(stats[key].item(), expected[key], key, f"{loss_type} pair {i}")


@pytest.mark.parametrize("mode", ["plain", "chat"])
def test_tokenization_matches_trl(mode, models, tiny_tokenizer, demo_pairs, tmp_path):
    """preftune's own tokenization and collation give TRL's token ids.

    plain: tokenizer without a chat template; TRL appends the EOS string to the completion text
    and tokenizes prompt and prompt+completion, preftune tokenizes prompt+completion once and
    appends the EOS id. chat: conversational pairs, both render the ChatML template (the
    completion then ends with '<|im_end|>' and the template's trailing '\\n').
    For these pairs the two agree on every id and on every prompt/completion boundary (no token
    merges across the boundary: the prompts end in '?' or '.' and the completions start with a
    letter). Where a token did merge across the boundary, they would split it differently:
    TRL ends the prompt where the tokenized prompt and prompt+completion diverge (the same
    point for chosen and rejected, the min of the two), preftune counts the merged token as
    completion and keeps a separate boundary for chosen and rejected.
    """
    tokenizer = copy.deepcopy(tiny_tokenizer)
    if mode == "plain":
        tokenizer.chat_template = None
    policy, reference = models
    trainer = _trl_trainer(tmp_path, policy, reference, tokenizer, demo_pairs, conversational=(mode == "chat"))
    trl_rows = [trainer.train_dataset[i] for i in range(len(demo_pairs))]

    ours = tokenize_pairs(tokenizer, [PreferencePair(**p) for p in demo_pairs], cutoff_len=100_000, template=None)
    assert len(ours) == len(trl_rows) == len(demo_pairs)
    for i, (t, row) in enumerate(zip(ours, trl_rows)):
        assert not t.truncated
        assert t.chosen_ids[:t.chosen_start] == row["prompt_ids"], f"pair {i}: prompt (chosen row)"
        assert t.rejected_ids[:t.rejected_start] == row["prompt_ids"], f"pair {i}: prompt (rejected row)"
        assert t.chosen_ids[t.chosen_start:] == row["chosen_ids"], f"pair {i}: chosen"
        assert t.rejected_ids[t.rejected_start:] == row["rejected_ids"], f"pair {i}: rejected"
        assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == (
            tokenizer.eos_token_id if mode == "plain" else tokenizer.encode("\n", add_special_tokens=False)[-1])
        assert tokenizer.eos_token_id in row["chosen_ids"]
        if mode == "chat":
            assert row["prompt_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")

    # and the collated batches are the same tensors
    ours_batch = collate(ours[:B], tokenizer.pad_token_id)
    trl_batch = trainer.data_collator(trl_rows[:B])
    for key in BATCH_KEYS:
        assert torch.equal(ours_batch[key], trl_batch[key]), key
