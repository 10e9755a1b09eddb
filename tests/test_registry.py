"""The model registry: versions with their tags, champion promotion, `dgan models`, registered
models wherever a model is taken, bad input, and the whole path over a real `mlflow server`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from conftest import TINY_GAN, TINY_INSPECTOR, tiny_gan_config
from typer.testing import CliRunner

from dgan.config import load_config
from dgan.data import dataset_hash, open_dataset
from dgan.errors import DganError
from dgan.metrics.registry import metric_direction
from dgan.run import checkpoint as ckpt
from dgan.tracking import registry

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables costs seconds); each test registers
    under its own model name."""
    return f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}"


@pytest.fixture
def model_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DGAN_MODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def client_for(uri: str):
    import mlflow

    from dgan.tracking.tracker import absolute_store_uri

    uri = absolute_store_uri(uri)  # MLflow keeps an engine per URI string: one per file
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def register_scored(store: str, name: str, tmp_path: Path, **metrics: float) -> str:
    """A version whose only content is its metric tags, to drive promotion decisions exactly."""
    source = tmp_path / f"model-{name}-{len(list(tmp_path.glob('model-*')))}"
    source.mkdir()
    return registry.register(source.as_uri(), name, metrics, store)


def invoke(*args: str):
    import cli

    return CliRunner().invoke(cli.app, list(args))


# ---------------------------------------------------------------------------------------------
# What a version records
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("metric", "direction"),
    [
        ("val_multi_target_accuracy", "max"),
        ("test_macro_f1", "max"),
        ("fid", "min"),
        ("fid_inspector", "min"),
        ("kid_inspector", "min"),
        ("g_total", "min"),
        ("d_adv", "min"),
        ("mask_mean", None),
    ],
)
def test_metric_direction_reads_accuracy_as_max_and_distances_and_losses_as_min(metric, direction):
    assert metric_direction(metric) == direction


def test_dataset_hash_follows_files_sizes_and_labels_not_the_location(tmp_path):
    import shutil

    from fakes import make_folder_dataset

    root = make_folder_dataset(tmp_path / "a", n_normal=4, n_defect=4, size=16)
    copy = Path(shutil.copytree(root, tmp_path / "b"))
    assert dataset_hash(open_dataset(root)) == dataset_hash(open_dataset(copy))
    victim = sorted((copy / "normal").iterdir())[0]
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert dataset_hash(open_dataset(root)) != dataset_hash(open_dataset(copy))
    relabelled = tmp_path / "c"
    shutil.copytree(root, relabelled)
    lines = (relabelled / "labels.csv").read_text().splitlines()
    last = lines[-1].rsplit(",", 1)
    lines[-1] = f"{last[0]},{1 - int(last[1])}"
    (relabelled / "labels.csv").write_text("\n".join(lines) + "\n")
    assert dataset_hash(open_dataset(root)) != dataset_hash(open_dataset(relabelled))


def test_run_tags_hash_the_training_settings_not_where_a_run_logs_or_its_data_lives(tmp_path):
    from dgan.tracking.tracker import run_tags

    a = tiny_gan_config(tmp_path / "data", "log.tracking_uri=sqlite:///a.db")
    moved = tiny_gan_config(tmp_path / "elsewhere", "log.run_root=/tmp/r", "data.num_workers=1")
    reseeded = tiny_gan_config(tmp_path / "data", "train.seed=1")
    tags = run_tags("gan", a, tmp_path / "run", "abc")
    assert set(tags) == {"dgan.job", "dgan.run_dir", "dgan.config_hash", "dgan.dataset_hash"}
    assert tags["dgan.config_hash"] == run_tags("gan", moved, tmp_path, "x")["dgan.config_hash"]
    assert tags["dgan.config_hash"] != run_tags("gan", reseeded, tmp_path, "x")["dgan.config_hash"]


