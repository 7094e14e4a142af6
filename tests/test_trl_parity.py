"""Parity with TRL 1.16's DPOTrainer: same tiny model, reference and batch -> same numbers.

What is checked (float32, CPU, B=4 demo pairs, a reference with other weights than the policy):

* test_dpo_metrics_match_trl[sigmoid|hinge|ipo]: TRL tokenizes and collates the pairs; that very
  batch (input_ids, attention_mask, completion_mask) goes through TRL's `compute_loss` and through
  preftune's dpo step (`step.PreferenceStep`), for the whole batch (TRL logs means over the pairs) and for each
  pair as a one-pair batch (means over 4 pairs could hide per-pair errors that cancel). In two
  parts:
  1. log-probs: preftune's `get_batch_logps` (called by the step for the policy and the
     reference) against TRL's per-sequence log-probs (`compute_ref_log_probs`, the fused LM head
     code `_compute_loss` runs; the test checks it reproduces TRL's logged `logps/*` bit for bit).
  2. loss and statistics: the step run on TRL's log-probs (its `get_batch_logps` is
     wrapped to return TRL's values, with preftune's own completion lengths, which IPO uses), so
     the loss, `rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`,
     `logps/chosen` and `logps/rejected` are compared within atol 1e-5 with no float noise from
     part 1 in them.
* test_tokenization_matches_trl[plain|plain_tokenizer_template|chat]: preftune's `tokenize_pairs` gives
  the same prompt, chosen and rejected token ids as TRL's dataset preparation for all 64 demo pairs,
  and preftune's `collate` gives TRL's collated batch, for plain-text pairs (with a tokenizer without
  a chat template, and with one: TRL, like preftune, renders plain strings as raw text either way)
  and for conversational pairs rendered with the tokenizer's ChatML template.
* test_empty_completions_match_trl: an empty completion is EOS alone (plain) or the end of turn alone
  (conversational) in both.

Why two parts: summed completion log-probs are about -200 to -300 here, where one float32 ulp is
1.5e-5 to 3e-5. preftune and TRL compute the same per-token log-probs with different kernels and
sum them in a different order (index_add over scored tokens vs a sum over a padded row), so the
sums differ by a few ulps (up to 9.2e-5 over the 64 demo pairs, a relative 3e-7). That alone
breaks an absolute 1e-5 on log-probs, and it reaches the rewards times beta (1.4e-5 at beta=0.1,
1.4e-4 at beta=1, on the margins) and the losses. So log-probs are held to atol 1e-5 + rtol 1e-6 (float32
rounding), and everything computed from them to atol 1e-5 on identical log-probs.

Deliberate difference: preftune counts a reward tie as 0.5 in `rewards/accuracies`, TRL as 0.
The reference has other weights (another seed), so there are no ties, and the test asserts that
no margin is small enough for float noise to make or break one.
"""

import copy
import json

import pytest
import torch

import datasets  # noqa: E402  (test dependencies: a missing TRL must fail the suite, not skip it)
import trl  # noqa: E402

import preftune.logps
import preftune.reference  # noqa: E402
import preftune.step  # noqa: E402
from preftune.batching import collate  # noqa: E402
from preftune.config import from_dict  # noqa: E402
from preftune.data import PreferencePair, read_dataset  # noqa: E402
from preftune.demo import build_model  # noqa: E402
from preftune.logps import BatchLogps, get_batch_logps  # noqa: E402
from preftune.reference import Reference  # noqa: E402
from preftune.step import LogpsModule, PreferenceStep  # noqa: E402
from preftune.tokenization import tokenize_pairs  # noqa: E402

B = 4
# Per loss, a beta that keeps the numbers O(1) and exercises the loss's shape: for hinge, beta=2
# puts one of these pairs past the margin (loss clipped to 0) and the others inside it (and is
# not 1, where a missing beta would go unnoticed); for IPO, 1/(2*beta)=1 keeps the squared loss
# near 1 (at beta=0.1 it is ~25).
BETAS = {"sigmoid": 0.1, "hinge": 2.0, "ipo": 0.5}
STAT_KEYS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected"]
BATCH_KEYS = ("input_ids", "attention_mask", "completion_mask")
CHUNK_SIZE = 16  # preftune's LM-head chunk: small, so a batch spans several chunks
ATOL, LOGPS_RTOL = 1e-5, 1e-6


