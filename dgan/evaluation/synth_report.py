"""`dgan eval synth`: realism, category control, background preservation, spatial control and
diversity of a generator, on a split and on the held-out surface family."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from dgan.config import check_control_repeats, check_realism_options, check_realism_repeats
from dgan.data import open_dataset
from dgan.data.loader import select_classes
from dgan.errors import DganError
from dgan.evaluation.inputs import has_transfer, make_eval_set, real_defects, require_split
from dgan.evaluation.judges import open_judges
from dgan.evaluation.measure import default_device, measure, summarize
from dgan.evaluation.realism import (
    DEFAULT_N,
    make_realism_inputs,
    realism_figures,
    realism_floors,
)
from dgan.metrics.realism import STEPS

SYNTH_DEFAULT_N = 500  # enough inputs for the synthesis figures' means
REALISM_CACHE = Path("runs/.cache/realism")  # the floors; training uses RUN_ROOT/.cache/realism


FIGURES = (
    ("category_accuracy", "category-control accuracy (multi-target exact match)"),
    ("background_change", "background change outside the dilated mask (0-1 units)"),
    ("background_area", "  share of the image outside the dilated mask"),
    ("spatial_precision", "spatial-control precision (share of change inside the box)"),
    ("spatial_chance", "  its chance level (mean box area share)"),
    ("diversity_l1", "diversity: L1 between two noise seeds (0-1 units)"),
    ("realism_auc", "realism: AUC telling defacements from real defects"),
    ("realism_auc_std", "  its spread: std over the classifier seeds"),
    ("realism_floor", "  its floor: two halves of the real defects"),
    ("realism_floor_std", "    the floor's spread over the classifier seeds"),
    ("realism_auc_restored", "realism: AUC telling restored defects from real normals"),
    ("realism_auc_restored_std", "  its spread: std over the classifier seeds"),
    ("realism_floor_normal", "  its floor: two halves of the real normals"),
    ("realism_floor_normal_std", "    the floor's spread over the classifier seeds"),
    ("restored_called_normal", "restored real defects called defect-free"),
    ("real_called_normal", "  its ceiling: real normals called defect-free"),
)
INTERVAL_Z = 1.96  # the 95% interval that each label set's exact-match accuracy prints with


def wilson_interval(p: float, n: int, z: float = INTERVAL_Z) -> tuple[float, float]:
    """The Wilson score interval of a proportion `p` observed in `n` trials (Wilson, JASA 1927).

    Unlike p +- z * sqrt(p (1 - p) / n), it stays inside [0, 1] and is not empty at p = 0 or 1,
    which is where a label set of 17 images often lands.
    """
    if n <= 0:
        return math.nan, math.nan
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


REALISM_NOTE = (
    "  realism: a fresh classifier trained on half of each set, ROC-AUC on the other half "
    "(0.5: it cannot tell G's images from real ones; 1.0: it always can)"
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
    realism_n: dict[str, int] = field(default_factory=dict)  # real defects per split
    realism_repeats: int = 1  # classifier seeds averaged in each realism figure
    control_repeats: int = 1  # defacements per real defect that the inspector judged

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "data": self.data,
            "classes": self.classes,
            "inspector": self.inspector,
            "n": self.n,
            "realism_n": self.realism_n,
            "realism_repeats": self.realism_repeats,
            "control_repeats": self.control_repeats,
            "figures": {
                split: {k: None if math.isnan(v) else v for k, v in values.items()}
                for split, values in self.figures.items()
            },
        }

    def _interval(self, split: str, accuracy: str, size: str) -> str:
        p, n = self.figures[split].get(accuracy, math.nan), self.figures[split].get(size, math.nan)
        if math.isnan(p) or math.isnan(n):
            return "-"
        low, high = wilson_interval(p, round(n))
        return f"{low:.2f}-{high:.2f} of {round(n)}"

    def format(self) -> str:
        from dgan.report import text_table

        splits = list(self.figures)
        rows = []
        sets = sorted(
            {
                k.removeprefix(prefix)
                for f in self.figures.values()
                for k in f
                for prefix in ("realism_auc_", "set_accuracy_")
                if k.startswith(prefix) and k not in dict(FIGURES)  # not _restored, _std
            }
        )
        names = [
            *FIGURES,
            *((f"category_accuracy_{c}", f"  asked {c}, called {c}") for c in self.classes),
            *((f"realism_auc_{g}", f"  realism, defacements asked {g}") for g in sets),
            *(
                row
                for g in sets
                for row in (
                    (f"realism_own_auc_{g}", f"  realism, {g} alone: a classifier of its own"),
                    (f"realism_own_floor_{g}", "    its floor: two halves of its real defects"),
                )
            ),
            *(
                row
                for g in sets
                for row in (
                    (f"set_accuracy_{g}", f"  asked {g}, called exactly that"),
                    (f"set_size_{g}", "    its 95% interval (Wilson), of n images"),
                    (f"real_set_accuracy_{g}", f"    its ceiling: real {g}, called that"),
                    *((f"set_missed_{c}_{g}", f"    called without {c}") for c in g.split("-")),
                    (f"set_added_{g}", "    called with a category not asked"),
                )
            ),
        ]
        # fmt: skip
        for key, label in names:
            values = [self.figures[s].get(key, math.nan) for s in splits]
            if all(math.isnan(v) for v in values):
                continue
            if key.startswith("set_size_"):  # shown as the accuracy's interval, of n
                accuracy = key.replace("set_size_", "set_accuracy_", 1)
                rows.append([label, *(self._interval(s, accuracy, key) for s in splits)])
                continue
            rows.append([label, *("-" if math.isnan(v) else f"{v:.4f}" for v in values)])
        header = ["figure", *(f"{s} (N={self.n[s]})" for s in splits)]
        lines = [f"synthesis quality of {self.model} on {self.data}", *text_table(header, rows)]
        if self.realism_n:
            counts = ", ".join(f"{s} {n}" for s, n in self.realism_n.items())
            lines += [REALISM_NOTE, f"  realism test sizes (real defects per split): {counts}"]
            if self.realism_repeats > 1:
                lines.append(
                    f"  each realism figure is the mean of {self.realism_repeats} classifier "
                    "seeds, each with its own halves"
                )
        if self.inspector is None:
            lines.append(
                "  category-control accuracy needs --inspector SPEC (trained on real data)"
            )
        else:
            lines.append(f"  categories judged by {self.inspector}")
            if self.control_repeats > 1:
                lines.append(
                    f"  label sets judged on {self.control_repeats} defacements per real defect, "
                    "each on other normals"
                )
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
    realism: bool = True,
    cache_dir: Path = REALISM_CACHE,
    realism_steps: int | None = None,
    realism_repeats: int = 1,
    control_repeats: int = 1,
    realism_n: int | None = None,
    realism_by_set: bool = False,
) -> SynthReport:
    """Realism, category control, background preservation, spatial control and diversity of G on
    the split's normals, and on the held-out surface family (split "transfer") when there is one.
    `realism=False` skips the realism test (about 20 s a split at 32 px on 2 CPU cores);
    `realism_steps`: its classifier's Adam steps per 600 training images (None: STEPS, 300);
    fewer give a quick look, more a test closer to finished;
    `realism_repeats` averages each realism figure over that many classifier seeds;
    `control_repeats` has the inspector judge that many defacements per real defect, each on
    other normals (the label-set figures; the realism test takes the first);
    `realism_n`: real defects per realism test, at most (default DEFAULT_N, normals reused when a
    split has fewer than twice as many); given, every split must have 2 normals per defect used;
    `realism_by_set`: each label set of OWN_MIN real defects or more also gets a classifier of its
    own (realism_own_auc_<set>, beside its floor realism_own_floor_<set>)."""
    from dgan.tracking.source import load_generator_from, resolve_model

    if n is not None and n < 1:
        raise DganError(f"--n must be positive, got {n}", exit_code=2)
    check_realism_repeats(realism_repeats)
    check_control_repeats(control_repeats, inspector, realism)
    check_realism_options(realism_n, realism, realism_by_set, realism_steps)
    device = default_device()
    source = resolve_model(model, "gan", tracking_uri=tracking_uri)
    G, gan_config, classes = load_generator_from(source, device)
    index = open_dataset(data_root)
    require_split(index, split)
    columns = select_classes(index, classes)
    judges = open_judges(None, inspector, classes, device, tracking_uri, with_inception=False)
    size = gan_config.data.image_size
    splits = [split, "transfer"] if has_transfer(index, split) else [split]
    if realism and realism_n is not None:
        for name in splits:
            _require_distinct_normals(index, name, columns, realism_n)
    figures, counts, tested = {}, {}, {}
    for name in splits:
        available = len(index.select(name, normal=True))
        count = n or min(SYNTH_DEFAULT_N, available)
        eval_set = make_eval_set(index, name, columns, count, size, seed)
        rows = measure(G, eval_set, judges, batch_size, device, seed)
        figures[name] = summarize(rows, eval_set, classes, judges, {}, seed)
        counts[name] = eval_set.n
        if realism:
            inputs = make_realism_inputs(
                index, name, columns, classes, size, seed, n=realism_n or DEFAULT_N,
                steps=STEPS if realism_steps is None else realism_steps,
                repeats=realism_repeats, control_repeats=control_repeats, by_set=realism_by_set,
            )  # fmt: skip
            figures[name] |= realism_floors(inputs, seed, cache_dir)
            figures[name] |= realism_figures(
                G, inputs, seed, batch_size, device, judges.inspector, judges.inspector_columns
            )
            tested[name] = inputs.n
    described = judges.inspector.description if judges.inspector else None
    return SynthReport(
        source.uri, str(data_root), list(classes), described, counts, figures, tested,
        realism_repeats if realism else 1, control_repeats,
    )  # fmt: skip


def _require_distinct_normals(index, split: str, columns, realism_n: int) -> None:
    """DganError (exit code 2) when the split lacks 2 distinct normals for each real defect that
    a realism test of `realism_n` would use: a normal on both sides of the classifier's split
    would let it recognise that image rather than tell real from synthesized."""
    used = min(realism_n, len(real_defects(index, split, columns)))
    normals = len(index.select(split, normal=True))
    if normals < 2 * used:
        raise DganError(
            f"--realism-n {realism_n} uses {used} real defects of split {split!r}, and so "
            f"{2 * used} of its normals, each once; it has {normals}: give --realism-n "
            f"{normals // 2} or less, or a dataset with more normals",
            exit_code=2,
        )
