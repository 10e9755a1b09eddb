"""Where a claimed job runs: the one interface between the queue and what executes an attempt.

A backend starts an attempt, says whether it has ended and how, asks it to stop (it checkpoints
first) or stops it at once, and reports its progress. Everything else stays in the queue:
priorities, dependencies, leases, retries with backoff, preemption and cancellation.

`LocalBackend` runs each attempt as a process group on this machine (`python -m jobs.runner`).
`RayBackend` (jobs/ray_backend.py) runs it on a node of a Ray cluster, and also tells the worker
what the cluster's nodes have free (`nodes`), so that the worker claims only what fits. Both
return the same `Exit`: the runner's `execute` gives the outcome wherever it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dgan.io import atomic_write_text
from jobs.runner import PROGRESS_FILE, outcome_file, spec_file

# The directory that holds the `jobs` package: a job's process imports the worker's own code.
CODE_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Launch:
    """One attempt to start."""

    job: int
    attempt: int
    spec: dict[str, Any]  # the resolved spec: earlier jobs' outputs filled in
    job_dir: Path
    log: Path
    devices: tuple[str, ...]  # the GPU ids (or CPU slot numbers) the attempt holds
    gpu_ids: bool  # True: `devices` are GPU ids, given to the job as CUDA_VISIBLE_DEVICES
    node: str | None = None  # a cluster's node the scheduler planned it on (a preference)


@dataclass(frozen=True)
class Exit:
    """How an attempt ended: its exit status and the outcome the runner reported (None when it
    died before it could: killed, or out of memory). `lost` says why, when the machine that ran
    it went away (a Ray node died): the job goes back to the queue without counting a failure."""

    code: int | None
    outcome: dict[str, Any] | None
    lost: str | None = None


@dataclass(frozen=True)
class Nodes:
    """A cluster's nodes as the scheduler sees them: the free and total units of each (GPUs, or
    CPUs on a cluster without GPUs), by node id."""

    unit: str  # "GPU" or "CPU"
    free: dict[str, int]
    total: dict[str, int]
    name: str  # for people: "the Ray cluster at 10.0.0.5:6379"

    @property
    def largest(self) -> int:
        return max(self.total.values(), default=0)

    @property
    def units(self) -> int:
        return sum(self.total.values())


class Backend(Protocol):
    name: str

    def start(self, launch: Launch) -> Any:
        """Start the attempt; returns a handle for the other methods."""

    def poll(self, handle: Any) -> Exit | None:
        """None while it runs."""

    def terminate(self, handle: Any) -> None:
        """Ask it to stop: it checkpoints, then ends as interrupted (SIGTERM)."""

    def kill(self, handle: Any) -> None:
        """Stop it now, without a checkpoint (its lease was lost, or it ignored terminate)."""

    def progress(self, handle: Any) -> dict[str, Any] | None:
        """Its latest progress (step, checkpoint, run directory, figures), None if nothing new."""

    def pid(self, handle: Any) -> int | None:
        """The process id to record, where the attempt is a local process."""

    def where(self, handle: Any) -> str | None:
        """Where it runs, once the backend has placed it (a Ray node and its GPUs); None when
        there is nothing new to record."""


@dataclass
class LocalProcess:
    launch: Launch
    popen: subprocess.Popen
    progress_mtime: float = 0.0


def write_attempt(launch: Launch) -> Path:
    """The attempt's spec file, which `python -m jobs.runner --spec` reads, and no stale outcome
    of an earlier try of the same attempt number."""
    launch.job_dir.mkdir(parents=True, exist_ok=True)
    path = spec_file(launch.job_dir, launch.attempt)
    attempt_spec = {
        "job": launch.job,
        "attempt": launch.attempt,
        "job_dir": str(launch.job_dir),
        "spec": launch.spec,
    }
    atomic_write_text(path, json.dumps(attempt_spec, indent=2))
    outcome_file(launch.job_dir, launch.attempt).unlink(missing_ok=True)
    return path


class LocalBackend:
    """Each attempt is `python -m jobs.runner` in a new session (its own process group), with
    its log file as stdout and stderr. The runner kills its group if this process dies."""

    name = "local"

    def start(self, launch: Launch) -> LocalProcess:
        path = write_attempt(launch)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(CODE_ROOT), *filter(None, [env.get("PYTHONPATH")])]
        )
        if launch.gpu_ids:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(launch.devices)
        cmd = [sys.executable, "-m", "jobs.runner", "--spec", str(path), "--watch-parent"]
        with open(launch.log, "ab") as log:
            popen = subprocess.Popen(
                cmd, cwd=launch.job_dir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        return LocalProcess(launch, popen)

    def poll(self, handle: LocalProcess) -> Exit | None:
        code = handle.popen.poll()
        if code is None:
            return None
        path = outcome_file(handle.launch.job_dir, handle.launch.attempt)
        outcome = None
        with contextlib.suppress(OSError, ValueError):
            outcome = json.loads(path.read_text())
        return Exit(code, outcome)

    def _signal(self, handle: LocalProcess, sig: int) -> None:
        if handle.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(handle.popen.pid, sig)

    def terminate(self, handle: LocalProcess) -> None:
        self._signal(handle, signal.SIGTERM)

    def kill(self, handle: LocalProcess) -> None:
        self._signal(handle, signal.SIGKILL)

    def progress(self, handle: LocalProcess) -> dict[str, Any] | None:
        path = handle.launch.job_dir / PROGRESS_FILE
        try:
            mtime = path.stat().st_mtime
            if mtime == handle.progress_mtime:
                return None
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        handle.progress_mtime = mtime
        return data if data.get("attempt") == handle.launch.attempt else None

    def pid(self, handle: LocalProcess) -> int | None:
        return handle.popen.pid

    def where(self, handle: LocalProcess) -> str | None:
        return None  # the devices the worker gave it, recorded when it was claimed


def kill_orphan(pid: int | None) -> bool:
    """SIGKILL the process group of a runner left by a worker that died on this machine (the
    runner's own watch normally got there first). True when there was one."""
    if not pid:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    if b"jobs.runner" not in cmdline:  # the pid was reused by something else
        return False
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
        return True
    return False