def _as_trl_dataset(pairs: list[dict], conversational: bool):
    if conversational:  # TRL renders these with the tokenizer's chat template
        pairs = [{"prompt": [{"role": "user", "content": p["prompt"]}],
                  "chosen": [{"role": "assistant", "content": p["chosen"]}],
                  "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs]
    else:
        pairs = [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]
    return datasets.Dataset.from_list(pairs)


def _trl_trainer(tmp_path, policy, reference, tokenizer, pairs, loss_type="sigmoid", beta=0.1,
                 conversational=True, **options):
    """A DPOTrainer on private copies of the models and tokenizer: TRL patches the models'
    forward (fused LM head) and sets pad ids on them, which must not reach preftune's models."""
    args = trl.DPOConfig(
        output_dir=str(tmp_path / f"trl_{loss_type}"), beta=beta, loss_type=loss_type,
        per_device_train_batch_size=B, report_to="none", max_length=None, bf16=False, fp16=False,
        use_cpu=True, activation_checkpointing=False, save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, seed=0, **options)
    trainer = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), args=args,
                             train_dataset=_as_trl_dataset(pairs, conversational),
                             processing_class=copy.deepcopy(tokenizer))
    assert trainer.model is not policy and trainer.ref_model is not reference
    assert trainer.model.dtype == trainer.ref_model.dtype == torch.float32
    return trainer


def _trl_step(trainer, batch):
    """TRL's loss and logged statistics (batch means) for one collated batch, and TRL's
    per-sequence log-probs (2B,) of the policy and the reference on it."""
    trainer.model.train()  # `_compute_loss` logs under _metrics["train"] in train mode
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if k in STAT_KEYS}
    metrics["loss"] = loss.item()
    assert set(metrics) == set(STAT_KEYS), sorted(metrics)
    policy_logps = torch.cat(trainer.compute_ref_log_probs(trainer.model, batch))
    reference_logps = torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, batch))
    # the same numbers `_compute_loss` used: its logged means are reproduced exactly
    n = len(policy_logps) // 2
    assert policy_logps[:n].mean().item() == metrics["logps/chosen"]
    assert policy_logps[n:].mean().item() == metrics["logps/rejected"]
    beta = trainer.beta
    assert (beta * (policy_logps[:n] - reference_logps[:n])).mean().item() == metrics["rewards/chosen"]
    return metrics, policy_logps.detach(), reference_logps.detach()


def preference_step(policy, reference, batch, loss_type, beta, **options):
    """preftune's dpo step (`step.PreferenceStep`) as a run builds it from its config, on the two
    models (reference as a live `reference.Reference`)."""
    cfg = from_dict({"pref_loss": loss_type, "pref_beta": beta, "logps_chunk_size": CHUNK_SIZE, **options})
    return PreferenceStep(cfg)(LogpsModule(policy, CHUNK_SIZE), Reference(reference, chunk_size=CHUNK_SIZE),
                               {k: batch[k] for k in BATCH_KEYS})


def _preftune_step(monkeypatch, policy, reference, batch, loss_type, beta, trl_logps):
    """preftune's dpo step on the batch, its log-probs replaced by TRL's (`trl_logps`:
    model -> (2B,)); returns the stats and preftune's own log-probs {model: (2B,)}."""
    own = {}

    def get_batch_logps_as_trl(model, input_ids, attention_mask, completion_mask, chunk_size=1024,
                               return_hidden=False, ld_alpha=None, wpo=False, position_ids=None, sequence_lengths=None,
                               score_index=None, score_rows=None, call_head=False, token_stats=False, router_aux=False,
                               media=None):
        assert not return_hidden and ld_alpha is None and not wpo and not router_aux  # no KL, LD-DPO, WPO, MoE here
        assert media is None  # text pairs: no images
        assert not token_stats  # (logits/* and entropy: on logged steps only, not these)
        assert position_ids is None and sequence_lengths is None and score_index is None  # padded rows, as TRL's
        logps, lengths = get_batch_logps(model, input_ids, attention_mask, completion_mask, chunk_size)[:2]
        own[model] = logps.detach()
        return BatchLogps(trl_logps[model].to(logps.dtype), lengths)

    # the policy is scored in logps.py (LogpsModule), the reference in reference.py (Reference.logps)
    monkeypatch.setattr(preftune.logps, "get_batch_logps", get_batch_logps_as_trl)
    monkeypatch.setattr(preftune.reference, "get_batch_logps", get_batch_logps_as_trl)
    policy.train()  # the training path: grad enabled, LM-head chunks recomputed in backward
    try:
        _, stats, _ = preference_step(policy, reference, batch, loss_type, beta)
    finally:
        monkeypatch.undo()
    assert set(own) == {policy, reference}, "the step did not score both models through get_batch_logps"
    return stats, own


