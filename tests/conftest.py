"""Shared fixtures: tiny datasets and a tiny Defect-GAN config that trains in seconds on a CPU."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TINY_GAN = [
    "data.image_size=16",
    "data.num_workers=0",
    "generator.conv_dim=8",
    "generator.repeat_num=2",
    "generator.spade_hidden=8",
    "discriminator.conv_dim=8",
    "train.batch_size=4",
    "log.log_every=2",
    "log.sample_every=5",
    "log.checkpoint_every=5",
    "log.log_model=false",  # logging an MLflow model costs ~5 s; one test turns it on
]

TINY_INSPECTOR = [
    "model.arch=small",
    "data.image_size=16",
    "data.num_workers=0",
    "train.batch_size=4",
    "log.log_every=2",
]


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    from fakes import make_folder_dataset

    return make_folder_dataset(tmp_path / "data", n_normal=12, n_defect=12, size=32)


@pytest.fixture(scope="session")
def mlflow_schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its tables and no experiment, made once per session. A fresh
    store runs all of MLflow's schema migrations (about 1.5 s); a copy of this one opens at
    once, and MLflow adds its Default experiment there, under the copy's own directory."""
    import sqlite3

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = tmp_path_factory.mktemp("mlflow-schema")
    path = folder / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{path}", str(folder / "mlruns")).engine.dispose()
    with sqlite3.connect(path) as db:
        db.execute("DELETE FROM experiments")
    return path


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_schema: Path) -> Path:
    """A fresh working directory, so runs/, mlflow.db and mlruns/ stay inside the test's tmp. Its
    mlflow.db starts as an empty store (`mlflow_schema`)."""
    work = tmp_path / "work"
    work.mkdir()
    shutil.copyfile(mlflow_schema, work / "mlflow.db")
    monkeypatch.chdir(work)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return work


def tiny_gan_config(root: Path, *extra: str):
    from dgan.config import load_config

    return load_config("gan", [], [*TINY_GAN, f"data.root={root}", *extra])


@pytest.fixture
def one_thread():
    """Tiny nets gain nothing from a second thread, and run 10-20x slower with two threads when
    another process holds the other core (OpenMP workers spin-wait for each other)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_training_state(single: Path, multi: Path) -> None:
    """Two checkpoints' state.pt (1 process and N of the same global batch) hold the same nets,
    and the same Adam moments: gradients summed over processes instead of averaged would
    double exp_avg, to which Adam's update itself is blind."""
    import torch

    a = torch.load(single / "state.pt", weights_only=True)
    b = torch.load(multi / "state.pt", weights_only=True)
    for net in ("G", "D", "G_ema"):
        for k, v in a[net].items():
            torch.testing.assert_close(b[net][k], v, rtol=1e-4, atol=1e-5, msg=f"{net}.{k}")
    for opt in ("opt_G", "opt_D"):
        for param, moments in a[opt]["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                one, two = moments[name], b[opt]["state"][param][name]
                where = f"{opt}[{param}].{name}"
                assert two.norm() / one.norm() == pytest.approx(1.0, abs=1e-3), where
                scale = one.abs().max().item()
                torch.testing.assert_close(two, one, rtol=1e-3, atol=1e-3 * scale, msg=where)
    assert a["iteration"] == b["iteration"]
