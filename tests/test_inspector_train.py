"""`dgan train inspector`, `dgan eval inspector`, `dgan repro table3`: runs, resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_INSPECTOR
from fakes import make_folder_dataset
from safetensors.torch import load_file

from dgan.config import load_config
from dgan.run import checkpoint as ckpt
from dgan.train.inspector import evaluate_inspector, run_inspector

REPO = Path(__file__).resolve().parents[1]
TINY_INSPECTOR_RUN = [
    *TINY_INSPECTOR,
    "train.epochs=2",
    "log.log_model=false",  # logging the MLflow model costs ~5 s; one test turns it on
]


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    """One MLflow store for the module: creating its tables costs seconds per database."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory) -> Path:
    return make_folder_dataset(tmp_path_factory.mktemp("syn") / "s", 6, 6, 32, splits=False)


def tiny_config(root: Path, tracking_uri: str, *extra: str):
    return load_config(
        "inspector",
        [],
        [*TINY_INSPECTOR_RUN, f"data.root={root}", f"log.tracking_uri={tracking_uri}", *extra],
    )


def test_a_run_keeps_the_best_val_epoch_reports_its_test_metrics_and_logs_to_mlflow(
    tiny_folder, synthetic_set, tracking_uri, workdir, capsys
):
    config = tiny_config(
        tiny_folder, tracking_uri, "train.epochs=3", f"data.synthetic=[{synthetic_set}]",
        "log.log_model=true",
    )  # fmt: skip
    run_dir = run_inspector(config, quiet=True).run_dir
    out = capsys.readouterr().out
    assert "class balance" in out and "train synthetic" in out

    # 12 real and 12 synthetic training images per epoch (ratio 1), batch 4: 6 steps an epoch.
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == [
        "iter-00000006",
        "iter-00000012",
        "iter-00000018",
    ]
    status = ckpt.read_status(run_dir)
    assert status["state"] == "finished" and status["source_classifier"] is True
    summary = json.loads((run_dir / "inspector" / "metrics.json").read_text())
    assert summary["best_epoch"] == status["best_epoch"]
    assert summary["test"]["n_images"] == 6 and set(summary["test"]["per_class"]) == {
        "crack", "spallation", "efflorescence", "exposed_bars", "corrosion_stain",
    }  # fmt: skip

    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(status["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "defect-inspector"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.grl"] == "True"
    val = client.get_metric_history(run.info.run_id, "val_multi_target_accuracy")
    assert [m.step for m in val] == [6, 12, 18]
    best = max(range(3), key=lambda i: (val[i].value, -i))  # the first of equal maxima
    assert status["best_epoch"] == best + 1
    assert run.data.metrics["test_multi_target_accuracy"] == pytest.approx(
        summary["test"]["multi_target_accuracy"]
    )
    assert any(k.startswith("test_f1_") for k in run.data.metrics)
    assert "train_loss_src" in run.data.metrics and "grl_alpha" in run.data.metrics

    # The logged model loads from code and safetensors and agrees with the file on disk.
    import numpy as np

    model = mlflow.pyfunc.load_model(status["model_uri"])
    assert model.predict({"images": np.zeros((2, 3, 16, 16), np.float32)}).shape == (2, 5)

    # Re-scoring the saved best epoch on test gives the reported figure.
    report = evaluate_inspector(run_dir, tiny_folder, "test")
    assert report.multi_target_accuracy == pytest.approx(summary["test"]["multi_target_accuracy"])


def test_resume_after_a_pause_ends_where_an_uninterrupted_run_ends(
    tiny_folder, synthetic_set, tracking_uri, workdir
):
    extra = (f"data.synthetic=[{synthetic_set}]",)  # the GRL schedule and the mixing, too
    straight = run_inspector(tiny_config(tiny_folder, tracking_uri, *extra), quiet=True).run_dir
    paused = run_inspector(
        tiny_config(tiny_folder, tracking_uri, *extra), quiet=True, stop_at=1
    ).run_dir
    assert ckpt.read_status(paused)["state"] == "paused"
    assert [p.name for p in ckpt.list_checkpoints(paused)] == ["iter-00000006"]
    resumed = run_inspector(
        tiny_config(tiny_folder, tracking_uri, *extra), resume=str(paused)
    ).run_dir
    assert resumed == paused and ckpt.read_status(resumed)["state"] == "finished"
    a = torch.load(straight / "checkpoints" / "iter-00000012" / "state.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "iter-00000012" / "state.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert (a["best_epoch"], a["best_score"]) == (b["best_epoch"], b["best_score"])


def test_no_grl_trains_without_a_source_classifier_and_warns_of_classes_without_positives(
    tmp_path, synthetic_set, tracking_uri, workdir, capsys
):
    # Real train defects 0 and 1 and both synthetic ones are crack or spallation (fake labels
    # cycle the classes), so three classes have no positive anywhere in training.
    real = make_folder_dataset(tmp_path / "real", 8, 4, 32)
    syn = make_folder_dataset(tmp_path / "syn", 2, 2, 32, splits=False)
    config = tiny_config(
        real, tracking_uri, "model.grl=false", f"data.synthetic=[{syn}]", "train.epochs=1"
    )
    run_dir = run_inspector(config, quiet=True).run_dir
    out = capsys.readouterr().out
    warning = "warning: no training image is positive for efflorescence, exposed_bars, corrosion"
    assert warning in out
    weights = load_file(str(run_dir / "inspector" / "model.safetensors"))
    assert weights and not any(k.startswith("source_classifier") for k in weights)
    assert ckpt.read_status(run_dir)["source_classifier"] is False


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def dgan(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_cli_refuses_a_synthetic_set_with_other_classes_with_exit_2_and_no_traceback(
    tiny_folder, tmp_path
):
    other = make_folder_dataset(tmp_path / "other", 2, 2, 32, classes=("rust",), splits=False)
    result = dgan(
        "train", "inspector", "--data", str(tiny_folder), "--synthetic", str(other), cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "error: synthetic set" in result.stderr and "extra rust" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # refused before a run directory exists


def test_cli_repro_without_a_synthetic_set_says_how_to_give_one(tiny_folder, tmp_path):
    result = dgan("repro", "table3", "--data", str(tiny_folder), cwd=tmp_path)
    assert result.returncode == 2
    assert "--synthetic DIR" in result.stderr and "--rows real" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_eval_prints_the_table_and_writes_json(tiny_folder, tracking_uri, workdir):
    from typer.testing import CliRunner

    import cli

    run_dir = run_inspector(
        tiny_config(tiny_folder, tracking_uri, "train.epochs=1"), quiet=True
    ).run_dir
    out = workdir / "val.json"
    result = CliRunner().invoke(
        cli.app,
        ["eval", "inspector", str(run_dir), str(tiny_folder), "--split", "val", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "multi-target accuracy" in result.output and "macro" in result.output
    saved = json.loads(out.read_text())
    assert saved["split"] == "val" and saved["n_images"] == 6
    summary = json.loads((run_dir / "inspector" / "metrics.json").read_text())
    assert saved["multi_target_accuracy"] == pytest.approx(summary["val"]["multi_target_accuracy"])


def test_repro_table3_runs_every_row_per_seed_and_tags_the_runs(
    tiny_folder, synthetic_set, tracking_uri, workdir
):
    from dgan.repro import run_table3

    config = tiny_config(tiny_folder, tracking_uri, "train.epochs=1")
    from dgan.events import CollectEvents

    table = run_table3(config, [synthetic_set], seeds=2, events=CollectEvents())
    assert [r.row for r in table.rows] == ["real", "grl", "no-grl"]
    assert all(len(r.accuracies) == 2 for r in table.rows)
    text = table.format()
    assert "real + synthetic, GRL" in text and "±" in text
    assert json.loads((table.out_dir / "table3.json").read_text())["rows"][0]["row"] == "real"

    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs(
        [client.get_experiment_by_name("defect-inspector").experiment_id],
        "tags.`dgan.repro` = 'table3' and tags.`dgan.row` = 'no-grl'",
    )
    assert len(runs) == 2 and {r.data.tags["dgan.seed"] for r in runs} == {"0", "1"}
    assert all("test_multi_target_accuracy" in r.data.metrics for r in runs)


@pytest.mark.slow
def test_two_processes_train_one_inspector_over_gloo(
    tiny_folder, synthetic_set, tracking_uri, workdir
):
    extra = (f"data.synthetic=[{synthetic_set}]", "train.epochs=1")
    result = run_inspector(tiny_config(tiny_folder, tracking_uri, *extra), gpus=2, quiet=True)
    run_dir = result.run_dir
    status = ckpt.read_status(run_dir)
    assert status["state"] == "finished" and status["source_classifier"] is True
    last = ckpt.list_checkpoints(run_dir)[-1]
    assert (last / "rng-1.pt").is_file()  # the second process ran and saved its RNG
    assert last.name == "iter-00000006"  # 24 images an epoch at a global batch of 4
    assert (run_dir / "inspector" / "model.safetensors").is_file()
    # BatchNorm normalises each process's half batch, so the weights differ from a 1-process
    # run's; the sharded test scoring must not: one process scores the exported model alike.
    reported = {k: v for k, v in result.metrics.items() if k.startswith("test_")}
    alone = evaluate_inspector(run_dir, tiny_folder, "test")
    assert len(reported) > 5 and alone.metrics() == pytest.approx(reported)


# Tiny nets: one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")
