"""Atomic writes: a temp file in the target's directory, then `os.replace`.

A reader never sees a half-written file; an interrupted write leaves only a `.tmp-*` file behind.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent, the old content, or all of `data`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".tmp-{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of `atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_image(image: Any, path: Path, compress_level: int = 1) -> None:
    """Encode a PIL image as PNG in memory and write it atomically.

    Level 1 compression: PNG encoding is the bottleneck of dataset and synthesis writers.
    """
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=compress_level)
    atomic_write_bytes(path, buf.getvalue())
