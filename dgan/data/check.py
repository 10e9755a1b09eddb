"""Dataset check: read every image once and report what would break or bias training.

Fatal problems are the ones that would crash a run or train on wrong labels: unreadable,
empty, non-RGB or too-small images, label rows without a file, and labels that contradict the
folder an image lives in. Files on disk that the labels do not mention, and CODEBRIM defect
crops that carry no usable labels, are warnings: they are left out of training.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from PIL import Image

from dgan.data import SPLITS, DatasetIndex, Sample, codebrim, image_files, open_dataset
from dgan.errors import DganError
from dgan.report import text_table

# Problem kinds, as they appear in reports.
UNREADABLE = "unreadable image"
EMPTY_FILE = "zero-byte file"
BAD_MODE = "unexpected mode"
TOO_SMALL = "too small"
BAD_MASK = "bad mask"
MISSING_FILE = "listed file missing"
UNLISTED_FILE = "image not in the labels"
DUPLICATE_ROW = "listed twice"
NORMAL_WITH_LABELS = "positive labels on a normal image"
ALL_ZERO_DEFECT = "all-zero labels on a defect image"
NO_NORMALS = "no normal images in train"
NO_DEFECTS = "no defect images in train"

MAX_PROBLEM_LINES = 20  # in the DganError of require_usable; the full list is in the report


@dataclass
class Problem:
    """One thing wrong with a dataset, tied to the file (or root) it concerns."""

    path: Path
    kind: str
    detail: str
    fatal: bool

    def format(self) -> str:
        level = "error" if self.fatal else "warning"
        return f"{level}: {self.kind}: {self.path}: {self.detail}"


@dataclass
class SplitCounts:
    """How many normal and defect images one split holds, and the positives of each class."""

    n_normal: int = 0
    n_defect: int = 0
    positives: dict[str, int] = field(default_factory=dict)


@dataclass
class CheckReport:
    """What `check_dataset` found: counts, label co-occurrence, image sizes and problems."""

    root: Path
    layout: str
    classes: tuple[str, ...]
    counts: dict[str, SplitCounts]
    cooccurrence: list[list[int]]  # [i][j]: images positive for both class i and j
    sizes: Counter[tuple[int, int]]  # (width, height) of every readable image
    problems: list[Problem]
    usable: bool

    @property
    def fatal_problems(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    def format(self) -> str:
        """The report for a person: counts, co-occurrence, sizes, then every problem."""
        lines = [f"dataset {self.root} ({self.layout}, {len(self.classes)} classes)", ""]
        lines += text_table(
            ["split", "normal", "defect", *self.classes],
            [
                [split, c.n_normal, c.n_defect, *(c.positives.get(k, 0) for k in self.classes)]
                for split, c in self.counts.items()
            ],
        )
        lines += ["", "defect label co-occurrence (images positive for both):"]
        lines += text_table(
            ["", *self.classes],
            [[name, *row] for name, row in zip(self.classes, self.cooccurrence, strict=True)],
        )
        lines += ["", "image sizes (width x height):"]
        common = self.sizes.most_common(10)
        lines += [f"  {w} x {h}: {n}" for (w, h), n in common]
        if len(self.sizes) > len(common):
            rest = sum(self.sizes.values()) - sum(n for _, n in common)
            lines.append(f"  {len(self.sizes) - len(common)} other sizes: {rest}")
        n_fatal = len(self.fatal_problems)
        lines += [
            "",
            f"problems: {n_fatal} errors, {len(self.problems) - n_fatal} warnings",
            *(f"  {p.format()}" for p in self.problems),
            "",
            "usable for training" if self.usable else "NOT usable for training: fix the errors",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A JSON-serialisable form of the report."""
        return {
            "root": str(self.root),
            "layout": self.layout,
            "classes": list(self.classes),
            "counts": {
                split: {"n_normal": c.n_normal, "n_defect": c.n_defect, "positives": c.positives}
                for split, c in self.counts.items()
            },
            "cooccurrence": self.cooccurrence,
            "sizes": [
                {"width": w, "height": h, "count": n} for (w, h), n in self.sizes.most_common()
            ],
            "problems": [
                {"path": str(p.path), "kind": p.kind, "detail": p.detail, "fatal": p.fatal}
                for p in self.problems
            ],
            "usable": self.usable,
        }


