"""The best model seen: metric_for_best_model, load_best_model_at_end and early stopping.

    best = BestModel(cfg)
    if best.update(row, step, engine, policy, tokenizer, drift):   # each evaluation row; True: early stopping
        ...
    load_best_into(policy, cfg, engine)                     # at the end, when a better step than the last was kept

Each new best's weights go to output_dir/best_model/ (checkpoints/weights.py), which the final save
then writes instead of the last step's. `drift`: (signal, step) of the health report's first drift signal
(`health.first_drift`), or None. With best_model_before_drift no evaluation at or after that step is a
candidate, since its model has already drifted however good its metric looks (DPO's validation loss keeps
falling while the KL and the margins explode), and with early stopping such evaluations count as
evaluations without gain; without it (the default, transformers' rule) a new best after the signal is
kept, with a warning.
"""

from __future__ import annotations

import json
import logging

from preftune.checkpoints.folders import best_dir
from preftune.checkpoints.weights import save_model
from preftune.errors import ConfigError

log = logging.getLogger("preftune")


class BestModel:
    """The best evaluation so far by metric_for_best_model (default eval_loss; `cfg.best_metric`,
    `cfg.best_greater`), and early stopping's count of evaluations without a better one. When the run
    keeps the best (load_best_model_at_end or early_stopping_patience), each new best's weights go to
    best_model/, which the final save then writes instead of the last step's (`load_best_into`).
    The baseline at step 0 (the reference itself) is not a candidate."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.value: float | None = None
        self.step: int | None = None  # the step whose weights are in best_model/ (None: none kept)
        self.evals_without_gain = 0
        self.drift: tuple[str, int] | None = None  # the health signal after which no evaluation is a candidate

    def update(self, row: dict, step: int, engine, model, tokenizer, drift: tuple[str, int] | None = None) -> bool:
        """Take one evaluation row; True when early stopping ends the run here. `drift`: (name, step) of the
        first health drift signal so far (the same on every process: it is read from the pooled metrics).
        Every process calls this (a sharded engine gathers the weights to save); the main process writes."""
        metric = self.cfg.best_metric
        if metric not in row:
            logged = ", ".join(k for k in row if k.startswith("eval_"))
            raise ConfigError(f"metric_for_best_model: '{metric}' is not logged by this run's evaluation; "
                              f"choose one of {logged}")
        value = float(row[metric])
        better = value == value and (self.value is None or (value > self.value if self.cfg.best_greater
                                                            else value < self.value))
        if drift is not None and step >= drift[1]:
            guard = self.cfg.best_model_before_drift
            if better and self.cfg.keeps_best and (self.drift is None or not guard):
                log.warning("best model: the evaluation at step %d has the best %s so far, after the health signal %s "
                            "fired at step %d: %s", step, metric, *drift,
                            "not kept (best_model_before_drift)" if guard else
                            "kept (best_model_before_drift: true keeps the best evaluation before it)")
            self.drift = drift
            better = better and not guard
        if better:
            self.value, self.evals_without_gain = value, 0
            if self.cfg.keeps_best:
                self.step = step
                weights = engine.whole_weights(model)  # gathered by every process where sharded
                if engine.is_main:
                    save_model(model, tokenizer, best_dir(self.cfg), step, weights)
                engine.wait()
            return False
        self.evals_without_gain += 1
        patience = self.cfg.early_stopping_patience
        if patience and self.evals_without_gain >= patience:
            log.info("early stopping at step %d: %s has not improved for %d evaluations", step, metric,
                     self.evals_without_gain)
            return True
        return False

    def state_dict(self) -> dict:
        return {"best_value": self.value, "best_step": self.step, "evals_without_gain": self.evals_without_gain}

    def load_state_dict(self, state: dict) -> None:
        # best_loss: checkpoints written before metric_for_best_model (it was always eval_loss)
        self.value = state.get("best_value", state.get("best_loss"))
        self.step, self.evals_without_gain = state["best_step"], state["evals_without_gain"]

    def why(self) -> str:
        """Why the final model is the one it is (summary.json's kept_model)."""
        guarded = self.drift is not None and self.cfg.best_model_before_drift
        before = f" before step {self.drift[1]}, where the health signal {self.drift[0]} fired" if guarded else ""
        if self.step is None:
            return f"last step (no evaluation{before})" if guarded and self.cfg.keeps_best else "last step"
        reason = "load_best_model_at_end" if self.cfg.load_best_model_at_end else "early stopping"
        order = "highest" if self.cfg.best_greater else "lowest"
        return f"best evaluation{before}: {order} {self.cfg.best_metric} ({reason})"


def check_best_model(cfg, best_step: int | None, step: int) -> None:
    """A resumed run keeps the best model of early stopping in output_dir/best_model; it must be the
    one saved at best_step, or a later one that the resumed run will overwrite when it gets there."""
    if best_step is None:
        return
    marker = best_dir(cfg) / "preftune_step.json"
    saved = json.loads(marker.read_text())["step"] if marker.is_file() else None
    if saved is None or (saved != best_step and saved <= step):
        raise ConfigError(f"resume_from_checkpoint: the checkpoint's best model (step {best_step}) is not in "
                          f"{best_dir(cfg)}; resume with the run's own output_dir")


def load_best_into(model, cfg, engine) -> None:
    """The best model's weights (best_model/) into `model`: the model the run keeps."""
    engine.load_weights(model, best_dir(cfg))
