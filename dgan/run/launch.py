"""Start any job on 1..N processes without the user writing an accelerate config.

- one process: in this process;
- `--gpus N`: this process validates the config, checks the data and creates the run directory,
  then starts N workers through Accelerate's launcher (`python -m dgan.run.launch`); the main
  worker hands its JobResult back through RUN/result.json;
- under a launcher the user started (`accelerate launch`, `torchrun`): every process runs the job;
  the main one creates the run directory and the others receive its path.

On a machine without GPUs, N processes run DDP over gloo: ACCELERATE_USE_CPU=1 with --multi_gpu,
since `--cpu --num_processes N` silently starts one process. The job checks the count.

The jobs: "gan" (dgan.train.gan), "inspector" (dgan.train.inspector), "synth" (dgan.synth.run).
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dgan.config import load_config, to_yaml
from dgan.errors import DganError
from dgan.events import ConsoleEvents, Events
from dgan.io import atomic_write_text
from dgan.run import checkpoint as ckpt
from dgan.run.result import Callback, JobResult

T = TypeVar("T")
# Job kind -> the module whose `worker(run_dir, accelerator, events, resume, stop_at)` runs it
# in a launched process, and the command a user types for it.
JOBS = {
    "gan": ("dgan.train.gan", "train gan"),
    "inspector": ("dgan.train.inspector", "train inspector"),
    "synth": ("dgan.synth.run", "synth"),
}


def under_launcher() -> bool:
    """True when a distributed launcher started this process with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_accelerator(kind: str, mixed_precision: str, expected_processes: int | None):
    """An Accelerator for 1..N processes; the process count is checked, not assumed."""
    import torch
    from accelerate import Accelerator

    # G, D and the inspector keep no buffers that DDP must sync between forwards.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)
    if expected_processes is not None and accelerator.num_processes != expected_processes:
        raise DganError(
            f"asked for {expected_processes} processes but the launcher started "
            f"{accelerator.num_processes}. On a CPU-only machine use 'dgan {JOBS[kind][1]} "
            "--gpus N' (it sets ACCELERATE_USE_CPU=1 and --multi_gpu), or torchrun "
            "--nproc_per_node N."
        )
    if accelerator.num_processes > 1:
        atexit.unregister(close_process_group)  # once, however many jobs this process runs
        atexit.register(close_process_group)
    return accelerator


def close_process_group() -> None:
    """Destroy the default process group if one is open. Each process of a multi-process job
    runs this at exit (make_accelerator registers it): a gloo group left open can abort the
    process (SIGABRT, "terminate called without an active exception") while the interpreter
    tears down and gloo's threads still hold work. The group stays open between jobs, so one
    process can run several."""
    dist = sys.modules.get("torch.distributed")  # no group is open if it was never imported
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def main_only(events: Events, accelerator) -> Events:
    """The main process speaks; the others say nothing."""
    return events if accelerator.is_main_process else Events()


def prepare_on_main(accelerator, prepare: Callable[[], T]) -> T:
    """Run `prepare` on the main process only and hand its result, or its DganError, to all."""
    from accelerate.utils import broadcast_object_list

    shared: list = [None]
    if accelerator.is_main_process:
        try:
            shared[0] = prepare()
        except DganError as err:
            shared[0] = err
    broadcast_object_list(shared)
    if isinstance(shared[0], DganError):
        raise shared[0]
    return shared[0]


def check_run(
    job_type, config, resume: str | None, check_data: bool = True, events: Events | None = None
) -> tuple[Any, Path | None]:
    """Check everything before any work: returns (config with data.root resolved, checkpoint to
    resume or None).

    `job_type` (a TrainingJob subclass) checks what is its own: `check_config` before any data
    is made, `check_data` once the data root is resolved.
    """
    from dgan.data import ensure_demo_dataset

    config = job_type.check_config(config)
    resume_path = None
    if resume is not None:
        resume_path = ckpt.resolve_resume(resume, config.log.run_root, job_type.kind)
    if config.data.root is None:
        data = config.data.model_copy(update={"root": ensure_demo_dataset(events=events)})
        config = config.model_copy(update={"data": data})
    start = ckpt.checkpoint_iteration(resume_path) if resume_path is not None else 0
    job_type.check_data(config, start, check_data)
    return config, resume_path


def create_run_dir(
    job_type, config, resume_path: Path | None, run_name: str, tags=None
) -> tuple[Path, Path | None]:
    """The run directory of a checked run (check_run): the checkpoint's, or a new one with its
    config.yaml and status.json. Returns (run directory, checkpoint to resume or None)."""
    if resume_path is not None:
        return resume_path.parent.parent, resume_path
    run_dir = ckpt.new_run_dir(config.log.run_root, job_type.kind, run_name)
    atomic_write_text(run_dir / "config.yaml", to_yaml(config))
    ckpt.write_status(run_dir, state="created", mlflow_tags=dict(tags or {}))
    return run_dir, None


def prepare_run(
    job_type,
    config,
    resume: str | None,
    run_name: str,
    check_data: bool = True,
    tags=None,
    events: Events | None = None,
) -> tuple[Any, Path, Path | None]:
    """Check everything before any work (check_run), then make the run directory
    (create_run_dir). Returns (config with data.root resolved, run directory, checkpoint to
    resume or None). `tags` go onto its MLflow run.
    """
    config, resume_path = check_run(job_type, config, resume, check_data, events)
    return config, *create_run_dir(job_type, config, resume_path, run_name, tags)


