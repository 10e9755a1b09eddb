"""`dgan tune`: studies on a real local Ray, PBT exploits, Ctrl-C and --resume, bad input.

One local Ray serves the in-process studies of this module; the Ctrl-C test runs the real
command, which starts and stops its own. Trials are tiny (16 px, width 8, a few iterations).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_GAN, tiny_gan_config
from test_train_gan import wait_for_line

from dgan.config import load_config
from dgan.errors import DganError
from dgan.run import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
DGAN = [sys.executable, "-m", "cli"]
# Tiny trials: 6 iterations, a report every 2; the realism test on 4 images for 2 steps.
TINY_TRIALS = [f"gan.{s}" for s in TINY_GAN] + [
    "gan.train.iterations=6",
    "gan.log.eval_every=2",
    "gan.eval.n=4",
    "gan.eval.realism_n=4",
    "gan.eval.realism_steps=2",
    "cpus_per_trial=1",
]


def ray_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention `marker` (a Ray temp dir)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in line and str(os.getpid()) != entry.name:
            found.append(line[:160])
    return found


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """The module's working directory: one dataset and one MLflow store for every study."""
    from fakes import make_folder_dataset

    root = tmp_path_factory.mktemp("tune")
    data = make_folder_dataset(root / "data", n_normal=12, n_defect=12, size=32)
    previous = Path.cwd()
    os.chdir(root)  # MLflow puts artifacts under ./mlruns
    yield root, data
    os.chdir(previous)


@pytest.fixture(scope="module")
def local_ray(place):
    """One local Ray for the module's in-process studies; stopped, with its processes, after."""
    from dgan.tune.study import short_temp_dir, start_local_ray, stop_local_ray

    root, _ = place
    start_local_ray(root / "ray-session")
    marker = short_temp_dir(root / "ray-session")
    yield
    stop_local_ray(root / "ray-session")
    assert ray_processes(marker) == []


def study_config(place, *extra: str):
    root, data = place
    return load_config(
        "tune",
        [],
        [
            *TINY_TRIALS,
            f"gan.data.root={data}",
            f"gan.log.tracking_uri=sqlite:///{root / 'mlflow.db'}",
            f"root={root / 'runs' / 'tune'}",
            *extra,
        ],
    )


def mlflow_client(place):
    import mlflow

    uri = f"sqlite:///{place[0] / 'mlflow.db'}"
    # An explicit registry URI: another test's process-wide mlflow.set_registry_uri must not
    # redirect this client's registry reads.
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_a_four_trial_asha_study_ranks_its_trials_tracks_them_and_writes_the_best_preset(
    place, local_ray
):
    from dgan.tune.study import run_study

    config = study_config(
        place, "trials=4", "scheduler=asha", "grace_iterations=2", "reduction_factor=2",
        "max_concurrent=2", "register_best=true", "promote_if_better=true",
    )  # fmt: skip
    result = run_study(config, name="asha4")
    study = place[0] / "runs" / "tune" / "asha4"
    assert result.directory == study.resolve() and result.objective == "realism_log_loss"
    assert len(result.rows) == 4
    assert sum(row.base for row in result.rows) == 1  # trial 0 trains the base config's values
    assert all(r.outcome == "finished" or r.outcome.startswith("stopped at") for r in result.rows)
    ranked = [(-r.iteration, -r.value) for r in result.rows]
    assert ranked == sorted(ranked)  # further along first, then realism_log_loss, higher is better
    table = result.format()
    assert "best trials by realism_log_loss (max), asha" in table and "4 trials in" in table
    assert (study / "results.txt").read_text().startswith("study asha4: best trials")
    # Ray kept its experiment in the study directory; each trial trained in its own run dir.
    assert (study / "ray" / "tuner.pkl").is_file()
    assert {p.name.split("-", 1)[1] for p in (study / "gan").iterdir()} == {
        r.trial_id for r in result.rows
    }
    # best.yaml is a GAN preset carrying the best trial's values.
    best = load_config("gan", [str(result.best_config)])
    for key, value in result.rows[0].params.items():
        section, name = key.split(".")
        assert getattr(getattr(best, section), name) == pytest.approx(value)
    # One parent run; one child per trial with params, curves, grids and its final objective.
    client = mlflow_client(place)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["dgan.tune"] == "asha4"
    assert "best.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    for child in children:
        assert child.info.status == "FINISHED"
        assert "loss.lambda_rec" in child.data.params and "tune_objective" in child.data.metrics
        history = client.get_metric_history(child.info.run_id, "realism_log_loss")
        assert [m.step for m in history][:1] == [2]
        assert "samples" in {a.path for a in client.list_artifacts(child.info.run_id)}
    # --register-best --promote-if-better: the best trial's generator is @champion.
    version = client.get_model_version_by_alias("defect-gan", "champion")
    assert version.tags["dgan.tune.trial"] == result.rows[0].trial_id
    assert any("promoted to @champion" in line for line in result.lines)


