"""Evaluating a trained generator: FID/KID under honest names, and synthesis quality.

One procedure serves `dgan eval fid`, `dgan eval synth` and the periodic evaluation inside
`dgan train gan`. A fixed `EvalSet` (normals, asked labels drawn from the dataset's label
distribution, random boxes, noise seeds) is defaced by G, each process taking one shard. The
per-image figures of `dgan.metrics.synthesis`, the features of each extractor and the inspector's
calls are gathered over processes (accelerator.gather) and reduced to metrics; the distances of
`dgan.metrics.fid` compare the synthesized features with cached statistics of real defects.

Metric names carry the extractor: `fid`/`kid` only on the standard Inception features,
`fid_inspector`/`kid_inspector` on a frozen inspector's. Figures on the held-out surface family
(split "transfer") carry the suffix `_transfer`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dgan.data import DatasetIndex, Sample, open_dataset
from dgan.data.loader import BOX_SIDE, load_image, select_classes, to_unit_range
from dgan.errors import DganError
from dgan.inference import deface
from dgan.metrics import synthesis
from dgan.metrics.features import InceptionFeatures, InspectorFeatures, open_extractors
from dgan.metrics.fid import (
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    MIN_IMAGES,
    SMALL_SET_HINT,
    FeatureSet,
    cache_path,
    fid_and_kid,
    require_images,
    save_feature_set,
)

DEFAULT_CACHE = Path("runs/.cache/fid")  # reference statistics; training uses RUN_ROOT/.cache/fid
DEFAULT_SIZE = 128  # Sec. 4.1, when neither a generator nor an inspector fixes the image size
SYNTH_DEFAULT_N = 500  # enough inputs for the synthesis figures' means
Log = Callable[[str], None]


# ---------------------------------------------------------------------------------------------
# Fixed inputs
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Sharded extraction
# ---------------------------------------------------------------------------------------------


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


@dataclass
class Judges:
    """What scores synthesized images: feature extractors and the inspector's categories."""

    inception: InceptionFeatures | None = None
    inspector: InspectorFeatures | None = None
    inspector_columns: list[int] | None = None  # inspector outputs in the generator's class order

    def extractors(self) -> list:
        return [e for e in (self.inception, self.inspector) if e is not None]


def open_judges(
    inception_weights: Path | str | None,
    inspector: str | None,
    classes: Sequence[str],
    device,
    tracking_uri: str | None = None,
    required: bool = True,
    with_inception: bool = True,
    log: Log = print,
) -> Judges:
    """The extractors asked for (standard Inception only `with_inception`), and how the
    inspector's outputs map onto `classes`. `required`: refuse when there is no extractor."""
    if with_inception:
        inception, frozen = open_extractors(
            inception_weights, inspector, device, tracking_uri, log, required
        )
    else:
        from dgan.metrics.features import open_inspector_features

        inception = None
        frozen = open_inspector_features(inspector, device, tracking_uri) if inspector else None
    columns = None
    if frozen is not None:
        missing = [c for c in classes if c not in frozen.classes]
        if missing:
            raise DganError(
                f"the inspector {frozen.description} knows {', '.join(frozen.classes)}, not "
                f"{', '.join(missing)}: give one trained on the generator's categories.",
                exit_code=2,
            )
        columns = [frozen.classes.index(c) for c in classes]
    return Judges(inception, frozen, columns)


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


def _require_split(index: DatasetIndex, split: str) -> None:
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


# ---------------------------------------------------------------------------------------------
# dgan eval fid
# ---------------------------------------------------------------------------------------------


@dataclass
class Distance:
    """One extractor's distances between two image sets."""

    fid_name: str
    kid_name: str
    extractor: str
    fid: float
    kid: float
    kid_std: float
    reference_cache: str
    reused: bool


