"""A study: many Defect-GAN trials under Ray Tune, ranked by one objective.

    runs/tune/NAME/
        tune.yaml        the resolved TuneConfig (what --resume continues)
        space.yaml       the search space
        study.json       state (running, interrupted, finished), objective, MLflow parent run,
                         the trials' base config, where Ray keeps the experiment
        ray/             Ray's experiment (trial checkpoints, state for Tuner.restore), unless
                         `storage` names shared storage
        ray-session/     the local Ray's temp dir and logs
        gan/NNNNN-<trial>/  each trial's run directory (checkpoints, samples, generator/)
        logs/<trial>.log what each trial's trainer said
        results.txt      the ranked table
        best.yaml        the best trial's config, a preset for `dgan train gan --config`

Everything that can be wrong with the input is checked before Ray starts (`prepare_study`).
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgan.config import GanConfig, TuneConfig, flatten, load_config, to_yaml
from dgan.errors import DganError
from dgan.events import ConsoleEvents, Events
from dgan.io import atomic_write_text
from dgan.metrics.registry import GAN_D_TERMS, GAN_G_TERMS
from dgan.tune.space import SearchSpace, apply_params, load_space

STUDY_FILE = "study.json"
RAY_EXPERIMENT = "ray"  # the experiment's folder under the study directory (local storage)
# Filesystems that every node of a cluster can reach under the same path.
SHARED_FILESYSTEMS = (
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
    "orangefs", "9p",
)  # fmt: skip
# Metrics the periodic evaluation gives only with an inspector, or only with Inception weights.
# The inspector's calls on the realism test's images (dgan.evaluation.realism._inspector_calls).
CALLS = ("set_accuracy", "set_missed", "set_added", "restored_called_normal")
NEEDS_INSPECTOR = ("fid_inspector", "kid_inspector", "category_accuracy", *CALLS)
NEEDS_INCEPTION = ("fid", "kid")
REALISM = ("realism_auc", "realism_log_loss")  # the realism test's two statistics
# What a trial's reports hold: the periodic evaluation's figures (dgan.evaluation.periodic) and
# the running means of the loss terms (Eq. 11-12), by their registered base names.
TRIAL_METRICS = (
    *NEEDS_INCEPTION, *NEEDS_INSPECTOR, "realism_auc", "realism_log_loss", "background_change",
    "spatial_precision", "diversity_l1", *GAN_D_TERMS, *GAN_G_TERMS,
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


def default_objective(gan: GanConfig) -> str:
    """fid with the Inception weights, else fid_inspector with an inspector, else the realism
    test's held-out log loss: its AUC is 1.0 for every trial at the first rungs of a short study
    (measured: all 16 trials of a demo study at iteration 50), so it cannot rank them."""
    from dgan.config import gan_promotion_metric

    if gan_promotion_metric(gan) == "fid":
        return "fid"
    return "fid_inspector" if gan.eval.inspector else "realism_log_loss"


def check_objective(name: str, gan: GanConfig) -> None:
    """The objective is a registered metric with a direction that the trials measure."""
    from dgan.config import gan_promotion_metric
    from dgan.metrics.registry import STAGES, lookup

    metric = lookup(name)
    loss_term = metric is not None and metric.name.startswith(("d_", "g_"))
    if (
        metric is None
        or metric.direction is None
        or metric.name not in TRIAL_METRICS
        or name.startswith(STAGES)  # the inspector's val_/test_ figures
        or (loss_term and name != metric.name)
    ):
        raise DganError(
            f"unknown objective {name!r}: name a registered metric that a trial measures "
            f"({', '.join(sorted(TRIAL_METRICS))}; per-category and _transfer forms too, e.g. "
            "realism_auc_restored)",
            exit_code=2,
        )
    if loss_term:
        return  # a loss term (Eq. 11-12): their running means go into every report
    missing = None
    if not gan.log.eval_every:
        missing = "gan.log.eval_every=0 turns the periodic evaluation off"
    elif metric.name in NEEDS_INSPECTOR and not gan.eval.inspector:
        missing = "it needs a frozen inspector: --set gan.eval.inspector=RUN_DIR_OR_MODEL_URI"
    elif metric.name in NEEDS_INCEPTION and gan_promotion_metric(gan) != "fid":
        missing = (
            "it needs the Inception weights: --set gan.eval.inception_weights=FILE or "
            "$DGAN_INCEPTION_WEIGHTS"
        )
    elif metric.name in REALISM and not gan.eval.realism:
        missing = "gan.eval.realism=false turns the realism test off"
    elif metric.name in CALLS and not gan.eval.realism:
        missing = "gan.eval.realism=false turns off the realism test, whose images it judges"
    elif metric.name in REALISM and name.endswith("_transfer"):
        missing = "the realism test runs on the train split only"
    if missing:
        raise DganError(f"objective {name}: the trials cannot measure it; {missing}", exit_code=2)


# ---------------------------------------------------------------------------------------------
# Checks and the study directory, before Ray starts
# ---------------------------------------------------------------------------------------------


@dataclass
class Study:
    """A checked study, ready to run: nothing of Ray has started yet."""

    name: str
    directory: Path
    config: TuneConfig
    gan: GanConfig  # the trials' base config as the user gave it (data.root may be None)
    space: SearchSpace
    objective: str
    mode: str
    search: str
    resume: bool
    address: str | None
    storage: str  # Ray's storage_path
    experiment: str  # Ray's experiment name under it
    state: dict[str, Any] = field(default_factory=dict)  # study.json

    @property
    def experiment_path(self) -> str:
        return f"{self.storage.rstrip('/')}/{self.experiment}"


def study_names(root: Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / STUDY_FILE).is_file())


def prepare_study(config: TuneConfig, name: str | None = None, resume: str | None = None) -> Study:
    """Check everything that can be checked without Ray; returns the study to run.

    With `resume`, the study's own saved config is used and `config` gives only `root`.
    DganError (exit code 2) for bad input, naming what is wrong and how to fix it.
    """
    root = Path(config.root)
    if resume is not None:
        directory = root / resume if not Path(resume).is_dir() else Path(resume)
        if not (directory / STUDY_FILE).is_file():
            names = study_names(root)
            known = f"studies there: {', '.join(names)}" if names else "there is no study there"
            raise DganError(
                f"--resume {resume}: no study {resume!r} under {root} ({known}). Start one with "
                "'dgan tune --name NAME'.",
                exit_code=2,
            )
        directory = directory.resolve()
        state = json.loads((directory / STUDY_FILE).read_text())
        config = load_config("tune", [str(directory / "tune.yaml")])
        name = directory.name
    else:
        state = {}
        if name is not None:
            if not name or "/" in name or name.startswith("."):
                raise DganError(f"--name {name!r}: use a plain folder name", exit_code=2)
            if (root / name).exists():
                raise DganError(
                    f"study {name!r} exists in {root}: continue it with 'dgan tune --resume "
                    f"{name}', or pick another --name",
                    exit_code=2,
                )
        directory = None
    gan = config.gan_config()
    check_schedule(config, gan)
    space = load_space(config.space, gan)
    objective = config.objective or default_objective(gan)
    check_objective(objective, gan)
    from dgan.metrics.registry import require_direction

    mode = require_direction(objective, config.mode)
    search = config.search or ("random" if config.scheduler == "pbt" else "tpe")
    if config.scheduler == "pbt":
        if search != "random":
            raise DganError(
                "--scheduler pbt samples its population at random and takes no search "
                "algorithm (Ray Tune refuses one with PBT); drop --search tpe",
                exit_code=2,
            )
        if not perturbable_keys(space):
            from dgan.train.gan import GanJob

            raise DganError(
                f"--scheduler pbt perturbs keys that a resume may change "
                f"({', '.join(GanJob.schedulable_keys)}); the space {space.name} has none of "
                "them: use --space losses, optim or all, or add one to the YAML",
                exit_code=2,
            )
    address = config.address or os.environ.get("RAY_ADDRESS") or None
    if address == "local":
        address = None
    storage = config.storage
    if address is not None:
        check_cluster_inputs(address, storage, gan)
    check_local_resources(config, address)
    if storage is not None:
        storage = storage if "://" in storage else str(Path(storage).resolve())
    if resume is not None:
        storage, experiment = state["storage"], state["experiment"]
    else:
        experiment = RAY_EXPERIMENT if storage is None else None  # None: the study's name
    return Study(
        name or "", directory or root / (name or ""), config, gan, space, objective, mode,
        search, resume is not None, address, storage or "", experiment or "", state,
    )  # fmt: skip


def create_study_dir(study: Study) -> None:
    """The new study's directory (numbered NNNNN-<scheduler> without --name); Ray's storage and
    experiment name follow from it."""
    from dgan.run import checkpoint as ckpt

    root = Path(study.config.root)
    if study.name:
        study.directory.mkdir(parents=True)
    else:
        study.directory = ckpt.new_run_dir(root.parent, root.name, study.config.scheduler)
        study.name = study.directory.name
    study.directory = study.directory.resolve()
    if not study.storage:
        study.storage = str(study.directory)
    if not study.experiment:
        study.experiment = study.name


def check_schedule(config: TuneConfig, gan: GanConfig) -> None:
    """Trials report at their evaluations, so the schedulers' intervals must meet them."""
    every, total = gan.log.eval_every, gan.train.iterations
    if every <= 0 or every > total or total % every:
        raise DganError(
            f"each trial reports at its periodic evaluations: gan.train.iterations={total} must "
            f"be a multiple of gan.log.eval_every={every} (at least 1), so that the last "
            "iteration is reported too",
            exit_code=2,
        )
    if config.scheduler == "asha" and config.grace_iterations > total:
        raise DganError(
            f"grace_iterations={config.grace_iterations} exceeds the trials' "
            f"gan.train.iterations={total}: ASHA would never stop a trial",
            exit_code=2,
        )
    if config.scheduler == "pbt" and not every <= config.pbt_interval < total:
        raise DganError(
            f"pbt_interval={config.pbt_interval} must lie between gan.log.eval_every={every} "
            f"and gan.train.iterations={total} (exclusive): PBT acts at reports",
            exit_code=2,
        )


