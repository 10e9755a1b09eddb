"""The kinds of queued job: the command each one runs and the outputs a later job may name.

Light on purpose (no pydantic, no dgan): `dgan jobs list` and the store read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    """One kind of job: the `dgan` command whose options it takes, and what it leaves behind."""

    command: str  # the command a user would type, whose options `dgan jobs submit KIND` takes
    outputs: tuple[str, ...]  # names a later job may refer to as ${JOB.name}
    run_name: str  # the run directory's suffix when --name is not given
    summary: str


KINDS: dict[str, Kind] = {
    "train-gan": Kind("dgan train gan", ("model", "run_dir"), "gan", "train Defect-GAN"),
    "train-inspector": Kind(
        "dgan train inspector", ("model", "run_dir"), "inspector", "train the defect inspector"
    ),
    "synth": Kind("dgan synth", ("out",), "synth", "synthesize a labelled defect set"),
    "eval-inspector": Kind(
        "dgan eval inspector", ("report",), "eval-inspector", "score an inspector on a split"
    ),
    "eval-fid": Kind("dgan eval fid", ("report",), "eval-fid", "FID/KID of a generator"),
    "eval-synth": Kind("dgan eval synth", ("report",), "eval-synth", "synthesis quality"),
    "tune": Kind(
        "dgan tune", ("report", "config"), "tune", "a Ray Tune search (--config PRESET, --set k=v)"
    ),
    "noop": Kind(
        "(none)", (), "noop", "does nothing: checks a worker, times the queue, tries retries"
    ),
}

# What each output of a finished job is, for `dgan jobs pipeline` files and `show`.
OUTPUT_MEANING = {
    "model": "the exported model directory (safetensors, config, classes)",
    "run_dir": "the run directory",
    "out": "the synthesized set (folder format)",
    "report": "the evaluation report (JSON), or a tune study's directory",
    "config": "a tune study's best config (a preset for dgan train gan --config)",
}


def kind_names() -> str:
    """The kinds, for messages."""
    return ", ".join(KINDS)
