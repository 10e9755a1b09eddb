"""`dgan demo`: the whole product end to end on the demo set, with a summary of what it measured.

It lives beside the queue because it drives both sides: the library's jobs (dgan) directly, and
three of its steps through the queue, as a user's pipeline would.

The steps, in order; each one records what it made in `DIR/demo.json` (written atomically) and is
skipped on a rerun when that output is still there, so a demo interrupted anywhere continues
where it stopped:

1. data: the procedural demo set (`data/demo`), checked; and a second draw of the held-out
   surface family (`DIR/new-surface`): normals a team has plenty of for a new surface, none of
   which the demo set's transfer split (where inspectors are scored) contains.
2. gan: Defect-GAN on the demo preset. It registers its generator in MLflow and, on improvement
   of its realism test, moves the `champion` alias (`--promote-if-better auto`).
3. inspector: the inspector on the real data only; it is also the independent judge of step 4.
4. evaluate: `dgan eval synth` on the new generator: realism, category control, background.
5. champion: which version `models:/defect-gan@champion` is (made champion when there is none).
6. queue: through the job queue (one drained worker on queue `demo`), synthesize from
   `models:/defect-gan@champion` onto training normals and onto the new surface's normals, then
   train the inspector on the real data plus both synthesized sets.
7. score: both inspectors on the test split and on the held-out family (split "transfer").
8. the summary table (`DIR/summary.md`), and where to look.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgan.errors import DganError
from dgan.events import ConsoleEvents, Events
from dgan.io import atomic_write_text

STATE_FILE = "demo.json"
QUEUE = "demo"


@dataclass(frozen=True)
class DemoOptions:
    """What `dgan demo` runs; the defaults are the demo a new user sees."""

    out: Path = Path("runs/demo")  # the demo's own records: state, summary, synthesized sets
    data: Path = Path("data/demo")
    run_root: Path = Path("runs")
    iterations: int | None = None  # None: the demo preset's
    epochs: int | None = None  # inspector epochs; None: the inspector's demo preset
    n: int = 1000  # synthesized defects per set (two sets: training normals, new surface)
    eval_n: int | None = None  # inputs per split of step 4; None: dgan eval synth's default
    realism: bool = True
    tracking_uri: str | None = None
    jobs_db: Path | None = None  # None: the queue's default (runs/jobs.db)
    quiet: bool = False

    def __post_init__(self) -> None:
        for name in ("iterations", "epochs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DganError(f"--{name} must be at least 1, got {value}", exit_code=2)
        if self.n < 1:
            raise DganError(f"--n must be at least 1, got {self.n}", exit_code=2)


class Demo:
    """The steps of the module docstring over one state file."""

    def __init__(self, options: DemoOptions, events: Events | None = None) -> None:
        self.o = options
        self.events = events or ConsoleEvents()
        self.dir = options.out.resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.dir / STATE_FILE
        self.state: dict[str, Any] = {}
        if self.state_path.is_file():
            try:
                self.state = json.loads(self.state_path.read_text())
            except ValueError:
                raise DganError(
                    f"{self.state_path} is not a demo state file; delete it (the demo then "
                    "redoes every step) or choose another --out"
                ) from None
        self.tracking_uri = self._tracking_uri()

    def _tracking_uri(self) -> str:
        from dgan.tracking.tracker import store_uri

        return store_uri(self.o.tracking_uri)

    # -- the step machinery -------------------------------------------------------------------

    def step(self, name: str, title: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        done = self.state.get(name)
        if done is not None and all(Path(p).exists() for p in done.get("paths", [])):
            self.events.info(f"== {title}: done before, skipped ({self.state_path})")
            return done
        self.events.info(f"== {title}")
        start = time.monotonic()
        record = run()
        record["seconds"] = round(time.monotonic() - start, 1)
        self.state[name] = record
        atomic_write_text(self.state_path, json.dumps(self.state, indent=2) + "\n")
        return record

    def run(self) -> str:
        """Every step; returns the summary (also written to DIR/summary.md)."""
        start = time.monotonic()
        self.step("data", "1/7 the demo dataset and a new surface's normals", self.data)
        gan = self.step("gan", "2/7 train Defect-GAN", self.train_gan)
        real = self.step("inspector", "3/7 train the inspector on real data", self.train_real)
        self.step("evaluate", "4/7 evaluate the generator", lambda: self.evaluate(gan, real))
        self.step("champion", "5/7 the champion generator", lambda: self.champion(gan))
        self.step("queue", "6/7 synthesize and retrain through the job queue", self.queue)
        self.step("score", "7/7 score both inspectors", self.score)
        summary = self.summary(time.monotonic() - start)
        atomic_write_text(self.dir / "summary.md", summary)
        return summary

    # -- the steps ----------------------------------------------------------------------------

    def data(self) -> dict[str, Any]:
        from dgan.data import DEMO_SIZE, ensure_demo_dataset
        from dgan.data.check import check_dataset
        from dgan.data.demo import generate_demo

        root = ensure_demo_dataset(self.o.data, self.events).resolve()
        report = check_dataset(root)
        self.events.info(report.format())
        surface = self.dir / "new-surface"
        if not (surface / "labels.csv").is_file():
            # Another draw (seed 1) of the same families: its held-out family's normals are new
            # images of the surface whose real defects the inspectors are scored on.
            generate_demo(surface, n_normal=2000, n_defect=1, size=DEMO_SIZE, seed=1)
        return {"root": str(root), "new_surface": str(surface), "paths": [str(root), str(surface)]}

    def train_gan(self) -> dict[str, Any]:
        from dgan.config import load_config
        from dgan.train.gan import run_gan

        overrides = [
            f"data.root={json.dumps(self.state['data']['root'])}",
            f"log.run_root={json.dumps(str(self.o.run_root))}",
            f"log.tracking_uri={json.dumps(self.tracking_uri)}",
            "log.promote_if_better=auto",
        ]
        if self.o.iterations is not None:
            overrides.append(f"train.iterations={self.o.iterations}")
        if not self.o.realism:
            overrides.append("eval.realism=false")
        cfg = load_config("gan", ["demo"], overrides)
        result = run_gan(cfg, quiet=self.o.quiet, run_name="demo")
        if result.state != "finished":
            raise DganError(f"Defect-GAN training ended {result.state}; rerun dgan demo to resume")
        grids = sorted((result.run_dir / "samples").glob("*.png"))
        return {
            "run_dir": str(result.run_dir),
            "iterations": result.step,
            "version": result.registered_version,
            "promoted": result.promoted,
            "grid": str(grids[-1]) if grids else None,
            "paths": [str(result.run_dir / "generator")],
        }

    def _inspector_config(self, synthetic: list[str] | None = None):
        from dgan.config import load_config

        overrides = [
            f"data.root={json.dumps(self.state['data']['root'])}",
            f"log.run_root={json.dumps(str(self.o.run_root))}",
            f"log.tracking_uri={json.dumps(self.tracking_uri)}",
        ]
        if synthetic:
            overrides.append(f"data.synthetic={json.dumps(synthetic)}")
        if self.o.epochs is not None:
            overrides.append(f"train.epochs={self.o.epochs}")
        return load_config("inspector", ["demo"], overrides)

    def train_real(self) -> dict[str, Any]:
        from dgan.train.inspector import run_inspector

        result = run_inspector(self._inspector_config(), quiet=self.o.quiet, run_name="demo-real")
        if result.state != "finished":
            raise DganError(f"inspector training ended {result.state}; rerun dgan demo to resume")
        return {"run_dir": str(result.run_dir), "paths": [str(result.run_dir / "inspector")]}

    def evaluate(self, gan: dict[str, Any], real: dict[str, Any]) -> dict[str, Any]:
        from dgan.evaluation.synth_report import evaluate_synthesis

        report = evaluate_synthesis(
            gan["run_dir"], Path(self.state["data"]["root"]), real["run_dir"], self.o.eval_n,
            realism=self.o.realism, tracking_uri=self.tracking_uri,
        )  # fmt: skip
        self.events.info(report.format())
        path = self.dir / "eval-synth.json"
        atomic_write_text(path, json.dumps(report.to_dict(), indent=2) + "\n")
        return {"report": str(path), "figures": report.to_dict()["figures"], "paths": [str(path)]}

    def champion(self, gan: dict[str, Any]) -> dict[str, Any]:
        from dgan.tracking.registry import get_model, promote, registry_client

        client = registry_client(self.tracking_uri)
        holder = get_model(client, "defect-gan").aliases.get("champion")
        if holder is None:
            promote("defect-gan", gan["version"], tracking_uri=self.tracking_uri)
            holder = gan["version"]
        holder = str(holder)
        if holder == str(gan["version"]):
            self.events.info(f"defect-gan@champion is version {holder}, the model just trained")
        else:
            self.events.info(
                f"defect-gan@champion stays version {holder}: the model just trained (version "
                f"{gan['version']}) did not improve on its realism test; synthesis uses the "
                "champion"
            )
        return {"version": holder, "uri": "models:/defect-gan@champion"}

    def queue(self) -> dict[str, Any]:
        """Three jobs on queue `demo`, run by one worker that exits once they are done."""
        from jobs.spec import build_spec, new_job
        from jobs.store import Store, resolve_db
        from jobs.worker import Worker

        store = Store(resolve_db(self.o.jobs_db), create=True)
        try:
            ids = self.state.get("queue_jobs")
            if ids is None:
                ids = self._submit(store, build_spec, new_job)
                self.state["queue_jobs"] = ids
                atomic_write_text(self.state_path, json.dumps(self.state, indent=2) + "\n")
            self.events.info(
                f"jobs {', '.join(map(str, ids))} on queue {QUEUE!r}; a worker runs them "
                f"(dgan jobs list --queue {QUEUE} shows them, dgan jobs logs ID their output)"
            )
            worker = Worker(
                store, slots=1, queues=[QUEUE], exit_when_empty=True, retry_backoff=1.0,
                say=lambda line: self.events.info(f"  worker: {line}"),
            )  # fmt: skip
            worker.run()
            rows = {i: store.get(i) for i in ids}
        finally:
            store.close()
        failed = [i for i, row in rows.items() if row["state"] != "succeeded"]
        if failed:
            raise DganError(
                f"job(s) {', '.join(map(str, failed))} did not succeed "
                f"({', '.join(rows[i]['state'] for i in failed)}); see 'dgan jobs logs ID', "
                "then 'dgan jobs retry ID' and rerun dgan demo"
            )
        outputs = {i: json.loads(rows[i]["outputs"] or "{}") for i in ids}
        synth_train, synth_new, retrained = (outputs[i] for i in ids)
        return {
            "jobs": ids,
            "synth_train": synth_train["out"],
            "synth_new_surface": synth_new["out"],
            "run_dir": retrained["run_dir"],
            "paths": [synth_train["out"], synth_new["out"], retrained["run_dir"]],
        }

    def _submit(self, store, build_spec, new_job) -> list[int]:
        common = ["--generator", "models:/defect-gan@champion", "--n", str(self.o.n)]
        common += ["--tracking-uri", self.tracking_uri, "--quiet"]
        on_train = self.dir / "synth-train"
        on_new = self.dir / "synth-new-surface"
        first = store.submit(
            [
                new_job(build_spec("synth", [*common, "--out", str(on_train)], name="demo-synth"),
                        queue=QUEUE, max_retries=1),
                new_job(build_spec("synth", [
                    *common, "--out", str(on_new), "--normals", self.state["data"]["new_surface"],
                    "--set", "normals_split=transfer",
                ], name="demo-synth-new-surface"), queue=QUEUE, max_retries=1),
            ]
        )  # fmt: skip
        args = ["--data", self.state["data"]["root"], "--tracking-uri", self.tracking_uri]
        args += ["--synthetic", str(on_train), "--synthetic", str(on_new)]
        args += ["--set", f"log.run_root={json.dumps(str(self.o.run_root.resolve()))}"]
        if self.o.epochs is not None:
            args += ["--set", f"train.epochs={self.o.epochs}"]
        spec = build_spec("train-inspector", args, name="demo-synth")
        last = store.submit([new_job(spec, queue=QUEUE, max_retries=1, after=first)])
        return [*first, *last]

    def score(self) -> dict[str, Any]:
        from dgan.train.inspector import evaluate_inspector

        root = Path(self.state["data"]["root"])
        rows = {}
        for name, step in (("real only", "inspector"), ("real + synthetic", "queue")):
            run_dir = self.state[step]["run_dir"]
            rows[name] = {
                split: evaluate_inspector(run_dir, root, split).multi_target_accuracy
                for split in ("test", "transfer")
            }
        return {"accuracy": rows}

    # -- the summary --------------------------------------------------------------------------

    def summary(self, seconds: float) -> str:
        from dgan.report import text_table

        s = self.state
        gan, figures = s["gan"], s["evaluate"]["figures"]
        lines = [f"# dgan demo ({seconds / 60:.1f} min this time; every step's time below)", ""]
        steps = [[name, f"{s[name]['seconds'] / 60:.1f}"] for name in s if "seconds" in s[name]]
        lines += [*text_table(["step", "minutes"], steps), ""]
        keys = (
            ("realism_auc", "realism, defacements (0.5 ideal, 1.0 told apart)"),
            ("realism_auc_restored", "realism, restorations of real defects"),
            ("realism_floor", "realism floor: two halves of the real defects"),
            ("category_accuracy", "category control (inspector of step 3)"),
            ("restored_called_normal", "restorations called defect-free"),
            ("background_change", "background change outside the mask (mean L1)"),
        )
        splits = list(figures)
        table = [
            [label, *(_fmt(figures[sp].get(key)) for sp in splits)]
            for key, label in keys
            if any(key in figures[sp] for sp in splits)
        ]
        lines += [f"Defect-GAN {gan['run_dir']} (version {gan['version']}, "
                  f"{gan['iterations']} iterations); champion: version {s['champion']['version']}",
                  "", *text_table(["figure", *splits], table), ""]  # fmt: skip
        acc = s["score"]["accuracy"]
        rows = [[name, _fmt(v["test"]), _fmt(v["transfer"])] for name, v in acc.items()]
        lines += [
            "Inspector multi-target accuracy",
            "",
            *text_table(["inspector", "test split", "held-out family"], rows),
            "",
        ]
        return "\n".join(lines)

    def where_to_look(self) -> str:
        s = self.state
        lines = ["Where to look:"]
        if s["gan"].get("grid"):
            lines.append(f"  sample grid:      {s['gan']['grid']}")
        lines.append(f"  Defect-GAN run:   {s['gan']['run_dir']}")
        lines.append(f"  inspectors:       {s['inspector']['run_dir']}  {s['queue']['run_dir']}")
        lines.append(f"  synthesized sets: {s['queue']['synth_train']}")
        lines.append(f"                    {s['queue']['synth_new_surface']}")
        db = f" --db {self.o.jobs_db}" if self.o.jobs_db else ""
        lines.append(f"  the queue's jobs: dgan jobs list --queue {QUEUE}{db}")
        uri = "" if self.o.tracking_uri is None else f" --tracking-uri {self.o.tracking_uri}"
        lines.append(f"  MLflow UI:        dgan ui{uri}")
        lines.append(f"  this summary:     {self.dir / 'summary.md'}")
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