def _check(loss_type, where, stats, metrics, own, trl_logps):
    """stats (preftune, per pair) vs metrics (TRL, means); own vs TRL per-sequence log-probs."""
    for model, logps in own.items():
        expected = trl_logps[model]
        diff = (logps - expected).abs()
        assert (diff <= ATOL + LOGPS_RTOL * expected.abs()).all(), \
            f"{loss_type} {where} log-probs: preftune {logps.tolist()} vs TRL {expected.tolist()}"
    for key in STAT_KEYS:
        actual, expected = stats[key].float().mean().item(), metrics[key]
        assert abs(actual - expected) <= ATOL, \
            f"{loss_type} {where} {key}: preftune {actual!r} vs TRL {expected!r} (diff {actual - expected:.3g})"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is as fast, and it keeps the file from slowing
    down tenfold (OpenMP spin-waits) when other processes share the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tiny_tokenizer):
    """(policy, reference): the saved tiny Qwen2 and another random init, both float32."""
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    reference = build_model(len(tiny_tokenizer), seed=1, hidden=32, layers=2).to(torch.float32).eval()
    assert not torch.equal(policy.get_output_embeddings().weight, reference.get_output_embeddings().weight)
    return policy, reference


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_metrics_match_trl(loss_type, models, tiny_tokenizer, demo_pairs, tmp_path, monkeypatch):
    policy, reference = models
    beta = BETAS[loss_type]
    trainer = _trl_trainer(tmp_path, policy, reference, tiny_tokenizer, demo_pairs[:B], loss_type, beta)
    rows = [trainer.train_dataset[i] for i in range(B)]
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].shape[0] == 2 * B
    assert batch["attention_mask"].sum() > batch["completion_mask"].sum() > 0
    assert (batch["attention_mask"] == 0).any(), "no padding in the batch: the test would not cover it"

    # the whole batch
    metrics, trl_pol, trl_ref = _trl_step(trainer, batch)
    trl_logps = {policy: trl_pol, reference: trl_ref}
    stats, own = _preftune_step(monkeypatch, policy, reference, batch, loss_type, beta, trl_logps)
    for key in STAT_KEYS:
        assert stats[key].shape == (B,), key
    _check(loss_type, "batch", stats, metrics, own, trl_logps)
    # per pair within the batch, against TRL's per-sequence log-probs and its reward definition
    # (beta * log-ratio, accuracy = chosen reward > rejected reward): the pairs stay in order
    expected = {"logps/chosen": trl_pol[:B], "logps/rejected": trl_pol[B:],
                "rewards/chosen": beta * (trl_pol[:B] - trl_ref[:B]),
                "rewards/rejected": beta * (trl_pol[B:] - trl_ref[B:])}
    expected["rewards/margins"] = expected["rewards/chosen"] - expected["rewards/rejected"]
    expected["rewards/accuracies"] = (expected["rewards/chosen"] > expected["rewards/rejected"]).float()
    for key, value in expected.items():
        torch.testing.assert_close(stats[key].float(), value, atol=ATOL, rtol=0, msg=lambda m, k=key: f"{k}: {m}")

    # the test can fail: real, distinct, tie-free numbers
    margins = stats["rewards/margins"]
    assert (margins.abs() > 1e-3 * beta).all(), f"a near-tie makes accuracy parity fragile: {margins.tolist()}"
    assert (stats["rewards/chosen"] != 0).all() and (stats["rewards/rejected"] != 0).all()
    assert 0 < stats["rewards/accuracies"].mean() < 1, "both right and wrong pairs, so accuracy is tested"
    assert (stats["logps/chosen"] < -1).all() and (stats["logps/rejected"] < -1).all()
    assert (stats["logps/chosen"] != stats["logps/rejected"]).all()
    assert stats["loss"].abs().sum() > 1e-3
    if loss_type == "hinge":  # both branches of max(0, 1 - beta*h)
        assert (stats["loss"] == 0).any() and (stats["loss"] > 0).any(), stats["loss"].tolist()
    if loss_type == "ipo":  # length-normalised: with summed log-ratios the loss would be far off
        lengths = batch["completion_mask"][:, 1:].sum(dim=1).float()
        h_sum = (trl_pol - trl_ref)[:B] - (trl_pol - trl_ref)[B:]
        assert (stats["loss"] - (h_sum - 1 / (2 * beta)) ** 2).abs().max() > 1e-2
        assert not torch.equal(lengths[:B], lengths[B:])

    # each pair on its own
    for i in range(B):
        one = trainer.data_collator([rows[i]])
        metrics, trl_pol, trl_ref = _trl_step(trainer, one)
        trl_logps = {policy: trl_pol, reference: trl_ref}
        stats, own = _preftune_step(monkeypatch, policy, reference, one, loss_type, beta, trl_logps)
        _check(loss_type, f"pair {i}", stats, metrics, own, trl_logps)


