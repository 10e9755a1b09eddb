"""Every metric dgan logs, by name, each declaring once which way it improves.

Promotion (`--promote-if-better`), periodic evaluation and searches look a metric up here instead
of guessing from its name. A logged name is a registered base name, optionally qualified:

    <stage>_<base>        val_, test_, best_val_ or train_ (the inspector's splits and losses)
    <base>_<category>     per-category figures (category_accuracy_crack, test_f1_crack)
    <base>_transfer       the same figure on the held-out surface family

A qualified name has its base's direction. Names not found (mask_mean, eval_seconds) have none:
a caller that must compare them asks the user for a direction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dgan.errors import DganError

Direction = Literal["min", "max"]


# Defect-GAN's loss terms as the trainer logs them (dgan.train.gan's d_step and g_step).
GAN_D_TERMS = ("d_adv", "d_gp", "d_cls_r", "d_cls_fake", "d_cls_restored", "d_total")
GAN_G_TERMS = (
    "g_adv", "g_cls_f", "g_cls_f_weakest", "g_rec", "g_sd_cyc", "g_sd_con", "g_outside",
    "g_binary", "g_diversity", "g_total",
)  # fmt: skip


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Direction | None  # None: a diagnostic, not better one way or the other
    description: str
    per_category: bool = False  # also logged as <name>_<category>


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        # Distances to real defects (dgan.metrics.fid): standard Inception, or a frozen inspector.
        Metric("fid", "min", "Fréchet Inception distance (standard weights only)"),
        Metric("kid", "min", "kernel Inception distance (standard weights only)"),
        Metric("fid_inspector", "min", "Fréchet distance on a frozen inspector's features"),
        Metric("kid_inspector", "min", "KID on a frozen inspector's features"),
        Metric("kid_std", None, "spread of KID over subsets"),
        Metric("kid_inspector_std", None, "spread of kid_inspector over subsets"),
        # Synthesis quality (dgan.metrics.synthesis).
        Metric("category_accuracy", "max", "category control: inspector calls = asked", True),
        Metric("background_change", "min", "mean change outside the defect mask"),
        Metric("background_area", None, "share of the image outside the mask"),
        Metric("spatial_precision", "max", "share of the change inside the asked box"),
        Metric("spatial_chance", None, "spatial_precision's chance level"),
        Metric("diversity_l1", "max", "L1 between two noise seeds"),
        # The realism test (dgan.metrics.realism): 0.5 is indistinguishable from real.
        Metric("realism_auc", "min", "a fresh classifier tells G's images from real", True),
        Metric(
            "realism_log_loss", "max", "the realism test's held-out log loss (ln 2: chance)", True
        ),
        Metric("realism_floor", None, "the same test on two halves of the real defects"),
        Metric("realism_floor_normal", None, "the same test on two halves of the real normals"),
        Metric("realism_own_auc", "min", "the realism test of one label set, alone", True),
        Metric("realism_own_floor", None, "realism_own_auc's floor: halves of that set", True),
        Metric("set_accuracy", "max", "inspector calls a defacement exactly its label set", True),
        Metric("set_missed", "min", "a set's defacements called without a category asked", True),
        Metric("set_added", "min", "a set's defacements called with a category not asked", True),
        Metric("set_size", None, "defacements judged per label set (set_accuracy's n)", True),
        Metric("restored_called_normal", "max", "inspector calls a restoration defect-free"),
        Metric("real_set_accuracy", None, "set_accuracy's ceiling: on real defects", True),
        Metric("real_called_normal", None, "restored_called_normal's ceiling: on real normals"),
        # The inspector (dgan.metrics.classification), with a split prefix.
        Metric("multi_target_accuracy", "max", "CODEBRIM's exact-match accuracy"),
        Metric("macro_precision", "max", "precision averaged over categories"),
        Metric("macro_recall", "max", "recall averaged over categories"),
        Metric("macro_f1", "max", "F1 averaged over categories"),
        Metric("macro_ap", "max", "average precision averaged over categories"),
        Metric("precision", "max", "per-category precision", True),
        Metric("recall", "max", "per-category recall", True),
        Metric("f1", "max", "per-category F1", True),
        Metric("ap", "max", "per-category average precision", True),
        Metric("loss_cls", "min", "the inspector's multi-label loss"),
        Metric("loss_src", None, "f_src's loss (the GRL makes the backbone raise it)"),
        Metric("loss_total", "min", "the inspector's total loss"),
        Metric("source_accuracy", None, "f_src telling synthetic from real"),
        # Defect-GAN's loss terms (dgan.losses), Eq. 11 and 12.
        *(Metric(name, "min", f"loss term {name}") for name in (*GAN_D_TERMS, *GAN_G_TERMS)),
    )
}
STAGES = ("best_val_", "val_", "test_", "train_")
TRANSFER = "_transfer"


def lookup(name: str) -> Metric | None:
    """The registered metric behind a logged name, or None."""
    if name in METRICS:
        return METRICS[name]
    if name.endswith(TRANSFER):
        return lookup(name.removesuffix(TRANSFER))
    for stage in STAGES:
        if name.startswith(stage):
            return lookup(name.removeprefix(stage))
    base, _, _ = name.rpartition("_")
    while base:
        metric = METRICS.get(base)
        if metric is not None and metric.per_category:
            return metric
        base, _, _ = base.rpartition("_")
    return None


def metric_direction(name: str) -> Direction | None:
    """Whether a lower (`min`) or higher (`max`) value of `name` is better; None when undeclared."""
    metric = lookup(name)
    return None if metric is None else metric.direction


def require_direction(name: str, mode: Direction | None = None) -> Direction:
    """`mode` when given, else the registered direction; DganError when neither says."""
    direction = mode or metric_direction(name)
    if direction is None:
        known = ", ".join(sorted(k for k, m in METRICS.items() if m.direction))
        raise DganError(
            f"metric {name!r} has no registered direction (known: {known}); name a registered "
            "metric, or say which way is better (log.promote_mode=min or max)",
            exit_code=2,
        )
    return direction


def is_better(value: float, best: float | None, direction: Direction) -> bool:
    """Whether `value` strictly improves on `best` (None: anything does)."""
    if best is None:
        return True
    return value < best if direction == "min" else value > best
