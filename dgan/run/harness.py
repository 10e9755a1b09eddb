"""The run harness: one lifecycle for every training job.

A job (dgan.train.gan.GanJob, dgan.train.inspector.InspectorJob) supplies what is its own: its
nets and data, one step, its state, its periodic evaluation and its export. The harness owns the
rest:

- the run directory's config.yaml and status.json, and the state machine
  created -> running -> finished | paused | interrupted | failed;
- resume from a checkpoint (refusing an incompatible config), and checkpoint rotation;
- the non-finite guard, with one host sync per log interval;
- running means, and the cadence of log, samples, evaluation and checkpoint;
- the MLflow run, the logged model and its registration;
- Ctrl-C and SIGTERM (checkpoint, then JobInterrupted);
- the caller's metrics callback, which may ask for a checkpoint or a stop (state paused).

Every process of a distributed run calls `run_training`; only the main one writes and tracks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from dgan.config import config_hash, flatten, to_yaml
from dgan.errors import DganError
from dgan.events import Events
from dgan.io import atomic_write_text
from dgan.metrics.registry import is_better, metric_direction
from dgan.run import checkpoint as ckpt
from dgan.run.interrupt import InterruptFlag
from dgan.run.result import Callback, Directive, JobInterrupted, JobResult, Report


@dataclass(frozen=True)
class Cadence:
    """When the harness logs, draws samples, evaluates and checkpoints (0: never).

    `epoch`: steps per epoch; logs are also flushed at the end of each.
    """

    total: int
    log_every: int
    checkpoint_every: int
    eval_every: int = 0
    sample_every: int = 0
    epoch: int = 0

    def log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total or self._epoch_end(step)

    def samples(self, step: int) -> bool:
        return self.sample_every > 0 and (step % self.sample_every == 0 or step == self.total)

    def evaluate(self, step: int) -> bool:
        return self.eval_every > 0 and step % self.eval_every == 0

    def checkpoint(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.total

    def _epoch_end(self, step: int) -> bool:
        return self.epoch > 0 and step % self.epoch == 0


@dataclass
class Export:
    """What a finished job leaves: its model, and what is logged and recorded with it."""

    model_dir: Path
    pyfunc: Path  # the MLflow models-from-code file that serves it (dgan.tracking.pyfunc_*)
    artifact: str  # the logged model's name
    metrics: dict[str, float] = field(default_factory=dict)  # final figures, logged at `step`
    step: int = 0
    artifacts: list[Path] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)  # extra status.json fields
    version_metrics: dict[str, float] | None = None  # None: from the run's final metrics


class TrainingJob:
    """A kind of training; subclasses fill in the hooks. Built on every process."""

    kind: ClassVar[str]  # runs/<kind>/..., status and MLflow tags
    unit: ClassVar[str] = "it"
    step_name: ClassVar[str] = "step"
    # Config keys that may differ between a checkpoint and its resume: they change where a run
    # logs, reads or stops, not what its weights mean.
    resumable_keys: ClassVar[tuple[str, ...]] = ("log.", "data.num_workers", "data.root")
    # Exact keys that a scheduler may change between a checkpoint and its resume (population-based
    # training's explore step), because the job reads them afresh at every step. Only a caller
    # that asks for it (launch_training's schedule_changes) may resume across a change of them.
    schedulable_keys: ClassVar[tuple[str, ...]] = ()
    guarded_terms: ClassVar[tuple[str, ...]]  # loss terms that must stay finite

    config: Any
    classes: list[str]
    cadence: Cadence
    seed: int

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def batches(self, start: int) -> Iterator[Any]:
        """Training batches from step `start` + 1 on, as an uninterrupted run would see them."""
        raise NotImplementedError

    def step(self, step: int, batch: Any) -> dict[str, Tensor]:
        """One training step; returns its loss terms as device tensors (no host sync)."""
        raise NotImplementedError

    def begin(self, start: int, run_dir: Path) -> None:
        """After the tracker opened, before the first step (fixed inputs, warnings)."""

    def logged(self, step: int, means: dict[str, float]) -> dict[str, float]:
        """What a log writes: the running means, and the job's own values (learning rates)."""
        return means

    def shown(self, step: int, logged: dict[str, float]) -> dict[str, float]:
        """The few values of a log that the progress line shows."""
        return {}

    def evaluate(self, step: int, run_dir: Path) -> dict[str, float]:
        """The periodic evaluation (every process; metrics matter on the main one)."""
        return {}

    def write_samples(self, step: int, run_dir: Path) -> Path | None:
        """A sample grid (main process only)."""
        return None

    def finish(self, run_dir: Path) -> Export | None:
        """Export the trained model (every process; the main one returns the Export)."""
        return None

    def version_metrics(self, final: dict[str, float]) -> dict[str, float]:
        """The metrics a registered version carries as tags, from the run's final metrics."""
        return {}

    def status_fields(self) -> dict[str, Any]:
        """Extra status.json fields while running."""
        return {}

    def run_tags(self) -> dict[str, str]:
        """Extra MLflow tags of a new run, beside dgan.tracking.tracker.run_tags."""
        return {}

    def dataset_hash(self) -> str:
        raise NotImplementedError

    def pause_step(self, stop_at: int) -> int:
        """The step at which `stop_at` (in the job's own unit) pauses the run."""
        return stop_at


