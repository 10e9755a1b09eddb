"""`dgan jobs worker`: claims queued jobs, runs them on its GPUs or slots, and holds their leases.

One loop, one thread:
- collect attempts that ended and record how (succeeded, failed and maybe retried with
  backoff, preempted, cancelled);
- renew the lease of every job it runs (a heartbeat every third of the lease), copying their
  progress into the queue; a job whose lease it lost (it stalled, another worker took over) is
  stopped at once;
- act on requests: a cancelled job gets SIGTERM (it checkpoints and stops);
- schedule (jobs.scheduler), in one transaction: return jobs of dead workers (expired leases)
  to the queue, claim what fits its free GPUs, and preempt lower-priority jobs for a job that
  does not fit.

A worker serves one machine's GPUs (`--gpus 0,1,2,3`, each job gets CUDA_VISIBLE_DEVICES) or N
CPU slots (`--slots N`), or dispatches to a Ray cluster (`--backend ray`): then it claims what
fits the free GPUs of the cluster's nodes, and Ray places each attempt (jobs.ray_backend).
SIGTERM or Ctrl-C stops it: its jobs checkpoint and go back to the queue.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from dgan.errors import DganError
from jobs import scheduler
from jobs.backend import Backend, Exit, Launch, LocalBackend, Nodes, kill_orphan
from jobs.store import (
    CANCELLED_ATTEMPT,
    FAILED_ATTEMPT,
    LOST,
    PREEMPTED,
    STOPPED,
    SUCCEEDED_ATTEMPT,
    Claim,
    Settlement,
    Store,
)

RELEASE_GRACE = 5.0  # seconds a cluster may take to show an ended attempt's GPUs as free


def detect_gpus() -> list[str]:
    """GPU ids from nvidia-smi, without importing torch; [] when there is none."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


@dataclass
class Running:
    """An attempt this worker runs."""

    claim: Claim
    handle: Any
    slots: list[int]  # a local worker's devices; [] on a cluster
    started: float
    units: int = 0  # on a cluster: the GPUs (or CPUs) it holds on one node; 0: spread out
    stop_reason: str | None = None  # preempt, cancel or stop (this worker shuts down)
    stop_sent: float | None = None
    killed: bool = False
    progress: str | None = None  # JSON not yet copied into the queue


