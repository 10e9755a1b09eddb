"""One trial of a study: Defect-GAN trained as a library call inside the trial's Ray worker.

The trial drives `dgan.train.gan.run_gan` through its metrics callback. At each periodic
evaluation the callback asks for a checkpoint, then hands the evaluation's metrics and that
checkpoint directory to `ray.tune.report`; Ray copies the directory into its storage. So ASHA
can stop the trial at any report, PBT can copy its checkpoint into another trial, and a
restored study continues it.

When Ray stops or pauses the trial, `ray.tune.report` raises SystemExit in it; the callback
catches it and answers Directive.STOP, so the run is left "paused" with its MLflow run closed,
and the SystemExit is raised again once the trainer has returned.

A checkpoint that Ray hands back (`tune.get_checkpoint()`: this trial's own after
`Tuner.restore`, another trial's after a PBT exploit) is copied into this trial's run directory
as `checkpoints/iter-XXXXXXXX/`, replacing the checkpoints there (they belong to the history that
Ray discarded), and the trainer resumes from it. Every such restore is recorded in the run
directory's `tune.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgan.config import GanConfig, to_yaml
from dgan.errors import DganError
from dgan.io import atomic_write_text
from dgan.run import checkpoint as ckpt
from dgan.run.result import Directive, Report
from dgan.tune.space import SearchSpace, apply_params

LINEAGE_FILE = "tune.json"  # in a trial's run directory: where its checkpoints came from


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a study shares; Ray keeps one copy in its object store."""

    study: str  # the study's name
    base: dict[str, Any]  # the trials' GanConfig (model_dump), paths and tracking URI absolute
    space: SearchSpace
    objective: str
    parent_run_id: str | None  # the study's MLflow run; each trial's run is its child
    threads: int  # torch threads per trial: its CPUs
    schedule_changes: bool  # PBT: a resume may change the schedulable keys (GanJob)

    def config(self, params: dict[str, Any]) -> GanConfig:
        """The trial's config: the base with its sampled (and range-clipped) values."""
        return apply_params(GanConfig.model_validate(self.base), self.space.clip(params))

    def tags(self, trial_id: str) -> dict[str, str]:
        tags = {"dgan.tune": self.study, "dgan.tune.trial": trial_id}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        return tags


def trial_run_dir(run_root: Path, trial_id: str) -> Path | None:
    """The run directory of a trial, when it has one (runs/tune/NAME/gan/NNNNN-<trial id>)."""
    found = sorted((Path(run_root) / "gan").glob(f"[0-9]*-{trial_id}"))
    return found[-1] if found else None


