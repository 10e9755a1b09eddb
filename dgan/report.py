"""Plain-text tables for command output."""

from __future__ import annotations

from collections.abc import Iterable


def text_table(header: list[str], rows: Iterable[list]) -> list[str]:
    """Aligned plain-text table lines: names left-aligned, numbers right-aligned."""
    cells = [[str(v) for v in row] for row in [header, *rows]]
    widths = [max(len(row[k]) for row in cells) for k in range(len(header))]
    # The first column holds names: left-aligned; the rest hold numbers: right-aligned.
    return [
        "  "
        + "  ".join(
            v.ljust(w) if k == 0 else v.rjust(w)
            for k, (v, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