@pytest.mark.parametrize("options", [{"ld_alpha": 0.3}, {"use_weighting": True},
                                     {"ld_alpha": 0.5, "use_weighting": True}])
def test_ld_alpha_and_wpo_steps_match_trl(options, models, tiny_tokenizer, demo_pairs, tmp_path):
    """LD-DPO and WPO through the models: TRL 1.16's DPOTrainer with ld_alpha / use_weighting (its fused
    LM head's per-token log-probs and log sum p^2) against the dpo step with the same options
    (preftune's chunked LM head). The training loss and the logged logps/chosen, logps/rejected (LD-DPO
    weights them) and rewards/chosen, within the float noise of summed log-probs (module docstring)."""
    policy, reference = models
    trainer = _trl_trainer(tmp_path, policy, reference, tiny_tokenizer, demo_pairs[:B], "sigmoid", 0.1, **options)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(B)])
    trainer.model.train()
    trainer._metrics["train"].clear()
    trl_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    policy.train()
    losses, stats, _ = preference_step(policy, reference, batch, "sigmoid", 0.1, **options)
    assert losses.mean().item() == pytest.approx(trl_loss, abs=ATOL)
    for key in ("logps/chosen", "logps/rejected", "rewards/chosen"):
        assert stats[key].mean().item() == pytest.approx(metrics[key], abs=ATOL, rel=LOGPS_RTOL), key
    plain, _, _ = preference_step(policy, reference, batch, "sigmoid", 0.1)
    assert (losses - plain).abs().max() > 1e-3, "the option changed nothing: the test would not see it dropped"


@pytest.mark.parametrize("mode", ["plain", "plain_tokenizer_template", "chat"])
def test_tokenization_matches_trl(mode, models, tiny_tokenizer, demo_pairs, tmp_path):
    """preftune's own tokenization and collation give TRL's token ids.

    plain: tokenizer without a chat template; TRL appends the EOS string to the completion text
    and tokenizes prompt and prompt+completion, preftune tokenizes prompt+completion once and
    appends the EOS id. plain_tokenizer_template: the same plain strings with the tokenizer's ChatML
    template in place, which neither applies to plain strings (raw text, no `template` set). chat:
    conversational pairs, both render the ChatML template (the completion then ends with
    '<|im_end|>' and the template's trailing '\\n').
    For all 64 demo pairs the two agree on every id and every prompt/completion boundary in both
    modes: the prompts end in '?' and the completions start with a letter (plain), or the
    boundary is the template's '<|im_start|>assistant\\n' (chat), so no token spans it. Where
    one does, they can differ: see test_tokenization_boundary_cases.
    """
    tokenizer = copy.deepcopy(tiny_tokenizer)
    if mode == "plain":
        tokenizer.chat_template = None
    policy, reference = models
    trainer = _trl_trainer(tmp_path, policy, reference, tokenizer, demo_pairs, conversational=(mode == "chat"))
    trl_rows = [trainer.train_dataset[i] for i in range(len(demo_pairs))]

    ours = tokenize_pairs(tokenizer, [PreferencePair(**p, conversational=mode == "chat") for p in demo_pairs],
                          cutoff_len=100_000, template=None)
    assert len(ours) == len(trl_rows) == len(demo_pairs)
    if mode == "plain_tokenizer_template":  # the template is there, and neither used it
        assert tokenizer.chat_template and "<|im_start|>" not in tokenizer.decode(ours[0].chosen_ids)
    for i, (t, row) in enumerate(zip(ours, trl_rows)):
        assert not t.truncated
        assert t.chosen_start == t.rejected_start == len(row["prompt_ids"]), f"pair {i}: boundary"
        assert t.chosen_ids[:t.chosen_start] == row["prompt_ids"], f"pair {i}: prompt (chosen row)"
        assert t.rejected_ids[:t.rejected_start] == row["prompt_ids"], f"pair {i}: prompt (rejected row)"
        assert t.chosen_ids[t.chosen_start:] == row["chosen_ids"], f"pair {i}: chosen"
        assert t.rejected_ids[t.rejected_start:] == row["rejected_ids"], f"pair {i}: rejected"
        assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == (
            tokenizer.eos_token_id if mode != "chat" else tokenizer.encode("\n", add_special_tokens=False)[-1])
        assert tokenizer.eos_token_id in row["chosen_ids"]
        if mode == "chat":
            assert row["prompt_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")

    # and the collated batches are the same tensors
    ours_batch = collate(ours[:B], tokenizer.pad_token_id)
    trl_batch = trainer.data_collator(trl_rows[:B])
    for key in BATCH_KEYS:
        assert torch.equal(ours_batch[key], trl_batch[key]), key


