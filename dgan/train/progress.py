"""Progress for training and synthesis: a live line on a terminal, plain lines elsewhere."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Iterations, rate, ETA and the main losses.

    On a terminal the line is redrawn in place; when stdout is not a terminal, or `quiet` is set,
    one plain line is printed per `update` call (callers call it every log interval).
    """

    def __init__(self, total: int, start: int = 0, unit: str = "it", quiet: bool = False) -> None:
        self.total, self.start, self.unit = total, start, unit
        self.live = sys.stdout.isatty() and not quiet
        self.t0 = time.perf_counter()

    def update(self, done: int, values: Mapping[str, float] | None = None) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        width = len(str(self.total))
        parts = [
            f"{done:>{width}}/{self.total} {100 * done / self.total:5.1f}%",
            f"{rate:.2f} {self.unit}/s",
            f"eta {_duration(eta) if eta == eta else '--:--'}",
        ]
        if values:
            parts.append(" ".join(f"{k} {v:.3g}" for k, v in values.items()))
        line = " | ".join(parts)
        if self.live:
            sys.stdout.write("\r\033[K" + line)
        else:
            sys.stdout.write(line + "\n")
        sys.stdout.flush()
        return line

    def close(self) -> None:
        if self.live:
            sys.stdout.write("\n")
            sys.stdout.flush()
