"""`dgan ui`: the MLflow UI on the project's tracking store, and links straight to its run tables.

MLflow 3 opens an experiment on its GenAI overview; the runs table (where runs are compared) is
the "Model training" view, which `?workflowType=machine_learning` selects. Each link also sorts
the table by the metric a user compares first for that experiment, which brings its column in.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

from dgan.errors import DganError
from dgan.tracking.tracker import experiment_link


def experiment_links(tracking_uri: str, base: str) -> list[tuple[str, str, int]]:
    """(name, link, runs) for every experiment of the store that has runs."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    rows = []
    for exp in client.search_experiments():
        runs = len(client.search_runs([exp.experiment_id], max_results=1000))
        if runs:
            rows.append((exp.name, experiment_link(base, exp.experiment_id, exp.name), runs))
    return rows


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{url}/health", timeout=2) as response,
        ):
            if response.status == 200:
                return True
        time.sleep(0.5)
    return False


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_ui(
    tracking_uri: str | None, host: str, port: int, echo: Callable[[str], None] = print
) -> int:
    """Start `mlflow server` on the store, print the links, and wait; Ctrl-C stops it."""
    from dgan.tracking.tracker import store_uri

    uri = store_uri(tracking_uri)
    if uri.startswith(("http://", "https://")):
        raise DganError(
            f"{uri} is an MLflow server already: open it in a browser. dgan ui serves a local "
            "store (sqlite:///FILE or a directory); give one with --tracking-uri",
            exit_code=2,
        )
    if uri.startswith("sqlite:///") and not os.path.isfile(uri.removeprefix("sqlite:///")):
        raise DganError(
            f"no tracking store at {uri}: nothing was logged there yet. Run 'dgan demo' or "
            "'dgan train gan' first, or point --tracking-uri at the store you logged to",
            exit_code=2,
        )
    if not 1 <= port <= 65535:
        raise DganError(f"--port {port}: give a port between 1 and 65535", exit_code=2)
    if not _port_free(host, port):
        raise DganError(
            f"port {port} on {host} is in use (another UI?); stop it or choose --port", exit_code=2
        )
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", host, "--port", str(port), "--workers", "1"]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the server too
    try:
        if not _wait_ready(base, proc):
            raise DganError(
                f"the MLflow UI did not start on {base} (exit status {proc.poll()}); "
                f"its output is above. Try: {' '.join(cmd)}"
            )
        echo(f"MLflow UI on {base} (store {uri}); Ctrl-C stops it.")
        links = experiment_links(uri, base)
        if not links:
            echo("no runs logged yet")
        for name, link, runs in links:
            echo(f"  {name} ({runs} runs): {link}")
        if host in ("0.0.0.0", "::"):
            echo(f"  bound to {host}: every machine that can reach this one can open it")
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        _wait_group_gone(proc.pid, timeout=15)


def _wait_group_gone(group: int, timeout: float) -> None:
    """Return once no process of the server's group is left: its workers outlive the leader
    by a moment. Those still there at `timeout` are killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)
