"""Fixed evaluation inputs: the same normals, asked labels, boxes and real references every time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dgan.data import DatasetIndex, Sample
from dgan.data.loader import BOX_SIDE, load_image
from dgan.errors import DganError
from dgan.metrics.fid import (
    require_images,
)


@dataclass
class EvalSet:
    """The inputs of one evaluation, the same every time it runs."""

    split: str
    normals: Tensor  # (N, 3, S, S) uint8: a seeded order of the split's normals, cycled
    labels: Tensor  # (N, C) asked categories, drawn from the dataset's label distribution
    boxes: Tensor  # (N, 4) x0, y0, x1, y1 in pixels: where spatial control asks for the defect
    reference: list[Path] = field(default_factory=list)  # real defects for FID/KID

    @property
    def n(self) -> int:
        return self.normals.shape[0]


def seeded_order(count: int, seed: int, salt: int) -> np.ndarray:
    return np.random.default_rng([seed, salt]).permutation(count)


def real_defects(index: DatasetIndex, split: str, columns: Sequence[int]) -> list[Sample]:
    """The split's defects showing at least one of the `columns` categories, sorted by path."""
    chosen = [s for s in index.select(split, normal=False) if any(s.labels[c] for c in columns)]
    return sorted(chosen, key=lambda s: str(s.path))


def load_images(paths: Sequence[Path], size: int) -> Tensor:
    """(N, 3, size, size) uint8, resized as the training stream does."""
    return torch.stack([torch.from_numpy(load_image(p, size)) for p in paths])


def load_masks(paths: Sequence[Path], size: int) -> Tensor:
    """(N, 1, size, size) floats: 1 where a dataset's defect mask is set, resized as its image."""
    return torch.stack([torch.from_numpy(load_image(p, size)[:1] > 127) for p in paths]).float()


def random_boxes(n: int, size: int, seed: int) -> Tensor:
    """n boxes with sides of 35-75% of the image, placed uniformly, as training's random regions."""
    rng = np.random.default_rng([seed, 3])
    sides = np.clip(np.round(rng.uniform(*BOX_SIDE, size=(n, 2)) * size), 1, size).astype(int)
    x0 = np.floor(rng.random(n) * (size - sides[:, 0] + 1)).astype(int)
    y0 = np.floor(rng.random(n) * (size - sides[:, 1] + 1)).astype(int)
    return torch.from_numpy(np.stack([x0, y0, x0 + sides[:, 0], y0 + sides[:, 1]], 1))


def box_masks(boxes: Tensor, size: int) -> Tensor:
    """(N, 1, size, size) maps: 1 inside each box."""
    pos = torch.arange(size)
    x0, y0, x1, y1 = (boxes[:, k, None] for k in range(4))
    in_x = (pos >= x0) & (pos < x1)
    in_y = (pos >= y0) & (pos < y1)
    return (in_y[:, :, None] & in_x[:, None, :]).float()[:, None]


def make_eval_set(
    index: DatasetIndex,
    split: str,
    columns: Sequence[int],
    n: int,
    image_size: int,
    seed: int,
    n_reference: int = 0,
) -> EvalSet:
    """n normals of `split` (cycled when fewer) to deface with labels drawn from every real
    defect's labels, random boxes, and `n_reference` real defects of the split for FID/KID."""
    normals = sorted(index.select(split, normal=True), key=lambda s: str(s.path))
    require_images(
        len(normals), f"evaluating split {split!r}", "normal image to deface", 1,
        "Choose a split with normals (--split).",
    )  # fmt: skip
    order = seeded_order(len(normals), seed, 1)
    picked = [normals[order[k % len(order)]].path for k in range(n)]
    pool = [s for s in index.samples if not s.is_normal and any(s.labels[c] for c in columns)]
    if not pool:
        raise DganError(f"{index.root} has no defect showing the generator's categories")
    draw = np.random.default_rng([seed, 2]).integers(0, len(pool), size=n)
    labels = torch.tensor([[pool[i].labels[c] for c in columns] for i in draw], dtype=torch.float32)
    reference: list[Path] = []
    if n_reference:
        defects = real_defects(index, split, columns)
        if len(defects) < n_reference:
            raise DganError(
                f"FID/KID at N={n_reference} need {n_reference} real defects in split {split!r} "
                f"of {index.root}; it has {len(defects)}. Lower N (--n or eval.n) to at most "
                f"{len(defects)}: distances are comparable only at the same N."
            )
        keep = seeded_order(len(defects), seed, 4)[:n_reference]
        reference = [defects[i].path for i in sorted(keep)]
    return EvalSet(
        split, load_images(picked, image_size), labels, random_boxes(n, image_size, seed), reference
    )


def require_split(index: DatasetIndex, split: str) -> None:
    present = sorted({s.split for s in index.samples})
    if split not in present:
        raise DganError(
            f"{index.root} has no split {split!r}; it has {', '.join(present)}. "
            "Choose one with --split.",
            exit_code=2,
        )


def has_transfer(index: DatasetIndex, split: str) -> bool:
    """Whether the held-out surface family (split "transfer") can be evaluated beside `split`."""
    return split != "transfer" and bool(index.select("transfer", normal=True))
