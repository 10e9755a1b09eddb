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
    from dgan.train.checkpoint import list_checkpoints

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

    from dgan.tracking import check_reachable, resolve_tracking_uri

    tracking = resolve_tracking_uri(tracking_uri)
    check_reachable(tracking)
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    uri = _pin_alias(uri, tracking)
    key = hashlib.sha256(f"{tracking}\n{uri}".encode()).hexdigest()[:24]
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
        raise DganError(
            f"model URI {uri} does not resolve at {tracking}: {_first_line(err)}. "
            "List what exists with 'dgan models list'; check --tracking-uri / MLFLOW_TRACKING_URI."
        ) from None
    if find_model_dir(tmp) is None:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DganError(f"{uri} is an MLflow model, but not one of dgan's (no model.safetensors)")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return find_model_dir(final)


def _pin_alias(uri: str, tracking: str) -> str:
    """models:/NAME@alias -> models:/NAME/VERSION, so that the cache follows the alias."""
    if not uri.startswith("models:/") or "@" not in uri:
        return uri
    import mlflow

    name, alias = uri.removeprefix("models:/").split("@", 1)
    try:
        version = mlflow.MlflowClient(tracking).get_model_version_by_alias(name, alias)
    except Exception as err:  # noqa: BLE001
        raise DganError(
            f"model URI {uri} does not resolve at {tracking}: {_first_line(err)}. "
            "List versions and aliases with 'dgan models list'."
        ) from None
    return f"models:/{name}/{version.version}"


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


def load_generator_from(source: ModelSource, device: str = "cpu"):
    """(G in eval mode, its GanConfig, its classes); a checkpoint gives its EMA weights."""
    import yaml

    from dgan.config import GanConfig
    from dgan.models.export import load_generator

    if source.directory is not None:
        return load_generator(source.directory, device)
    from dgan.models import build_gan
    from dgan.train.checkpoint import load_checkpoint

    config_path = source.checkpoint.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise DganError(f"checkpoint {source.checkpoint} has no config.yaml two levels up")
    config = GanConfig.model_validate(yaml.safe_load(config_path.read_text()))
    state, _ = load_checkpoint(source.checkpoint)
    if "G" not in state:
        raise DganError(f"{source.checkpoint} is not a Defect-GAN checkpoint (no generator)")
    classes = list(state["classes"])
    G, _ = build_gan(config, len(classes))
    G.load_state_dict(state["G_ema"] or state["G"])
    return G.to(device).eval(), config, classes


def load_inspector_from(source: ModelSource, device: str = "cpu"):
    """(inspector in eval mode, its InspectorConfig, its classes) from a directory or checkpoint."""
    from dgan.models.inspector import load_inspector

    if source.directory is not None:
        return load_inspector(source.directory, device)
    import yaml

    from dgan.config import InspectorConfig
    from dgan.models.inspector import build_inspector
    from dgan.train.checkpoint import load_checkpoint

    config_path = source.checkpoint.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise DganError(f"checkpoint {source.checkpoint} has no config.yaml two levels up")
    state, _ = load_checkpoint(source.checkpoint)
    if "model" not in state or "classes" not in state:
        raise DganError(f"{source.checkpoint} is not an inspector checkpoint (no model weights)")
    config = InspectorConfig.model_validate(yaml.safe_load(config_path.read_text()))
    classes = list(state["classes"])
    source_head = any(k.startswith("source_classifier.") for k in state["model"])
    model = build_inspector(config, len(classes), source_head, load_pretrained=False)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config, classes