def test_a_two_member_pbt_population_exploits_and_continues_the_other_trials_checkpoint(
    place, local_ray
):
    from dgan.tune.study import run_study

    # d_total differs between any two weightings, so one member is always the worse one; the
    # synchronous population meets at every interval, so exploits happen at iterations 2 and 4.
    config = study_config(
        place, "trials=2", "scheduler=pbt", "pbt_interval=2", "pbt_synch=true",
        "objective=d_total", "gan.eval.realism=false",
    )  # fmt: skip
    result = run_study(config, name="pbt2")
    study = result.directory
    exploits = []
    for row in result.rows:
        lineage = json.loads((Path(row.run_dir) / "tune.json").read_text())
        exploits += [(row, r) for r in lineage["restores"] if r["from_trial"] != row.trial_id]
    assert exploits, "no PBT exploit happened"
    for _, record in exploits:
        source = next(r for r in result.rows if r.trial_id == record["from_trial"])
        # The exploited trial resumed the other trial's own checkpoint, byte for byte...
        assert record["from_run_dir"] == source.run_dir
        assert Path(record["checkpoint"]).parent.name == source.trial_id
        copied = hashlib.sha256((Path(record["checkpoint"]) / "state.pt").read_bytes())
        assert copied.hexdigest() == record["state_sha256"]
        # ...with perturbed loss weights and learning rates, which only a PBT resume accepts.
        own = load_config("gan", [str(Path(source.run_dir) / "config.yaml")])
        from dgan.config import flatten

        assert any(flatten(own)[k] != v for k, v in record["params"].items())
    # ...and went on from the copied iteration instead of starting again.
    for row in result.rows:
        with open(study / "ray" / row.trial_id / "progress.csv") as f:
            iterations = [int(r["iteration"]) for r in csv.DictReader(f)]
        assert iterations == [2, 4, 6], (row.trial_id, iterations)
        assert ckpt.read_status(Path(row.run_dir))["iteration"] == 6
    assert "PBT exploits" in result.format()
    # best.yaml says when its values are the end of a PBT schedule rather than a config.
    best = result.best_config.read_text()
    assert ("# PBT: the values in force at the end" in best) == bool(result.rows[0].exploits)


