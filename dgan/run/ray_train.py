"""One training job across the nodes of a Ray cluster, through Ray Train.

`train_on_ray` runs the same job as `launch_training` (the harness, the same `GanJob` or
`InspectorJob`) inside `ray.train.torch.TorchTrainer`:

- this process checks the inputs, the config, the data and a resumed checkpoint before Ray
  starts, joins the cluster (or starts a local Ray on 127.0.0.1 for the run), checks its
  resources and makes the run directory on storage every node sees;
- Ray starts one worker per `workers` on the nodes and sets up their process group (gloo on the
  CPU, nccl on GPUs) and the env a launcher sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
  ACCELERATE_TORCH_DEVICE);
- each worker builds its Accelerator as a launched process does (dgan.run.launch): Accelerate's
  PartialState finds torch.distributed already initialised and uses that group;
- the rank-0 worker's JobResult comes back as the train function's return value;
- Ctrl-C or SIGTERM here asks the workers to checkpoint and stop at their next log step
  (through a file in the run directory that the main worker's metrics callback reads).

Ray restarts nothing by itself (no worker or preemption retries): a failed or preempted run
resumes exactly from its latest checkpoint, as on one machine, when the job is started again with
`resume="latest"` (what the queue does).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dgan.errors import DganError
from dgan.events import ConsoleEvents, Events
from dgan.io import atomic_write_text
from dgan.run.result import Directive, JobResult

LOCAL = "local"  # start a Ray on this machine (127.0.0.1) for the run, stop it after
AUTO = "auto"  # the cluster `ray start` runs on this machine
WORKERS_FILE = "ray-workers.json"  # the run directory's record of where each rank ran
STOP_FILE = "ray-stop-request"  # written on Ctrl-C: the workers checkpoint and stop
CONNECT_TIMEOUT_S = 5.0


# ---------------------------------------------------------------------------------------------
# Checks before Ray starts
# ---------------------------------------------------------------------------------------------


def check_scaling(workers: int, gpus: int = 1, gpus_per_worker: int | None = None) -> None:
    """Refuse a worker count, a --gpus beside it, or a GPU count that cannot work."""
    if workers < 1:
        raise DganError(f"--workers must be at least 1, got {workers}", exit_code=2)
    if gpus > 1:
        raise DganError(
            f"--workers {workers} with --gpus {gpus}: on a Ray cluster the processes are the "
            "workers; give --workers N (and --gpus-per-worker G) and leave --gpus out",
            exit_code=2,
        )
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise DganError(
            f"--gpus-per-worker must be 0 (CPU workers) or more, got {gpus_per_worker}",
            exit_code=2,
        )


def resolve_address(address: str | None) -> str:
    """`address`, else $RAY_ADDRESS; DganError when neither names a cluster."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise DganError(
            "--workers runs the job on a Ray cluster, but none was named: pass --ray-address "
            "HOST:PORT (a cluster's head), 'auto' (the cluster 'ray start' runs on this "
            "machine) or 'local' (start one on this machine for this run), or set RAY_ADDRESS",
            exit_code=2,
        )
    return address


def _host_port(address: str) -> tuple[str, int]:
    bare = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = bare.rpartition(":")
    if not sep or not port.isdigit():
        raise DganError(
            f"--ray-address {address}: expected HOST:PORT (e.g. 10.0.0.5:6379), auto or local",
            exit_code=2,
        )
    return host.strip("[]"), int(port)


def check_reachable(address: str) -> None:
    """Fail in seconds, naming the address, when no Ray cluster answers there (ray.init itself
    keeps retrying for minutes)."""
    if address == LOCAL:
        return
    target = address
    if address == AUTO:
        from ray._private.utils import read_ray_address

        target = read_ray_address()
        if not target:
            raise DganError(
                "--ray-address auto: no Ray cluster was started on this machine ('ray start "
                "--head' records one); pass the head's HOST:PORT, or 'local' to start one for "
                "this run",
                exit_code=2,
            )
    host, port = _host_port(target)
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        raise DganError(
            f"--ray-address {address}: no Ray cluster answers at {host}:{port} ({err}). Start "
            "one ('ray start --head'), fix the address or RAY_ADDRESS, or use --ray-address "
            "local",
            exit_code=2,
        ) from None


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def own_addresses() -> set[str]:
    """This machine's IP addresses: loopback, its hostname's and every interface's."""
    own = {"127.0.0.1", "::1"}
    with contextlib.suppress(OSError):
        own |= set(socket.gethostbyname_ex(socket.gethostname())[2])
    with contextlib.suppress(ImportError):
        import psutil  # Ray's and Accelerate's dependency

        own |= {a.address for addrs in psutil.net_if_addrs().values() for a in addrs}
    return own


