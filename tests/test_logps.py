"""get_batch_logps against the naive full-logits computation, values and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import PretrainedConfig

from preftune import logps as logps_module
from preftune.batching import collate
from preftune.data import PreferencePair
from preftune.demo import build_model
from preftune.logps import completion_kl, get_batch_logps, kl_metrics
from preftune.tokenization import tokenize_pairs


def naive_logps(model, input_ids, attention_mask, completion_mask):
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()  # (2B, T-1, V)
    token_logps = torch.gather(F.log_softmax(logits, -1), 2, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


def make_batch(tokenizer, demo_pairs, n=3):
    pairs = [PreferencePair(**p) for p in demo_pairs[:n]]
    return collate(tokenize_pairs(tokenizer, pairs, 256, None), tokenizer.pad_token_id)


@pytest.mark.parametrize("keep_bytes", [0, 2**40], ids=["recomputed", "kept"])
def test_chunked_logps_equal_naive_values_and_gradients(tiny_tokenizer, demo_pairs, monkeypatch, keep_bytes):
    """Both ways of the backward: each chunk's logits recomputed (large batches) or kept (small ones)."""
    monkeypatch.setattr(logps_module, "KEEP_LOGITS_BYTES", keep_bytes)
    recomputed = []
    monkeypatch.setattr(logps_module, "checkpoint", lambda *a, **k: recomputed.append(1) or checkpoint(*a, **k))
    batch = make_batch(tiny_tokenizer, demo_pairs)
    assert batch["input_ids"].shape[0] == 6 and (batch["attention_mask"] == 0).any()  # padding present
    model = build_model(len(tiny_tokenizer), seed=1, hidden=32, layers=2)
    expected = naive_logps(model, **batch)
    expected.sum().backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    logps, lengths = get_batch_logps(model, chunk_size=5, **batch)[:2]  # many chunks, one ragged
    torch.testing.assert_close(logps, expected, rtol=1e-6, atol=1e-5)  # fp32 sums of ~250: order-of-summation noise
    assert lengths.tolist() == batch["completion_mask"].sum(1).tolist()
    logps.sum().backward()
    for p, g in zip(model.parameters(), expected_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)
    assert bool(recomputed) == (keep_bytes == 0)


def test_chosen_and_rejected_rows_are_independent_of_padding(tiny_tokenizer, demo_pairs):
    model = build_model(len(tiny_tokenizer), seed=1, hidden=32, layers=2)
    together, _ = get_batch_logps(model, **make_batch(tiny_tokenizer, demo_pairs, 3))[:2]
    alone, _ = get_batch_logps(model, **make_batch(tiny_tokenizer, demo_pairs[:1], 1))[:2]
    torch.testing.assert_close(together[[0, 3]], alone, rtol=0, atol=1e-5)


def test_completion_kl_is_zero_for_identical_models_and_exact_otherwise(tiny_tokenizer, demo_pairs):
    batch = make_batch(tiny_tokenizer, demo_pairs)
    a = build_model(len(tiny_tokenizer), seed=1, hidden=32, layers=2)
    b = build_model(len(tiny_tokenizer), seed=2, hidden=32, layers=2)
    with torch.no_grad():
        h_a = get_batch_logps(a, return_hidden=True, **batch).hidden
        h_b = get_batch_logps(b, return_hidden=True, **batch).hidden
    kl, n = completion_kl(a, a, h_a, h_a, chunk_size=7)
    assert abs(kl.item()) < 1e-5 and n == int(batch["completion_mask"][:, 1:].sum())
    kl_ab, _ = completion_kl(a, b, h_a, h_b)
    # exact KL from the full distributions, per token
    with torch.no_grad():
        lp = F.log_softmax(a(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1], -1)
        lq = F.log_softmax(b(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1], -1)
    per_token = (lp.exp() * (lp - lq)).sum(-1)
    torch.testing.assert_close(kl_ab, (per_token * batch["completion_mask"][:, 1:]).sum(), rtol=1e-5, atol=1e-5)
    assert kl_ab.item() > 0
    subset, m = completion_kl(a, b, h_a, h_b, max_tokens=10)
    assert m == 10 and 0 < subset.item() < kl_ab.item()


class HeadOnly:
    """A model that is only its LM head, logits = hidden @ weight.T: hand-set next-token distributions."""

    def __init__(self, weight):
        self.head = torch.nn.Linear(weight.size(1), weight.size(0), bias=False)
        self.head.weight.data = weight
        self.config = PretrainedConfig()

    def get_output_embeddings(self):
        return self.head


