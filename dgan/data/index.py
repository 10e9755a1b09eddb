"""The dataset index every reader returns: samples with multi-hot labels over named classes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

# The five CODEBRIM defect categories, in the order of its metadata XML (FIELD-NOTES, CODEBRIM).
CODEBRIM_CLASSES: tuple[str, ...] = (
    "crack",
    "spallation",
    "efflorescence",
    "exposed_bars",
    "corrosion_stain",
)
SPLITS: tuple[str, ...] = ("train", "val", "test", "transfer")
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Sample:
    """One image on disk with its image-level labels (multi-hot over the index's classes)."""

    path: Path
    labels: tuple[int, ...]
    split: str = "train"
    mask: Path | None = None
    family: str | None = None

    @property
    def is_normal(self) -> bool:
        return not any(self.labels)


@dataclass
class DatasetIndex:
    """All samples of one dataset root, with the class names their labels refer to."""

    root: Path
    classes: tuple[str, ...]
    samples: list[Sample] = field(default_factory=list)
    layout: str = "folder"

    def select(self, split: str | None = None, normal: bool | None = None) -> list[Sample]:
        """Samples of one split (or all), optionally only normals (True) or only defects (False)."""
        return [
            s
            for s in self.samples
            if (split is None or s.split == split) and (normal is None or s.is_normal == normal)
        ]


def dataset_hash(*indexes: DatasetIndex) -> str:
    """A short content hash of datasets: class names, and each file's path relative to its root,
    byte size, split and labels, in order.

    The same files give the same hash wherever the set lives; adding, removing, resizing or
    relabelling a file changes it. Several indexes (a real set and synthesized sets) hash as one.
    Pixels are not read: a same-size rewrite of an image keeps the hash.
    """
    digest = hashlib.sha256()
    for index in indexes:
        digest.update(("classes:" + ",".join(index.classes) + "\n").encode())
        root = Path(index.root)
        for s in sorted(index.samples, key=lambda s: (s.split, str(s.path))):
            rel = s.path.relative_to(root) if s.path.is_relative_to(root) else s.path
            size = s.path.stat().st_size if s.path.is_file() else -1
            labels = "".join(str(v) for v in s.labels)
            digest.update(f"{rel.as_posix()}\t{size}\t{s.split}\t{labels}\n".encode())
        digest.update(b"--\n")
    return digest.hexdigest()[:12]


def image_files(directory: Path) -> list[Path]:
    """Image files directly in `directory`, sorted; hidden and temp files are skipped."""
    if not directory.is_dir():
        return []
    return sorted(
        p
        for p in directory.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