def head_is_elsewhere(address: str) -> bool:
    """True when `address` names a head on another machine: the cluster then surely spans
    machines (False when unsure, e.g. a name that does not resolve)."""
    if address in (LOCAL, AUTO):
        return False
    host = _host_port(address)[0]
    if is_loopback(host):
        return False
    try:
        ip = socket.gethostbyname(host)
    except OSError:
        return False
    return ip not in own_addresses()


def check_storage(storage: str | Path | None, address: str, spans_machines: bool) -> None:
    """Storage must be a filesystem path, and given when nodes run on other machines."""
    if storage is not None and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", str(storage)):
        raise DganError(
            f"--storage {storage}: give a filesystem path that every node mounts (NFS or "
            "another network filesystem); the run directory and its checkpoints are files",
            exit_code=2,
        )
    if storage is None and spans_machines:
        raise DganError(
            f"--ray-address {address}: the cluster has nodes on other machines, whose local "
            "disks the run directory and checkpoints cannot live on; give --storage PATH on "
            "storage every node mounts (e.g. an NFS share)",
            exit_code=2,
        )


def check_tracking(config, address: str, spans_machines: bool) -> str:
    """The config's MLflow URI, absolute; on a cluster that spans machines, a server's."""
    from dgan.tracking.tracker import store_uri

    uri = store_uri(config.log.tracking_uri)
    if spans_machines and not uri.startswith(("http://", "https://", "databricks")):
        raise DganError(
            f"--ray-address {address}: the main worker may run on another machine, where the "
            f"MLflow store {uri} is not; start an MLflow server and pass --tracking-uri "
            "http://HOST:PORT",
            exit_code=2,
        )
    return uri


# ---------------------------------------------------------------------------------------------
# The cluster
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def loopback_only(enabled: bool) -> Iterator[None]:
    """Keep Ray on 127.0.0.1 while it connects or starts: Ray otherwise rewrites a loopback
    address (and a local Ray's node address) to this machine's network address, where a
    cluster that listens on loopback does not answer."""
    if not enabled:
        yield
        return
    from ray._private import ray_constants

    name = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # read by ray_constants as ENABLE_RAY_CLUSTER
    before, env = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True), os.environ.get(name)
    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ[name] = "0"
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
        if env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = env


