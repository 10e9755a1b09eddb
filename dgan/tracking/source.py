"""Where a trained model comes from: a local directory, a run, a checkpoint or an MLflow URI.

Every command that takes a model accepts the same specs:

    runs/gan/00003-demo                  a run: its generator/, else its newest checkpoint
    runs/gan/00003-demo/checkpoints/iter-00004000   one checkpoint (its EMA weights)
    runs/gan/00003-demo/generator        an exported model directory (model.safetensors ...)
    models:/defect-gan@champion          a registered model by alias or version
    models:/m-0123abcd / runs:/RUN_ID/generator   a logged model

MLflow URIs are downloaded once into a cache keyed by the URI and read like a local directory:
only safetensors, YAML and JSON are read, never a pickle.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from dgan.errors import DganError

MODEL_FILES = ("model.safetensors", "config.yaml", "classes.json")
CACHE_ENV = "DGAN_MODEL_CACHE"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: either an exported directory or a training checkpoint."""

    uri: str  # what the user named, made absolute for paths: recorded in manifests
    directory: Path | None = None  # holds MODEL_FILES
    checkpoint: Path | None = None  # holds state.pt; config.yaml is two levels up

    @property
    def identity(self) -> str:
        """A content fingerprint: the same weights give the same identity wherever they live."""
        weights = (
            self.directory / "model.safetensors" if self.directory else self.checkpoint / "state.pt"
        )
        digest = hashlib.sha256()
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()[:16]


def is_mlflow_uri(spec: str) -> bool:
    return spec.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def find_model_dir(root: Path) -> Path | None:
    """The directory holding MODEL_FILES: `root` itself or the shallowest one below it."""
    root = Path(root)
    if all((root / n).is_file() for n in MODEL_FILES):
        return root
    found = sorted(root.rglob("model.safetensors"), key=lambda p: len(p.parts))
    for weights in found:
        if all((weights.parent / n).is_file() for n in MODEL_FILES):
            return weights.parent
    return None


def resolve_local(path: Path, kind: str) -> ModelSource:
    """A model directory, run directory or checkpoint on disk (`kind` names its subdirectory)."""
    from dgan.run.checkpoint import list_checkpoints

    path = Path(path)
    if not path.exists():
        raise DganError(f"model {path} does not exist; give a run directory, checkpoint or URI")
    if all((path / n).is_file() for n in MODEL_FILES):
        return ModelSource(str(path.resolve()), directory=path)
    if all((path / kind / n).is_file() for n in MODEL_FILES):
        return ModelSource(str((path / kind).resolve()), directory=path / kind)
    if (path / "state.pt").is_file():
        return ModelSource(str(path.resolve()), checkpoint=path)
    if ckpts := list_checkpoints(path):
        return ModelSource(str(ckpts[-1].resolve()), checkpoint=ckpts[-1])
    raise DganError(
        f"{path} is not a model: no {kind}/ with {', '.join(MODEL_FILES)}, no state.pt and no "
        f"checkpoints/. Give a run directory under runs/, a checkpoint, or an MLflow model URI."
    )


def latest_run_model(run_root: Path, job: str) -> ModelSource:
    """The newest run of `job` that has an exported model or a checkpoint."""
    runs = sorted((Path(run_root) / job).glob("[0-9]*-*"), reverse=True)
    for run in runs:
        try:
            return resolve_local(run, "generator" if job == "gan" else job)
        except DganError:
            continue
    raise DganError(
        f"no trained model under {Path(run_root) / job}. Train one with 'dgan train {job}', "
        "or name one with a run directory or an MLflow URI (models:/NAME@champion)."
    )


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "dgan" / "models"))


