"""Start a training job on 1..N processes without the user writing an accelerate config.

- one process: in this process;
- `--gpus N`: this process validates the config, checks the data and creates the run directory,
  then starts N workers through Accelerate's launcher (`python -m dgan.train.launch`);
- under a launcher the user started (`accelerate launch`, `torchrun`): every process runs the job;
  the main one creates the run directory and the others receive its path.

On a machine without GPUs, N processes run DDP over gloo: ACCELERATE_USE_CPU=1 with --multi_gpu,
since `--cpu --num_processes N` silently starts one process. The trainer checks the count.
"""

from __future__ import annotations

import argparse
import importlib
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from dgan.config import GanConfig, load_config, to_yaml
from dgan.errors import DganError
from dgan.io import atomic_write_text
from dgan.train import checkpoint as ckpt

T = TypeVar("T")
# The jobs a worker can run: config name -> module with make_accelerator(config, n) and trainer.
TRAINERS = {
    "gan": ("dgan.train.gan", "train_gan"),
    "inspector": ("dgan.train.inspector", "train_inspector"),
}


def under_launcher() -> bool:
    """True when a distributed launcher started this process with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_run(
    config: GanConfig, resume: str | None, run_name: str
) -> tuple[GanConfig, Path, Path | None]:
    """Check everything before any work: data usable, resume target valid. Then make the run dir.

    Returns (config with data.root resolved, run directory, checkpoint to resume or None).
    """
    from dgan.data import ensure_demo_dataset
    from dgan.data.check import require_usable

    resume_path = None
    if resume is not None:
        resume_path = ckpt.resolve_resume(resume, config.log.run_root, "gan")
    if config.data.root is None:
        config = config.model_copy(
            update={"data": config.data.model_copy(update={"root": ensure_demo_dataset()})}
        )
    index = require_usable(config.data.root)
    if config.data.classes:
        from dgan.data.loader import select_classes

        select_classes(index, config.data.classes)
    from dgan.train.gan import evaluation_due

    start = ckpt.checkpoint_iteration(resume_path) if resume_path is not None else 0
    if evaluation_due(config, start):
        from dgan.evaluation import check_evaluation

        check_evaluation(config, index)
    if resume_path is not None:
        return config, resume_path.parent.parent, resume_path
    run_dir = ckpt.new_run_dir(config.log.run_root, "gan", run_name)
    atomic_write_text(run_dir / "config.yaml", to_yaml(config))
    ckpt.write_status(run_dir, state="created")
    return config, run_dir, None


def run_gan(
    config: GanConfig,
    resume: str | None = None,
    gpus: int = 1,
    quiet: bool = False,
    run_name: str = "gan",
    stop_at: int | None = None,
) -> Path:
    """Train Defect-GAN on `gpus` processes (see module docstring). Returns the run directory.

    `stop_at` pauses the run at that iteration with a checkpoint (see train_gan).
    """
    if gpus < 1:
        raise DganError(f"--gpus must be at least 1, got {gpus}", exit_code=2)
    if under_launcher():
        return _run_in_launched_process(config, resume, quiet, run_name, stop_at)
    config, run_dir, resume_path = prepare_run(config, resume, run_name)
    if gpus == 1:
        from dgan.train.gan import train_gan

        return train_gan(config, run_dir, resume_path, quiet=quiet, stop_at=stop_at)
    spawn_workers("gan", run_dir, resume_path, gpus, config.train.mixed_precision, quiet, stop_at)
    return run_dir


def spawn_workers(
    job: str,
    run_dir: Path,
    resume: Path | None,
    gpus: int,
    mixed_precision: str,
    quiet: bool,
    stop_at: int | None,
) -> None:
    """Run `job` from the config in `run_dir` on `gpus` processes through Accelerate's launcher.

    `stop_at` is passed to the trainer (an iteration for the GAN, an epoch for the inspector).
    """
    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(gpus), "--num_machines", "1",
        "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
        "--main_process_port", str(free_port()),
        "-m", "dgan.train.launch", "--job", job, "--run-dir", str(run_dir),
        "--expected-processes", str(gpus),
    ]  # fmt: skip
    if resume is not None:
        cmd += ["--resume", str(resume)]
    if quiet:
        cmd.append("--quiet")
    if stop_at is not None:
        cmd += ["--stop-at", str(stop_at)]
    result = subprocess.run(cmd, env=env)
    if result.returncode != 0:
        status = ckpt.read_status(run_dir).get("state", "unknown")
        raise DganError(
            f"the {gpus}-process run in {run_dir} exited with code {result.returncode} "
            f"(state: {status}); its output is above."
        )


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


def _run_in_launched_process(
    config: GanConfig, resume: str | None, quiet: bool, run_name: str, stop_at: int | None
) -> Path:
    from dgan.train.gan import make_accelerator, train_gan

    accelerator = make_accelerator(config, int(os.environ["WORLD_SIZE"]))
    prepared = prepare_on_main(accelerator, lambda: prepare_run(config, resume, run_name))
    config, run_dir, resume_path = prepared
    return train_gan(
        config, run_dir, resume_path, accelerator=accelerator, quiet=quiet, stop_at=stop_at
    )


def _worker_main(argv: list[str] | None = None) -> int:
    """Entry of each worker that `spawn_workers` starts: the config comes from the run directory."""
    parser = argparse.ArgumentParser(prog="python -m dgan.train.launch")
    parser.add_argument("--job", choices=sorted(TRAINERS), default="gan")
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--resume", type=Path)
    parser.add_argument("--expected-processes", type=int, required=True)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--stop-at", type=int)
    args = parser.parse_args(argv)
    module_name, trainer_name = TRAINERS[args.job]
    module = importlib.import_module(module_name)
    train = getattr(module, trainer_name)

    try:
        config = load_config(args.job, [str(args.run_dir / "config.yaml")])
        accelerator = module.make_accelerator(config, args.expected_processes)
        train(
            config,
            args.run_dir,
            args.resume,
            accelerator=accelerator,
            quiet=args.quiet,
            stop_at=args.stop_at,
        )
    except DganError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main())
