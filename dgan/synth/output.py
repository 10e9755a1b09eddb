"""The synthesized set on disk, written so that any interruption can be resumed exactly.

    OUT/defect/00000042.png    defaced normal i
    OUT/masks/00000042.png     its spatial distribution map m (mode L): a pixel-level pseudo-label
    OUT/normal/00000042.png    restore(defect i): the restored normals of Sec. 4.2
    OUT/labels.csv             the folder format's labels (written last: its presence means done)
    OUT/manifest.csv           per image: source normal, labels, region, seeds, generator
    OUT/synth.json             what the set is (its identity) and whether it is finished

Images are written under temp names and renamed. Indices are grouped into chunks of CHUNK; a
chunk's manifest rows go to .parts/ once all its images are in place, so a listed chunk is whole.
A rerun skips listed chunks, redoes the others (image i depends only on (seed, i), so a redone
image is the same image) and, when all chunks are listed, merges the parts.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dgan.errors import DganError
from dgan.io import atomic_write_bytes, atomic_write_text

CHUNK = 512
MANIFEST_COLUMNS = (
    "index", "defect", "mask", "normal", "source_normal", "labels", "region",
    "deface_seed", "restore_seed", "generator",
)  # fmt: skip
SUBDIRS = ("defect", "masks", "normal")


def chunk_range(chunk: int, n: int) -> range:
    return range(chunk * CHUNK, min((chunk + 1) * CHUNK, n))


def n_chunks(n: int) -> int:
    return (n + CHUNK - 1) // CHUNK


def image_name(i: int) -> str:
    return f"{i:08d}.png"


class SynthOutput:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.parts = self.root / ".parts"
        self.meta = self.root / "synth.json"

    def read_meta(self) -> dict[str, Any]:
        return json.loads(self.meta.read_text()) if self.meta.is_file() else {}

    def open(self, identity: dict[str, Any], config: dict[str, Any]) -> bool:
        """Claim the directory for this set. True when the set is already finished.

        Refuses a directory that holds another set, or files that are not a synthesized set.
        """
        meta = self.read_meta()
        if meta:
            if meta.get("identity") != identity:
                old = meta.get("identity", {})
                diffs = [
                    f"{k}: {old.get(k)!r} there, {identity.get(k)!r} now"
                    for k in sorted(set(old) | set(identity))
                    if old.get(k) != identity.get(k)
                ]
                raise DganError(
                    f"{self.root} holds a different synthesized set ({'; '.join(diffs)}). "
                    "Rerun with the original settings to complete it, or choose a new --out.",
                    exit_code=2,
                )
            return meta.get("state") == "finished"
        if self.root.exists() and any(self.root.iterdir()):
            raise DganError(
                f"{self.root} exists and is not a dgan synthesis output (no synth.json); "
                "choose an empty or new --out directory",
                exit_code=2,
            )
        self.write_meta(identity=identity, config=config, state="running")
        return False

    def write_meta(self, **fields: Any) -> None:
        meta = self.read_meta() | fields
        atomic_write_text(self.meta, json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def prepare(self) -> None:
        """Make the subdirectories and drop temp files an earlier kill left behind."""
        for sub in (*SUBDIRS, ".parts"):
            directory = self.root / sub
            directory.mkdir(parents=True, exist_ok=True)
            for leftover in directory.glob(".tmp-*"):
                leftover.unlink(missing_ok=True)

    def done_chunks(self) -> set[int]:
        if not self.parts.is_dir():
            return set()
        return {
            int(p.stem.removeprefix("chunk-"))
            for p in self.parts.glob("chunk-*.csv")
            if p.stem.removeprefix("chunk-").isdigit()
        }

    def write_part(self, chunk: int, rows: Sequence[Sequence[Any]]) -> None:
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        atomic_write_text(self.parts / f"chunk-{chunk:08d}.csv", buf.getvalue())

    def finalize(self, n: int, classes: Sequence[str], restored: bool) -> None:
        """Check that every image is there, then write manifest.csv, labels.csv and the state."""
        subdirs = ("defect", "masks", "normal") if restored else ("defect", "masks")
        for sub in subdirs:
            found = count_images(self.root / sub)
            if found != n:
                raise DganError(
                    f"{self.root / sub} has {found} images, expected {n}; the set is incomplete. "
                    "Rerun the same command to complete it."
                )
        missing = sorted(set(range(n_chunks(n))) - self.done_chunks())
        if missing:
            raise DganError(f"chunks {missing[:5]} of {self.root} are not done; rerun to finish")
        self._merge(self.root / "manifest.csv", [MANIFEST_COLUMNS], self._part_rows(n))
        self._merge(
            self.root / "labels.csv",
            [("file", "split", "family", *classes)],
            self._label_rows(n, classes, restored),
        )
        self.write_meta(state="finished", n=n)

    def _part_rows(self, n: int) -> Iterable[list[str]]:
        for chunk in range(n_chunks(n)):
            with (self.parts / f"chunk-{chunk:08d}.csv").open(newline="") as f:
                yield from csv.reader(f)

    def _label_rows(self, n: int, classes: Sequence[str], restored: bool) -> Iterable[list[str]]:
        label_col = MANIFEST_COLUMNS.index("labels")
        for row in self._part_rows(n):
            names = set(row[label_col].split("+")) - {""}
            yield [row[1], "train", "", *(int(c in names) for c in classes)]
            if restored:
                yield [row[3], "train", "", *(0 for _ in classes)]

    @staticmethod
    def _merge(path: Path, header: list, rows: Iterable[Sequence[Any]]) -> None:
        """Stream rows into a temp file and rename it: memory does not grow with n."""
        tmp = path.with_name(f".tmp-{path.name}")
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerows(header)
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def count_images(directory: Path) -> int:
    """Finished images in `directory` (temp files excluded), without listing them in memory."""
    with os.scandir(directory) as entries:
        return sum(
            1
            for e in entries
            if e.name.endswith(".png") and not e.name.startswith(".") and e.is_file()
        )


def write_png(array, path: Path) -> None:
    """An (H, W, 3) or (H, W) uint8 array as PNG, atomically (fast zlib level 1)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    atomic_write_bytes(path, buf.getvalue())
