"""The defect inspector's data: real splits, synthesized sets mixed into training (Sec. 4.2).

- The real set (folder format or CODEBRIM) gives train, val and test. `defect_fraction` thins its
  training defects in memory, for the scarce-defect setting of Table 3 in miniature.
- Each synthesized set (folder format: defect/ images and normal/ restored normals) is training
  data only; its split column is ignored. Its images are marked synthetic for the source
  classifier, and its class names must equal the real set's.
- Each epoch sees every real training image once and `synthetic_ratio` times as many synthetic
  images, drawn without replacement from one endless shuffled stream, so over the epochs every
  synthetic image is used. The order of epoch e depends only on (seed, e): a resumed run and N
  processes see what one uninterrupted process sees.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dgan.data import DatasetIndex, Sample, open_dataset
from dgan.data.loader import leave_signals_to_the_main_process, load_image
from dgan.errors import DganError

_REAL_ORDER, _SYNTHETIC_ORDER, _MIX_ORDER = range(3)  # independent random streams


@dataclass(frozen=True)
class LabelledImage:
    """One image the inspector trains or is evaluated on."""

    path: Path
    labels: tuple[int, ...]  # multi-hot, in the inspector's class order
    synthetic: bool = False


@dataclass
class InspectionData:
    """Everything one inspector run reads: classes, real train/val/test and synthetic images."""

    classes: list[str]
    train: list[LabelledImage]  # real training images, after defect_fraction
    synthetic: list[LabelledImage]
    val: list[LabelledImage]
    test: list[LabelledImage]
    synthetic_per_epoch: int

    def classes_without_positives(self) -> list[str]:
        """Classes that no training image (real or synthetic) is positive for."""
        return [
            c for i, c in enumerate(self.classes) if not _positives(self.train + self.synthetic, i)
        ]

    def balance(self) -> str:
        """Class balance per part, as printed when training starts."""
        from dgan.report import text_table

        parts = [("train real", self.train), ("train synthetic", self.synthetic)]
        parts += [("val", self.val), ("test", self.test)]
        rows = [
            [name, len(items), sum(not any(s.labels) for s in items),
             sum(any(s.labels) for s in items),
             *(_positives(items, i) for i in range(len(self.classes)))]
            for name, items in parts
        ]  # fmt: skip
        lines = ["class balance (images; the class columns count positives):"]
        lines += text_table(["", "images", "normal", "defect", *self.classes], rows)
        if self.synthetic:
            lines.append(f"  synthetic images drawn per epoch: {self.synthetic_per_epoch}")
        return "\n".join(lines)


def _positives(items: Sequence[LabelledImage], column: int) -> int:
    return sum(s.labels[column] for s in items)


def subsample_defects(
    train: list[Sample], fraction: float, seed: int
) -> tuple[list[Sample], int, int]:
    """Keep round(fraction * normals) of the training defects, chosen by `seed`; all normals.

    Returns (samples, defects kept, defects available). Nothing is copied on disk.
    """
    normals = [s for s in train if s.is_normal]
    defects = [s for s in train if not s.is_normal]
    keep = min(len(defects), max(1, round(fraction * len(normals))))
    chosen = np.sort(np.random.default_rng([seed, 7]).choice(len(defects), keep, replace=False))
    kept = {id(defects[i]) for i in chosen}
    return [s for s in train if s.is_normal or id(s) in kept], keep, len(defects)


def _labelled(samples: Sequence[Sample], columns: Sequence[int], synthetic: bool = False):
    return [LabelledImage(s.path, tuple(s.labels[c] for c in columns), synthetic) for s in samples]


def _read_index(root: Path, check: bool) -> DatasetIndex:
    if check:
        from dgan.data.check import require_usable

        return require_usable(root)
    return open_dataset(root)


def read_synthetic(
    directory: Path, classes: Sequence[str], check: bool = True
) -> list[LabelledImage]:
    """All images of one synthesized set, labelled in `classes` order and marked synthetic."""
    index = _read_index(Path(directory), check)
    if set(index.classes) != set(classes):
        missing = [c for c in classes if c not in index.classes]
        extra = [c for c in index.classes if c not in classes]
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"extra {', '.join(extra)}" if extra else "",
            )
            if part
        )
        raise DganError(
            f"synthetic set {directory} has classes {', '.join(index.classes)}, but the real set "
            f"has {', '.join(classes)} ({detail}). Synthesize with the real set's categories, or "
            "rename the class columns of its labels.csv.",
            exit_code=2,
        )
    return _labelled(index.samples, [index.classes.index(c) for c in classes], synthetic=True)


def split_images(index: DatasetIndex, split: str) -> list[LabelledImage]:
    """The images of one split of a real set, in the set's own class order."""
    return _labelled(index.select(split), range(len(index.classes)))


