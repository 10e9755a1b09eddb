"""A queued job's process: `python -m jobs.runner --spec FILE` makes one call of the job API.

The worker writes the attempt's resolved spec to a file and starts this module as its own
process group, with the attempt's log as stdout and stderr. It runs the job in the submitter's
directory, hands the job API a metrics callback that records progress and checkpoints, and
writes how the attempt ended (its outcome: state, error, the job's typed result and outputs) to
`attempt-N.outcome.json`. `python -m jobs.runner --db runs/jobs.db --job ID` runs a queued
job's spec in the foreground instead, without touching the queue (for looking into a job).

Training jobs keep their runs under the job's own directory (`log.run_root` is
`runs/jobs/<id>/`), so a later attempt finds the latest checkpoint there and resumes it exactly,
whichever worker runs it: nothing has to be handed from one attempt to the next.

Exit status: 0 finished, 130 interrupted (SIGTERM: checkpointed and stopped), else the error's.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dgan.errors import DganError
from dgan.events import StreamEvents
from dgan.io import atomic_write_text

PROGRESS_FILE = "progress.json"
INTERRUPTED = 130


def spec_file(job_dir: Path, attempt: int) -> Path:
    """Where the worker writes an attempt's resolved spec for the runner."""
    return Path(job_dir) / f"attempt-{attempt}.spec.json"


def outcome_file(job_dir: Path, attempt: int) -> Path:
    """Where the runner writes how the attempt ended."""
    return Path(job_dir) / f"attempt-{attempt}.outcome.json"


class Progress:
    """The attempt's latest progress in `progress.json`, which the worker copies into the queue
    at each heartbeat: the step, the last checkpoint and run directory, the logged figures."""

    def __init__(self, path: Path, attempt: int) -> None:
        self.path = path
        self.state: dict[str, Any] = {"attempt": attempt}
        self.last_write = 0.0

    def update(self, force: bool = False, **fields: Any) -> None:
        self.state.update({k: v for k, v in fields.items() if v is not None})
        now = time.monotonic()
        if force or now - self.last_write >= 0.5:
            self.state["time"] = time.time()
            atomic_write_text(self.path, json.dumps(self.state))
            self.last_write = now

    def report(self, report) -> None:
        """The job API's metrics callback (dgan.run.result.Report)."""
        fields: dict[str, Any] = {"step": report.step, "total": report.total}
        if report.kind == "log":
            fields["metrics"] = {k: round(v, 6) for k, v in report.metrics.items()}
        if report.checkpoint is not None:
            fields["checkpoint"] = str(report.checkpoint)
            fields["run_dir"] = str(report.checkpoint.parent.parent)
        self.update(force=report.checkpoint is not None, **fields)


class QueueEvents(StreamEvents):
    """What the job says goes to its log (stdout); its progress also goes to `Progress`."""

    def __init__(self, progress: Progress) -> None:
        super().__init__(sys.stdout)
        self.tracked = progress

    def progress(self, done, total, values=None, unit="it") -> None:
        super().progress(done, total, values, unit)
        self.tracked.update(step=done, total=total, unit=unit)


# ---------------------------------------------------------------------------------------------
# One function per kind: the call of the job API, and what the job leaves for later jobs
# ---------------------------------------------------------------------------------------------


def _latest_checkpoint(run_root: Path, kind: str) -> Path | None:
    from dgan.run.checkpoint import resolve_resume

    try:
        return resolve_resume("latest", run_root, kind)
    except DganError:
        return None


def _mlflow(tracking_uri: str | None, run_id: str | None) -> dict[str, str]:
    """The tracking URI (absolute) and the run's page in the MLflow UI."""
    if run_id is None:
        return {}
    from dgan.tracking.tracker import open_client, store_uri

    uri = store_uri(tracking_uri)
    try:
        experiment = open_client(uri).get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - a link is a convenience; the run id is what counts
        return {"tracking_uri": uri}
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return {"tracking_uri": uri, "mlflow_link": f"{base}/#/experiments/{experiment}/runs/{run_id}"}


