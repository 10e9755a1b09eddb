"""Ray Tune's overhead in `dgan tune`: the study's wall time against its trials' own time.

A study of T trials run C at a time would take (sum of the trials' times) / C if Ray and the
study cost nothing. This benchmark runs a real study (FIFO, so every trial does the same work)
and prints:

- the study's wall time: the whole `run_study` call (data check, MLflow parent run, Ray start
  and stop, the trials, the table and best.yaml), and the tuning loop alone (Ray's start to the
  last result);
- the sum of the trials' times as Ray measured them (`time_total_s`: from the trial function's
  start to its last report, trainer setup included) divided by C;
- their ratio (the goal is at most 1.15x), and what each trial cost on top.

    python benchmarks/bench_tune.py --trials 4 --concurrency 2 --iterations 100 --report-every 25
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from dgan.config import load_config
from dgan.events import Events


def busy_note() -> str:
    load1 = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    return f"load average {load1:.2f} on {cores} cores" + (
        " (BUSY: other processes compete; figures are pessimistic)" if load1 > 0.5 * cores else ""
    )


def trial_seconds(experiment: Path) -> dict[str, float]:
    """Each trial's time_total_s at its last result (Ray's result.json, one JSON per line)."""
    seconds = {}
    for trial in sorted(p for p in experiment.iterdir() if (p / "result.json").is_file()):
        lines = (trial / "result.json").read_text().splitlines()
        seconds[trial.name] = json.loads(lines[-1])["time_total_s"] if lines else 0.0
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2, help="trials at once")
    parser.add_argument("--iterations", type=int, default=100, help="per trial")
    parser.add_argument("--report-every", type=int, default=25, help="evaluations = reports")
    parser.add_argument("--config", default="demo", help="tune preset")
    parser.add_argument("--set", action="append", default=[], help="extra tune overrides")
    parser.add_argument("--data", type=Path, help="dataset root (default: the demo set)")
    parser.add_argument("--work", type=Path, help="where the study goes (default: a temp dir)")
    args = parser.parse_args()

    from dgan.data import ensure_demo_dataset
    from dgan.tune.study import run_study

    data = (args.data or ensure_demo_dataset()).resolve()
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench-tune-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # the MLflow store and its artifacts stay in the work directory
    overrides = [
        f"trials={args.trials}", "scheduler=fifo", f"max_concurrent={args.concurrency}",
        f"gan.train.iterations={args.iterations}", f"gan.log.eval_every={args.report_every}",
        f"gan.data.root={data}", f"root={work / 'runs' / 'tune'}", *args.set,
    ]  # fmt: skip
    config = load_config("tune", [args.config], overrides)
    print(f"before: {busy_note()}", flush=True)
    t0 = time.perf_counter()
    result = run_study(config, name=f"bench-{int(time.time())}", events=Events())
    wall = time.perf_counter() - t0
    print(f"after:  {busy_note()}")
    trials = trial_seconds(result.directory / "ray")
    ideal = sum(trials.values()) / args.concurrency
    n = len(trials)
    print(
        f"{n} trials of {args.iterations} iterations (a report every {args.report_every}), "
        f"{args.concurrency} at a time, FIFO, in {work}"
    )
    each = ", ".join(f"{s:.1f}" for s in trials.values())
    print(f"  trials' own time (Ray's time_total_s): {each} s")
    print(f"  sum / {args.concurrency}: {ideal:.1f} s")
    print(f"  study wall time (run_study): {wall:.1f} s -> {wall / ideal:.2f}x (goal <= 1.15x)")
    loop = result.seconds
    print(f"  Ray's start to the last result: {loop:.1f} s -> {loop / ideal:.2f}x")
    print(f"  on top, per trial: {(wall * args.concurrency - sum(trials.values())) / n:.1f} s")


if __name__ == "__main__":
    main()
