"""The paper's Tables 2 and 3 in miniature, regenerated: writes reports/README.md with its plots.

Table 2 (the ablation): every row preset (dgan/configs/gan/table2) on the demo preset and the demo
set, K seeds each, judged by the product's own evaluation (`dgan eval synth`): the realism test,
category control by an inspector trained on the real data, background change and diversity,
plus fid_inspector on that inspector's features. Each row's last sample grid goes in the report.

Table 3 (inspection): the inspector on the real data only, and with synthesized defects from the
StarGAN row and from the full model (seed 0 of each, painted on training normals and on normals
of a new draw of the held-out surface family), with and without the GRL source classifier,
K seeds each, scored on the test split and on the held-out family.

The search: a `dgan tune` study on the same set, whose trial 0 trains the preset's own values,
so its ranked table says whether the search beat the default; with Chromium, a screenshot of the
MLflow UI's compare view of its trials (benchmarks/ui_screenshot.sh against `dgan ui`).

Speed: the benchmarks (training step against the official StarGAN step, synthesis against the
bare generator, Ray Tune's overhead, the queue's latencies), run here, their output pasted.

Every figure in the report is one this run printed; the commands and the machine load are in it.

    python benchmarks/report.py                                  # the full miniature (hours)
    python benchmarks/report.py --iterations 6 --seeds 1 --epochs 1 --n 16 --out /tmp/r \
        --tune-trials 0 --speed none
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
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
BENCHMARKS = (  # the Speed section: (what, script); their arguments by --speed (None: skip)
    ("the training step, against the official StarGAN step", "bench_train_step.py"),
    ("synthesis, against the bare generator", "bench_synth.py"),
    ("Ray Tune's overhead", "bench_tune.py"),
    ("the job queue", "bench_jobs.py"),
)
SPEED_ARGS = {
    "full": ("--size 32 64 128 --repeats 3",
             "--config demo --batch 64 --n 2000 --memory-n 1000 20000",
             "--trials 4 --concurrency 2 --iterations 100 --report-every 25",
             ""),
    "short": ("--size 32 --repeats 3",
              "--config demo --batch 64 --n 2000 --memory-n 1000 5000",
              "--trials 2 --concurrency 2 --iterations 100 --report-every 50",
              "--list-jobs 10000 --claims 500 --end-to-end 40"),
    "tiny": ("--size 32 --batch 2 --width 8 --repeats 1 --threads 1",
             "--config demo --batch 8 --n 16 --memory-n",
             None,  # a second Ray start for what the search's study already runs
             "--submits 2 --starts 1 --list-jobs 50 --claims 10 --end-to-end 2 --repeats 1"),
}  # fmt: skip


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def cell(values: list[float]) -> str:
    """mean ± std over seeds; one seed's value alone (one run has no spread to show)."""
    m, s = mean_std(values)
    if m != m:
        return "-"
    return f"{m:.4f}" if len([v for v in values if v is not None]) == 1 else f"{m:.4f} ± {s:.4f}"


