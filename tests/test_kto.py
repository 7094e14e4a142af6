"""KTO's unpaired path: tokenization (pairs split in two), the mismatched KL rows, and a tiny run."""

import json

import pytest

from preftune import train as train_mod
from preftune.batching import collate_unpaired
from preftune.config import from_dict
from preftune.data import PreferencePair, UnpairedExample
from preftune.demo import make_pairs
from preftune.tokenization import TokenizedExample, tokenize_examples, tokenize_pairs


def test_collate_unpaired_pairs_each_prompt_with_the_previous_completion():
    # prompt tokens 1.., completion tokens 10.. / 20.. / 30..; pad 0
    examples = [TokenizedExample([1, 2, 10, 11], 2, True), TokenizedExample([3, 20, 21, 22], 1, False),
                TokenizedExample([4, 5, 6, 30], 3, True)]
    batch = collate_unpaired(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 10, 11], [3, 20, 21, 22], [4, 5, 6, 30]]
    assert batch["labels"].tolist() == [True, False, True]
    # (x_1, y_3), (x_2, y_1), (x_3, y_2), cut to the batch's width 4
    assert batch["kl_input_ids"].tolist() == [[1, 2, 30, 0], [3, 10, 11, 0], [4, 5, 6, 20]]
    assert batch["kl_completion_mask"].tolist() == [[0, 0, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]]
    assert batch["kl_attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


def test_kl_rows_skip_a_neighbour_with_the_same_prompt():
    """A pair split in two puts one prompt's two answers side by side (evaluation keeps that order):
    the KL row takes the nearest earlier example with another prompt, never the prompt's own answer.
    A batch of one prompt can only fall back to the rotation."""
    same_a, same_b = TokenizedExample([1, 2, 10], 2, True), TokenizedExample([1, 2, 20], 2, False)
    other_a, other_b = TokenizedExample([3, 4, 30], 2, True), TokenizedExample([3, 4, 40], 2, False)
    batch = collate_unpaired([same_a, same_b, other_a, other_b], pad_token_id=0)
    # x1 <- y4 (previous, cyclic), x1' <- y4 (skips y1 of its own prompt), x3 <- y2, x3' <- y2
    assert batch["kl_input_ids"].tolist() == [[1, 2, 40], [1, 2, 40], [3, 4, 20], [3, 4, 20]]
    alone = collate_unpaired([same_a], pad_token_id=0)
    assert alone["kl_input_ids"].tolist() == [[1, 2, 10]]


def test_pairs_are_split_into_a_desirable_and_an_undesirable_example(tiny_tokenizer):
    pair = PreferencePair(prompt="What is 2+2?", chosen="4", rejected="5")
    one = UnpairedExample(prompt="Name a colour.", completion="Blue", label=False)
    examples = tokenize_examples(tiny_tokenizer, [pair, one], 64, None)
    tokenized = tokenize_pairs(tiny_tokenizer, [pair], 64, None)[0]
    assert [(e.ids, e.start, e.label) for e in examples[:2]] == [
        (tokenized.chosen_ids, tokenized.chosen_start, True), (tokenized.rejected_ids, tokenized.rejected_start, False)]
    assert examples[2].label is False and tiny_tokenizer.decode(examples[2].ids[examples[2].start:]).startswith("Blue")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_kto_trains_on_unpaired_and_paired_data(tmp_path, tiny_model_dir):
    """Unpaired examples (half desirable) plus pairs in one dataset; evaluation on pairs, split. At step 0
    (policy = reference: r = 0, z_ref = 0) each example's loss is w (1 - sigmoid(0)) = w / 2, so the
    baseline eval loss is (1.5 + 1) / 4 with kto_chosen_weight 1.5; training must lower it and put
    desirable and undesirable rewards on either side of the reference point."""
    pairs = make_pairs(40, 0)
    unpaired = [{"prompt": p["prompt"], "completion": p["chosen" if i % 2 else "rejected"], "label": bool(i % 2)}
                for i, p in enumerate(pairs[:32])]
    (tmp_path / "unpaired.jsonl").write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[32:]))  # 8 pairs: 16 examples
    (tmp_path / "val.jsonl").write_text("".join(json.dumps(p) + "\n" for p in make_pairs(8, 1)))
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "dataset": f"{tmp_path / 'unpaired.jsonl'},{tmp_path / 'pairs.jsonl'}",
                     "eval_dataset": str(tmp_path / "val.jsonl"), "output_dir": str(tmp_path / "out"),
                     "pref_loss": "kto", "kto_chosen_weight": 1.5, "learning_rate": 3e-3,
                     "per_device_train_batch_size": 8, "num_train_epochs": 2, "logging_steps": 3,
                     "cutoff_len": 128, "torch_dtype": "float32", "progress_bar": False, "eval_strategy": "epoch"})
    summary = train_mod.train(cfg)
    baseline, final = summary["baseline"], summary["final"]
    assert summary["data"]["train"] == 40  # records; the 8 pairs become 16 examples
    assert baseline["eval_loss"] == pytest.approx((1.5 + 1) / 4, abs=1e-6)
    assert baseline["eval_z_ref"] == 0 and baseline["eval_rewards/chosen"] == 0
    assert final["eval_loss"] < baseline["eval_loss"] - 0.05
    # desirable answers rise above the reference point beta * z_ref (z_ref is a log-ratio, as TRL's
    # `kl`), and clearly above the undesirable ones (which sit near it on this task)
    assert final["eval_rewards/chosen"] > cfg.pref_beta * final["eval_z_ref"] > 0
    assert final["eval_rewards/chosen"] - final["eval_rewards/rejected"] > 0.3
    assert final["eval_kl_per_token"] > 0 and "rewards/accuracies" not in final


def test_an_example_that_cannot_fit_is_dropped_counted_and_the_labels_stay_aligned(tiny_tokenizer):
    """A dropped example must not shift the labels of the ones after it."""
    from preftune.tokenization import TokenizeReport

    long_prompt = " ".join(["word"] * 200)
    examples = [UnpairedExample(prompt="Say yes.", completion="Yes", label=True),
                # a long completion after a much longer prompt: LLaMA-Factory's budget gives it 0 tokens
                UnpairedExample(prompt=long_prompt, completion=" ".join(["no"] * 12), label=True),
                UnpairedExample(prompt="Say no.", completion="Nope", label=False)]
    report = TokenizeReport()
    out = tokenize_examples(tiny_tokenizer, examples, 16, None, report)
    assert report.dropped == 1 and [e.label for e in out] == [True, False]
    assert tiny_tokenizer.decode(out[1].ids[out[1].start:]).startswith("Nope")