def check_dataset(root: Path, min_size: int = 32, workers: int | None = None) -> CheckReport:
    """Read a dataset in any supported layout and check every image and label.

    Raises DganError when the layout is not recognised or the labels cannot be parsed.
    `workers` threads decode the images (default: one per CPU core).
    """
    return _check_index(open_dataset(Path(root)), min_size, workers)


def require_usable(root: Path, min_size: int = 32, workers: int | None = None) -> DatasetIndex:
    """Open a dataset for training; raise DganError listing its errors when it is unusable."""
    index = open_dataset(Path(root))
    report = _check_index(index, min_size, workers)
    if report.usable:
        return index
    fatal = report.fatal_problems
    lines = [p.format() for p in fatal[:MAX_PROBLEM_LINES]]
    if len(fatal) > MAX_PROBLEM_LINES:
        lines.append(f"... and {len(fatal) - MAX_PROBLEM_LINES} more errors")
    raise DganError(
        f"dataset {index.root} is not usable for training ({len(fatal)} errors):\n"
        + "\n".join(lines)
        + f"\nFix these files or labels; 'dgan data check {index.root}' prints the full report."
    )


def _check_index(index: DatasetIndex, min_size: int, workers: int | None) -> CheckReport:
    if min_size < 1:
        raise DganError(f"min_size must be at least 1, got {min_size}.", exit_code=2)
    if workers is not None and workers < 1:
        raise DganError(f"workers must be at least 1, got {workers}.", exit_code=2)
    problems = _layout_problems(index)
    sizes: Counter[tuple[int, int]] = Counter()
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for size, found in pool.map(partial(_inspect_sample, min_size=min_size), index.samples):
            problems += found
            if size is not None:
                sizes[size] += 1
    counts = _counts(index)
    if counts["train"].n_normal == 0:
        problems.append(
            Problem(
                index.root,
                NO_NORMALS,
                "training needs defect-free images (all-zero labels) in the train split; "
                "add some, e.g. crops of full-resolution normal images.",
                fatal=True,
            )
        )
    if counts["train"].n_defect == 0:
        problems.append(
            Problem(
                index.root,
                NO_DEFECTS,
                "training needs defect images (at least one positive label) in the train split.",
                fatal=True,
            )
        )
    problems.sort(key=lambda p: (not p.fatal, str(p.path), p.kind))  # errors first, by file
    return CheckReport(
        root=index.root,
        layout=index.layout,
        classes=index.classes,
        counts=counts,
        cooccurrence=_cooccurrence(index),
        sizes=sizes,
        problems=problems,
        usable=not any(p.fatal for p in problems),
    )


def _inspect_sample(sample: Sample, min_size: int) -> tuple[tuple[int, int] | None, list[Problem]]:
    """Open and decode one image (and its mask); return its size and the problems found."""
    path = sample.path
    try:
        n_bytes = path.stat().st_size
    except OSError:
        detail = "the labels list this file but it does not exist; restore it or delete its row."
        return None, [Problem(path, MISSING_FILE, detail, fatal=True)]
    if n_bytes == 0:
        detail = "the file is empty (0 bytes); replace it or delete it and its label row."
        return None, [Problem(path, EMPTY_FILE, detail, fatal=True)]
    try:
        mode, size = _decode(path)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError... on corrupt data
        detail = f"cannot be decoded ({err}); replace it or delete it and its label row."
        return None, [Problem(path, UNREADABLE, detail, fatal=True)]
    problems = []
    if mode != "RGB":
        detail = f"mode {mode}, training expects 8-bit RGB; re-save it as RGB."
        problems.append(Problem(path, BAD_MODE, detail, fatal=True))
    if min(size) < min_size:
        detail = (
            f"{size[0]}x{size[1]} is below the minimum side of {min_size} px; "
            "remove it or lower the minimum."
        )
        problems.append(Problem(path, TOO_SMALL, detail, fatal=True))
    if sample.mask is not None:
        problems += _inspect_mask(sample.mask, size)
    return size, problems


