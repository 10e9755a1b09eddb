"""`dgan jobs worker --backend ray`: each attempt runs on a node of an existing Ray cluster.

The worker (the dispatcher) keeps the queue: priorities, dependencies, leases, retries with
backoff, resume from the latest checkpoint, preemption and cancellation. Ray places the work.
Each attempt is one Ray actor (`AttemptActor`) that asks for the job's resources (`num_gpus`
its GPUs, `num_cpus` one per process; on a cluster without GPUs, `num_cpus` its slots) and runs
`python -m jobs.runner --spec FILE` on its node as its own process group, with the
CUDA_VISIBLE_DEVICES that Ray gave the actor. A training job of several Ray Train workers asks
for nothing itself: its trainer asks the cluster for its workers, through RAY_ADDRESS.

The actor runs once (`max_restarts=0`, `max_task_retries=0`): the queue, not Ray, decides about
another attempt. An actor whose node died is an attempt that was lost; the job goes back to the
queue after its backoff and resumes from its latest checkpoint on another node.

The runner's output goes to a file on the node; the dispatcher pulls the new bytes every half
second and appends them to the attempt's log on its own machine, so `dgan jobs logs` reads the
same file whichever backend ran the job. The job's directory (`runs/jobs/<id>/`: spec, outcome,
progress, checkpoints) and the directory it was submitted from must be on storage that every
node sees at the same path. The queue's SQLite file stays on the dispatcher's machine: nodes
never open it.

A Ray driver attaches to a raylet on its own machine: run the dispatcher on a node of the
cluster (the head, typically).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgan.errors import DganError
from jobs.backend import Exit, Launch, Nodes, write_attempt
from jobs.runner import PROGRESS_FILE, outcome_file

NAMESPACE = "dgan-jobs"
TRAINING = ("train-gan", "train-inspector")
PULL_EVERY = 0.5  # seconds between two pulls of an attempt's new log bytes and progress
PULL_BYTES = 1 << 20  # the most log bytes one pull brings
SPEC_VISIBLE_WAIT = 10.0  # seconds a node waits for the spec file to appear on shared storage


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT of a Ray cluster's head (its GCS), as `ray start --head` prints it."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DganError(
            f"--address {address!r}: give the Ray cluster's head as HOST:PORT, e.g. "
            "--address 10.0.0.5:6379 (the address 'ray start --head' prints)",
            exit_code=2,
        )
    return host.strip("[]"), int(port)


def _answers(host: str, port: int, timeout: float = 5.0) -> OSError | None:
    """None when something accepts a TCP connection at host:port, else why not."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        return err
    return None


def _speaks_http2(host: str, port: int, timeout: float = 5.0) -> bool:
    """Whether the server at host:port answers the HTTP/2 preface with its SETTINGS frame, as
    a Ray head's GCS (a gRPC server) does. Ray itself would retry a wrong port for minutes."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(preface)
            frame = conn.recv(9)
    except OSError:
        return False
    return len(frame) >= 4 and frame[3] == 4  # a frame of type SETTINGS


def _network_address() -> str:
    """The address this machine reaches others from, as Ray finds it (no packet is sent)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("8.8.8.8", 53))
        return s.getsockname()[0]
    return "127.0.0.1"


