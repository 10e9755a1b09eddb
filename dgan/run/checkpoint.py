"""Run directories and checkpoints, shared by the GAN and inspector trainers.

    runs/<job>/00007-<name>/
        config.yaml          the resolved config
        status.json          running | finished | interrupted | failed, MLflow run id
        checkpoints/iter-00001000/{state.pt, rng-0.pt, rng-1.pt...}
        samples/             sample grids

A checkpoint directory is written under a temp name and renamed when complete, so a listed
checkpoint is always whole. Loading uses `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from dgan.errors import DganError
from dgan.io import atomic_write_text

CKPT_RE = re.compile(r"^iter-(\d{8})$")
RUN_RE = re.compile(r"^(\d{5})-")


def new_run_dir(run_root: Path, job: str, name: str) -> Path:
    """Create runs/<job>/<NNNNN>-<name>, numbered after the highest existing run."""
    parent = Path(run_root) / job
    parent.mkdir(parents=True, exist_ok=True)
    numbers = [int(m.group(1)) for p in parent.iterdir() if (m := RUN_RE.match(p.name))]
    for number in range(max(numbers, default=-1) + 1, max(numbers, default=-1) + 100):
        path = parent / f"{number:05d}-{name}"
        try:
            path.mkdir()
            return path
        except FileExistsError:  # another process took the number
            continue
    raise DganError(f"could not create a run directory under {parent}")


def read_status(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "status.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def write_status(run_dir: Path, **fields: Any) -> None:
    """Merge `fields` into status.json, atomically."""
    status = read_status(run_dir) | fields
    atomic_write_text(Path(run_dir) / "status.json", json.dumps(status, indent=2) + "\n")


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if CKPT_RE.match(p.name) and (p / "state.pt").is_file()]
    return sorted(found)


def checkpoint_iteration(path: Path) -> int:
    return int(CKPT_RE.match(path.name).group(1))


def resolve_resume(resume: str, run_root: Path, job: str) -> Path:
    """`latest`: the newest checkpoint of the newest run that has one; else a checkpoint or run."""
    if resume == "latest":
        runs = sorted((Path(run_root) / job).glob("[0-9]*-*"), reverse=True)
        for run in runs:
            if ckpts := list_checkpoints(run):
                return ckpts[-1]
        raise DganError(
            f"--resume latest: no run under {Path(run_root) / job} has a checkpoint yet. "
            "Start a run without --resume first."
        )
    path = Path(resume)
    if path.is_dir() and (path / "state.pt").is_file():
        return path
    if path.is_dir() and (ckpts := list_checkpoints(path)):
        return ckpts[-1]
    raise DganError(
        f"--resume {resume}: not a checkpoint (a directory with state.pt) nor a run directory "
        "with checkpoints. Use --resume latest, a run directory or runs/.../checkpoints/iter-N."
    )


def save_checkpoint(
    accelerator: Any, run_dir: Path, iteration: int, state: dict[str, Any], keep: int
) -> Path:
    """Write state.pt (main process) and each process's RNG state, then publish by renaming.

    Every process must call this; only the main one writes state and renames.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    final = ckpt_dir / f"iter-{iteration:08d}"
    tmp = ckpt_dir / f".tmp-iter-{iteration:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state(accelerator.device)
    torch.save(rng, tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(state, tmp / "state.pt")
    accelerator.wait_for_everyone()  # every process's RNG file is in tmp before it is renamed
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, process_index: int = 0) -> tuple[dict[str, Any], dict | None]:
    """(state, this process's RNG state or None), loaded without unpickling arbitrary objects."""
    try:
        state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise DganError(f"{path} is not a readable checkpoint: {err}") from None
    rng_path = Path(path) / f"rng-{process_index}.pt"
    rng = torch.load(rng_path, weights_only=True) if rng_path.is_file() else None
    return state, rng


def restore_rng(rng: dict | None, device: torch.device) -> None:
    if rng is None:
        return
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"], device)