def launch_training(
    job_type,
    config,
    resume: str | None = None,
    gpus: int = 1,
    run_name: str | None = None,
    events: Events | None = None,
    callback: Callback | None = None,
    stop_at: int | None = None,
    tags: dict[str, str] | None = None,
    check_data: bool = True,
    quiet: bool = False,
    schedule_changes: bool = False,
) -> JobResult:
    """Train `job_type` on `gpus` processes (see the module docstring); returns its result.

    `resume`: 'latest', a run directory or a checkpoint. `events`: where the job speaks (default:
    the console, a live line unless `quiet`). `callback` receives every log, evaluation and
    checkpoint (dgan.run.result.Report) and may answer Directive.CHECKPOINT or STOP; it runs in
    this process, so it needs the job here: one process, or every process of a launcher the user
    started. `stop_at` pauses the run (TrainingJob.pause_step). `tags` go onto its MLflow run.
    `check_data=False` skips decoding every image before the run. `schedule_changes=True` lets
    `resume` take a checkpoint whose config differs in the job's `schedulable_keys` (a Ray Tune
    PBT exploit); the CLI's --resume never sets it.
    """
    from dgan.run.harness import run_training

    if gpus < 1:
        raise DganError(f"--gpus must be at least 1, got {gpus}", exit_code=2)
    events = events or ConsoleEvents(quiet)
    run_name = run_name or job_type.kind

    def prepare():
        return prepare_run(job_type, config, resume, run_name, check_data, tags, events)

    if under_launcher():
        accelerator = make_accelerator(
            job_type.kind, config.train.mixed_precision, int(os.environ["WORLD_SIZE"])
        )
        config, run_dir, resume_path = prepare_on_main(accelerator, prepare)
        events = main_only(events, accelerator)
        job = job_type(config, accelerator, events)
        return run_training(
            job, run_dir, accelerator, events, resume_path, callback, stop_at, schedule_changes
        )
    config, run_dir, resume_path = prepare()
    if gpus == 1:
        accelerator = make_accelerator(job_type.kind, config.train.mixed_precision, None)
        job = job_type(config, accelerator, events)
        return run_training(
            job, run_dir, accelerator, events, resume_path, callback, stop_at, schedule_changes
        )
    if schedule_changes:
        raise DganError(
            "schedule_changes (a scheduler's resume) needs the job in the calling process; with "
            "gpus > 1 start the job under torchrun or accelerate launch",
            exit_code=2,
        )
    if callback is not None:
        raise DganError(
            "a metrics callback runs in the calling process; with gpus > 1 start the job under "
            "torchrun or accelerate launch and pass the callback in every process",
            exit_code=2,
        )
    extra = ["--resume", str(resume_path)] if resume_path is not None else []
    extra += ["--quiet"] if quiet else []
    extra += ["--stop-at", str(stop_at)] if stop_at is not None else []
    return spawn_workers(job_type.kind, run_dir, gpus, config.train.mixed_precision, extra)


def spawn_workers(
    kind: str, run_dir: Path, gpus: int, mixed_precision: str, extra: list[str]
) -> JobResult:
    """Run job `kind` on the config in `run_dir` on `gpus` processes through Accelerate's
    launcher; returns the result the main worker wrote."""
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(gpus), "--num_machines", "1",
        "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "dgan.run.launch", "--job", kind, "--run-dir", str(run_dir),
        "--expected-processes", str(gpus), *extra,
    ]  # fmt: skip
    (Path(run_dir) / "result.json").unlink(missing_ok=True)
    returncode = subprocess.run(cmd, env=env).returncode
    result = JobResult.read(run_dir)
    if returncode != 0 or result is None:
        state = ckpt.read_status(run_dir).get("state", "unknown")
        raise DganError(
            f"the {gpus}-process {kind} job in {run_dir} exited with code {returncode} "
            f"(state: {state}); its output is above.",
            exit_code=130 if returncode == 130 else 1,
        )
    return result


def _worker_main(argv: list[str] | None = None) -> int:
    """Entry of each worker that `spawn_workers` starts: the job reads its run directory."""
    parser = argparse.ArgumentParser(prog="python -m dgan.run.launch")
    parser.add_argument("--job", choices=sorted(JOBS), required=True)
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--expected-processes", type=int, required=True)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--stop-at", type=int)
    args = parser.parse_args(argv)
    module = importlib.import_module(JOBS[args.job][0])
    events = ConsoleEvents(args.quiet)
    try:
        module.worker(args.run_dir, args.expected_processes, events, args.resume, args.stop_at)
    except DganError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


def training_worker(
    job_type, run_dir: Path, processes: int, events, resume, stop_at, config=None, callback=None
) -> JobResult:
    """A launched process of a training job: the config is `config`, else the run directory's.
    `callback` is run_training's (it runs on the main process)."""
    from dgan.run.harness import run_training

    if config is None:
        config = load_config(job_type.kind, [str(Path(run_dir) / "config.yaml")])
    accelerator = make_accelerator(job_type.kind, config.train.mixed_precision, processes)
    events = main_only(events, accelerator)
    job = job_type(config, accelerator, events)
    return run_training(job, run_dir, accelerator, events, resume, callback, stop_at)


def _exit_worker(code: int) -> None:
    """End a launched worker with `code`. A worker other than rank 0 has written all it writes
    when its job returns, and leaves by os._exit once its process group is closed and its data
    loader's processes are stopped: a CPU worker has been seen to abort (SIGABRT, "terminate
    called without an active exception") in the interpreter's and C++'s teardown after a finished
    run, which failed the whole launch. Rank 0 exits normally, so that what runs at its exit
    (MLflow's, for one) still runs."""
    if int(os.environ.get("RANK", "0")) == 0:
        sys.exit(code)
    import gc

    close_process_group()
    gc.collect()  # a data loader's iterator left in a cycle stops its worker processes here
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_worker(_worker_main())