class RunningMeans:
    """Per-term sums kept on the device, so logging syncs with the host once per interval.

    Each term is averaged over the steps that produced it (G's terms over G's iterations)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, terms: dict[str, Tensor]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v.detach().float()
            self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        """The means since the last pop, then reset."""
        names = list(self.sums)
        values = torch.stack([self.sums[k] for k in names]).cpu().tolist() if names else []
        means = {k: v / max(1, self.counts[k]) for k, v in zip(names, values, strict=True)}
        self.sums, self.counts = {}, {}
        return means


class NonFiniteGuard:
    """Remembers, per loss term and on the device, the first step it was NaN or inf."""

    def __init__(self, terms: tuple[str, ...], device) -> None:
        self.terms = terms
        self.first_bad = torch.full((len(terms),), -1, device=device)

    def update(self, terms: dict[str, Tensor], step: int) -> None:
        zero = self.first_bad.new_zeros((), dtype=torch.float)
        values = torch.stack(
            [terms[k].detach().float() if k in terms else zero for k in self.terms]
        )
        bad = ~torch.isfinite(values) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, step_name: str, advice: str) -> None:
        """Raise DganError naming the first bad step and term (one host sync)."""
        hits = [(s, k) for s, k in zip(self.first_bad.cpu().tolist(), self.terms, strict=True)]
        hits = [(s, k) for s, k in hits if s >= 0]
        if hits:
            s, name = min(hits)
            raise DganError(
                f"training diverged: loss term {name} became NaN/inf at {step_name} {s}. No "
                f"checkpoint was written after it; the last good one is kept. {advice}"
            )


def check_compatible(
    state: dict,
    config,
    classes: list[str],
    keys: tuple[str, ...],
    where,
    relaxed: tuple[str, ...] = (),
) -> None:
    """Refuse a checkpoint from another config (but the prefixes `keys`, and the exact keys
    `relaxed`, which a scheduler changed on purpose) or another class list.

    A key that the checkpoint predates (absent from its config) counts as the same when it is at
    its default now: every new key's default keeps what dgan did before it existed."""
    if state.get("config_hash") != config_hash(config, keys):
        saved, now = json.loads(state.get("config_json", "{}")), flatten(config)
        defaults = flatten(type(config)())

        def differs(k: str) -> bool:
            if k not in saved and k in defaults:
                return now.get(k) != defaults[k]
            return saved.get(k) != now.get(k)

        diffs = [
            f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
            for k in sorted(set(saved) | set(now))
            if not k.startswith(keys) and k not in relaxed and differs(k)
        ]
        if saved and not diffs:  # only a scheduler's keys, or keys the checkpoint predates
            return
        raise DganError(
            f"checkpoint {where} comes from an incompatible config:\n  "
            + "\n  ".join(diffs or ["(unknown config)"])
            + "\nResume with the run's own config (--config RUN/config.yaml) or start a new run."
        )
    if state.get("classes") != classes:
        raise DganError(
            f"checkpoint {where} was trained on classes {state.get('classes')}, "
            f"the data now gives {classes}"
        )


