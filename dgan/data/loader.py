"""The training stream for Defect-GAN: unpaired normals and defects, seeded by stream position.

Every batch element is keyed by its global position p in the stream (p = step * batch + j). The
normal, the defect, the target label for defacement, the flips and the gradient-penalty mixing
weights of element p depend only on (seed, p). So two runs with one seed see the same batches,
a resumed run continues the stream exactly, and N processes together see what one process sees
with the same global batch. Images are read lazily from disk, so the set need not fit in memory.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dgan.data import DatasetIndex, Sample
from dgan.errors import DganError

_NORMAL, _DEFECT, _TARGET, _AUGMENT = range(4)  # independent random streams
# Sides of a random target region, as shares of the image side: training, synthesis and
# evaluation all draw their boxes from this range.
BOX_SIDE = (0.35, 0.75)


def leave_signals_to_the_main_process(worker_id: int) -> None:
    """A loader worker's init: ignore Ctrl-C and SIGTERM, which reach the whole process group
    (a terminal, a queue's cancel). The main process then checkpoints and stops, and its loader
    shuts the workers down; a worker killed first would make the loader raise instead."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def select_classes(index: DatasetIndex, classes: Sequence[str] | None) -> list[int]:
    """Column indices of `classes` in the dataset's labels; all columns when None."""
    if classes is None:
        return list(range(len(index.classes)))
    unknown = [c for c in classes if c not in index.classes]
    if unknown:
        raise DganError(
            f"unknown categor{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)}: "
            f"the dataset at {index.root} has {', '.join(index.classes)}",
            exit_code=2,
        )
    return [index.classes.index(c) for c in classes]


def load_image(path, size: int) -> np.ndarray:
    """An RGB image as a (3, size, size) uint8 array, resized with antialiasing when needed."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
        return np.asarray(img).transpose(2, 0, 1).copy()


class UnpairedStream(Dataset):
    """Map-style dataset over stream positions; item p is a dict of uint8 images and labels."""

    def __init__(
        self,
        normals: Sequence[Sample],
        defects: Sequence[Sample],
        columns: Sequence[int],
        image_size: int,
        flip: bool,
        seed: int,
        region_prob: float = 0.0,
        set_power: float = 1.0,
    ) -> None:
        if not normals or not defects:
            missing = "normal" if not normals else "defect"
            raise DganError(
                f"the training split has no {missing} images; Defect-GAN needs both normals and "
                "defects at every step. Check the dataset with 'dgan data check DIR'."
            )
        self.normals = [s.path for s in normals]
        self.defects = [s.path for s in defects]
        self.labels = np.array([[s.labels[c] for c in columns] for s in defects], np.float32)
        self.image_size, self.flip, self.seed = image_size, flip, seed
        self.region_prob = region_prob
        # The label sets that occur, their defects, and how often each is drawn (set_power).
        self.label_sets, which, counts = np.unique(
            self.labels, axis=0, return_inverse=True, return_counts=True
        )
        self.set_members = [np.flatnonzero(which.ravel() == k) for k in range(len(counts))]
        weights = counts.astype(np.float64) ** set_power
        self.set_probabilities = weights / weights.sum()
        self.set_power = set_power

    def __len__(self) -> int:  # the stream is infinite; this is one pass over the defects
        return len(self.defects)

    @lru_cache(maxsize=8)  # noqa: B019 - a few epochs' permutations per worker
    def _permutation(self, stream: int, epoch: int, n: int) -> np.ndarray:
        return np.random.default_rng([self.seed, stream, epoch]).permutation(n)

    def _pick(self, stream: int, position: int, n: int) -> int:
        epoch, offset = divmod(position, n)
        return int(self._permutation(stream, epoch, n)[offset])

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, _AUGMENT, position])
        flips, alpha = rng.random(2) < 0.5, rng.random(2).astype(np.float32)
        # A random box (x0, y0, w, h as fractions) for the defacement target, used with
        # probability region_prob; the first value flags its use.
        use, bw, bh, u, v = rng.random(5)
        lo, hi = BOX_SIDE
        bw, bh = lo + (hi - lo) * bw, lo + (hi - lo) * bh
        box = [float(use < self.region_prob), u * (1 - bw), v * (1 - bh), bw, bh]
        normal = load_image(
            self.normals[self._pick(_NORMAL, position, len(self.normals))], self.image_size
        )
        if self.set_power == 1:  # every defect once per pass, in a seeded order
            d = self._pick(_DEFECT, position, len(self.defects))
        else:  # a label set by its weight, then one of its defects
            draw = np.random.default_rng([self.seed, _DEFECT, position])
            members = self.set_members[draw.choice(len(self.set_members), p=self.set_probabilities)]
            d = int(members[draw.integers(len(members))])
        defect = load_image(self.defects[d], self.image_size)
        if self.flip:
            normal = normal[:, :, ::-1] if flips[0] else normal
            defect = defect[:, :, ::-1] if flips[1] else defect
        # The defacement target follows the real label distribution, co-occurrence included,
        # or with set_power < 1 the same flatter one as the real defects above.
        if self.set_power == 1:
            target = self.labels[self._pick(_TARGET, position, len(self.defects))]
        else:
            draw = np.random.default_rng([self.seed, _TARGET, position])
            target = self.label_sets[draw.choice(len(self.label_sets), p=self.set_probabilities)]
        # D's augmentation (dgan.train.augment), from its own stream so that the draws above
        # stay the same: per image D reads, [d, n, d', n'] in D's update and [d', n'] in G's.
        d_augment = np.random.default_rng([self.seed, _AUGMENT, position, 1]).random((6, 4))
        # Which layer of a layered label set G paints on top (generator.label_sets), likewise.
        layer_draw = np.random.default_rng([self.seed, _AUGMENT, position, 2]).random()
        return {
            "normal": torch.from_numpy(np.ascontiguousarray(normal)),
            "defect": torch.from_numpy(np.ascontiguousarray(defect)),
            "defect_labels": torch.from_numpy(self.labels[d]),
            "target_labels": torch.from_numpy(target),
            "alpha": torch.from_numpy(alpha),
            "region": torch.tensor(box, dtype=torch.float32),
            "d_augment": torch.from_numpy(d_augment.astype(np.float32)),
            "layer_draw": torch.tensor(layer_draw, dtype=torch.float32),
        }


class StreamBatches:
    """Batches of stream positions for one process: rank r of W takes its slice of each step."""

    def __init__(self, batch_size: int, rank: int, world: int, start_step: int = 0) -> None:
        if batch_size % world:
            raise DganError(
                f"{batch_size} stream positions per step do not divide evenly over {world} "
                f"processes; make train.batch_size a multiple of {2 * world}",
                exit_code=2,
            )
        self.batch_size, self.rank, self.world, self.start_step = (
            batch_size,
            rank,
            world,
            start_step,
        )

    def __iter__(self) -> Iterator[list[int]]:
        local = self.batch_size // self.world
        step = self.start_step
        while True:
            first = step * self.batch_size + self.rank * local
            yield list(range(first, first + local))
            step += 1


def gan_loader(
    stream: UnpairedStream,
    batch_size: int,
    rank: int = 0,
    world: int = 1,
    start_step: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """An endless DataLoader over `stream`, starting at `start_step` (for exact resume)."""
    return DataLoader(
        stream,
        batch_sampler=StreamBatches(batch_size, rank, world, start_step),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        worker_init_fn=leave_signals_to_the_main_process,
        # Its own generator: a DataLoader otherwise draws its worker seed from the global RNG,
        # which would shift the noise-injection stream of a resumed run.
        generator=torch.Generator().manual_seed(stream.seed),
    )


def to_unit_range(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]; done on the device so the loader moves 4x fewer bytes."""
    return images.to(dtype).div_(127.5).sub_(1.0)