def connect(address: str) -> str:
    """Join the running Ray cluster at HOST:PORT as a driver (never start one); returns
    "HOST:PORT". DganError, with what to do, when nothing answers there or Ray cannot join."""
    import logging

    host, port = parse_address(address)
    refused = _answers(host, port)
    if refused is not None:
        why = refused.strerror or str(refused)
        raise DganError(
            f"--address {host}:{port}: no Ray cluster answers there ({why})."
            f" Start one on that machine with 'ray start --head --port {port}', or point --address"
            " (or RAY_ADDRESS) at the head node of a running cluster",
            exit_code=2,
        )
    tls = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")  # no plain preface then
    if not tls and not _speaks_http2(host, port):
        raise DganError(
            f"--address {host}:{port}: something answers there, but not the head of a Ray "
            "cluster. Give the port 'ray start --head' printed (its GCS, 6379 by default; not "
            "the dashboard's 8265 nor the Ray Client's 10001)",
            exit_code=2,
        )
    import ray

    loopback = host in ("127.0.0.1", "localhost", "::1")
    if loopback and _answers(_network_address(), port, timeout=1.0) is not None:
        # A cluster that listens on the loopback address only (ray start --node-ip-address
        # 127.0.0.1). Ray replaces 127.0.0.1 by this machine's network address before it
        # connects, unless it is told that this machine is no cluster member of the network.
        import ray._private.ray_constants as ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # One try at the GCS (about 40 s when it does not answer), not Ray's default of twenty.
    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "1")
    try:
        ray.init(
            address=f"{host}:{port}",
            namespace=NAMESPACE,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    except Exception as err:  # noqa: BLE001 - Ray raises several types; each means "cannot join"
        raise DganError(
            f"--address {host}:{port}: could not join the Ray cluster there: {err}. The "
            "dispatcher must run on a node of the cluster (a Ray driver attaches to its "
            "machine's raylet): start it on the head node",
            exit_code=2,
        ) from None
    return f"{host}:{port}"


def job_demand(gpus: int, spec: dict[str, Any], unit: str = "GPU") -> tuple[int, int]:
    """(processes, units each) that a job needs from a cluster's nodes. A training job of
    several Ray Train workers needs `workers` places of `gpus_per_worker` GPUs (1 when not
    given; one CPU each on a cluster without GPUs), on any nodes; any other job needs `gpus`
    units on one node."""
    workers = int(spec.get("workers") or 1)
    if spec.get("kind") in TRAINING and workers > 1:
        per_worker = spec.get("gpus_per_worker")
        if unit != "GPU":
            return workers, 1
        return workers, 1 if per_worker is None else int(per_worker)
    return 1, gpus


# ---------------------------------------------------------------------------------------------
# On the node: one actor per attempt
# ---------------------------------------------------------------------------------------------


class AttemptActor:
    """One attempt on a Ray node: `python -m jobs.runner --spec FILE` as its own process group,
    with its output in a file on this node. Threaded (max_concurrency), so that `pull`, `send`
    and `where` answer while `wait` blocks."""

    def __init__(self, spec_path: str, job_dir: str, attempt: int, trainer: bool) -> None:
        import ray

        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.job_dir, self.attempt = Path(job_dir), attempt
        # Beside Ray's own files when it has a temp dir of its own.
        self.scratch = Path(
            tempfile.mkdtemp(prefix=f"dgan-attempt-{attempt}-", dir=os.environ.get("RAY_TMPDIR"))
        )
        self.log = self.scratch / "attempt.log"
        self.progress_mtime = 0.0
        self.popen: subprocess.Popen | None = None
        self.error: str | None = None
        if not _appears(Path(spec_path), SPEC_VISIBLE_WAIT):
            self.error = (
                f"{spec_path} is not visible on Ray node {self.node_ip}: the job directory "
                f"({job_dir}) must be on storage that every node of the cluster sees at the same "
                "path (NFS, a shared disk)"
            )
            return
        code_root = str(Path(__file__).resolve().parent.parent)
        run_env = dict(os.environ)
        run_env["PYTHONPATH"] = os.pathsep.join(
            [code_root, *filter(None, [run_env.get("PYTHONPATH")])]
        )
        if trainer:
            run_env["RAY_ADDRESS"] = context.gcs_address  # its Ray Train trainer joins this cluster
            if context.gcs_address.rpartition(":")[0] in ("127.0.0.1", "localhost"):
                # Ray would replace a loopback address by the network one (see connect()).
                run_env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        cmd = [sys.executable, "-m", "jobs.runner", "--spec", spec_path, "--watch-parent"]
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                cmd, cwd=job_dir, env=run_env, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def where(self) -> dict[str, Any]:
        """The node, the GPUs Ray gave this attempt, and the runner's pid."""
        return {
            "node_id": self.node_id,
            "node_ip": self.node_ip,
            "gpus": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
            "pid": self.popen.pid if self.popen else None,
        }

    def wait(self) -> tuple[int | None, dict[str, Any] | None]:
        """Block until the runner exits; its exit status and the outcome it wrote."""
        if self.popen is None:
            return 2, {"state": "failed", "error": self.error, "exit_code": 2}
        code = self.popen.wait()
        outcome = None
        with contextlib.suppress(OSError, ValueError):
            outcome = json.loads(outcome_file(self.job_dir, self.attempt).read_text())
        return code, outcome

    def pull(self, offset: int) -> tuple[bytes, dict[str, Any] | None]:
        """The log's bytes from `offset` (at most PULL_BYTES), and the job's progress if it
        changed since the last pull."""
        data = b""
        with contextlib.suppress(OSError), open(self.log, "rb") as f:
            f.seek(offset)
            data = f.read(PULL_BYTES)
        progress = None
        path = self.job_dir / PROGRESS_FILE
        with contextlib.suppress(OSError, ValueError):
            mtime = path.stat().st_mtime
            if mtime != self.progress_mtime:
                found = json.loads(path.read_text())
                self.progress_mtime = mtime
                progress = found if found.get("attempt") == self.attempt else None
        return data, progress

    def send(self, signum: int) -> None:
        """SIGTERM (checkpoint, then stop) or SIGKILL to the runner's process group."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signum)

    def close(self) -> None:
        """Remove this node's copy of the log (the dispatcher has every byte of it)."""
        import shutil

        shutil.rmtree(self.scratch, ignore_errors=True)


def _appears(path: Path, timeout: float) -> bool:
    """Shared storage may show a file written on another machine a moment later."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True


# ---------------------------------------------------------------------------------------------
# On the dispatcher
# ---------------------------------------------------------------------------------------------


@dataclass
class RayAttempt:
    launch: Launch
    actor: Any
    done: Any  # the ObjectRef of actor.wait()
    placed: Any  # the ObjectRef of actor.where()
    units: int  # what it holds on its node, in the cluster's unit (0: its trainer asks)
    node: str | None  # where the scheduler planned it; where Ray put it, once known
    placement: dict[str, Any] | None = None
    reported: bool = False  # its placement was handed to the worker
    offset: int = 0  # log bytes appended so far
    pulling: Any = None  # the ObjectRef of a pull in flight
    next_pull: float = 0.0
    progress: dict[str, Any] | None = None  # pulled, not yet handed to the worker


class RayBackend:
    """Runs attempts as Ray actors on the cluster at `address` (HOST:PORT); see the module
    docstring. Joining the cluster happens here: DganError when it cannot."""

    name = "ray"

    def __init__(self, address: str) -> None:
        import ray

        self.address = connect(address)
        self.unit = "GPU" if ray.cluster_resources().get("GPU", 0) > 0 else "CPU"
        self._actor_class = ray.remote(AttemptActor)

    def describe(self) -> str:
        nodes = self.nodes([])
        return (
            f"the Ray cluster at {self.address} ({len(nodes.total)} node(s) with "
            f"{nodes.unit}s, {nodes.units} in all, the largest node has {nodes.largest}; each "
            f"job's --gpus counts {nodes.unit}s)"
        )

    def nodes(self, running: list[RayAttempt]) -> Nodes:
        """Each live node's free and total units, less what this dispatcher's attempts that
        Ray has not placed yet will take on the node they were planned on."""
        import ray
        from ray._private.state import available_resources_per_node

        total = {
            n["NodeID"]: int(n["Resources"].get(self.unit, 0))
            for n in ray.nodes()
            if n["Alive"] and n["Resources"].get(self.unit, 0) >= 1
        }
        available = available_resources_per_node()
        free = {node: int(available.get(node, {}).get(self.unit, 0)) for node in total}
        for attempt in running:
            if attempt.placement is None and attempt.node in free and not self._ready(attempt):
                free[attempt.node] = max(0, free[attempt.node] - attempt.units)
        return Nodes(self.unit, free, total, f"the Ray cluster at {self.address}")

    def demand(self, gpus: int, spec: dict[str, Any]) -> tuple[int, int]:
        return job_demand(gpus, spec, self.unit)

    def start(self, launch: Launch) -> RayAttempt:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        path = write_attempt(launch)
        launch.log.touch()
        gpus = int(launch.spec.get("gpus", 1))
        processes, units = self.demand(gpus, launch.spec)
        if processes > 1:
            # Its Ray Train trainer asks the cluster for the workers; the actor holds nothing.
            resources: dict[str, Any] = {"num_cpus": 0, "num_gpus": 0}
            units = 0
        elif self.unit == "GPU":
            resources = {"num_gpus": units, "num_cpus": units}
        else:
            resources = {"num_cpus": units, "num_gpus": 0}
        strategy = "DEFAULT"
        if launch.node:
            strategy = NodeAffinitySchedulingStrategy(launch.node, soft=True)
        actor = self._actor_class.options(
            **resources,
            max_restarts=0,
            max_task_retries=0,
            max_concurrency=4,
            scheduling_strategy=strategy,
        ).remote(str(path), str(launch.job_dir), launch.attempt, processes > 1)
        return RayAttempt(
            launch, actor, actor.wait.remote(), actor.where.remote(), units, launch.node
        )

    # -- while it runs ----------------------------------------------------------------------

    def _ready(self, attempt: RayAttempt, timeout: float = 0.0) -> bool:
        """Whether the actor reported where it runs (it was placed and started its runner)."""
        import ray
        from ray.exceptions import RayError

        if attempt.placement is not None:
            return True
        if not ray.wait([attempt.placed], timeout=timeout)[0]:
            return False
        with contextlib.suppress(RayError):
            attempt.placement = ray.get(attempt.placed)
            attempt.node = attempt.placement["node_id"]
        return attempt.placement is not None

    def _take(self, attempt: RayAttempt, timeout: float = 0.0) -> bool:
        """Append what the pull in flight brought, once it is back (waiting up to `timeout`);
        True when it brought log bytes."""
        import ray
        from ray.exceptions import RayError

        if attempt.pulling is None or not ray.wait([attempt.pulling], timeout=timeout)[0]:
            return False
        try:
            data, progress = ray.get(attempt.pulling)
        except RayError:
            data, progress = b"", None
        attempt.pulling = None
        if progress is not None:
            attempt.progress = progress
        if not data:
            return False
        with open(attempt.launch.log, "ab") as log:
            log.write(data)
        attempt.offset += len(data)
        return True

    def _pump(self, attempt: RayAttempt) -> None:
        """Take a finished pull; start the next one when it is due (one in flight at most, so
        the bytes arrive in order)."""
        self._take(attempt)
        if attempt.pulling is None and time.monotonic() >= attempt.next_pull:
            attempt.pulling = attempt.actor.pull.remote(attempt.offset)
            attempt.next_pull = time.monotonic() + PULL_EVERY

    def _drain(self, attempt: RayAttempt) -> None:
        """Every byte of the log that the dispatcher does not have yet (the runner has exited)."""
        self._take(attempt, timeout=30.0)
        while True:
            attempt.pulling = attempt.actor.pull.remote(attempt.offset)
            if not self._take(attempt, timeout=30.0):
                break

    def poll(self, attempt: RayAttempt) -> Exit | None:
        import ray
        from ray.exceptions import RayActorError

        self._ready(attempt)
        if not ray.wait([attempt.done], timeout=0)[0]:
            self._pump(attempt)
            return None
        try:
            code, outcome = ray.get(attempt.done)
        except RayActorError as err:
            return self._died(attempt, err)
        self._drain(attempt)
        self._ready(attempt, timeout=5.0)  # where it ran, for the record, before the actor goes
        with contextlib.suppress(Exception):
            ray.get(attempt.actor.close.remote(), timeout=10)
        ray.kill(attempt.actor, no_restart=True)
        return Exit(code, outcome)

    def _died(self, attempt: RayAttempt, err: Exception) -> Exit:
        """The actor is gone: its node died (lost: retried), or it never started (failed)."""
        import ray

        with contextlib.suppress(Exception):
            self._take(attempt)
        if getattr(err, "actor_init_failed", False):
            why = f"could not start on {self._on(attempt)}: {_first_lines(err)}"
            self._note(attempt, why)
            return Exit(None, {"state": "failed", "error": why, "exit_code": 1})
        with contextlib.suppress(Exception):
            ray.kill(attempt.actor, no_restart=True)
        why = f"the Ray actor running it on {self._on(attempt)} died: {_cause(err)}"
        self._note(attempt, why)
        return Exit(None, None, lost=why)

    def _on(self, attempt: RayAttempt) -> str:
        if attempt.placement is None:
            return f"the Ray cluster at {self.address} (before it was placed)"
        return f"Ray node {attempt.placement['node_ip']} ({attempt.placement['node_id'][:8]})"

    def _note(self, attempt: RayAttempt, line: str) -> None:
        """A line of the dispatcher's own in the attempt's log."""
        with contextlib.suppress(OSError), open(attempt.launch.log, "ab") as log:
            log.write(f"\ndgan jobs worker: {line}\n".encode())

    def terminate(self, attempt: RayAttempt) -> None:
        if not self._ready(attempt):
            self.kill(attempt)  # not placed yet: nothing runs, nothing to checkpoint
            return
        attempt.actor.send.remote(signal.SIGTERM)

    def kill(self, attempt: RayAttempt) -> None:
        import ray

        # The runner watches its parent, the actor's process, and kills its group when it goes.
        with contextlib.suppress(Exception):
            ray.kill(attempt.actor, no_restart=True)

    def progress(self, attempt: RayAttempt) -> dict[str, Any] | None:
        progress, attempt.progress = attempt.progress, None
        return progress

    def node_of(self, attempt: RayAttempt) -> str | None:
        """The node that holds its GPUs: where Ray put it, else where it was planned."""
        self._ready(attempt)
        return attempt.node

    def pid(self, attempt: RayAttempt) -> int | None:
        return None  # the runner's process is on a node; a local pid would name another one

    def where(self, attempt: RayAttempt) -> str | None:
        if attempt.reported or not self._ready(attempt):
            return None
        attempt.reported = True
        p = attempt.placement
        gpus = f" GPU {p['gpus']}" if self.unit == "GPU" and p["gpus"] else ""
        return f"{p['node_ip']}/{p['node_id'][:8]}{gpus}"


def _first_lines(err: Exception, n: int = 3) -> str:
    return " ".join(line.strip() for line in str(err).splitlines()[:n] if line.strip())


def _cause(err: Exception) -> str:
    """Ray's reason in one line: 'its node has died', say, rather than its whole report."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "node" in line and ("died" in line or "dead" in line or "terminated" in line):
            return line
    return lines[-1] if lines else type(err).__name__