def _inspect_mask(mask: Path, image_size: tuple[int, int]) -> list[Problem]:
    try:
        mode, size = _decode(mask)
    except Exception as err:  # as in _inspect_sample
        detail = f"cannot be decoded ({err}); replace the mask or delete it."
        return [Problem(mask, BAD_MASK, detail, fatal=True)]
    problems = []
    if mode != "L":
        detail = f"mode {mode}; masks must be single-channel 8-bit (mode L)."
        problems.append(Problem(mask, BAD_MASK, detail, fatal=True))
    if size != image_size:
        detail = (
            f"mask is {size[0]}x{size[1]} but its image is {image_size[0]}x{image_size[1]}; "
            "a mask must match its image's size."
        )
        problems.append(Problem(mask, BAD_MASK, detail, fatal=True))
    return problems


def _decode(path: Path) -> tuple[str, tuple[int, int]]:
    """Mode and size of an image after decoding all of it, so truncated files fail here."""
    with Image.open(path) as image:
        image.load()
        return image.mode, image.size


def _layout_problems(index: DatasetIndex) -> list[Problem]:
    if index.layout == "codebrim":
        return _codebrim_problems(index)
    return _folder_problems(index)


def _folder_problems(index: DatasetIndex) -> list[Problem]:
    """Labels that contradict their folder, rows listed twice, and images missing from labels."""
    problems = []
    seen: dict[Path, tuple[int, ...]] = {}
    for s in index.samples:
        if s.path in seen:
            # Repeated rows only reweight an image; rows that disagree leave its labels unknown.
            conflict = seen[s.path] != s.labels
            detail = "labels.csv has more than one row for this file" + (
                " with different labels; keep the right one." if conflict else "; keep one."
            )
            problems.append(Problem(s.path, DUPLICATE_ROW, detail, fatal=conflict))
        seen[s.path] = s.labels
        folder = _top_folder(index.root, s.path)
        if folder == "normal" and not s.is_normal:
            positive = [c for c, v in zip(index.classes, s.labels, strict=True) if v]
            detail = (
                f"an image under normal/ is labelled {', '.join(positive)}; "
                "set its labels to 0 or move it to defect/."
            )
            problems.append(Problem(s.path, NORMAL_WITH_LABELS, detail, fatal=True))
        elif folder == "defect" and s.is_normal:
            detail = (
                "an image under defect/ has no positive label, so it would train as normal; "
                "label its defect classes or move it to normal/."
            )
            problems.append(Problem(s.path, ALL_ZERO_DEFECT, detail, fatal=True))
    for folder in ("normal", "defect"):
        for path in image_files(index.root / folder):
            if path not in seen:
                detail = "not listed in labels.csv, so training ignores it; add a row or remove it."
                problems.append(Problem(path, UNLISTED_FILE, detail, fatal=False))
    return problems


def _codebrim_problems(index: DatasetIndex) -> list[Problem]:
    """Defect crops that CODEBRIM's metadata cannot label; they are left out of training."""
    scan = codebrim.scan_codebrim(index.root)
    problems = [
        Problem(
            path,
            ALL_ZERO_DEFECT,
            "the metadata gives this defect crop no defect class; it is left out of training.",
            fatal=False,
        )
        for path in scan.all_zero
    ]
    problems += [
        Problem(
            path,
            UNLISTED_FILE,
            f"no entry for {codebrim.metadata_name(path.name)} in metadata/defects.xml; "
            "it is left out of training.",
            fatal=False,
        )
        for path in scan.unlisted
    ]
    return problems


def _top_folder(root: Path, path: Path) -> str | None:
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return None
    return parts[0] if len(parts) > 1 else None


def _counts(index: DatasetIndex) -> dict[str, SplitCounts]:
    """Per-split counts, in SPLITS order; train is always present, other splits when used."""
    counts = {}
    for split in SPLITS:
        samples = index.select(split)
        if not samples and split != "train":
            continue
        positives = {c: sum(s.labels[i] for s in samples) for i, c in enumerate(index.classes)}
        n_normal = sum(s.is_normal for s in samples)
        counts[split] = SplitCounts(n_normal, len(samples) - n_normal, positives)
    return counts


def _cooccurrence(index: DatasetIndex) -> list[list[int]]:
    n = len(index.classes)
    matrix = [[0] * n for _ in range(n)]
    for s in index.samples:
        positive = [i for i, v in enumerate(s.labels) if v]
        for i in positive:
            for j in positive:
                matrix[i][j] += 1
    return matrix
