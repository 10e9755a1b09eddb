"""CODEBRIM, the paper's dataset, read from its published layout.

    root/{train,val,test}/background/*.png   defect-free crops
    root/{train,val,test}/defects/*.png      defect crops
    root/metadata/defects.xml                one <Defect name="..."> entry per defect crop

Each entry holds six 0/1 children in this order: Background, Crack, Spallation, Efflorescence,
ExposedBars, CorrosionStain. Background is dropped; the other five become `Sample.labels` over
`CODEBRIM_CLASSES`. Every image under background/ is normal, whatever background.xml says.

A file name with `_-_` is a further crop of a listed image and takes its base image's labels:
`image_0001_-_crop3.png` is looked up as `image_0001.png`.

Defect crops that cannot be labelled (all-zero labels, or no metadata entry) are left out of
the index, since an all-zero sample would count as normal; `scan_codebrim` lists them so that
the dataset check can report them.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from dgan.data.index import CODEBRIM_CLASSES, IMAGE_SUFFIXES, DatasetIndex, Sample, image_files
from dgan.errors import DganError

CODEBRIM_SPLITS = ("train", "val", "test")
# The children of a metadata entry, in file order (FIELD-NOTES, CODEBRIM).
METADATA_TAGS = (
    "Background",
    "Crack",
    "Spallation",
    "Efflorescence",
    "ExposedBars",
    "CorrosionStain",
)
CROP_MARK = "_-_"


@dataclass
class CodebrimScan:
    """A CODEBRIM index plus the defect crops that had to be left out of it."""

    index: DatasetIndex
    all_zero: list[Path] = field(default_factory=list)  # defect crops whose metadata is all zero
    unlisted: list[Path] = field(default_factory=list)  # defect crops with no metadata entry


def is_codebrim_layout(root: Path) -> bool:
    """True when `root` has metadata/ and at least one split with background/ or defects/."""
    root = Path(root)
    if not (root / "metadata").is_dir():
        return False
    return any(
        (root / split / part).is_dir()
        for split in CODEBRIM_SPLITS
        for part in ("background", "defects")
    )


def read_codebrim(root: Path) -> DatasetIndex:
    """Read a CODEBRIM root into a DatasetIndex (layout "codebrim", classes CODEBRIM_CLASSES)."""
    return scan_codebrim(root).index


def scan_codebrim(root: Path) -> CodebrimScan:
    """Read a CODEBRIM root and list the defect crops that could not be labelled."""
    root = Path(root)
    metadata_path = root / "metadata" / "defects.xml"
    if not metadata_path.is_file():
        raise DganError(
            f"{metadata_path} is missing. CODEBRIM needs metadata/defects.xml with the labels of "
            "the defect crops; copy it from the dataset archive."
        )
    labels_by_name = parse_metadata(metadata_path)
    scan = CodebrimScan(index=DatasetIndex(root=root, classes=CODEBRIM_CLASSES, layout="codebrim"))
    normal_labels = (0,) * len(CODEBRIM_CLASSES)
    for split in CODEBRIM_SPLITS:
        for path in image_files(root / split / "background"):
            scan.index.samples.append(Sample(path=path, labels=normal_labels, split=split))
        for path in image_files(root / split / "defects"):
            labels = labels_by_name.get(path.name) or labels_by_name.get(metadata_name(path.name))
            if labels is None:
                scan.unlisted.append(path)
            elif not any(labels):
                scan.all_zero.append(path)
            else:
                scan.index.samples.append(Sample(path=path, labels=labels, split=split))
    return scan


def metadata_name(file_name: str) -> str:
    """The metadata entry a file belongs to: the part before `_-_`, with the file's extension.

    `image_0001_-_crop3.png` -> `image_0001.png`; `image_0001.png_-_crop3.png` -> `image_0001.png`;
    a name without `_-_` is its own entry.
    """
    base, mark, _ = file_name.partition(CROP_MARK)
    if not mark:
        return file_name
    if base.lower().endswith(IMAGE_SUFFIXES):
        return base
    return base + Path(file_name).suffix


def parse_metadata(path: Path) -> dict[str, tuple[int, ...]]:
    """Map each `<Defect name=...>` entry of a CODEBRIM metadata XML to its five defect labels."""
    try:
        tree = ET.parse(path)
    except (ET.ParseError, OSError) as err:
        raise DganError(
            f"{path} is not readable XML ({err}). Restore it from the CODEBRIM archive."
        ) from None
    labels_by_name: dict[str, tuple[int, ...]] = {}
    for entry in tree.getroot().iter("Defect"):
        name = entry.get("name")
        if not name:
            raise DganError(
                f"{path}: a <Defect> entry has no name attribute; every entry needs one."
            )
        values = _entry_values(path, name, entry)
        labels_by_name[name] = values[1:]  # drop Background
    return labels_by_name


def _entry_values(path: Path, name: str, entry: ET.Element) -> tuple[int, ...]:
    """The six 0/1 values of one entry, by tag name when all six tags are present, else by order."""
    children = list(entry)
    by_tag = {child.tag: child for child in children}
    if all(tag in by_tag for tag in METADATA_TAGS):
        children = [by_tag[tag] for tag in METADATA_TAGS]
    elif len(children) != len(METADATA_TAGS):
        raise DganError(
            f"{path}: entry {name!r} has {len(children)} children; expected "
            f"{len(METADATA_TAGS)} ({', '.join(METADATA_TAGS)})."
        )
    texts = [(child.text or "").strip() for child in children]
    if any(text not in ("0", "1") for text in texts):
        raise DganError(f"{path}: entry {name!r} must hold 0 or 1 in each child, got {texts}.")
    return tuple(int(text) for text in texts)
