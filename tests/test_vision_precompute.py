"""precompute_ref_log_probs with a vision-language model (preftune/reference.py; docs/vision.md).

* test_precomputed_reference_equals_the_frozen_copy: 2 steps and an evaluation on the tiny LLaVA of
  tests/test_vision.py (pairs with 0, 1 and 2 images, in training and validation) with the reference
  precomputed equal, step by step, those with the frozen copy of the starting model; a changed image then
  recomputes its split's log-probs (another cache key), where only its pair's differ; the other split is read
  from the cache.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from preftune import reference as reference_mod
from preftune import train as train_mod
from preftune.config import from_dict
from test_vision import build_llava, square, write_vision_pairs

COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
            "grad_norm", "eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margins")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tiny_tokenizer):
    return build_llava(tiny_tokenizer, tmp_path_factory.mktemp("llava"))


def test_precomputed_reference_equals_the_frozen_copy(llava_dir, demo_pairs, tmp_path, monkeypatch):
    scored = []  # (split size) of each precompute pass that ran the reference
    real_pair_logps = reference_mod.pair_logps

    def counting_pair_logps(scorer, pairs, *args, **kwargs):
        scored.append(len(pairs))
        return real_pair_logps(scorer, pairs, *args, **kwargs)

    monkeypatch.setattr(reference_mod, "pair_logps", counting_pair_logps)
    train = write_vision_pairs(tmp_path / "train", demo_pairs[:8])  # pair i has i % 3 images
    val = write_vision_pairs(tmp_path / "val", demo_pairs[8:12])

    def run(name, **over):
        train_mod.train(from_dict({
            "model_name_or_path": str(llava_dir), "dataset": str(train), "eval_dataset": str(val),
            "torch_dtype": "float32", "progress_bar": False, "plot_loss": False, "save_strategy": "no",
            "output_dir": str(tmp_path / name), "learning_rate": 0.05, "per_device_train_batch_size": 4,
            "max_steps": 2, "logging_steps": 1, "eval_steps": 2, "ref_logps_cache_dir": str(tmp_path / "cache"),
            **over}))
        return json.loads((tmp_path / name / "dpo_metrics" / "log_history.json").read_text())

    live = run("live")
    pre = run("pre", precompute_ref_log_probs=True)
    assert scored == [8, 4]
    assert [r["step"] for r in pre] == [r["step"] for r in live] == [0, 1, 2, 2]
    for row_live, row_pre in zip(live, pre):
        for key in COMPARED:
            if key in row_live:
                assert row_pre[key] == pytest.approx(row_live[key], rel=1e-5, abs=1e-5), (row_live["step"], key)
    assert abs(live[-1]["eval_loss"] - live[0]["eval_loss"]) > 0.01  # it trained: the comparison is not of constants
    first = {p.name: load_file(p)["logps"] for p in (tmp_path / "cache").glob("*.safetensors")}
    assert len(first) == 2

    square((90, 30, 200), (20, 24)).save(tmp_path / "train" / "img_4_0.png")  # pair 4's image, another colour
    run("recoloured", precompute_ref_log_probs=True, max_steps=1)
    assert scored == [8, 4, 8]  # the training split again; the validation split's (unchanged) read from the cache
    new = {p.name: load_file(p)["logps"] for p in (tmp_path / "cache").glob("*.safetensors") if p.name not in first}
    (new_train,) = new.values()
    (old_train,) = [t for t in first.values() if t.shape == (8, 2)]
    changed = ((new_train - old_train).abs() > 1e-4).any(dim=1)
    assert changed.sum() == 1  # the pair with that image (the others are the same numbers)
    torch.testing.assert_close(new_train[~changed], old_train[~changed], rtol=0, atol=1e-6)