def _training(spec, job_dir: Path, events, progress: Progress) -> dict[str, Any]:
    if spec.kind == "train-gan":
        from dgan.train.gan import GanJob as job_type
        from dgan.train.gan import run_gan as run
    else:
        from dgan.train.inspector import InspectorJob as job_type
        from dgan.train.inspector import run_inspector as run
    # A Ray Train job's runs go to shared storage when it names one, each job in its own root.
    storage = Path(spec.storage) / Path(job_dir).name if spec.workers and spec.storage else None
    run_root = storage or Path(job_dir)
    log = spec.config.log.model_copy(update={"run_root": run_root})
    config = spec.config.model_copy(update={"log": log})
    checkpoint = _latest_checkpoint(run_root, job_type.kind)
    if checkpoint is not None:
        print(f"resuming from {checkpoint}", flush=True)
        progress.update(force=True, resumed_from=str(checkpoint))
    resume = None if checkpoint is None else "latest"
    tags = {"dgan.queue_job": os.environ.get("DGAN_JOB_ID", "")}
    if spec.workers:
        from dgan.run.ray_train import train_on_ray

        # Ray Train places the workers on the cluster at ray_address (or RAY_ADDRESS); their
        # progress reaches this job's log as Ray's worker output.
        result = train_on_ray(
            job_type, config, resume=resume, workers=spec.workers,
            gpus_per_worker=spec.gpus_per_worker, address=spec.ray_address, storage=storage,
            run_name=spec.name, events=events, tags=tags,
        )  # fmt: skip
    else:
        # With gpus > 1 the job runs in launched processes, where a callback cannot reach.
        callback = progress.report if spec.gpus == 1 else None
        result = run(
            config,
            resume=resume,
            gpus=spec.gpus,
            events=events,
            callback=callback,
            run_name=spec.name,
            tags=tags,
        )
    if result.state != "finished":
        raise DganError(f"the run stopped in state {result.state} at step {result.step}")
    outputs = {"run_dir": str(Path(result.run_dir).resolve())}
    if result.model_dir is not None:
        outputs["model"] = str(Path(result.model_dir).resolve())
    return {
        "result": result.to_dict(),
        "outputs": outputs,
        "run_dir": outputs["run_dir"],
        "mlflow_run_id": result.mlflow_run_id,
        **_mlflow(config.log.tracking_uri, result.mlflow_run_id),
    }


def _synth(spec, job_dir: Path, events, progress: Progress) -> dict[str, Any]:
    from dgan.synth.run import run_synth

    # Synthesis resumes by construction: the same config into the same --out completes the set.
    result = run_synth(spec.config, gpus=spec.gpus, events=events)
    out = str(Path(result.run_dir).resolve())
    return {"result": result.to_dict(), "outputs": {"out": out}, "run_dir": out}


def _report(job_dir: Path, report, metrics: dict[str, float], json_out: str | None) -> dict:
    print(report.format(), flush=True)
    path = Path(job_dir) / "report.json"
    atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
    if json_out:
        atomic_write_text(Path(json_out), json.dumps(report.to_dict(), indent=2) + "\n")
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    return {"result": {"metrics": clean, "report": str(path)}, "outputs": {"report": str(path)}}


def _eval_inspector(spec, job_dir: Path, events, progress: Progress) -> dict[str, Any]:
    from dgan.train.inspector import evaluate_inspector

    s = spec
    report = evaluate_inspector(s.model, Path(s.data), s.split, s.batch_size, s.tracking_uri)
    return _report(job_dir, report, report.metrics(), s.json_out)


