"""The health report of a run: the over-fitting and drift signals DPO practitioners watch, each with
its measured value, its threshold, the step it first appeared at, and what to do about it.

    signals = check(history, thresholds)      # history: the run's logged rows (report.MetricsLog)

Each signal is computed from the logged metrics alone, so it also runs on a finished run's
log_history.json. A signal that the run's metrics cannot show (no validation set, a reference-free
loss without KL) is reported as not measured, never as healthy.
"""

from __future__ import annotations

import math

# name -> (what it watches, the unit of its value and threshold, the remedy)
SIGNALS = {
    "train_val_gap": ("validation loss above the training loss by more than the threshold (relative)",
                      "relative to the training loss",
                      "over-fitting: raise pref_beta, stop earlier (early_stopping_patience), add weight_decay or "
                      "dropout, or get more data"),
    "kl_to_reference": ("KL to the reference per token (kl_per_token, eval_kl_per_token) above the threshold",
                        "nats per token",
                        "the policy drifts far from the reference: raise pref_beta, lower the learning rate, or "
                        "train fewer steps"),
    "heldout_accuracy": ("the lowest final held-out preference accuracy of the evaluation sets below the threshold",
                         "share of pairs",
                         "the preferences do not generalise: check the data (inspect), lower the learning rate, "
                         "or raise pref_beta"),
    "val_loss_rising": ("validation loss rose above its best by more than the threshold (relative)",
                        "relative to its best",
                        "past the best point: keep the best model (load_best_model_at_end), or stop there "
                        "(early_stopping_patience)"),
    "likelihood_displacement": ("chosen log-probs fell by more than the threshold (nats per sequence) while "
                                "the margins grew",
                                "nats per sequence",
                                "both completions are pushed down (likelihood displacement): add the SFT term "
                                "(pref_ftx), or try a loss that keeps chosen up (nca_pair, apo_zero)"),
    "completion_length_growth": ("sampled completions (generate_during_eval) grew longer than the threshold "
                                 "times their length at step 0",
                                 "times the step-0 length",
                                 "the policy exploits length: raise pref_beta, use a length-normalised loss "
                                 "(sigmoid_norm, simpo, ipo) or LD-DPO (ld_alpha)"),
    "rejected_collapse": ("rejected log-probs fell by more than the threshold (nats per sequence)",
                          "nats per sequence",
                          "rejected probabilities collapse toward zero, DPO's known over-fitting: try ipo, or "
                          "raise pref_beta"),
}


def _first(rows: list[dict], key: str, test) -> tuple[float | None, int | None]:
    """(value, step) of the first row where test(value) holds; (last value, None) if none does."""
    last = None
    for r in rows:
        if key in r and r[key] is not None and math.isfinite(r[key]):
            last = r[key]
            if test(r[key]):
                return r[key], r["step"]
    return last, None


def check(history: list[dict], thresholds: dict[str, float]) -> list[dict]:
    """Every signal of SIGNALS: {name, watches, value, threshold, unit, fired, step, remedy}; value None
    when the run's metrics cannot show it."""
    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_loss" in r and r["step"] > 0]
    out = []

    def signal(name, value, step, fired):
        watches, unit, remedy = SIGNALS[name]
        out.append({"name": name, "watches": watches, "value": value, "threshold": thresholds[name], "unit": unit,
                    "fired": bool(fired), "step": step if fired else None, "remedy": remedy if fired else None})

    limit = thresholds["train_val_gap"]
    value, step = _first(evals, "eval_train_gap_pct", lambda v: v > 100 * limit)
    signal("train_val_gap", None if value is None else value / 100, step, step is not None)

    limit = thresholds["kl_to_reference"]
    value = step = None
    # (eval_kl, kl: the same per-token KL in a history written before the metric was named with its unit)
    for rows, key in ((evals, "eval_kl_per_token"), (train, "kl_per_token"), (evals, "eval_kl"), (train, "kl")):
        if value is None:
            value, step = _first(rows, key, lambda v: v > limit)
    signal("kl_to_reference", value, step, step is not None)

    # every evaluation set's final accuracy (eval_rewards/accuracies, eval_<name>_rewards/accuracies): the lowest,
    # which is where preferences generalise least (an out-of-domain set, when there is one)
    accuracies = {k: v for k, v in (evals[-1] if evals else {}).items()
                  if k.startswith("eval_") and k.endswith("rewards/accuracies")}
    value = min(accuracies.values()) if accuracies else None
    signal("heldout_accuracy", value, evals[-1]["step"] if evals else None,
           value is not None and value < thresholds["heldout_accuracy"])
    if accuracies:
        out[-1]["metric"] = min(accuracies, key=accuracies.get)

    best, step, fired = math.inf, None, False
    rise = None
    for r in evals:
        best = min(best, r["eval_loss"])
        rise = (r["eval_loss"] - best) / abs(best) if best else 0.0
        if rise > thresholds["val_loss_rising"] and not fired:
            fired, step = True, r["step"]
    signal("val_loss_rising", rise, step, fired)

    lengths = [r for r in history if "eval_completion_length" in r]
    growth, step = None, None
    for r in lengths[1:]:
        growth = r["eval_completion_length"] / max(lengths[0]["eval_completion_length"], 1e-9)
        if growth > thresholds["completion_length_growth"]:
            step = r["step"]
            break
    signal("completion_length_growth", growth, step, step is not None)

    for name, key in (("likelihood_displacement", "logps/chosen"), ("rejected_collapse", "logps/rejected")):
        rows = [r for r in train if key in r]
        if len(rows) < 2:
            signal(name, None, None, False)
            continue
        start = rows[0][key]
        drop, step = None, None
        for r in rows[1:]:
            drop = start - r[key]
            margins_grew = r.get("rewards/margins", 0.0) > rows[0].get("rewards/margins", 0.0)
            if drop > thresholds[name] and (name == "rejected_collapse" or margins_grew):
                step = r["step"]
                break
        signal(name, drop, step, step is not None)
    return out


def describe(signal: dict) -> str:
    """A fired signal in words: 'kl_to_reference = 2.1 (threshold 1.5, nats per token) from step 40: <remedy>'."""
    return (f"{signal['name']} = {signal['value']:.4g} (threshold {signal['threshold']:g}, {signal['unit']}) "
            f"from step {signal['step']}: {signal['remedy']}")


def format_report(signals: list[dict]) -> list[str]:
    """Console lines: one per signal that fired, or one saying none did."""
    fired = [s for s in signals if s["fired"]]
    unmeasured = [s["name"] for s in signals if s["value"] is None]
    lines = [f"health: {describe(s)}" for s in fired]
    if not fired:
        lines.append("health: no over-fitting or drift signal fired")
    if unmeasured:
        lines.append(f"health: not measured in this run: {', '.join(unmeasured)}")
    return lines
