"""Every `optim` and `lr_scheduler_type` a config can name: built as transformers' Trainer builds them,
each schedule honouring the warmup (transformers' `constant` would ignore it), bad kwargs in one line."""

import json

import pytest
import torch

from preftune import train as train_mod
from preftune.config import from_dict
from preftune.errors import ConfigError
from preftune.optim import OPTIMIZERS, SCHEDULERS, make_optimizer, make_scheduler

# the schedules that need an argument of their own
KWARGS = {"cosine_with_min_lr": {"min_lr_rate": 0.1}, "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
          "warmup_stable_decay": {"num_decay_steps": 4}}


def tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))


@pytest.mark.parametrize("optim", OPTIMIZERS)
def test_every_optimizer_takes_a_step(optim):
    model = tiny()
    optimizer = make_optimizer(model, from_dict({"optim": optim, "learning_rate": 1e-2, "weight_decay": 0.1}))
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(3, 4)).pow(2).sum().backward()
    optimizer.step()  # bitsandbytes' (8-bit, paged) too: the test extra's bitsandbytes steps on a CPU
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    decays = sorted(g["weight_decay"] for g in optimizer.param_groups)
    assert decays == [0.0, 0.1]  # no decay on biases and norm weights


@pytest.mark.parametrize("name", SCHEDULERS)
def test_every_schedule_honours_the_warmup(name):
    optimizer = torch.optim.SGD(tiny().parameters(), lr=1.0)
    cfg = from_dict({"lr_scheduler_type": name, "warmup_steps": 4, "lr_scheduler_kwargs": KWARGS.get(name)})
    scheduler = make_scheduler(optimizer, cfg, total_steps=20)
    lrs = []
    for _ in range(6):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] < lrs[1] < lrs[2] and max(lrs) == pytest.approx(1.0), (name, lrs)  # a ramp up to the peak


def test_bad_scheduler_kwargs_are_one_line():
    optimizer = torch.optim.SGD(tiny().parameters(), lr=1.0)
    with pytest.raises(ConfigError, match="^lr_scheduler_kwargs for cosine_with_restarts: "):
        make_scheduler(optimizer, from_dict({"lr_scheduler_type": "cosine_with_restarts",
                                             "lr_scheduler_kwargs": {"num_cycle": 2}}), total_steps=10)
    with pytest.raises(ConfigError, match="lr_scheduler_type: unknown value 'reduce_lr_on_plateau'"):
        from_dict({"lr_scheduler_type": "reduce_lr_on_plateau"})


def test_a_run_with_adafactor_and_a_restarting_cosine(tmp_path, tiny_model_dir, demo_pairs):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in demo_pairs[:24]))
    summary = train_mod.train(from_dict({
        "model_name_or_path": str(tiny_model_dir), "dataset": str(data), "output_dir": str(tmp_path / "out"),
        "optim": "adafactor", "lr_scheduler_type": "cosine_with_restarts", "lr_scheduler_kwargs": {"num_cycles": 2},
        "warmup_steps": 1, "learning_rate": 1e-3, "max_steps": 3, "logging_steps": 1, "cutoff_len": 96,
        "torch_dtype": "float32", "progress_bar": False, "plot_loss": False}))
    assert summary["config"]["optim"] == "adafactor" and summary["steps"]["done"] == 3
    assert from_dict({"optimizer": "adamw"}).optim == "adamw"  # the earlier key name is an alias
