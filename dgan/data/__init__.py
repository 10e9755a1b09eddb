"""Datasets: the procedural demo set, CODEBRIM, the folder format, checks and loaders.

Every reader returns a `DatasetIndex`: a list of `Sample`s with multi-hot labels over
`classes`. A sample whose labels are all zero is a normal (defect-free) image.
"""

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


def open_dataset(root: Path) -> DatasetIndex:
    """Read a dataset in any supported layout: the folder format or CODEBRIM."""
    from dgan.errors import DganError

    root = Path(root)
    if not root.is_dir():
        raise DganError(
            f"dataset directory {root} does not exist. Create the demo set with "
            f"'dgan data demo --out {root}', or point at a folder or CODEBRIM root."
        )
    from dgan.data import codebrim, folder

    if folder.is_folder_layout(root):
        return folder.read_folder(root)
    if codebrim.is_codebrim_layout(root):
        return codebrim.read_codebrim(root)
    raise DganError(
        f"{root} is neither a folder dataset (labels.csv) nor CODEBRIM "
        "(train/ val/ test/ and metadata/); see README 'Datasets'."
    )


DEMO_ROOT = Path("data/demo")
DEMO_SIZE = 32


def ensure_demo_dataset(root: Path = DEMO_ROOT) -> Path:
    """The procedural demo set at `root`, generated with its defaults when absent."""
    root = Path(root)
    if not (root / "labels.csv").is_file():
        from dgan.data.demo import generate_demo

        print(f"generating the demo dataset into {root} (no download needed) ...", flush=True)
        # Drawn at the demo presets' 32 px: thin cracks stay crisp instead of being resized away.
        generate_demo(root, size=DEMO_SIZE)
    return root
