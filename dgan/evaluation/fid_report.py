"""`dgan eval fid`: FID/KID under honest names, or the split-real floor."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dgan.data import open_dataset
from dgan.data.loader import select_classes
from dgan.errors import DganError
from dgan.evaluation.inputs import make_eval_set, real_defects, require_split, seeded_order
from dgan.evaluation.judges import open_judges
from dgan.evaluation.measure import default_device, measure, reference_features
from dgan.events import Events
from dgan.metrics.fid import (
    KID_SUBSET_SIZE,
    KID_SUBSETS,
    MIN_IMAGES,
    SMALL_SET_HINT,
    FeatureSet,
    fid_and_kid,
    require_images,
)

DEFAULT_CACHE = Path("runs/.cache/fid")  # reference statistics; training uses RUN_ROOT/.cache/fid


DEFAULT_SIZE = 128  # Sec. 4.1, when neither a generator nor an inspector fixes the image size


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
    events: Events | None = None,
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
        from dgan.tracking.source import load_generator_from, resolve_model

        source = resolve_model(model, "gan", tracking_uri=tracking_uri)
        G, gan_config, classes = load_generator_from(source, device)
        model_uri = source.uri
    index = open_dataset(data_root)
    require_split(index, split)
    columns = select_classes(index, classes) if classes else list(range(len(index.classes)))
    judges = open_judges(
        inception_weights, inspector, [index.classes[c] for c in columns], device, tracking_uri,
        events=events,
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
