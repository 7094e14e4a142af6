"""End to end on a tiny local model: learning, outputs, reload, early stopping, checkpoints."""

import csv
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from preftune import train as train_mod
from preftune.batching import collate
from preftune.config import from_dict
from preftune.data import PreferencePair
from preftune.demo import make_pairs
from preftune.logps import get_batch_logps
from preftune.reference import Reference
from preftune.step import LogpsModule, PreferenceStep
from preftune.tokenization import tokenize_pairs

REQUIRED = ["step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected", "nll_loss", "kl_per_token", "kl_per_sequence", "grad_norm",
            "learning_rate", "tokens_per_second", "eval_loss", "eval_rewards/accuracies", "eval_rewards/margins",
            "eval_kl_per_token", "eval_kl_per_sequence", "eval_train_gap", "logits/chosen", "logits/rejected", "entropy",
            "eval_logits/chosen", "eval_entropy"]


def write_data(folder, n_train=320, n_val=64):
    folder.mkdir(parents=True, exist_ok=True)
    for name, pairs in (("train", make_pairs(n_train, 0)), ("val", make_pairs(n_val, 1))):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return folder / "train.jsonl", folder / "val.jsonl"


def tiny_config(tmp_path, model_dir, **over):
    train_file, val_file = write_data(tmp_path / "data")
    raw = {"model_name_or_path": str(model_dir), "dataset": str(train_file), "eval_dataset": str(val_file),
           "output_dir": str(tmp_path / "out"), "learning_rate": 2e-3, "per_device_train_batch_size": 16,
           "num_train_epochs": 2, "logging_steps": 5, "eval_steps": 10, "cutoff_len": 128,
           "torch_dtype": "float32", "progress_bar": False, "warmup_ratio": 0.1}
    return from_dict({**raw, **over})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("run")
    cfg = tiny_config(tmp, tiny_model_dir)
    return cfg, train_mod.train(cfg)


def test_heldout_accuracy_rises(trained):
    _, summary = trained
    assert summary["baseline"]["eval_rewards/accuracies"] == 0.5  # policy == reference: every pair a tie
    assert summary["baseline"]["eval_loss"] == pytest.approx(0.693147, abs=1e-5)  # log 2
    assert summary["final"]["eval_rewards/accuracies"] > 0.8
    assert summary["final"]["eval_loss"] < 0.5 and summary["final"]["eval_rewards/margins"] > 0
    assert summary["final"]["eval_kl_per_token"] > 0
    # nats per completion: the per-token KL times the validation completions' mean length (tens of tokens)
    assert summary["final"]["eval_kl_per_sequence"] > 5 * summary["final"]["eval_kl_per_token"]