def perturbable_keys(space: SearchSpace) -> tuple[str, ...]:
    """The space's keys that PBT may change on a resume (GanJob.schedulable_keys)."""
    from dgan.train.gan import GanJob

    return tuple(k for k in space.keys if k in GanJob.schedulable_keys)


def is_shared_storage(storage: str) -> bool:
    """A URI (s3://, gs://, ...) or a path on a network filesystem (NFS, CIFS, Lustre, FUSE...)."""
    if "://" in storage:
        return not storage.startswith("file://")
    path = str(Path(storage).resolve())
    best, fstype = "", ""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return False
    for line in mounts:
        parts = line.split()
        if len(parts) < 3 or len(parts[1]) <= len(best):
            continue
        if path == parts[1] or path.startswith(parts[1].rstrip("/") + "/"):
            best, fstype = parts[1], parts[2]
    return fstype in SHARED_FILESYSTEMS or fstype.startswith("fuse.")


def check_cluster_inputs(address: str, storage: str | None, gan: GanConfig) -> None:
    """On a cluster, trials run on other nodes: their checkpoints and MLflow runs must reach
    storage and a tracking server that every node sees."""
    from dgan.tracking.tracker import resolve_tracking_uri

    if storage is None or not is_shared_storage(storage):
        where = (
            "no --storage was given (the study directory is local)"
            if storage is None
            else (f"--storage {storage} is not on shared storage")
        )
        raise DganError(
            f"--address {address}: a Ray cluster runs trials on other nodes, so --storage must be "
            f"shared storage that every node reaches (an NFS or other network mount, or a URI "
            f"such as s3://bucket/tune); {where}",
            exit_code=2,
        )
    uri = resolve_tracking_uri(gan.log.tracking_uri)
    if not uri.startswith(("http://", "https://", "databricks")):
        raise DganError(
            f"--address {address}: trials on other nodes cannot write the MLflow store {uri}; "
            "start an MLflow server and pass --tracking-uri http://HOST:PORT",
            exit_code=2,
        )


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def check_local_resources(config: TuneConfig, address: str | None) -> None:
    """A trial must fit on this machine when Ray runs here (a cluster is checked on connect)."""
    if address is not None:
        return
    cpus = os.cpu_count() or 1
    if config.cpus_per_trial > cpus:
        raise DganError(
            f"--cpus-per-trial {config.cpus_per_trial:g}: this machine has {cpus} CPUs, so no "
            "trial could start",
            exit_code=2,
        )
    if config.gpus_per_trial > 0:
        gpus = local_gpus()
        if config.gpus_per_trial > gpus:
            raise DganError(
                f"--gpus-per-trial {config.gpus_per_trial:g}: this machine has {gpus} GPU"
                f"{'s' * (gpus != 1)}, so no trial could start; use --gpus-per-trial 0 (CPU) or "
                "a fraction of one GPU such as 0.25",
                exit_code=2,
            )


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


