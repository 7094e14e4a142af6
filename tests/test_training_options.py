"""Training options of transformers' TrainingArguments: neftune_noise_alpha (NEFTune noise on the
input embeddings while training only) and gradient_checkpointing_kwargs."""

import json
import math
from pathlib import Path

import pytest
import torch
from stand_ins import bind
from test_models import batch, cfg_for  # noqa: F401  (batch: a fixture)
from test_train import tiny_config

from preftune import models
from preftune import train as train_mod
from preftune.config import from_dict
from preftune.demo import make_pairs
from preftune.errors import ConfigError
from preftune.logps import get_batch_logps


def test_neftune_noise_is_uniform_at_alpha_over_sqrt_length_times_hidden(tiny_model_dir, batch):
    torch.manual_seed(0)
    policy = models.load_policy(cfg_for(tiny_model_dir, neftune_noise_alpha=5.0))
    embed = policy.get_input_embeddings()
    ids = batch["input_ids"]
    seen = []
    embed.register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))  # runs after NEFTune's
    policy.eval()
    clean = embed(ids)
    policy.train()
    noisy = embed(ids)
    assert torch.equal(seen[0], clean)  # eval mode: no noise
    noise = noisy - clean
    bound = 5.0 / math.sqrt(ids.shape[1] * clean.shape[2])
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert noise.abs().max() > 0.9 * bound  # fills [-bound, bound]
    assert noise.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # a uniform distribution's spread
    assert abs(noise.mean().item()) < 0.05 * bound


def test_neftune_leaves_evaluation_log_probs_unchanged(tiny_model_dir, batch):
    plain = models.load_policy(cfg_for(tiny_model_dir)).eval()
    noisy = models.load_policy(cfg_for(tiny_model_dir, neftune_noise_alpha=5.0)).eval()
    with torch.no_grad():
        assert torch.equal(get_batch_logps(plain, **batch)[0], get_batch_logps(noisy, **batch)[0])
        noisy.train()  # training mode: the noise moves the log-probs
        assert not torch.equal(get_batch_logps(plain, **batch)[0], get_batch_logps(noisy, **batch)[0])


def test_neftune_in_a_run_noises_training_not_evaluation(tmp_path, tiny_model_dir):
    """Before the first update the policy equals the reference: the baseline evaluation is exactly a tie
    (log 2) with NEFTune on, while the first training step's loss, on noisy embeddings, is not."""
    cfg = tiny_config(tmp_path, tiny_model_dir, max_steps=1, logging_steps=1, eval_steps=1, neftune_noise_alpha=5.0)
    train_mod.train(cfg)
    history = json.loads((Path(cfg.output_dir) / "dpo_metrics" / "log_history.json").read_text())
    baseline = next(r for r in history if r["step"] == 0)
    first = next(r for r in history if "loss" in r)
    assert baseline["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(first["loss"] - math.log(2)) > 1e-4
    with pytest.raises(ConfigError, match="neftune_noise_alpha must be a positive number"):
        cfg_for(tiny_model_dir, neftune_noise_alpha=-1)


def test_gradient_checkpointing_kwargs_reach_the_checkpoint_function(tiny_model_dir):
    policy = models.load_policy(cfg_for(tiny_model_dir, gradient_checkpointing=True,
                                        gradient_checkpointing_kwargs={"use_reentrant": True}))
    funcs = [m._gradient_checkpointing_func for m in policy.modules() if hasattr(m, "_gradient_checkpointing_func")]
    assert funcs and all(f.keywords == {"use_reentrant": True} for f in funcs)
    default = models.load_policy(cfg_for(tiny_model_dir, gradient_checkpointing=True))
    assert all(m._gradient_checkpointing_func.keywords == {"use_reentrant": False}
               for m in default.modules() if hasattr(m, "_gradient_checkpointing_func"))
    with pytest.raises(ConfigError, match="gradient_checkpointing_kwargs: used only with gradient_checkpointing"):
        cfg_for(tiny_model_dir, gradient_checkpointing_kwargs={"use_reentrant": True})


def test_torch_compile_compiles_the_backbones_with_dynamic_shapes(tiny_model_dir, monkeypatch):
    from preftune.models import load_policy, load_reference

    calls = []

    def compile_module(self, *args, **kwargs):  # nn.Module.compile hands its arguments on to torch.compile
        bind("torch", "compile", self, *args, **kwargs)  # its signature (tests/stand_ins.py): a wrong keyword fails
        calls.append((type(self).__name__, kwargs))

    monkeypatch.setattr(torch.nn.Module, "compile", compile_module)
    cfg = from_dict({"model_name_or_path": str(tiny_model_dir), "torch_compile": True,
                     "torch_compile_mode": "max-autotune"})
    load_policy(cfg)
    load_reference(cfg)
    assert calls == [("Qwen2Model", {"backend": "inductor", "mode": "max-autotune", "dynamic": True})] * 2
    calls.clear()
    load_policy(from_dict({"model_name_or_path": str(tiny_model_dir)}))
    assert calls == []


@pytest.mark.slow
@pytest.mark.one_process
def test_a_compiled_run_equals_the_eager_run(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in make_pairs(24, 0)))
    raw = {"model_name_or_path": str(tiny_model_dir), "dataset": str(data), "val_size": 8, "max_steps": 3,
           "logging_steps": 1, "per_device_train_batch_size": 4, "cutoff_len": 64, "torch_dtype": "float32",
           "progress_bar": False, "plot_loss": False, "learning_rate": 1e-3}
    rows = []
    for name, over in (("eager", {}), ("compiled", {"torch_compile": True})):
        train_mod.train(from_dict({**raw, **over, "output_dir": str(tmp_path / name)}))
        rows.append(json.loads((tmp_path / name / "dpo_metrics" / "log_history.json").read_text()))
    for eager, compiled in zip(*rows, strict=True):
        for key in ("loss", "rewards/margins", "grad_norm", "eval_loss"):
            if key in eager:
                assert compiled[key] == pytest.approx(eager[key], abs=1e-4, rel=1e-4), (eager["step"], key)
