"""Table 3 in miniature: does mixing synthesized defects into training help the inspector?

The paper trains ResNet34 and DenseNet121 on CODEBRIM alone and with 50,000 synthesized defects
(Table 3: 70.25% -> 75.48% multi-target accuracy for ResNet34). Here the same comparison runs
small: the inspector on real data only, then with a synthesized set mixed in, with the GRL
source classifier (Sec. 3.2) and without it, K seeds per row. By default the real set is the
demo set with its training defects thinned to 5% of its normals, the scarce-defect setting in
which synthesis should matter.

Every run is an ordinary inspector run (runs/inspector/...) and an MLflow run tagged
dgan.repro=table3 and dgan.row=<row>, nested under one parent run that holds the summary.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from dgan.config import InspectorConfig, flatten
from dgan.errors import DganError
from dgan.events import ConsoleEvents, Events, FileEvents
from dgan.io import atomic_write_text
from dgan.run import checkpoint as ckpt

# Row name -> (label as printed, uses the synthetic sets, GRL on).
ROWS: dict[str, tuple[str, bool, bool]] = {
    "real": ("real only", False, False),
    "grl": ("real + synthetic, GRL", True, True),
    "no-grl": ("real + synthetic, no GRL", True, False),
}
DEFAULT_DEFECT_FRACTION = 0.05  # real training defects per real training normal


@dataclass
class RowResult:
    """Test multi-target accuracy of one row's runs, one per seed."""

    row: str
    label: str
    accuracies: list[float] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.accuracies)

    @property
    def std(self) -> float:
        """Sample standard deviation over seeds (0 for one seed)."""
        return statistics.stdev(self.accuracies) if len(self.accuracies) > 1 else 0.0


@dataclass
class Table3:
    """The rows, where they were written, and how long it took."""

    rows: list[RowResult]
    out_dir: Path
    seconds: float
    setting: str

    def format(self) -> str:
        width = max(len(r.label) for r in self.rows)
        lines = [
            f"Table 3 in miniature ({self.setting})",
            f"  {'row':<{width}}  test multi-target accuracy (mean ± std)  seeds",
        ]
        for r in self.rows:
            cell = f"{100 * r.mean:6.2f} ± {100 * r.std:5.2f} %"
            lines.append(f"  {r.label:<{width}}  {cell:<39}  {len(r.accuracies):>5}")
        lines.append(
            f"  {len(self.rows) * len(self.rows[0].accuracies)} runs in {self.seconds:.0f} s"
        )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "setting": self.setting,
            "seconds": self.seconds,
            "rows": [
                {
                    "row": r.row,
                    "label": r.label,
                    "mean": r.mean,
                    "std": r.std,
                    "test_multi_target_accuracy": r.accuracies,
                    "run_dirs": [str(p) for p in r.run_dirs],
                    "seconds": r.seconds,
                }
                for r in self.rows
            ],
        }


def parse_rows(rows: str) -> list[str]:
    """'real,grl,no-grl' -> ['real', 'grl', 'no-grl'], refusing unknown names."""
    names = [r.strip() for r in rows.split(",") if r.strip()]
    unknown = [r for r in names if r not in ROWS]
    if unknown or not names:
        raise DganError(
            f"--rows {rows!r}: choose from {', '.join(ROWS)} (comma-separated)", exit_code=2
        )
    return names


def row_config(config: InspectorConfig, row: str, synthetic: list[Path], seed: int):
    """The inspector config of one run of the table."""
    _, mixed, grl = ROWS[row]
    return config.model_copy(
        update={
            "model": config.model.model_copy(update={"grl": grl}),
            "data": config.data.model_copy(update={"synthetic": synthetic if mixed else []}),
            "train": config.train.model_copy(update={"seed": seed}),
            # Each run's inspector stays in its run directory; MLflow gets metrics and tags.
            "log": config.log.model_copy(update={"log_model": False}),
        }
    )


