"""`dgan jobs ...`: the job queue's commands, a Typer sub-app that cli.py mounts.

Nothing here imports torch, MLflow or Ray, so listing, showing and submitting stay fast; a
worker starts every job in a process of its own.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from dgan.errors import friendly

jobs_app = typer.Typer(
    help="The job queue: queue training, synthesis and evaluation jobs (alone or as a pipeline) "
    "and run workers that drain it on their GPUs.\n\n"
    "Example: dgan jobs submit train-gan --config demo --priority 5",
    no_args_is_help=True,
)

DbOpt = Annotated[
    Path | None,
    typer.Option(
        "--db",
        envvar="DGAN_JOBS_DB",
        help="The queue's database (default runs/jobs.db; or $DGAN_JOBS_DB).",
    ),
]
JobArg = Annotated[int, typer.Argument(help="The job's id (dgan jobs list).")]


def _open(db: Path | None, create: bool = False):
    from jobs.store import Store, resolve_db

    return Store(resolve_db(db), create=create)


def _when(t: float | None) -> str:
    if not t:
        return "-"
    moment = datetime.fromtimestamp(t)
    today = datetime.now().date() == moment.date()
    return moment.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M:%S")


def _ago(t: float | None, now: float) -> str:
    if not t:
        return "-"
    s = max(0, int(now - t))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def _progress(row) -> str:
    if not row["progress"]:
        return "-"
    p = json.loads(row["progress"])
    if "step" not in p or not p.get("total"):
        return "-"
    return f"{p['step']}/{p['total']}"


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = (
            v.rjust(w) if k in right else v.ljust(w)
            for k, (v, w) in enumerate(zip(r, widths, strict=True))
        )
        lines.append("  ".join(cells).rstrip())
    return lines


def _warn_capacity(store, job: int, gpus: int, queue: str) -> None:
    """A job more GPUs than any worker offers is queued, with this warning (see the README)."""
    serving = [w for w in store.live_workers() if queue in w["queues"].split(",")]
    if not serving:
        typer.echo(
            f"note: no worker serves queue {queue!r} right now; start one with "
            f"'dgan jobs worker --queue {queue}'",
            err=True,
        )
        return
    largest = serving[0]
    if _spread(store.get(job)):
        return  # its Ray Train workers may sit on several nodes
    if gpus > largest["capacity"]:
        offers = (
            f"the largest node of the Ray cluster at {largest['cluster']}, which "
            f"{largest['id']} dispatches to, has {largest['capacity']} {largest['unit']}s"
            if largest["cluster"]
            else f"the largest, {largest['id']}, has {largest['capacity']}"
        )
        typer.echo(
            f"warning: job {job} asks for {gpus} GPUs, more than any worker of queue {queue!r} "
            f"offers ({offers}). It stays queued until a worker with {gpus} starts; "
            f"'dgan jobs cancel {job}' removes it.",
            err=True,
        )


def _spread(row) -> bool:
    """A training job of several Ray Train workers: its GPUs may come from several nodes."""
    from jobs.ray_backend import job_demand

    return job_demand(row["gpus"], json.loads(row["spec"]))[0] > 1


def _warn_blocked(store, ids: list[int]) -> None:
    for job in ids:
        row = store.get(job)
        if row["state"] == "upstream_failed":
            typer.echo(f"warning: job {job} will not run: {row['error']}", err=True)


# ---------------------------------------------------------------------------------------------
# Submitting
# ---------------------------------------------------------------------------------------------


@jobs_app.command(
    "submit", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
@friendly
def submit(
    ctx: typer.Context,
    kind: Annotated[
        str,
        typer.Argument(
            help="train-gan, train-inspector, synth, eval-inspector, eval-fid, eval-synth, tune "
            "or noop; then that command's own options and arguments."
        ),
    ],
    priority: Annotated[int, typer.Option(help="Higher runs first, and preempts lower.")] = 0,
    gpus: Annotated[
        int, typer.Option(help="GPUs (or CPU slots) it holds; the processes of a training job.")
    ] = 1,
    after: Annotated[
        list[int] | None, typer.Option(help="Run after this job succeeds; repeatable.")
    ] = None,
    max_retries: Annotated[int, typer.Option(help="Retries after a failure, with backoff.")] = 0,
    queue: Annotated[str, typer.Option(help="Named queue; workers serve named queues.")] = (
        "default"
    ),
    name: Annotated[
        str | None, typer.Option(help="The job's name (and its run directory's suffix).")
    ] = None,
    db: DbOpt = None,
) -> None:
    """Queue one job and print its id. KIND takes the options of its command: train-gan those
    of 'dgan train gan', synth those of 'dgan synth', eval-fid those of 'dgan eval fid'. They are
    checked now, as the command would check them; nothing is queued when one is wrong.

    A job may name an output of an earlier job: ${12.model} (train-gan, train-inspector: model,
    run_dir; synth: out; eval-*: report). It then runs after that job.

    Example: dgan jobs submit train-gan --config demo --set train.iterations=2000 --priority 5
    """
    from jobs.spec import build_spec, new_job

    spec = build_spec(kind, list(ctx.args), gpus, name)
    job = new_job(spec, queue, priority, max_retries, after)
    with _open(db, create=True) as store:
        [job_id] = store.submit([job])
        _warn_capacity(store, job_id, gpus, queue)
        _warn_blocked(store, [job_id])
    typer.echo(job_id)


@jobs_app.command("pipeline")
@friendly
def pipeline(
    file: Annotated[Path, typer.Argument(help="A pipeline file (YAML): named steps in order.")],
    db: DbOpt = None,
) -> None:
    """Queue a pipeline: a DAG of jobs. Each step has a name, a kind and that command's args; it
    runs after the steps in its `after` list and those whose outputs its args name, as
    ${step.output}. A step whose dependency fails does not run; 'dgan jobs retry' of the failed
    step lets the rest go on.

    \b
        steps:
          - {name: gan, kind: train-gan, args: [--config, demo]}
          - {name: synth, kind: synth, args: [--generator, "${gan.model}", --out, synth/p]}
          - {name: inspector, kind: train-inspector, args: [--synthetic, "${synth.out}"]}

    Example: dgan jobs pipeline jobs/pipelines/table3.yaml
    """
    from jobs.spec import read_pipeline

    jobs = read_pipeline(file)
    with _open(db, create=True) as store:
        ids = store.submit(jobs)
        typer.echo(f"pipeline {jobs[0].pipeline}: {len(ids)} jobs")
        for job, job_id in zip(jobs, ids, strict=True):
            after = store.dependencies(job_id)
            waits = f"  after {', '.join(str(d['id']) for d in after)}" if after else ""
            typer.echo(f"  {job_id:>6}  {job.step:<20} {job.kind:<16}{waits}".rstrip())
        queues = {j.queue for j in jobs}
        for queue in sorted(queues):
            most = max(j.gpus for j in jobs if j.queue == queue)
            top = next(i for j, i in zip(jobs, ids, strict=True) if j.gpus == most)
            _warn_capacity(store, top, most, queue)
        _warn_blocked(store, ids)


# ---------------------------------------------------------------------------------------------
# Looking at the queue
# ---------------------------------------------------------------------------------------------


def _list_lines(store, states, queues, limit) -> list[str]:
    from jobs.store import RUNNING

    rows, total, counts = store.list_jobs(states, queues, limit)
    now = time.time()
    table = []
    for r in rows:
        name = f"{r['pipeline']}/{r['step']}" if r["pipeline"] else r["name"]
        if r["state"] == RUNNING:
            note = f"{r['worker']} [{r['devices']}]"
        elif r["state"] == "queued" and r["not_before"] > now:
            note = f"retry in {_ago(now - (r['not_before'] - now), now)}"
        else:
            note = (r["error"] or "").splitlines()[0][:60] if r["error"] else ""
        table.append([
            str(r["id"]), r["state"], str(r["priority"]), r["queue"], r["kind"], name,
            str(r["gpus"]), _progress(r), str(r["attempts"]), _ago(r["submitted"], now), note,
        ])  # fmt: skip
    header = ["ID", "STATE", "PRI", "QUEUE", "KIND", "NAME", "GPUS", "PROGRESS", "TRIES", "AGE",
              "WORKER / NOTE"]  # fmt: skip
    lines = _table(header, table, right={0, 2, 6, 7, 8, 9}) if rows else ["no jobs match"]
    summary = ", ".join(f"{counts[s]} {s}" for s in sorted(counts, key=_state_order))
    shown = f"{len(rows)} of {total} jobs" if len(rows) < total else f"{total} jobs"
    more = " (--limit 0 shows all)" if len(rows) < total else ""
    lines.append(f"{shown}{more}; in the queue: {summary or 'nothing'}")
    return lines


def _state_order(state: str) -> int:
    from jobs.store import STATES

    return STATES.index(state) if state in STATES else len(STATES)


@jobs_app.command("list")
@friendly
def list_jobs(
    state: Annotated[
        list[str] | None,
        typer.Option(
            help="Only these states (queued, running, succeeded, failed, cancelled, "
            "upstream_failed); repeatable or comma-separated."
        ),
    ] = None,
    queue: Annotated[list[str] | None, typer.Option(help="Only these queues.")] = None,
    limit: Annotated[int, typer.Option(help="Show the last N matching jobs; 0: all.")] = 50,
    watch: Annotated[bool, typer.Option(help="Redraw every 2 s until Ctrl-C.")] = False,
    db: DbOpt = None,
) -> None:
    """A table of jobs: state, priority, queue, kind, progress, attempts, worker.

    Example: dgan jobs list --state running,queued --watch
    """
    from dgan.errors import DganError
    from jobs.store import STATES, resolve_db

    states = [s.strip() for part in state or [] for s in part.split(",") if s.strip()]
    queues = [q.strip() for part in queue or [] for q in part.split(",") if q.strip()]
    for s in states:
        if s not in STATES:
            raise DganError(f"--state {s!r}: choose from {', '.join(STATES)}", exit_code=2)
    path = resolve_db(db)
    if not path.exists():
        typer.echo(f"no jobs: there is no queue at {path} yet (dgan jobs submit makes it)")
        return
    with _open(path) as store:
        while True:
            lines = _list_lines(store, states, queues, limit)
            if not watch:
                typer.echo("\n".join(lines))
                return
            screen = [f"{_when(time.time())}  {path}", *lines]
            sys.stdout.write("\033[H\033[2J" + "\n".join(screen) + "\n")
            sys.stdout.flush()
            try:
                time.sleep(2.0)
            except KeyboardInterrupt:
                return


def _waiting_reason(store, row) -> str | None:
    """Why a queued job has not started."""
    now = time.time()
    held = [d for d in store.dependencies(row["id"]) if d["state"] != "succeeded"]
    if held:
        return "waits on " + ", ".join(f"job {d['id']} ({d['state']})" for d in held)
    if row["not_before"] > now:
        return f"retries at {_when(row['not_before'])} (backoff after a failure)"
    serving = [w for w in store.live_workers() if row["queue"] in w["queues"].split(",")]
    if not serving:
        return f"no worker serves queue {row['queue']!r} (dgan jobs worker --queue {row['queue']})"
    largest = serving[0]
    if row["gpus"] > largest["capacity"] and not _spread(row):
        if largest["cluster"]:
            return (
                f"needs {row['gpus']} {largest['unit']}s; the largest node of the Ray cluster at "
                f"{largest['cluster']} has {largest['capacity']} {largest['unit']}s (worker "
                f"{largest['id']} dispatches there); it starts when a node that large joins"
            )
        return (
            f"needs {row['gpus']} GPUs; the largest worker of queue {row['queue']!r} offers "
            f"{largest['capacity']}"
        )
    return "waits for free GPUs or slots, behind jobs of higher priority or submitted earlier"


@jobs_app.command("show")
@friendly
def show(
    job: JobArg,
    json_out: Annotated[bool, typer.Option("--json", help="The whole record as JSON.")] = False,
    db: DbOpt = None,
) -> None:
    """Everything about one job: its spec, state, attempts with their exit status and logs, run
    directory, MLflow run id and the MLflow UI link, final metrics.

    Example: dgan jobs show 12
    """
    with _open(db) as store:
        row = store.get(job)
        attempts = store.attempts(job)
        deps, dependents = store.dependencies(job), store.dependents(job)
        waiting = _waiting_reason(store, row) if row["state"] == "queued" else None
    record = dict(row)
    for key in ("spec", "argv", "outputs", "result", "progress"):
        record[key] = json.loads(record[key]) if record[key] else None
    if json_out:
        record["attempt_records"] = [dict(a) for a in attempts]
        record["after"] = [d["id"] for d in deps]
        typer.echo(json.dumps(record, indent=2))
        return
    typer.echo("\n".join(_show_lines(record, attempts, deps, dependents, waiting)))


def _show_lines(record, attempts, deps, dependents, waiting) -> list[str]:
    import yaml

    from jobs.kinds import KINDS

    r, result = record, record["result"] or {}
    where = f", pipeline {r['pipeline']} step {r['step']}" if r["pipeline"] else ""
    lines = [f"job {r['id']}: {r['kind']} {r['name']!r}{where}"]

    def field(name: str, value) -> None:
        if value not in (None, "", [], {}):
            lines.append(f"  {name:<12} {value}")

    field("state", r["state"] + (f" ({waiting})" if waiting else ""))
    field("queue", f"{r['queue']}, priority {r['priority']}, {r['gpus']} GPU(s) or slot(s)")
    field("command", " ".join([KINDS[r["kind"]].command, *r["argv"]]))
    field("after", ", ".join(f"{d['id']} ({d['state']})" for d in deps))
    field("before", ", ".join(f"{d['id']} ({d['state']})" for d in dependents))
    field("submitted", _when(r["submitted"]))
    field("started", _when(r["started"]) if r["started"] else None)
    field("ended", _when(r["ended"]) if r["ended"] else None)
    field("retries", f"{r['failures']} failure(s) of {r['max_retries']} retries allowed")
    field("error", r["error"])
    progress = r["progress"] or {}
    if r["state"] == "running" and progress:
        field("progress", f"{progress.get('step', '?')}/{progress.get('total', '?')}")
        field("checkpoint", progress.get("checkpoint"))
    if r["state"] != "succeeded" and result.get("checkpoint"):
        field("checkpoint", f"{result['checkpoint']} (dgan jobs retry {r['id']} resumes it)")
    field("run dir", r["run_dir"] or progress.get("run_dir"))
    field("MLflow run", r["mlflow_run_id"])
    if result.get("mlflow_link"):
        uri = result.get("tracking_uri", "")
        serve = "" if uri.startswith("http") else (
            f" (start the UI: dgan ui --tracking-uri {uri})"
        )  # fmt: skip
        field("MLflow UI", result["mlflow_link"] + serve)
    if result.get("registered_version"):
        field("model", f"models:/{result['registered_model']}/{result['registered_version']}")
    for name, value in (r["outputs"] or {}).items():
        field(f"out: {name}", value)
    metrics = result.get("metrics") or {}
    if metrics:
        shown = sorted(metrics.items())[:12]
        more = f" ... ({len(metrics)} in all; --json)" if len(metrics) > len(shown) else ""
        field("metrics", "  ".join(f"{k} {v:.4g}" for k, v in shown) + more)
    if attempts:
        lines.append("  attempts")
        rows = [
            [str(a["n"]), a["worker"], a["devices"] or "-", _when(a["started"]),
             _when(a["ended"]) if a["ended"] else "-", a["outcome"] or "running",
             "-" if a["exit_code"] is None else str(a["exit_code"]), a["log"] or "-"]
            for a in attempts
        ]  # fmt: skip
        header = ["#", "WORKER", "DEVICES", "STARTED", "ENDED", "OUTCOME", "EXIT", "LOG"]
        lines += ["    " + line for line in _table(header, rows, right={0, 6})]
    lines.append("  spec")
    shown = {k: v for k, v in r["spec"].items() if k != "argv"}  # argv: the command line above
    spec = yaml.safe_dump(shown, sort_keys=False).rstrip().splitlines()
    lines += ["    " + line for line in spec]
    return lines


@jobs_app.command("logs")
@friendly
def logs(
    job: JobArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job ends.")
    ] = False,
    attempt: Annotated[int | None, typer.Option(help="Only this attempt (default: all).")] = None,
    db: DbOpt = None,
) -> None:
    """Print a job's log: every attempt's, each under a header line.

    Example: dgan jobs logs 12 --follow
    """
    from dgan.errors import DganError
    from jobs.store import FINAL

    with _open(db) as store:
        store.get(job)
        printed: dict[int, int] = {}  # attempt -> bytes printed
        while True:
            attempts = store.attempts(job)
            if attempt is not None:
                attempts = [a for a in attempts if a["n"] == attempt]
                if not attempts and not follow:
                    raise DganError(f"job {job} has no attempt {attempt}", exit_code=2)
            for a in attempts:
                _print_new(a, printed)
            if not follow:
                if not attempts:
                    typer.echo(f"job {job} has not started yet", err=True)
                return
            if store.get(job)["state"] in FINAL and all(a["ended"] for a in attempts):
                for a in attempts:
                    _print_new(a, printed)
                return
            time.sleep(0.3)


def _print_new(a, printed: dict[int, int]) -> None:
    n = a["n"]
    if n not in printed:
        typer.echo(f"=== attempt {n} on {a['worker']} [{a['devices'] or '-'}]: {a['log']} ===")
        printed[n] = 0
    try:
        with open(a["log"], "rb") as f:
            f.seek(printed[n])
            data = f.read()
    except (OSError, TypeError):
        return
    if data:
        sys.stdout.write(data.decode("utf-8", errors="replace"))
        sys.stdout.flush()
        printed[n] += len(data)


# ---------------------------------------------------------------------------------------------
# Changing a job
# ---------------------------------------------------------------------------------------------


@jobs_app.command("cancel")
@friendly
def cancel(job: JobArg, db: DbOpt = None) -> None:
    """Cancel a job. A queued job is cancelled at once; a running one gets SIGTERM from its
    worker: it checkpoints, stops, and its state says cancelled ('dgan jobs retry' resumes it).
    Jobs after it do not run.

    Example: dgan jobs cancel 12
    """
    with _open(db) as store:
        typer.echo(store.cancel(job))


@jobs_app.command("retry")
@friendly
def retry(job: JobArg, db: DbOpt = None) -> None:
    """Queue a failed or cancelled job again, with the jobs after it that its failure held back.
    A training job resumes from its latest checkpoint.

    Example: dgan jobs retry 12
    """
    with _open(db) as store:
        ids = store.retry(job)
    others = f"; with it, the jobs after it: {', '.join(map(str, ids[1:]))}" if ids[1:] else ""
    typer.echo(f"job {job} queued again{others}")


# ---------------------------------------------------------------------------------------------
# The worker
# ---------------------------------------------------------------------------------------------


@jobs_app.command("worker")
@friendly
def worker(
    gpus: Annotated[
        str | None,
        typer.Option(help="GPU ids this worker gives out, e.g. 0,1,2,3 (default: all it finds)."),
    ] = None,
    slots: Annotated[
        int | None, typer.Option(help="Without GPUs: run this many jobs at once (default 1).")
    ] = None,
    queue: Annotated[
        list[str] | None, typer.Option(help="Queues to serve (default: default); repeatable.")
    ] = None,
    preempt: Annotated[
        bool, typer.Option(help="Stop lower-priority jobs for a higher one that does not fit.")
    ] = True,
    lease: Annotated[
        float, typer.Option(help="Seconds without a heartbeat before another worker takes over.")
    ] = 30.0,
    retry_backoff: Annotated[
        float, typer.Option(help="Seconds before the first retry of a failed job; doubles.")
    ] = 10.0,
    stop_timeout: Annotated[
        float, typer.Option(help="Seconds a stopped job gets to checkpoint before SIGKILL.")
    ] = 300.0,
    exit_when_empty: Annotated[
        bool,
        typer.Option(help="Exit once no job it could run is queued or running (drain and go)."),
    ] = False,
    backend: Annotated[
        str,
        typer.Option(
            help="local: run jobs on this machine's GPUs or slots. ray: dispatch them to a "
            "running Ray cluster (--address), which places each on a node with the GPUs it asks."
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            help="With --backend ray: the cluster's head as HOST:PORT (default: $RAY_ADDRESS). "
            "The worker joins it and never starts one; run it on a node of the cluster."
        ),
    ] = None,
    db: DbOpt = None,
) -> None:
    """Drain the queue: claim jobs by priority, run each in its own process group with its log
    in a file, hold their leases by heartbeat. Several workers may share one queue. Ctrl-C or
    SIGTERM: running jobs checkpoint and go back to the queue.

    With --backend ray the worker dispatches to a Ray cluster: it claims what fits the free GPUs
    of the cluster's nodes and each attempt runs on a node as a Ray actor; logs, retries,
    cancel and resume work as with local jobs. Keep --db on a local disk; the jobs/ directory
    beside it and the directories jobs were submitted from must be on storage that every node
    mounts at the same path.

    Example: dgan jobs worker --gpus 0,1,2,3 --queue default

    Example: dgan jobs worker --backend ray --address 10.0.0.5:6379
    """
    import os

    from dgan.errors import DganError
    from jobs.worker import Worker, detect_gpus

    if backend not in ("local", "ray"):
        raise DganError(f"--backend {backend!r}: choose local or ray", exit_code=2)
    if backend == "ray":
        _check_ray_flags(gpus, slots)
        address = address or os.environ.get("RAY_ADDRESS")
        if not address:
            raise DganError(
                "--backend ray needs the Ray cluster to dispatch to: give --address HOST:PORT "
                "of its head node (or set RAY_ADDRESS). The worker joins a running cluster and "
                "never starts one; start one with 'ray start --head --port 6379'",
                exit_code=2,
            )
        _serve(db, queue, lease, preempt, retry_backoff, stop_timeout, exit_when_empty, address)
        return
    if address is not None:
        raise DganError(
            "--address is the Ray cluster of --backend ray; add --backend ray, or drop --address",
            exit_code=2,
        )
    if gpus is not None and slots is not None:
        raise DganError("give --gpus or --slots, not both", exit_code=2)
    devices = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else None
    if gpus is not None and not devices:
        raise DganError(f"--gpus {gpus!r}: give GPU ids, e.g. --gpus 0,1", exit_code=2)
    if devices is None and slots is None:
        devices = detect_gpus() or None
    queues = [q.strip() for part in queue or ["default"] for q in part.split(",") if q.strip()]
    with _open(db, create=True) as store:
        server = Worker(
            store, gpus=devices, slots=slots or 1, queues=queues, lease=lease, preempt=preempt,
            retry_backoff=retry_backoff, stop_timeout=stop_timeout,
            exit_when_empty=exit_when_empty, say=_say,
        )  # fmt: skip
        raise typer.Exit(server.run())


def _check_ray_flags(gpus: str | None, slots: int | None) -> None:
    """--gpus and --slots describe this machine; a Ray cluster's nodes describe themselves."""
    from dgan.errors import DganError

    if gpus is not None:
        raise DganError(
            f"--gpus {gpus}: with --backend ray the cluster gives each job GPUs of the node Ray "
            "places it on; drop --gpus (a job's own --gpus says how many it needs)",
            exit_code=2,
        )
    if slots is not None:
        raise DganError(
            f"--slots {slots}: with --backend ray the free CPUs and GPUs of the cluster's nodes "
            "decide how many jobs run at once; drop --slots",
            exit_code=2,
        )


def _serve(db, queue, lease, preempt, retry_backoff, stop_timeout, exit_when_empty, address):
    """A worker that dispatches to the Ray cluster at `address`."""
    from jobs.ray_backend import RayBackend
    from jobs.worker import Worker

    queues = [q.strip() for part in queue or ["default"] for q in part.split(",") if q.strip()]
    with _open(db, create=True) as store:
        ray = RayBackend(address)
        server = Worker(
            store, backend=ray, queues=queues, lease=lease, preempt=preempt,
            retry_backoff=retry_backoff, stop_timeout=stop_timeout,
            exit_when_empty=exit_when_empty, say=_say,
        )  # fmt: skip
        raise typer.Exit(server.run())


def _say(line: str) -> None:
    typer.echo(f"{datetime.now():%H:%M:%S} {line}")
    sys.stdout.flush()
