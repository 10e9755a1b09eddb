"""The folder format: the layout users bring, the demo set uses and synthesis writes.

    root/normal/*.png        defect-free images
    root/defect/*.png        defect images
    root/masks/*.png         optional: per-pixel defect masks (mode L), named as the defect image
    root/labels.csv          one row per image: file,split,family,<one 0/1 column per class>

`file` is relative to root. `split` (train/val/test/transfer) and `family` are optional columns;
without `split` every image is in train. Every column other than file/split/family is a class.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from pathlib import Path

from dgan.data.index import SPLITS, DatasetIndex, Sample
from dgan.errors import DganError
from dgan.io import atomic_write_text

RESERVED_COLUMNS = ("file", "split", "family")


def is_folder_layout(root: Path) -> bool:
    """True when `root` has a labels.csv, the mark of the folder format."""
    return (Path(root) / "labels.csv").is_file()


def write_labels(root: Path, classes: Sequence[str], samples: Iterable[Sample]) -> None:
    """Write root/labels.csv atomically for `samples` (paths may be absolute or relative)."""
    root = Path(root)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*RESERVED_COLUMNS, *classes])
    for s in samples:
        rel = s.path.relative_to(root) if s.path.is_relative_to(root) else s.path
        writer.writerow([rel.as_posix(), s.split, s.family or "", *s.labels])
    atomic_write_text(root / "labels.csv", buf.getvalue())


def read_folder(root: Path) -> DatasetIndex:
    """Read a folder-format dataset. Raises DganError naming the line for malformed labels."""
    root = Path(root)
    csv_path = root / "labels.csv"
    if not csv_path.is_file():
        raise DganError(
            f"{root} has no labels.csv. A folder dataset needs normal/, defect/ and labels.csv "
            "with columns file,split,family,<class...>; see README 'Datasets'."
        )
    with csv_path.open(newline="", encoding="utf-8-sig") as f:  # tolerate spreadsheet BOMs
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or "file" not in header:
            raise DganError(f"{csv_path}: the first line must be a header with a 'file' column.")
        classes = tuple(c for c in header if c not in RESERVED_COLUMNS)
        if not classes:
            raise DganError(f"{csv_path}: no class columns; add one 0/1 column per defect class.")
        col = {name: i for i, name in enumerate(header)}
        samples = []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise DganError(
                    f"{csv_path}:{lineno}: {len(row)} fields, the header has {len(header)}."
                )
            try:
                labels = tuple(int(row[col[c]]) for c in classes)
            except ValueError:
                raise DganError(
                    f"{csv_path}:{lineno}: class columns must hold 0 or 1, got {row}."
                ) from None
            if any(v not in (0, 1) for v in labels):
                raise DganError(f"{csv_path}:{lineno}: class columns must hold 0 or 1.")
            split = row[col["split"]] if "split" in col else "train"
            if split not in SPLITS:
                raise DganError(
                    f"{csv_path}:{lineno}: split {split!r} is not one of {', '.join(SPLITS)}."
                )
            if not row[col["file"]].strip() or Path(row[col["file"]]).is_absolute():
                raise DganError(
                    f"{csv_path}:{lineno}: 'file' must be a path relative to {root}, "
                    f"got {row[col['file']]!r}"
                )
            path = root / row[col["file"]]
            # Masks belong to defect images only; a normal never borrows a defect's mask.
            mask = root / "masks" / path.name if any(labels) else None
            samples.append(
                Sample(
                    path=path,
                    labels=labels,
                    split=split,
                    mask=mask if mask is not None and mask.is_file() else None,
                    family=(row[col["family"]] or None) if "family" in col else None,
                )
            )
    return DatasetIndex(root=root, classes=classes, samples=samples, layout="folder")