def download_mlflow_model(uri: str, tracking_uri: str | None = None) -> Path:
    """Download an MLflow model URI once; return the directory holding MODEL_FILES."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from dgan.tracking.tracker import require_store, store_uri

    tracking = store_uri(tracking_uri)
    require_store(tracking)
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    uri, identity = _pin(uri, tracking)
    key = hashlib.sha256(f"{tracking}\n{uri}\n{identity}".encode()).hexdigest()[:24]
    final = cache_root() / key
    if final.is_dir() and (found := find_model_dir(final)):
        return found
    tmp = final.with_name(f".tmp-{key}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp))
    except Exception as err:  # noqa: BLE001 - any MLflow failure means the URI does not resolve
        shutil.rmtree(tmp, ignore_errors=True)
        from dgan.tracking.registry import explain_model_uri

        raise DganError(
            explain_model_uri(uri, tracking)
            or f"model URI {uri} does not resolve at {tracking}: {_first_line(err)}. "
            "List what exists with 'dgan models list'; check --tracking-uri / MLFLOW_TRACKING_URI."
        ) from None
    if find_model_dir(tmp) is None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DganError(f"{uri} is an MLflow model, but not one of dgan's (no model.safetensors)")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return find_model_dir(final)


def _pin(uri: str, tracking: str) -> tuple[str, str]:
    """(URI, identity): models:/NAME@alias becomes models:/NAME/VERSION, so that the cache follows
    the alias, and a registered version is identified by its logged model, so that a store made
    anew under the same path cannot serve a stale copy. Other URIs are their own identity."""
    if not uri.startswith("models:/") or uri.startswith("models:/m-"):
        return uri, ""
    from dgan.tracking.registry import get_alias, get_version, registry_client

    rest = uri.removeprefix("models:/").strip("/")
    client = registry_client(tracking)
    if "@" in rest:
        name, alias = rest.split("@", 1)
        version = get_alias(client, name, alias)  # names what exists if absent
    elif "/" in rest:
        name, number = rest.rsplit("/", 1)
        version = get_version(client, name, number)
    else:
        return uri, ""
    pinned = f"models:/{name}/{version.version}"
    return pinned, getattr(version, "model_id", None) or version.source


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def resolve_model(
    spec: str | Path | None,
    job: str,
    run_root: Path = Path("runs"),
    tracking_uri: str | None = None,
) -> ModelSource:
    """Resolve any model spec (see the module doc) for `job` ("gan" or "inspector")."""
    if spec is None:
        return latest_run_model(run_root, job)
    spec = str(spec)
    if is_mlflow_uri(spec):
        return ModelSource(spec, directory=download_mlflow_model(spec, tracking_uri))
    return resolve_local(Path(spec), "generator" if job == "gan" else job)


def read_model_config(source: ModelSource, job: str):
    """The config a model was trained with, refusing a model of the other job by name."""
    import yaml
    from pydantic import ValidationError

    from dgan.config import JOB_CONFIGS

    if source.directory is not None:
        path = source.directory / "config.yaml"
    else:
        path = source.checkpoint.parent.parent / "config.yaml"
    if not path.is_file():
        raise DganError(f"{source.uri} has no config.yaml ({path}); it was not written by dgan")
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return JOB_CONFIGS[job].model_validate(data)
    except ValidationError as err:
        names = {"gan": "a Defect-GAN generator", "inspector": "a defect inspector"}
        other = "inspector" if job == "gan" else "gan"
        extra = set(data) - set(JOB_CONFIGS[job].model_fields)
        if extra and extra <= set(JOB_CONFIGS[other].model_fields):
            raise DganError(
                f"{source.uri} is {names[other]}, not {names[job]}; give {names[job]}'s run "
                "directory or model URI.",
                exit_code=2,
            ) from None
        raise DganError(f"{path} does not fit this version of dgan: {err}") from None


def load_generator_from(source: ModelSource, device: str = "cpu"):
    """(G in eval mode, its GanConfig, its classes); a checkpoint gives its EMA weights."""
    from dgan.models.export import load_generator

    config = read_model_config(source, "gan")
    if source.directory is not None:
        return load_generator(source.directory, device)
    from dgan.models import build_gan
    from dgan.run.checkpoint import load_checkpoint

    state, _ = load_checkpoint(source.checkpoint)
    if "G" not in state:
        raise DganError(f"{source.checkpoint} is not a Defect-GAN checkpoint (no generator)")
    classes = list(state["classes"])
    G, _ = build_gan(config, classes)
    G.load_state_dict(state["G_ema"] or state["G"])
    return G.to(device).eval(), config, classes


def load_inspector_from(source: ModelSource, device: str = "cpu"):
    """(inspector in eval mode, its config, its classes) from a model directory or checkpoint."""
    from dgan.models.inspector import build_inspector, load_inspector

    config = read_model_config(source, "inspector")
    if source.directory is not None:
        return load_inspector(source.directory, device)
    from dgan.run.checkpoint import load_checkpoint

    state, _ = load_checkpoint(source.checkpoint)
    if "model" not in state or "classes" not in state:
        raise DganError(f"{source.checkpoint} is not a defect inspector checkpoint (no model)")
    classes = list(state["classes"])
    source_head = any(k.startswith("source_classifier.") for k in state["model"])
    model = build_inspector(config, len(classes), source_head, load_pretrained=False)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, classes
