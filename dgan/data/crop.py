"""Extra normal patches cropped from full-resolution defect-free images.

The paper adds 50,000 such patches to CODEBRIM's normal set. Crop i depends only on
`seed`, `i` and the sorted list of source images, so a run is reproducible whatever the number
of workers. Each source image is decoded once for all the crops taken from it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from dgan.data.folder import write_labels
from dgan.data.index import CODEBRIM_CLASSES, Sample
from dgan.errors import DganError

log = logging.getLogger(__name__)

SOURCE_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_PATCH_SIZE = 16
# Crops per task: one decode of the source image is shared by this many crops, yet a few large
# images still spread over all workers.
CROPS_PER_JOB = 256


@dataclass(frozen=True)
class CropBox:
    """Patch `index` of the output, a `side`-pixel square at (left, top) of one source image."""

    index: int
    left: int
    top: int
    side: int


def crop_normals(
    src: Path, out: Path, n: int, size: int, seed: int = 0, workers: int | None = None
) -> int:
    """Write `n` random `size`x`size` crops of the images under `src` as a folder dataset.

    Each crop picks a source image, a side between `size` and the image's shorter side, and a
    position, all from an RNG seeded with (seed, i); it is then resized to `size`. The result,
    `out/normal/NNNNNN.png` plus `out/labels.csv` (all-zero CODEBRIM labels, split train),
    appears at `out` only when complete. `workers` threads decode and crop (default: one per
    CPU core). Returns the number of patches written.
    """
    src, out = Path(src), Path(out)
    if n < 1:
        raise DganError(f"the number of crops must be at least 1, got {n}.", exit_code=2)
    if size < MIN_PATCH_SIZE:
        raise DganError(
            f"the crop size must be at least {MIN_PATCH_SIZE} px, got {size}.", exit_code=2
        )
    if seed < 0:
        raise DganError(f"the seed must be 0 or more, got {seed}.", exit_code=2)
    if workers is not None and workers < 1:
        raise DganError(f"workers must be at least 1, got {workers}.", exit_code=2)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DganError(
            f"{out} already exists and is not an empty directory; choose a new output path "
            "or remove it."
        )
    sources = _usable_sources(src, size, workers)
    boxes = _plan(sources, n, size, seed)

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        (partial / "normal").mkdir()
        _write_all(boxes, size, partial / "normal", workers)
        normal_labels = (0,) * len(CODEBRIM_CLASSES)
        samples = [
            Sample(path=Path("normal") / _patch_name(i), labels=normal_labels, split="train")
            for i in range(n)
        ]
        write_labels(partial, CODEBRIM_CLASSES, samples)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return n


def _write_all(
    boxes: dict[Path, list[CropBox]], size: int, out_dir: Path, workers: int | None
) -> None:
    """Write every crop, in tasks of up to CROPS_PER_JOB crops of one source image."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        jobs = [
            pool.submit(
                _write_crops, path, image_boxes[start : start + CROPS_PER_JOB], size, out_dir
            )
            for path, image_boxes in boxes.items()
            for start in range(0, len(image_boxes), CROPS_PER_JOB)
        ]
        try:
            for job in jobs:
                job.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)  # the output is discarded: stop early
            raise


def _usable_sources(src: Path, size: int, workers: int | None) -> list[tuple[Path, int, int]]:
    """Sorted (path, width, height) of the source images whose shorter side is at least `size`."""
    if not src.is_dir():
        raise DganError(f"{src} is not a directory; point at a folder of full-resolution images.")
    paths = sorted(
        (p for p in src.rglob("*") if p.suffix.lower() in SOURCE_SUFFIXES and p.is_file()),
        key=lambda p: p.relative_to(src).as_posix(),
    )
    if not paths:
        raise DganError(
            f"{src} holds no images (.png, .jpg, .jpeg); point at a folder of full-resolution "
            "normal images."
        )
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        sizes = list(pool.map(_image_size, paths))
    usable = [(p, *wh) for p, wh in zip(paths, sizes, strict=True) if wh and min(wh) >= size]
    n_unreadable = sum(wh is None for wh in sizes)
    n_small = len(paths) - len(usable) - n_unreadable
    skipped = f"{n_small} of {len(paths)} images are smaller than {size} px" + (
        f" and {n_unreadable} cannot be opened" if n_unreadable else ""
    )
    if not usable:
        raise DganError(f"no usable image under {src}: {skipped}. Use a smaller crop size.")
    if n_small or n_unreadable:
        log.warning("crop_normals: skipping images under %s: %s.", src, skipped)
    return usable


def _image_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as image:  # reads the header only
            return image.size
    except Exception:  # Pillow raises OSError, SyntaxError, ValueError... on corrupt files
        return None


def _plan(
    sources: list[tuple[Path, int, int]], n: int, size: int, seed: int
) -> dict[Path, list[CropBox]]:
    """Draw every crop from its own RNG, and group the crops by source image."""
    boxes: dict[Path, list[CropBox]] = defaultdict(list)
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        path, width, height = sources[int(rng.integers(len(sources)))]
        side = int(rng.integers(size, min(width, height) + 1))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        boxes[path].append(CropBox(i, left, top, side))
    return boxes


def _write_crops(path: Path, boxes: list[CropBox], size: int, out_dir: Path) -> None:
    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except Exception as err:  # as in _image_size: the header was fine, the pixel data is not
        raise DganError(f"{path} cannot be decoded ({err}); remove or replace it.") from None
    for box in boxes:
        region = (box.left, box.top, box.left + box.side, box.top + box.side)
        # reducing_gap 3: box-reduce large crops first, twice as fast and visually the same.
        patch = image.resize((size, size), Image.Resampling.LANCZOS, box=region, reducing_gap=3.0)
        patch.save(out_dir / _patch_name(box.index), format="PNG", compress_level=1)


def _patch_name(i: int) -> str:
    return f"{i:06d}.png"
