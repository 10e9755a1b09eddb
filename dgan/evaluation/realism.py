"""The realism test of a generator (dgan.metrics.realism) on fixed inputs of one split.

Defacement: every real defect of the split (up to `n`) is paired with a normal defaced with that
defect's own label set, so real and synthesized sets hold the same label sets; one classifier is
trained on half of the pairs, and its held-out AUC is reported overall (`realism_auc`) and per
label set (`realism_auc_<set>`, sets joined by "-": `realism_auc_spallation-exposed_bars`).
Restoration: the real defects restored, against as many other real normals of the split
(`realism_auc_restored`). Each test's held-out log loss goes with it (`realism_log_loss`,
`realism_log_loss_restored`; ln 2 at chance). The floors are the same test on two halves of the
real defects (`realism_floor`) and of the real normals (`realism_floor_normal`; NaN below 8
images); they do not depend on G and are cached. With an inspector, the share of defacements
called exactly their label set (`set_accuracy_<set>`) and of restorations called defect-free
(`restored_called_normal`), each beside the same call on the real images it stands for: the real
defects called exactly their label set (`real_set_accuracy_<set>`) and the real normals called
defect-free (`real_called_normal`). Those are the inspector's own ceilings: a defacement called
its label set more often than a real defect of that set is easier to read than the real thing.
How the others miss: `set_missed_<category>_<set>`, the share of a set's defacements called without
one category it asked for, and `set_added_<set>`, the share called with a category not asked.
`set_size_<set>` is the number of a set's defacements judged, so that its accuracy can be read
with its interval; `control_repeats` K has the inspector judge K defacements per real defect,
each on other normals, for the rare sets (the realism test takes the first). With `repeats`
above 1, every test runs at that many classifier seeds (each its own halves and initial
weights) on the same images; its figures are their means, and `realism_auc_std`,
`realism_auc_restored_std`, `realism_floor_std` and `realism_floor_normal_std` their spread.

`by_set`: each label set with at least OWN_MIN real defects also gets a classifier of its own,
trained on that set's pairs alone (`realism_own_auc_<set>`), beside its own floor, two halves of
that set's real defects (`realism_own_floor_<set>`, cached with the others). The shared
classifier spends its steps on whatever tells most images apart; a flaw of one set that is 7% of
the defects can stay hidden in its per-set figure (`realism_auc_<set>`) and show in the set's own.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dgan.data import DatasetIndex
from dgan.data.loader import to_unit_range
from dgan.evaluation.inputs import load_images, real_defects, seeded_order
from dgan.inference import deface, restore
from dgan.io import atomic_write_text
from dgan.metrics.fid import require_images
from dgan.metrics.realism import (
    PER_STEPS,
    STEPS,
    halves_test,
    repeated_test,
    two_sample_test,
)

DEFAULT_N = 600  # real defects per test: the demo set's whole train split
OWN_MIN = 40  # real defects a label set needs for a classifier of its own: 20 held out


@dataclass
class RealismInputs:
    """What one split's realism test compares; the same every time it runs."""

    split: str
    defects: Tensor  # (N, 3, S, S) uint8 real defects
    labels: Tensor  # (N, C) their label sets
    groups: list[str]  # each defect's label set as a name
    to_deface: Tensor  # (N, 3, S, S) uint8 normals, defaced with `labels`
    normals: Tensor  # (N, 3, S, S) uint8 other real normals, against the restorations
    identity: str  # of the real files, for the floors' cache
    steps: int = STEPS  # the two-sample classifier's training steps (dgan.metrics.realism)
    repeats: int = 1  # classifier seeds per test, averaged (dgan.metrics.realism.repeated_test)
    # Defacements per real defect that an inspector judges (the first is the realism test's);
    # repeat j defaces each label set on the normals rolled by j * n // control_repeats.
    control_repeats: int = 1
    by_set: bool = False  # also a classifier of its own per label set of OWN_MIN or more

    @property
    def n(self) -> int:
        return len(self.defects)

    def own_sets(self) -> dict[str, Tensor]:
        """Label set -> the indices of its items, for the sets that get a classifier of their own
        (none unless by_set)."""
        if not self.by_set:
            return {}
        groups = np.asarray(self.groups)
        members = {g: np.flatnonzero(groups == g) for g in dict.fromkeys(self.groups)}
        return {g: torch.from_numpy(ix) for g, ix in members.items() if len(ix) >= OWN_MIN}


def label_set_name(labels: Sequence[float], classes: Sequence[str]) -> str:
    return "-".join(c for c, v in zip(classes, labels, strict=True) if v) or "normal"


