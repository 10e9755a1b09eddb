"""The defect inspector's metrics, as CODEBRIM defines them, on torchmetrics.

- Multi-target accuracy: sigmoid outputs > 0.5 are positive, and an image counts as correct only
  when every one of its labels matches (torchmetrics' `MultilabelExactMatch`). A normal image is
  correct when no category fires.
- Per category: precision, recall, F1 (at the same threshold) and average precision.
- Macro averages over the categories that have positives in the evaluated split. Recall, F1 and
  AP of a category without positives are undefined and reported as None; so is precision when
  the category was never predicted and never present.

Under several processes each one updates with its shard; torchmetrics gathers at `compute`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

THRESHOLD = 0.5  # CODEBRIM: sigmoid outputs above 0.5 are positive
PER_CLASS = ("precision", "recall", "f1", "ap")


def multi_target_accuracy(probs: Tensor, targets: Tensor, threshold: float = THRESHOLD) -> Tensor:
    """Fraction of images whose labels all match at `threshold` (CODEBRIM's accuracy)."""
    return ((probs > threshold) == targets.bool()).all(dim=1).float().mean()


@dataclass
class InspectionReport:
    """What an inspector scored on one split."""

    split: str
    classes: list[str]
    n_images: int
    multi_target_accuracy: float
    per_class: dict[str, dict[str, float | None]]  # class -> precision, recall, f1, ap, positives
    macro: dict[str, float | None]  # precision, recall, f1, ap

    def to_dict(self) -> dict:
        """A JSON-serialisable form (undefined values are null)."""
        return {
            "split": self.split,
            "classes": self.classes,
            "n_images": self.n_images,
            "multi_target_accuracy": self.multi_target_accuracy,
            "per_class": self.per_class,
            "macro": self.macro,
        }

    def metrics(self, prefix: str | None = None) -> dict[str, float]:
        """Flat `<prefix>_<name>[_<class>]` metrics for MLflow; undefined values are left out."""
        head = f"{prefix or self.split}_"
        out = {f"{head}multi_target_accuracy": self.multi_target_accuracy}
        for name, value in self.macro.items():
            if value is not None:
                out[f"{head}macro_{name}"] = value
        for cls, values in self.per_class.items():
            for name in PER_CLASS:
                if values[name] is not None:
                    out[f"{head}{name}_{cls}"] = values[name]
        return out

    def format(self) -> str:
        """A table for a person: one row per class, then the macro averages."""

        def cell(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        width = max(len("class"), *(len(c) for c in self.classes))
        lines = [
            f"split {self.split}: {self.n_images} images, "
            f"multi-target accuracy {self.multi_target_accuracy:.4f}",
            f"  {'class':<{width}}  positives  precision  recall     f1     ap",
        ]
        for cls in self.classes:
            v = self.per_class[cls]
            lines.append(
                f"  {cls:<{width}}  {int(v['positives']):>9}  {cell(v['precision']):>9}"
                f"  {cell(v['recall']):>6}  {cell(v['f1']):>5}  {cell(v['ap']):>5}"
            )
        m = self.macro
        lines.append(
            f"  {'macro':<{width}}  {'':>9}  {cell(m['precision']):>9}"
            f"  {cell(m['recall']):>6}  {cell(m['f1']):>5}  {cell(m['ap']):>5}"
        )
        return "\n".join(lines)


class InspectionMetrics:
    """Accumulates logits and multi-hot targets batch by batch; `compute` gives the report."""

    def __init__(
        self, classes: Sequence[str], device: torch.device | str = "cpu", threshold=THRESHOLD
    ) -> None:
        from torchmetrics import MetricCollection
        from torchmetrics.classification import (
            MultilabelAveragePrecision,
            MultilabelExactMatch,
            MultilabelF1Score,
            MultilabelPrecision,
            MultilabelRecall,
            MultilabelStatScores,
        )

        self.classes = list(classes)
        n = len(self.classes)
        self.collection = MetricCollection(
            {
                "multi_target_accuracy": MultilabelExactMatch(n, threshold),
                "precision": MultilabelPrecision(n, threshold, average=None),
                "recall": MultilabelRecall(n, threshold, average=None),
                "f1": MultilabelF1Score(n, threshold, average=None),
                "ap": MultilabelAveragePrecision(n, average=None),
                "stats": MultilabelStatScores(n, threshold, average=None),  # tp fp tn fn support
            }
        ).to(device)

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Add one batch: raw logits (B, C) and 0/1 targets (B, C). No host sync."""
        self.collection.update(torch.sigmoid(logits.float()), targets.long())

    def reset(self) -> None:
        self.collection.reset()

    def compute(self, split: str) -> InspectionReport:
        """The report over everything added since the last reset (gathered over processes)."""
        with warnings.catch_warnings():
            # Classes without positives: handled below by reporting them as undefined.
            warnings.filterwarnings("ignore", message=".*No positive samples.*")
            values = {k: v.detach().cpu() for k, v in self.collection.compute().items()}
        stats = values["stats"].long()  # (C, 5)
        per_class: dict[str, dict[str, float | None]] = {}
        for i, cls in enumerate(self.classes):
            tp, fp, _, _, support = stats[i].tolist()
            present = support > 0
            per_class[cls] = {
                "precision": float(values["precision"][i]) if tp + fp > 0 or present else None,
                "recall": float(values["recall"][i]) if present else None,
                "f1": float(values["f1"][i]) if present else None,
                "ap": float(values["ap"][i]) if present else None,
                "positives": support,
            }
        macro = {
            name: _mean(v[name] for v in per_class.values() if v["positives"]) for name in PER_CLASS
        }
        n_images = int(stats[0, :4].sum()) if len(self.classes) else 0
        return InspectionReport(
            split=split,
            classes=self.classes,
            n_images=n_images,
            multi_target_accuracy=float(values["multi_target_accuracy"]),
            per_class=per_class,
            macro=macro,
        )


def _mean(values) -> float | None:
    defined = [v for v in values if v is not None and not math.isnan(v)]
    return sum(defined) / len(defined) if defined else None
