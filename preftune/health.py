"""The health report of a run: the over-fitting and drift signals DPO practitioners watch, each with
its measured value, its threshold and unit, the step it first appeared at, and what to do about it.

    signals = check(history, thresholds)      # history: the run's logged rows (report.MetricsLog)
    drift = first_drift(signals)              # (name, step) of the earliest drift signal, or None

Each signal is computed from the logged metrics alone, so it also runs on a finished run's
log_history.json. A signal that the run's metrics cannot show (no validation set, a reference-free
loss without KL) is reported as not measured, never as healthy.

Where a run evaluates, a signal reads the evaluation rows (the whole validation set, the same
completions at every evaluation); otherwise the training rows, which score the logging step's
batch: other completions at every step, so noisier (the KL: 512 tokens of one micro-batch).
The thresholds are config keys (`TrainConfig.health_thresholds`; defaults and where each comes
from: config/schema.py, docs/pipeline.md).
"""

from __future__ import annotations

import math

# the remedy of the drift signals: {step} is where the signal fired
_DRIFT_REMEDY = ("lower the learning_rate, raise pref_beta, or stop before step {step} (max_steps; or "
                 "load_best_model_at_end with best_model_before_drift: true keeps the best evaluation before it)")

# name -> (what it watches, the unit of its value and threshold, the remedy; {step}: where it fired)
SIGNALS = {
    "train_val_gap": ("validation loss above the training loss by more than the threshold (relative)",
                      "relative to the training loss",
                      "over-fitting: raise pref_beta, stop earlier (early_stopping_patience), add weight_decay or "
                      "dropout, or get more data"),
    "kl_per_sequence": ("KL to the reference per completion (eval_kl_per_sequence; without evaluation "
                        "kl_per_sequence) above the threshold",
                        "nats per completion",
                        "the policy drifts from the reference: " + _DRIFT_REMEDY),
    "kl_per_token": ("KL to the reference per completion token (eval_kl_per_token; without evaluation "
                     "kl_per_token) above the threshold",
                     "nats per token",
                     "the policy drifts from the reference at every token: " + _DRIFT_REMEDY),
    "margin_explosion": ("reward margins (eval_rewards/margins; without evaluation rewards/margins) above the "
                         "threshold: the loss has long fitted the pairs and the log-ratios keep moving apart",
                         "reward units (beta x nats)",
                         "the margins explode: " + _DRIFT_REMEDY),
    "heldout_accuracy": ("the lowest final held-out preference accuracy of the evaluation sets below the threshold",
                         "share of pairs",
                         "the preferences do not generalise: check the data (inspect), lower the learning rate, "
                         "or raise pref_beta"),
    "val_loss_rising": ("validation loss rose above its best by more than the threshold (relative)",
                        "relative to its best",
                        "past the best point: keep the best model (load_best_model_at_end), or stop there "
                        "(early_stopping_patience)"),
    "likelihood_displacement": ("chosen log-probs (eval_logps/chosen; without evaluation logps/chosen) fell by more "
                                "than the threshold while the margins grew",
                                "nats per sequence",
                                "both completions are pushed down (likelihood displacement): add the SFT term "
                                "(pref_ftx), or try a loss that keeps chosen up (nca_pair, apo_zero)"),
    "completion_length_growth": ("completions grew longer than the threshold times their early length: sampled "
                                 "ones (generate_during_eval: against step 0), else the training batches' "
                                 "(length/chosen, length/rejected: the last quarter of the logged rows against "
                                 "the first)",
                                 "times the early length",
                                 "the completions grow (length exploitation): raise pref_beta, use a length-normalised "
                                 "loss (sigmoid_norm, simpo, ipo) or LD-DPO (ld_alpha), or stop before step {step}"),
    "rejected_collapse": ("rejected log-probs (eval_logps/rejected; without evaluation logps/rejected) fell by more "
                          "than the threshold",
                          "nats per sequence",
                          "rejected probabilities collapse toward zero, DPO's known over-fitting: try ipo, or "
                          "raise pref_beta"),
}

# The signals of a policy drifting from its reference. With best_model_before_drift the best model (best.py) is
# never an evaluation at or after the step the first of them fired: that model has already drifted, whatever its
# eval_loss says (DPO's validation loss keeps falling while the KL grows).
DRIFT = ("kl_per_sequence", "kl_per_token", "margin_explosion", "completion_length_growth")


def _first(rows: list[dict], key: str, test) -> tuple[float | None, int | None]:
    """(value, step) of the first row where test(value) holds; (last value, None) if none does."""
    last = None
    for r in rows:
        if key in r and r[key] is not None and math.isfinite(r[key]):
            last = r[key]
            if test(r[key]):
                return r[key], r["step"]
    return last, None


