"""The queue's storage: one SQLite file in WAL mode (default `runs/jobs.db`).

Why SQLite through the standard library's sqlite3: there is no server to run, a transaction is
atomic and survives a process killed in the middle of it (the file is never left half-written),
and WAL mode lets `dgan jobs list` read while workers write. Several workers on one machine share
the file: every change of state is one `BEGIN IMMEDIATE` transaction, which SQLite serialises,
so exactly one worker wins each claim. The file must stay on a local disk: SQLite's locks are
not reliable on a network file system.

Tables:
- `jobs`: the typed spec (JSON), its scheduling fields and its current state; while it runs, the
  worker holding it and the lease that worker renews by heartbeat;
- `deps`: job -> the jobs it runs after;
- `attempts`: one row per run of a job: worker, process, devices, exit status, outcome, log;
- `workers`: the workers serving the queue and what they offer (a Ray dispatcher: its
  cluster's address, and its largest node's GPUs as its capacity).

Job states: queued -> running -> succeeded | failed | cancelled, back to queued when preempted,
retried or its worker dies; upstream_failed when a job it runs after failed or was cancelled.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgan.errors import DganError
from jobs.kinds import KINDS

APPLICATION_ID = 0x6467616E  # "dgan" in the file's header: marks it as a dgan job queue
SCHEMA_VERSION = 2
DEFAULT_DB = Path("runs/jobs.db")
DB_ENV = "DGAN_JOBS_DB"
SQLITE_MAGIC = b"SQLite format 3\x00"

QUEUED, RUNNING, SUCCEEDED = "queued", "running", "succeeded"
FAILED, CANCELLED, UPSTREAM_FAILED = "failed", "cancelled", "upstream_failed"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, UPSTREAM_FAILED)
FINAL = (SUCCEEDED, FAILED, CANCELLED, UPSTREAM_FAILED)
BLOCKING = (FAILED, CANCELLED, UPSTREAM_FAILED)  # a job after one of these cannot run

# Attempt outcomes. "preempted" and "stopped" (its worker shut down) and "lost" (its worker died)
# return the job to the queue without counting as a failure.
SUCCEEDED_ATTEMPT, FAILED_ATTEMPT, PREEMPTED, STOPPED, CANCELLED_ATTEMPT, LOST = (
    "succeeded", "failed", "preempted", "stopped", "cancelled", "lost",
)  # fmt: skip
MAX_BACKOFF = 600.0

# ${JOB.output}: JOB is a job id, or @i for the i-th job of the same submission (a pipeline).
REFERENCE = re.compile(r"\$\{(@?\d+)\.([a-z_]+)\}")

SCHEMA = (
    """CREATE TABLE jobs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        queue TEXT NOT NULL,
        priority INTEGER NOT NULL,
        gpus INTEGER NOT NULL,
        max_retries INTEGER NOT NULL,
        spec TEXT NOT NULL,
        argv TEXT NOT NULL,
        pipeline TEXT,
        step TEXT,
        state TEXT NOT NULL,
        submitted REAL NOT NULL,
        not_before REAL NOT NULL DEFAULT 0,
        failures INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        worker TEXT,
        lease_until REAL,
        devices TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        preempt_for INTEGER,
        started REAL,
        ended REAL,
        run_dir TEXT,
        mlflow_run_id TEXT,
        outputs TEXT,
        result TEXT,
        progress TEXT,
        error TEXT
    )""",
    "CREATE INDEX jobs_by_state ON jobs (state, queue, priority DESC, id)",
    """CREATE TABLE deps (
        job INTEGER NOT NULL,
        after INTEGER NOT NULL,
        PRIMARY KEY (job, after)
    ) WITHOUT ROWID""",
    "CREATE INDEX deps_by_after ON deps (after)",
    """CREATE TABLE attempts (
        job INTEGER NOT NULL,
        n INTEGER NOT NULL,
        worker TEXT NOT NULL,
        host TEXT NOT NULL,
        pid INTEGER,
        devices TEXT,
        started REAL NOT NULL,
        ended REAL,
        outcome TEXT,
        exit_code INTEGER,
        log TEXT,
        error TEXT,
        PRIMARY KEY (job, n)
    ) WITHOUT ROWID""",
    """CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        queues TEXT NOT NULL,
        capacity INTEGER NOT NULL,
        devices TEXT,
        lease REAL NOT NULL,
        started REAL NOT NULL,
        seen REAL NOT NULL,
        cluster TEXT,
        unit TEXT
    )""",
)
# Schema version -> the statements that bring a queue of the version before it up to it.
MIGRATIONS = {
    # A Ray dispatcher serves a cluster: its address, and whether it counts GPUs or CPUs.
    2: ("ALTER TABLE workers ADD COLUMN cluster TEXT", "ALTER TABLE workers ADD COLUMN unit TEXT"),
}


def resolve_db(db: str | Path | None = None) -> Path:
    """`--db`, else $DGAN_JOBS_DB, else runs/jobs.db."""
    return Path(db or os.environ.get(DB_ENV) or DEFAULT_DB)


def not_a_queue(path: Path, why: str) -> DganError:
    return DganError(
        f"{path} is not a dgan job queue: {why}. Point --db (or {DB_ENV}) at a queue file, or "
        "at a new path to create one.",
        exit_code=2,
    )


@dataclass
class NewJob:
    """A job to submit. `after` names existing job ids, `after_new` earlier or later jobs of the
    same submission by index; ${@i.output} in `spec` names the i-th job's output."""

    kind: str
    name: str
    spec: str  # the typed spec as JSON (jobs.spec)
    argv: list[str]
    queue: str = "default"
    priority: int = 0
    gpus: int = 1
    max_retries: int = 0
    after: list[int] = field(default_factory=list)
    after_new: list[int] = field(default_factory=list)
    pipeline: str | None = None
    step: str | None = None


