"""Experiment trackers (`report_to`): every row the run logs also goes to TensorBoard, wandb, MLflow
or Trackio, through accelerate's trackers.

    report_to: tensorboard          # or wandb, mlflow, trackio, a list of them, all, none
    run_name: dpo-beta0.1           # the run's name in wandb, mlflow, trackio
    logging_dir: runs/dpo           # TensorBoard's event folder (default <output_dir>/runs/<Mon><DD>_<HH-MM-SS>_<host>)

`make_trackers` builds them before the Accelerator (which takes them as `log_with`); `Trackers`
starts them, sends each row under the metric names the metric files use (TRL's: `loss`,
`rewards/chosen`, `eval_loss`, ...) at the row's step, and finishes the runs. Only the main process
sends anything (accelerate's trackers run there only).
"""

from __future__ import annotations

import datetime
import importlib.util
import logging
import os
import socket
from pathlib import Path

from preftune.errors import ConfigError

log = logging.getLogger("preftune")

# report_to name -> (the module that must import, preftune's pip extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow"), "trackio": ("trackio", "trackio")}


def installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name][0]) is not None


def tracker_names(cfg) -> list[str]:
    """The trackers report_to asks for: "all" is every installed one; a named one that is not
    installed is an error that names the pip extra (accelerate would only skip it with a warning)."""
    names = cfg.trackers
    if "all" in names:
        return [n for n in PACKAGES if installed(n)]
    missing = [n for n in names if not installed(n)]
    if missing:
        extras = ",".join(PACKAGES[n][1] for n in missing)
        raise ConfigError(f"report_to: {', '.join(missing)} is not installed; pip install 'preftune[{extras}]' "
                          f"(or pip install {' '.join(PACKAGES[n][0] for n in missing)}), or remove it from report_to")
    return list(dict.fromkeys(names))


def default_logging_dir(cfg) -> Path:
    """transformers' default: <output_dir>/runs/<Mon DD_HH-MM-SS>_<host>, a fresh folder for each run."""
    stamp = datetime.datetime.now().strftime("%b%d_%H-%M-%S")
    return Path(cfg.output_dir) / "runs" / f"{stamp}_{socket.gethostname()}"


def make_trackers(cfg) -> list:
    """accelerate tracker objects for report_to (not started yet: `Trackers` starts them). Checked
    before any model is loaded, so a missing package fails at once."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    project = "preftune"
    made = []
    for name in tracker_names(cfg):
        if name == "tensorboard":  # events straight into logging_dir, as transformers writes them
            made.append(TensorBoardTracker("", cfg.logging_dir or default_logging_dir(cfg)))
        elif name == "wandb":
            made.append(WandBTracker(os.environ.get("WANDB_PROJECT", project), name=cfg.run_name))
        elif name == "mlflow":
            made.append(MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME", project), run_name=cfg.run_name))
        elif name == "trackio":
            made.append(TrackioTracker(project, name=cfg.run_name))
    return made


def _hparams(config: dict) -> dict:
    """The config as trackers take it (TensorBoard's hparams: bool, int, float, str only), as
    transformers' to_sanitized_dict: other values as their string."""
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in config.items()}


class Trackers:
    """The started trackers of one run; a no-op without report_to."""

    def __init__(self, cfg, accelerator):
        self.accelerator = accelerator
        self.names = [t.name for t in accelerator.log_with] if accelerator is not None else []
        self.dirs: dict[str, str] = {}
        if not self.names:
            return
        accelerator.init_trackers("preftune", config=_hparams(cfg.to_dict()))
        if accelerator.is_main_process:
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    self.dirs["tensorboard"] = str(tracker.logging_dir)
                elif tracker.name == "wandb" and getattr(tracker.run, "dir", None):
                    self.dirs["wandb"] = str(tracker.run.dir)
                elif tracker.name == "mlflow":  # mlflow 3's default: sqlite:///mlflow.db in the working directory
                    import mlflow
                    self.dirs["mlflow"] = mlflow.get_tracking_uri()
                elif tracker.name == "trackio":  # <folder>/preftune.db; default $HF_HOME/trackio, TRACKIO_DIR moves it
                    import trackio.utils
                    self.dirs["trackio"] = str(trackio.utils.TRACKIO_DIR)
            log.info("report_to: %s%s", ", ".join(self.names),
                     "".join(f"; {k} logs in {v}" for k, v in self.dirs.items()))

    def log(self, row: dict) -> None:
        """One logged row (step and the metrics), under its own names, at its step."""
        if not self.names:
            return
        values = {k: v for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.accelerator.log(values, step=int(row["step"]))

    def log_completions(self, step: int, records: list[dict]) -> None:
        """The completions sampled at an evaluation: a wandb Table, TensorBoard text (a markdown table)."""
        if not self.names or not self.accelerator.is_main_process:
            return
        rows = [[str(r["prompt"]), r["completion"], r["tokens"]] for r in records]
        for tracker in self.accelerator.trackers:
            if tracker.name == "wandb":
                tracker.log_table("completions", columns=["prompt", "completion", "tokens"], data=rows, step=step)
            elif tracker.name == "tensorboard":
                cell = lambda text: str(text).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
                table = "| prompt | completion | tokens |\n|---|---|---|\n" + "\n".join(
                    f"| {cell(p)} | {cell(c)} | {t} |" for p, c, t in rows)
                tracker.writer.add_text("completions", table, global_step=step)
                tracker.writer.flush()

    def finish(self, step: int, summary_values: dict) -> None:
        """The run's summary values (train_runtime, the kept model's step and metric), then end the runs."""
        if not self.names:
            return
        self.log({"step": step, **summary_values})
        # not accelerator.end_training(): it also destroys the process group, which the run still uses
        for tracker in self.accelerator.trackers:
            if tracker.name == "trackio":  # tracker.finish() leaves it trackio's current run, finished again at exit
                import trackio
                trackio.finish()
            else:
                tracker.finish()
        self.accelerator.trackers = []
        self.names = []