def _rows(train: list[dict], evals: list[dict], key: str) -> tuple[list[dict], str]:
    """The rows that show `key` and its name there: the evaluation rows (the same validation set every time)
    when the run logged eval_<key>, else the training rows."""
    if any(f"eval_{key}" in r for r in evals if r["step"] > 0):
        return evals, f"eval_{key}"
    return train, key


def _length_growth(history: list[dict], train: list[dict], limit: float) -> tuple[float | None, int | None]:
    """(growth, step it passed `limit`): sampled completions (eval_completion_length) against step 0; else
    the training batches' mean completion length, each row's trailing window of a quarter of the logged rows
    against the first quarter."""
    lengths = [r for r in history if "eval_completion_length" in r]
    if lengths:
        growth = None
        for r in lengths[1:]:
            growth = r["eval_completion_length"] / max(lengths[0]["eval_completion_length"], 1e-9)
            if growth > limit:
                return growth, r["step"]
        return growth, None
    # (chosen + rejected) / 2; kto: the sides its batch had
    rows = [(r["step"], sum(r[k] for k in sides) / len(sides)) for r in train
            if (sides := [k for k in ("length/chosen", "length/rejected") if k in r])]
    window = len(rows) // 4
    if window < 1:
        return None, None
    early = sum(v for _, v in rows[:window]) / window
    growth = None
    for i in range(2 * window, len(rows) + 1):  # windows that do not overlap the first
        growth = sum(v for _, v in rows[i - window:i]) / window / max(early, 1e-9)
        if growth > limit:
            return growth, rows[i - 1][0]
    return growth, None


def check(history: list[dict], thresholds: dict[str, float]) -> list[dict]:
    """Every signal of SIGNALS: {name, watches, value, threshold, unit, fired, step, remedy} (and `metric`,
    the logged metric it read, where there is a choice); value None when the run's metrics cannot show it."""
    train = [r for r in history if "loss" in r]
    evals = [r for r in history if "eval_loss" in r]
    after0 = [r for r in evals if r["step"] > 0]
    out = {}

    def signal(name, value, step, fired, metric=None):
        watches, unit, remedy = SIGNALS[name]
        out[name] = {"name": name, "watches": watches, "value": value, "threshold": thresholds[name], "unit": unit,
                     "fired": bool(fired), "step": step if fired else None,
                     "remedy": remedy.format(step=step) if fired else None}
        if metric is not None:
            out[name]["metric"] = metric

    limit = thresholds["train_val_gap"]
    value, step = _first(after0, "eval_train_gap_pct", lambda v: v > 100 * limit)
    signal("train_val_gap", None if value is None else value / 100, step, step is not None)

    # the KL per completion and per token, the margins: above the threshold at a step
    for name, key in (("kl_per_sequence", "kl_per_sequence"), ("kl_per_token", "kl_per_token"),
                      ("margin_explosion", "rewards/margins")):
        rows, metric = _rows(train, after0, key)
        if name == "kl_per_token" and not any(metric in r for r in rows):
            # a history written before the KL was named with its unit: kl, eval_kl were the per-token KL
            rows, metric = _rows(train, after0, "kl")
        value, step = _first(rows, metric, lambda v, limit=thresholds[name]: v > limit)
        signal(name, value, step, step is not None, metric if value is not None else None)

    # every evaluation set's final accuracy (eval_rewards/accuracies, eval_<name>_rewards/accuracies): the lowest,
    # which is where preferences generalise least (an out-of-domain set, when there is one)
    accuracies = {k: v for k, v in (after0[-1] if after0 else {}).items()
                  if k.startswith("eval_") and k.endswith("rewards/accuracies")}
    value = min(accuracies.values()) if accuracies else None
    signal("heldout_accuracy", value, after0[-1]["step"] if after0 else None,
           value is not None and value < thresholds["heldout_accuracy"],
           min(accuracies, key=accuracies.get) if accuracies else None)

    best, step, fired = math.inf, None, False
    rise = None
    for r in after0:
        best = min(best, r["eval_loss"])
        rise = (r["eval_loss"] - best) / abs(best) if best else 0.0
        if rise > thresholds["val_loss_rising"] and not fired:
            fired, step = True, r["step"]
    signal("val_loss_rising", rise, step, fired)

    growth, step = _length_growth(history, train, thresholds["completion_length_growth"])
    signal("completion_length_growth", growth, step, step is not None)

    # log-probs summed over a completion: the validation set's (its step-0 row included) are the same completions
    # every time; the training rows' are another batch's each step, so their drop includes the data's variation
    for name, key in (("likelihood_displacement", "logps/chosen"), ("rejected_collapse", "logps/rejected")):
        rows, metric = (evals, f"eval_{key}") if sum(f"eval_{key}" in r for r in evals) >= 2 else (train, key)
        margins = "eval_rewards/margins" if metric.startswith("eval_") else "rewards/margins"
        rows = [r for r in rows if metric in r]
        if len(rows) < 2:
            signal(name, None, None, False)
            continue
        start = rows[0][metric]
        drop, step = None, None
        for r in rows[1:]:
            drop = start - r[metric]
            margins_grew = r.get(margins, 0.0) > rows[0].get(margins, 0.0)
            if drop > thresholds[name] and (name == "rejected_collapse" or margins_grew):
                step = r["step"]
                break
        signal(name, drop, step, step is not None, metric)
    return [out[name] for name in SIGNALS]