class StopFlag:
    """SIGTERM or Ctrl-C: stop claiming, let the jobs checkpoint; a second one: kill them."""

    def __init__(self) -> None:
        self.count = 0
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame) -> None:
        self.count += 1

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Worker:
    """See the module docstring. `say` receives one line per event (the CLI prints them)."""

    def __init__(
        self,
        store: Store,
        backend: Backend | None = None,
        gpus: list[str] | None = None,
        slots: int = 1,
        queues: list[str] | None = None,
        lease: float = 30.0,
        preempt: bool = True,
        retry_backoff: float = 10.0,
        stop_timeout: float = 300.0,
        exit_when_empty: bool = False,
        poll: float = 0.05,
        say: Callable[[str], None] = print,
    ) -> None:
        if lease <= 0:
            raise DganError(f"--lease must be positive, got {lease}", exit_code=2)
        if not gpus and slots < 1 and not callable(getattr(backend, "nodes", None)):
            raise DganError(f"--slots must be at least 1, got {slots}", exit_code=2)
        self.store = store
        self.backend = backend or LocalBackend()
        # A backend that knows its nodes (Ray) places the jobs; the worker counts their GPUs.
        self.cluster = callable(getattr(self.backend, "nodes", None))
        self.view: Nodes | None = None
        if self.cluster:
            gpus, slots = None, 0
        self.gpu_ids = bool(gpus)
        self.devices = list(gpus) if gpus else [str(i) for i in range(slots)]
        self.free = list(range(len(self.devices)))
        self.queues = list(queues or ["default"])
        self.lease, self.preempt = lease, preempt
        self.retry_backoff, self.stop_timeout = retry_backoff, stop_timeout
        self.exit_when_empty, self.poll, self.say = exit_when_empty, poll, say
        self.host = socket.gethostname()
        self.id = f"{self.host}:{os.getpid()}"
        self.running: dict[int, Running] = {}
        self._last_beat = 0.0
        self._freed = False  # an attempt ended: its GPUs can be given out at once
        # On a cluster: (node, units, until) of attempts that ended, whose GPUs Ray may not show
        # as free yet. They count as on their way, so they are not preempted for a second time.
        self._releasing: list[tuple[str, int, float]] = []

    @property
    def capacity(self) -> int:
        """The most GPUs (or slots) one job may ask for here: a cluster's largest node."""
        if self.cluster:
            return self.nodes().largest
        return len(self.devices)

    def nodes(self) -> Nodes:
        """The cluster's nodes now, less what this worker's unplaced attempts will take."""
        self.view = self.backend.nodes([r.handle for r in self.running.values()])
        return self.view

    def _limits(self) -> tuple[int, Callable[[Any], bool] | None]:
        """What the queue's queries filter on: a local worker's GPUs; on a cluster, its GPUs in
        all, and `fits`, which keeps the jobs that fit its nodes once they are free."""
        if not self.cluster:
            return self.capacity, None
        view = self.view or self.nodes()
        return view.units, lambda row: scheduler.place(self._waiting(row), view.total) is not None

    def _waiting(self, row) -> scheduler.Waiting:
        if not self.cluster:
            return scheduler.Waiting(row["id"], row["priority"], row["gpus"])
        processes, units = self.backend.demand(row["gpus"], json.loads(row["spec"]))
        return scheduler.Waiting(row["id"], row["priority"], units, processes)

    def describe(self) -> str:
        if self.cluster:
            what = self.backend.describe()
        elif self.gpu_ids:
            what = f"GPUs {','.join(self.devices)}"
        else:
            what = f"{self.capacity} slot{'s' if self.capacity > 1 else ''}"
        return (
            f"worker {self.id}: {what}, queue {','.join(self.queues)}, lease {self.lease:g} s, "
            f"preemption {'on' if self.preempt else 'off'}, backend {self.backend.name}; "
            f"queue database {self.store.path}"
        )

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        """Serve the queue until stopped (or, with exit_when_empty, until nothing is left that
        it could run). Returns the exit status."""
        self.store.register_worker(
            self.id, self.queues, self.capacity, self.devices if self.gpu_ids else None,
            self.lease, getattr(self.backend, "address", None), self.view and self.view.unit,
        )  # fmt: skip
        self.say(self.describe())
        stop = StopFlag()
        next_beat = next_pass = 0.0
        seen_version = None
        try:
            while True:
                self.collect()
                if stop.count:
                    self.shut_down(stop)
                    self.say("worker stopped")
                    return 0
                now = time.time()
                if now >= next_beat:
                    self.heartbeat()
                    next_beat = now + self.lease / 3
                version = self.store.data_version()
                if version != seen_version or now >= next_pass or self._freed:
                    self._freed = False
                    seen_version = version
                    self.act_on_requests()
                    self.schedule()
                    next_pass = time.time() + 0.5
                if self.exit_when_empty and not self.running and self.idle():
                    self.say("nothing left to run: worker exits")
                    return 0
                time.sleep(self.poll)
        finally:
            stop.restore()
            for running in self.running.values():  # only on an unexpected error
                self.backend.kill(running.handle)
            self.store.unregister_worker(self.id)

    def idle(self) -> bool:
        """No job this worker could run is queued or running anywhere."""
        capacity, fits = self._limits()
        return self.store.pending(self.queues, capacity, fits) == 0

    def shut_down(self, stop: StopFlag) -> None:
        """Let every job checkpoint and go back to the queue, then return."""
        if self.running:
            self.say(f"stopping: {len(self.running)} job(s) checkpoint and go back to the queue")
        for running in self.running.values():
            self.stop(running, "stop")
        while self.running:
            if stop.count > 1:
                for running in self.running.values():
                    self.backend.kill(running.handle)
            time.sleep(self.poll)
            self.collect()
            if time.time() - self._last_beat > self.lease / 3:
                self.heartbeat()

    # -- starting ---------------------------------------------------------------------------

    def schedule(self) -> None:
        """Reap expired leases, claim what fits, preempt for what does not (jobs.scheduler)."""
        now = time.time()
        if self.cluster:
            self.nodes()
        capacity, fits = self._limits()
        if not self.store.has_work(self.queues, capacity, now, fits):
            return
        with self.store.transaction():
            reaped = self.store.reap_expired(now)
            waiting = [
                self._waiting(r) for r in self.store.runnable(self.queues, capacity, now, fits=fits)
            ]
            active = [self._active(job, r) for job, r in self.running.items()]
            self._releasing = [r for r in self._releasing if r[2] > now]
            active += [
                scheduler.Active(0, 0, units, 0.0, True, node) for node, units, _ in self._releasing
            ]
            free = self.view.free if self.cluster else len(self.free)
            decided = scheduler.plan(waiting, free, active, self.preempt)
            claims = []
            for job in decided.start:
                wants = next(w for w in waiting if w.job == job)
                if self.cluster:
                    node = decided.nodes[job][0] if wants.processes == 1 else None
                    claim = self.store.claim(job, self.id, ["ray"], self.lease, now)
                    if claim is not None:
                        units = wants.gpus if wants.processes == 1 else 0
                        claims.append((claim, [], node, units))
                    continue
                slots, self.free = self.free[: wants.gpus], self.free[wants.gpus :]
                devices = [self.devices[s] for s in slots]
                claim = self.store.claim(job, self.id, devices, self.lease, now)
                if claim is None:
                    self.free = sorted(self.free + slots)
                else:
                    claims.append((claim, slots, None, 0))
            if decided.preempt:
                self.store.request_preemption(decided.preempt, decided.preempt_for)
        for lost in reaped:
            if lost.host == self.host and kill_orphan(lost.pid):
                self.say(f"job {lost.job}: killed the process its dead worker left behind")
            self.say(
                f"job {lost.job} attempt {lost.attempt}: the lease of worker {lost.worker} "
                f"expired; the job is {lost.state} again"
            )
        for victim in decided.preempt:
            self.say(f"job {victim}: preempted for job {decided.preempt_for} (higher priority)")
            self.stop(self.running[victim], "preempt")
        for claim, slots, node, units in claims:
            self.launch(claim, slots, node, units)

    def _active(self, job: int, running: Running) -> scheduler.Active:
        stopping = running.stop_reason is not None
        if not self.cluster:
            return scheduler.Active(
                job, running.claim.priority, running.claim.gpus, running.started, stopping
            )
        node = self.backend.node_of(running.handle) if running.units else None
        return scheduler.Active(
            job, running.claim.priority, running.units, running.started, stopping, node
        )

    def launch(
        self, claim: Claim, slots: list[int], node: str | None = None, units: int = 0
    ) -> None:
        """Start a claimed attempt on `slots` (on a cluster: preferably on `node`, holding
        `units` there), its references to earlier outputs filled in."""
        from jobs.spec import resolve_references

        devices = tuple(self.devices[s] for s in slots)
        try:
            spec = resolve_references(claim.spec, claim.outputs).model_dump(mode="json")
            handle = self.backend.start(
                Launch(claim.job, claim.attempt, spec, claim.job_dir, claim.log, devices,
                       self.gpu_ids, node)
            )  # fmt: skip
        except (DganError, OSError, ValueError) as err:
            self.free = sorted(self.free + slots)
            end = Settlement(FAILED_ATTEMPT, None, f"could not start: {err}")
            state = self.store.finish(claim.job, claim.attempt, self.id, end, self.retry_backoff)
            self.say(f"job {claim.job} attempt {claim.attempt}: could not start ({err}): {state}")
            return
        self.running[claim.job] = Running(claim, handle, slots, time.time(), units)
        self.store.set_pid(claim.job, claim.attempt, self.backend.pid(handle))
        if self.cluster:
            where = self.view.name if self.view else "the cluster"
        elif self.gpu_ids:
            where = f"GPU {','.join(devices)}"
        else:
            where = f"slot {','.join(devices)}"
        self.say(
            f"job {claim.job} attempt {claim.attempt}: {claim.kind} {claim.name!r} started on "
            f"{where}; log {claim.log}"
        )

    # -- while they run ---------------------------------------------------------------------

    def heartbeat(self) -> None:
        """Renew every lease, copy progress into the queue, drop the jobs whose lease is lost."""
        self._last_beat = time.time()
        held = {}
        for job, running in self.running.items():
            progress = self.backend.progress(running.handle)
            if progress is not None:
                running.progress = json.dumps(progress)
            held[job] = (running.claim.attempt, running.progress)
            running.progress = None
        capacity = self.nodes().largest if self.cluster else None
        lost = self.store.heartbeat(self.id, held, self.lease, capacity)
        for job in lost:
            running = self.running.pop(job)
            self.backend.kill(running.handle)
            self.free = sorted(self.free + running.slots)
            self.say(
                f"job {job} attempt {running.claim.attempt}: this worker lost its lease (another "
                "worker took the job over); stopped its process"
            )

    def act_on_requests(self) -> None:
        """SIGTERM the jobs someone cancelled (or that another pass preempted)."""
        for job, (cancel, preempt_for) in self.store.requests(self.id).items():
            running = self.running.get(job)
            if running is None or running.stop_reason is not None:
                continue
            if cancel:
                self.say(f"job {job}: cancel requested; SIGTERM, it checkpoints and stops")
                self.stop(running, "cancel")
            elif preempt_for is not None:
                self.stop(running, "preempt")

    def stop(self, running: Running, reason: str) -> None:
        """Ask an attempt to checkpoint and stop, once, remembering why."""
        if running.stop_reason is None:
            running.stop_reason, running.stop_sent = reason, time.time()
            self.backend.terminate(running.handle)

    def collect(self) -> None:
        """Record every attempt that ended; kill those that ignore a stop for too long."""
        for job, running in list(self.running.items()):
            ended = self.backend.poll(running.handle)
            placed = self.backend.where(running.handle)
            if placed is not None:
                self.store.set_devices(job, running.claim.attempt, placed)
                if ended is None:
                    self.say(f"job {job} attempt {running.claim.attempt}: runs on {placed}")
            if ended is None:
                late = running.stop_sent and time.time() - running.stop_sent > self.stop_timeout
                if late and not running.killed:
                    self.say(
                        f"job {job}: no checkpoint {self.stop_timeout:g} s after SIGTERM: kill"
                    )
                    self.backend.kill(running.handle)
                    running.killed = True
                continue
            del self.running[job]
            self.free = sorted(self.free + running.slots)
            self._freed = True
            if self.cluster and running.units:
                node = self.backend.node_of(running.handle)
                if node is not None:
                    self._releasing.append((node, running.units, time.time() + RELEASE_GRACE))
            end = settle(ended, running.stop_reason, running.claim.log)
            last = self.backend.progress(running.handle)
            if last is not None or running.progress is not None:
                end = replace(end, progress=json.dumps(last) if last else running.progress)
            state = self.store.finish(job, running.claim.attempt, self.id, end, self.retry_backoff)
            seconds = time.time() - running.started
            if state is None:
                self.say(f"job {job} attempt {running.claim.attempt}: ended; another worker has it")
                continue
            failed = end.error and end.outcome != SUCCEEDED_ATTEMPT
            why = f": {end.error.splitlines()[0]}" if failed else ""
            self.say(
                f"job {job} attempt {running.claim.attempt}: {end.outcome} after {seconds:.1f} s "
                f"(exit {ended.code}); job {state}{why}"
            )