@dataclass
class TrialRow:
    """One trial of a finished study, as the ranked table shows it."""

    trial_id: str
    params: dict[str, Any]
    iteration: int
    value: float | None  # the objective at the trial's last report
    outcome: str  # finished, stopped early, error: ...
    run_dir: str | None = None
    exploits: list[str] = field(default_factory=list)  # PBT: "from <trial> at <iteration>"
    base: bool = False  # the base config's own values (TuneConfig.include_default)

    @property
    def short(self) -> str:
        return self.trial_id.rsplit("_", 1)[-1]


@dataclass
class StudyResult:
    """How a study went: its trials ranked best first, and what it wrote."""

    name: str
    directory: Path
    objective: str
    mode: str
    rows: list[TrialRow]
    total: int  # iterations of a whole trial
    seconds: float
    best_config: Path | None
    parent_run_id: str | None
    scheduler: str
    lines: list[str] = field(default_factory=list)  # what registering the best trial said

    @property
    def best(self) -> TrialRow | None:
        return self.rows[0] if self.rows and self.rows[0].value is not None else None

    def format(self, limit: int = 12) -> str:
        """The ranked table and a summary, as `dgan tune` prints it."""
        return format_table(self, limit)


class StudyInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the study after Ray saved its state; `--resume NAME` continues it."""


def run_study(
    config: TuneConfig,
    name: str | None = None,
    resume: str | None = None,
    events: Events | None = None,
) -> StudyResult:
    """Run (or with `resume`, continue) a study; returns its trials ranked best first.

    Starts a local Ray on 127.0.0.1 (or joins `address`, or one already initialised in this
    process) and stops what it started. Ctrl-C: Ray saves the study's state, the trials'
    MLflow runs are closed as KILLED, and StudyInterrupted is raised.
    """
    events = events or ConsoleEvents()
    study = prepare_study(config, name, resume)
    config = study.config
    gan_trials = trial_base_config(study)
    if not study.resume:
        create_study_dir(study)
        gan_trials = with_run_root(gan_trials, study.directory)
    write_study_files(study, gan_trials)
    events.info(
        f"study {study.name}: {config.trials} trials, {config.scheduler} scheduler, {study.search} "
        f"search, objective {study.objective} ({study.mode}), space {study.space.name}: "
        f"{study.space.describe()}"
    )
    parent = open_parent_run(study, gan_trials)
    study.state["parent_run_id"] = parent.run_id
    set_state(study, "running")
    import ray

    started, t0 = False, time.perf_counter()
    try:
        started = connect_ray(study)
        results, interrupted = fit(study, gan_trials, parent.run_id)
        study.state["seconds"] = time.perf_counter() - t0 + study.state.get("seconds", 0.0)
        if interrupted:
            raise StudyInterrupted(study.name)
        rows = collect_rows(study, results, gan_trials)
    except BaseException as err:
        stopped = isinstance(err, KeyboardInterrupt)
        set_state(study, "interrupted" if stopped else "failed")
        close_child_runs(study, parent, "KILLED")
        parent.finish("KILLED" if stopped else "FAILED")
        if stopped:
            events.info(
                f"study {study.name} interrupted; Ray keeps its state in {study.experiment_path}. "
                f"Continue with: dgan tune --resume {study.name}"
            )
        raise
    finally:
        if started and study.address is None:
            stop_local_ray(study.directory / "ray-session")
        elif started:
            ray.shutdown()
    result = finish_study(study, rows, study.state["seconds"], parent, events)
    if all(row.value is None for row in rows):  # nothing to rank: say why instead
        set_state(study, "failed")
        raise DganError(
            f"no trial of study {study.name} reported its objective ({rows[0].outcome}); each "
            f"trial's output is in {study.directory / 'logs'}, Ray's in {study.experiment_path}"
        )
    set_state(study, "finished")
    return result


def trial_base_config(study: Study) -> GanConfig:
    """The trials' config: data found, paths absolute (Ray workers have their own working
    directory), and each trial's own run directory, MLflow run and checkpoints arranged."""
    if "base_config" in study.state:  # a resumed study's trials must see the same config
        return GanConfig.model_validate(study.state["base_config"])
    from dgan.data import ensure_demo_dataset
    from dgan.tracking.tracker import store_uri
    from dgan.train.gan import GanJob

    gan = study.gan
    root = Path(gan.data.root) if gan.data.root is not None else ensure_demo_dataset()
    if not root.is_dir():
        raise DganError(f"gan.data.root {root} is not a directory", exit_code=2)
    uri = store_uri(gan.log.tracking_uri)
    total = gan.train.iterations
    trials = gan.model_copy(
        update={
            "data": gan.data.model_copy(update={"root": root.resolve()}),
            "log": gan.log.model_copy(
                update={
                    "tracking_uri": uri,
                    "checkpoint_every": total,  # the trial asks for one at every evaluation
                    "keep_checkpoints": 2,
                    "log_model": False,  # --register-best logs the best trial's generator
                    "registered_model": None,
                    "promote_if_better": None,
                }
            ),
        }
    )
    GanJob.check_data(trials, 0, True)  # once here, so that no trial decodes every image
    if study.objective.endswith("_transfer"):
        from dgan.data import open_dataset
        from dgan.evaluation.inputs import has_transfer

        if not has_transfer(open_dataset(root), "train"):
            raise DganError(
                f"objective {study.objective}: {root} has no held-out family (split transfer) "
                "to measure it on; drop _transfer",
                exit_code=2,
            )
    return trials


