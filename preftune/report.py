"""What a run reports: the metric log and the four files in <output_dir>/dpo_metrics/
(<output_dir>/sft_metrics/ for stage: sft, rm_metrics/ for stage: rm), written as the run goes (only by the main process):
the CSV and log_history.json gain each row when it is logged, summary.json and the plot are
refreshed at each evaluation and at the end, so a crash or a signal leaves them up to the last
logged step.

    training_metrics.csv  one row per logged step (train and eval columns side by side)
    log_history.json      every logged entry, as a list of dicts (like transformers' log_history)
    summary.json          baseline, final and best metrics, config, data counts, precision, timings
    training_curves.png   loss, accuracy, margins, KL per token, rewards, learning rate; train vs eval
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from pathlib import Path

from preftune import health
from preftune.files import write_atomic
from preftune.tracking import Trackers

log = logging.getLogger("preftune")

METRIC_NOTES = {
    "logps/chosen, logps/rejected": "log pi_theta(y|x) summed over completion tokens (not averaged)",
    "rewards/chosen, rewards/rejected": "beta * (log pi_theta(y|x) - log pi_ref(y|x)), summed log-probs; "
                                          "reference-free losses (simpo, orpo): beta * log pi_theta(y|x) / |y|",
    "rewards/accuracies": "share of pairs with rewards/chosen > rewards/rejected; a tie counts 0.5",
    "rewards/margins": "rewards/chosen - rewards/rejected",
    "logits/chosen, logits/rejected": "the policy's logits averaged over the vocabulary, then over the chosen "
                                      "(rejected) completion tokens (TRL's; train: the logging step's last "
                                      "micro-batch, as kl_per_token)",
    "entropy": "nats: the entropy of the policy's next-token distribution, averaged over completion tokens (TRL's; "
               "train: the logging step's last micro-batch)",
    "kl_per_token": "nats per token; absent for reference-free losses (simpo, orpo) and with precompute_ref_log_probs; "
                    "otherwise the mean over completion tokens of the exact KL(pi_theta(.|context) || "
                    "pi_ref(.|context)) over the vocabulary, teacher-forced on the dataset's chosen and rejected "
                    "completions (train: up to 512 tokens of the logging step's last micro-batch; eval: every token "
                    "of the validation set)",
    "kl_per_sequence": "nats per sequence: the same per-token KL summed over each completion's tokens, averaged over "
                       "the completions (train: the 512 tokens' mean times the micro-batch's completion tokens, "
                       "per completion)",
    "length/chosen, length/rejected": "completion tokens of the chosen (rejected) completions, the mean over the "
                                      "logging steps' pairs (kto: desirable, undesirable examples); the health "
                                      "report's completion_length_growth reads them when nothing is sampled",
    "eval_train_gap": "eval_loss - train loss of the latest logging step; eval_train_gap_pct relative to it",
    "tokens_per_second": "non-padding tokens of chosen+rejected sequences trained on per second of wall time",
}


METRICS_DIRS = {"sft": "sft_metrics", "rm": "rm_metrics"}  # objective -> its metrics folder; dpo and kto: dpo_metrics


class MetricsLog:
    """The rows a run logs; each also goes to the report_to trackers (tracking.py)."""

    def __init__(self, cfg, accelerator=None):
        self.cfg = cfg
        self.trackers = Trackers(cfg, accelerator)
        self.history: list[dict] = []
        self.data: dict = {}
        self.precision: dict | None = None  # the dtypes of the policy and the reference (reference.describe_precision)
        self.dir = Path(cfg.output_dir) / METRICS_DIRS.get(cfg.objective, "dpo_metrics")
        self.resumed_from: dict | None = None  # {checkpoint, step} when the run continued a checkpoint
        self.writes = True  # only the main process writes files (describe_setup says which one it is)
        self.planned_steps: int | None = None
        self.skipped_steps: list[int] = []  # steps skipped as non-finite (runtime.NonFiniteGuard)
        self.best = None  # checkpoints.BestModel at the end: the kept model
        self.start = time.time()

    def describe_setup(self, accelerator, global_batch: int, unit: str, reference: str, precision: dict) -> None:
        """The log lines that say how the run is set up; the precision also goes to summary.json."""
        self.precision = precision
        self.writes = accelerator.is_main_process
        # (sequence parallelism: the processes of a group share their pairs, "x 4 processes / 2 per sequence")
        per_sequence = f" / {self.cfg.sequence_parallel_size} per sequence" if self.cfg.sequence_parallel_size > 1 else ""
        log.info("processes: %d (%s); global batch %d %s per step = %d per device x %d accumulation x %d processes%s",
                 accelerator.num_processes, accelerator.distributed_type.value,
                 global_batch * self.cfg.gradient_accumulation_steps, unit, self.cfg.per_device_train_batch_size,
                 self.cfg.gradient_accumulation_steps, accelerator.num_processes, per_sequence)
        log.info("reference: %s", reference)
        log.info("precision: policy trainable weights %(policy_trainable)s, frozen weights %(policy_frozen)s, "
                 "compute %(compute)s; reference %(reference)s", precision)

    def log_completions(self, step: int, pairs: list, completions: list[tuple[str, int]]) -> dict:
        """Append the completions sampled at an evaluation to completions.jsonl (flushed: a crash keeps them);
        returns their mean length in tokens as an eval metric."""
        self.dir.mkdir(parents=True, exist_ok=True)
        records = [{"step": step, "prompt": pair.messages if pair.messages is not None else pair.prompt,
                    "completion": text, "tokens": tokens} for pair, (text, tokens) in zip(pairs, completions)]
        with open(self.dir / "completions.jsonl", "a", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        self.trackers.log_completions(step, records)
        return {"eval_completion_length": sum(t for _, t in completions) / max(len(completions), 1)}

    def log(self, row: dict) -> None:
        if self.cfg.objective == "sft":  # the loss is the NLL per completion token: perplexity = exp(loss)
            for prefix in ("", "eval_"):
                if f"{prefix}loss" in row:
                    row[f"{prefix}perplexity"] = math.exp(min(row[f"{prefix}loss"], 700.0))  # exp(>709) overflows
        last_train = next((r for r in reversed(self.history) if "loss" in r), None)
        if "eval_loss" in row and last_train is not None:
            gap = row["eval_loss"] - last_train["loss"]
            row["eval_train_gap"] = gap
            row["eval_train_gap_pct"] = 100 * gap / last_train["loss"] if last_train["loss"] else math.nan
        self.history.append(row)
        self.trackers.log(row)
        if self.writes:
            self.write_logs()
            if "eval_loss" in row and row["step"] > 0:  # the baseline adds nothing to a summary yet
                self.write_summary(status="running", plot=True)
        shown = {k: v for k, v in row.items() if k in ("step", "epoch", "loss", "rewards/accuracies",
                                                      "rewards/margins", "kl_per_token", "perplexity", "eval_loss",
                                                      "eval_rewards/accuracies", "eval_kl_per_token",
                                                      "eval_perplexity")}
        log.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()))

    def drift(self) -> tuple[str, int] | None:
        """(name, step) of the first health drift signal so far (`health.first_drift`), for the best model
        (best.py: with best_model_before_drift, never an evaluation from that step on)."""
        return health.first_drift(health.check(self.history, self.cfg.health_thresholds))

    def rows_by_step(self) -> list[dict]:
        merged: dict[int, dict] = {}
        for row in self.history:
            merged.setdefault(row["step"], {}).update(row)
        return [merged[s] for s in sorted(merged)]

    def resume(self, state: dict, checkpoint: Path) -> None:
        """Continue the history of the checkpoint's run; the metric files are rewritten from it at once,
        so rows a killed run logged after its last checkpoint are not left behind twice."""
        self.history = state["log_history"]
        self.resumed_from = {"checkpoint": str(checkpoint), "step": state["step"]}
        self.skipped_steps[:] = state.get("nonfinite_steps_skipped", [])
        if self.writes:
            self.write_logs()

    def write_logs(self) -> None:
        """training_metrics.csv and log_history.json from the history so far, each in one rename."""
        self.dir.mkdir(parents=True, exist_ok=True)
        rows = self.rows_by_step()
        columns = ["step", "epoch"]
        for row in rows:
            columns += [k for k in row if k not in columns]
        tmp = self.dir / ".training_metrics.csv.tmp"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.dir / "training_metrics.csv")
        write_atomic(self.dir / "log_history.json", json.dumps(self.history, indent=1))

    def finish(self, total_steps, steps_done, stopped_early, best, elapsed) -> dict:
        """The metric files, summary.json and the trackers' final values at the end; `best`:
        checkpoints.BestModel (the kept model)."""
        self.planned_steps, self.best = total_steps, best
        if self.skipped_steps:
            log.warning("non-finite steps skipped: %d (steps %s; skip_nonfinite_steps: %d)", len(self.skipped_steps),
                        ", ".join(map(str, self.skipped_steps)), self.cfg.skip_nonfinite_steps)
        self.write_logs()
        summary = self.write_summary("completed", steps_done, stopped_early, elapsed, plot=self.cfg.plot_loss)
        train_rows = [r for r in self.history if "loss" in r]
        kept = summary["kept_model"]
        final_values = {"train_runtime": elapsed, "kept_model_step": kept["step"]}
        if train_rows:
            final_values["train_loss"] = _mean([r["loss"] for r in train_rows])
        if kept["value"] is not None:
            final_values[f"best_{kept['metric']}"] = kept["value"]
        self.trackers.finish(steps_done, final_values)
        return summary

    def write_summary(self, status: str, steps_done: int | None = None, stopped_early: bool = False,
                      elapsed: float | None = None, plot: bool = False) -> dict:
        """summary.json (and the plot when `plot` and plot_loss) for the run so far; `status` says whether it
        is running, completed, stopped by a signal or failed."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if steps_done is None:
            steps_done = max((r["step"] for r in self.history), default=0)
        best = self.best
        train_rows = [r for r in self.history if "loss" in r]
        eval_rows = [r for r in self.history if "eval_loss" in r]
        signals = health.check(self.history, self.cfg.health_thresholds)
        if status == "completed":  # the report once, at the end; live summaries carry it silently
            for line in health.format_report(signals):
                log.info(line)
        summary = {
            "status": status,
            "baseline": next((r for r in eval_rows if r["step"] == 0), None),
            "final": {**(train_rows[-1] if train_rows else {}),
                      **(eval_rows[-1] if eval_rows and eval_rows[-1]["step"] > 0 else {})},
            "best": self.best_row(eval_rows, health.first_drift(signals) if self.cfg.best_model_before_drift else None),
            "kept_model": None if status != "completed" else  # no final model is written before the end
            {"step": best.step if best.step is not None else steps_done, "why": best.why(),
             "metric": self.cfg.best_metric, "value": best.value if best.step is not None else None},
            "stopped_early": stopped_early,
            "resumed_from": self.resumed_from,
            "health": signals,
            "steps": {"planned": self.planned_steps, "done": steps_done},
            "nonfinite_steps_skipped": {"count": len(self.skipped_steps), "steps": self.skipped_steps},
            "timings": {"elapsed_seconds": round(time.time() - self.start if elapsed is None else elapsed, 2),
                        "mean_tokens_per_second": _mean([r["tokens_per_second"] for r in train_rows])},
            "data": self.data,
            "precision": self.precision,
            "config": self.cfg.to_dict(),
            "metric_notes": METRIC_NOTES,
            "outputs": {"model": str(Path(self.cfg.output_dir)), "metrics": str(self.dir), **self.trackers.dirs},
        }
        write_atomic(self.dir / "summary.json", json.dumps(summary, indent=1, default=str))
        if plot and self.cfg.plot_loss:
            plot_curves(self.history, self.dir / "training_curves.png",
                        {s["name"]: s["step"] for s in signals if s["fired"]})
        return summary

    def best_row(self, eval_rows: list[dict], drift: tuple[str, int] | None = None) -> dict | None:
        """The best evaluation after step 0 by metric_for_best_model (default eval_loss), before the step of the
        first health drift signal (`drift`: (name, step); best_model_before_drift), as the best model (best.py)."""
        metric, sign = self.cfg.best_metric, -1 if self.cfg.best_greater else 1
        rows = [r for r in eval_rows if r["step"] > 0 and r.get(metric) == r.get(metric) and metric in r
                and (drift is None or r["step"] < drift[1])]
        return min(rows, key=lambda r: sign * r[metric], default=None)


