"""What a job returns, and what a caller's metrics callback may ask of it."""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from dgan.io import atomic_write_text

State = Literal["created", "running", "paused", "interrupted", "failed", "finished"]
RESULT_FILE = "result.json"  # how a spawned main worker hands its result to the launcher


class Directive(enum.Enum):
    """A metrics callback's answer: go on, checkpoint now, or checkpoint and stop (paused)."""

    CONTINUE = "continue"
    CHECKPOINT = "checkpoint"
    STOP = "stop"


@dataclass(frozen=True)
class Report:
    """What the harness tells a callback.

    kind "log": running means of the training terms; "eval": a periodic evaluation's metrics;
    "checkpoint": a checkpoint was written (`checkpoint` is its directory, `metrics` the last
    evaluation's, empty before the first).
    """

    kind: Literal["log", "eval", "checkpoint"]
    step: int
    total: int
    metrics: dict[str, float]
    checkpoint: Path | None = None


Callback = Callable[[Report], "Directive | None"]


@dataclass
class JobResult:
    """How a job went. `metrics` are the final value of every metric of its MLflow run, `best`
    the best value of each metric with a registered direction (dgan.metrics.registry)."""

    kind: str  # gan | inspector | synth
    state: State
    run_dir: Path
    step: int  # iterations, steps or images done
    total: int
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    model_dir: Path | None = None  # the exported model (safetensors, config, classes)
    model_uri: str | None = None  # the MLflow logged model
    registered_model: str | None = None
    registered_version: str | None = None
    promoted: bool | None = None
    checkpoint: Path | None = None  # the latest checkpoint
    seconds: float = 0.0

    @property
    def registered_uri(self) -> str | None:
        if self.registered_version is None:
            return None
        return f"models:/{self.registered_model}/{self.registered_version}"

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobResult:
        paths = ("run_dir", "model_dir", "checkpoint")
        return cls(**{k: Path(v) if k in paths and v is not None else v for k, v in data.items()})

    def write(self, directory: Path) -> None:
        atomic_write_text(Path(directory) / RESULT_FILE, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def read(cls, directory: Path) -> JobResult | None:
        path = Path(directory) / RESULT_FILE
        return cls.from_dict(json.loads(path.read_text())) if path.is_file() else None


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the job after a checkpoint; `result` says where it stands."""

    def __init__(self, result: JobResult) -> None:
        super().__init__(f"interrupted at {result.step}; continue with --resume {result.run_dir}")
        self.result = result