def run_table3(
    config: InspectorConfig,
    synthetic: list[Path],
    seeds: int = 3,
    rows: list[str] | None = None,
    events: Events | None = None,
) -> Table3:
    """Run every row K times (seeds config.train.seed .. +K-1), print and write the table.

    Each run's output goes to <row>-s<seed>.log in runs/repro/NNNNN-table3/, beside table3.json.
    """
    events = events or ConsoleEvents()
    from dgan.data import ensure_demo_dataset
    from dgan.tracking.tracker import Tracker
    from dgan.train.inspector import read_data, run_inspector

    rows = rows or list(ROWS)
    if seeds < 1:
        raise DganError(f"--seeds must be at least 1, got {seeds}", exit_code=2)
    if not synthetic and (needs := [r for r in rows if ROWS[r][1]]):
        raise DganError(
            f"rows {', '.join(needs)} mix in a synthesized set: pass --synthetic DIR (folder "
            "format: defect/ and normal/ with labels.csv, as 'dgan synth' writes), or run only "
            "the baseline with --rows real.",
            exit_code=2,
        )
    if config.data.root is None:
        config = config.model_copy(
            update={"data": config.data.model_copy(update={"root": ensure_demo_dataset()})}
        )
    # Decode every image once here; the runs then skip the check.
    data = read_data(
        config.model_copy(update={"data": config.data.model_copy(update={"synthetic": synthetic})}),
        check=True,
        events=events,
    )
    n_normal = sum(not any(s.labels) for s in data.train)
    setting = (
        f"{config.model.arch} at {config.data.image_size} px, {config.train.epochs} epochs, "
        f"{seeds} seed{'s' * (seeds > 1)}; real train {n_normal} normals + "
        f"{len(data.train) - n_normal} defects"
        + (f", synthetic {len(data.synthetic)} images" if synthetic else "")
    )
    events.info(setting)
    out_dir = ckpt.new_run_dir(config.log.run_root, "repro", "table3")
    parent = Tracker(
        enabled=True,
        uri=config.log.tracking_uri,
        experiment=config.log.experiment,
        run_name=out_dir.name,
        params={**flatten(config), "repro.seeds": seeds, "repro.rows": ",".join(rows),
                "repro.synthetic": ",".join(map(str, synthetic))},
        tags={"dgan.repro": "table3", "dgan.run_dir": str(out_dir.resolve())},
    )  # fmt: skip
    t0 = time.perf_counter()
    results = [RowResult(r, ROWS[r][0]) for r in rows]
    try:
        for result in results:
            for k in range(seeds):
                seed = config.train.seed + k
                tags = {
                    "dgan.repro": "table3",
                    "dgan.row": result.row,
                    "dgan.seed": str(seed),
                    "mlflow.parentRunId": parent.run_id,
                }
                run_log = FileEvents(out_dir / f"{result.row}-s{seed}.log")
                try:
                    run = run_inspector(
                        row_config(config, result.row, synthetic, seed),
                        run_name=f"table3-{result.row}-s{seed}",
                        tags=tags,
                        check_data=False,
                        events=run_log,
                    )
                finally:
                    run_log.close()
                accuracy = run.metrics["test_multi_target_accuracy"]
                result.accuracies.append(accuracy)
                result.run_dirs.append(run.run_dir)
                result.seconds.append(run.seconds)
                events.info(
                    f"  {result.label}, seed {seed}: test multi-target accuracy "
                    f"{100 * accuracy:.2f} % ({run.seconds:.0f} s, {run.run_dir})"
                )
            parent.log_metrics(
                {f"{result.row}_mean": result.mean, f"{result.row}_std": result.std}, step=0
            )
    except BaseException:
        parent.finish("FAILED")
        raise
    table = Table3(results, out_dir, time.perf_counter() - t0, setting)
    atomic_write_text(out_dir / "table3.json", json.dumps(table.to_dict(), indent=2) + "\n")
    atomic_write_text(out_dir / "table3.txt", table.format() + "\n")
    parent.log_artifact(out_dir / "table3.json")
    parent.log_artifact(out_dir / "table3.txt")
    parent.finish("FINISHED")
    return table