def _mean(values):
    return sum(values) / len(values) if values else None


def plot_curves(history: list[dict], path: Path, marks: dict[str, int] | None = None) -> None:
    """The curves, with a dashed line at the step where each health signal fired (`marks`)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    panels = [("loss", "loss"), ("rewards/accuracies", "preference accuracy"), ("rewards/margins", "reward margin"),
              ("kl_per_token", "KL to reference"), ("rewards/chosen", "rewards: chosen / rejected"),
              ("perplexity", "perplexity"), ("learning_rate", "learning rate")]
    logged = {k for r in history for k in r}
    panels = [(key, title) for key, title in panels if key in logged or f"eval_{key}" in logged]  # what this run has
    fig, axes = plt.subplots(2, 3, figsize=(15, 8)) if len(panels) > 3 else plt.subplots(1, len(panels),
                                                                                          figsize=(5 * len(panels), 4))
    for ax in list(getattr(axes, "flat", [axes]))[len(panels):]:
        ax.set_visible(False)  # a 2 x 3 grid with fewer panels
    for ax, (key, title) in zip(getattr(axes, "flat", [axes]), panels):
        series = [(key, "train")]
        if key == "rewards/chosen":
            series = [("rewards/chosen", "chosen (train)"), ("rewards/rejected", "rejected (train)"),
                      ("eval_rewards/chosen", "chosen (eval)"), ("eval_rewards/rejected", "rejected (eval)")]
        elif key != "learning_rate":
            series.append((f"eval_{key}", "eval"))
            series += [(k, k[5:-len(key) - 1]) for k in sorted(logged)  # named sets: eval_<name>_<key>
                       if k.startswith("eval_") and k.endswith(f"_{key}") and k != f"eval_{key}"]
        for k, label in series:
            points = [(r["step"], r[k]) for r in history if k in r and r[k] is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(points) < 30 else None, markersize=3, label=label)
        for k, (name, step) in enumerate((marks or {}).items()):
            ax.axvline(step, color=f"C{3 + k}", linestyle="--", linewidth=1, label=f"health: {name}")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        if key == "kl_per_token":
            ax.set_ylabel("nats per token")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
