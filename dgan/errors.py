"""The one exception type that the CLI turns into a message without a traceback, and the
decorator that does so for every command (`dgan ...` and `dgan jobs ...`)."""

import functools


class DganError(Exception):
    """Bad input or an unusable state, described for a person: what is wrong and how to fix it.

    `exit_code` is what the CLI exits with (2 for invalid configuration or arguments, 1 otherwise).
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def friendly(command):
    """A CLI command that prints a DganError as one line on stderr and exits with its code, and
    exits 130 on Ctrl-C: never a traceback for bad input."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        import typer

        try:
            return command(*args, **kwargs)
        except DganError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper
