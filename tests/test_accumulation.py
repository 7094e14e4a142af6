"""The loop's core arithmetic in one process: a step of 4 accumulated micro-batches of 2 pairs is the
step of one batch of 8 (per-step metrics and final weights), with gradient clipping acting on every
step and an epoch whose last batch is short, so that a step never runs on past the end of an epoch."""

import pytest

from preftune import train as train_mod
from preftune.config import from_dict
from test_distributed import COMPARED, history, raw_config, same_weights


def test_four_accumulated_micro_batches_equal_one_batch_of_their_pairs(tmp_path, tiny_model_dir):
    # 33 pairs: batches of 8 are 8, 8, 8, 8, 1 per epoch; micro-batches of 2 are 16 x 2 and 1, so the fifth
    # step of each epoch holds one micro-batch of one pair. 7 steps run into the second epoch.
    over = {"max_grad_norm": 0.05, "max_steps": 7, "eval_steps": 5}
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "one"), **over)))
    train_mod.train(from_dict(raw_config(tmp_path, tiny_model_dir, output_dir=str(tmp_path / "accumulated"),
                                         per_device_train_batch_size=2, gradient_accumulation_steps=4, **over)))

    one, accumulated = history(tmp_path / "one"), history(tmp_path / "accumulated")
    assert [r["step"] for r in accumulated] == [r["step"] for r in one]
    for row_one, row in zip(one, accumulated):
        for key in COMPARED:
            # (the KL, logits/* and entropy: a sample of the step's last micro-batch, by design)
            if key in row_one and not key.startswith(("kl_", "logits/", "entropy")):
                assert row[key] == pytest.approx(row_one[key], abs=1e-5, rel=1e-5), (row_one["step"], key)
    trained = [r for r in accumulated if "grad_norm" in r]
    assert [r["step"] for r in trained] == list(range(1, 8))
    assert all(r["grad_norm"] > 0.05 for r in trained)  # clipping acted on every step
    # the fifth step ends the first epoch: its pair is the epoch's last, alone
    assert [r["epoch"] for r in trained][3:6] == [0.8, 1.0, 1.2]
    same_weights(tmp_path / "one", tmp_path / "accumulated")
