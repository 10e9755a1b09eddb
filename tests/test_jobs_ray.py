"""The job queue over a Ray cluster: `dgan jobs worker --backend ray` as a real process, a real
multi-node Ray on 127.0.0.1 (ray.cluster_utils.Cluster: a head node without CPUs and two nodes
that declare two fake GPUs each), real SIGKILLs. No mocks.

One cluster serves the whole module; the last test kills one of its nodes. Every test waits by
polling with a deadline and stops what it started by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_jobs import (
    ITERATIONS,
    alive,
    assert_same_parameters,
    attempts,
    checkpoint_step,
    final_parameters,
    job,
    live_workers,
    run_dir_of,
    submit,
    tiny_gan_args,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    """The environment of the processes a test starts, as a user's shell would have it."""
    run = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    for name in ("DGAN_JOBS_DB", "RAY_ADDRESS"):
        run.pop(name, None)
    return run


def dgan(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`dgan ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=cwd, env=env(), capture_output=True, text=True
    )


def processes_mentioning(marker: str) -> list[int]:
    """PIDs of live processes whose command line mentions `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                line = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in line and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


# ---------------------------------------------------------------------------------------------
# The cluster and the dispatchers
# ---------------------------------------------------------------------------------------------


class RayCluster:
    """A head node that runs nothing (0 CPUs) and two nodes of 2 CPUs and 2 fake GPUs, every
    one on 127.0.0.1 with its own ports, in its own short temp dir."""

    def __init__(self, temp: str) -> None:
        from ray.cluster_utils import Cluster

        self.temp = temp
        fast = {  # a killed node is declared dead within about a second
            "health_check_initial_delay_ms": 0,
            "health_check_period_ms": 300,
            "health_check_timeout_ms": 300,
            "health_check_failure_threshold": 3,
        }
        head = {"num_cpus": 0, "include_dashboard": False, "dashboard_port": free_port()}
        self.cluster = Cluster(
            initialize_head=True, head_node_args={**head, **self.ports(), "_system_config": fast}
        )
        self.address = self.cluster.address
        for _ in range(2):
            self.cluster.add_node(num_cpus=2, num_gpus=2, **self.ports())

    @staticmethod
    def ports() -> dict:
        return {
            "node_ip_address": "127.0.0.1",
            "dashboard_agent_listen_port": free_port(),
            "runtime_env_agent_port": free_port(),
            "metrics_export_port": free_port(),
        }

    def node(self, node_id_prefix: str):
        [node] = [n for n in self.cluster.worker_nodes if n.node_id.startswith(node_id_prefix)]
        return node

    def shutdown(self) -> None:
        self.cluster.shutdown()
        # Ray's worker processes name the temp dir; they end with their raylet, else here.
        for pid in processes_mentioning(self.temp):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    temp = tempfile.mkdtemp(prefix="rq", dir="/tmp")  # socket paths must stay under 107 bytes
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_TMPDIR", temp)  # Ray notes the cluster's address here, not /tmp/ray
        cluster = RayCluster(temp)
        try:
            yield cluster
        finally:
            cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


class Dispatchers:
    """Starts `dgan jobs worker --backend ray` processes and stops them by PID. A dispatcher's
    actors, and through them its jobs' processes, die with it."""

    def __init__(self, db: Path, cwd: Path, address: str) -> None:
        self.db, self.cwd, self.address = db, cwd, address
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> subprocess.Popen:
        log = open(self.cwd / f"dispatcher-{len(self.procs)}.log", "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "cli", "jobs", "worker", "--db", str(self.db)]
        cmd += ["--backend", "ray", "--address", self.address, "--lease", "3"]
        cmd += ["--retry-backoff", "0.5", *args]
        proc = subprocess.Popen(cmd, cwd=self.cwd, env=env(), stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen) -> str:
        return (self.cwd / f"dispatcher-{self.procs.index(proc)}.log").read_text()

    def wait(self, proc: subprocess.Popen, timeout: float = 120.0) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dispatcher did not exit:\n{self.output(proc)}") from None

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
        for pid in processes_mentioning(str(self.cwd)):  # a runner whose actor outlived it
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def dispatchers(workdir: Path, ray_cluster: RayCluster) -> Iterator[Dispatchers]:
    running = Dispatchers(workdir / "runs" / "jobs.db", workdir, ray_cluster.address)
    yield running
    running.stop_all()


def marks_of(path: Path) -> list[dict]:
    """The lines noop jobs appended: job, attempt, pid, CUDA_VISIBLE_DEVICES, time."""
    rows = []
    for line in path.read_text().splitlines():
        job_id, attempt, pid, devices, when = line.split()
        rows.append({"job": int(job_id), "attempt": int(attempt), "devices": devices})
    return rows


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def web_server() -> Iterator[int]:
    """An HTTP server on 127.0.0.1 (as a Ray dashboard is): the port of something not Ray."""
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend", "ray"], "--backend ray needs the Ray cluster to dispatch to"),
        (
            ["--backend", "ray", "--address", "head-node"],
            "give the Ray cluster's head as HOST:PORT",
        ),
        (["--backend", "ray", "--address", "127.0.0.1:{closed}"], "no Ray cluster answers there"),
        (
            ["--backend", "ray", "--address", "127.0.0.1:{http}"],
            "but not the head of a Ray cluster",
        ),
        (["--backend", "ray", "--address", "127.0.0.1:1", "--gpus", "0,1"], "drop --gpus"),
        (["--backend", "ray", "--address", "127.0.0.1:1", "--slots", "2"], "drop --slots"),
        (["--address", "127.0.0.1:6379"], "add --backend ray, or drop --address"),
        (["--backend", "kubernetes"], "choose local or ray"),
    ],
    ids=[
        "no-address", "no-port", "unreachable", "not-ray", "gpus", "slots", "address-local",
        "backend",
    ],
)  # fmt: skip
def test_bad_ray_worker_flags_are_refused_with_a_message_and_start_nothing(
    args, message, workdir, web_server
):
    closed = free_port()  # nothing listens there
    args = [a.replace("{closed}", str(closed)).replace("{http}", str(web_server)) for a in args]
    started = time.monotonic()
    result = dgan("jobs", "worker", "--db", "jobs.db", *args, cwd=workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr
    assert time.monotonic() - started < 30  # refused at once, not after Ray's retries
    assert not (workdir / "jobs.db").exists() or not live_workers(workdir / "jobs.db")


# ---------------------------------------------------------------------------------------------
# Placement, capacity, many jobs
# ---------------------------------------------------------------------------------------------


def test_jobs_go_to_nodes_with_the_gpus_they_ask_for_and_a_job_larger_than_any_node_waits(
    dispatchers, workdir, ray_cluster
):
    db, marks = dispatchers.db, workdir / "marks.txt"
    sizes = {submit(db, "noop", "--seconds", "1", "--mark", str(marks), gpus=g): g
             for g in (2, 2, 1, 1)}  # fmt: skip
    dispatcher = dispatchers.start()
    wait_for("the dispatcher's record", lambda: live_workers(db), 60)
    submitted = dgan("jobs", "submit", "noop", "--gpus", "3", cwd=workdir)
    assert submitted.returncode == 0, submitted.stderr
    big = int(submitted.stdout)
    warning = f"the largest node of the Ray cluster at {ray_cluster.address}, which "
    assert warning in submitted.stderr and "has 2 GPUs" in submitted.stderr, submitted.stderr
    wait_for(
        "the jobs that fit to succeed",
        lambda: all(job(db, i)["state"] == "succeeded" for i in sizes),
        90,
    )

    # Each job saw as many GPUs as it asked for, the ones Ray recorded for it on its node.
    seen = {m["job"]: m["devices"] for m in marks_of(marks)}
    placed = {}
    for i, gpus in sizes.items():
        [ran] = attempts(db, i)
        node, _, ids = ran["devices"].partition(" GPU ")
        assert len(seen[i].split(",")) == gpus and ids == seen[i], (ran["devices"], seen[i])
        placed[i] = (node, set(ids.split(",")), ran["started"], ran["ended"])
    # The two 2-GPU jobs filled a node each; jobs that overlapped on a node had other GPUs.
    two = [placed[i] for i, g in sizes.items() if g == 2]
    assert two[0][0] != two[1][0]
    for a in placed.values():
        for b in placed.values():
            if a is not b and a[0] == b[0] and a[2] < b[3] and b[2] < a[3]:
                assert not a[1] & b[1]
    logs = dgan("jobs", "logs", str(next(iter(sizes))), cwd=workdir).stdout
    assert "CUDA_VISIBLE_DEVICES=0,1" in logs and "finished after" in logs

    shown = dgan("jobs", "show", str(big), cwd=workdir).stdout
    assert job(db, big)["state"] == "queued" and not attempts(db, big)
    assert (
        f"needs 3 GPUs; the largest node of the Ray cluster at {ray_cluster.address} has 2 GPUs"
        in shown
    ), shown
    dispatcher.send_signal(signal.SIGTERM)
    assert dispatchers.wait(dispatcher) == 0, dispatchers.output(dispatcher)
    assert "backend ray" in dispatchers.output(dispatcher)


def test_twenty_jobs_through_ray_each_run_exactly_once_with_their_logs(dispatchers, workdir):
    db, marks = dispatchers.db, workdir / "marks.txt"
    ids = [submit(db, "noop", "--mark", str(marks)) for _ in range(20)]
    dispatcher = dispatchers.start("--exit-when-empty")
    assert dispatchers.wait(dispatcher, timeout=240) == 0, dispatchers.output(dispatcher)

    runs = Counter(m["job"] for m in marks_of(marks))
    assert runs == Counter({i: 1 for i in ids})  # each job's own process ran once
    for i in ids:
        assert job(db, i)["state"] == "succeeded"
        [only] = attempts(db, i)
        assert (only["outcome"], only["exit_code"]) == ("succeeded", 0)
        assert only["devices"].startswith("127.0.0.1/")  # the node Ray placed it on
    # `dgan jobs logs` shows each job's log, pulled from its node to this machine.
    code = (
        "import sys, cli\n"
        f"for i in {ids}:\n"
        "    try:\n"
        "        cli.app(['jobs', 'logs', str(i)])\n"
        "    except SystemExit:\n"
        "        pass\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=env(), capture_output=True, text=True
    ).stdout
    shown = out.split("=== attempt 1 on ")[1:]
    assert len(shown) == len(ids), out
    for i, log in zip(ids, shown, strict=True):
        assert f"job {i} attempt 1: noop 'noop' in {workdir}" in log, log
        assert f"job {i} attempt 1: finished after" in log, log


def test_cancel_and_preemption_stop_a_job_on_its_node_with_sigterm(dispatchers, workdir):
    db = dispatchers.db
    # Two long jobs fill both nodes; a job of higher priority then needs one of them.
    low = [submit(db, "noop", "--seconds", "60", gpus=2) for _ in range(2)]
    dispatcher = dispatchers.start()

    def runs(i: int) -> bool:
        """The job's process has started its work (its log, pulled from the node, says so)."""
        tries = attempts(db, i)
        log = Path(tries[-1]["log"]) if tries else None
        return bool(log and log.exists() and f"attempt {len(tries)}: noop" in log.read_text())

    wait_for("both long jobs to run", lambda: all(runs(i) for i in low), 60)
    high = submit(db, "noop", "--seconds", "0.5", gpus=2, priority=10)
    wait_for("the urgent job to succeed", lambda: job(db, high)["state"] == "succeeded", 60)
    preempted = next(i for i in low if attempts(db, i)[0]["outcome"] == "preempted")
    other = next(i for i in low if i != preempted)
    first = attempts(db, preempted)[0]
    assert first["exit_code"] == 130  # SIGTERM reached the job on its node: it stopped itself
    assert first["ended"] <= attempts(db, high)[0]["started"]
    assert [a["outcome"] for a in attempts(db, other)] == [None]  # one stop was enough
    wait_for("the preempted job to run again", lambda: len(attempts(db, preempted)) == 2, 60)

    for i in low:
        wait_for(f"job {i} to run", lambda i=i: runs(i), 60)
        result = dgan("jobs", "cancel", str(i), cwd=workdir)
        assert result.returncode == 0 and "cancel requested" in result.stdout, result.stderr
    for i in low:
        wait_for(f"job {i} cancelled", lambda i=i: job(db, i)["state"] == "cancelled", 60)
        last = attempts(db, i)[-1]
        assert (last["outcome"], last["exit_code"]) == ("cancelled", 130)
    dispatcher.send_signal(signal.SIGTERM)
    assert dispatchers.wait(dispatcher) == 0, dispatchers.output(dispatcher)


def test_the_scheduler_places_each_job_on_one_node_and_preempts_only_where_it_will_run():
    from jobs import scheduler

    nodes = {"a": 1, "b": 2}
    # Best fit: the 1-GPU job takes node a's last GPU and leaves b's two for the 2-GPU job.
    waiting = [scheduler.Waiting(1, 0, 1), scheduler.Waiting(2, 0, 2)]
    decided = scheduler.plan(waiting, nodes, [])
    assert decided.start == [1, 2] and decided.nodes == {1: ["a"], 2: ["b"]}
    # Three GPUs are free in all, but no node has two: the 2-GPU job waits.
    assert scheduler.plan([scheduler.Waiting(3, 0, 2)], {"a": 1, "b": 1}, []).start == []
    # Ray Train workers of one GPU each may spread over the nodes.
    spread = scheduler.plan([scheduler.Waiting(4, 0, 1, processes=3)], nodes, [])
    assert spread.start == [4] and sorted(spread.nodes[4]) == ["a", "b", "b"]
    # Freeing node b's two GPUs takes its low job; the lower one on node a would not help.
    active = [
        scheduler.Active(10, 0, 1, started=100.0, stopping=False, node="a"),
        scheduler.Active(11, 1, 2, started=50.0, stopping=False, node="b"),
    ]
    decided = scheduler.plan([scheduler.Waiting(20, 5, 2)], {"a": 0, "b": 0}, active)
    assert (decided.preempt, decided.preempt_for) == ([11], 20)


# ---------------------------------------------------------------------------------------------
# A node dies (last: it leaves the cluster with one node)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from fakes import make_folder_dataset

    return make_folder_dataset(
        tmp_path_factory.mktemp("data") / "set", n_normal=12, n_defect=12, size=32
    )


@pytest.fixture(scope="module")
def tracking(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def uninterrupted(dataset: Path, tracking: str, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final parameters of the tiny GAN trained straight through, in this process, on the
    config a queued job of the same options gets, with one thread as the job's actor has."""
    from dgan.events import CollectEvents
    from dgan.train.gan import run_gan
    from jobs.spec import build_spec

    queued = build_spec("train-gan", tiny_gan_args(dataset)).config
    log = {"run_root": tmp_path_factory.mktemp("straight"), "tracking_uri": tracking}
    config = queued.model_copy(update={"log": queued.log.model_copy(update=log)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_gan(config, events=CollectEvents())
    finally:
        torch.set_num_threads(threads)
    assert result.state == "finished" and result.step == ITERATIONS
    return final_parameters(result.run_dir)


def test_a_job_whose_node_dies_is_requeued_and_resumes_on_another_node_to_the_same_parameters(
    dispatchers, workdir, ray_cluster, dataset, tracking, uninterrupted, monkeypatch
):
    db = dispatchers.db
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)  # the job takes it from its submitter
    job_id = submit(db, "train-gan", *tiny_gan_args(dataset))
    dispatcher = dispatchers.start("--exit-when-empty")
    wait_for("a checkpoint at iteration 10 or later", lambda: checkpoint_step(db, job_id) >= 10)
    [first] = attempts(db, job_id)
    node_id = first["devices"].split("/")[1].split()[0]
    runner = int(Path(first["log"]).read_text().split("(pid ")[1].split(",")[0])
    ray_cluster.cluster.remove_node(ray_cluster.node(node_id), allow_graceful=False)  # SIGKILL

    wait_for("the job's process to die with its node", lambda: not alive(runner), 30)
    assert dispatchers.wait(dispatcher, timeout=180) == 0, dispatchers.output(dispatcher)
    record = job(db, job_id)
    assert record["state"] == "succeeded" and record["failures"] == 0
    one, two = attempts(db, job_id)
    assert one["outcome"] == "lost" and "its node has died" in one["error"], one["error"]
    assert (two["outcome"], two["exit_code"]) == ("succeeded", 0)
    assert node_id not in two["devices"] and two["started"] >= one["ended"]
    log = Path(two["log"]).read_text()
    resumed = int(log.split("resuming from ")[1].split("iter-")[1][:8])
    assert resumed >= 10 and resumed % 5 == 0  # the last periodic checkpoint before the kill
    assert "died" in Path(one["log"]).read_text()  # the dispatcher noted it in the log
    run_dir = run_dir_of(db, job_id)
    assert json.loads(record["result"])["step"] == ITERATIONS
    assert_same_parameters(final_parameters(run_dir), uninterrupted)
