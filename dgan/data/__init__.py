"""Datasets: the procedural demo set, CODEBRIM, the folder format, checks and loaders.

Every reader returns a `DatasetIndex`: a list of `Sample`s with multi-hot labels over
`classes`. A sample whose labels are all zero is a normal (defect-free) image.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dgan.events import Events

from dgan.data.index import (
    CODEBRIM_CLASSES,
    IMAGE_SUFFIXES,
    SPLITS,
    DatasetIndex,
    Sample,
    dataset_hash,
    image_files,
)

__all__ = [
    "CODEBRIM_CLASSES", "IMAGE_SUFFIXES", "SPLITS", "DatasetIndex", "Sample", "dataset_hash",
    "image_files", "open_dataset", "ensure_demo_dataset",
]  # fmt: skip


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


def ensure_demo_dataset(root: Path = DEMO_ROOT, events: Events | None = None) -> Path:
    """The procedural demo set at `root`, generated with its defaults when absent."""
    from dgan.events import ConsoleEvents

    root = Path(root)
    if not (root / "labels.csv").is_file():
        from dgan.data.demo import generate_demo

        (events or ConsoleEvents()).info(
            f"generating the demo dataset into {root} (no download needed) ..."
        )
        # Drawn at the demo presets' 32 px: thin cracks stay crisp instead of being resized away.
        generate_demo(root, size=DEMO_SIZE)
    return root
