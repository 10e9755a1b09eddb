"""MLflow runs: one per training job, written by the main process only.

The tracking URI is `--tracking-uri`, else $MLFLOW_TRACKING_URI, else a local SQLite file
`sqlite:///mlflow.db` (artifacts then go to ./mlruns). Nothing needs a server.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from dgan.errors import DganError

if TYPE_CHECKING:
    from pydantic import BaseModel

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(explicit: str | None = None) -> str:
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def absolute_store_uri(tracking: str) -> str:
    """sqlite:///mlflow.db relative to the working directory, made absolute; others unchanged."""
    if tracking.startswith("sqlite:///") and not tracking.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(tracking.removeprefix("sqlite:///")).resolve())
    return tracking


def store_uri(explicit: str | None = None) -> str:
    """The URI an MLflow client is given: the resolved one, with a SQLite file made absolute.

    MLflow keeps one database engine per URI string for the life of the process, and an engine
    keeps its connections open. A relative `sqlite:///mlflow.db` would then reach the file of
    the directory where it was first opened, even after the process changed directory.
    """
    return absolute_store_uri(resolve_tracking_uri(explicit))


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast, naming the URI, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except (urllib.error.URLError, OSError) as err:
        raise DganError(
            f"the MLflow server at {uri} cannot be reached ({err}). Start it, fix "
            "--tracking-uri / MLFLOW_TRACKING_URI, or unset it to track into sqlite:///mlflow.db."
        ) from None


def require_store(uri: str) -> None:
    """For commands that read an existing store: the server answers, or the SQLite file exists.

    Without this check MLflow would create an empty mlflow.db and report "not found".
    """
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            raise DganError(
                f"no MLflow store at {uri}: {path} does not exist. Run the command where training "
                "ran, or pass --tracking-uri (or set MLFLOW_TRACKING_URI) to the store it used.",
                exit_code=2,
            )


# Keys that do not change what a run trains: where it logs, where its data lives (the data is
# identified by its content, dgan.dataset_hash) and how many loader workers read it.
NOT_SETTINGS = ("log.", "data.root", "data.synthetic", "data.num_workers")


def run_tags(job: str, config: BaseModel, run_dir: Path, dataset: str) -> dict[str, str]:
    """The tags every training run carries, so runs can be filtered and compared in the MLflow UI.

    dgan.job, dgan.run_dir, dgan.config_hash (of the training settings: equal hashes mean the same
    model, data selection and schedule) and dgan.dataset_hash (`dataset`, see dgan.data).
    """
    from dgan.config import config_hash

    return {
        "dgan.job": job,
        "dgan.run_dir": str(Path(run_dir).resolve()),
        "dgan.config_hash": config_hash(config, NOT_SETTINGS),
        "dgan.dataset_hash": dataset,
    }


# The figure each experiment's runs are compared by first, and whether lower is better.
SORT_BY = {
    "defect-gan": ("realism_auc", True),
    "defect-inspector": ("test_multi_target_accuracy", False),
}


def experiment_link(base: str, experiment_id: str, name: str) -> str:
    """The run table of one experiment, in the Model training view."""
    link = f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    metric, ascending = SORT_BY.get(name, (None, None))
    if metric is not None and ascending is not None:
        key = quote(f"metrics.`{metric}`", safe="")
        link += f"&orderByKey={key}&orderByAsc={'true' if ascending else 'false'}"
    return link


def open_client(uri: str | None = None):
    """An MlflowClient on the resolved tracking URI (telemetry off)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    return mlflow.MlflowClient(store_uri(uri))


# What a store says when two writers insert the same unique row (SQLite, PostgreSQL, MySQL, and
# the REST error of a server in front of any of them).
_RACE_MARKS = (
    "UNIQUE constraint failed",
    "duplicate key value",
    "Duplicate entry",
    "RESOURCE_ALREADY_EXISTS",
)


def _again_on_race(write, attempts: int = 5):
    """Run `write`; when a concurrent writer inserted the same unique row first, run it again
    (the store rolled the failed write back, and the second finds the row)."""
    import time

    from mlflow.exceptions import MlflowException

    for attempt in range(1, attempts):
        try:
            return write()
        except MlflowException as err:
            if not any(mark in str(err) for mark in _RACE_MARKS):
                raise
            time.sleep(0.05 * attempt)
    return write()


def _experiment_id(client, name: str) -> str:
    """The experiment's id, created if missing; two runs creating it at once share one."""

    def get_or_create() -> str:
        exp = client.get_experiment_by_name(name)
        return exp.experiment_id if exp else client.create_experiment(name)

    return _again_on_race(get_or_create)


class Tracker:
    """A thin MLflow run. Disabled (every call a no-op) on non-main processes."""

    def __init__(
        self,
        enabled: bool,
        uri: str | None,
        experiment: str,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        run_id: str | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_id: str | None = None
        if not enabled:
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        self.uri = resolve_tracking_uri(uri)
        check_reachable(self.uri)
        self.client = mlflow.MlflowClient(absolute_store_uri(self.uri))
        mlflow.set_tracking_uri(self.client.tracking_uri)
        exp_id = _experiment_id(self.client, experiment)
        self.experiment, self.experiment_id = experiment, exp_id
        if run_id is None:
            run = self.client.create_run(exp_id, run_name=run_name, tags=dict(tags or {}))
            self.run_id = run.info.run_id
            if params:
                self.log_params(params)
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def ui(self) -> str:
        """Where to compare this run with the others: the runs table of its experiment."""
        served = self.uri.startswith(("http://", "https://"))
        base = self.uri.rstrip("/") if served else "http://127.0.0.1:5000"
        link = experiment_link(base, self.experiment_id, self.experiment)
        return f"compare runs: {link}" if served else f"compare runs: dgan ui, then {link}"

    def log_dataset(self, root: Path, digest: str, context: str = "training") -> None:
        """Log the data as an MLflow dataset input: the UI's Dataset column shows its name and
        digest (dgan's content hash), and runs can be filtered by it."""
        if not self.enabled:
            return
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        root = Path(root).resolve()
        dataset = Dataset(
            name=root.name, digest=digest[:32], source_type="local",
            source=json.dumps({"uri": str(root)}),
        )  # fmt: skip
        tag = InputTag("mlflow.data.context", context)
        inputs = [DatasetInput(dataset, tags=[tag])]
        # Runs that start together (a study's trials, the queue's jobs) may all find the dataset
        # missing and insert it; the store keeps one row, the others fail and are written again,
        # now linking to that row.
        _again_on_race(lambda: self.client.log_inputs(self.run_id, datasets=inputs))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.enabled:
            return
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_code_model(self, name: str, code: Path, artifacts: dict[str, Path]) -> str | None:
        """Log an MLflow pyfunc model defined by a code file (models-from-code: no pickling)."""
        if not self.enabled:
            return None
        import warnings

        import mlflow

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        with warnings.catch_warnings(), mlflow.start_run(run_id=self.run_id):
            # predict() takes a dict of arrays; MLflow's type-hint advice does not apply.
            warnings.filterwarnings("ignore", message=".*type hint.*")
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=str(code),
                artifacts={k: str(v) for k, v in artifacts.items()},
                pip_requirements=["dgan"],
            )
        return info.model_uri

    def latest_metrics(self) -> dict[str, float]:
        """The last logged value of every metric of the run (empty when disabled)."""
        if not self.enabled:
            return {}
        return dict(self.client.get_run(self.run_id).data.metrics)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self.client.set_terminated(self.run_id, status=status)
