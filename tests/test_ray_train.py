"""One training job across Ray nodes (Ray Train): two workers on two nodes equal one process of
the same global batch, a run stopped and started again through Ray ends where an uninterrupted
one does, and bad input is refused before any work, without a traceback.

The two nodes are a real head and a second raylet on this machine (ray.cluster_utils.Cluster),
one CPU each, listening on 127.0.0.1, so that Ray must place the two workers on different nodes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_same_training_state, tiny_gan_config

from dgan.events import Events
from dgan.run import checkpoint as ckpt
from dgan.run.launch import free_port
from dgan.run.ray_train import WORKERS_FILE


def processes_mentioning(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()[1:] if marker in line and "ps -eo" not in line]


@pytest.fixture(scope="module")
def two_nodes():
    """A Ray head and a second node on this machine, 1 CPU each, on 127.0.0.1; removed after."""
    from dgan.run.ray_train import loopback_only

    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # Ray's socket paths stay short
    patch = pytest.MonkeyPatch()
    patch.setenv("RAY_TMPDIR", str(temp))  # its session dirs and address file stay ours
    patch.setenv("RAY_AUTH_MODE", "disabled")
    # Ray Train's preemption watcher and metrics add two actors (processes) to every run.
    patch.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    patch.setenv("RAY_TRAIN_METRICS_ENABLED", "0")
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    with loopback_only(True):
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                **node, "include_dashboard": False, "dashboard_agent_listen_port": free_port()
            },
        )  # fmt: skip
        cluster.add_node(**node, dashboard_agent_listen_port=free_port())
    try:
        yield cluster
    finally:
        cluster.shutdown()
        patch.undo()
        shutil.rmtree(temp, ignore_errors=True)
        assert processes_mentioning(str(temp)) == []


def ctrl_c_when_training_starts(run_root: Path) -> None:
    """Ctrl-C (SIGINT to this process) once the workers have started, while the trainer's own
    handler is installed (never after it: pytest would stop)."""
    deadline = time.monotonic() + 120
    while not list(run_root.glob(f"gan/*/{WORKERS_FILE}")) and time.monotonic() < deadline:
        time.sleep(0.02)
    if "StoppableTrainer" in getattr(signal.getsignal(signal.SIGINT), "__qualname__", ""):
        os.kill(os.getpid(), signal.SIGINT)


# Noise injection off: it is the one per-process random stream (as in test_ddp).
EXACT = ("generator.ani=false", "train.iterations=6", "log.checkpoint_every=6")


@pytest.mark.slow
def test_two_workers_on_two_nodes_equal_one_process_across_ctrl_c_and_a_queued_restart(
    two_nodes, tiny_folder, workdir, one_thread, monkeypatch
):
    import ray

    from dgan.config import to_yaml
    from dgan.errors import DganError
    from dgan.run.ray_train import train_on_ray
    from dgan.run.result import JobInterrupted
    from dgan.train.gan import GanJob, run_gan
    from jobs.runner import execute
    from jobs.spec import build_spec, new_job

    config = tiny_gan_config(tiny_folder, *EXACT)
    single = run_gan(config, quiet=True, run_name="one")

    # The queued job: `dgan jobs submit train-gan --workers 2 ...` holds no GPU of the dispatcher.
    (workdir / "tiny.yaml").write_text(to_yaml(config))
    shared = workdir / "shared"
    args = ["--config", "tiny.yaml", "--workers", "2", "--gpus-per-worker", "0"]
    spec = build_spec("train-gan", [*args, "--storage", str(shared)], name="ray", workdir=workdir)
    assert (spec.workers, spec.gpus, new_job(spec).gpus) == (2, 0, 0)
    assert spec.config == config
    job_dir, run_root = workdir / "jobs" / "00001", shared.resolve() / "00001"

    # Its first attempt is stopped by Ctrl-C: the workers checkpoint at their next log step...
    ray_args = {"workers": 2, "gpus_per_worker": 0, "address": two_nodes.address}
    threading.Thread(target=ctrl_c_when_training_starts, args=(run_root,), daemon=True).start()
    with pytest.raises(JobInterrupted) as stopped:
        train_on_ray(
            GanJob, spec.config, storage=run_root, run_name="ray", events=Events(), **ray_args
        )
    paused = stopped.value.result
    assert paused.state == "interrupted" and paused.step in (2, 4)  # a log step (log_every 2)
    assert paused.run_dir.parent == run_root / "gan"
    assert ckpt.read_status(paused.run_dir)["state"] == "interrupted"
    assert paused.checkpoint == paused.run_dir / "checkpoints" / f"iter-{paused.step:08d}"
    placement = json.loads((paused.run_dir / WORKERS_FILE).read_text())
    assert [w["rank"] for w in placement] == [0, 1]
    assert len({w["node_id"] for w in placement}) == 2  # one worker on each node
    assert {w["backend"] for w in placement} == {"gloo"}

    # ...a resume from another config is refused before Ray starts...
    other = tiny_gan_config(tiny_folder, *EXACT, "train.lr_g=0.001")
    with pytest.raises(DganError, match="incompatible config"):
        train_on_ray(GanJob, other, resume="latest", storage=run_root, **ray_args)
    assert not ray.is_initialized()

    # ...and the queue's next attempt, the whole job again, resumes it through Ray.
    monkeypatch.setenv("RAY_ADDRESS", two_nodes.address)
    for name in ("DGAN_JOB_ID", "DGAN_ATTEMPT"):  # execute() sets them; restored after
        monkeypatch.setenv(name, "")
    outcome = execute(spec, 1, 2, job_dir)
    assert outcome["state"] == "finished", outcome
    done = outcome["result"]
    assert (done["state"], done["step"]) == ("finished", 6)
    assert Path(done["run_dir"]) == paused.run_dir
    assert done["mlflow_run_id"] == paused.mlflow_run_id  # the resumed run continues its MLflow run
    assert ckpt.read_status(paused.run_dir)["state"] == "finished"
    final = paused.run_dir / "checkpoints" / "iter-00000006"
    assert {p.name for p in final.iterdir()} == {"state.pt", "rng-0.pt", "rng-1.pt"}

    # Gradients averaged over the workers, not summed: the same nets and Adam moments.
    assert_same_training_state(single.run_dir / "checkpoints" / "iter-00000006", final)


def invoke(*args: str):
    """`dgan ARGS` in this process; returns (exit code, stderr)."""
    from typer.testing import CliRunner

    import cli

    result = CliRunner().invoke(cli.app, list(args))
    assert not isinstance(result.exception, Exception) or isinstance(
        result.exception, SystemExit
    ), result.exception  # a DganError is a message, never a traceback
    return result.exit_code, result.stderr


def closed_port() -> int:
    return free_port()  # nothing listens there once the probe socket is closed


@pytest.mark.parametrize("command", ["gan", "inspector"])
@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--workers", "0"], "--workers must be at least 1"),
        (["--workers", "2", "--gpus", "2"], "leave --gpus out"),
        (["--workers", "2", "--gpus-per-worker", "-1"], "--gpus-per-worker must be 0"),
        (["--ray-address", "local"], "--ray-address go"),
        (["--storage", "x", "--gpus-per-worker", "1"], "--gpus-per-worker, --storage go"),
        (["--workers", "2"], "none was named"),
        (["--workers", "2", "--ray-address", "nohost"], "expected HOST:PORT"),
        (["--workers", "2", "--ray-address", "CLOSED"], "no Ray cluster answers"),
        (["--workers", "2", "--ray-address", "198.51.100.7:6379"], "give --storage"),
        (["--workers", "2", "--ray-address", "local", "--storage", "s3://b/r"], "filesystem"),
        (
            ["--workers", "2", "--ray-address", "198.51.100.7:6379", "--storage", "/nfs/r"],
            "start an MLflow server",
        ),
    ],
)
def test_bad_ray_train_input_is_refused_before_ray_starts(
    command, args, says, workdir, monkeypatch
):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    args = [a.replace("CLOSED", f"127.0.0.1:{closed_port()}") for a in args]
    code, stderr = invoke("train", command, *args, "--data", str(workdir / "no-data-needed"))
    assert code == 2, stderr
    assert says in stderr and stderr.startswith("error: ")
    assert not ray.is_initialized()
    assert not (workdir / "runs").exists()  # nothing was made


def test_more_gpus_per_worker_than_any_node_has_is_refused_on_the_cluster(
    two_nodes, tiny_folder, workdir
):
    import ray

    code, stderr = invoke(
        "train", "gan", "--workers", "2", "--gpus-per-worker", "1", "--ray-address",
        two_nodes.address, "--data", str(tiny_folder),
    )  # fmt: skip
    assert code == 2, stderr
    assert "--gpus-per-worker 1: no node of the Ray cluster" in stderr
    assert "(2 nodes) has more than 0 GPUs" in stderr
    assert not ray.is_initialized()  # the command left the cluster it joined
    assert not (workdir / "runs").exists()


@pytest.mark.parametrize(
    ("args", "gpus", "says"),
    [
        (["--workers", "2", "--ray-address", "local"], 1, "runs on a Ray cluster"),
        (["--workers", "2"], 2, "leave --gpus out"),
        (["--workers", "1", "--storage", "/nfs/r"], 1, "--workers 1 runs on the machine"),
        (["--workers", "0"], 1, "--workers must be at least 1"),
    ],
)
def test_bad_ray_train_options_of_a_queued_job_are_refused_at_submit(args, gpus, says, workdir):
    from dgan.errors import DganError
    from jobs.spec import build_spec

    with pytest.raises(DganError, match=says) as err:
        build_spec("train-gan", args, gpus=gpus, workdir=workdir)
    assert err.value.exit_code == 2
