"""The MLflow model registry: versions of `defect-gan` and `defect-inspector`, and their aliases.

A finished training run that logged its model registers it as a new version of the configured
name (`log.registered_model`). Each version carries tags that say what it is and how good it was:

    <metric>            key metrics of the run: the inspector's val and test multi-target accuracy
                        of the exported epoch; the GAN's final losses and any FID/KID it logged
    dgan.job            gan | inspector
    dgan.run_dir        the run directory
    dgan.config_hash    the training settings (see dgan.tracking.run_tags)
    dgan.dataset_hash   the data's file list and sizes (dgan.data.dataset_hash)

`promote_if_better` moves an alias (`champion`) to a new version only when a chosen metric beats
the current holder's value of it. Models are loaded back through dgan.tracking.source, which reads
the safetensors weights: registering and loading unpickle nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from dgan.errors import DganError
from dgan.metrics.registry import require_direction

DEFAULT_ALIAS = "champion"
# Final losses of a GAN run worth a version tag; FID and KID metrics are added when logged.
GAN_LOSSES = ("d_adv", "d_total", "g_adv", "g_cls_f", "g_rec", "g_total")
# Table columns come in this order; other numeric tags follow alphabetically.
PREFERRED_COLUMNS = (
    "fid",
    "fid_inspector",
    "kid",
    "kid_inspector",
    "val_multi_target_accuracy",
    "test_multi_target_accuracy",
    "test_macro_f1",
    "g_total",
    "d_total",
)
MAX_COLUMNS = 6


def gan_key_metrics(run_metrics: dict[str, float]) -> dict[str, float]:
    """The GAN metrics that go onto a version: final losses, and every FID/KID the run logged."""
    keep = set(GAN_LOSSES)
    return {k: v for k, v in run_metrics.items() if k in keep or k.startswith(("fid", "kid"))}


# ---------------------------------------------------------------------------------------------
# The client and error messages
# ---------------------------------------------------------------------------------------------


def registry_client(tracking_uri: str | None = None, existing: bool = True):
    """An MlflowClient whose registry is the tracking store, after checking that the server
    answers and, with `existing`, that a SQLite store is there to read (not created empty)."""
    import os

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow

    from dgan.tracking.tracker import (
        absolute_store_uri,
        check_reachable,
        require_store,
        resolve_tracking_uri,
    )

    uri = resolve_tracking_uri(tracking_uri)
    if existing:
        require_store(uri)
    else:
        check_reachable(uri)
    # An explicit registry URI: a process-wide mlflow.set_registry_uri must not redirect us.
    uri = absolute_store_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _not_found(err: Exception) -> bool:
    code = getattr(err, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def registered_names(client) -> list[str]:
    """Every registered model name in the store, sorted."""
    return sorted(m.name for m in client.search_registered_models(max_results=1000))


def get_model(client, name: str):
    """The registered model `name`; DganError listing the names that exist when it does not."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException as err:
        if not _not_found(err):
            raise DganError(f"the registry at {client.tracking_uri} failed: {err}") from None
    names = registered_names(client)
    known = f"registered models: {', '.join(names)}" if names else "no model is registered yet"
    raise DganError(
        f"no registered model {name!r} at {client.tracking_uri}; {known}. Finished training runs "
        "register theirs (log.registered_model); check --tracking-uri / MLFLOW_TRACKING_URI.",
        exit_code=2,
    )


def _versions(client, name: str) -> list:
    found = client.search_model_versions(f"name='{_quote(name)}'")
    return sorted(found, key=lambda v: int(v.version))


def _quote(name: str) -> str:
    return name.replace("\\", "\\\\").replace("'", "\\'")


def get_version(client, name: str, version: str | int):
    """One version of `name`; DganError listing the versions and aliases that exist."""
    from mlflow.exceptions import MlflowException

    model = get_model(client, name)
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as err:
        if not _not_found(err):
            raise DganError(f"the registry at {client.tracking_uri} failed: {err}") from None
    raise DganError(
        f"{name} has no version {version}; it has {_inventory(client, model)}.", exit_code=2
    )


def get_alias(client, name: str, alias: str):
    """The version that `name@alias` points to; DganError listing the aliases that exist."""
    from mlflow.exceptions import MlflowException

    model = get_model(client, name)
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if not _not_found(err):
            raise DganError(f"the registry at {client.tracking_uri} failed: {err}") from None
    raise DganError(
        f"{name} has no alias {alias!r}; it has {_inventory(client, model)}. Set one with "
        f"'dgan models promote {name} VERSION --alias {alias}'.",
        exit_code=2,
    )


def _inventory(client, model) -> str:
    versions = [v.version for v in _versions(client, model.name)]
    aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(model.aliases.items())) or "none"
    listed = ", ".join(str(v) for v in versions) or "none"
    return f"versions {listed}; aliases {aliases}"