def first_drift(signals: list[dict]) -> tuple[str, int] | None:
    """(name, step) of the drift signal (DRIFT) that fired first, or None."""
    fired = [(s["step"], s["name"]) for s in signals if s["name"] in DRIFT and s["fired"]]
    return (min(fired)[1], min(fired)[0]) if fired else None


def describe(signal: dict) -> str:
    """A fired signal in words: 'kl_per_sequence = 7.2 (threshold 5, nats per completion) from step 40: <remedy>'."""
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


# --- the spread between seeds -----------------------------------------------------------------------
# Keys a run's config may differ in between seeds of one configuration: the seed, and where and how a run
# writes and is watched (what iterate lets a resumed run change, preftune.commands.iterate.FREE_ON_RESUME)
SEED_FREE = frozenset({"seed", "output_dir", "run_name", "logging_dir", "overwrite_output_dir", "resume_from_checkpoint",
                       "report_to", "progress_bar", "plot_loss", "hub_token", "preprocessing_num_workers",
                       "dataloader_num_workers", "tokenized_cache_dir", "ref_logps_cache_dir", "overwrite_cache"})

SEED_SPREAD_REMEDY = ("this seed drifted where the others did not, so the configuration is at the edge of stability: "
                      "read this run's health report for the step it drifted at; lower the learning_rate or raise "
                      "pref_beta and run the seeds again, and do not average this seed into the configuration's result")


def seed_groups(configs: dict[str, dict]) -> list[list[str]]:
    """The runs that are one configuration with different seeds: groups of at least 3 runs (name -> run config
    as a dict) whose configs are equal but for SEED_FREE keys and whose seeds all differ; in the given order."""
    groups: dict[str, list[str]] = {}
    for name, config in configs.items():
        key = repr(sorted((k, repr(v)) for k, v in config.items() if k not in SEED_FREE))
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values()
            if len(names) >= 3 and len({configs[n].get("seed") for n in names}) == len(names)]


def seed_outliers(runs: dict[str, dict], max_ratio: float) -> list[dict]:
    """Seeds of one configuration, each run's figures on the same prompts (run -> {kl_per_sequence, reward,
    mean_length}): one record per run, fired when its KL per completion to the reference is above `max_ratio`
    times the median KL of the other runs. A ratio to the others' median, not a z-score: with 3 to 5 seeds the
    spread of the others is too small an estimate to divide by, and one drifted seed must not move the bar it
    is measured against (issue 22's seeds: 7.2 nats against 1.5 and 1.9 is 7.2 / 1.7 = 4.2x). Fewer than 3
    runs: nothing to compare against (an empty list)."""
    if len(runs) < 3:
        return []
    out = []
    for name, figures in runs.items():
        others = [f for n, f in runs.items() if n != name]
        median = _median([f["kl_per_sequence"] for f in others])
        ratio = figures["kl_per_sequence"] / median if median > 0 else math.inf
        fired = ratio > max_ratio
        out.append({"name": "seed_spread", "run": name, "value": ratio, "threshold": max_ratio,
                    "unit": "times the median KL per completion of the other seeds",
                    "kl_per_sequence": figures["kl_per_sequence"], "others_kl_per_sequence": median,
                    # context for the reader: a drifted seed's reward often rises with its length
                    **{f"{k}_vs_others": [figures.get(k), _median([f.get(k) for f in others])]
                       for k in ("reward", "mean_length") if figures.get(k) is not None
                       and all(f.get(k) is not None for f in others)},
                    "fired": fired, "remedy": SEED_SPREAD_REMEDY if fired else None})
    return out


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def describe_seed_outlier(signal: dict) -> str:
    """'seed_spread: RUN's KL per completion 7.2 nats is 4.2x the median of the other seeds (1.7; threshold
    2x); reward ..., mean length ...: <remedy>'."""
    context = "".join(f", {k.replace('_', ' ')} {v[0]:.3g} against {v[1]:.3g}" for k, v in (
        ("reward", signal.get("reward_vs_others")), ("mean_length", signal.get("mean_length_vs_others"))) if v)
    return (f"seed_spread: {signal['run']}'s KL per completion {signal['kl_per_sequence']:.3g} nats is "
            f"{signal['value']:.2g}x the median of the other seeds ({signal['others_kl_per_sequence']:.3g}; threshold "
            f"{signal['threshold']:g}x){context}: {signal['remedy']}")
