"""Tiny fake datasets on disk, in the folder format and in CODEBRIM's layout, for tests."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from dgan.data import CODEBRIM_CLASSES, Sample
from dgan.data.folder import write_labels

# Written out here rather than imported, so that the fake tree checks the reader's order.
METADATA_TAGS = (
    "Background",
    "Crack",
    "Spallation",
    "Efflorescence",
    "ExposedBars",
    "CorrosionStain",
)

# (split, file name, six metadata values: Background, Crack, Spallation, Efflorescence,
# ExposedBars, CorrosionStain). The two `_-_` crops share the entry of image_0003.png.
CODEBRIM_FAKE_DEFECTS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("train", "image_0001.png", (0, 1, 0, 0, 0, 0)),
    ("train", "image_0002.png", (0, 0, 1, 0, 1, 0)),
    ("train", "image_0003_-_crop1.png", (0, 0, 0, 1, 0, 1)),
    ("train", "image_0003_-_crop2.png", (0, 0, 0, 1, 0, 1)),
    ("train", "image_0004.png", (0, 0, 0, 0, 0, 0)),  # a defect crop with all-zero labels
    ("val", "image_0005.png", (0, 0, 0, 0, 0, 1)),
    ("test", "image_0006.png", (0, 1, 0, 0, 0, 1)),
)


def write_image(path: Path, size: int | tuple[int, int], seed: int = 0, mode: str = "RGB") -> Path:
    """Write a small noisy image (a different one per seed) as PNG, creating its folder."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, mode="RGB")
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def fake_defect_labels(k: int, n_classes: int) -> tuple[int, ...]:
    """Labels of fake defect k: class k mod C, plus the next class for every third defect."""
    labels = [0] * n_classes
    labels[k % n_classes] = 1
    if k % 3 == 2:
        labels[(k + 1) % n_classes] = 1
    return tuple(labels)


def fake_split(i: int, splits: bool) -> str:
    """Image i's split: train, train, val, test, repeating (so image 0 is always in train)."""
    return ("train", "train", "val", "test")[i % 4] if splits else "train"


def make_folder_dataset(
    root: Path,
    n_normal: int,
    n_defect: int,
    size: int | tuple[int, int],
    classes: Sequence[str] = CODEBRIM_CLASSES,
    splits: bool = True,
) -> Path:
    """A folder-format dataset: normal/normal_NNN.png, defect/defect_NNN.png and labels.csv.

    Defect k carries `fake_defect_labels(k, len(classes))`; splits follow `fake_split`.
    """
    root = Path(root)
    samples = []
    for i in range(n_normal):
        path = Path("normal") / f"normal_{i:03d}.png"
        write_image(root / path, size, seed=i)
        samples.append(Sample(path, (0,) * len(classes), fake_split(i, splits)))
    for k in range(n_defect):
        path = Path("defect") / f"defect_{k:03d}.png"
        write_image(root / path, size, seed=1000 + k)
        samples.append(Sample(path, fake_defect_labels(k, len(classes)), fake_split(k, splits)))
    write_labels(root, classes, samples)
    return root


def make_codebrim_tree(
    root: Path,
    size: int = 32,
    n_background: int = 2,
    defects: Sequence[tuple[str, str, tuple[int, ...]]] = CODEBRIM_FAKE_DEFECTS,
    unlisted: Sequence[tuple[str, str]] = (),
) -> Path:
    """A CODEBRIM tree: {train,val,test}/{background,defects}/*.png and metadata/*.xml.

    Each split gets `n_background` background images. `defects` are written with metadata
    entries (one per base name); `unlisted` (split, file name) images get none.
    """
    root = Path(root)
    backgrounds = []
    seed = 0
    for split in ("train", "val", "test"):
        for k in range(n_background):
            name = f"bg_{split}_{k:02d}.png"
            write_image(root / split / "background" / name, size, seed=seed)
            backgrounds.append((name, (1, 0, 0, 0, 0, 0)))
            seed += 1
    entries: dict[str, tuple[int, ...]] = {}
    for split, name, values in defects:
        write_image(root / split / "defects" / name, size, seed=seed)
        base = name.split("_-_")[0] + Path(name).suffix if "_-_" in name else name
        entries[base] = values
        seed += 1
    for split, name in unlisted:
        write_image(root / split / "defects" / name, size, seed=seed)
        seed += 1
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    write_metadata(root / "metadata" / "background.xml", backgrounds)
    write_metadata(root / "metadata" / "defects.xml", entries.items())
    return root


def write_metadata(path: Path, entries: Iterable[tuple[str, Sequence[int]]]) -> None:
    """Write CODEBRIM-style metadata: one <Defect name=...> with six 0/1 children per entry."""
    top = ET.Element("Defects")
    for name, values in entries:
        entry = ET.SubElement(top, "Defect", name=name)
        for tag, value in zip(METADATA_TAGS, values, strict=True):
            ET.SubElement(entry, tag).text = str(value)
    ET.ElementTree(top).write(path, encoding="utf-8", xml_declaration=True)