def with_run_root(gan: GanConfig, directory: Path) -> GanConfig:
    """Trials' run directories go under the study's: runs/tune/NAME/gan/NNNNN-<trial>."""
    return gan.model_copy(update={"log": gan.log.model_copy(update={"run_root": directory})})


def write_study_files(study: Study, gan_trials: GanConfig) -> None:
    if not study.resume:
        atomic_write_text(study.directory / "tune.yaml", to_yaml(study.config))
        atomic_write_text(study.directory / "space.yaml", study.space.to_yaml())
        study.state.update(
            name=study.name,
            created=time.strftime("%Y-%m-%dT%H:%M:%S"),
            objective=study.objective,
            mode=study.mode,
            storage=study.storage,
            experiment=study.experiment,
            base_config=gan_trials.model_dump(mode="json"),
        )
    set_state(study, study.state.get("state", "created"))


def set_state(study: Study, state: str) -> None:
    study.state["state"] = state
    atomic_write_text(study.directory / STUDY_FILE, json.dumps(study.state, indent=2) + "\n")


def open_parent_run(study: Study, gan_trials: GanConfig):
    """The study's MLflow run; each trial's run is its child (tag mlflow.parentRunId)."""
    from dgan.tracking.tracker import Tracker

    params = {f"tune.{k}": v for k, v in flatten(study.config).items() if not k.startswith("gan")}
    params |= {f"space.{d.key}": str(d) for d in study.space.dimensions}
    params |= {"tune.objective": study.objective, "tune.mode": study.mode,
               "tune.search": study.search}  # fmt: skip
    tags = {"dgan.job": "tune", "dgan.tune": study.name, "dgan.run_dir": str(study.directory)}
    return Tracker(
        enabled=True,
        uri=gan_trials.log.tracking_uri,
        experiment=gan_trials.log.experiment,
        run_name=f"tune-{study.name}",
        params=None if study.resume else params | flatten_gan(gan_trials),
        tags=None if study.resume else tags,
        run_id=study.state.get("parent_run_id"),
    )


