"""What image i of a synthesized set is: its source normal, target labels, region and noise seeds.

Every choice for image i is drawn from its own random stream, keyed by (seed, stream, i), so it
depends only on (seed, i): not on the batch it lands in, the number of processes or a resume.
Source normals are visited in a fresh permutation per pass, so each normal is used evenly.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dgan.data import image_files
from dgan.data.loader import BOX_SIDE
from dgan.errors import DganError

_NORMAL, _LABEL, _REGION, _DEFACE, _RESTORE = range(5)  # independent random streams
Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end-exclusive


@dataclass(frozen=True)
class Item:
    index: int
    normal: int  # position in the list of source normals
    labels: tuple[int, ...]  # multi-hot over the generator's classes
    boxes: tuple[Box, ...] | None  # where defects may go; None with masks or the full image
    mask: int | None  # position in the list of region masks
    deface_seed: int
    restore_seed: int


class Labels:
    """Target categories per image: sampled from real label sets, one fixed set, or balanced."""

    def __init__(
        self,
        num_classes: int,
        prior: np.ndarray | None = None,
        fixed: Sequence[int] | None = None,
        per_class: int | None = None,
    ) -> None:
        self.num_classes, self.prior, self.per_class = num_classes, prior, per_class
        self.fixed = None if fixed is None else tuple(int(v) for v in fixed)

    def __call__(self, rng: np.random.Generator, i: int) -> tuple[int, ...]:
        if self.per_class is not None:  # images [k * per_class, (k + 1) * per_class): class k
            columns = self.fixed_columns()
            onehot = [0] * self.num_classes
            onehot[columns[i // self.per_class]] = 1
            return tuple(onehot)
        if self.fixed is not None:
            return self.fixed
        return tuple(int(v) for v in self.prior[rng.integers(len(self.prior))])

    def fixed_columns(self) -> list[int]:
        if self.fixed is None:
            return list(range(self.num_classes))
        return [c for c, v in enumerate(self.fixed) if v]


def random_box(rng: np.random.Generator, size: int) -> Box:
    """A box covering 35-75% of each side, as the random target regions of training."""
    bw, bh, u, v = rng.random(4)
    lo, hi = BOX_SIDE
    w, h = round((lo + (hi - lo) * bw) * size), round((lo + (hi - lo) * bh) * size)
    x0, y0 = int(u * (size - w)), int(v * (size - h))
    return (x0, y0, x0 + w, y0 + h)


def read_boxes(path: Path, size: int) -> list[tuple[Box, ...]]:
    """Box sets from a CSV with columns x0,y0,x1,y1 (pixels of the generator's image size).

    An optional `image` column groups rows: all rows with one value are one image's boxes.
    Image i of the set uses box set i mod (number of sets).
    """
    path = Path(path)
    if not path.is_file():
        raise DganError(f"boxes file {path} does not exist", exit_code=2)
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    need = ("x0", "y0", "x1", "y1")
    if not rows or any(k not in rows[0] for k in need):
        raise DganError(
            f"{path}: need a header with columns x0,y0,x1,y1 (and optionally image) and at "
            "least one row",
            exit_code=2,
        )
    groups: dict[str, list[Box]] = {}
    for lineno, row in enumerate(rows, start=2):
        try:
            box = tuple(int(float(row[k])) for k in need)
        except (TypeError, ValueError):
            raise DganError(f"{path}:{lineno}: x0,y0,x1,y1 must be numbers, got {row}") from None
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
            raise DganError(
                f"{path}:{lineno}: box ({x0}, {y0}, {x1}, {y1}) is outside the {size}x{size} "
                f"images of this generator, or empty. Coordinates are pixels with "
                f"0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size}.",
                exit_code=2,
            )
        groups.setdefault(row.get("image") or str(lineno), []).append(box)
    return [tuple(boxes) for boxes in groups.values()]


def region_masks(directory: Path) -> list[Path]:
    masks = image_files(Path(directory))
    if not masks:
        raise DganError(
            f"--region masks: {directory} has no mask images (.png/.jpg); give a directory of "
            "masks, white where defects may go",
            exit_code=2,
        )
    return masks


class Plan:
    """Item i of a synthesized set, for i in [0, n)."""

    def __init__(
        self,
        n: int,
        n_normals: int,
        labels: Labels,
        seed: int,
        size: int,
        region: str = "full",
        boxes: Sequence[tuple[Box, ...]] | None = None,
        n_masks: int = 0,
    ) -> None:
        self.n, self.n_normals, self.labels, self.seed = n, n_normals, labels, seed
        self.size, self.region, self.boxes, self.n_masks = size, region, boxes, n_masks
        self._perm: tuple[int, np.ndarray] | None = None

    def _rng(self, stream: int, i: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, stream, i])

    def _normal(self, i: int) -> int:
        epoch, offset = divmod(i, self.n_normals)
        if self._perm is None or self._perm[0] != epoch:
            perm = np.random.default_rng([self.seed, _NORMAL, epoch]).permutation(self.n_normals)
            self._perm = (epoch, perm)
        return int(self._perm[1][offset])

    def _seed(self, stream: int, i: int) -> int:
        return int(np.random.SeedSequence([self.seed, stream, i]).generate_state(1)[0])

    def item(self, i: int) -> Item:
        if not 0 <= i < self.n:
            raise IndexError(i)
        boxes, mask = None, None
        if self.region == "random-box":
            boxes = (random_box(self._rng(_REGION, i), self.size),)
        elif self.region == "boxes":
            boxes = self.boxes[i % len(self.boxes)]
        elif self.region == "masks":
            mask = i % self.n_masks
        return Item(
            index=i,
            normal=self._normal(i),
            labels=self.labels(self._rng(_LABEL, i), i),
            boxes=boxes,
            mask=mask,
            deface_seed=self._seed(_DEFACE, i),
            restore_seed=self._seed(_RESTORE, i),
        )