def make_realism_inputs(
    index: DatasetIndex,
    split: str,
    columns: Sequence[int],
    classes: Sequence[str],
    image_size: int,
    seed: int,
    n: int = DEFAULT_N,
    steps: int = STEPS,
    repeats: int = 1,
    control_repeats: int = 1,
    by_set: bool = False,
) -> RealismInputs:
    """Up to `n` real defects of the split, and twice as many of its normals (cycled if fewer).

    `steps` and `repeats`: the classifier's training steps and seeds in the tests these inputs
    feed (part of their floors' cache key); `by_set`: a classifier of its own per label set too."""
    defects = real_defects(index, split, columns)
    normals = sorted(index.select(split, normal=True), key=lambda s: str(s.path))
    require_images(len(defects), f"the realism test on split {split!r}", "real defects", 4)
    require_images(len(normals), f"the realism test on split {split!r}", "real normals", 4)
    defects = [defects[i] for i in sorted(seeded_order(len(defects), seed, 9)[:n])]
    count = len(defects)
    order = seeded_order(len(normals), seed, 10)
    picked = [normals[order[k % len(order)]].path for k in range(2 * count)]
    labels = torch.tensor([[s.labels[c] for c in columns] for s in defects], dtype=torch.float32)
    digest = hashlib.sha256()
    for path in [s.path for s in defects] + picked[count:]:
        digest.update(f"{path}\0{Path(path).stat().st_size}\n".encode())
    return RealismInputs(
        split,
        load_images([s.path for s in defects], image_size),
        labels,
        [label_set_name(row, classes) for row in labels.tolist()],
        load_images(picked[:count], image_size),
        load_images(picked[count:], image_size),
        f"{digest.hexdigest()[:16]}-{image_size}-{seed}-{steps}per{PER_STEPS}"
        + f"-x{repeats}" * (repeats > 1)
        + "-own" * by_set,
        steps,
        repeats,
        control_repeats,
        by_set,
    )


def _to_uint8(images: Tensor) -> Tensor:
    return images.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def _defacements(G, normals: Tensor, labels: Tensor, noise_seed: int, batch_size: int, device):
    """G's defacements of uint8 `normals` with `labels`, uint8 on the CPU; batch `start` draws
    its noise from noise_seed + start. G is in eval mode."""
    out = []
    for start in range(0, len(normals), batch_size):
        part = slice(start, start + batch_size)
        x = to_unit_range(normals[part].to(device))
        fake, _ = deface(G, x, labels[part].to(device), seed=noise_seed + start)
        out.append(_to_uint8(fake))
    return torch.cat(out) if out else normals[:0]


@torch.no_grad()
def synthesize(
    G, inputs: RealismInputs, seed: int, batch_size: int, device
) -> tuple[Tensor, Tensor]:
    """(defacements, restorations) of the inputs, uint8, on the CPU."""
    was_training = G.training
    G.eval()
    fakes = _defacements(G, inputs.to_deface, inputs.labels, seed * 7919, batch_size, device)
    restored = []
    for start in range(0, inputs.n, batch_size):
        defects = to_unit_range(inputs.defects[start : start + batch_size].to(device))
        back, _ = restore(G, defects, seed=seed * 7919 + start + 1)
        restored.append(_to_uint8(back))
    G.train(was_training)
    return fakes, torch.cat(restored)