def test_output_files_are_well_formed(trained):
    cfg, summary = trained
    metrics = Path(cfg.output_dir) / "dpo_metrics"
    with open(metrics / "training_metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert set(REQUIRED) <= set(rows[0])
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == summary["steps"]["done"] == 40
    assert all(r["loss"] for r in rows if int(r["step"]) % 5 == 0 and int(r["step"]) > 0)
    assert all(0 < float(r["entropy"]) < 6.0 for r in rows if r["entropy"])  # nats, below log(vocabulary 400)
    history = json.loads((metrics / "log_history.json").read_text())
    assert len(history) == 8 + 5  # 8 logging steps, 4 evaluations + the baseline
    saved = json.loads((metrics / "summary.json").read_text())
    assert saved["config"]["pref_beta"] == 0.1 and saved["data"]["train"] == 320 and saved["data"]["eval"] == 64
    assert {"baseline", "final", "best", "timings", "metric_notes"} <= set(saved)
    assert (metrics / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_model_reloads_with_the_same_logps(trained):
    cfg, summary = trained
    model = AutoModelForCausalLM.from_pretrained(cfg.output_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(cfg.output_dir)
    pairs = [PreferencePair(**p) for p in make_pairs(64, 1)]
    batch = collate(tokenize_pairs(tokenizer, pairs, cfg.cutoff_len, None), tokenizer.pad_token_id)
    with torch.no_grad():
        logps, _ = get_batch_logps(model, **batch)[:2]
    assert logps[:64].mean().item() == pytest.approx(summary["final"]["eval_logps/chosen"], abs=1e-4)
    assert logps[64:].mean().item() == pytest.approx(summary["final"]["eval_logps/rejected"], abs=1e-4)


def test_early_stopping_keeps_the_best_model(tmp_path, tiny_model_dir, monkeypatch):
    scripted = iter([0.69, 0.5, 0.4, 0.45, 0.47, 0.9, 0.9])  # baseline, then evals at steps 2, 4, 6, 8
    real_evaluate = train_mod.evaluate

    def fake_evaluate(*args, **kwargs):
        return {**real_evaluate(*args, **kwargs), "eval_loss": next(scripted)}

    monkeypatch.setattr(train_mod, "evaluate", fake_evaluate)
    cfg = tiny_config(tmp_path, tiny_model_dir, eval_steps=2, logging_steps=1, early_stopping_patience=2,
                      max_steps=20)
    summary = train_mod.train(cfg)
    assert summary["stopped_early"] and summary["steps"]["done"] == 8
    assert summary["kept_model"]["step"] == 4 and summary["best"]["step"] == 4
    final = AutoModelForCausalLM.from_pretrained(cfg.output_dir).state_dict()
    best = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "best_model").state_dict()
    assert all(torch.equal(final[k], best[k]) for k in best)


def test_checkpoints_are_rotated_and_loadable(tmp_path, tiny_model_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, max_steps=6, save_steps=2, save_total_limit=2, eval_strategy="no")
    train_mod.train(cfg)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not list(out.glob(".*tmp*"))
    AutoModelForCausalLM.from_pretrained(out / "checkpoint-6")
    assert json.loads((out / "checkpoint-6" / "preftune_step.json").read_text()) == {"step": 6}
    saved = {p.name for p in (out / "checkpoint-6").iterdir()}
    assert {"optimizer.pt", "scheduler.json", "trainer_state.json", "rng_state_0.json"} <= saved


def test_loop_and_evaluation_bind_the_loss_hyperparameters(tmp_path, tiny_model_dir, monkeypatch):
    """label_smoothing from the config reaches the loss in training and in evaluation steps."""
    import functools

    from preftune import losses

    seen = []

    @functools.wraps(losses.exo_pair_loss)  # the same signature: the config binds the same keys
    def recording_exo_pair(*args, **kwargs):
        seen.append(kwargs)
        return losses.exo_pair_loss(*args, **kwargs)

    monkeypatch.setitem(losses.LOSSES, "exo_pair", recording_exo_pair)
    cfg = tiny_config(tmp_path, tiny_model_dir, pref_loss="exo_pair", dpo_label_smoothing=1e-3, max_steps=2,
                      eval_steps=2, logging_steps=1)
    summary = train_mod.train(cfg)
    # 2 train + eval batches; exo_pair also takes the f-divergence, at its default
    assert len(seen) >= 3 and all(kwargs == {"label_smoothing": 1e-3, "f_divergence_type": "reverse_kl",
                                             "f_alpha_divergence_coef": 0.5} for kwargs in seen)
    assert summary["config"]["label_smoothing"] == 1e-3


@pytest.mark.parametrize("loss,beta", [("simpo", 2.0), ("orpo", 0.1), ("simpo,sft", 2.0)])
def test_reference_free_loss_loads_no_reference_and_learns(tmp_path, tiny_model_dir, monkeypatch, loss, beta):
    """simpo and orpo: one model loaded (the policy), no reference forward, no KL column, and held-out
    accuracy (beta * average log-prob of chosen > of rejected) rises from its step-0 value."""
    from preftune import models

    loaded = []
    real_load_model = models.load_model

    def counting_load_model(name, cfg, what="model_name_or_path", **kwargs):
        loaded.append(what)
        return real_load_model(name, cfg, what, **kwargs)

    monkeypatch.setattr(models, "load_model", counting_load_model)
    cfg = tiny_config(tmp_path, tiny_model_dir, pref_loss=loss, pref_beta=beta, max_steps=12, eval_steps=12,
                      logging_steps=4, per_device_train_batch_size=8)
    summary = train_mod.train(cfg)
    assert loaded == ["model_name_or_path"]
    assert summary["final"]["eval_rewards/accuracies"] > summary["baseline"]["eval_rewards/accuracies"] + 0.1
    assert summary["final"]["eval_loss"] < summary["baseline"]["eval_loss"]
    rows = json.loads((Path(cfg.output_dir) / "dpo_metrics" / "log_history.json").read_text())
    assert not any("kl_per" in key for row in rows for key in row)  # absent, not 0
    assert all("loss" in row or "eval_loss" in row for row in rows)


def test_dpo_step_adds_pref_ftx_and_logs_the_chosen_nll(tiny_model_dir):
    """On the tiny model: loss(pref_ftx = 0.5) - loss(pref_ftx = 0) = 0.5 * nll_loss per pair, and
    nll_loss = -log pi(chosen) / (chosen completion tokens), from the same forward pass."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [PreferencePair(**p) for p in make_pairs(4, 1)]
    batch = collate(tokenize_pairs(tokenizer, pairs, 128, None), tokenizer.pad_token_id)
    policy, reference = LogpsModule(model, 1024), Reference(model)
    with torch.no_grad():
        plain, stats, _ = PreferenceStep(from_dict({}))(policy, reference, batch)
        with_nll, _, _ = PreferenceStep(from_dict({"pref_ftx": 0.5}))(policy, reference, batch)
        logps, lengths = get_batch_logps(model, **batch)[:2]
    assert torch.allclose(stats["nll_loss"], -logps[:4] / lengths[:4])
    assert torch.allclose(with_nll - plain, 0.5 * stats["nll_loss"])
