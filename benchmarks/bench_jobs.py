"""The job queue's figures: submit latency, submit-to-start on an idle worker, `dgan jobs list`
over 10,000 jobs, and the throughput of claiming 1,000 no-op jobs with 2 workers.

Everything runs against real SQLite files in a temporary directory and real `dgan jobs worker`
processes. Nothing here asserts a timing; the goals are printed beside the figures.

    python benchmarks/bench_jobs.py
    python benchmarks/bench_jobs.py --list-jobs 10000 --claims 1000 --end-to-end 1000
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jobs.spec import build_spec, new_job  # noqa: E402
from jobs.store import Settlement, Store  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f} ms"


def summary(values: list[float]) -> str:
    values = sorted(values)
    p90 = values[min(len(values) - 1, int(0.9 * len(values)))]
    return f"median {ms(statistics.median(values))}, p90 {ms(p90)}, max {ms(values[-1])}"


# As on a normal install: Python keeps the compiled bytecode of cli.py, jobs/ and dgan/ (this
# machine sets PYTHONDONTWRITEBYTECODE=1, which recompiles them at every start).
CACHED = {k: v for k, v in ENV.items() if k != "PYTHONDONTWRITEBYTECODE"}


def dgan(*args: str, cwd: Path, env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env or ENV, check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - t0


def submit_latency(work: Path, n: int, repeats: int) -> None:
    db = work / "submit.db"
    Store(db).close()
    for kind, args in (("noop", []), ("train-gan", ["--config", "demo"])):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            spec = build_spec(kind, args)
            with Store(db) as store:
                store.submit([new_job(spec)])
            times.append(time.perf_counter() - t0)
        print(f"  library call (validate + commit), {kind:<9}: {summary(times)} over {n}")
    cli = [dgan("jobs", "submit", "noop", "--db", str(db), cwd=work) for _ in range(repeats)]
    print(
        f"  `dgan jobs submit noop` as a process  : {summary(cli)} over {repeats} (Python start "
        "included)"
    )


def start_latency(work: Path, n: int) -> None:
    db, marks = work / "start.db", work / "marks.txt"
    Store(db).close()
    log = open(work / "worker-start.log", "w")  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "cli", "jobs", "worker", "--db", str(db), "--slots", "1"],
        cwd=work, env=ENV, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        with Store(db) as store:
            while not store.live_workers():
                time.sleep(0.05)
            claimed, running = [], []
            for _ in range(n):
                spec = build_spec("noop", ["--mark", str(marks)])
                t0 = time.time()
                [job] = store.submit([new_job(spec)])
                while store.get(job)["state"] != "succeeded":
                    time.sleep(0.01)
                claimed.append(store.attempts(job)[0]["started"] - t0)
                line = marks.read_text().splitlines()[-1].split()
                assert int(line[0]) == job
                running.append(float(line[4]) - t0)
                time.sleep(0.3)  # idle again: the next submit meets a waiting worker
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    print(f"  submit -> claimed by the worker       : {summary(claimed)} over {n}")
    print(f"  submit -> the job's process runs it   : {summary(running)} over {n} (goal < 1 s)")


def list_time(work: Path, n: int, repeats: int) -> None:
    db = work / "list.db"
    spec = build_spec("noop", [])
    t0 = time.perf_counter()
    with Store(db) as store:
        store.submit([new_job(spec) for _ in range(n)])
    print(f"  queued {n} jobs in one transaction in {time.perf_counter() - t0:.2f} s")
    dgan("jobs", "list", "--db", str(db), cwd=work, env=CACHED)  # writes the bytecode
    for label, env in (("bytecode cached", CACHED), ("recompiled", ENV)):
        times = [dgan("jobs", "list", "--db", str(db), cwd=work, env=env) for _ in range(repeats)]
        floor = [dgan("--help", cwd=work, env=env) for _ in range(repeats)]
        print(
            f"  `dgan jobs list` over {n} jobs, {label}: {summary(times)} over {repeats} "
            "(goal < 300 ms)"
        )
        print(f"    `dgan --help` ({label}), the floor  : {summary(floor)} over {repeats}")
    from jobs.cli import _list_lines

    with Store(db) as store:
        inside = []
        for _ in range(5):
            t0 = time.perf_counter()
            _list_lines(store, [], [], 50)
            inside.append(time.perf_counter() - t0)
    print(f"  the list itself (queries + table)      : {summary(inside)} over 5")
    n_every = min(3, repeats)  # each lists every row
    every = [
        dgan("jobs", "list", "--db", str(db), "--limit", "0", cwd=work) for _ in range(n_every)
    ]
    print(f"  `dgan jobs list --limit 0` (all rows)  : {summary(every)} over {n_every}")
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "cli", "jobs", "list", "--db", str(db)],
        cwd=work, env=ENV, capture_output=True, text=True, check=True,
    )  # fmt: skip
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in out.stderr.splitlines()
        if line.startswith("import time:")
    }
    heavy = sorted(imported & {"torch", "mlflow", "ray", "accelerate"})
    print(f"  torch, mlflow, ray, accelerate imported: {', '.join(heavy) or 'none'}")


def _claim_loop(db: str, worker: str, counts) -> None:
    """One claiming process: claim the next job, record it done, until none is left."""
    done = 0
    with Store(db) as store:
        while True:
            now = time.time()
            with store.transaction():
                ready = store.runnable(["default"], 1, now, limit=1)
                claim = store.claim(ready[0]["id"], worker, ["0"], 30.0, now) if ready else None
            if claim is None:
                break
            store.finish(claim.job, claim.attempt, worker, Settlement("succeeded"), 1.0)
            done += 1
    counts[worker] = done


def claim_throughput(work: Path, n: int) -> None:
    db = work / "claims.db"
    spec = build_spec("noop", [])
    with Store(db) as store:
        store.submit([new_job(spec) for _ in range(n)])
    counts = multiprocessing.Manager().dict()
    procs = [
        multiprocessing.Process(target=_claim_loop, args=(str(db), f"w{i}", counts))
        for i in range(2)
    ]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    dt = time.perf_counter() - t0
    with Store(db) as store:
        rows = store.conn.execute("SELECT job, count(*) FROM attempts GROUP BY job").fetchall()
    twice = sum(1 for _, c in rows if c > 1)
    print(
        f"  store: claim + record {n} jobs, 2 processes: {dt:.2f} s = {n / dt:.0f} jobs/s "
        f"(split {dict(counts)}; jobs claimed twice: {twice})"
    )


def end_to_end(work: Path, n: int) -> None:
    db = work / "e2e.db"
    spec = build_spec("noop", [])
    with Store(db) as store:
        store.submit([new_job(spec) for _ in range(n)])
    cmd = [sys.executable, "-m", "cli", "jobs", "worker", "--db", str(db), "--slots", "2",
           "--exit-when-empty"]  # fmt: skip
    t0 = time.perf_counter()
    workers = [
        subprocess.Popen(cmd, cwd=work, env=ENV, stdout=subprocess.DEVNULL) for _ in range(2)
    ]
    for w in workers:
        w.wait()
    dt = time.perf_counter() - t0
    with Store(db) as store:
        ok = store.list_jobs(["succeeded"])[1]
        starts = store.conn.execute("SELECT count(*) FROM attempts").fetchone()[0]
    print(
        f"  workers: {n} no-op jobs, each its own process, 2 workers x 2 slots: {dt:.1f} s = "
        f"{n / dt:.1f} jobs/s ({ok} succeeded, {starts} attempts)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submits", type=int, default=50)
    parser.add_argument("--starts", type=int, default=10)
    parser.add_argument("--list-jobs", type=int, default=10_000)
    parser.add_argument("--claims", type=int, default=1_000)
    parser.add_argument("--end-to-end", type=int, default=1_000)
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs of each timed command (a process each)"
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    print(f"machine: {load()}")
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        work = Path(tmp)
        print("submit latency")
        submit_latency(work, args.submits, args.repeats)
        print("submit to start on an idle worker (--slots 1)")
        start_latency(work, args.starts)
        print(f"dgan jobs list with {args.list_jobs} jobs in the queue")
        list_time(work, args.list_jobs, args.repeats)
        print(f"claiming {args.claims} no-op jobs with 2 workers")
        claim_throughput(work, args.claims)
        if args.end_to_end:
            end_to_end(work, args.end_to_end)
    print(f"machine after: {load()}")


if __name__ == "__main__":
    main()