def test_kl_per_sequence_is_the_per_token_kl_times_the_completion_length():
    """pi = (3/4, 1/4) at every token (logits log 3/4, log 1/4), pi_ref uniform (zero logits):
    KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812 nats per token.
    Two completions of 3 and 1 tokens: 4 tokens, 0.523248 nats in all, so 0.130812 per token and
    0.523248 / 2 = 0.261624 per sequence (completion) = 0.130812 x the mean length 2.
    Scoring an evenly spaced subset of the tokens (training rows) keeps both, the KL being the same at each."""
    hidden = torch.tensor([[0.75, 0.25]]).log().expand(4, 2)  # (N=4, H=2) the scored positions
    policy, reference = HeadOnly(torch.eye(2)), HeadOnly(torch.zeros(2, 2))
    lengths = torch.tensor([3, 1])  # (S=2,) completion lengths
    per_token = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert per_token == pytest.approx(0.130812, abs=1e-6)
    for max_tokens, scored in ((None, 4), (2, 2)):
        total, n = completion_kl(policy, reference, hidden, hidden, max_tokens=max_tokens)
        assert n == scored and total.item() == pytest.approx(scored * per_token, rel=1e-5)
        metrics = kl_metrics(total.item(), n, lengths)
        kl_sum, tokens = metrics["kl_per_token"]
        seq_sum, sequences = metrics["kl_per_sequence"]
        assert tokens == scored and sequences == 2
        assert kl_sum / tokens == pytest.approx(0.130812, abs=1e-6)
        assert seq_sum / sequences == pytest.approx(0.261624, abs=1e-6)
        assert seq_sum / sequences == pytest.approx(kl_sum / tokens * 2, rel=1e-6)  # x the mean completion length


def test_bf16_autocast_on_cpu_scores_the_head_in_fp32(tiny_tokenizer, demo_pairs):
    batch = make_batch(tiny_tokenizer, demo_pairs)
    model = build_model(len(tiny_tokenizer), seed=1, hidden=32, layers=2)
    with torch.no_grad():
        exact, _ = get_batch_logps(model, **batch)[:2]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed, _ = get_batch_logps(model, **batch)[:2]
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=2e-2, atol=0.5)  # only the bf16 backbone differs


def test_ld_alpha_zero_scores_only_the_shared_length_and_alpha_interpolates(tiny_tokenizer, demo_pairs):
    """LD-DPO: with ld_alpha = 0 the longer completion of each pair is scored as if cut to the shorter
    one's length (the causal model cannot see what follows), and the lengths stay the full ones;
    ld_alpha = a gives shared + a * tail."""
    batch = make_batch(tiny_tokenizer, demo_pairs)
    model = build_model(len(tiny_tokenizer), seed=1, hidden=32, layers=2)
    lengths = batch["completion_mask"][:, 1:].sum(1)
    B = len(lengths) // 2
    assert not torch.equal(lengths[:B], lengths[B:])
    cut = batch["completion_mask"].clone()
    shared = torch.minimum(lengths[:B], lengths[B:]).repeat(2)
    for row in range(2 * B):
        positions = cut[row].nonzero()[:, 0]
        cut[row, positions[shared[row]:]] = 0
    with torch.no_grad():
        full, _ = get_batch_logps(model, **batch)[:2]
        short, _ = get_batch_logps(model, **{**batch, "completion_mask": cut})[:2]
        ld0, ld_lengths = get_batch_logps(model, ld_alpha=0.0, **batch)[:2]
        ld_half, _ = get_batch_logps(model, ld_alpha=0.5, **batch)[:2]
    torch.testing.assert_close(ld0, short, rtol=0, atol=1e-5)
    torch.testing.assert_close(ld_half, short + 0.5 * (full - short), rtol=0, atol=1e-4)
    assert torch.equal(ld_lengths, lengths) and (full - short).abs().max() > 1


def test_wpo_weights_equal_the_full_logits_formula_and_carry_no_gradient(tiny_tokenizer, demo_pairs):
    """WPO's per-sequence weight exp(mean_t [log p(y_t) - log sum_v p(v)^2]) from the chunked head equals
    the one from the full softmax; the log-probs (and their gradients) are unchanged by asking for it."""
    batch = make_batch(tiny_tokenizer, demo_pairs)
    model = build_model(len(tiny_tokenizer), seed=1, hidden=32, layers=2)
    with torch.no_grad():
        lp = F.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1], -1)
    token = lp.gather(2, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    aligned = (token - torch.logsumexp(2 * lp, -1)) * batch["completion_mask"][:, 1:]
    expected = torch.exp(aligned.sum(1) / batch["completion_mask"][:, 1:].sum(1))
    out = get_batch_logps(model, chunk_size=5, wpo=True, **batch)
    logps, weights = out.logps, out.wpo_weights
    torch.testing.assert_close(weights, expected, rtol=1e-5, atol=0)
    assert not weights.requires_grad and logps.requires_grad
    torch.testing.assert_close(logps, get_batch_logps(model, chunk_size=5, **batch)[0], rtol=0, atol=0)
    assert (weights - 1).abs().max() > 1e-2  # not all 1 (a random model is near-uniform, so near 1)


def test_a_sequence_split_shifts_the_targets_before_slicing():
    """sequence_parallel_size: the slices of a row, side by side, are the row padded to a multiple of the parts,
    with each position's target the next token (a slice's last predicts the next slice's first) and positions
    counting over the whole row."""
    from preftune.logps import sequence_slice

    input_ids = torch.tensor([[5, 6, 7, 8, 9]])  # T = 5 -> W = 6 for 2 parts
    completion_mask = torch.tensor([[0, 0, 1, 1, 1]])
    parts = [sequence_slice(input_ids, completion_mask, k, 2) for k in range(2)]
    ids, positions, targets, score = (torch.cat(p, dim=1) for p in zip(*parts))
    assert ids.tolist() == [[5, 6, 7, 8, 9, 0]] and positions.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert targets.tolist() == [[6, 7, 8, 9, 0, 0]] and score.tolist() == [[0, 1, 1, 1, 0, 0]]
    assert parts[0][0].tolist() == [[5, 6, 7]] and parts[1][2].tolist() == [[9, 0, 0]]
