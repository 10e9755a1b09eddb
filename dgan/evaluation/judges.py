"""What scores synthesized images: feature extractors and the inspector's categories."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dgan.errors import DganError
from dgan.events import Events
from dgan.metrics.features import InceptionFeatures, InspectorFeatures, open_extractors


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
    events: Events | None = None,
) -> Judges:
    """The extractors asked for (standard Inception only `with_inception`), and how the
    inspector's outputs map onto `classes`. `required`: refuse when there is no extractor.

    Building a network draws its initial weights from torch's global generator before the saved
    ones replace them. Those draws are undone, so that a training run that names a judge trains
    exactly as one that does not: a seed identifies a run. The networks are built on the CPU."""
    import torch

    with torch.random.fork_rng(devices=[]):
        return _open_judges(
            inception_weights, inspector, classes, device, tracking_uri, required,
            with_inception, events,
        )  # fmt: skip


def _open_judges(
    inception_weights, inspector, classes, device, tracking_uri, required, with_inception, events
) -> Judges:
    if with_inception:
        inception, frozen = open_extractors(
            inception_weights, inspector, device, tracking_uri, events or Events(), required
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
