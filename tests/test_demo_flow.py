"""`preftune demo`: the review corpus and the sentiment reward are deterministic and mean what they
say; the whole flow (sft -> sample -> dpo -> eval) runs through the command, writes its outputs,
reuses its cached SFT model, and the DPO model's reward on held-out prompts is really above the SFT
model's."""

import json
import random

import pytest

from preftune.cli import main
from preftune.demo import (NEGATIVE, POSITIVE, make_review, sentiment, sentiment_score, well_formed,
                           write_review_data)
from preftune.rewards import load_reward

# A scaled-down flow: the default's steps and settings, a smaller corpus and model (about 10 s on an idle
# 2-core CPU). Measured lifts for seeds 0-3: +0.59, +0.67, +0.70, +0.65, each about 0.065 standard error.
TINY = ["--reviews", "2000", "--hidden", "64", "--layers", "2", "--sft_epochs", "6", "--prompts", "300",
        "--eval_prompts", "48"]


def read(path):
    return path.read_bytes()


def test_corpus_is_deterministic_by_seed_and_holds_prompts_out(tmp_path):
    a = write_review_data(tmp_path / "a", seed=3, reviews=300, prompts=40, eval_prompts=20)
    b = write_review_data(tmp_path / "b", seed=3, reviews=300, prompts=40, eval_prompts=20)
    c = write_review_data(tmp_path / "c", seed=4, reviews=300, prompts=40, eval_prompts=20)
    assert all(read(a[name]) == read(b[name]) for name in a)
    assert read(a["reviews"]) != read(c["reviews"])

    def prompts(path):
        return {json.loads(line)["prompt"] for line in path.read_text().splitlines()}

    # sampling and evaluation ask about films the SFT model never read a review of, and not the same ones
    seen, sampled, evaluated = prompts(a["reviews"]), prompts(a["prompts"]), prompts(a["eval_prompts"])
    assert len(sampled) == 40 and len(evaluated) == 20
    assert not seen & sampled and not seen & evaluated and not sampled & evaluated
    reviews = [json.loads(line) for line in a["reviews"].read_text().splitlines()]
    shares = {s: sum(r["sentiment"] == s for r in reviews) / len(reviews) for s in ("positive", "negative", "mixed")}
    assert all(0.25 < share < 0.42 for share in shares.values()), shares
    assert all(well_formed(r["completion"]) for r in reviews)


def test_sentiment_reward_scores_positive_above_negative():
    assert sentiment_score("The acting is superb. Highly recommended.") == 1.0
    assert sentiment_score("The plot is dull. What a mess.") == -1.0
    assert sentiment_score("The music is charming, but the ending is weak.") == 0.0
    assert sentiment_score("It runs about two hours.") == 0.0  # no sentiment word: neutral
    assert sentiment_score("I loved the cast. I hated the plot. A small masterpiece.") == pytest.approx(1 / 3)
    # a ratio, not a count: repeating a positive word earns nothing
    assert sentiment_score("brilliant " * 5) == sentiment_score("brilliant")
    assert not POSITIVE & NEGATIVE

    # every generated review scores as its label says, through the reward spec users give
    reward = load_reward("preftune.demo:sentiment")
    rng = random.Random(0)
    labelled = [make_review(rng) for _ in range(300)]
    scores = reward(["Review of The Quiet River:"] * len(labelled), [text for _, text in labelled])
    expected = {"positive": 1.0, "negative": -1.0, "mixed": 0.0}
    assert scores == [expected[label] for label, _ in labelled]
    assert scores == sentiment([""] * len(labelled), [text for _, text in labelled])


def test_well_formed_tells_sentences_from_word_salad():
    assert well_formed("I loved the acting. It runs about two hours.")
    assert well_formed("The plot is superb, but the music is superb.")  # odd, still a sentence
    assert not well_formed("I loved the acting. The plot is a moving.")
    assert not well_formed("Highly brilliant recommended.") and not well_formed("")