def explain_model_uri(uri: str, tracking_uri: str | None = None) -> str | None:
    """Why a models:/ URI does not resolve, naming what exists; None when it is not the registry's.

    `models:/NAME@alias` and `models:/NAME/VERSION` are checked against the registry;
    `models:/m-...` against the logged models.
    """
    if not uri.startswith("models:/"):
        return None
    rest = uri.removeprefix("models:/").strip("/")
    client = registry_client(tracking_uri)
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            get_alias(client, name, alias)
        elif "/" in rest:
            name, version = rest.rsplit("/", 1)
            get_version(client, name, version)
        elif rest.startswith("m-"):
            client.get_logged_model(rest)
        else:
            get_model(client, rest)
            return (
                f"{uri} names a registered model but no version: use models:/{rest}/VERSION "
                f"or models:/{rest}@{DEFAULT_ALIAS}"
            )
    except DganError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - the logged model lookup's own message is clear
        return f"{uri} does not resolve at {client.tracking_uri}: {str(err).splitlines()[0]}"
    return None


# ---------------------------------------------------------------------------------------------
# Registering and promoting
# ---------------------------------------------------------------------------------------------


def register(
    model_uri: str,
    name: str,
    tags: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    run_id: str | None = None,
) -> str:
    """Register a logged model (models:/m-..., runs:/...) as a new version of `name`.

    Creates `name` when it does not exist. Returns the new version number.
    """
    from mlflow.exceptions import MlflowException

    client = registry_client(tracking_uri, existing=False)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, description="Registered by dgan; see each version's tags for its run."
        )
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    try:
        version = client.create_model_version(
            name,
            source=model_uri,
            run_id=run_id,
            tags={k: str(v) for k, v in (tags or {}).items()},
            model_id=model_id,
        )
    except MlflowException as err:
        raise DganError(
            f"could not register {model_uri} as a version of {name} at {client.tracking_uri}: "
            f"{str(err).splitlines()[0]}"
        ) from None
    return str(version.version)


def promote(
    name: str, version: str | int, alias: str = DEFAULT_ALIAS, tracking_uri: str | None = None
) -> str | None:
    """Point `name@alias` at `version`. Returns the version it pointed to before, or None."""
    from mlflow.exceptions import MlflowException

    client = registry_client(tracking_uri)
    model = get_model(client, name)
    get_version(client, name, version)
    previous = model.aliases.get(alias)
    try:
        client.set_registered_model_alias(name, alias, str(version))
    except MlflowException as err:
        raise DganError(f"cannot set alias {alias!r}: {str(err).splitlines()[0]}", 2) from None
    return None if previous is None else str(previous)


def version_metric(client, version, metric: str) -> float | None:
    """`metric` of a version: its tag when it has one, else the final value logged by its run."""
    raw = version.tags.get(metric)
    if raw is None and version.run_id:
        try:
            raw = client.get_run(version.run_id).data.metrics.get(metric)
        except Exception:  # noqa: BLE001 - a deleted run simply has no value
            raw = None
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


@dataclass
class Promotion:
    """What `promote_if_better` decided, and why, in words for the run's output."""

    promoted: bool
    message: str
    previous: str | None = None  # the alias's version before


def promote_if_better(
    name: str,
    version: str | int,
    metric: str,
    mode: Literal["min", "max"] | None = None,
    alias: str = DEFAULT_ALIAS,
    tracking_uri: str | None = None,
) -> Promotion:
    """Move `name@alias` to `version` only when `metric` improves on the alias holder's value.

    No holder yet: promote. A tie, a worse value, or a value that cannot be compared: keep the
    holder. `mode` (min or max) defaults to the metric's registered direction.
    """
    mode = require_direction(metric, mode)
    client = registry_client(tracking_uri)
    version = str(version)
    new = get_version(client, name, version)
    value = version_metric(client, new, metric)
    model = client.get_registered_model(name)
    holder = model.aliases.get(alias)
    here = f"{name} version {version}"
    if value is None:
        return Promotion(
            False,
            f"{here} not promoted to @{alias}: its run logged no {metric} "
            f"({_available(client, new)})",
            None if holder is None else str(holder),
        )
    if holder is None:
        client.set_registered_model_alias(name, alias, version)
        return Promotion(
            True, f"{here} promoted to @{alias}: no {alias} yet ({metric} {value:.6g})"
        )
    holder = str(holder)
    if holder == version:
        return Promotion(True, f"{here} is already @{alias}", holder)
    current = version_metric(client, client.get_model_version(name, holder), metric)
    if current is None:
        return Promotion(
            False,
            f"{here} not promoted: @{alias} (version {holder}) has no {metric} to compare with; "
            f"promote by hand with 'dgan models promote {name} {version} --alias {alias}'",
            holder,
        )
    better = value < current if mode == "min" else value > current
    relation = ("<" if value < current else ">" if value > current else "=") + f" {current:.6g}"
    direction = "lower" if mode == "min" else "higher"
    if better:
        client.set_registered_model_alias(name, alias, version)
        return Promotion(
            True,
            f"{here} promoted to @{alias}: {metric} {value:.6g} {relation} of version {holder} "
            f"({direction} is better)",
            holder,
        )
    return Promotion(
        False,
        f"{here} not promoted: {metric} {value:.6g} {relation} of @{alias} version {holder} "
        f"does not improve on it ({direction} is better)",
        holder,
    )