def settle(ended: Exit, stop_reason: str | None, log) -> Settlement:
    """How an attempt ended, from its exit and why this worker stopped it (if it did)."""
    outcome = ended.outcome or {}
    code, state = ended.code, outcome.get("state")
    fields = {
        "exit_code": code,
        "result": outcome.get("result"),
        "run_dir": outcome.get("run_dir"),
        "mlflow_run_id": outcome.get("mlflow_run_id"),
    }
    if state == "finished":
        result = dict(outcome.get("result") or {})
        for key in ("tracking_uri", "mlflow_link"):
            if outcome.get(key):
                result[key] = outcome[key]
        fields["result"] = result
        return Settlement(SUCCEEDED_ATTEMPT, outputs=outcome.get("outputs") or {}, **fields)
    if stop_reason == "preempt":
        return Settlement(PREEMPTED, error="preempted by a job of higher priority", **fields)
    if stop_reason == "stop":
        return Settlement(STOPPED, error="its worker stopped", **fields)
    if stop_reason == "cancel":
        return Settlement(CANCELLED_ATTEMPT, error="cancelled (dgan jobs cancel)", **fields)
    if ended.lost:
        return Settlement(LOST, error=f"{ended.lost}; the job went back to the queue", **fields)
    error = outcome.get("error")
    if error is None:
        signame = ""
        if code is not None and code < 0:
            signame = f" (killed by {signal.Signals(-code).name})"
        error = f"the job's process exited with code {code}{signame} before it reported; see {log}"
    return Settlement(FAILED_ATTEMPT, error=error, **fields)