@pytest.mark.parametrize("args,message", [
    (["--sweep", "0.1,x"], "--sweep: expected a comma list of betas"),
    (["--beta", "-1"], "betas must be distinct positive numbers"),
    (["--prompts", "500", "--eval_prompts", "200"], "at most 600"),
    (["--pref_beta", "0.1"], "unknown option --pref_beta"),
    (["cfg.yaml"], "config file not found: cfg.yaml"),
])
def test_demo_refuses_bad_options_in_one_line(args, message, capsys):
    assert main(["demo", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.slow
@pytest.mark.one_process
def test_demo_flow_runs_end_to_end_and_dpo_beats_sft(tmp_path, capsys):
    out, cache = tmp_path / "demo", tmp_path / "cache"
    assert main(["demo", "--output_dir", str(out), "--cache_dir", str(cache), *TINY]) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "demo.json").read_text())

    # every step wrote what its own command writes
    for path in ("data/reviews.jsonl", "data/eval_prompts.jsonl", "sampled/samples.jsonl", "sampled/pairs.jsonl",
                 "dpo/model.safetensors", "dpo/dpo_metrics/summary.json", "eval/eval.json", "eval/samples.jsonl",
                 "eval/frontier.png"):
        assert (out / path).is_file(), path
    (sft_dir,) = [p for p in cache.iterdir()]
    assert result["sft_model"] == str(sft_dir) and not result["sft"]["cached"]
    assert result["sft"]["perplexity"][1] < 4 < result["sft"]["perplexity"][0]
    eval_report = json.loads((out / "eval" / "eval.json").read_text())
    assert eval_report["models"][0]["reference"] == str(sft_dir)  # DPO's reference: the SFT model

    # the printed report: completions before and after, the lift, the win rate, the KL, the accuracy
    assert printed.count("  before ") == 4 and printed.count("  after ") == 4
    assert "lift over SFT" in printed and "held-out preference accuracy" in printed and "KL (nats/sequence)" in printed

    # a real improvement: the DPO model's mean reward on held-out prompts is above the SFT model's by
    # several standard errors, its held-out accuracy is well above chance, and it spent some KL
    (dpo,) = result["models"]
    assert dpo["reward"] > result["reference"]["reward"]
    assert dpo["lift"] > 0.3 and dpo["lift"] > 4 * dpo["lift_stderr"], dpo
    assert dpo["win_rate"] > 0.6 and dpo["kl_per_sequence"] > 0
    assert dpo["heldout_accuracy"][0] == 0.5 and dpo["heldout_accuracy"][1] > 0.7
    assert result["sample"]["pairs"] > 250

    # a second run, a sweep over two betas, reuses the SFT model and, all seeded, reproduces the first run's
    # figures at its beta (0.1, the default); every beta is evaluated together (one run, not a second test's)
    again_dir = tmp_path / "again"
    assert main(["demo", "--output_dir", str(again_dir), "--cache_dir", str(cache), "--sweep", "0.1,0.5", *TINY]) == 0
    again = json.loads((again_dir / "demo.json").read_text())
    assert again["sft"]["cached"] and again["sft_model"] == str(sft_dir)
    assert [m["beta"] for m in again["models"]] == [0.1, 0.5]
    assert again["models"][0]["reward"] == pytest.approx(dpo["reward"])
    assert again["reference"]["reward"] == pytest.approx(result["reference"]["reward"])
    assert all((again_dir / f"dpo_beta{b}" / "model.safetensors").is_file() for b in ("0.1", "0.5"))
    rows = json.loads((again_dir / "eval" / "eval.json").read_text())["models"]
    assert [r["model"] for r in rows] == [str(again_dir / "dpo_beta0.1"), str(again_dir / "dpo_beta0.5")]
    assert (again_dir / "eval" / "frontier.png").stat().st_size > 1000