@torch.no_grad()
def more_defacements(G, inputs: RealismInputs, seed: int, batch_size: int, device) -> Tensor:
    """Repeats 1 to control_repeats - 1 of the defacements, uint8 on the CPU, one after another:
    each label set of the inputs painted again on other normals (rolled by j * n // K), with
    other noise. Empty at control_repeats 1."""
    k, n = inputs.control_repeats, inputs.n
    was_training = G.training
    G.eval()
    out = [
        _defacements(
            G,
            inputs.to_deface.roll(max(1, j * n // k), dims=0),
            inputs.labels,
            seed * 7919 + j * 1_000_003,
            batch_size,
            device,
        )  # fmt: skip
        for j in range(1, k)
    ]
    G.train(was_training)
    return torch.cat(out) if out else inputs.to_deface[:0]


def realism_figures(
    G, inputs: RealismInputs, seed: int, batch_size: int, device, inspector=None, columns=None
) -> dict[str, float]:
    """realism_auc (overall and per label set) and realism_auc_restored for G, with the test's
    held-out log loss of both (realism_log_loss, realism_log_loss_restored); with an
    inspector (dgan.metrics.features.InspectorFeatures) and its columns in G's class order,
    set_accuracy_<set> and restored_called_normal too, with their ceilings on the real images
    (real_set_accuracy_<set>, real_called_normal), set_missed_<category>_<set>,
    set_added_<set> and set_size_<set>; with inputs.by_set, realism_own_auc_<set>."""
    fakes, restored = synthesize(G, inputs, seed, batch_size, device)
    steps, repeats = inputs.steps, inputs.repeats
    defaced = repeated_test(
        lambda s: two_sample_test(inputs.defects, fakes, s, groups=inputs.groups, steps=steps),
        seed,
        repeats,
    )
    back = repeated_test(
        lambda s: two_sample_test(inputs.normals, restored, s, steps=steps), seed, repeats
    )
    figures = {"realism_auc": defaced.auc, "realism_log_loss": defaced.log_loss}
    figures |= {f"realism_auc_{g}": v for g, v in defaced.groups.items()}
    figures |= {"realism_auc_restored": back.auc, "realism_log_loss_restored": back.log_loss}
    if repeats > 1:
        figures |= {"realism_auc_std": defaced.auc_std, "realism_auc_restored_std": back.auc_std}
    figures |= own_set_figures(inputs, fakes, seed)
    if inspector is not None:
        fakes = torch.cat([fakes, more_defacements(G, inputs, seed, batch_size, device)])
        figures |= _inspector_calls(inspector, columns, fakes, restored, inputs, device)
    return figures


def own_set_figures(inputs: RealismInputs, fakes: Tensor, seed: int) -> dict[str, float]:
    """realism_own_auc_<set>: for each label set that gets one (RealismInputs.own_sets), a
    classifier trained on that set's real defects and defacements (`fakes`, paired by index)."""
    figures = {}
    for g, ix in inputs.own_sets().items():
        own = repeated_test(
            lambda s, ix=ix: two_sample_test(inputs.defects[ix], fakes[ix], s, steps=inputs.steps),
            seed,
            inputs.repeats,
        )
        figures[f"realism_own_auc_{g}"] = own.auc
    return figures


@torch.no_grad()
def _inspector_calls(inspector, columns, fakes, restored, inputs, device) -> dict[str, float]:
    def called(images: Tensor) -> Tensor:
        rows = []
        for part in images.split(256):
            _, logits = inspector.features_and_logits(part.to(device).float() / 255)
            rows.append((logits[:, columns] > 0).cpu())
        return torch.cat(rows)

    groups = np.asarray(inputs.groups)
    asked = inputs.labels.bool()
    k = len(fakes) // inputs.n  # defacements per real defect: the control repeats, in order
    out = {}
    for prefix, images, sets, wanted in (
        ("", fakes, np.tile(groups, k), asked.repeat(k, 1)),
        ("real_", inputs.defects, groups, asked),
    ):
        calls = called(images)
        exact = (calls == wanted).all(dim=1).numpy()
        for g in dict.fromkeys(groups):
            rows = sets == g
            out[f"{prefix}set_accuracy_{g}"] = float(exact[rows].mean())
            if not prefix:  # how many were judged, and how they miss
                out[f"set_size_{g}"] = float(rows.sum())
                out |= _misses(g, calls[rows], wanted[rows])
    out["restored_called_normal"] = float((~called(restored).any(dim=1)).float().mean())
    out["real_called_normal"] = float((~called(inputs.normals).any(dim=1)).float().mean())
    return out


def _misses(group: str, calls: Tensor, asked: Tensor) -> dict[str, float]:
    """For the defacements of label set `group`: set_missed_<category>_<group>, the share called
    without that asked category, and set_added_<group>, the share called with one not asked."""
    columns = asked[0].nonzero().flatten().tolist()
    names = group.split("-")  # label_set_name joins the asked categories in column order
    out = {
        f"set_missed_{name}_{group}": float((~calls[:, c]).float().mean())
        for name, c in zip(names, columns, strict=True)
    }
    out[f"set_added_{group}"] = float((calls & ~asked).any(dim=1).float().mean())
    return out


def realism_floors(inputs: RealismInputs, seed: int, cache_dir: Path | None) -> dict[str, float]:
    """The test between two halves of the real defects and of the real normals (cached)."""
    path = Path(cache_dir) / f"realism-floor-{inputs.identity}.json" if cache_dir else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())

    def floor(images: Tensor) -> tuple[float, float]:  # NaN when the halves are too small
        if len(images) < 8:
            return float("nan"), float("nan")
        result = repeated_test(
            lambda s: halves_test(images, s, steps=inputs.steps), seed, inputs.repeats
        )
        return result.auc, result.auc_std

    (defects, defects_std), (normals, normals_std) = floor(inputs.defects), floor(inputs.normals)
    floors = {"realism_floor": defects, "realism_floor_normal": normals}
    for g, ix in inputs.own_sets().items():
        floors[f"realism_own_floor_{g}"] = floor(inputs.defects[ix])[0]
    if inputs.repeats > 1:
        floors |= {"realism_floor_std": defects_std, "realism_floor_normal_std": normals_std}
    if path is not None:
        atomic_write_text(path, json.dumps(floors))
    return floors