def train_trial(params: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune's function trainable: train one trial, reporting at each evaluation."""
    import torch
    from ray import tune

    from dgan.events import FileEvents
    from dgan.train.gan import run_gan

    torch.set_num_threads(setup.threads)
    trial_id = tune.get_context().get_trial_id()
    params = setup.space.clip(params)
    config = setup.config(params)
    run_root = Path(config.log.run_root)
    tags = setup.tags(trial_id)
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        run_dir = trial_run_dir(run_root, trial_id) or new_run_dir(run_root, trial_id, config, tags)
        resume = place_checkpoint(checkpoint, run_dir, trial_id, params)
    # Under PBT a trial's config changes while its MLflow run's params stay as they were
    # logged: its reports log the values in force as metrics too (hp.<key>).
    shown = params if setup.schedule_changes else {}
    reporter = TrialReporter(setup.objective, trial_id, config.log.tracking_uri, shown)
    events = FileEvents(run_root / "logs" / f"{trial_id}.log")
    try:
        run_gan(
            config,
            resume=None if resume is None else str(resume),
            events=events,
            callback=reporter,
            run_name=trial_id,
            tags=tags,
            check_data=False,  # the study checked the data once, before Ray started
            schedule_changes=setup.schedule_changes,
        )
    finally:
        events.stream.close()
    if reporter.stopped is not None:  # Ray's own way out of a stopped trial
        raise reporter.stopped
    reporter.report_final()


class TrialReporter:
    """The trainer's callback: a checkpoint at every evaluation, then one Ray Tune report.

    The last evaluation is reported once the trainer has returned, its generator exported and
    its MLflow run closed, marked `done` so that no scheduler acts on it (a PBT exploit there
    would only swap the trial's final result for another's).
    """

    def __init__(
        self, objective: str, trial_id: str, tracking_uri: str | None, shown: dict[str, Any]
    ) -> None:
        self.objective, self.trial_id = objective, trial_id
        self.tracking_uri, self.shown = tracking_uri, shown
        self.losses: dict[str, float] = {}
        self.evaluated: tuple[int, dict[str, float]] | None = None
        self.final: tuple[dict[str, Any], Path] | None = None
        self.stopped: SystemExit | None = None

    def __call__(self, report: Report) -> Directive | None:
        if report.kind == "log":
            self.losses = report.metrics
        elif report.kind == "eval":
            self.evaluated = (report.step, report.metrics)
            return Directive.CHECKPOINT
        elif self.evaluated is not None and self.evaluated[0] == report.step:
            metrics = self.metrics(report.step, self.evaluated[1], report.checkpoint)
            if report.step == report.total:
                self.final = (metrics, report.checkpoint)
                return None
            return self.report(metrics, report.checkpoint)
        return None

    def metrics(self, step: int, evaluation: dict[str, float], directory: Path) -> dict:
        metrics = {**self.losses, **evaluation, "iteration": step}
        if self.objective not in metrics:
            raise DganError(
                f"the report at iteration {step} holds no {self.objective} (it has "
                f"{', '.join(sorted(metrics))}); choose an objective every evaluation measures"
            )
        if self.shown:
            from dgan.tracking.tracker import open_client

            run_id = ckpt.read_status(Path(directory).parent.parent).get("mlflow_run_id")
            client = open_client(self.tracking_uri)
            for key, value in self.shown.items():
                if isinstance(value, int | float):
                    client.log_metric(run_id, f"hp.{key}", float(value), step=step)
        return metrics

    def report(self, metrics: dict[str, Any], directory: Path) -> Directive | None:
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(str(directory))
        checkpoint.set_metadata({"trial_id": self.trial_id, "iteration": metrics["iteration"],
                                 "run_dir": str(Path(directory).parent.parent)})  # fmt: skip
        try:
            tune.report(metrics, checkpoint=checkpoint)
        except SystemExit as stop:  # the scheduler stopped or paused this trial
            self.stopped = stop
            return Directive.STOP
        return None

    def report_final(self) -> None:
        """The last evaluation, after the trainer finished (see the class docstring)."""
        if self.final is not None:
            from ray.tune.result import DONE

            metrics, directory = self.final
            self.report({**metrics, DONE: True}, directory)
            if self.stopped is not None:
                raise self.stopped


def new_run_dir(run_root: Path, trial_id: str, config: GanConfig, tags: dict[str, str]) -> Path:
    """A run directory for a trial that starts from a checkpoint before it ever ran here (a
    restore on another node), laid out as dgan.run.launch.prepare_run lays out a new run."""
    run_dir = ckpt.new_run_dir(run_root, "gan", trial_id)
    atomic_write_text(run_dir / "config.yaml", to_yaml(config))
    ckpt.write_status(run_dir, state="created", mlflow_tags=tags)
    return run_dir


def place_checkpoint(checkpoint, run_dir: Path, trial_id: str, params: dict[str, Any]) -> Path:
    """Copy a checkpoint Ray handed back into `run_dir`, replacing the checkpoints there, and
    record where it came from in `tune.json`. Returns the checkpoint directory to resume."""
    meta = checkpoint.get_metadata()
    if "iteration" not in meta:
        raise DganError(f"{checkpoint.path} is not a checkpoint written by a dgan tune trial")
    iteration = int(meta["iteration"])
    folder = Path(run_dir) / "checkpoints"
    target = folder / f"iter-{iteration:08d}"
    staging = folder / f".tmp-restore-{iteration:08d}"
    shutil.rmtree(staging, ignore_errors=True)
    with checkpoint.as_directory() as source:
        if not (Path(source) / "state.pt").is_file():
            raise DganError(f"Ray's checkpoint {checkpoint.path} holds no state.pt")
        shutil.copytree(source, staging)
    for old in ckpt.list_checkpoints(run_dir):
        shutil.rmtree(old)
    os.replace(staging, target)
    record = {
        "iteration": iteration,
        "from_trial": meta.get("trial_id"),
        "from_run_dir": meta.get("run_dir"),
        "checkpoint": str(checkpoint.path),
        "state_sha256": hashlib.sha256((target / "state.pt").read_bytes()).hexdigest(),
        "params": params,
    }
    lineage_path = Path(run_dir) / LINEAGE_FILE
    lineage = json.loads(lineage_path.read_text()) if lineage_path.is_file() else {}
    lineage.setdefault("trial_id", trial_id)
    lineage.setdefault("restores", []).append(record)
    atomic_write_text(lineage_path, json.dumps(lineage, indent=2) + "\n")
    return target
