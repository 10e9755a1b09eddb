"""Where what a job says goes: progress, information and warnings, through one sink.

Jobs never print. The CLI gives them a `ConsoleEvents` (a live progress line on a terminal, plain
lines elsewhere); a queue worker gives a `FileEvents` writing the job's log file; processes other
than the main one get `NullEvents`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO


class Events:
    """The sink interface; this base says nothing."""

    def begin(self, done: int) -> None:
        """Rates count from here: `done` units are already behind (a resumed job)."""

    def progress(
        self, done: int, total: int, values: Mapping[str, float] | None = None, unit: str = "it"
    ) -> None:
        """`done` of `total` units, with the main figures of the moment."""

    def info(self, message: str) -> None:
        """One line (or several) for the person running the job."""

    def warning(self, message: str) -> None:
        """Something the person should act on; the job goes on."""

    def close(self) -> None:
        """End any live line."""


NullEvents = Events


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def progress_line(
    done: int, total: int, start: int, elapsed: float, values: Mapping[str, float] | None, unit: str
) -> str:
    """`done/total pct | rate | eta | values`, as every sink writes it."""
    rate = (done - start) / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    width = len(str(total))
    parts = [
        f"{done:>{width}}/{total} {100 * done / max(total, 1):5.1f}%",
        f"{rate:.2f} {unit}/s",
        f"eta {_duration(eta) if eta == eta else '--:--'}",
    ]
    if values:
        parts.append(" ".join(f"{k} {v:.3g}" for k, v in values.items()))
    return " | ".join(parts)


class StreamEvents(Events):
    """Plain lines on a text stream; the rate counts from the first progress call."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._start: tuple[int, float] | None = None

    def begin(self, done: int) -> None:
        self._start = (done, time.perf_counter())

    def _rate_origin(self, done: int) -> tuple[int, float]:
        if self._start is None:
            self._start = (done, time.perf_counter())
        return self._start

    def progress(self, done, total, values=None, unit="it") -> None:
        start, t0 = self._rate_origin(done)
        self._write(progress_line(done, total, start, time.perf_counter() - t0, values, unit))

    def info(self, message: str) -> None:
        self._write(message)

    def warning(self, message: str) -> None:
        self._write(f"warning: {message}")

    def _write(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()


class ConsoleEvents(StreamEvents):
    """stdout: on a terminal the progress line is redrawn in place, unless `quiet`."""

    def __init__(self, quiet: bool = False) -> None:
        super().__init__(sys.stdout)
        self.live = sys.stdout.isatty() and not quiet
        self._open = False

    def progress(self, done, total, values=None, unit="it") -> None:
        if not self.live:
            return super().progress(done, total, values, unit)
        start, t0 = self._rate_origin(done)
        line = progress_line(done, total, start, time.perf_counter() - t0, values, unit)
        sys.stdout.write("\r\033[K" + line)
        sys.stdout.flush()
        self._open = True

    def _write(self, line: str) -> None:
        self.close()
        super()._write(line)

    def close(self) -> None:
        if self._open:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self._open = False


class FileEvents(StreamEvents):
    """Appends every line to a log file (a queued job's log)."""

    def __init__(self, path: Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(open(path, "a", encoding="utf-8", buffering=1))  # noqa: SIM115

    def close(self) -> None:
        self.stream.flush()


class CollectEvents(Events):
    """Keeps every info and warning line in memory (for callers that show them later)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    def warning(self, message: str) -> None:
        self.lines.append(f"warning: {message}")
