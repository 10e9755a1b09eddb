"""`dgan demo` end to end at a tiny size, its rerun, and `dgan ui` on the store it filled."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dgan.data.demo import generate_demo

REPO = Path(__file__).resolve().parents[1]
TINY = ["--iterations", "12", "--epochs", "1", "--n", "24", "--eval-n", "24", "--no-realism"]


def _dgan(workdir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("DGAN_JOBS_DB", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=workdir, env=env, capture_output=True,
        text=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    workdir = tmp_path_factory.mktemp("demo")
    generate_demo(workdir / "data" / "demo", n_normal=160, n_defect=80, size=32, workers=1)
    return workdir, _dgan(workdir, "demo", *TINY, "--quiet")


@pytest.mark.slow
def test_the_demo_runs_every_step_through_the_queue_and_prints_a_summary(demo_dir):
    workdir, done = demo_dir
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    for step in range(1, 8):
        assert f"== {step}/7" in out
    state = json.loads((workdir / "runs" / "demo" / "demo.json").read_text())
    assert state["champion"]["version"] == state["gan"]["version"] == "1"
    # Step 6 went through the queue: three jobs on queue demo, each succeeded once.
    listed = _dgan(workdir, "jobs", "list", "--queue", "demo")
    assert listed.returncode == 0, listed.stderr
    assert "3 jobs; in the queue: 3 succeeded" in listed.stdout
    synth_new = Path(state["queue"]["synth_new_surface"])
    assert len(list((synth_new / "defect").glob("*.png"))) == 24
    # Its defects are painted on the new surface's normals of the held-out family only.
    surface = Path(state["data"]["new_surface"])
    with open(surface / "labels.csv") as f:
        family = {surface / r["file"]: r["family"] for r in csv.DictReader(f)}
    with open(synth_new / "manifest.csv") as f:
        sources = {Path(r["source_normal"]) for r in csv.DictReader(f)}
    assert {family[p] for p in sources} == {"warm_weathered"}
    # Both inspectors scored on the test split and on the held-out family.
    accuracy = state["score"]["accuracy"]
    assert set(accuracy) == {"real only", "real + synthetic"}
    assert all(0.0 <= v <= 1.0 for row in accuracy.values() for v in row.values())
    summary = (workdir / "runs" / "demo" / "summary.md").read_text()
    assert "held-out family" in summary and "real + synthetic" in summary
    assert summary.strip() in out
    # The trainers say where to compare their runs: the Model training view of the experiment.
    assert "compare runs: dgan ui, then http://127.0.0.1:5000/#/experiments/" in out
    for where in ("sample grid:", "the queue's jobs: dgan jobs list --queue demo", "dgan ui"):
        assert where in out


@pytest.mark.slow
def test_a_rerun_skips_the_steps_that_are_done_and_redoes_one_whose_output_is_gone(demo_dir):
    workdir, done = demo_dir
    assert done.returncode == 0, done.stderr[-3000:]
    state_file = workdir / "runs" / "demo" / "demo.json"
    before = json.loads(state_file.read_text())
    # The evaluation report is gone (as after an interruption): only that step runs again.
    Path(before["evaluate"]["report"]).unlink()
    again = _dgan(workdir, "demo", *TINY, "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done before, skipped") == 6
    assert "== 4/7 evaluate the generator\n" in again.stdout
    after = json.loads(state_file.read_text())
    assert after["gan"] == before["gan"] and after["queue"] == before["queue"]
    assert len(list((workdir / "runs" / "gan").iterdir())) == 1  # no second training run
    assert Path(after["evaluate"]["report"]).is_file()


@pytest.mark.slow
def test_training_runs_log_their_data_as_an_mlflow_dataset_input_with_its_hash(demo_dir):
    import mlflow

    workdir, done = demo_dir
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("defect-gan")
    (run,) = client.search_runs([exp.experiment_id])
    (entry,) = run.inputs.dataset_inputs
    assert entry.dataset.name == "demo"
    assert run.data.tags["dgan.dataset_hash"].startswith(entry.dataset.digest)
    assert json.loads(entry.dataset.source)["uri"] == str((workdir / "data" / "demo").resolve())
    assert {t.key: t.value for t in entry.tags}["mlflow.data.context"] == "training"


def _free_port() -> int:
    from dgan.run.launch import free_port

    return free_port()


@pytest.mark.slow
def test_ui_serves_the_store_on_localhost_links_each_experiment_and_stops_with_its_server(
    demo_dir,
):
    workdir, done = demo_dir
    assert done.returncode == 0, done.stderr[-3000:]
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "ui", "--port", str(port)], cwd=workdir, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        wanted = ("defect-gan (", "defect-inspector (")
        while time.monotonic() < deadline and not all(any(w in x for x in lines) for w in wanted):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        text = "".join(lines)
        assert f"MLflow UI on http://127.0.0.1:{port}" in text, text[-3000:]
        link = next(x.split(": ", 1)[1].strip() for x in lines if "defect-gan (" in x)
        assert link.startswith(f"http://127.0.0.1:{port}/#/experiments/")
        assert "workflowType=machine_learning" in link
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            assert response.status == 200
        server = [
            int(pid) for pid in os.listdir("/proc") if pid.isdigit()
            and f"--port\0{port}\0".encode() in _cmdline(pid) and b"mlflow" in _cmdline(pid)
        ]  # fmt: skip
        assert server, "no mlflow server process found"
        group = os.getpgid(server[0])  # the server and its workers: one process group
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        time.sleep(1)
        assert not _group_members(group)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # the CLI stops its server
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _group_members(group: int) -> list[int]:
    members = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) == group:
                members.append(int(pid))
        except ProcessLookupError:
            pass
    return members


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_ui_refuses_a_store_that_does_not_exist_and_a_busy_port(tmp_path):
    missing = _dgan(tmp_path, "ui", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}")
    assert missing.returncode == 2
    assert "no tracking store" in missing.stderr and "Traceback" not in missing.stderr
    import socket

    (tmp_path / "mlflow.db").write_bytes(b"")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = _dgan(tmp_path, "ui", "--port", str(port))
    assert taken.returncode == 2
    assert f"port {port}" in taken.stderr and "in use" in taken.stderr


def test_demo_refuses_bad_sizes_before_doing_anything(tmp_path):
    bad = _dgan(tmp_path, "demo", "--n", "0")
    assert bad.returncode == 2
    assert "--n must be at least 1" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


@pytest.mark.slow
def test_the_gpu_check_step_benchmark_runs_and_prints_both_batches_on_the_cpu(tmp_path):
    script = REPO / "benchmarks" / "gpu_check.py"
    args = ["--preset", "demo", "--size", "32", "--width", "8", "--max-batch", "8"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(script), *args, "--cycles", "1", "--precision", "no"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fp32  batch    4:" in done.stdout and "largest batch that fits" in done.stdout
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")]).returncode == 0
