"""Sharded measurement: G defaces an eval set, one shard per process; rows are gathered over
processes and reduced to metrics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from dgan.data.loader import to_unit_range
from dgan.evaluation.inputs import EvalSet, box_masks, load_images
from dgan.evaluation.judges import Judges
from dgan.inference import deface
from dgan.metrics import synthesis
from dgan.metrics.fid import (
    FeatureSet,
    cache_path,
    fid_and_kid,
    save_feature_set,
)


def shard(n: int, accelerator=None) -> Tensor:
    """This process's indices of 0..n-1: equal contiguous chunks, the last padded by repeating
    n - 1, so that gathering the chunks in rank order and keeping n rows restores the order."""
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    chunk = math.ceil(n / world)
    return torch.arange(rank * chunk, (rank + 1) * chunk).clamp(max=n - 1)


def gather_rows(rows: Tensor, n: int, accelerator=None) -> Tensor:
    """Every process's rows in rank order, first n kept, on the CPU."""
    if accelerator is not None and accelerator.num_processes > 1:
        rows = accelerator.gather(rows.contiguous())
    return rows[:n].cpu()


def reference_features(
    files: Sequence[Path],
    extractor,
    image_size: int,
    cache_dir: Path,
    batch_size: int,
    device,
    accelerator=None,
) -> tuple[FeatureSet, Path, bool]:
    """Statistics of real images under `extractor`: from the cache when present, else computed
    (sharded over processes) and cached atomically. Returns (stats, cache file, reused)."""
    path = cache_path(cache_dir, files, extractor.name, extractor.weights_hash, image_size)
    reused = path.is_file()
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        decided = [reused]
        broadcast_object_list(decided)  # every process takes the main process's decision
        reused = decided[0]
    if reused:
        return FeatureSet.from_file(path), path, True
    n = len(files)
    rows = []
    mine = shard(n, accelerator).tolist()
    for start in range(0, len(mine), batch_size):
        images = load_images([files[i] for i in mine[start : start + batch_size]], image_size)
        rows.append(extractor(images.to(device).float() / 255))
    stats = FeatureSet.from_features(gather_rows(torch.cat(rows), n, accelerator))
    if accelerator is None or accelerator.is_main_process:
        save_feature_set(stats, path)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return stats, path, False


def _noise_seed(seed: int, start: int, k: int) -> int:
    return ((seed * 1_000_003 + start) * 4 + k) % (2**62)


@torch.no_grad()
def measure(
    G,
    eval_set: EvalSet,
    judges: Judges,
    batch_size: int,
    device,
    seed: int = 0,
    accelerator=None,
    figures: bool = True,
) -> dict[str, Tensor]:
    """Deface the eval set in shards; per image: the synthesis figures, features and inspector
    probabilities, gathered over processes in the set's order."""
    was_training = G.training
    G.eval()
    mine = shard(eval_set.n, accelerator)
    size = eval_set.normals.shape[-1]
    rows: dict[str, list[Tensor]] = {}

    def add(name: str, value: Tensor) -> None:
        rows.setdefault(name, []).append(value.float())

    for start in range(0, len(mine), batch_size):
        idx = mine[start : start + batch_size]
        first = int(idx[0])
        normals = to_unit_range(eval_set.normals[idx].to(device))
        labels = eval_set.labels[idx].to(device)
        fake, masks = deface(G, normals, labels, seed=_noise_seed(seed, first, 0))
        unit = (fake.float() + 1) / 2
        if judges.inception is not None:
            add(f"features:{judges.inception.name}", judges.inception(unit))
        if judges.inspector is not None:
            features, logits = judges.inspector.features_and_logits(unit)
            add(f"features:{judges.inspector.name}", features)
            add("probs", torch.sigmoid(logits[:, judges.inspector_columns]))
        if figures:
            again, _ = deface(G, normals, labels, seed=_noise_seed(seed, first, 1))
            region = box_masks(eval_set.boxes[idx], size).to(device)
            boxed, _ = deface(G, normals, labels, region, seed=_noise_seed(seed, first, 2))
            add("background_change", synthesis.background_change(normals, fake, masks))
            add("background_area", synthesis.background_area(masks))
            add("spatial_precision", synthesis.spatial_precision(normals, boxed, region))
            add("spatial_chance", region.mean(dim=(1, 2, 3)))
            add("diversity_l1", synthesis.pairwise_l1(fake, again))
    G.train(was_training)
    return {k: gather_rows(torch.cat(v), eval_set.n, accelerator) for k, v in rows.items()}


PER_IMAGE = (
    "background_change",
    "background_area",
    "spatial_precision",
    "spatial_chance",
    "diversity_l1",
)


def summarize(
    rows: dict[str, Tensor],
    eval_set: EvalSet,
    classes: Sequence[str],
    judges: Judges,
    references: dict[str, FeatureSet],
    seed: int = 0,
) -> dict[str, float]:
    """Metrics from gathered per-image rows; distances for each extractor with a reference."""
    out: dict[str, float] = {}
    for name in PER_IMAGE:
        if name in rows:
            out[name] = synthesis.nan_mean(rows[name])
    if "probs" in rows:
        out |= synthesis.category_control(rows["probs"], eval_set.labels, classes)
    for extractor in judges.extractors():
        reference = references.get(extractor.name)
        if reference is None:
            continue
        fake = FeatureSet.from_features(rows[f"features:{extractor.name}"])
        values = fid_and_kid(reference, fake, seed)
        fid_name, kid_name = extractor.metric_names
        out[fid_name], out[kid_name], out[f"{kid_name}_std"] = (
            values["fid"], values["kid"], values["kid_std"]
        )  # fmt: skip
    return out


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