def load_inspection_data(
    root: Path,
    synthetic: Sequence[Path],
    synthetic_ratio: float,
    defect_fraction: float | None = None,
    subsample_seed: int = 0,
    check: bool = True,
    events=None,
) -> InspectionData:
    """Read the real set and the synthesized sets; raise DganError on empty or mismatched data.

    With `check`, every image is decoded once first (`dgan data check`), so a bad file fails
    here rather than mid-run. `events` receives notes (defect thinning).
    """
    index = _read_index(Path(root), check)
    classes = list(index.classes)
    train_samples = index.select("train")
    if defect_fraction is not None:
        train_samples, kept, available = subsample_defects(
            train_samples, defect_fraction, subsample_seed
        )
        n_normal = sum(s.is_normal for s in train_samples)
        note = (
            f"defect_fraction {defect_fraction}: kept {kept} of {available} real training defects"
        )
        if kept == available and round(defect_fraction * n_normal) > available:
            note += f" (the fraction asks for {round(defect_fraction * n_normal)}; all are kept)"
        if events is not None:
            events.info(f"{note}, {n_normal} normals")
    data = InspectionData(
        classes=classes,
        train=_labelled(train_samples, range(len(classes))),
        synthetic=[img for d in synthetic for img in read_synthetic(d, classes, check)],
        val=split_images(index, "val"),
        test=split_images(index, "test"),
        synthetic_per_epoch=0,
    )
    for split in ("train", "val", "test"):
        if not getattr(data, split):
            raise DganError(
                f"the {split} split of {root} is empty. The inspector trains on train, keeps the "
                "best epoch on val and reports test: give every split images (the 'split' column "
                "of labels.csv, or CODEBRIM's train/ val/ test/ folders).",
                exit_code=2,
            )
    if data.synthetic:
        data.synthetic_per_epoch = round(synthetic_ratio * len(data.train))
    return data


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class ImageSet(Dataset):
    """Item i: (uint8 image (3, size, size), float labels (C,), 1.0 if synthetic else 0.0)."""

    def __init__(self, images: Sequence[LabelledImage], image_size: int) -> None:
        self.paths = [s.path for s in images]
        self.labels = torch.tensor([s.labels for s in images], dtype=torch.float32)
        self.synthetic = torch.tensor([float(s.synthetic) for s in images])
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(load_image(self.paths[i], self.image_size))
        return image, self.labels[i], self.synthetic[i]


def epoch_order(n_real: int, n_synthetic: int, per_epoch: int, epoch: int, seed: int) -> np.ndarray:
    """Item ids of epoch `epoch` (1-based): real ids 0..n_real-1, synthetic ids after them."""
    real = np.random.default_rng([seed, _REAL_ORDER, epoch]).permutation(n_real)
    if n_synthetic == 0 or per_epoch == 0:
        return real
    # Synthetic stream positions (epoch-1)*per_epoch ...; pass k of the set is its own shuffle.
    positions = np.arange((epoch - 1) * per_epoch, epoch * per_epoch)
    passes, offsets = np.divmod(positions, n_synthetic)
    synthetic = np.empty(per_epoch, dtype=np.int64)
    for k in np.unique(passes):
        order = np.random.default_rng([seed, _SYNTHETIC_ORDER, int(k)]).permutation(n_synthetic)
        synthetic[passes == k] = order[offsets[passes == k]]
    mixed = np.concatenate([real, n_real + synthetic])
    return mixed[np.random.default_rng([seed, _MIX_ORDER, epoch]).permutation(len(mixed))]


def steps_per_epoch(data: InspectionData, batch_size: int) -> int:
    """Optimizer steps per epoch; the last batch is filled up from the epoch's start."""
    return -(-(len(data.train) + data.synthetic_per_epoch) // batch_size)


class EpochBatches:
    """This process's slice of every global batch, from epoch `first` through `last`.

    `skip` leaves out the first steps of epoch `first`, to resume a run stopped mid-epoch.
    """

    def __init__(
        self, data: InspectionData, batch_size: int, first: int, last: int, seed: int,
        rank: int = 0, world: int = 1, skip: int = 0,
    ) -> None:  # fmt: skip
        if batch_size % world:
            raise DganError(
                f"train.batch_size={batch_size} does not divide over {world} processes; "
                f"make it a multiple of {world}.",
                exit_code=2,
            )
        self.data, self.batch_size, self.first, self.last = data, batch_size, first, last
        self.seed, self.rank, self.world, self.skip = seed, rank, world, skip

    def __iter__(self) -> Iterator[list[int]]:
        local = self.batch_size // self.world
        steps = steps_per_epoch(self.data, self.batch_size)
        for epoch in range(self.first, self.last + 1):
            order = epoch_order(
                len(self.data.train), len(self.data.synthetic), self.data.synthetic_per_epoch,
                epoch, self.seed,
            )  # fmt: skip
            order = np.resize(order, steps * self.batch_size)  # wraps round to fill the last batch
            for step in range(self.skip if epoch == self.first else 0, steps):
                start = step * self.batch_size + self.rank * local
                yield order[start : start + local].tolist()

    def __len__(self) -> int:
        return (self.last - self.first + 1) * steps_per_epoch(
            self.data, self.batch_size
        ) - self.skip


def train_loader(
    data: InspectionData, image_size: int, batch_size: int, first_epoch: int, last_epoch: int,
    seed: int, rank: int = 0, world: int = 1, num_workers: int = 0, pin_memory: bool = False,
    skip: int = 0,
) -> DataLoader:  # fmt: skip
    """One DataLoader over epochs first..last of the mixed training stream (see EpochBatches)."""
    return DataLoader(
        ImageSet(data.train + data.synthetic, image_size),
        batch_sampler=EpochBatches(
            data, batch_size, first_epoch, last_epoch, seed, rank, world, skip
        ),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=leave_signals_to_the_main_process,
        # Its own generator: a DataLoader otherwise draws from the global RNG, which the
        # checkpoint restores, and resume would see a shifted stream of flips.
        generator=torch.Generator().manual_seed(seed),
    )


def eval_loader(
    images: Sequence[LabelledImage], image_size: int, batch_size: int, rank: int = 0,
    world: int = 1, num_workers: int = 0,
) -> DataLoader:  # fmt: skip
    """This process's shard (every world-th image) of an evaluation split, in order."""
    return DataLoader(
        ImageSet(list(images)[rank::world], image_size),
        batch_size=batch_size,
        num_workers=num_workers,
        worker_init_fn=leave_signals_to_the_main_process,
        generator=torch.Generator().manual_seed(0),
    )


def to_unit_interval(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [0, 1], on the device, as the inspector takes its input."""
    return images.float().div_(255.0)