@dataclass
class FidReport:
    """What `dgan eval fid` measured."""

    mode: str  # "generator" or "split-real"
    model: str | None
    data: str
    split: str
    image_size: int
    n_real: int
    n_synthesized: int
    distances: list[Distance]

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "model": self.model,
            "data": self.data,
            "split": self.split,
            "image_size": self.image_size,
            "n_real": self.n_real,
            "n_synthesized": self.n_synthesized,
            "metrics": {
                **{d.fid_name: d.fid for d in self.distances},
                **{d.kid_name: d.kid for d in self.distances},
                **{f"{d.kid_name}_std": d.kid_std for d in self.distances},
            },
            "extractors": {d.fid_name: d.extractor for d in self.distances},
        }

    def format(self) -> str:
        if self.mode == "split-real":
            what = (
                f"two random halves of the real defects of split {self.split} "
                f"({self.n_real} vs {self.n_synthesized}; the ideal defect synthesizer of Table 1)"
            )
        else:
            what = (
                f"{self.n_synthesized} synthesized defects vs {self.n_real} real defects of split "
                f"{self.split}"
            )
        lines = [f"{what}, at {self.image_size} px"]
        for d in self.distances:
            what = "standard FID" if d.fid_name == "fid" else "Fréchet distance, not standard FID"
            spread = (
                f"± {d.kid_std:.6f} over {KID_SUBSETS} subsets of {KID_SUBSET_SIZE}"
                if min(self.n_real, self.n_synthesized) > KID_SUBSET_SIZE
                else f"one subset: the whole sets (N <= {KID_SUBSET_SIZE})"
            )
            lines += [
                f"  {d.fid_name:<14} {d.fid:12.4f}  {what}; features: {d.extractor}",
                f"  {d.kid_name:<14} {d.kid:12.6f}  KID on the same features, {spread}",
                f"  reference statistics {'reused from' if d.reused else 'cached in'} "
                f"{d.reference_cache}",
            ]
        return "\n".join(lines)