def _eval_fid(spec, job_dir: Path, events, progress: Progress) -> dict[str, Any]:
    from dgan.evaluation.fid_report import evaluate_fid

    s = spec
    model, data = (None, s.paths[0]) if len(s.paths) == 1 else s.paths
    weights = Path(s.inception_weights) if s.inception_weights else None
    report = evaluate_fid(
        Path(data), model, s.n, s.split, s.inspector, weights, s.split_real, s.seed,
        s.batch_size, Path(s.cache_dir), s.image_size, s.tracking_uri, events=events,
    )  # fmt: skip
    return _report(job_dir, report, report.to_dict()["metrics"], s.json_out)


def _eval_synth(spec, job_dir: Path, events, progress: Progress) -> dict[str, Any]:
    from dgan.evaluation.synth_report import evaluate_synthesis

    s = spec
    report = evaluate_synthesis(
        s.model, Path(s.data), s.inspector, s.n, s.split, s.seed, s.batch_size, s.tracking_uri,
        realism=s.realism, realism_repeats=s.realism_repeats, control_repeats=s.control_repeats,
        realism_n=s.realism_n, realism_by_set=s.realism_by_set, realism_steps=s.realism_steps,
    )  # fmt: skip
    # Figures on the held-out family end in _transfer, as during training.
    metrics = {
        f"{name}{'' if split == s.split else '_' + split}": value
        for split, figures in report.figures.items()
        for name, value in figures.items()
    }
    return _report(job_dir, report, metrics, s.json_out)


def _tune(spec, job_dir: Path, events, progress: Progress) -> dict[str, Any]:
    """A study under the job's own directory: a later attempt continues it (Tuner.restore)."""
    from dgan.tune.study import run_study

    config = spec.config.model_copy(update={"root": Path(job_dir)})
    name = "study"
    resume = name if (Path(job_dir) / name).is_dir() else None
    if resume is not None:
        progress.update(force=True, resumed_from=str(Path(job_dir) / name))
    study = run_study(config, name=None if resume else name, resume=resume, events=events)
    best = study.rows[0] if study.rows else None
    metrics = {study.objective: best.value} if best is not None and best.value is not None else {}
    outputs = {"report": str(study.directory.resolve())}
    if study.best_config is not None:
        outputs["config"] = str(Path(study.best_config).resolve())
    return {"result": {"metrics": metrics}, "outputs": outputs}


def _noop(spec, job_dir: Path, events, progress: Progress) -> dict[str, Any]:
    job, attempt = os.environ.get("DGAN_JOB_ID", "?"), int(os.environ.get("DGAN_ATTEMPT", "0"))
    if spec.mark:
        line = (
            f"{job} {attempt} {os.getpid()} {os.environ.get('CUDA_VISIBLE_DEVICES', '-')} "
            f"{time.time():.6f}\n"
        )
        # One write on a file opened for appending: lines from concurrent jobs never interleave.
        fd = os.open(spec.mark, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    if attempt <= spec.fail_attempts:
        raise DganError(f"noop: attempt {attempt} fails, as asked (--fail-attempts)")
    end = time.monotonic() + spec.seconds
    while time.monotonic() < end:
        time.sleep(min(0.05, end - time.monotonic()))
    return {"result": {"metrics": {"seconds": spec.seconds}}, "outputs": {}}


RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "train-gan": _training,
    "train-inspector": _training,
    "synth": _synth,
    "eval-inspector": _eval_inspector,
    "eval-fid": _eval_fid,
    "eval-synth": _eval_synth,
    "tune": _tune,
    "noop": _noop,
}