@dataclass(frozen=True)
class Claim:
    """A job a worker has just claimed: everything it needs to start the attempt."""

    job: int
    attempt: int
    kind: str
    name: str
    spec: str
    gpus: int
    priority: int
    job_dir: Path
    log: Path
    outputs: dict[int, dict[str, str]]  # the outputs of the jobs it runs after


@dataclass(frozen=True)
class Reaped:
    """A running job whose lease expired: its worker died or hung."""

    job: int
    attempt: int
    worker: str
    host: str
    pid: int | None
    state: str  # what the job went back to: queued, or cancelled if a cancel was pending


@dataclass(frozen=True)
class Settlement:
    """How an attempt ended, as its worker saw it."""

    outcome: str  # succeeded, failed, preempted, stopped, cancelled
    exit_code: int | None = None
    error: str | None = None
    result: dict[str, Any] | None = None
    outputs: dict[str, str] | None = None
    run_dir: str | None = None
    mlflow_run_id: str | None = None
    progress: str | None = None  # the attempt's last progress (JSON), if newer than the queue's


class Store:
    """One connection to the queue's database. See the module docstring."""

    def __init__(self, path: str | Path, create: bool = True) -> None:
        self.path = Path(path)
        self._check_file(create)
        self.conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self._depth = 0
        try:
            self._open(create)
        except sqlite3.DatabaseError as err:
            self.conn.close()
            raise not_a_queue(self.path, f"SQLite cannot read it ({err})") from None
        except BaseException:
            self.conn.close()
            raise

    @property
    def jobs_dir(self) -> Path:
        """Each job's directory (logs, its own run root) lives beside the database."""
        return self.path.resolve().parent / "jobs"

    def job_dir(self, job: int) -> Path:
        """runs/jobs/<id>/: the job's logs, attempt files, progress and (training) runs."""
        return self.jobs_dir / f"{job:05d}"

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- opening ----------------------------------------------------------------------------

    def _check_file(self, create: bool) -> None:
        path = self.path
        if path.is_dir():
            raise not_a_queue(path, "it is a directory")
        if not path.exists():
            if not create:
                raise DganError(
                    f"there is no job queue at {path} yet: submit a job (dgan jobs submit) or "
                    f"point --db (or {DB_ENV}) at one",
                    exit_code=2,
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            return
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
        if head and head != SQLITE_MAGIC:
            raise not_a_queue(path, "it is not a SQLite database")

    def _open(self, create: bool) -> None:
        conn = self.conn
        # FULL: a committed claim or result survives a power cut, not only a killed process.
        conn.execute("PRAGMA synchronous=FULL")
        if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            self._create(create)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise DganError(
                f"{self.path} was written by a newer dgan (queue schema {version}; this one "
                f"reads {SCHEMA_VERSION}). Upgrade dgan.",
                exit_code=2,
            )
        if version < SCHEMA_VERSION:
            self._migrate()

    def _migrate(self) -> None:
        """Bring a queue written by an older dgan up to this schema, in one transaction."""
        with self.transaction() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]  # another may have
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _create(self, create: bool) -> None:
        """Make an empty file a queue; refuse a database of anything else."""
        conn = self.conn
        conn.execute("BEGIN")  # one snapshot: another process may be creating the queue now
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = [
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
        finally:
            conn.execute("COMMIT")
        if app_id == APPLICATION_ID:
            return
        if tables or app_id:
            what = f"tables {', '.join(tables)}" if tables else f"application id {app_id:#x}"
            raise not_a_queue(self.path, f"it is a SQLite database of something else ({what})")
        if not create:
            raise DganError(f"there is no job queue at {self.path} yet", exit_code=2)
        # WAL cannot be switched on inside a transaction; it is a property of the file.
        conn.execute("PRAGMA journal_mode=WAL")
        with self.transaction():
            # Another process may have created it while this one waited for the lock.
            if conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID:
                return
            for statement in SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: the write lock is taken at once, so a
        read-then-write such as a claim cannot interleave with another worker's)."""
        if self._depth:
            self._depth += 1
            try:
                yield self.conn
            finally:
                self._depth -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            self._depth = 0

    def data_version(self) -> int:
        """Changes whenever another connection commits: a cheap 'anything new?'."""
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    # -- submitting -------------------------------------------------------------------------

    def submit(self, new: list[NewJob]) -> list[int]:
        """Queue `new` in one transaction: all of them, or (on a DganError) none."""
        now = time.time()
        with self.transaction() as conn:
            # Checked before anything is written, so a message never counts unsaved rows.
            needs = [self._dependencies(job, i, new) for i, job in enumerate(new)]
            ids = []
            for job in new:
                cur = conn.execute(
                    "INSERT INTO jobs (name, kind, queue, priority, gpus, max_retries, spec, argv,"
                    " pipeline, step, state, submitted) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (job.name, job.kind, job.queue, job.priority, job.gpus, job.max_retries,
                     job.spec, json.dumps(job.argv), job.pipeline, job.step, QUEUED, now),
                )  # fmt: skip
                ids.append(cur.lastrowid)
            for i, (job, (existing, earlier)) in enumerate(zip(new, needs, strict=True)):
                spec = re.sub(r"\$\{@(\d+)\.", lambda m: f"${{{ids[int(m.group(1))]}.", job.spec)
                conn.execute("UPDATE jobs SET spec=? WHERE id=?", (spec, ids[i]))
                after = sorted(existing | {ids[k] for k in earlier})
                conn.executemany(
                    "INSERT OR IGNORE INTO deps (job, after) VALUES (?, ?)",
                    [(ids[i], a) for a in after],
                )
            for job_id in ids:
                blocked = self._blocking_dependency(job_id)
                if blocked is not None:
                    self._block(job_id, blocked, now)
        return ids

    def _dependencies(self, job: NewJob, i: int, new: list[NewJob]) -> tuple[set[int], set[int]]:
        """What `job` runs after: existing job ids, and indices into `new` (--after, the
        pipeline's `after`, and every job whose output its spec names). Raises DganError for a
        job that does not exist or an output it does not make."""
        existing, earlier = set(), set(job.after_new)
        for dep in job.after:
            self._require_job(dep, f"--after {dep}")
            existing.add(dep)
        for ref, output in REFERENCE.findall(job.spec):
            if ref.startswith("@"):
                k = int(ref[1:])
                if k >= i:  # the pipeline reader refuses this first, naming the steps
                    raise DganError(f"job {i} names an output of a later job", exit_code=2)
                kind, shown = new[k].kind, f"step {new[k].step or k}"
                earlier.add(k)
            else:
                dep = int(ref)
                kind = self._require_job(dep, f"${{{ref}.{output}}}")["kind"]
                shown = f"job {dep}"
                existing.add(dep)
            makes = KINDS[kind].outputs
            if output not in makes:
                raise DganError(
                    f"${{{ref}.{output}}}: {shown} ({kind}) makes "
                    f"{', '.join(makes) or 'no outputs'}, not {output!r}",
                    exit_code=2,
                )
        return existing, earlier

    def _require_job(self, job: int, what: str) -> sqlite3.Row:
        row = self.conn.execute("SELECT id, kind FROM jobs WHERE id=?", (job,)).fetchone()
        if row is None:
            last = self.conn.execute("SELECT max(id) FROM jobs").fetchone()[0]
            raise DganError(
                f"{what}: there is no job {job} in {self.path} (ids go up to {last})"
                if last
                else f"{what}: {self.path} holds no jobs yet",
                exit_code=2,
            )
        return row

    # -- reading ----------------------------------------------------------------------------

    def get(self, job: int) -> sqlite3.Row:
        """The job's row; DganError when there is no such job."""
        row = self.conn.execute("SELECT * FROM jobs WHERE id=?", (job,)).fetchone()
        if row is None:
            self._require_job(job, f"job {job}")
        return row

    def dependencies(self, job: int) -> list[sqlite3.Row]:
        """The jobs `job` runs after (id, name, state)."""
        return self.conn.execute(
            "SELECT j.id, j.name, j.state FROM deps d JOIN jobs j ON j.id = d.after "
            "WHERE d.job=? ORDER BY j.id",
            (job,),
        ).fetchall()

    def dependents(self, job: int) -> list[sqlite3.Row]:
        """The jobs that run after `job` (id, name, state)."""
        return self.conn.execute(
            "SELECT j.id, j.name, j.state FROM deps d JOIN jobs j ON j.id = d.job "
            "WHERE d.after=? ORDER BY j.id",
            (job,),
        ).fetchall()

    def attempts(self, job: int) -> list[sqlite3.Row]:
        """Every attempt of `job`, first first."""
        return self.conn.execute("SELECT * FROM attempts WHERE job=? ORDER BY n", (job,)).fetchall()

    def list_jobs(
        self, states: list[str] | None = None, queues: list[str] | None = None, limit: int = 0
    ) -> tuple[list[sqlite3.Row], int, dict[str, int]]:
        """The last `limit` matching jobs (0: all) in id order, how many match, and the count of
        each state among the jobs of `queues`."""
        where, args = [], []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += states
        if queues:
            where.append(f"queue IN ({','.join('?' * len(queues))})")
            args += queues
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        columns = (
            "id, name, kind, queue, priority, gpus, state, attempts, progress, submitted, "
            "started, ended, worker, devices, pipeline, step, not_before, error"
        )
        tail = f"LIMIT {int(limit)}" if limit > 0 else ""
        rows = self.conn.execute(
            f"SELECT {columns} FROM jobs {clause} ORDER BY id DESC {tail}", args
        ).fetchall()
        total = self.conn.execute(f"SELECT count(*) FROM jobs {clause}", args).fetchone()[0]
        queue_clause = f"WHERE queue IN ({','.join('?' * len(queues))})" if queues else ""
        counts = dict(
            self.conn.execute(
                f"SELECT state, count(*) FROM jobs {queue_clause} GROUP BY state", queues or []
            ).fetchall()
        )
        return rows[::-1], total, counts

    def live_workers(self, now: float | None = None) -> list[sqlite3.Row]:
        """Workers that renewed their record within three of their leases."""
        now = time.time() if now is None else now
        return self.conn.execute(
            "SELECT * FROM workers WHERE seen >= ? - 3 * lease ORDER BY capacity DESC, id", (now,)
        ).fetchall()

    # -- cancel and retry (any process) -----------------------------------------------------

    def cancel(self, job: int) -> str:
        """Cancel a job: at once when it has not started, else by asking its worker (SIGTERM;
        the job checkpoints and stops). Returns what happened, for a person."""
        now = time.time()
        with self.transaction() as conn:
            row = self.get(job)
            state = row["state"]
            if state == RUNNING:
                conn.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job,))
                return (
                    f"job {job}: cancel requested; worker {row['worker']} sends it SIGTERM, and "
                    "it checkpoints and stops (dgan jobs show to follow it)"
                )
            if state in (QUEUED, UPSTREAM_FAILED):
                conn.execute(
                    "UPDATE jobs SET state=?, ended=?, error=? WHERE id=?",
                    (CANCELLED, now, "cancelled before it started", job),
                )
                blocked = self._block_dependents(job, CANCELLED, now)
                after = f"; {len(blocked)} job(s) after it will not run" if blocked else ""
                return f"job {job} cancelled (it had not started){after}"
            raise DganError(f"job {job} already {state}; there is nothing to cancel", exit_code=1)

    def retry(self, job: int) -> list[int]:
        """Queue a failed or cancelled job again (its retries start afresh; a training job
        resumes from its checkpoint), with every job after it that its failure held back.
        Returns the ids queued."""
        with self.transaction():
            row = self.get(job)
            state = row["state"]
            if state == UPSTREAM_FAILED:
                held = [d for d in self.dependencies(job) if d["state"] in BLOCKING]
                if held:
                    first = held[0]
                    raise DganError(
                        f"job {job} waits on job {first['id']} ({first['state']}); retry "
                        f"{first['id']} instead, and the jobs after it are queued with it",
                        exit_code=1,
                    )
            elif state not in (FAILED, CANCELLED):
                hint = {
                    SUCCEEDED: "submit it again to run it again",
                    QUEUED: "it is already queued",
                    RUNNING: "it is running",
                }[state]
                raise DganError(f"job {job} is {state}: {hint}", exit_code=1)
            self._requeue(job)
            return [job, *self._unblock_dependents(job)]

    def _requeue(self, job: int) -> None:
        self.conn.execute(
            "UPDATE jobs SET state=?, failures=0, not_before=0, cancel_requested=0, "
            "preempt_for=NULL, error=NULL, ended=NULL WHERE id=?",
            (QUEUED, job),
        )

    def _blocking_dependency(self, job: int) -> sqlite3.Row | None:
        for dep in self.dependencies(job):
            if dep["state"] in BLOCKING:
                return dep
        return None

    def _block(self, job: int, dep: sqlite3.Row, now: float) -> list[int]:
        self.conn.execute(
            "UPDATE jobs SET state=?, ended=?, error=? WHERE id=? AND state=?",
            (UPSTREAM_FAILED, now, f"job {dep['id']} ({dep['name']}) {dep['state']}", job, QUEUED),
        )
        return [job, *self._block_dependents(job, UPSTREAM_FAILED, now)]

    def _block_dependents(self, job: int, state: str, now: float) -> list[int]:
        """Mark every queued job after `job` (transitively) upstream_failed."""
        blocked = []
        row = self.conn.execute("SELECT id, name, state FROM jobs WHERE id=?", (job,)).fetchone()
        for dependent in self.dependents(job):
            if dependent["state"] == QUEUED:
                blocked += self._block(dependent["id"], row, now)
        return blocked

    def _unblock_dependents(self, job: int) -> list[int]:
        """Queue again every upstream_failed job after `job` that nothing else holds back."""
        queued = []
        for dependent in self.dependents(job):
            if dependent["state"] == UPSTREAM_FAILED and not self._blocking_dependency(
                dependent["id"]
            ):
                self._requeue(dependent["id"])
                queued += [dependent["id"], *self._unblock_dependents(dependent["id"])]
        return queued

    # -- workers ----------------------------------------------------------------------------

    def register_worker(
        self,
        worker: str,
        queues: list[str],
        capacity: int,
        devices: list[str] | None,
        lease: float,
        cluster: str | None = None,
        unit: str | None = None,
    ) -> None:
        """Record a worker. A Ray dispatcher gives its cluster's address and unit (GPU or CPU);
        its capacity is then the largest node's, which it updates at each heartbeat."""
        now = time.time()
        with self.transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO workers (id, host, pid, queues, capacity, devices, lease,"
                " started, seen, cluster, unit) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (worker, socket.gethostname(), os.getpid(), ",".join(queues), capacity,
                 ",".join(devices) if devices else None, lease, now, now, cluster, unit),
            )  # fmt: skip

    def unregister_worker(self, worker: str) -> None:
        with self.transaction() as conn:
            conn.execute("DELETE FROM workers WHERE id=?", (worker,))

    def reap_expired(self, now: float) -> list[Reaped]:
        """Return every running job whose lease expired to the queue (or to cancelled, when a
        cancel was pending); its attempt ends as lost. Call inside a transaction."""
        rows = self.conn.execute(
            "SELECT j.id, j.attempts, j.worker, j.cancel_requested, a.host, a.pid "
            "FROM jobs j LEFT JOIN attempts a ON a.job = j.id AND a.n = j.attempts "
            "WHERE j.state=? AND j.lease_until < ?",
            (RUNNING, now),
        ).fetchall()
        reaped = []
        for row in rows:
            job, attempt = row["id"], row["attempts"]
            self.conn.execute(
                "UPDATE attempts SET ended=?, outcome=?, error=? WHERE job=? AND n=?",
                (now, LOST, f"worker {row['worker']} stopped renewing its lease (it died or "
                 "hung); the job went back to the queue", job, attempt),
            )  # fmt: skip
            state = CANCELLED if row["cancel_requested"] else QUEUED
            self.conn.execute(
                "UPDATE jobs SET state=?, worker=NULL, lease_until=NULL, devices=NULL, "
                "preempt_for=NULL, ended=? WHERE id=?",
                (state, now if state == CANCELLED else None, job),
            )
            if state == CANCELLED:
                self._block_dependents(job, CANCELLED, now)
            reaped.append(Reaped(job, attempt, row["worker"], row["host"], row["pid"], state))
        return reaped

    def runnable(
        self,
        queues: list[str],
        capacity: int,
        now: float,
        limit: int = 64,
        fits: Callable[[sqlite3.Row], bool] | None = None,
    ) -> list[sqlite3.Row]:
        """Queued jobs of `queues` that fit `capacity` (and `fits`, which sees each row with its
        spec), are past any retry backoff and whose dependencies all succeeded: highest priority
        first, then first in, first out."""
        marks = ",".join("?" * len(queues))
        columns = "id, priority, gpus" + (", spec" if fits else "")
        query = (
            f"SELECT {columns} FROM jobs j WHERE state=? AND queue IN ({marks}) "
            "AND gpus <= ? AND not_before <= ? AND NOT EXISTS (SELECT 1 FROM deps d JOIN jobs p "
            "ON p.id = d.after WHERE d.job = j.id AND p.state != ?) "
            "ORDER BY priority DESC, id LIMIT ? OFFSET ?"
        )
        args = (QUEUED, *queues, capacity, now, SUCCEEDED)
        if fits is None:
            return self.conn.execute(query, (*args, limit, 0)).fetchall()
        found: list[sqlite3.Row] = []
        offset = 0
        while len(found) < limit:  # page past the jobs that can never fit
            rows = self.conn.execute(query, (*args, limit, offset)).fetchall()
            found += [r for r in rows if fits(r)]
            if len(rows) < limit:
                break
            offset += limit
        return found[:limit]

    def has_work(
        self,
        queues: list[str],
        capacity: int,
        now: float,
        fits: Callable[[sqlite3.Row], bool] | None = None,
    ) -> bool:
        """Whether a scheduling pass could change anything: a job is runnable, or a lease has
        expired. A read, so that idle workers do not take the write lock twice a second."""
        if self.conn.execute(
            "SELECT 1 FROM jobs WHERE state=? AND lease_until < ? LIMIT 1", (RUNNING, now)
        ).fetchone():
            return True
        return bool(
            self.runnable(queues, capacity, now, limit=1 if fits is None else 64, fits=fits)
        )

    def pending(
        self, queues: list[str], capacity: int, fits: Callable[[sqlite3.Row], bool] | None = None
    ) -> int:
        """Jobs of `queues` that a worker of `capacity` (and `fits`) may still run: queued ones,
        and running ones (their worker may die, and jobs after them may become runnable)."""
        marks = ",".join("?" * len(queues))
        where = f"FROM jobs WHERE state IN (?, ?) AND queue IN ({marks}) AND gpus <= ?"
        args = (QUEUED, RUNNING, *queues, capacity)
        if fits is None:
            return self.conn.execute(f"SELECT count(*) {where}", args).fetchone()[0]
        rows = self.conn.execute(f"SELECT id, priority, gpus, spec {where}", args).fetchall()
        return sum(1 for r in rows if fits(r))

    def claim(
        self, job: int, worker: str, devices: list[str], lease: float, now: float
    ) -> Claim | None:
        """Take a queued job: it becomes running under `worker`'s lease, with a new attempt.
        None when it is no longer queued. Call inside a transaction."""
        cur = self.conn.execute(
            "UPDATE jobs SET state=?, worker=?, lease_until=?, devices=?, attempts=attempts+1, "
            "started=COALESCE(started, ?), preempt_for=NULL WHERE id=? AND state=?",
            (RUNNING, worker, now + lease, ",".join(devices), now, job, QUEUED),
        )
        if cur.rowcount != 1:
            return None
        row = self.get(job)
        attempt = row["attempts"]
        job_dir = self.job_dir(job)
        log = job_dir / f"attempt-{attempt}.log"
        self.conn.execute(
            "INSERT OR REPLACE INTO attempts (job, n, worker, host, devices, started, log) "
            "VALUES (?,?,?,?,?,?,?)",
            (job, attempt, worker, socket.gethostname(), ",".join(devices), now, str(log)),
        )
        outputs = {
            dep["id"]: json.loads(dep["outputs"] or "{}")
            for dep in self.conn.execute(
                "SELECT p.id, p.outputs FROM deps d JOIN jobs p ON p.id = d.after WHERE d.job=?",
                (job,),
            )
        }
        return Claim(
            job, attempt, row["kind"], row["name"], row["spec"], row["gpus"], row["priority"],
            job_dir, log, outputs,
        )  # fmt: skip

    def set_pid(self, job: int, attempt: int, pid: int | None) -> None:
        """Record the process that runs an attempt (a dead worker's orphans are found by it)."""
        with self.transaction() as conn:
            conn.execute("UPDATE attempts SET pid=? WHERE job=? AND n=?", (pid, job, attempt))

    def set_devices(self, job: int, attempt: int, devices: str) -> None:
        """Record where a cluster placed an attempt (node and GPUs), once it is known."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE attempts SET devices=? WHERE job=? AND n=?", (devices, job, attempt)
            )
            conn.execute(
                "UPDATE jobs SET devices=? WHERE id=? AND attempts=? AND state=?",
                (devices, job, attempt, RUNNING),
            )

    def heartbeat(
        self,
        worker: str,
        held: dict[int, tuple[int, str | None]],
        lease: float,
        capacity: int | None = None,
    ) -> set[int]:
        """Renew the lease of every job `worker` holds (job -> (attempt, progress JSON or
        None)), and its capacity when given (a cluster's nodes come and go); returns the jobs
        whose lease it lost, to another worker that took them over."""
        now = time.time()
        lost = set()
        with self.transaction() as conn:
            for job, (attempt, progress) in held.items():
                cur = conn.execute(
                    "UPDATE jobs SET lease_until=?, progress=COALESCE(?, progress) "
                    "WHERE id=? AND state=? AND worker=? AND attempts=?",
                    (now + lease, progress, job, RUNNING, worker, attempt),
                )
                if cur.rowcount != 1:
                    lost.add(job)
            conn.execute(
                "UPDATE workers SET seen=?, capacity=COALESCE(?, capacity) WHERE id=?",
                (now, capacity, worker),
            )
        return lost

    def requests(self, worker: str) -> dict[int, tuple[bool, int | None]]:
        """For each job `worker` runs: (cancel requested, the job it is preempted for)."""
        return {
            row["id"]: (bool(row["cancel_requested"]), row["preempt_for"])
            for row in self.conn.execute(
                "SELECT id, cancel_requested, preempt_for FROM jobs WHERE state=? AND worker=?",
                (RUNNING, worker),
            )
        }

    def request_preemption(self, victims: list[int], for_job: int) -> None:
        """Mark `victims` as preempted for `for_job`. Call inside a transaction."""
        self.conn.executemany(
            "UPDATE jobs SET preempt_for=? WHERE id=? AND state=?",
            [(for_job, v, RUNNING) for v in victims],
        )

    def finish(
        self, job: int, attempt: int, worker: str, end: Settlement, backoff: float
    ) -> str | None:
        """Record how an attempt ended and move the job on; returns its new state, or None when
        the job is no longer this attempt's (its lease expired and another worker took it)."""
        now = time.time()
        with self.transaction() as conn:
            row = self.get(job)
            if row["state"] != RUNNING or row["worker"] != worker or row["attempts"] != attempt:
                conn.execute(
                    "UPDATE attempts SET ended=COALESCE(ended, ?), exit_code=? WHERE job=? AND n=?",
                    (now, end.exit_code, job, attempt),
                )
                return None
            outcome = end.outcome
            if row["cancel_requested"] and outcome != SUCCEEDED_ATTEMPT:
                outcome = CANCELLED_ATTEMPT  # whatever else stopped it, the user wanted it gone
            conn.execute(
                "UPDATE attempts SET ended=?, outcome=?, exit_code=?, error=? WHERE job=? AND n=?",
                (now, outcome, end.exit_code, end.error, job, attempt),
            )
            fields: dict[str, Any] = {"worker": worker, "lease_until": None, "preempt_for": None}
            if end.run_dir:
                fields["run_dir"] = end.run_dir
            if end.mlflow_run_id:
                fields["mlflow_run_id"] = end.mlflow_run_id
            if end.result is not None:
                fields["result"] = json.dumps(end.result)
            if end.progress is not None:
                fields["progress"] = end.progress
            if outcome == SUCCEEDED_ATTEMPT:
                state = SUCCEEDED
                fields |= {"ended": now, "error": None, "outputs": json.dumps(end.outputs or {})}
            elif outcome in (PREEMPTED, STOPPED):
                state = QUEUED
                fields |= {"devices": None}
            elif outcome == LOST:
                # Its machine went away (a Ray node died): not the job's failure, but it may
                # take the next machine down too, so it waits one backoff before it runs again.
                state = QUEUED
                fields |= {"devices": None, "not_before": now + backoff}
            elif outcome == CANCELLED_ATTEMPT:
                state = CANCELLED
                fields |= {"ended": now, "error": end.error or "cancelled"}
            else:
                failures = row["failures"] + 1
                fields |= {"failures": failures, "error": end.error}
                if failures <= row["max_retries"]:
                    state = QUEUED
                    # Exponential backoff: a job failing for a passing reason (a busy server, a
                    # full disk) gets time; one that keeps failing stops within its retries.
                    fields["not_before"] = now + min(MAX_BACKOFF, backoff * 2 ** (failures - 1))
                    fields["devices"] = None
                else:
                    state = FAILED
                    fields["ended"] = now
            fields["state"] = state
            sets = ", ".join(f"{k}=?" for k in fields)
            conn.execute(f"UPDATE jobs SET {sets} WHERE id=?", (*fields.values(), job))
            if state in (FAILED, CANCELLED):
                self._block_dependents(job, state, now)
        return state