@pytest.mark.parametrize("conversational", [False, True])
def test_empty_completions_match_trl(conversational, models, tiny_tokenizer, demo_pairs, tmp_path):
    """A pair with an empty chosen and one with an empty rejected: TRL keeps and trains on both, with the
    completion EOS alone (plain strings) or the template's end of turn alone; preftune gives the same ids."""
    pairs = [{**demo_pairs[0], "chosen": ""}, {**demo_pairs[1], "rejected": ""}]
    policy, reference = models
    trainer = _trl_trainer(tmp_path, policy, reference, tiny_tokenizer, pairs, conversational=conversational)
    records = [{"prompt": [{"role": "user", "content": p["prompt"]}],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}]} if conversational else p for p in pairs]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    ours = tokenize_pairs(copy.deepcopy(tiny_tokenizer), read_dataset(str(path), "data"), cutoff_len=100_000,
                          template=None)
    end = [tiny_tokenizer.eos_token_id] + ([tiny_tokenizer.encode("\n", add_special_tokens=False)[-1]]
                                            if conversational else [])
    for t, row, side in zip(ours, trainer.train_dataset, ("chosen", "rejected")):
        assert row[f"{side}_ids"] == end  # TRL: the empty completion is the end token(s) alone
        assert t.chosen_ids == row["prompt_ids"] + row["chosen_ids"]
        assert t.rejected_ids == row["prompt_ids"] + row["rejected_ids"]
        assert t.chosen_start == t.rejected_start == len(row["prompt_ids"])


def test_tokenization_boundary_cases(models, tiny_tokenizer, tmp_path):
    """Plain-text pairs whose boundary falls inside a token. Both keep the same ids and both count a
    token that spans the boundary as completion; they differ in one case only:

    TRL gives chosen and rejected one prompt (the shorter of the two common prefixes), preftune
    gives each its own boundary. With a prompt ending in a space, 'chess? ' + 'Sure!' merges the
    space into ' S' (completion in both), but 'chess? ' + 'Meh.' keeps ' ' as its own token,
    which preftune leaves in the rejected prompt and TRL scores as the rejected completion's
    first token. So the rejected completion is one token shorter in preftune, and its log-prob
    lacks log p(' ' | prompt); DPO on such pairs differs slightly from TRL (not a bug: the ' ' is
    prompt text; TRL makes the two prompts identical instead).
    """
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    cases = [  # (pair, rejected starts later in preftune than in TRL)
        ({"prompt": "How should I learn chess", "chosen": "? Sure! Start.", "rejected": "Meh."}, 0),
        ({"prompt": "How should I learn chess?", "chosen": "?! Sure", "rejected": "?! Meh."}, 0),
        ({"prompt": "How should I learn ch", "chosen": "ess fast", "rejected": "ess slow"}, 0),
        ({"prompt": "How should I learn chess? ", "chosen": "Sure!", "rejected": "Meh."}, 1),
    ]
    policy, reference = models
    trainer = _trl_trainer(tmp_path, policy, reference, tokenizer, [c for c, _ in cases], conversational=False)
    ours = tokenize_pairs(tokenizer, [PreferencePair(**c) for c, _ in cases], cutoff_len=100_000, template=None)
    for i, (t, row, (_, shift)) in enumerate(zip(ours, trainer.train_dataset, cases)):
        prompt_len = len(row["prompt_ids"])
        assert t.chosen_ids == row["prompt_ids"] + row["chosen_ids"], f"case {i}: chosen ids"
        assert t.rejected_ids == row["prompt_ids"] + row["rejected_ids"], f"case {i}: rejected ids"
        assert t.chosen_start == prompt_len, f"case {i}: chosen boundary"
        assert t.rejected_start == prompt_len + shift, f"case {i}: rejected boundary"
    assert tokenizer.decode(ours[3].rejected_ids[ours[3].rejected_start - 1]) == " "