def evaluate_fid(
    data_root: Path,
    model: str | None = None,
    n: int | None = None,
    split: str = "train",
    inspector: str | None = None,
    inception_weights: Path | None = None,
    split_real: bool = False,
    seed: int = 0,
    batch_size: int = 64,
    cache_dir: Path = DEFAULT_CACHE,
    image_size: int | None = None,
    tracking_uri: str | None = None,
    log: Log = print,
) -> FidReport:
    """FID/KID (standard, or on an inspector's features) between G's defacements of the split's
    normals and its real defects; with `split_real`, between two random halves of the real
    defects (the floor a perfect synthesizer would reach at that N)."""
    if model is None and not split_real:
        raise DganError("give MODEL (a generator) and DATA, or --split-real DATA", exit_code=2)
    if n is not None and n < 1:
        raise DganError(f"--n must be positive, got {n}", exit_code=2)
    device = default_device()
    G = gan_config = classes = None
    model_uri = None
    if model is not None:
        from dgan.models.source import load_generator_from, resolve_model

        source = resolve_model(model, "gan", tracking_uri=tracking_uri)
        G, gan_config, classes = load_generator_from(source, device)
        model_uri = source.uri
    index = open_dataset(data_root)
    _require_split(index, split)
    columns = select_classes(index, classes) if classes else list(range(len(index.classes)))
    judges = open_judges(
        inception_weights, inspector, [index.classes[c] for c in columns], device, tracking_uri,
        log=log,
    )  # fmt: skip
    if image_size and gan_config and not split_real and image_size != gan_config.data.image_size:
        raise DganError(
            f"--image-size {image_size}: the generator draws {gan_config.data.image_size} px "
            "images and the real ones are compared at that size; drop --image-size.",
            exit_code=2,
        )
    size = image_size or (
        gan_config.data.image_size if gan_config
        else judges.inspector.image_size if judges.inspector else DEFAULT_SIZE
    )  # fmt: skip
    defects = real_defects(index, split, columns)

    def distances(real: list[Path], fake_stats: Callable[[object], FeatureSet]) -> list[Distance]:
        found = []
        for extractor in judges.extractors():
            ref, path, reused = reference_features(
                real, extractor, size, cache_dir, batch_size, device
            )
            values = fid_and_kid(ref, fake_stats(extractor), seed)
            fid_name, kid_name = extractor.metric_names
            found.append(
                Distance(fid_name, kid_name, extractor.description, values["fid"],
                         values["kid"], values["kid_std"], str(path), reused)
            )  # fmt: skip
        return found

    if split_real:
        half = max(n if n is not None else len(defects) // 2, MIN_IMAGES)
        require_images(
            len(defects), f"--split-real at N={half}", f"real defects in split {split!r} "
            f"(two disjoint halves of {half})", 2 * half,
            f"Lower --n to at most {len(defects) // 2}." if len(defects) >= 4 else SMALL_SET_HINT,
        )  # fmt: skip
        order = seeded_order(len(defects), seed, 5)
        first = [defects[i].path for i in sorted(order[:half])]
        second = [defects[i].path for i in sorted(order[half : 2 * half])]

        def other_half(extractor) -> FeatureSet:
            return reference_features(second, extractor, size, cache_dir, batch_size, device)[0]

        found = distances(first, other_half)
        return FidReport("split-real", model_uri, str(data_root), split, size, half, half, found)

    count = n if n is not None else len(defects)
    require_images(len(defects), "FID/KID", f"real defects in split {split!r}")
    require_images(count, "FID/KID", "images per set (--n)", hint="Raise --n.")
    eval_set = make_eval_set(index, split, columns, count, size, seed, n_reference=count)
    rows = measure(G, eval_set, judges, batch_size, device, seed, figures=False)
    found = distances(
        eval_set.reference, lambda e: FeatureSet.from_features(rows[f"features:{e.name}"])
    )
    return FidReport("generator", model_uri, str(data_root), split, size, count, eval_set.n, found)


# ---------------------------------------------------------------------------------------------
# dgan eval synth
# ---------------------------------------------------------------------------------------------

FIGURES = (
    ("category_accuracy", "category-control accuracy (multi-target exact match)"),
    ("background_change", "background change outside the dilated mask (0-1 units)"),
    ("background_area", "  share of the image outside the dilated mask"),
    ("spatial_precision", "spatial-control precision (share of change inside the box)"),
    ("spatial_chance", "  its chance level (mean box area share)"),
    ("diversity_l1", "diversity: L1 between two noise seeds (0-1 units)"),
)


@dataclass
class SynthReport:
    """What `dgan eval synth` measured, per evaluated split."""

    model: str
    data: str
    classes: list[str]
    inspector: str | None
    n: dict[str, int]
    figures: dict[str, dict[str, float]]  # split -> figure -> value

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "data": self.data,
            "classes": self.classes,
            "inspector": self.inspector,
            "n": self.n,
            "figures": {
                split: {k: None if math.isnan(v) else v for k, v in values.items()}
                for split, values in self.figures.items()
            },
        }

    def format(self) -> str:
        from dgan.report import text_table

        splits = list(self.figures)
        rows = []
        names = [*FIGURES, *((f"category_accuracy_{c}", f"  asked {c}, called {c}")
                             for c in self.classes)]  # fmt: skip
        for key, label in names:
            values = [self.figures[s].get(key, math.nan) for s in splits]
            if all(math.isnan(v) for v in values):
                continue
            rows.append([label, *("-" if math.isnan(v) else f"{v:.4f}" for v in values)])
        header = ["figure", *(f"{s} (N={self.n[s]})" for s in splits)]
        lines = [f"synthesis quality of {self.model} on {self.data}", *text_table(header, rows)]
        if self.inspector is None:
            lines.append(
                "  category-control accuracy needs --inspector SPEC (trained on real data)"
            )
        else:
            lines.append(f"  categories judged by {self.inspector}")
        return "\n".join(lines)


def evaluate_synthesis(
    model: str,
    data_root: Path,
    inspector: str | None = None,
    n: int | None = None,
    split: str = "train",
    seed: int = 0,
    batch_size: int = 64,
    tracking_uri: str | None = None,
) -> SynthReport:
    """Category control, background preservation, spatial control and diversity of G on the
    split's normals, and on the held-out surface family (split "transfer") when there is one."""
    from dgan.models.source import load_generator_from, resolve_model

    if n is not None and n < 1:
        raise DganError(f"--n must be positive, got {n}", exit_code=2)
    device = default_device()
    source = resolve_model(model, "gan", tracking_uri=tracking_uri)
    G, gan_config, classes = load_generator_from(source, device)
    index = open_dataset(data_root)
    _require_split(index, split)
    columns = select_classes(index, classes)
    judges = open_judges(None, inspector, classes, device, tracking_uri, with_inception=False)
    size = gan_config.data.image_size
    splits = [split, "transfer"] if has_transfer(index, split) else [split]
    figures, counts = {}, {}
    for name in splits:
        available = len(index.select(name, normal=True))
        count = n or min(SYNTH_DEFAULT_N, available)
        eval_set = make_eval_set(index, name, columns, count, size, seed)
        rows = measure(G, eval_set, judges, batch_size, device, seed)
        figures[name] = summarize(rows, eval_set, classes, judges, {}, seed)
        counts[name] = eval_set.n
    described = judges.inspector.description if judges.inspector else None
    return SynthReport(source.uri, str(data_root), list(classes), described, counts, figures)


