"""The job queue: real workers, real job processes, real signals, a real SQLite file. No mocks.

Jobs are tiny (16 px GAN, conv_dim 8) and leases short (1-2 s), so the file runs in a couple of
minutes on 2 CPU cores. Every test waits by polling with a deadline, and stops every process it
started (workers and, through the queue's records, their jobs) by PID.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import TINY_GAN, TINY_INSPECTOR

from jobs import scheduler
from jobs.backend import kill_orphan
from jobs.spec import build_spec, new_job, parse_spec
from jobs.store import Store

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 40  # the GAN job that is killed, preempted or cancelled part-way
ENV = {
    **os.environ,
    "PYTHONPATH": str(REPO),
    "OMP_NUM_THREADS": "1",  # tiny nets; another process may hold the other core
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
ENV.pop("MLFLOW_TRACKING_URI", None)
ENV.pop("DGAN_JOBS_DB", None)


# ---------------------------------------------------------------------------------------------
# Helpers: the CLI, workers, polling
# ---------------------------------------------------------------------------------------------


def dgan(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`dgan ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=cwd, env=ENV, capture_output=True, text=True
    )


def wait_for(what: str, check: Callable[[], object], timeout: float = 120.0) -> object:
    """Poll `check` until it returns something true; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Workers:
    """Starts `dgan jobs worker` processes and, at the end, stops them and every job process
    the queue recorded for them, by PID."""

    def __init__(self, db: Path, cwd: Path) -> None:
        self.db, self.cwd = db, cwd
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, lease: float = 2.0) -> subprocess.Popen:
        log = open(self.cwd / f"worker-{len(self.procs)}.log", "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "cli", "jobs", "worker", "--db", str(self.db)]
        cmd += ["--lease", str(lease), "--retry-backoff", "0.5", *args]
        proc = subprocess.Popen(cmd, cwd=self.cwd, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def output(self, proc: subprocess.Popen) -> str:
        return (self.cwd / f"worker-{self.procs.index(proc)}.log").read_text()

    def wait(self, proc: subprocess.Popen, timeout: float = 120.0) -> int:
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker did not exit:\n{self.output(proc)}") from None

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
        if self.db.exists():
            with sqlite3.connect(self.db) as conn:
                pids = [r[0] for r in conn.execute("SELECT pid FROM attempts WHERE pid > 0")]
            for pid in pids:  # each job process leads its own group
                kill_orphan(pid)


@pytest.fixture
def queue(workdir: Path) -> Iterator[Workers]:
    workers = Workers(workdir / "runs" / "jobs.db", workdir)
    yield workers
    workers.stop_all()


def submit(db: Path, kind: str, *args: str, queue_name: str = "default", **options) -> int:
    """Queue a job through the library calls `dgan jobs submit` makes (faster than a process)."""
    gpus, name = options.pop("gpus", 1), options.pop("name", None)
    spec = build_spec(kind, list(args), gpus, name)
    with Store(db) as store:
        return store.submit([new_job(spec, queue_name, **options)])[0]


def job(db: Path, job_id: int) -> sqlite3.Row:
    with Store(db, create=False) as store:
        return store.get(job_id)


def attempts(db: Path, job_id: int) -> list[sqlite3.Row]:
    with Store(db, create=False) as store:
        return store.attempts(job_id)


def progress(db: Path, job_id: int) -> dict:
    """The job's progress as its process last wrote it (the worker copies it into the queue)."""
    with Store(db, create=False) as store:
        path = store.job_dir(job_id) / "progress.json"
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return {}


def checkpoint_step(db: Path, job_id: int) -> int:
    """The iteration of the job's latest checkpoint, as its process reported it (0: none)."""
    path = progress(db, job_id).get("checkpoint")
    return int(Path(path).name.removeprefix("iter-")) if path else 0


def live_workers(db: Path) -> list:
    with Store(db) as store:
        return store.live_workers()


def tiny_gan_args(data: Path, iterations: int = ITERATIONS) -> list[str]:
    args = ["--data", str(data)]
    for setting in [*TINY_GAN, f"train.iterations={iterations}"]:
        args += ["--set", setting]
    return args


def final_parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    from dgan.run import checkpoint as ckpt

    last = ckpt.list_checkpoints(run_dir)[-1]
    saved = torch.load(last / "state.pt", weights_only=True)
    return {f"{net}.{k}": v for net in ("G", "D", "G_ema") for k, v in saved[net].items()}


def assert_same_parameters(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module", autouse=True)
def tracking(tmp_path_factory) -> Iterator[str]:
    """One MLflow store for the module's jobs: creating its tables costs seconds, so once."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    ENV["MLFLOW_TRACKING_URI"] = uri
    yield uri
    del ENV["MLFLOW_TRACKING_URI"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from fakes import make_folder_dataset

    return make_folder_dataset(
        tmp_path_factory.mktemp("data") / "set", n_normal=12, n_defect=12, size=32
    )


@pytest.fixture(scope="module")
def uninterrupted(dataset: Path, tracking: str, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The final parameters of the tiny GAN trained straight through, in this process, on the
    config a queued job of the same options gets."""
    from dgan.events import CollectEvents
    from dgan.train.gan import run_gan

    where = tmp_path_factory.mktemp("straight")
    queued = build_spec("train-gan", tiny_gan_args(dataset)).config
    log = {"run_root": where, "tracking_uri": tracking}
    config = queued.model_copy(update={"log": queued.log.model_copy(update=log)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the queued jobs run (OMP_NUM_THREADS=1)
    try:
        result = run_gan(config, events=CollectEvents())
    finally:
        torch.set_num_threads(threads)
    assert result.state == "finished" and result.step == ITERATIONS
    return final_parameters(result.run_dir)


def run_dir_of(db: Path, job_id: int) -> Path:
    with Store(db, create=False) as store:
        runs = sorted((store.job_dir(job_id) / "gan").glob("[0-9]*-*"))
    return [r for r in runs if (r / "checkpoints").is_dir()][-1]


# ---------------------------------------------------------------------------------------------
# Submitting: validation, bad input, nothing heavy imported
# ---------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


PIPELINE_CYCLE = """
steps:
  - {name: a, kind: noop, after: [b]}
  - {name: b, kind: noop, after: [a]}
"""
PIPELINE_MISSING_OUTPUT = """
steps:
  - {name: gan, kind: train-gan}
  - {name: synth, kind: synth, args: [--generator, "${gan.out}"]}
"""
PIPELINE_LATER_STEP = """
steps:
  - {name: synth, kind: synth, args: [--generator, "${gan.model}"]}
  - {name: gan, kind: train-gan}
"""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["submit", "frobnicate"], "unknown kind 'frobnicate'; choose one of train-gan"),
        (["submit", "train-gan", "--iterations", "5"], "dgan train gan: No such option"),
        (["submit", "train-gan", "--set", "train.bogus=1"], "train.bogus: unknown key"),
        (["submit", "synth", "--region", "circle"], "--region 'circle'"),
        (["submit", "eval-fid", "only-one-path"], "expected MODEL DATA"),
        (["submit", "train-gan", "--resume", "latest"], "resumes by itself"),
        (["submit", "noop", "--after", "41"], "--after 41: there is no job 41"),
        (["submit", "synth", "--generator", "${41.model}"], "there is no job 41"),
        (["submit", "tune", "--set", "trials=0"], "trials"),
        (["submit", "eval-synth", "m", "d", "--realism-repeats", "0"],
         "--realism-repeats must be between 1 and 20, got 0"),
        (["submit", "eval-synth", "m", "d", "--control-repeats", "21"],
         "--control-repeats must be between 1 and 20, got 21"),
        (["submit", "eval-synth", "m", "d", "--control-repeats", "2"],
         "--control-repeats 2 repeats the defacements that the inspector judges"),
        (["submit", "eval-synth", "m", "d", "--realism-n", "3"],
         "--realism-n must be at least 4, got 3"),
        (["submit", "eval-synth", "m", "d", "--realism-by-set", "--no-realism"],
         "--realism-by-set adds to the realism test, which --no-realism skips"),
        (["submit", "eval-synth", "m", "d", "--realism-steps", "0"],
         "--realism-steps must be at least 1, got 0"),
        (["pipeline", "{cycle}"], "wait on each other in a circle: a -> b -> a"),
        (["pipeline", "{missing}"], "'gan' (train-gan) makes model, run_dir"),
        (["pipeline", "{later}"], "'gan' is not an earlier step"),
    ],
    ids=[
        "unknown-kind", "unknown-option", "unknown-key", "bad-value", "bad-arguments",
        "resume", "missing-dependency", "missing-reference", "tune-config", "realism-repeats",
        "control-repeats", "control-repeats-without-inspector", "realism-n",
        "realism-by-set-without-realism", "realism-steps", "cycle",
        "output-not-made", "output-of-a-later-step",
    ],
)  # fmt: skip
def test_bad_input_is_refused_at_submit_with_a_message_and_nothing_is_queued(
    args, message, workdir
):
    submit(workdir / "runs" / "jobs.db", "noop")  # the queue exists and holds one job
    files = {
        "{cycle}": _write(workdir / "cycle.yaml", PIPELINE_CYCLE),
        "{missing}": _write(workdir / "missing.yaml", PIPELINE_MISSING_OUTPUT),
        "{later}": _write(workdir / "later.yaml", PIPELINE_LATER_STEP),
    }
    result = dgan("jobs", *[files.get(a, a) for a in args], cwd=workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr
    assert message in result.stderr, result.stderr
    with Store(workdir / "runs" / "jobs.db", create=False) as store:
        assert store.list_jobs()[1] == 1  # only the job queued before


def test_a_database_that_is_not_a_queue_is_refused_and_left_untouched(workdir):
    text = workdir / "notes.db"
    text.write_text("my notes, not a queue\n")
    other = workdir / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE mine (x)")
    before = other.read_bytes()
    for path, why in ((text, "it is not a SQLite database"), (other, "tables mine")):
        result = dgan("jobs", "submit", "noop", "--db", str(path), cwd=workdir)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"{path} is not a dgan job queue: " in result.stderr and why in result.stderr
        listed = dgan("jobs", "list", "--db", str(path), cwd=workdir)
        assert listed.returncode == 2 and "is not a dgan job queue" in listed.stderr
    assert text.read_text() == "my notes, not a queue\n"
    assert other.read_bytes() == before


def test_every_kind_takes_its_commands_options_and_its_spec_round_trips(workdir):
    """Each kind is parsed by its command's own parser: an option that command gains or loses
    shows up here, not in a worker."""
    examples = {
        "train-gan": ["--config", "demo", "--set", "train.iterations=7", "--data", "d"],
        "train-inspector": ["--arch", "small", "--synthetic", "s1", "--no-grl"],
        "synth": ["--n", "8", "--classes", "crack,spallation", "--region", "random-box"],
        "eval-inspector": ["m", "d", "--split", "val"],
        "eval-fid": ["m", "d", "--n", "4"],
        "eval-synth": ["m", "d", "--inspector", "i", "--realism-repeats", "3",
                       "--control-repeats", "2", "--realism-n", "40", "--realism-by-set",
                       "--realism-steps", "90"],
        "tune": ["--set", "trials=4"],
        "noop": ["--seconds", "0.5"],
    }  # fmt: skip
    for kind, args in examples.items():
        spec = build_spec(kind, args, name="x")
        assert parse_spec(spec.model_dump_json()) == spec, kind
        assert spec.kind == kind and spec.argv == args and spec.workdir == str(workdir)
    gan = build_spec("train-gan", examples["train-gan"])
    assert (gan.config.train.iterations, str(gan.config.data.root)) == (7, "d")
    assert gan.config.data.image_size == 32  # the demo preset, as `dgan train gan` loads it
    synth = build_spec("synth", examples["synth"])
    assert synth.config.classes == ["crack", "spallation"]
    assert synth.config.region == "random-box"
    evaluation = build_spec("eval-synth", examples["eval-synth"])
    assert (evaluation.realism_repeats, evaluation.control_repeats) == (3, 2)
    assert (evaluation.realism_n, evaluation.realism_by_set) == (40, True)
    assert evaluation.realism_steps == 90


def test_the_example_pipeline_is_a_valid_dag_of_the_papers_table3(workdir):
    from jobs.spec import read_pipeline

    jobs = read_pipeline(REPO / "jobs" / "pipelines" / "table3.yaml")
    steps = [j.step for j in jobs]
    assert steps == ["gan", "synth", "inspector-real", "inspector-synth", "test-real", "test-synth"]
    waits = {j.step: [steps[k] for k in j.after_new] for j in jobs}
    assert waits["synth"] == ["gan"] and waits["inspector-synth"] == ["synth"]
    assert waits["test-real"] == ["inspector-real"] and waits["inspector-real"] == []
    assert '"generator":"${@0.model}"' in jobs[1].spec


def test_the_jobs_commands_import_neither_torch_nor_mlflow(workdir):
    code = (
        "import sys, cli\n"
        "for args in (['jobs', 'submit', 'noop'], ['jobs', 'submit', 'train-gan', '--config',\n"
        "             'demo'], ['jobs', 'list'], ['jobs', 'show', '1'], ['jobs', 'worker',\n"
        "             '--help'], ['--help']):\n"
        "    try:\n        cli.app(args)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'mlflow', 'ray', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=workdir, env=ENV, capture_output=True, text=True
    )
    assert out.stdout.strip().endswith("[]"), out.stdout + out.stderr
    assert "ID  STATE" in out.stdout and "job 1: noop" in out.stdout


def test_more_gpus_than_any_worker_offers_is_queued_with_a_warning_and_does_not_block(
    queue, workdir
):
    worker = queue.start("--slots", "2")
    db = queue.db
    wait_for("the worker's record", lambda: live_workers(db))
    big = dgan("jobs", "submit", "noop", "--gpus", "3", cwd=workdir)
    assert big.returncode == 0 and big.stdout.strip() == "1"
    assert "warning: job 1 asks for 3 GPUs, more than any worker" in big.stderr
    assert "has 2" in big.stderr
    small = int(dgan("jobs", "submit", "noop", cwd=workdir).stdout)
    wait_for("the small job to run", lambda: job(db, small)["state"] == "succeeded", 60)
    assert job(db, 1)["state"] == "queued" and not attempts(db, 1)
    shown = dgan("jobs", "show", "1", cwd=workdir).stdout
    assert "needs 3 GPUs; the largest worker of queue 'default' offers 2" in shown
    worker.send_signal(signal.SIGTERM)
    assert queue.wait(worker) == 0


# ---------------------------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------------------------


def test_the_scheduler_starts_by_priority_then_age_and_the_head_job_holds_back_the_rest():
    waiting = [scheduler.Waiting(4, 5, 1), scheduler.Waiting(2, 0, 3), scheduler.Waiting(3, 0, 1)]
    # Job 2 (3 GPUs) does not fit in the 2 left after job 4: job 3 waits behind it.
    assert scheduler.plan(waiting, 3, [], preempt=False).start == [4]
    assert scheduler.plan(waiting, 5, []).start == [4, 2, 3]


def test_the_scheduler_preempts_the_lowest_priority_newest_jobs_and_only_enough_of_them():
    active = [
        scheduler.Active(10, 0, 1, started=100.0, stopping=False),
        scheduler.Active(11, 0, 1, started=200.0, stopping=False),
        scheduler.Active(12, 3, 1, started=300.0, stopping=False),
        scheduler.Active(13, 9, 1, started=400.0, stopping=False),
    ]
    high = [scheduler.Waiting(20, 5, 2)]
    decided = scheduler.plan(high, 0, active)
    assert (decided.start, decided.preempt, decided.preempt_for) == ([], [11, 10], 20)
    assert scheduler.plan(high, 1, active).preempt == [11]  # one free GPU already
    assert scheduler.plan(high, 0, active, preempt=False).preempt == []
    assert scheduler.plan([scheduler.Waiting(21, 5, 5)], 0, active).preempt == []  # not enough
    stopping = [scheduler.Active(11, 0, 2, 200.0, stopping=True), *active[2:]]
    assert scheduler.plan(high, 0, stopping).preempt == []  # GPUs already on their way


# ---------------------------------------------------------------------------------------------
# Reliability: exactly once, crashes, cancel, preemption, pipelines, retries
# ---------------------------------------------------------------------------------------------


def test_two_workers_run_fifty_jobs_each_exactly_once(queue, workdir):
    marks = workdir / "marks.txt"
    ids = [submit(queue.db, "noop", "--seconds", "0.1", "--mark", str(marks)) for _ in range(50)]
    workers = [queue.start("--slots", "2", "--exit-when-empty") for _ in range(2)]
    for worker in workers:
        assert queue.wait(worker, timeout=240) == 0, queue.output(worker)
    runs = Counter(int(line.split()[0]) for line in marks.read_text().splitlines())
    assert runs == Counter({i: 1 for i in ids})  # each job's own process ran once
    ran_on = set()
    for i in ids:
        assert job(queue.db, i)["state"] == "succeeded"
        [only] = attempts(queue.db, i)
        assert (only["outcome"], only["exit_code"]) == ("succeeded", 0)
        ran_on.add(only["worker"])
    assert len(ran_on) == 2  # both workers claimed jobs from the one database


def test_a_worker_killed_mid_training_is_taken_over_after_its_lease_and_resumes_to_the_same_parameters(  # noqa: E501
    queue, workdir, dataset, uninterrupted
):
    db = queue.db
    first = queue.start("--slots", "1")
    job_id = int(dgan("jobs", "submit", "train-gan", *tiny_gan_args(dataset), cwd=workdir).stdout)
    wait_for("a checkpoint at iteration 10 or later", lambda: checkpoint_step(db, job_id) >= 10)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    [attempt] = attempts(db, job_id)
    wait_for("the orphaned job process to die with its worker", lambda: not alive(attempt["pid"]))
    # Read once the job process is gone too: it may train (and checkpoint) a little longer
    # than its worker lived.
    killed_at = progress(db, job_id)["step"]
    assert killed_at < ITERATIONS, "the job finished before its worker was killed"
    assert job(db, job_id)["state"] == "running"  # until the lease expires

    second = queue.start("--slots", "1", "--exit-when-empty")
    assert queue.wait(second, timeout=180) == 0, queue.output(second)
    record = job(db, job_id)
    assert record["state"] == "succeeded"
    one, two = attempts(db, job_id)
    assert one["outcome"] == "lost" and "stopped renewing its lease" in one["error"]
    assert (two["outcome"], two["exit_code"]) == ("succeeded", 0)
    assert two["started"] >= one["ended"]
    log = Path(two["log"]).read_text()
    resumed = int(log.split("resuming from ")[1].split("iter-")[1][:8])
    assert 10 <= resumed <= killed_at and resumed % 5 == 0  # the last periodic checkpoint
    run_dir = run_dir_of(db, job_id)
    assert json.loads(record["result"])["step"] == ITERATIONS
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    assert_same_parameters(final_parameters(run_dir), uninterrupted)


def test_cancel_checkpoints_a_running_training_job_and_leaves_it_cancelled_and_resumable(
    queue, workdir, dataset, tracking
):
    from dgan.events import CollectEvents
    from dgan.run import checkpoint as ckpt
    from dgan.train.gan import run_gan

    db = queue.db
    queue.start("--slots", "1")
    job_id = submit(db, "train-gan", *tiny_gan_args(dataset, iterations=100_000))
    wait_for("a first checkpoint", lambda: checkpoint_step(db, job_id))
    result = dgan("jobs", "cancel", str(job_id), cwd=workdir)
    assert result.returncode == 0 and "cancel requested" in result.stdout
    wait_for("the job to be cancelled", lambda: job(db, job_id)["state"] == "cancelled", 60)
    [attempt] = attempts(db, job_id)
    assert (attempt["outcome"], attempt["exit_code"]) == ("cancelled", 130)
    run_dir = run_dir_of(db, job_id)
    status = json.loads((run_dir / "status.json").read_text())
    last = ckpt.list_checkpoints(run_dir)[-1]
    # SIGTERM made the job checkpoint where it stood, not at a periodic checkpoint.
    assert (
        status["state"] == "interrupted" and ckpt.checkpoint_iteration(last) == status["iteration"]
    )

    # The checkpoint is resumable: the job's own config continues from it.
    queued = parse_spec(job(db, job_id)["spec"]).config
    log = {"run_root": run_dir.parent.parent, "tracking_uri": tracking}  # where the job ran
    config = queued.model_copy(update={"log": queued.log.model_copy(update=log)})
    stop_at = status["iteration"] + 2
    with_one_thread = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = run_gan(config, resume=str(run_dir), stop_at=stop_at, events=CollectEvents())
    finally:
        torch.set_num_threads(with_one_thread)
    assert (resumed.state, resumed.step, resumed.run_dir) == ("paused", stop_at, run_dir)


def test_a_high_priority_job_preempts_a_low_one_which_resumes_to_the_same_parameters(
    queue, workdir, dataset, uninterrupted
):
    db = queue.db
    low = int(dgan("jobs", "submit", "train-gan", *tiny_gan_args(dataset), cwd=workdir).stdout)
    worker = queue.start("--slots", "1", "--exit-when-empty")
    wait_for("the low job's first checkpoint", lambda: checkpoint_step(db, low))
    marks = workdir / "marks.txt"
    high = dgan("jobs", "submit", "noop", "--mark", str(marks), "--priority", "10", cwd=workdir)
    high = int(high.stdout)
    assert queue.wait(worker, timeout=180) == 0, queue.output(worker)

    assert job(db, low)["state"] == "succeeded" and job(db, high)["state"] == "succeeded"
    first, second = attempts(db, low)
    [ran] = attempts(db, high)
    assert (first["outcome"], first["exit_code"]) == ("preempted", 130)
    assert first["ended"] <= ran["started"] and ran["ended"] <= second["started"]
    assert second["outcome"] == "succeeded"
    # The low job checkpointed where SIGTERM found it and went on from exactly there.
    stopped_at = json.loads(Path(first["log"]).with_suffix(".outcome.json").read_text())
    stopped_at = int(Path(stopped_at["checkpoint"]).name.removeprefix("iter-"))
    assert 5 <= stopped_at < ITERATIONS
    assert f"iter-{stopped_at:08d}" in Path(second["log"]).read_text().split("resuming from ")[1]
    assert_same_parameters(final_parameters(run_dir_of(db, low)), uninterrupted)
    assert "preempted for job" in queue.output(worker)


def test_a_pipeline_stops_at_a_failed_step_and_a_retry_of_that_step_completes_it(
    queue, workdir, dataset
):
    db = queue.db
    normals = workdir / "normals"  # missing until the test "fixes" it
    # 32 px: the inspector refuses training images under 32 px, synthesized ones included.
    gan_args = [*tiny_gan_args(dataset, iterations=2), "--set", "data.image_size=32"]
    inspector = ["--data", str(dataset), "--synthetic", "${synth.out}"]
    for setting in [*TINY_INSPECTOR, "train.epochs=1", "log.log_model=false"]:
        inspector += ["--set", setting]
    steps = [
        {"name": "gan", "kind": "train-gan", "args": gan_args},
        {"name": "synth", "kind": "synth", "args": [
            "--generator", "${gan.model}", "--normals", str(normals), "--n", "8",
            "--out", "synth-set", "--batch-size", "8", "--set", "num_workers=0"]},
        {"name": "inspector", "kind": "train-inspector", "args": inspector},
    ]  # fmt: skip
    (workdir / "p.yaml").write_text(json.dumps({"name": "fix-and-retry", "steps": steps}))
    queued = dgan("jobs", "pipeline", "p.yaml", cwd=workdir)
    assert queued.returncode == 0, queued.stderr
    gan, synth, insp = (int(line.split()[0]) for line in queued.stdout.splitlines()[1:])
    assert queued.stdout.splitlines()[3].split()[-2:] == ["after", str(synth)]

    worker = queue.start("--slots", "1", "--exit-when-empty")
    assert queue.wait(worker, timeout=180) == 0, queue.output(worker)
    assert job(db, gan)["state"] == "succeeded"
    assert job(db, synth)["state"] == "failed"
    assert "no source of normal images" in job(db, synth)["error"]
    assert job(db, insp)["state"] == "upstream_failed" and not attempts(db, insp)
    assert f"job {synth} (synth) failed" in job(db, insp)["error"]

    shutil.copytree(dataset, normals)
    retried = dgan("jobs", "retry", str(synth), cwd=workdir)
    assert retried.returncode == 0 and f"the jobs after it: {insp}" in retried.stdout
    worker = queue.start("--slots", "1", "--exit-when-empty")
    assert queue.wait(worker, timeout=180) == 0, queue.output(worker)
    assert [job(db, i)["state"] for i in (gan, synth, insp)] == ["succeeded"] * 3
    assert len(attempts(db, gan)) == 1 and len(attempts(db, synth)) == 2
    out = json.loads(job(db, synth)["outputs"])["out"]
    assert out == str((workdir / "synth-set").resolve()) and (Path(out) / "labels.csv").is_file()
    # The inspector's step was given the synthesized set that the synth step made.
    [ran] = attempts(db, insp)
    resolved = json.loads(Path(ran["log"]).with_suffix(".spec.json").read_text())["spec"]
    assert resolved["config"]["data"]["synthetic"] == [out]
    model = json.loads(job(db, gan)["outputs"])["model"]
    synth_spec = Path(attempts(db, synth)[1]["log"]).with_suffix(".spec.json")
    assert json.loads(synth_spec.read_text())["spec"]["config"]["generator"] == model


def test_a_failed_job_is_retried_with_exponential_backoff_up_to_max_retries(queue, workdir):
    db = queue.db
    recovers = submit(db, "noop", "--fail-attempts", "2", max_retries=2)
    gives_up = submit(db, "noop", "--fail-attempts", "9", max_retries=1)
    worker = queue.start("--slots", "2", "--exit-when-empty")
    assert queue.wait(worker, timeout=60) == 0, queue.output(worker)
    tries = attempts(db, recovers)
    assert [a["outcome"] for a in tries] == ["failed", "failed", "succeeded"]
    assert tries[1]["started"] - tries[0]["ended"] >= 0.5  # --retry-backoff 0.5
    assert tries[2]["started"] - tries[1]["ended"] >= 1.0  # doubled
    assert job(db, recovers)["state"] == "succeeded"
    assert [a["outcome"] for a in attempts(db, gives_up)] == ["failed", "failed"]
    record = job(db, gives_up)
    assert record["state"] == "failed" and "attempt 2 fails, as asked" in record["error"]


def test_each_job_gets_its_own_gpus_through_cuda_visible_devices(queue, workdir):
    db, marks = queue.db, workdir / "marks.txt"
    one = [submit(db, "noop", "--seconds", "1", "--mark", str(marks)) for _ in range(2)]
    both = submit(db, "noop", "--mark", str(marks), gpus=2)
    worker = queue.start("--gpus", "3,5", "--exit-when-empty")
    assert queue.wait(worker, timeout=60) == 0, queue.output(worker)
    seen = {int(line.split()[0]): line.split()[3] for line in marks.read_text().splitlines()}
    assert sorted(seen[i] for i in one) == ["3", "5"] and seen[both] == "3,5"
    first, second = (attempts(db, i)[0] for i in one)
    assert max(first["started"], second["started"]) < min(first["ended"], second["ended"])


def test_a_stopped_worker_returns_its_jobs_to_the_queue(queue, workdir):
    db = queue.db
    job_id = submit(db, "noop", "--seconds", "60")
    worker = queue.start("--slots", "1")
    wait_for("the job to start", lambda: attempts(db, job_id) and attempts(db, job_id)[0]["pid"])
    pid = attempts(db, job_id)[0]["pid"]
    worker.send_signal(signal.SIGTERM)
    assert queue.wait(worker, timeout=30) == 0
    assert job(db, job_id)["state"] == "queued" and not alive(pid)
    assert attempts(db, job_id)[0]["outcome"] == "stopped"


def test_a_worker_that_stalls_past_its_lease_loses_the_job_and_stops_its_process(queue, workdir):
    db = queue.db
    job_id = submit(db, "noop", "--seconds", "5")
    stalled = queue.start("--slots", "1", lease=1.0)
    wait_for("the job to start", lambda: attempts(db, job_id) and attempts(db, job_id)[0]["pid"])
    stalled.send_signal(signal.SIGSTOP)
    try:
        other = queue.start("--slots", "1", "--exit-when-empty", lease=1.0)
        assert queue.wait(other, timeout=60) == 0, queue.output(other)
    finally:
        stalled.send_signal(signal.SIGCONT)
    first, second = attempts(db, job_id)
    assert (first["outcome"], second["outcome"]) == ("lost", "succeeded")
    assert "killed the process its dead worker left behind" in queue.output(other)
    assert not alive(first["pid"])
    noticed = ("ended; another worker has it", "this worker lost its lease")
    wait_for(
        "the stalled worker to notice", lambda: any(n in queue.output(stalled) for n in noticed)
    )
    assert job(db, job_id)["state"] == "succeeded"


def runs_so_far(marks: Path) -> int:
    return len(marks.read_text().splitlines()) if marks.exists() else 0


def test_the_database_survives_workers_killed_while_they_hold_its_write_lock(queue, workdir):
    db, marks = queue.db, workdir / "marks.txt"
    ids = [submit(db, "noop", "--mark", str(marks)) for _ in range(40)]
    watcher = sqlite3.connect(db, timeout=0, isolation_level=None)
    killed_in_a_write = 0
    for _ in range(4):
        worker = queue.start("--slots", "2", lease=1.0)
        done = runs_so_far(marks)
        wait_for("a few more jobs", lambda d=done: runs_so_far(marks) >= d + 3)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                watcher.execute("BEGIN IMMEDIATE")
                watcher.execute("ROLLBACK")
            except sqlite3.OperationalError:  # locked: the worker is inside a write
                worker.send_signal(signal.SIGKILL)
                killed_in_a_write += 1
                break
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    watcher.close()
    assert killed_in_a_write >= 1

    with Store(db, create=False) as store:
        assert store.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert store.list_jobs()[1] == len(ids)
    last = queue.start("--slots", "2", "--exit-when-empty", lease=1.0)
    assert queue.wait(last, timeout=180) == 0, queue.output(last)
    runs = Counter(int(line.split()[0]) for line in marks.read_text().splitlines())
    for i in ids:
        tries = attempts(db, i)
        assert job(db, i)["state"] == "succeeded" and tries[-1]["outcome"] == "succeeded"
        assert all(a["ended"] for a in tries)
        # A job ran again only when its worker was killed under it: nothing ran twice otherwise.
        assert runs[i] == 1 or any(a["outcome"] == "lost" for a in tries[:-1]), i
