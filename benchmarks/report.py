"""The paper's Tables 2 and 3 in miniature, regenerated: writes reports/README.md with its plots.

Table 2 (the ablation): every row preset (dgan/configs/gan/table2) on the demo preset and the demo
set, K seeds each, judged by the product's own evaluation (`dgan eval synth`): the realism test,
category control by an inspector trained on the real data, background change and diversity,
plus fid_inspector on that inspector's features. Each row's last sample grid goes in the report.

Table 3 (inspection): the inspector on the real data only, and with synthesized defects from the
StarGAN row and from the full model (seed 0 of each, painted on training normals and on normals
of a new draw of the held-out surface family), with and without the GRL source classifier,
K seeds each, scored on the test split and on the held-out family.

Every figure in the report is one this run printed; the commands and the machine load are in it.

    python benchmarks/report.py                                  # the full miniature (hours)
    python benchmarks/report.py --iterations 6 --seeds 1 --epochs 1 --n 16 --out /tmp/r
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

ROWS = ("stargan", "scc", "scc_ani", "scc_lwc", "scc_lwc_sc", "full")
FIGURES = (
    ("realism_auc", "realism (defacements)", "min"),
    ("realism_auc_restored", "realism (restorations)", "min"),
    ("fid_inspector", "fid_inspector", "min"),
    ("category_accuracy", "category control", "max"),
    ("background_change", "background change", "min"),
    ("diversity_l1", "diversity", "max"),
)
SOURCES = (("real only", None), ("+ StarGAN", "stargan"), ("+ Defect-GAN", "full"))


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float]) -> str:
    m, s = mean_std(values)
    return "-" if m != m else f"{m:.4f} ± {s:.4f}"


class Report:
    def __init__(self, args) -> None:
        self.a = args
        self.out = args.out.resolve()
        self.work = self.out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.uri = f"sqlite:///{self.work / 'mlflow.db'}"
        self.state_path = self.work / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}

    def save(self) -> None:
        from dgan.io import atomic_write_text

        atomic_write_text(self.state_path, json.dumps(self.state, indent=2) + "\n")

    def once(self, key: str, make):
        """A result kept in the state file: a rerun continues where the last one stopped."""
        if key not in self.state:
            self.state[key] = make()
            self.save()
        return self.state[key]

    # -- the pieces ---------------------------------------------------------------------------

    def data(self) -> tuple[Path, Path]:
        from dgan.data import DEMO_SIZE
        from dgan.data.demo import generate_demo

        root, surface = self.work / "demo", self.work / "new-surface"
        counts = {"n_normal": self.a.n_normal, "n_defect": self.a.n_defect}
        if not (root / "labels.csv").is_file():
            generate_demo(root, size=DEMO_SIZE, **counts)
        if not (surface / "labels.csv").is_file():
            generate_demo(surface, n_normal=self.a.n_normal, n_defect=1, size=DEMO_SIZE, seed=1)
        return root, surface

    def inspector(self, root: Path, synthetic=(), grl=False, seed=0, name="real") -> str:
        from dgan.config import load_config
        from dgan.train.inspector import run_inspector

        sets = [str(p) for p in synthetic]
        overrides = [f"data.root={json.dumps(str(root))}", f"data.synthetic={json.dumps(sets)}",
                     f"model.grl={str(grl).lower()}", f"train.seed={seed}",
                     f"log.run_root={json.dumps(str(self.work / 'runs'))}",
                     f"log.tracking_uri={json.dumps(self.uri)}"]  # fmt: skip
        if self.a.epochs:
            overrides.append(f"train.epochs={self.a.epochs}")
        cfg = load_config("inspector", ["demo"], overrides)
        return str(run_inspector(cfg, quiet=True, run_name=name).run_dir)

    def gan(self, root: Path, row: str, seed: int) -> str:
        from dgan.config import load_config
        from dgan.train.gan import run_gan

        overrides = [f"data.root={json.dumps(str(root))}", f"train.seed={seed}",
                     f"log.run_root={json.dumps(str(self.work / 'runs'))}",
                     f"log.tracking_uri={json.dumps(self.uri)}", "log.registered_model=null",
                     "eval.realism=false"]  # fmt: skip
        if self.a.iterations:
            overrides.append(f"train.iterations={self.a.iterations}")
        cfg = load_config("gan", ["demo", f"table2/{row}"], overrides)
        return str(run_gan(cfg, quiet=True, run_name=f"{row}-s{seed}").run_dir)

    def evaluate(self, run_dir: str, root: Path, judge: str) -> dict:
        from dgan.evaluation.fid_report import evaluate_fid
        from dgan.evaluation.synth_report import evaluate_synthesis
        from dgan.events import Events

        report = evaluate_synthesis(run_dir, root, judge, self.a.eval_n, tracking_uri=self.uri)
        figures = report.to_dict()["figures"]["train"]
        fid = evaluate_fid(root, run_dir, self.a.eval_n, inspector=judge, tracking_uri=self.uri,
                           cache_dir=self.work / "fid-cache", events=Events())  # fmt: skip
        figures |= {d.fid_name: d.fid for d in fid.distances}
        return figures

    def synth(self, run_dir: str, normals: Path, split: str, out: Path) -> str:
        from dgan.config import load_config
        from dgan.synth.run import run_synth

        values = {"generator": run_dir, "normals": str(normals), "normals_split": split,
                  "out": str(out), "n": self.a.n, "tracking_uri": self.uri}  # fmt: skip
        cfg = load_config("synth", None, [f"{k}={json.dumps(v)}" for k, v in values.items()])
        run_synth(cfg, quiet=True)
        return str(out)

    # -- the tables ---------------------------------------------------------------------------

    def run(self) -> None:
        from dgan.train.inspector import evaluate_inspector

        t0 = time.monotonic()
        root, surface = self.data()
        judge = self.once("judge", lambda: self.inspector(root, name="judge"))
        for row in self.a.rows:
            for seed in range(self.a.seeds):
                key = f"t2/{row}/{seed}"
                run_dir = self.once(f"{key}/run", lambda r=row, s=seed: self.gan(root, r, s))
                self.once(f"{key}/figures", lambda d=run_dir: self.evaluate(d, root, judge))
        for _, source in SOURCES:
            if source is None or source not in self.a.rows:
                continue
            gen = self.state[f"t2/{source}/0/run"]
            self.once(f"t3/{source}/sets", lambda g=gen, s=source: [
                self.synth(g, root, "train", self.work / f"synth-{s}-train"),
                self.synth(g, surface, "transfer", self.work / f"synth-{s}-new-surface"),
            ])  # fmt: skip
        for label, source in SOURCES:
            if source is not None and source not in self.a.rows:
                continue
            sets = [] if source is None else self.state[f"t3/{source}/sets"]
            for grl in (False, True) if source else (False,):
                for seed in range(self.a.seeds):
                    key = f"t3/{label}/{grl}/{seed}"
                    name = f"t3-{source or 'real'}-{'grl' if grl else 'nogrl'}-s{seed}"
                    run_dir = self.once(key, lambda s=sets, g=grl, k=seed, n=name:
                                        self.inspector(root, s, g, k, n))  # fmt: skip
                    self.once(f"{key}/acc", lambda d=run_dir: {
                        sp: evaluate_inspector(d, root, sp).multi_target_accuracy
                        for sp in ("test", "transfer")
                    })  # fmt: skip
        self.state["seconds"] = self.state.get("seconds", 0) + time.monotonic() - t0
        self.save()
        self.write()

    def write(self) -> None:
        from dgan.io import atomic_write_text

        grids = self.out / "grids"
        grids.mkdir(exist_ok=True)
        lines = ["# dgan: the paper's tables in miniature", ""]
        lines += [f"Made by `python benchmarks/report.py {' '.join(sys.argv[1:])}` in "
                  f"{self.state['seconds'] / 60:.1f} min; {_load()}. Demo preset, demo set "
                  f"({self.a.n_normal} normals, {self.a.n_defect} defects), "
                  f"{self.a.iterations or 'the preset'} iterations, {self.a.seeds} seed(s); "
                  "mean ± std over seeds.", ""]  # fmt: skip
        lines += ["## Table 2: the ablation", "",
                  "| row | " + " | ".join(f[1] for f in FIGURES) + " |",
                  "|---|" + "---|" * len(FIGURES)]  # fmt: skip
        per_row = {}
        for row in self.a.rows:
            figs = [self.state[f"t2/{row}/{s}/figures"] for s in range(self.a.seeds)]
            per_row[row] = {k: [f.get(k) for f in figs] for k, _, _ in FIGURES}
            lines.append(f"| {row} | " + " | ".join(cell(per_row[row][k]) for k, *_ in FIGURES)
                         + " |")  # fmt: skip
            last = sorted(Path(self.state[f"t2/{row}/0/run"], "samples").glob("*.png"))
            if last:
                shutil.copyfile(last[-1], grids / f"{row}.png")
        lines += ["", "Realism: 0.5 means a fresh classifier cannot tell the images from real "
                  "ones, 1.0 that it always can. Category control and fid_inspector use an "
                  "inspector trained on the real data only.", ""]  # fmt: skip
        lines += _plot(per_row, self.out / "table2.png")
        for row in self.a.rows:
            if (grids / f"{row}.png").is_file():
                lines += [f"**{row}** (seed 0, last grid)", "", f"![{row}](grids/{row}.png)", ""]
        lines += [
            "## Table 3: inspection",
            "",
            "| training data | GRL | test split | held-out family |",
            "|---|---|---|---|",
        ]
        for label, source in SOURCES:
            if source is not None and source not in self.a.rows:
                continue
            for grl in (False, True) if source else (False,):
                accs = [self.state[f"t3/{label}/{grl}/{s}/acc"] for s in range(self.a.seeds)]
                lines.append(f"| {label} | {'yes' if grl else 'no'} | "
                             f"{cell([a['test'] for a in accs])} | "
                             f"{cell([a['transfer'] for a in accs])} |")  # fmt: skip
        lines += [
            "",
            "Multi-target accuracy (an image counts when all its labels are right). "
            "Synthesized sets: seed 0 of the row's generator, "
            f"{self.a.n} defects on training normals and {self.a.n} on normals of a new "
            "draw of the held-out family (none of them in its test images).",
            "",
        ]
        atomic_write_text(self.out / "README.md", "\n".join(lines))
        print("\n".join(lines))
        print(f"written: {self.out / 'README.md'}")


def _plot(per_row: dict, path: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [f for f in FIGURES if f[0] in ("realism_auc", "realism_auc_restored",
                                            "category_accuracy")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(shown)
    for k, (key, label, _) in enumerate(shown):
        stats = [mean_std(per_row[r][key]) for r in per_row]
        ax.bar([i + k * width for i in range(len(per_row))], [m for m, _ in stats], width,
               yerr=[s for _, s in stats], label=label)  # fmt: skip
    ax.set_xticks([i + width * (len(shown) - 1) / 2 for i in range(len(per_row))], list(per_row))
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [f"![Table 2]({path.name})", ""]


def _load() -> str:
    load1, cores = os.getloadavg()[0], os.cpu_count() or 1
    busy = " (busy: other processes competed)" if load1 > 0.75 * cores else ""
    return f"load average {load1:.1f} on {cores} cores at the end{busy}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--rows", default=",".join(ROWS), help="Table 2 rows, comma-separated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=None, help="default: the preset's")
    parser.add_argument("--epochs", type=int, default=None, help="inspector epochs")
    parser.add_argument("--n", type=int, default=1000, help="synthesized defects per set")
    parser.add_argument("--eval-n", type=int, default=None)
    parser.add_argument("--n-normal", type=int, default=2000)
    parser.add_argument("--n-defect", type=int, default=1000)
    args = parser.parse_args()
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown or args.seeds < 1:
        parser.error(f"rows must be among {', '.join(ROWS)} and --seeds at least 1")
    Report(args).run()


if __name__ == "__main__":
    main()