def _available(client, version) -> str:
    names = sorted({*_metric_tags(version.tags)})
    if version.run_id:
        with contextlib.suppress(Exception):  # a deleted run has no metrics to offer
            names = sorted({*names, *client.get_run(version.run_id).data.metrics})
    return "it has " + ", ".join(names) if names else "it has no metrics"


@dataclass
class Registration:
    """The outcome of registering a finished run's model."""

    name: str
    version: str
    promotion: Promotion | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def status_fields(self) -> dict[str, Any]:
        """What status.json records of it."""
        fields: dict[str, Any] = {"registered_model": self.name, "registered_version": self.version}
        if self.promotion is not None:
            fields["promoted"] = self.promotion.promoted
        return fields

    def lines(self) -> list[str]:
        out = [f"registered {self.uri}"]
        if self.promotion is not None:
            out.append(self.promotion.message)
        return out


def register_run_model(
    tracker, model_uri: str, log, metrics: dict[str, float]
) -> Registration | None:
    """Register a finished run's logged model as `log.registered_model`, then maybe promote it.

    `tracker` is the run's dgan.tracking.Tracker; the version's tags are `metrics` and the
    run's dgan.* tags. `log` is the job's log config (registered_model, promote_if_better,
    promote_mode). Returns None when registration is off.
    """
    if not log.registered_model or not model_uri:
        return None
    run_tags = tracker.client.get_run(tracker.run_id).data.tags
    tags: dict[str, Any] = {k: v for k, v in run_tags.items() if k.startswith("dgan.")}
    tags |= {k: f"{v:.6g}" for k, v in metrics.items() if math.isfinite(v)}
    metric = log.promote_if_better
    if metric and metric not in tags:  # the compared value stays with the version
        value = tracker.latest_metrics().get(metric)
        if value is not None:
            tags[metric] = f"{value:.6g}"
    version = register(model_uri, log.registered_model, tags, tracker.uri, tracker.run_id)
    promotion = None
    if metric:
        promotion = promote_if_better(
            log.registered_model, version, metric, log.promote_mode, DEFAULT_ALIAS, tracker.uri
        )
    return Registration(log.registered_model, version, promotion)


# ---------------------------------------------------------------------------------------------
# Listing
# ---------------------------------------------------------------------------------------------


@dataclass
class VersionRow:
    """One registered version, as `dgan models list` shows it."""

    name: str
    version: str
    aliases: list[str]
    created: str  # ISO 8601, UTC
    run_id: str | None
    run_dir: str | None
    source: str
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _metric_tags(tags: dict[str, str]) -> dict[str, float]:
    out = {}
    for key, raw in tags.items():
        if key.startswith(("dgan.", "mlflow.")):
            continue
        try:
            out[key] = float(raw)
        except ValueError:
            continue
    return out


def list_versions(name: str | None = None, tracking_uri: str | None = None) -> list[VersionRow]:
    """Every version of `name` (or of every registered model), oldest first."""
    client = registry_client(tracking_uri)
    models = [get_model(client, name)] if name else [client.get_registered_model(n) for n in
                                                      registered_names(client)]  # fmt: skip
    rows = []
    for model in models:
        by_version: dict[str, list[str]] = {}
        for alias, v in model.aliases.items():
            by_version.setdefault(str(v), []).append(alias)
        for v in _versions(client, model.name):
            created = datetime.datetime.fromtimestamp(v.creation_timestamp / 1000, datetime.UTC)
            rows.append(
                VersionRow(
                    name=model.name,
                    version=str(v.version),
                    aliases=sorted(by_version.get(str(v.version), [])),
                    created=created.isoformat(timespec="seconds"),
                    run_id=v.run_id,
                    run_dir=v.tags.get("dgan.run_dir"),
                    source=v.source,
                    metrics=_metric_tags(v.tags),
                    tags=dict(v.tags),
                )
            )
    return rows


def format_versions(rows: list[VersionRow]) -> str:
    """One table per registered model: version, aliases, creation time, run and key metrics."""
    from pathlib import PurePath

    from dgan.report import text_table

    lines: list[str] = []
    for name in dict.fromkeys(r.name for r in rows):
        mine = [r for r in rows if r.name == name]
        present = {k for r in mine for k in r.metrics}
        columns = [c for c in PREFERRED_COLUMNS if c in present]
        columns += sorted(present - set(columns))
        hidden = len(columns) - MAX_COLUMNS
        columns = columns[:MAX_COLUMNS]
        table = [
            [r.version, " ".join(f"@{a}" for a in r.aliases) or "-",
             r.created.replace("T", " ")[:16],
             PurePath(r.run_dir).name if r.run_dir else (r.run_id or "-")[:12],
             *(f"{r.metrics[c]:.4g}" if c in r.metrics else "-" for c in columns)]
            for r in mine
        ]  # fmt: skip
        lines.append(f"{name} ({len(mine)} version{'s' * (len(mine) != 1)})")
        lines += text_table(["version", "aliases", "created (UTC)", "run", *columns], table)
        if hidden > 0:
            lines.append(f"  ({hidden} more metric tags: see --json)")
    return "\n".join(lines)