def test_runs_that_start_together_share_one_experiment_and_one_dataset_row(store, tmp_path):
    """A study's trials start at once: each creates its run in a new experiment and logs the same
    dataset input. The store takes each insert once, and no run fails over it."""
    import sqlite3
    import threading

    from dgan.tracking.tracker import Tracker

    data, n, rounds = tmp_path / "data", 4, 4
    data.mkdir()
    barrier, errors = threading.Barrier(n), []
    trackers: list[list] = [[] for _ in range(rounds)]

    def start_and_log(i: int) -> None:
        try:
            for k in range(rounds):
                barrier.wait()
                tracker = Tracker(True, store, f"started-together-{k}", f"trial-{i}")
                trackers[k].append(tracker)
                tracker.log_dataset(data, "digest")
        except Exception as err:  # collected: the test names every failed write
            errors.append(f"{type(err).__name__}: {err}")
            barrier.abort()

    threads = [threading.Thread(target=start_and_log, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    client = client_for(store)
    for started in trackers:
        assert len(started) == n and len({t.experiment_id for t in started}) == 1
        for tracker in started:
            inputs = client.get_run(tracker.run_id).inputs.dataset_inputs
            assert [i.dataset.digest for i in inputs] == ["digest"]
        with contextlib.closing(sqlite3.connect(store.removeprefix("sqlite:///"))) as db:
            rows = db.execute(
                "SELECT COUNT(*) FROM datasets WHERE experiment_id = ?", (started[0].experiment_id,)
            ).fetchall()
        assert rows == [(1,)]


def test_a_relative_sqlite_store_follows_the_working_directory_within_one_process(
    mlflow_schema, tmp_path, monkeypatch
):
    """MLflow keeps one engine per URI string, with its connections open: `sqlite:///mlflow.db`
    given as is would keep writing to the first directory's file after a change of directory."""
    import shutil
    import sqlite3

    from dgan.tracking.tracker import Tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    folders = [tmp_path / "first", tmp_path / "second"]
    for folder, name in zip(folders, ["run-a", "run-b"], strict=True):
        folder.mkdir()
        shutil.copyfile(mlflow_schema, folder / "mlflow.db")
        monkeypatch.chdir(folder)
        tracker = Tracker(True, "sqlite:///mlflow.db", "relative-store", name)
        tracker.log_metrics({"g_total": 1.0}, step=1)
        tracker.finish()
        registry.register(
            f"runs:/{tracker.run_id}/model", f"model-{name}", {}, None, tracker.run_id
        )
    for folder, name in zip(folders, ["run-a", "run-b"], strict=True):
        with contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as db:
            assert [r[0] for r in db.execute("SELECT name FROM runs")] == [name]
            assert [r[0] for r in db.execute("SELECT name FROM model_versions")] == [
                f"model-{name}"
            ]


def test_promotion_settings_are_checked_before_any_work():
    with pytest.raises(DganError, match="log.promote_mode=max or log.promote_mode=min"):
        load_config("gan", [], ["log.promote_if_better=mask_mean"])
    with pytest.raises(DganError, match="needs log.log_model=true"):
        load_config("inspector", [], ["log.promote_if_better=val_multi_target_accuracy",
                                      "log.log_model=false"])  # fmt: skip
    with pytest.raises(DganError, match="log.registered_model"):
        load_config("gan", [], ["log.promote_if_better=g_total", "log.registered_model="])
    assert load_config("gan", [], ["log.registered_model="]).log.registered_model is None
    explicit = load_config("gan", [], ["log.promote_if_better=mask_mean", "log.promote_mode=max"])
    assert explicit.log.promote_mode == "max"


def test_two_gan_runs_register_versions_1_and_2_of_defect_gan_with_their_tags(
    tiny_folder, workdir, one_thread, capsys
):
    from dgan.train.gan import run_gan

    config = tiny_gan_config(tiny_folder, "train.iterations=5", "log.log_model=true")
    runs = [run_gan(config, quiet=True).run_dir, run_gan(config, quiet=True).run_dir]
    assert "registered models:/defect-gan/2" in capsys.readouterr().out

    client = client_for("sqlite:///mlflow.db")
    versions = sorted(client.search_model_versions("name='defect-gan'"), key=lambda v: v.version)
    assert [str(v.version) for v in versions] == ["1", "2"]
    assert client.get_registered_model("defect-gan").aliases == {}  # promotion was not asked
    expected_data = dataset_hash(open_dataset(tiny_folder))
    mlflow_runs = []
    for run_dir, version in zip(runs, versions, strict=True):
        status = ckpt.read_status(run_dir)
        assert (status["registered_model"], status["registered_version"]) == (
            "defect-gan",
            str(version.version),
        )
        assert version.run_id == status["mlflow_run_id"]
        assert version.source == status["model_uri"]
        run = client.get_run(version.run_id)
        mlflow_runs.append(run)
        assert version.tags["dgan.job"] == "gan"
        assert version.tags["dgan.run_dir"] == str(run_dir.resolve())
        assert version.tags["dgan.dataset_hash"] == expected_data
        assert version.tags["dgan.config_hash"] == run.data.tags["dgan.config_hash"]
        for loss in registry.GAN_LOSSES:  # the final logged losses, as the run recorded them
            assert float(version.tags[loss]) == pytest.approx(run.data.metrics[loss], rel=1e-5)
    # Same settings and data: equal hashes, and the same params, tags and metric names to compare.
    a, b = mlflow_runs
    assert a.data.tags["dgan.config_hash"] == b.data.tags["dgan.config_hash"]
    assert a.data.params.keys() == b.data.params.keys()
    assert a.data.metrics.keys() == b.data.metrics.keys()
    assert {k for k in a.data.tags if k.startswith("dgan.")} == {
        k for k in b.data.tags if k.startswith("dgan.")
    }


# ---------------------------------------------------------------------------------------------
# Promotion
# ---------------------------------------------------------------------------------------------


def test_promote_if_better_moves_champion_only_on_a_strict_improvement(store, tmp_path):
    name = "decisions-max"
    steps = [(0.5, True), (0.4, False), (0.5, False), (0.7, True)]  # a tie keeps the champion
    for k, (accuracy, promoted) in enumerate(steps, start=1):
        version = register_scored(store, name, tmp_path, val_multi_target_accuracy=accuracy)
        outcome = registry.promote_if_better(
            name, version, "val_multi_target_accuracy", tracking_uri=store
        )
        assert (version, outcome.promoted) == (str(k), promoted), outcome.message
        assert ("not promoted" in outcome.message) is not promoted
    assert client_for(store).get_registered_model(name).aliases == {"champion": 4}

    name = "decisions-min"
    for fid, promoted in [(30.0, True), (40.0, False), (25.0, True)]:
        version = register_scored(store, name, tmp_path, fid=fid)
        outcome = registry.promote_if_better(name, version, "fid", tracking_uri=store)
        assert outcome.promoted is promoted, outcome.message
    assert str(client_for(store).get_model_version_by_alias(name, "champion").version) == "3"

    unscored = register_scored(store, name, tmp_path, kid=0.1)
    outcome = registry.promote_if_better(name, unscored, "fid", tracking_uri=store)
    assert not outcome.promoted and "logged no fid" in outcome.message and "kid" in outcome.message


def test_inspector_champion_follows_the_better_logged_val_accuracy_and_loads_by_alias(
    tiny_folder, store, workdir, model_cache, one_thread, capsys
):
    from dgan.train.inspector import evaluate_inspector, run_inspector

    name = "inspector-promotion"
    metric = "val_multi_target_accuracy"
    common = [*TINY_INSPECTOR, f"data.root={tiny_folder}", f"log.tracking_uri={store}",
              f"log.registered_model={name}", f"log.promote_if_better={metric}"]  # fmt: skip
    client = client_for(store)
    logged, champions = [], []
    for epochs in (1, 3):
        run_dir = run_inspector(
            load_config("inspector", [], [*common, f"train.epochs={epochs}"])
        ).run_dir
        status = ckpt.read_status(run_dir)
        run = client.get_run(status["mlflow_run_id"])
        logged.append(run.data.metrics["best_val_multi_target_accuracy"])  # what training logged
        champions.append(str(client.get_model_version_by_alias(name, "champion").version))
        assert status["promoted"] is (champions[-1] == status["registered_version"])
    assert champions[0] == "1"  # no champion before: the first version is promoted
    assert champions[1] == ("2" if logged[1] > logged[0] else "1")
    out = capsys.readouterr().out
    assert f"{name} version 2 {'promoted' if champions[1] == '2' else 'not promoted'}" in out

    # Every command that takes an inspector takes models:/NAME@alias.
    champion = client.get_model_version_by_alias(name, "champion")
    report = evaluate_inspector(f"models:/{name}@champion", tiny_folder, "test", tracking_uri=store)
    assert report.multi_target_accuracy == pytest.approx(
        float(champion.tags["test_multi_target_accuracy"]), abs=1e-5
    )


# ---------------------------------------------------------------------------------------------
# dgan models list / promote, and bad input
# ---------------------------------------------------------------------------------------------


def test_models_list_and_promote_show_and_move_aliases(store, tmp_path):
    name = "listed"
    for accuracy in (0.25, 0.75):
        register_scored(store, name, tmp_path, test_multi_target_accuracy=accuracy)

    result = invoke("models", "promote", name, "1", "--tracking-uri", store)
    assert result.exit_code == 0, result.output
    assert f"{name}@champion -> version 1" in result.output
    result = invoke("models", "promote", name, "2", "--alias", "champion", "--tracking-uri", store)
    assert f"{name}@champion -> version 2 (was version 1)" in result.output

    result = invoke("models", "list", name, "--tracking-uri", store)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{name} (2 versions)"
    assert lines[1].split() == ["version", "aliases", "created", "(UTC)", "run",
                                "test_multi_target_accuracy"]  # fmt: skip
    assert lines[2].split()[:2] == ["1", "-"] and lines[2].split()[-1] == "0.25"
    assert lines[3].split()[:2] == ["2", "@champion"] and lines[3].split()[-1] == "0.75"

    result = invoke("models", "list", name, "--json", "-", "--tracking-uri", store)
    listed = json.loads(result.output)
    assert [(v["version"], v["aliases"]) for v in listed["versions"]] == [
        ("1", []),
        ("2", ["champion"]),
    ]
    assert listed["versions"][1]["metrics"] == {"test_multi_target_accuracy": 0.75}


def test_unknown_model_version_or_alias_is_refused_naming_what_exists(store, tmp_path):
    name = "known"
    register_scored(store, name, tmp_path, fid=1.0)
    registry.promote(name, "1", "champion", store)

    result = invoke("models", "list", "unknown", "--tracking-uri", store)
    assert result.exit_code == 2 and "no registered model 'unknown'" in result.output
    assert "known" in result.output and result.exception.__class__ is SystemExit

    result = invoke("models", "promote", name, "7", "--tracking-uri", store)
    assert result.exit_code == 2
    assert "known has no version 7; it has versions 1; aliases @champion -> 1" in result.output

    result = invoke("models", "promote", name, "1", "--alias", "v2", "--tracking-uri", store)
    assert result.exit_code == 2 and "reserved" in result.output

    data = tmp_path / "unused"
    result = invoke("eval", "inspector", f"models:/{name}@best", str(data), "--tracking-uri", store)
    assert result.exit_code == 2
    assert "known has no alias 'best'" in result.output and "@champion -> 1" in result.output


def test_a_model_uri_that_does_not_resolve_exits_with_a_message_and_no_traceback(
    store, tmp_path, tiny_folder
):
    register_scored(store, "present", tmp_path, fid=1.0)  # the store exists and has a model
    env = {**os.environ, "PYTHONPATH": str(REPO), "DGAN_MODEL_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "cli", "eval", "inspector", "models:/absent@champion",
         str(tiny_folder), "--tracking-uri", store],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode != 0
    assert "no registered model 'absent'" in result.stderr and "present" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_tracking_server_is_named(tmp_path):
    from dgan.run.launch import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    for args in (["models", "list"], ["models", "promote", "defect-gan", "1"],
                 ["eval", "inspector", "models:/defect-gan@champion", str(tmp_path)]):  # fmt: skip
        result = invoke(*args, "--tracking-uri", uri)
        assert result.exit_code == 1, result.output
        assert f"the MLflow server at {uri} cannot be reached" in result.output


def test_a_missing_sqlite_store_is_not_created_by_reading_it(tmp_path):
    missing = tmp_path / "nowhere.db"
    result = invoke("models", "list", "--tracking-uri", f"sqlite:///{missing}")
    assert result.exit_code == 2 and "no MLflow store" in result.output
    assert not missing.exists()


# ---------------------------------------------------------------------------------------------
# A real MLflow server over HTTP
# ---------------------------------------------------------------------------------------------


def _rest(base: str, path: str, query: dict | None = None, body: dict | None = None) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _wait_healthy(base: str, server: subprocess.Popen, log: Path, limit: float = 180.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.5)  # polling for readiness, not timing anything
    pytest.fail(f"mlflow server did not answer /health within {limit:.0f} s:\n{log.read_text()}")


def _stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's PID; its workers share its new session's process group."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(server.pid, signal.SIGKILL)  # a worker left behind by the server we started


@pytest.mark.slow
def test_two_runs_versions_and_champion_reach_a_real_mlflow_server(
    tiny_folder, tmp_path, monkeypatch
):
    from dgan.run.launch import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    # Proxied artifacts (--serve-artifacts): clients upload and download over HTTP, as they
    # would from another machine; --default-artifact-root would have them write the server's disk.
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server",
           "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
           "--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes
    env.pop("MLFLOW_TRACKING_URI", None)
    work = tmp_path / "work"
    work.mkdir()
    with log.open("w") as out:
        server = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
            start_new_session=True,
        )  # fmt: skip
    try:
        _wait_healthy(base, server, log)
        train_env = {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                     "DGAN_MODEL_CACHE": str(tmp_path / "cache")}  # fmt: skip
        overrides = [a for o in TINY_GAN + ["train.iterations=5", "log.log_model=true"]
                     for a in ("--set", o)]  # fmt: skip
        outputs = []
        for seed in (0, 1):
            result = subprocess.run(
                [sys.executable, "-m", "cli", "train", "gan", "--data", str(tiny_folder),
                 *overrides, "--set", f"train.seed={seed}", "--tracking-uri", base,
                 "--promote-if-better", "g_total", "--quiet"],
                env=train_env, cwd=work, capture_output=True, text=True,
            )  # fmt: skip
            assert result.returncode == 0, result.stdout + result.stderr
            outputs.append(result.stdout)
        assert "defect-gan version 1 promoted to @champion: no champion yet" in outputs[0]

        experiment = _rest(base, "experiments/get-by-name", {"experiment_name": "defect-gan"})
        runs = _rest(
            base, "runs/search",
            body={"experiment_ids": [experiment["experiment"]["experiment_id"]]},
        )["runs"]  # fmt: skip
        assert len(runs) == 2 and {r["info"]["status"] for r in runs} == {"FINISHED"}
        for run in runs:
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            assert tags["dgan.job"] == "gan"
            assert tags["dgan.dataset_hash"] == dataset_hash(open_dataset(tiny_folder))
            history = _rest(
                base, "metrics/get-history",
                {"run_id": run["info"]["run_id"], "metric_key": "d_total"},
            )["metrics"]  # fmt: skip
            assert [m["step"] for m in history] == [2, 4, 5]  # log_every 2, and the last

        model = _rest(base, "registered-models/get", {"name": "defect-gan"})["registered_model"]
        assert {v["version"] for v in model["latest_versions"]} <= {"1", "2"}
        versions = _rest(base, "model-versions/search", {"filter": "name='defect-gan'"})
        by_version = {v["version"]: v for v in versions["model_versions"]}
        assert set(by_version) == {"1", "2"}
        assert {v["run_id"] for v in by_version.values()} == {r["info"]["run_id"] for r in runs}
        g_total = {
            k: float({t["key"]: t["value"] for t in v["tags"]}["g_total"])
            for k, v in by_version.items()
        }
        expected = "2" if g_total["2"] < g_total["1"] else "1"
        champion = _rest(
            base, "registered-models/alias", {"name": "defect-gan", "alias": "champion"}
        )["model_version"]
        assert champion["version"] == expected
        assert ("not promoted" in outputs[1]) is (expected == "1")

        # The champion loads back over HTTP, from safetensors.
        from dgan.tracking.source import load_generator_from, resolve_model

        monkeypatch.setenv("DGAN_MODEL_CACHE", str(tmp_path / "cache"))
        source = resolve_model("models:/defect-gan@champion", "gan", tracking_uri=base)
        G, config, classes = load_generator_from(source)
        assert config.data.image_size == 16 and len(classes) == 5
    finally:
        _stop(server)
    assert server.returncode is not None


def test_promote_auto_compares_realism_without_inception_weights_and_fid_with_them(monkeypatch):
    monkeypatch.delenv("DGAN_INCEPTION_WEIGHTS", raising=False)
    auto = load_config("gan", ["demo"], ["log.promote_if_better=auto"])
    assert auto.log.promote_if_better == "realism_auc"
    assert metric_direction("realism_auc") == "min"
    monkeypatch.setenv("DGAN_INCEPTION_WEIGHTS", "/weights/inception.pth")
    assert load_config("gan", ["demo"], ["log.promote_if_better=auto"]).log.promote_if_better == (
        "fid"
    )
    inspector = load_config("inspector", [], ["log.promote_if_better=auto"])
    assert inspector.log.promote_if_better == "val_multi_target_accuracy"
    with pytest.raises(DganError, match="log.eval_every=0 turns off"):
        load_config("gan", ["demo"], ["log.promote_if_better=auto", "log.eval_every=0"])