class Report:
    def __init__(self, args) -> None:
        self.a = args
        self.out = args.out.resolve()
        self.work = self.out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.uri = f"sqlite:///{self.work / 'mlflow.db'}"
        self.state_path = self.work / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        self.load_before = os.getloadavg()[0]  # others' work: this invocation has done none
        self.worked = False  # whether this invocation computed any result (a rerun may not)

    def save(self) -> None:
        from dgan.io import atomic_write_text

        atomic_write_text(self.state_path, json.dumps(self.state, indent=2) + "\n")

    def once(self, key: str, make):
        """A result kept in the state file: a rerun continues where the last one stopped."""
        if key not in self.state:
            self.state[key] = make()
            self.worked = True
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
                     f"log.tracking_uri={json.dumps(self.uri)}", "log.log_model=false"]  # fmt: skip
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
                     "log.log_model=false", "eval.realism=false"]  # fmt: skip
        if self.a.iterations:
            overrides.append(f"train.iterations={self.a.iterations}")
        cfg = load_config("gan", ["demo", f"table2/{row}"], overrides)
        return str(run_gan(cfg, quiet=True, run_name=f"{row}-s{seed}").run_dir)

    def evaluate(self, run_dir: str, root: Path, judge: str) -> dict:
        from dgan.evaluation.fid_report import evaluate_fid
        from dgan.evaluation.synth_report import evaluate_synthesis
        from dgan.events import Events
        from dgan.metrics.realism import STEPS

        steps = self.a.realism_steps or STEPS
        report = evaluate_synthesis(run_dir, root, judge, self.a.eval_n, tracking_uri=self.uri,
                                    realism_steps=steps)  # fmt: skip
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
        if self.a.tune_trials:
            self.once("search", lambda: self.search(root))
            if self.a.screenshot and "search/screenshot" not in self.state:
                self.state["search/screenshot"] = self.screenshot()
                self.worked = True
                self.save()
        sizes = SPEED_ARGS.get(self.a.speed, (None,) * len(BENCHMARKS))  # none: all skipped
        for (_, script), args in zip(BENCHMARKS, sizes, strict=True):
            if args is None:
                continue
            if f"speed/{script}" not in self.state or self.state[f"speed/{script}"]["rc"]:
                self.state[f"speed/{script}"] = self.benchmark(script, args, root)
                self.worked = True
                self.save()
        seconds = time.monotonic() - t0
        self.state["seconds"] = self.state.get("seconds", 0) + seconds
        if self.worked:  # a rerun that only writes the report is not one of its makers
            self.state.setdefault("invocations", []).append({
                "args": " ".join(sys.argv[1:]), "minutes": round(seconds / 60, 1),
                "load_before": round(self.load_before, 2),
                "load_end": round(os.getloadavg()[0], 2), "commit": _commit()})  # fmt: skip
        self.save()
        self.write()

    def search(self, root: Path) -> dict:
        """A `dgan tune` study on the report's set; continued with --resume when interrupted."""
        study = self.work / "tune" / "report"
        name = ["--resume", "report"] if (study / "study.json").is_file() else ["--name", "report"]
        extra = [x for kv in self.a.tune_set for x in ("--set", kv)]
        cmd = [_dgan(), "tune", *name, "--trials", str(self.a.tune_trials), "--data", str(root),
               "--tracking-uri", self.uri, "--set", f"root={study.parent}", *extra]  # fmt: skip
        t0 = time.monotonic()
        done = subprocess.run(cmd, cwd=self.work, env=_env(), capture_output=True, text=True)
        (self.work / "tune-report.log").write_text(done.stdout + done.stderr)
        if done.returncode:
            raise SystemExit(f"dgan tune failed (exit {done.returncode}): {done.stderr[-2000:]}")
        state = json.loads((study / "study.json").read_text())
        shown = ["dgan tune", "--trials", str(self.a.tune_trials), *extra]
        last = [ln for ln in done.stdout.splitlines() if re.match(r"\d+ trials in ", ln)]
        return {"command": " ".join(shown), "table": (study / "results.txt").read_text(),
                "summary": last[-1] if last else "", "seconds": time.monotonic() - t0,
                "parent_run_id": state.get("parent_run_id")}  # fmt: skip

    def screenshot(self) -> str:
        """The MLflow UI's compare view of the study's trials, as `dgan ui` serves it."""
        import socket

        from mlflow.tracking import MlflowClient

        from dgan.run.launch import free_port

        if not shutil.which("chromium") and not shutil.which("chromium-browser"):
            return "not taken: Chromium is not installed (Debian: apt-get install chromium)"
        client = MlflowClient(self.uri)
        parent = client.get_run(self.state["search"]["parent_run_id"])
        match = f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        children = client.search_runs([parent.info.experiment_id], match)
        port = free_port()
        ui = subprocess.Popen([_dgan(), "ui", "--tracking-uri", self.uri, "--port", str(port)],
                              cwd=self.work, env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(1)
            runs = json.dumps([r.info.run_id for r in children]).replace(" ", "")
            url = (f"http://127.0.0.1:{port}/#/compare-runs?runs={runs}"
                   f"&experiments=[\"{parent.info.experiment_id}\"]")  # fmt: skip
            png = self.out / "tune-compare.png"
            script = Path(__file__).with_name("ui_screenshot.sh")
            done = subprocess.run(["bash", str(script), url, str(png), "1600x1000"],
                                  capture_output=True, text=True)  # fmt: skip
            return png.name if done.returncode == 0 else f"not taken: {done.stderr.strip()}"
        finally:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(timeout=60)

    def benchmark(self, script: str, args: str, root: Path) -> dict:
        _settle(self.a.settle)
        cmd = [sys.executable, str(Path(__file__).with_name(script)), *args.split()]
        if script == "bench_tune.py":
            cmd += ["--data", str(root), "--work", str(self.work / "bench-tune")]
        t0 = time.monotonic()
        done = subprocess.run(cmd, cwd=self.work, env=_env(), capture_output=True, text=True)
        output = done.stdout if done.returncode == 0 else done.stdout + done.stderr[-3000:]
        return {"command": f"python benchmarks/{script} {args}".strip(), "rc": done.returncode,
                "output": output, "seconds": time.monotonic() - t0}  # fmt: skip

    def write(self) -> None:
        from dgan.io import atomic_write_text

        grids = self.out / "grids"
        grids.mkdir(exist_ok=True)
        lines = ["# dgan: the paper's tables in miniature", ""]
        made = [f"`python benchmarks/report.py {i['args']}` ({i['minutes']} min; {_load(i)})"
                for i in self.state.get("invocations", [])]  # fmt: skip
        lines += [f"Made by {', then '.join(made) or 'benchmarks/report.py'}, "
                  f"{self.state['seconds'] / 60:.1f} min in all on {os.cpu_count()} cores. "
                  f"Demo preset, demo set ({self.a.n_normal} normals, {self.a.n_defect} defects), "
                  f"{self.a.iterations or 'the preset'} iterations, "
                  + ("1 seed: each figure is one run's." if self.a.seeds == 1 else
                     f"{self.a.seeds} seeds: mean ± std over seeds."), ""]  # fmt: skip
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
        lines += self.write_search() + self.write_speed()
        atomic_write_text(self.out / "README.md", "\n".join(lines))
        print("\n".join(lines))
        print(f"written: {self.out / 'README.md'}")

    def write_search(self) -> list[str]:
        found = self.state.get("search")
        if not found:
            return []
        lines = ["## The search", "",
                 f"`{found['command']}` on the report's demo set, in "
                 f"{found['seconds'] / 60:.1f} min: {found['summary'] or 'done'}. Trial 0 "
                 "trains the preset's own values (\"the base config\"); the others are the "
                 "search's.", "", "```", found["table"].rstrip(), "```", ""]  # fmt: skip
        rows = [ln.split() for ln in found["table"].splitlines() if ln.strip()[:1].isdigit()]
        base = [r for r in rows if "base" in " ".join(r)]
        if rows and base:
            verdict = ("The preset's values ranked first: the search did not beat them."
                       if base[0][0] == rows[0][0] else
                       f"The search's best ({rows[0][1]}, {rows[0][3]}) beat the preset's values "
                       f"({base[0][1]}, {base[0][3]}, rank {base[0][0]}) on the study's own test; "
                       "a study's trials are short, so retrain a winner at full length before "
                       "adopting it.")  # fmt: skip
            lines += [verdict, ""]
        shot = self.state.get("search/screenshot")
        if shot and shot.endswith(".png"):
            lines += ["The MLflow UI's compare view of the study's trials (`dgan ui`, then "
                      "`benchmarks/ui_screenshot.sh`):", "", f"![compare]({shot})", ""]  # fmt: skip
        elif shot:
            lines += [f"Screenshot of the MLflow UI: {shot}.", ""]
        return lines

    def write_speed(self) -> list[str]:
        lines = []
        for what, script in BENCHMARKS:
            got = self.state.get(f"speed/{script}")
            if got is None:
                continue
            status = "" if got["rc"] == 0 else f" It failed (exit {got['rc']})."
            lines += [f"### {what[0].upper()}{what[1:]}", "",
                      f"`{got['command']}`, {got['seconds']:.0f} s.{status}", "",
                      "```", got["output"].rstrip(), "```", ""]  # fmt: skip
        if lines:
            lines = ["## Speed", "", "Each benchmark's own output, printed in this run; "
                     "each names its goal or reference beside its figure.", ""] + lines  # fmt: skip
        return lines


def _dgan() -> str:
    here = Path(sys.executable).with_name("dgan")
    return str(here) if here.is_file() else (shutil.which("dgan") or "dgan")


def _env() -> dict[str, str]:
    repo = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": repo, "MLFLOW_DISABLE_TELEMETRY": "true"}


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
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--", label="realism at chance")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [f"![Table 2]({path.name})", ""]


def _load(invocation: dict) -> str:
    """The machine's load around one invocation: before it (other processes) and at its end."""
    before = invocation.get("load_before")
    start = "" if before is None else f"{before:.1f} before it and "
    code = f", at commit {invocation['commit']}" if invocation.get("commit") else ""
    end = f"{invocation['load_end']:.1f} at its end"
    return f"load average {start}{end}, its own work included{code}"


def _commit() -> str | None:
    """The code's git commit (and '+changes' when the work tree differs): the presets a cut ran."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, text=True,
                              capture_output=True, timeout=10)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, text=True, capture_output=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _settle(limit_s: float) -> None:
    """Wait until the 1-minute load average says the last step's work has left the cores, so
    that a benchmark does not time the tail of the previous one (at most `limit_s`)."""
    cores, deadline = os.cpu_count() or 1, time.monotonic() + limit_s
    while os.getloadavg()[0] > 0.5 * cores and time.monotonic() < deadline:
        time.sleep(5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="example: python benchmarks/report.py --seeds 1 --speed short  (reports/ now)",
    )
    parser.add_argument("--out", type=Path, default=Path("reports"))
    parser.add_argument("--rows", default=",".join(ROWS), help="Table 2 rows, comma-separated")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=None, help="default: the preset's")
    parser.add_argument("--epochs", type=int, default=None, help="inspector epochs")
    parser.add_argument("--n", type=int, default=1000, help="synthesized defects per set")
    parser.add_argument("--eval-n", type=int, default=None)
    parser.add_argument("--realism-steps", type=int, default=None, metavar="N",
                        help="the realism test's classifier steps (default: the full test's "
                             "300; fewer for a quick look)")  # fmt: skip
    parser.add_argument("--n-normal", type=int, default=2000)
    parser.add_argument("--n-defect", type=int, default=1000)
    parser.add_argument(
        "--tune-trials",
        type=int,
        default=8,
        help="trials of the search section's dgan tune study (0: no search)",
    )
    parser.add_argument(
        "--tune-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a dgan tune override for that study, e.g. gan.train.iterations=200; repeatable",
    )
    parser.add_argument(
        "--screenshot",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a screenshot of the study in the MLflow UI (needs Chromium)",
    )
    parser.add_argument(
        "--speed",
        choices=(*SPEED_ARGS, "none"),
        default="full",
        help="the benchmarks' sizes (full: the README's commands)",
    )
    parser.add_argument("--settle", type=float, default=180.0, metavar="SECONDS",
                        help="before each benchmark, wait up to this long for the load average "
                             "to fall below half the cores (the last step's tail)")  # fmt: skip
    args = parser.parse_args()
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown or args.seeds < 1:
        parser.error(f"rows must be among {', '.join(ROWS)} and --seeds at least 1")
    if args.realism_steps is not None and args.realism_steps < 1:
        parser.error("--realism-steps must be at least 1")
    if args.tune_trials < 0 or args.settle < 0:
        parser.error("--tune-trials and --settle must be 0 or more (0: no search, no wait)")
    Report(args).run()


if __name__ == "__main__":
    main()