def connect(address: str, local_gpus: int = 0) -> Path | None:
    """Join the cluster at `address`, or with 'local' start a Ray on 127.0.0.1 with every CPU of
    this machine and `local_gpus` GPUs. Returns the local Ray's temp dir (to remove after
    ray.shutdown()), or None."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback Ray needs no token
    # Workers keep the driver's working directory: relative paths and ./mlruns mean the same.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Ray retries nothing here (a preempted run resumes from its checkpoint when started again),
    # so its preemption watcher, one more process per run, has nothing to do.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if address == LOCAL:
        # Socket paths under the temp dir must stay under 107 bytes: a short dir in /tmp.
        temp = Path(
            tempfile.mkdtemp(prefix="dgan-ray-", dir="/tmp" if Path("/tmp").is_dir() else None)
        )
        try:
            with loopback_only(True):
                ray.init(
                    address=LOCAL, num_cpus=os.cpu_count() or 1, num_gpus=local_gpus,
                    include_dashboard=False, _node_ip_address="127.0.0.1", _temp_dir=str(temp),
                    logging_level=logging.WARNING,
                )  # fmt: skip
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return temp
    target = address
    if address == AUTO:
        from ray._private.utils import read_ray_address

        target = read_ray_address() or address
    with loopback_only(is_loopback(_host_port(target)[0])):
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError) as err:
            raise DganError(f"--ray-address {address}: could not join the cluster: {err}") from None
    return None


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def on_this_machine(nodes: list[dict[str, Any]]) -> bool:
    """True when every node of the cluster runs on this machine (so they share its disk)."""
    import ray

    own = own_addresses() | {ray.util.get_node_ip_address()}
    return all(n.get("NodeManagerAddress") in own for n in nodes)


def check_resources(
    nodes: list[dict[str, Any]], workers: int, gpus_per_worker: int, address: str, events: Events
) -> None:
    """A worker (1 CPU, `gpus_per_worker` GPUs) must fit on some node; warn when all of them
    do not fit at once (Ray then waits for nodes, e.g. from an autoscaler)."""
    gpus = [n["Resources"].get("GPU", 0.0) for n in nodes]
    cpus = [n["Resources"].get("CPU", 0.0) for n in nodes]
    where = f"the Ray cluster at {address} ({len(nodes)} node{'s' * (len(nodes) != 1)})"
    if gpus_per_worker > max(gpus, default=0.0):
        raise DganError(
            f"--gpus-per-worker {gpus_per_worker}: no node of {where} has more than "
            f"{max(gpus, default=0.0):g} GPUs, so no worker could start; ask for at most that "
            "many, or --gpus-per-worker 0 for CPU workers",
            exit_code=2,
        )
    if max(cpus, default=0.0) < 1:
        raise DganError(f"no node of {where} offers a CPU for a worker", exit_code=2)
    fit = sum(
        min(int(c), int(g // gpus_per_worker) if gpus_per_worker else int(c))
        for c, g in zip(cpus, gpus, strict=True)
    )
    if fit < workers:
        events.warning(
            f"{where} holds {fit} of the {workers} workers now; the run starts when Ray finds "
            "room for all of them"
        )


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def cluster_config(config, storage: str | Path | None, uri: str, events: Events):
    """The config with every path absolute, the run root on `storage` (default: the config's)
    and the MLflow URI `uri`: workers may run in another directory, or on another machine."""
    from dgan.data import ensure_demo_dataset

    run_root = Path(storage if storage is not None else config.log.run_root)
    root = config.data.root
    root = ensure_demo_dataset(events=events) if root is None else root
    data = config.data.model_copy(update={"root": Path(root).resolve()})
    log = config.log.model_copy(
        update={"run_root": run_root.expanduser().resolve(), "tracking_uri": uri}
    )
    return config.model_copy(update={"data": data, "log": log})


def check_resumable(job_type, config, checkpoint: Path) -> None:
    """Refuse a checkpoint from an incompatible config here, before Ray starts, with the keys
    that differ (the workers check it again, with the data's classes)."""
    import torch

    from dgan.run.harness import check_compatible

    try:  # mmap: the config fields are read, the weights stay on disk
        state = torch.load(
            checkpoint / "state.pt", map_location="cpu", weights_only=True, mmap=True
        )
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise DganError(f"{checkpoint} is not a readable checkpoint: {err}") from None
    check_compatible(state, config, state.get("classes"), job_type.resumable_keys, checkpoint)


def train_on_ray(
    job_type,
    config,
    resume: str | None = None,
    workers: int = 2,
    gpus_per_worker: int | None = None,
    address: str | None = None,
    storage: str | Path | None = None,
    run_name: str | None = None,
    events: Events | None = None,
    stop_at: int | None = None,
    tags: dict[str, str] | None = None,
    check_data: bool = True,
    quiet: bool = False,
) -> JobResult:
    """Train `job_type` on `workers` Ray Train workers; returns the result `launch_training`
    would (see the module docstring).

    `address`: HOST:PORT, 'auto', 'local' (a Ray on 127.0.0.1 for this run), default
    $RAY_ADDRESS. `gpus_per_worker`: default 1 on a cluster with GPUs, else 0 (CPU workers,
    gloo). `storage`: the run root, a path every node mounts; default the config's
    `log.run_root` when all nodes run on this machine, required otherwise. `resume`, `stop_at`,
    `tags`, `check_data` and `quiet` are launch_training's.
    """
    from dgan.run.launch import check_run, create_run_dir

    check_scaling(workers, 1, gpus_per_worker)
    address = resolve_address(address)
    elsewhere = head_is_elsewhere(address)
    check_storage(storage, address, elsewhere)
    uri = check_tracking(config, address, elsewhere)
    check_reachable(address)
    events = events or ConsoleEvents(quiet)
    config = cluster_config(config, storage, uri, events)
    config, resume_path = check_run(job_type, config, resume, check_data, events)
    if resume_path is not None:
        check_resumable(job_type, config, resume_path)
    import ray

    joined = not ray.is_initialized()
    temp = None
    try:
        if joined:
            local_gpus = 0
            if address == LOCAL and gpus_per_worker != 0:
                import torch

                local_gpus = torch.cuda.device_count()
            temp = connect(address, local_gpus)
        nodes = alive_nodes()
        if gpus_per_worker is None:
            gpus_per_worker = 1 if any(n["Resources"].get("GPU", 0) for n in nodes) else 0
        check_resources(nodes, workers, gpus_per_worker, address, events)
        spans = address != LOCAL and not on_this_machine(nodes)
        check_storage(storage, address, spans)
        check_tracking(config, address, spans)
        run_dir, resume_path = create_run_dir(
            job_type, config, resume_path, run_name or job_type.kind, tags
        )
        events.info(
            f"{run_dir}: {workers} Ray Train worker{'s' * (workers != 1)} with "
            f"{gpus_per_worker} GPU{'s' * (gpus_per_worker != 1)} each on {len(nodes)} "
            f"node{'s' * (len(nodes) != 1)}"
        )
        setup = {
            "job_type": job_type,
            # The config itself, not the run directory's: a resume that changes what a resume
            # may change (paths, logging) takes effect, and one that changes more is refused.
            "config": config,
            "run_dir": str(run_dir),
            "resume": None if resume_path is None else str(resume_path),
            "stop_at": stop_at,
            "workers": workers,
            "gpus_per_worker": gpus_per_worker,
            "workdir": os.getcwd(),
            "local": address == LOCAL,
            "quiet": True,  # workers' output reaches this terminal as plain lines
        }
        return fit(setup, run_dir, workers, gpus_per_worker, events)
    finally:
        if joined and ray.is_initialized():
            ray.shutdown()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def fit(
    setup: dict[str, Any], run_dir: Path, workers: int, gpus_per_worker: int, events: Events
) -> JobResult:
    """Run `train_worker` on the workers through TorchTrainer; the rank-0 worker's result.
    Ctrl-C or SIGTERM: the workers checkpoint and stop at their next log step (JobInterrupted)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError

    from dgan.run import checkpoint as ckpt
    from dgan.run.result import JobInterrupted

    stop = run_dir / STOP_FILE
    stop.unlink(missing_ok=True)
    resources = {"CPU": 1, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    trainer = trainer_class(setup["local"])(
        train_worker,
        train_loop_config=setup,
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=gpus_per_worker > 0, resources_per_worker=resources
        ),
        # Ray's own files (its run state, worker logs' index) beside the run's, on the same
        # storage; a restart is the caller's (resume="latest"), never Ray's.
        run_config=RunConfig(
            name="ray",
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=0, max_preemption_failures=0),
        ),
    )
    with restored_handlers():
        try:
            outcome = trainer.fit()
        except TrainingFailedError as err:
            raise worker_error(err, run_dir) from None
    stopping = stop.exists()
    stop.unlink(missing_ok=True)
    result = JobResult.from_dict(outcome.return_value) if outcome.return_value else None
    if result is None:  # aborted by a second Ctrl-C
        ckpt.write_status(run_dir, state="interrupted")
        raise DganError(
            f"the Ray Train job in {run_dir} was stopped without a checkpoint; continue from "
            f"the last one with --resume {run_dir}",
            exit_code=130,
        )
    if stopping and result.state == "paused":  # at the checkpoint that Ctrl-C asked for
        ckpt.write_status(run_dir, state="interrupted")
        result.state = "interrupted"
        result.write(run_dir)
        events.info(
            f"interrupted at {result.step}; saved {result.checkpoint}. "
            f"Continue with --resume {run_dir}"
        )
        raise JobInterrupted(result)
    return result


def trainer_class(local: bool = False):
    """TorchTrainer whose Ctrl-C (and SIGTERM, a queue's stop) asks the workers to checkpoint
    and stop: Ray's own handler aborts them at once, losing the steps since the last checkpoint,
    which a second Ctrl-C still does. Ray installs its handler only in the main thread.

    `local`: a Ray of this run alone, without the dashboard whose state API Ray's placement group
    cleaner polls every second (warning each time); it goes down with this process anyway."""
    import signal

    import ray
    from ray.train.torch import TorchTrainer

    class StoppableTrainer(TorchTrainer):
        def _register_sigint_handler(self, controller) -> None:
            stop = Path(self.run_config.storage_path) / STOP_FILE

            def handler(signum, frame) -> None:
                if stop.exists():
                    print("stopping now, without a checkpoint", file=sys.stderr, flush=True)
                    with contextlib.suppress(ray.exceptions.RayActorError):
                        ray.get(controller.abort.remote())
                    return
                atomic_write_text(stop, "stop\n")
                print(
                    "stopping: the workers checkpoint at their next log step (Ctrl-C again "
                    "stops at once, losing the steps since the last checkpoint)",
                    file=sys.stderr,
                    flush=True,
                )

            signal.signal(signal.SIGINT, handler)
            signal.signal(signal.SIGTERM, handler)

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            if not local:
                return callbacks
            return [c for c in callbacks if type(c).__name__ != "PlacementGroupCleanerCallback"]

    if not hasattr(TorchTrainer, "_register_sigint_handler"):  # another Ray: its own handler
        return TorchTrainer
    return StoppableTrainer


@contextlib.contextmanager
def restored_handlers() -> Iterator[None]:
    """Put back the SIGINT and SIGTERM handlers that the trainer replaces."""
    import signal

    main = threading.current_thread() is threading.main_thread()
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def worker_error(err, run_dir: Path) -> DganError:
    """A worker's DganError as it is (bad data, a diverged run, an incompatible checkpoint),
    anything else as one line that names the run and its state."""
    from dgan.run import checkpoint as ckpt

    failures = getattr(err, "worker_failures", {}) or {}
    for rank in sorted(failures):
        cause = failures[rank]
        while cause is not None and not isinstance(cause, DganError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, DganError):
            return cause
    state = ckpt.read_status(run_dir).get("state", "unknown")
    first = next(iter(failures.values()), err)
    lines = str(first).strip().splitlines()
    return DganError(
        f"the Ray Train job in {run_dir} failed (state: {state}): "
        f"{lines[-1] if lines else type(first).__name__}. Ray's worker output is above; "
        f"continue from the last checkpoint with --resume {run_dir}"
    )


def train_worker(setup: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker: the job on the config in its run directory, as a launched process
    runs it (dgan.run.launch.training_worker). Returns the result on rank 0."""
    from dgan.run.launch import training_worker

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if setup["gpus_per_worker"] == 0:
        os.environ["ACCELERATE_USE_CPU"] = "1"  # CPU workers on a node with GPUs stay on the CPU
    if Path(setup["workdir"]).is_dir():  # the driver's directory, when this node has it
        os.chdir(setup["workdir"])
    run_dir = Path(setup["run_dir"])
    record_placement(run_dir)
    resume = Path(setup["resume"]) if setup["resume"] else None
    events = ConsoleEvents(setup["quiet"])
    stop = run_dir / STOP_FILE

    def stop_when_asked(report) -> Directive | None:
        return Directive.STOP if stop.exists() else None

    result = training_worker(
        setup["job_type"], run_dir, setup["workers"], events, resume, setup["stop_at"],
        setup["config"], stop_when_asked,
    )  # fmt: skip
    import ray.train

    return result.to_dict() if ray.train.get_context().get_world_rank() == 0 else None


def record_placement(run_dir: Path) -> None:
    """Rank 0 writes RUN/ray-workers.json: the node, address, pid and device of every rank."""
    import json

    import ray
    import torch
    import torch.distributed as dist

    context = ray.train.get_context()
    mine = {
        "rank": context.get_world_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "device": os.environ.get("ACCELERATE_TORCH_DEVICE", "cpu"),
        "backend": dist.get_backend() if dist.is_initialized() else None,
    }
    everyone: list[Any] = [None] * context.get_world_size()
    if mine["device"].startswith("cuda"):  # nccl gathers through this worker's own GPU
        torch.cuda.set_device(torch.device(mine["device"]))
    if dist.is_initialized():
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    if mine["rank"] == 0:
        atomic_write_text(run_dir / WORKERS_FILE, json.dumps(everyone, indent=2) + "\n")