class Harness:
    """One run of one job: everything around its steps. See the module docstring."""

    def __init__(
        self,
        job: TrainingJob,
        run_dir: Path,
        accelerator,
        events: Events,
        callback: Callback | None,
        schedule_changes: bool = False,
    ) -> None:
        self.job, self.run_dir, self.accelerator = job, Path(run_dir), accelerator
        self.schedule_changes = schedule_changes  # resume across job.schedulable_keys changes
        self.main = accelerator.is_main_process
        self.events = events if self.main else Events()
        self.callback = callback
        self.tracker = None
        self.saved_at: int | None = None
        self.last_checkpoint: Path | None = None
        self.last_eval: dict[str, float] = {}

    # -- checkpoints ------------------------------------------------------------------------

    def state(self, step: int) -> dict[str, Any]:
        job = self.job
        return {
            **job.state_dict(),
            job.step_name: step,
            "classes": job.classes,
            "config_hash": config_hash(job.config, job.resumable_keys),
            "config_json": json.dumps(flatten(job.config)),
        }

    def restore(self, path: Path) -> int:
        state, rng = ckpt.load_checkpoint(path, self.accelerator.process_index)
        job = self.job
        relaxed = job.schedulable_keys if self.schedule_changes else ()
        check_compatible(state, job.config, job.classes, job.resumable_keys, path, relaxed)
        job.load_state_dict(state)
        ckpt.restore_rng(rng, self.accelerator.device)
        self.saved_at, self.last_checkpoint = ckpt.checkpoint_iteration(path), path
        return int(state[job.step_name])

    def save(self, step: int) -> Path:
        if self.saved_at != step:
            state = self.state(step) if self.main else {}
            keep = self.job.config.log.keep_checkpoints
            self.last_checkpoint = ckpt.save_checkpoint(
                self.accelerator, self.run_dir, step, state, keep
            )
            self.saved_at = step
        return self.last_checkpoint

    # -- the callback -----------------------------------------------------------------------

    def tell(self, report: Report) -> Directive:
        """The callback's answer on the main process, the same on every process."""
        answer = Directive.CONTINUE
        if self.main and self.callback is not None:
            answer = self.callback(report) or Directive.CONTINUE
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            shared = [answer.value]
            broadcast_object_list(shared)
            answer = Directive(shared[0])
        return answer

    # -- the run ----------------------------------------------------------------------------

    def run(self, resume: Path | None, stop_at: int | None = None) -> JobResult:
        job, accelerator, events = self.job, self.accelerator, self.events
        t0 = time.perf_counter()
        total = job.cadence.total
        status = ckpt.read_status(self.run_dir)
        start = 0
        if resume is not None:
            start = self.restore(resume)
        else:  # the per-process random streams (noise, flips) differ
            torch.manual_seed(job.seed + accelerator.process_index)
        if start >= total:
            events.info(f"{self.run_dir}: already at {job.step_name} {start} of {total}.")
            return self.result(status.get("state", "finished"), start, status, t0)
        stop_step = job.pause_step(stop_at) if stop_at is not None else None

        loader = job.batches(start)
        self.tracker = self.open_tracker(status)
        if self.main:
            atomic_write_text(self.run_dir / "config.yaml", to_yaml(job.config))
            ckpt.write_status(
                self.run_dir, state="running", classes=job.classes,
                mlflow_run_id=self.tracker.run_id, **job.status_fields(),
            )  # fmt: skip
            events.info(
                f"MLflow run {self.tracker.run_id} ({self.tracker.uri}); {self.tracker.ui()}"
            )
        job.begin(start, self.run_dir)
        events.begin(start)
        interrupt = InterruptFlag()
        means = RunningMeans()
        guard = NonFiniteGuard(job.guarded_terms, accelerator.device)
        step = start
        try:
            batches = iter(loader)
            for step in range(start + 1, total + 1):
                terms = job.step(step, next(batches))
                means.add(terms)
                guard.update(terms, step)
                if self.between_steps(step, means, guard) or interrupt.requested:
                    break
                if step == stop_step:
                    break
        except KeyboardInterrupt:
            interrupt.requested = True
        except DganError:
            if self.main:
                ckpt.write_status(self.run_dir, state="failed", **{job.step_name: step})
                self.tracker.finish("FAILED")
            raise
        finally:
            interrupt.restore()
            events.close()

        if interrupt.requested:
            self.check_finite(guard)
            path = self.save(step)
            if self.main:
                ckpt.write_status(self.run_dir, state="interrupted", **{job.step_name: step})
                self.tracker.finish("KILLED")
                events.info(
                    f"interrupted at {job.step_name} {step}; saved {path}. "
                    f"Continue with --resume {self.run_dir}"
                )
            raise JobInterrupted(self.result("interrupted", step, None, t0))
        if step < total:  # paused by the callback or stop_at
            self.save(step)
            if self.main:
                ckpt.write_status(self.run_dir, state="paused", **{job.step_name: step})
                self.tracker.finish("FINISHED")
            return self.result("paused", step, None, t0)
        return self.finish(step, t0)

    def between_steps(self, step: int, means: RunningMeans, guard: NonFiniteGuard) -> bool:
        """Log, samples, evaluation and checkpoint due after `step`; True asks to stop."""
        job, cadence, tracker = self.job, self.job.cadence, self.tracker
        answers = []
        if cadence.log(step):
            self.check_finite(guard)
            logged = job.logged(step, means.pop())
            if self.main:
                tracker.log_metrics(logged, step=step)
                self.events.progress(step, cadence.total, job.shown(step, logged), job.unit)
            answers.append(self.tell(Report("log", step, cadence.total, logged)))
        if self.main and cadence.samples(step):
            path = job.write_samples(step, self.run_dir)
            if path is not None:
                tracker.log_artifact(path, "samples")
        if cadence.evaluate(step):
            self.last_eval = job.evaluate(step, self.run_dir)
            tracker.log_metrics(self.last_eval, step=step)
            answers.append(self.tell(Report("eval", step, cadence.total, self.last_eval)))
        wanted = {Directive.CHECKPOINT, Directive.STOP} & set(answers)
        if cadence.checkpoint(step) or wanted:
            self.check_finite(guard)
            path = self.save(step)
            answers.append(
                self.tell(Report("checkpoint", step, cadence.total, self.last_eval, path))
            )
        return Directive.STOP in answers

    def check_finite(self, guard: NonFiniteGuard) -> None:
        guard.check(self.job.step_name, getattr(self.job, "divergence_advice", ""))

    def finish(self, step: int, t0: float) -> JobResult:
        """Export, log and register the model; the result carries what MLflow holds."""
        export = self.job.finish(self.run_dir)
        fields: dict[str, Any] = {}
        if self.main and export is not None:
            tracker = self.tracker
            if export.metrics:
                tracker.log_metrics(export.metrics, step=export.step)
            for path in export.artifacts:
                tracker.log_artifact(path)
            log = self.job.config.log
            model_uri = None
            if log.log_model:
                model_uri = tracker.log_code_model(
                    export.artifact, export.pyfunc, {export.artifact: export.model_dir}
                )
            fields = {"model_dir": str(export.model_dir), "model_uri": model_uri, **export.status}
            at = {self.job.step_name: step}
            ckpt.write_status(self.run_dir, state="finished", **at, **fields)
            tracker.finish("FINISHED")
            if model_uri is not None:
                fields |= self.register(model_uri, export)
        self.accelerator.wait_for_everyone()
        return self.result("finished", step, fields, t0)

    def register(self, model_uri: str, export: Export) -> dict[str, Any]:
        from dgan.tracking.registry import register_run_model

        metrics = export.version_metrics
        if metrics is None:
            metrics = self.job.version_metrics(self.tracker.latest_metrics())
        registration = register_run_model(self.tracker, model_uri, self.job.config.log, metrics)
        if registration is None:
            return {}
        for line in registration.lines():
            self.events.info(line)
        fields = registration.status_fields()
        ckpt.write_status(self.run_dir, **fields)
        return fields

    def open_tracker(self, status: dict):
        from dgan.tracking.tracker import Tracker, run_tags

        job, log = self.job, self.job.config.log
        resumed = status.get("mlflow_run_id") is not None  # a resumed run keeps its tags
        tags = None
        if self.main and not resumed:
            tags = {
                **run_tags(job.kind, job.config, self.run_dir, job.dataset_hash()),
                **job.run_tags(),
                **status.get("mlflow_tags", {}),
            }
        tracker = Tracker(
            enabled=self.main,
            uri=log.tracking_uri,
            experiment=log.experiment,
            run_name=self.run_dir.name,
            params=flatten(job.config),
            tags=tags,
            run_id=status.get("mlflow_run_id"),
        )
        if tags is not None:  # a new run: its training set as an MLflow dataset input
            tracker.log_dataset(job.config.data.root, tags["dgan.dataset_hash"])
        return tracker

    def result(self, state: str, step: int, fields: dict | None, t0: float) -> JobResult:
        """The typed result; on the main process its metrics are read back from MLflow."""
        status = ckpt.read_status(self.run_dir) if self.main else {}
        fields = fields or {}
        run_id = self.tracker.run_id if self.tracker is not None else status.get("mlflow_run_id")
        metrics, best = {}, {}
        if self.main and run_id is not None:
            metrics, best = final_and_best(self.job.config.log.tracking_uri, run_id)
        model_dir = fields.get("model_dir") or status.get("model_dir")
        result = JobResult(
            kind=self.job.kind,
            state=state,
            run_dir=self.run_dir,
            step=step,
            total=self.job.cadence.total,
            mlflow_run_id=run_id,
            metrics=metrics,
            best=best,
            model_dir=Path(model_dir) if model_dir else None,
            model_uri=fields.get("model_uri", status.get("model_uri")),
            registered_model=fields.get("registered_model", status.get("registered_model")),
            registered_version=fields.get("registered_version", status.get("registered_version")),
            promoted=fields.get("promoted", status.get("promoted")),
            checkpoint=self.last_checkpoint,
            seconds=time.perf_counter() - t0,
        )
        if self.main:
            result.write(self.run_dir)
        return result


def final_and_best(tracking_uri: str | None, run_id: str) -> tuple[dict, dict]:
    """The run's last value of every metric, and the best value of each that has a direction."""
    from dgan.tracking.tracker import open_client

    client = open_client(tracking_uri)
    final = dict(client.get_run(run_id).data.metrics)
    best: dict[str, float] = {}
    for name in final:
        direction = metric_direction(name)
        if direction is None:
            continue
        for m in client.get_metric_history(run_id, name):
            if is_better(m.value, best.get(name), direction):
                best[name] = m.value
    return final, best


def run_training(
    job: TrainingJob,
    run_dir: Path,
    accelerator,
    events: Events,
    resume: Path | None = None,
    callback: Callback | None = None,
    stop_at: int | None = None,
    schedule_changes: bool = False,
) -> JobResult:
    """Train `job` into `run_dir` (every process calls this). See the module docstring.

    `schedule_changes`: a resume may differ from its checkpoint in `job.schedulable_keys`."""
    harness = Harness(job, run_dir, accelerator, events, callback, schedule_changes)
    return harness.run(resume, stop_at)