def flatten_gan(gan: GanConfig) -> dict[str, Any]:
    return {f"gan.{k}": v for k, v in flatten(gan).items()}


def ray_environment() -> dict[str, str]:
    """Environment for the trials' workers, set here before Ray starts them (and returned for a
    cluster's runtime_env)."""
    # Trials keep the driver's working directory; a stopped trial gets time to close its run.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local Ray needs no token
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # A trial reports (and checkpoints) at every evaluation, seconds apart in tests: Ray's
    # snapshot of the experiment after each is cheap on local storage, and says so each time.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # with verbose=0: no tables, no banner
    names = ("RAY_CHDIR_TO_TRIAL_DIR", "TUNE_FUNCTION_THREAD_TIMEOUT_S", "MLFLOW_DISABLE_TELEMETRY")
    return {k: os.environ[k] for k in names}


def start_local_ray(temp_dir: Path, gpus: int = 0) -> None:
    """A local Ray on 127.0.0.1, every CPU of this machine, no dashboard UI, its temp dir and
    logs in `temp_dir`, and the trials' output in their own log files instead of here.
    Stop it with `stop_local_ray(temp_dir)`."""
    import logging

    import ray

    ray_environment()
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        num_gpus=gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=short_temp_dir(Path(temp_dir)),
        log_to_driver=False,
        logging_level=logging.WARNING,
    )


def stop_local_ray(temp_dir: Path) -> None:
    """ray.shutdown(), and the /tmp link that short_temp_dir may have made for `temp_dir`."""
    import ray

    ray.shutdown()
    link = temp_link(Path(temp_dir))
    if link is not None and link.is_symlink():
        link.unlink()


def connect_ray(study: Study) -> bool:
    """Join or start Ray; True when this call started it (and must stop it)."""
    import ray

    env = ray_environment()
    if ray.is_initialized():
        check_cluster_resources(study)
        return False
    if study.address is not None:
        import logging

        ray.init(address=study.address, runtime_env={"env_vars": env}, log_to_driver=False,
                 logging_level=logging.WARNING)  # fmt: skip
        try:
            check_cluster_resources(study)
        except DganError:
            ray.shutdown()
            raise
        return True
    gpus = local_gpus() if study.config.gpus_per_trial > 0 else 0
    start_local_ray(study.directory / "ray-session", gpus)
    return True