def test_an_interrupted_study_resumes_its_unfinished_trial_from_its_checkpoint(place):
    from dgan.tune.study import temp_link

    root, data = place
    sets = [*TINY_TRIALS, "gan.train.iterations=12", "gan.eval.realism=false"]
    args = ["tune", "--name", "sigint", "--trials", "2", "--scheduler", "fifo",
            "--max-concurrent", "1", "--objective", "d_total", "--data", str(data),
            "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}",
            *(f"--set={s}" for s in sets)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [*DGAN, *args], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:  # Ctrl-C once the first trial has reported twice
        wait_for_line(proc.stdout, lambda line: "iteration 4:" in line, timeout=240)
    finally:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    study = root / "runs" / "tune" / "sigint"
    assert "dgan tune --resume sigint" in out and "Traceback" not in err
    assert json.loads((study / "study.json").read_text())["state"] == "interrupted"

    resumed = subprocess.run(
        [*DGAN, "tune", "--resume", "sigint"], cwd=root, env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((study / "study.json").read_text())["state"] == "finished"
    assert "2 trials in" in resumed.stdout and "2 ran all 12 iterations" in resumed.stdout
    # The interrupted trial continued in its own run directory from the last checkpoint that
    # Ray recorded for it (iteration 2 or 4: Ctrl-C came as the driver printed iteration 4).
    runs = sorted((study / "gan").iterdir())
    assert len(runs) == 2
    first = json.loads((runs[0] / "tune.json").read_text())["restores"]
    assert first[0]["from_trial"] == runs[0].name.split("-", 1)[1]
    assert first[0]["iteration"] in (2, 4)
    assert first[0]["from_run_dir"] == str(runs[0])
    assert ckpt.read_status(runs[0])["iteration"] == 12
    # One MLflow child run per trial, the interrupted one included, each finished.
    client = mlflow_client(place)
    parent = json.loads((study / "study.json").read_text())["parent_run_id"]
    children = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert sorted(c.info.status for c in children) == ["FINISHED", "FINISHED"]
    assert ray_processes(str(temp_link(study / "ray-session"))) == []
    assert not temp_link(study / "ray-session").is_symlink()  # the command removed its link


def write_space(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--space", "SPACE:loss.lambda_bogus: {uniform: [1, 2]}"],
         "loss.lambda_bogus is not a key of the GAN config; keys of loss: diversity_cap, "
             "lambda_binary, lambda_cls_f"),
        (["--space", "SPACE:loss.lambda_rec: {loguniform: [5, 5]}"],
         "the range [5, 5] is empty"),
        (["--space", "SPACE:train.lr_g: {uniform: [4.0e-4, 1.0e-4]}"],
         "the range [0.0004, 0.0001] is inverted"),
        (["--trials", "0"], "trials: Input should be greater than or equal to 1 (got 0)"),
        (["--objective", "sharpness"], "unknown objective 'sharpness'"),
        (["--gpus-per-trial", "64"], "--gpus-per-trial 64: this machine has"),
        (["--resume", "nope"], "--resume nope: no study 'nope' under runs/tune"),
        (["--address", "127.0.0.1:6379"], "--storage must be shared storage"),
    ],
    ids=["unknown-key", "empty-range", "inverted-range", "zero-trials", "unknown-objective",
         "too-many-gpus", "no-such-study", "cluster-local-storage"],
)  # fmt: skip
def test_bad_input_is_refused_before_ray_starts_with_exit_2_and_no_traceback(
    args, message, tmp_path
):
    args = [write_space(tmp_path, a.removeprefix("SPACE:")) if a.startswith("SPACE:") else a
            for a in args]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [*DGAN, "tune", *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # no study directory, so no Ray either


# ---------------------------------------------------------------------------------------------
# Resume across a scheduler's changes: only the tune trial may ask for it
# ---------------------------------------------------------------------------------------------


def test_a_resume_accepts_changed_loss_weights_and_learning_rates_only_when_asked(
    tiny_folder, workdir, one_thread
):
    from dgan.train.gan import GanJob, run_gan

    first = run_gan(tiny_gan_config(tiny_folder, "train.iterations=5"), quiet=True).run_dir
    changed = tiny_gan_config(
        tiny_folder, "train.iterations=10", "loss.lambda_rec=2.5", "train.lr_g=3e-4"
    )
    assert {"loss.lambda_rec", "train.lr_g"} <= set(GanJob.schedulable_keys)
    with pytest.raises(DganError, match=r"loss.lambda_rec: checkpoint 5.0, now 2.5"):
        run_gan(changed, resume=str(first), quiet=True)
    done = run_gan(changed, resume=str(first), quiet=True, schedule_changes=True)
    assert (done.state, done.step) == ("finished", 10)
    # Keys that change what the weights mean stay refused, even for a scheduler.
    other = tiny_gan_config(tiny_folder, "train.iterations=20", "generator.conv_dim=16")
    with pytest.raises(DganError, match=r"generator.conv_dim: checkpoint 8, now 16"):
        run_gan(other, resume=str(first), quiet=True, schedule_changes=True)


def test_the_cli_resume_still_refuses_changed_loss_weights(tiny_folder, workdir, one_thread):
    from dgan.train.gan import run_gan

    # The checkpoint is trained here, in the test's process (as the CLI would: the paper preset
    # and the tiny settings); the resume that refuses goes through the CLI.
    sets = [*TINY_GAN, f"data.root={tiny_folder}", "train.iterations=5"]
    run_dir = run_gan(load_config("gan", ["paper"], sets), quiet=True).run_dir
    assert ckpt.read_status(run_dir)["iteration"] == 5
    again = run_cli_train(
        workdir, tiny_folder, "--set=train.iterations=10", "--set=loss.lambda_rec=2.5",
        "--resume", str(run_dir),
    )  # fmt: skip
    assert again.returncode != 0
    assert "loss.lambda_rec: checkpoint 5.0, now 2.5" in again.stderr
    assert "Traceback" not in again.stderr


def run_cli_train(workdir: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    sets = [f"--set={s}" for s in TINY_GAN]
    return subprocess.run(
        [*DGAN, "train", "gan", "--quiet", "--config", "paper", "--data", str(data), *sets, *args],
        cwd=workdir, env=env, capture_output=True, text=True,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Search spaces
# ---------------------------------------------------------------------------------------------


def test_an_objective_from_the_inspectors_calls_needs_an_inspector_and_the_realism_test():
    from dgan.tune.study import check_objective

    def gan(*overrides: str):
        return load_config("gan", ["demo"], list(overrides))

    name = "set_missed_spallation_crack-spallation"  # a set's defacements called without spall
    check_objective(name, gan("eval.inspector=runs/inspector/00000-inspector"))
    with pytest.raises(DganError, match="it needs a frozen inspector"):
        check_objective(name, gan())
    with pytest.raises(DganError, match="realism=false turns off the realism test, whose images"):
        check_objective(name, gan("eval.inspector=judge", "eval.realism=false"))
    with pytest.raises(DganError, match="realism=false turns off the realism test, whose images"):
        check_objective("set_accuracy_crack", gan("eval.inspector=judge", "eval.realism=false"))
    with pytest.raises(DganError, match="unknown objective 'set_missing'"):
        check_objective("set_missing", gan("eval.inspector=judge"))


def test_the_built_in_spaces_are_log_uniform_a_factor_of_4_around_the_papers_values():
    from dgan.tune.space import load_space

    base = load_config("gan", ["paper"])
    space = load_space("all", base)
    bounds = {d.key: (d.kind, *d.values) for d in space.dimensions}
    assert bounds["loss.lambda_cls_r"] == ("loguniform", 0.5, 8.0)  # Eq. 11: 2
    assert bounds["loss.lambda_sd_con"] == ("loguniform", 0.25, 4.0)  # Eq. 12: 1
    assert bounds["train.lr_g"] == ("loguniform", 5e-5, 8e-4)  # Sec. 4.1: 2e-4
    assert set(load_space("losses", base).keys) | set(load_space("optim", base).keys) == set(
        space.keys
    )
    assert space.point(base) == {
        "loss.lambda_cls_r": 2.0, "loss.lambda_cls_f": 5.0, "loss.lambda_rec": 5.0,
        "loss.lambda_sd_cyc": 5.0, "loss.lambda_sd_con": 1.0, "train.lr_g": 2e-4,
        "train.lr_d": 2e-4,
    }  # fmt: skip


def test_a_yaml_space_names_any_key_with_uniform_loguniform_int_or_choice(tmp_path):
    from dgan.tune.space import load_space

    path = write_space(
        tmp_path,
        "loss.lambda_rec: {loguniform: [1.25, 20]}\n"
        "train.ema_beta: {uniform: [0.9, 0.99]}\n"
        "train.n_critic: {int: [3, 6]}\n"
        "generator.upsample: {choice: [nearest, transpose]}\n",
    )
    space = load_space(path, load_config("gan", ["demo"]))
    assert [str(d) for d in space.dimensions] == [
        "loguniform(1.25, 20)", "uniform(0.9, 0.99)", "int(3, 6)", "choice(nearest, transpose)",
    ]  # fmt: skip
    domains = space.ray_space()
    assert domains["train.n_critic"].lower == 3 and domains["train.n_critic"].upper == 7
    assert space.clip({"loss.lambda_rec": 30.0, "train.n_critic": 9}) == {
        "loss.lambda_rec": 20.0, "train.n_critic": 6,
    }  # fmt: skip


@pytest.mark.parametrize(
    "text,message",
    [
        ("train.n_critic: {uniform: [3, 6]}", "takes whole numbers: search it with {int"),
        ("generator.upsample: {uniform: [1, 2]}", "not a number: search it with {choice"),
        ("loss.lambda_rec: {loguniform: [0, 2]}", "loguniform needs low > 0"),
        ("loss.lambda_rec: {gauss: [0, 2]}", "unknown distribution 'gauss'"),
        ("loss.lambda_rec: {uniform: [-1, 2]}", "the config is invalid at loss.lambda_rec=-1"),
        ("train.lr_g: {loguniform: [1.0e-7, 1.0e-6]}", "lr_end must not exceed"),
    ],
)
def test_a_yaml_space_that_cannot_be_searched_is_refused_naming_the_key(tmp_path, text, message):
    from dgan.tune.space import load_space

    with pytest.raises(DganError) as err:
        load_space(write_space(tmp_path, text + "\n"), load_config("gan", ["demo"]))
    assert message in str(err.value)
