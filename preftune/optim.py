"""The optimizer and the learning-rate schedule a config names (transformers' `optim` and
`lr_scheduler_type` values), built from the parameters that train.

    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
"""

from __future__ import annotations

import importlib.util
import math

import torch

from preftune.errors import ConfigError

OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adamw_bnb_8bit", "paged_adamw_8bit",
              "paged_adamw_32bit")
# transformers' schedules, less reduce_lr_on_plateau (it steps on a metric, not once per step) and greedy
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")


def param_groups(model, weight_decay: float) -> list[dict]:
    # no decay on biases and norm weights (1-D tensors), as in most LM recipes
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, cfg) -> torch.optim.Optimizer:
    """cfg.optim over the trainable parameters, with cfg's learning rate, betas, epsilon and weight decay
    (as transformers' Trainer sets each up)."""
    try:
        return _make_optimizer(model, cfg)
    except ValueError as e:  # torch's own checks of the values (a beta outside [0, 1), ...): name the keys
        raise ConfigError(f"optim {cfg.optim}: {str(e).splitlines()[0]}; check learning_rate, adam_beta1, "
                          "adam_beta2, adam_epsilon and weight_decay") from None


def _make_optimizer(model, cfg) -> torch.optim.Optimizer:
    groups, lr = param_groups(model, cfg.weight_decay), cfg.learning_rate
    adam = {"lr": lr, "betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon}
    if cfg.optim in ("adamw", "adamw_torch", "adamw_torch_fused"):
        return torch.optim.AdamW(groups, **adam, fused=cfg.optim == "adamw_torch_fused" or None)
    if cfg.optim == "sgd":
        return torch.optim.SGD(groups, lr=lr)
    if cfg.optim == "adafactor":  # with an explicit learning rate, as the Trainer does
        from transformers.optimization import Adafactor

        return Adafactor(groups, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"optim: {cfg.optim} needs the bitsandbytes package; pip install bitsandbytes")
    import bitsandbytes as bnb

    kind = {"adamw_bnb_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
            "paged_adamw_32bit": bnb.optim.PagedAdamW32bit}[cfg.optim]
    return kind(groups, **adam)


def make_scheduler(optimizer, cfg, total_steps: int):
    """cfg.lr_scheduler_type over total_steps, after warmup (warmup_steps, else warmup_ratio of the
    steps), with lr_scheduler_kwargs. `constant` with warmup is `constant_with_warmup`: transformers'
    `constant` would silently ignore the warmup asked for."""
    from transformers import get_scheduler  # here: config imports this module, and transformers is slow to import

    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)
    name = "constant_with_warmup" if cfg.lr_scheduler_type == "constant" and warmup else cfg.lr_scheduler_type
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
                             scheduler_specific_kwargs=cfg.lr_scheduler_kwargs or None)
    except (TypeError, ValueError) as e:  # a keyword the schedule does not take, or one it needs
        raise ConfigError(f"lr_scheduler_kwargs for {name}: {str(e).splitlines()[0]}") from None