def temp_link(directory: Path) -> Path | None:
    """The short /tmp path that stands for Ray's temp dir `directory` when its socket paths
    (session_.../sockets/plasma_store, about 70 characters) would pass the 107-byte limit."""
    import hashlib
    import tempfile

    if len(str(directory)) <= 36:
        return None
    digest = hashlib.sha256(str(directory).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"dgan-ray-{digest}"


def short_temp_dir(directory: Path) -> str:
    """Ray's temp dir: `directory`, through a symlink from temp_link(directory) when needed."""
    directory.mkdir(parents=True, exist_ok=True)
    link = temp_link(directory)
    if link is None:
        return str(directory)
    if link.is_symlink() and Path(os.readlink(link)) != directory:
        link.unlink()
    if not link.exists():
        link.symlink_to(directory, target_is_directory=True)
    return str(link)


def check_cluster_resources(study: Study) -> None:
    """One trial's CPUs and GPUs must fit the Ray cluster, or every trial would stay pending."""
    import ray

    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
    config = study.config
    if config.cpus_per_trial > cpus:
        raise DganError(
            f"--cpus-per-trial {config.cpus_per_trial:g}: the Ray cluster has {cpus:g} CPUs",
            exit_code=2,
        )
    if config.gpus_per_trial > gpus:
        raise DganError(
            f"--gpus-per-trial {config.gpus_per_trial:g}: the Ray cluster has {gpus:g} GPUs, "
            "so no trial could start",
            exit_code=2,
        )


def concurrency(study: Study) -> int:
    """Trials at once: --max-concurrent, else as many as the cluster's CPUs and GPUs hold."""
    import ray

    config = study.config
    if config.max_concurrent:
        return config.max_concurrent
    have = ray.cluster_resources()
    fit = int(have.get("CPU", 1) // config.cpus_per_trial)
    if config.gpus_per_trial > 0:
        fit = min(fit, int(have.get("GPU", 0) // config.gpus_per_trial))
    return max(1, min(fit, config.trials))


def trial_dirname(trial) -> str:
    """Ray's folder of a trial: its id (the default adds every parameter to the name)."""
    return trial.trial_id


def fit(study: Study, gan_trials: GanConfig, parent_run_id: str):
    """Build (or restore) the Tuner and run it; returns (ResultGrid, interrupted)."""
    from ray import tune

    from dgan.tune.progress import StudyProgress
    from dgan.tune.trainable import TrialSetup, train_trial

    config = study.config
    setup = TrialSetup(
        study=study.name,
        base=gan_trials.model_dump(mode="json"),
        space=study.space,
        objective=study.objective,
        parent_run_id=parent_run_id,
        threads=max(1, int(config.cpus_per_trial)),
        schedule_changes=config.scheduler == "pbt",
    )
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(train_trial, setup=setup), resources)
    if study.resume and tune.Tuner.can_restore(study.experiment_path):
        tuner = tune.Tuner.restore(study.experiment_path, trainable, resume_unfinished=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=study.space.ray_space(),
            tune_config=tune.TuneConfig(
                metric=study.objective,
                mode=study.mode,
                search_alg=search_algorithm(study, gan_trials, concurrency(study)),
                scheduler=scheduler(study, gan_trials),
                num_samples=config.trials,
                reuse_actors=True,  # a trial's process keeps torch and the data loaded
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=study.experiment,
                storage_path=study.storage,
                verbose=0,
                callbacks=[StudyProgress(study.objective)],  # Ray's own lines are off
                # PBT copies a top trial's latest checkpoint a moment after its report: keep a
                # few, so that a newer report cannot delete it first.
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=4 if config.scheduler == "pbt" else 1
                ),
            ),
        )

    def marker(signum, frame):  # Ray restores this handler only when its own caught Ctrl-C
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, marker)
    try:
        results = tuner.fit()
    finally:
        interrupted = signal.getsignal(signal.SIGINT) is marker
        signal.signal(signal.SIGINT, previous)
    return results, interrupted


def search_algorithm(study: Study, gan: GanConfig, at_once: int):
    """Optuna's TPE (seeded) or random sampling, `at_once` trials at a time; trial 0 may be the
    base config's values. TPE proposes from the results in so far, so it must not run ahead."""
    points = []
    if study.config.include_default:
        point = study.space.point(gan)
        if point is not None:
            points.append(point)
    if study.search == "tpe":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from ray.tune.search import ConcurrencyLimiter

        sampler = optuna.samplers.TPESampler(seed=study.config.seed)
        searcher = OptunaSearch(points_to_evaluate=points or None, sampler=sampler)
        return ConcurrencyLimiter(searcher, max_concurrent=at_once)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(
        points_to_evaluate=points or None, max_concurrent=at_once, random_state=study.config.seed
    )


def scheduler(study: Study, gan: GanConfig):
    """ASHA, PBT or FIFO, all counting time in training iterations."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    config = study.config
    if config.scheduler == "asha":
        return ASHAScheduler(
            time_attr="iteration",
            max_t=gan.train.iterations,
            grace_period=config.grace_iterations,
            reduction_factor=config.reduction_factor,
        )
    if config.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="iteration",
            perturbation_interval=config.pbt_interval,
            hyperparam_mutations=study.space.mutations(perturbable_keys(study.space)),
            quantile_fraction=config.pbt_quantile,
            resample_probability=config.pbt_resample,
            custom_explore_fn=study.space.clip,
            synch=config.pbt_synch,
        )
    return FIFOScheduler()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------
# After the study: the ranked table, the best config, MLflow and the registry
# ---------------------------------------------------------------------------------------------


def collect_rows(study: Study, results, gan_trials: GanConfig) -> list[TrialRow]:
    """Every trial, ranked: further along first (ASHA stopped the others at a lower rung), then
    by the objective at its last report; failed trials last."""
    from dgan.tune.trainable import LINEAGE_FILE, trial_run_dir

    total = gan_trials.train.iterations
    rows = []
    for result in results:
        metrics = result.metrics or {}
        # Ray names each trial's folder by its id (trial_dirname); a PBT exploit copies another
        # trial's last result, trial_id included, into the exploited trial's metrics.
        trial_id = Path(result.path).name
        iteration = int(metrics.get("iteration") or 0)
        value = metrics.get(study.objective)
        value = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
        if result.error is not None:
            outcome = "error: " + str(result.error).strip().splitlines()[-1][:80]
        elif iteration >= total:
            outcome = "finished"
        else:
            outcome = f"stopped at {iteration}"
        run_dir = trial_run_dir(study.directory, trial_id)
        exploits = []
        if run_dir is not None and (run_dir / LINEAGE_FILE).is_file():
            for record in json.loads((run_dir / LINEAGE_FILE).read_text()).get("restores", []):
                if record.get("from_trial") != trial_id:
                    source = str(record.get("from_trial", "?")).rsplit("_", 1)[-1]
                    exploits.append(f"{source}@{record['iteration']}")
        params = {k: (result.config or {}).get(k) for k in study.space.keys}
        rows.append(TrialRow(trial_id, params, iteration, value, outcome,
                             str(run_dir) if run_dir else None, exploits,
                             params == study.space.point(study.gan)))  # fmt: skip
    sign = 1.0 if study.mode == "min" else -1.0

    def rank(row: TrialRow):
        return (row.value is None, -row.iteration, sign * (row.value or 0.0), row.trial_id)

    return sorted(rows, key=rank)


def format_table(result: StudyResult, limit: int = 12) -> str:
    rows = result.rows
    keys = list(rows[0].params) if rows else []
    headers = ["rank", "trial", "iterations", result.objective] + [k.split(".")[-1] for k in keys]
    headers.append("outcome")
    body = []
    for rank, row in enumerate(rows[:limit], 1):
        value = "-" if row.value is None else f"{row.value:.4f}"
        outcome = row.outcome + (f", exploited {', '.join(row.exploits)}" if row.exploits else "")
        outcome += ", the base config" if row.base else ""
        body.append([str(rank), row.short, str(row.iteration), value,
                     *(_fmt(row.params[k]) for k in keys), outcome])  # fmt: skip
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(headers)]  # fmt: skip
    lines = [f"study {result.name}: best trials by {result.objective} ({result.mode}), "
             f"{result.scheduler}"]  # fmt: skip
    for cells in [headers, *body]:
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
        lines.append(("  " + line).rstrip())
    if len(rows) > limit:
        lines.append(f"  ... {len(rows) - limit} more in {result.directory / 'results.txt'}")
    lines.append(summary(result))
    return "\n".join(lines).rstrip()


def summary(result: StudyResult) -> str:
    rows = result.rows
    minutes, seconds = divmod(int(result.seconds), 60)
    stopped: dict[int, int] = {}
    for row in rows:
        if row.outcome.startswith("stopped"):
            stopped[row.iteration] = stopped.get(row.iteration, 0) + 1
    errors = sum(r.outcome.startswith("error") for r in rows)
    finished = sum(r.outcome == "finished" for r in rows)
    text = f"{len(rows)} trials in {minutes}:{seconds:02d}: {finished} ran all {result.total}"
    text += " iterations"
    if stopped:
        where = ", ".join(f"{n} at {it}" for it, n in sorted(stopped.items()))
        text += f", {sum(stopped.values())} stopped early ({where})"
    if errors:
        text += f", {errors} failed"
    exploits = sum(len(r.exploits) for r in rows)
    if result.scheduler == "pbt":
        text += f", {exploits} PBT exploits"
    return text


def finish_study(
    study: Study, rows: list[TrialRow], seconds: float, parent, events: Events
) -> StudyResult:
    """Write the table and the best config, close the MLflow runs, maybe register the best."""
    result = StudyResult(
        study.name, study.directory, study.objective, study.mode, rows,
        study.gan.train.iterations, seconds, None, parent.run_id, study.config.scheduler,
    )  # fmt: skip
    table = format_table(result, limit=len(rows))
    atomic_write_text(study.directory / "results.txt", table + "\n")
    best = result.best
    if best is not None:
        result.best_config = write_best_config(study, best)
        parent.log_metrics({f"best_{study.objective}": best.value}, step=best.iteration)
        parent.log_artifact(result.best_config)
    parent.log_metrics(
        {"trials": len(rows), "trials_finished": sum(r.outcome == "finished" for r in rows),
         "study_seconds": seconds},
        step=0,
    )  # fmt: skip
    parent.log_artifact(study.directory / "results.txt")
    parent.log_artifact(study.directory / "space.yaml")
    close_child_runs(study, parent, "FINISHED", rows)
    if best is not None and study.config.register_best:
        result.lines = register_best(study, best, parent)
        for line in result.lines:
            events.info(line)
    parent.finish("FINISHED")
    return result


def write_best_config(study: Study, best: TrialRow) -> Path:
    """The best trial's values on the base config as the user gave it: a GAN preset."""
    config = apply_params(study.gan, best.params)
    header = (
        f"# dgan tune study {study.name}: trial {best.trial_id}, {study.objective} "
        f"{best.value:.6g} at iteration {best.iteration} ({study.mode} is better).\n"
        f"# Searched: {', '.join(f'{k}={_fmt(v)}' for k, v in best.params.items())}\n"
        f"# Train it: dgan train gan --config {study.directory / 'best.yaml'}\n"
    )
    if best.exploits:  # PBT: what it found is a schedule; these are its last values
        header += (
            f"# PBT: the values in force at the end. The trial continued the checkpoints of "
            f"{', '.join(best.exploits)} (trial@iteration), each under perturbed values, so "
            "training these from scratch is not the run the study scored.\n"
        )
    path = study.directory / "best.yaml"
    atomic_write_text(path, header + to_yaml(config))
    return path


def close_child_runs(study: Study, parent, status: str, rows: list[TrialRow] | None = None):
    """Give each trial's MLflow run its rank, final objective and outcome; close runs a stopped
    trial left open."""
    client = parent.client
    runs = client.search_runs(
        [client.get_run(parent.run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
        max_results=10_000,
    )
    by_trial = {r.data.tags.get("dgan.tune.trial"): r for r in runs}
    for rank, row in enumerate(rows or [], 1):
        run = by_trial.get(row.trial_id)
        if run is None:
            continue
        client.set_tag(run.info.run_id, "dgan.tune.rank", str(rank))
        client.set_tag(run.info.run_id, "dgan.tune.outcome", row.outcome)
        if row.value is not None:
            client.log_metric(run.info.run_id, "tune_objective", row.value, step=row.iteration)
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED" if status == "KILLED" else
                                  "FINISHED")  # fmt: skip


def register_best(study: Study, best: TrialRow, parent) -> list[str]:
    """Log the best trial's generator to its MLflow run and register it; with
    promote_if_better, move @champion only when the objective improves on the champion's."""
    from dgan.tracking import PYFUNC_DIR
    from dgan.tracking.registry import gan_key_metrics, register_run_model
    from dgan.tracking.tracker import Tracker

    generator = Path(best.run_dir or "") / "generator"
    if not (generator / "model.safetensors").is_file():
        return [
            f"not registered: the best trial {best.short} stopped at iteration {best.iteration} "
            "without exporting a generator; train best.yaml with 'dgan train gan' instead"
        ]
    run = parent.client.search_runs(
        [parent.client.get_run(parent.run_id).info.experiment_id],
        filter_string=f"tags.`dgan.tune.trial` = '{best.trial_id}'",
    )
    gan = study.gan
    log = gan.log.model_copy(
        update={
            "registered_model": gan.log.registered_model or "defect-gan",
            "promote_if_better": study.objective if study.config.promote_if_better else None,
            "promote_mode": study.mode,
        }
    )
    tracker = Tracker(
        enabled=True, uri=parent.uri, experiment=gan.log.experiment, run_name=best.trial_id,
        run_id=run[0].info.run_id if run else None,
    )  # fmt: skip
    uri = tracker.log_code_model(
        "generator", PYFUNC_DIR / "pyfunc_generator.py", {"generator": generator}
    )
    registration = register_run_model(tracker, uri, log, gan_key_metrics(tracker.latest_metrics()))
    tracker.finish("FINISHED")
    return registration.lines() if registration is not None else []
