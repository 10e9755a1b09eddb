"""Periodic evaluation inside `dgan train gan`, on fixed inputs; every process calls it."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

from dgan.data import DatasetIndex, open_dataset
from dgan.data.loader import select_classes
from dgan.errors import DganError
from dgan.evaluation.inputs import has_transfer, make_eval_set, real_defects
from dgan.evaluation.judges import open_judges
from dgan.evaluation.measure import measure, reference_features, summarize
from dgan.evaluation.realism import make_realism_inputs, realism_figures, realism_floors
from dgan.events import Events
from dgan.metrics.fid import (
    FeatureSet,
)


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
        required=False,
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

    def __init__(self, config, classes: Sequence[str], accelerator, events: Events) -> None:
        self.accelerator, self.classes = accelerator, list(classes)
        self.seed, self.batch_size = config.eval.seed, config.eval.batch_size
        device = accelerator.device
        main = accelerator.is_main_process
        index = open_dataset(config.data.root)
        columns = select_classes(index, classes)
        e = config.eval
        self.judges = open_judges(
            e.inception_weights, e.inspector, classes, device, config.log.tracking_uri,
            required=False, events=events,
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
                    events.info(
                        f"evaluation reference ({eval_set.split}, N={len(eval_set.reference)}, "
                        f"{extractor.name}): {'reused' if reused else 'computed'} {path}"
                    )
            self.references.append(refs)
        # The realism test on the train split, on the main process (the others wait for it at
        # the next collective); its floors are computed once and cached.
        self.realism, self.floors = None, {}
        if e.realism and main:
            self.realism = make_realism_inputs(
                index, "train", columns, classes, size, self.seed, e.realism_n, e.realism_steps,
                e.realism_repeats, e.control_repeats,
            )  # fmt: skip
            self.floors = realism_floors(
                self.realism, self.seed, Path(config.log.run_root) / ".cache" / "realism"
            )

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
        if self.realism is not None:
            metrics |= self.floors | realism_figures(
                G, self.realism, self.seed, self.batch_size, self.accelerator.device,
                self.judges.inspector, self.judges.inspector_columns,
            )  # fmt: skip
        metrics["eval_seconds"] = time.perf_counter() - t0
        return metrics
