"""The options of the kinds that have no `dgan` command of their own (tune, noop).

Parsed by `dgan jobs submit`, never invoked. Kept apart so that a job's process, which only
reads specs, does not import Typer.
"""

from __future__ import annotations

from typing import Annotated

import typer

own_kinds = typer.Typer()


@own_kinds.command("tune")
def tune_options(
    config: Annotated[list[str] | None, typer.Option("--config", "-c")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", "-s")] = None,
) -> None:
    """A search over the GAN's settings (dgan.config.TuneConfig)."""


@own_kinds.command("noop")
def noop_options(
    seconds: Annotated[float, typer.Option(help="Sleep this long.")] = 0.0,
    mark: Annotated[str | None, typer.Option(help="Append one line per run to this file.")] = None,
    fail_attempts: Annotated[int, typer.Option(help="Fail the first N attempts.")] = 0,
) -> None:
    """A job that does nothing."""