def execute(spec, job: int, attempt: int, job_dir: Path) -> dict[str, Any]:
    """Run one attempt of `spec` in this process; returns its outcome (never raises for the
    job's own errors): state finished, interrupted or failed, with the error and the result."""
    from dgan.run.result import JobInterrupted

    job_dir = Path(job_dir).resolve()
    job_dir.mkdir(parents=True, exist_ok=True)
    os.environ.update(spec.env)
    os.environ.update({"DGAN_JOB_ID": str(job), "DGAN_ATTEMPT": str(attempt)})
    progress = Progress(job_dir / PROGRESS_FILE, attempt)
    events = QueueEvents(progress)
    t0 = time.time()
    print(
        f"job {job} attempt {attempt}: {spec.kind} {spec.name!r} in {spec.workdir} "
        f"(pid {os.getpid()}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')})",
        flush=True,
    )
    try:
        os.chdir(spec.workdir)
        outcome = {"state": "finished", **RUNNERS[spec.kind](spec, job_dir, events, progress)}
    except JobInterrupted as err:
        checkpoint = err.result.checkpoint
        outcome = {
            "state": "interrupted",
            "result": err.result.to_dict(),
            "run_dir": str(Path(err.result.run_dir).resolve()),
            "mlflow_run_id": err.result.mlflow_run_id,
            "checkpoint": None if checkpoint is None else str(checkpoint),
        }
    except KeyboardInterrupt:
        outcome = {"state": "interrupted"}
    except DganError as err:
        state = "interrupted" if err.exit_code == INTERRUPTED else "failed"
        print(f"error: {err}", file=sys.stderr, flush=True)
        outcome = {"state": state, "error": str(err), "exit_code": err.exit_code}
    except Exception as err:  # noqa: BLE001 - recorded, with its traceback in the log
        traceback.print_exc()
        outcome = {"state": "failed", "error": f"{type(err).__name__}: {err}", "exit_code": 1}
    outcome["seconds"] = time.time() - t0
    print(f"job {job} attempt {attempt}: {outcome['state']} after {outcome['seconds']:.1f} s")
    return outcome


def exit_status(outcome: dict[str, Any]) -> int:
    """0 finished, 130 interrupted, else the error's exit code."""
    if outcome["state"] == "finished":
        return 0
    if outcome["state"] == "interrupted":
        return INTERRUPTED
    return int(outcome.get("exit_code") or 1)


def _stop_on_sigterm() -> None:
    """SIGTERM as Ctrl-C until the job API installs its own handler (which checkpoints)."""

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)


def _die_with_parent(interval: float = 0.25) -> None:
    """Kill this process group when the worker that started it dies (SIGKILL, OOM): the job's
    lease then expires and another worker resumes it, so nothing of this attempt may go on
    writing beside it."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    """`python -m jobs.runner`: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m jobs.runner", description=__doc__)
    parser.add_argument("--spec", type=Path, help="an attempt's spec file, written by a worker")
    parser.add_argument("--db", help="a queue (with --job): run that job's spec in the foreground")
    parser.add_argument("--job", type=int)
    parser.add_argument("--watch-parent", action="store_true", help="die with the worker")
    args = parser.parse_args(argv)
    _stop_on_sigterm()
    if args.watch_parent:
        _die_with_parent()
    from jobs.spec import parse_spec, resolve_references

    if args.spec is not None:
        attempt_spec = json.loads(args.spec.read_text())
        job, attempt = attempt_spec["job"], attempt_spec["attempt"]
        job_dir = Path(attempt_spec["job_dir"])
        spec = parse_spec(attempt_spec["spec"])
    elif args.db and args.job is not None:
        from jobs.store import Store

        try:
            with Store(args.db, create=False) as store:
                row = store.get(args.job)
                outputs = {
                    d["id"]: json.loads(store.get(d["id"])["outputs"] or "{}")
                    for d in store.dependencies(args.job)
                }
                spec = resolve_references(row["spec"], outputs)
                job, attempt, job_dir = args.job, 0, store.job_dir(args.job)
        except DganError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
    else:
        parser.error("give --spec FILE, or --db DB --job ID")
    outcome = execute(spec, job, attempt, job_dir)
    if args.spec is not None:
        atomic_write_text(outcome_file(job_dir, attempt), json.dumps(outcome, indent=2))
    return exit_status(outcome)


if __name__ == "__main__":
    sys.exit(main())