# ---------------------------------------------------------------------------------------------
# Periodic evaluation inside `dgan train gan`
# ---------------------------------------------------------------------------------------------


def check_evaluation(config, index: DatasetIndex) -> None:
    """Before a run starts: the evaluation it asks for can run (weights verified, inspector
    resolvable and trained on the run's categories, enough real defects for N)."""
    if config.log.eval_every == 0:
        return
    columns = select_classes(index, config.data.classes)
    classes = [index.classes[c] for c in columns]
    e = config.eval
    judges = open_judges(
        e.inception_weights, e.inspector, classes, "cpu", config.log.tracking_uri,
        required=False, log=lambda _: None,
    )  # fmt: skip
    if judges.extractors():
        have = len(real_defects(index, "train", columns))
        if have < e.n:
            raise DganError(
                f"eval.n={e.n} needs {e.n} real training defects for FID/KID; the train split of "
                f"{index.root} has {have}. Lower eval.n (e.g. --set eval.n={have}) or set "
                "log.eval_every=0.",
                exit_code=2,
            )


class TrainingEvaluator:
    """Periodic evaluation of the sampling generator on fixed inputs; every process calls it."""

    def __init__(self, config, classes: Sequence[str], accelerator, log: Log = print) -> None:
        self.accelerator, self.classes = accelerator, list(classes)
        self.seed, self.batch_size = config.eval.seed, config.eval.batch_size
        device = accelerator.device
        main = accelerator.is_main_process
        index = open_dataset(config.data.root)
        columns = select_classes(index, classes)
        e = config.eval
        self.judges = open_judges(
            e.inception_weights, e.inspector, classes, device, config.log.tracking_uri,
            required=False, log=log if main else (lambda _: None),
        )  # fmt: skip
        use_reference = bool(self.judges.extractors())
        size = config.data.image_size
        self.sets = [
            make_eval_set(index, "train", columns, e.n, size, self.seed, e.n * use_reference)
        ]
        if has_transfer(index, "train"):
            n_t = min(e.n, len(index.select("transfer", normal=True)))
            n_ref = min(n_t, len(real_defects(index, "transfer", columns))) * use_reference
            n_ref = n_ref if n_ref >= 2 else 0
            self.sets.append(make_eval_set(index, "transfer", columns, n_t, size, self.seed, n_ref))
        cache_dir = Path(config.log.run_root) / ".cache" / "fid"
        self.references: list[dict[str, FeatureSet]] = []
        for eval_set in self.sets:
            refs = {}
            for extractor in self.judges.extractors() if eval_set.reference else []:
                refs[extractor.name], path, reused = reference_features(
                    eval_set.reference, extractor, size, cache_dir, self.batch_size, device,
                    accelerator,
                )  # fmt: skip
                if main:
                    log(
                        f"evaluation reference ({eval_set.split}, N={len(eval_set.reference)}, "
                        f"{extractor.name}): {'reused' if reused else 'computed'} {path}"
                    )
            self.references.append(refs)

    def __call__(self, G) -> dict[str, float]:
        """Every metric for the current G, named as in MLflow (transfer ones end in _transfer)."""
        t0 = time.perf_counter()
        metrics: dict[str, float] = {}
        for eval_set, refs in zip(self.sets, self.references, strict=True):
            rows = measure(
                G, eval_set, self.judges, self.batch_size, self.accelerator.device, self.seed,
                self.accelerator,
            )  # fmt: skip
            values = summarize(rows, eval_set, self.classes, self.judges, refs, self.seed)
            suffix = "" if eval_set.split == "train" else f"_{eval_set.split}"
            metrics |= {f"{k}{suffix}": v for k, v in values.items() if not math.isnan(v)}
        metrics["eval_seconds"] = time.perf_counter() - t0
        return metrics
