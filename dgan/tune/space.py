"""Search spaces: which keys of the Defect-GAN config a study varies, and how.

A space maps dotted config keys to a distribution. The built-in spaces are log-uniform over a
factor of 4 either side of the paper's values; a YAML file (`--space FILE.yaml`) may name any key:

    loss.lambda_rec: {loguniform: [1.25, 20]}      # low < high, both > 0
    train.lr_g: {uniform: [1.0e-4, 4.0e-4]}        # low < high
    train.n_critic: {int: [3, 6]}                  # whole numbers, both ends included
    generator.upsample: {choice: [nearest, transpose]}

Every key, range and value is checked against the trials' base config before Ray starts: the
key must exist, the range must hold values, and the config must be valid at both ends of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dgan.config import GanConfig, flatten
from dgan.errors import DganError

DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")
SPREAD = 4.0  # the built-in spaces reach a factor of 4 below and above the paper's value

# The paper's loss weights (Sec. 3.1): lambda_cls^r in D's objective (Eq. 11); lambda_cls^f,
# lambda_rec, lambda_sd-cyc and lambda_sd-con in G's (Eq. 12). Sec. 4.1 sets them to 2/5/5/5/1.
PAPER_LOSS_WEIGHTS = {
    "loss.lambda_cls_r": 2.0,  # Eq. 11
    "loss.lambda_cls_f": 5.0,  # Eq. 12
    "loss.lambda_rec": 5.0,  # Eq. 12
    "loss.lambda_sd_cyc": 5.0,  # Eq. 12
    "loss.lambda_sd_con": 1.0,  # Eq. 12
}
# Sec. 4.1: Adam with lr 2e-4 for G and D.
PAPER_LEARNING_RATES = {"train.lr_g": 2e-4, "train.lr_d": 2e-4}


@dataclass(frozen=True)
class Dimension:
    """One searched key: `kind` is uniform, loguniform or int over (low, high), or choice."""

    key: str
    kind: str
    values: tuple[Any, ...]  # (low, high), or the choices

    def domain(self):
        """The Ray Tune domain that samples it."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        low, high = self.values
        if self.kind == "int":
            return tune.randint(low, high + 1)  # Ray's upper end is exclusive
        return (tune.loguniform if self.kind == "loguniform" else tune.uniform)(low, high)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        low, high = self.values
        return isinstance(value, int | float) and low <= value <= high

    def clip(self, value: Any) -> Any:
        """`value` moved into the range (PBT's x0.8 / x1.2 perturbations may leave it)."""
        if self.kind == "choice":
            return value
        low, high = self.values
        clipped = min(max(value, low), high)
        return int(round(clipped)) if self.kind == "int" else float(clipped)

    def __str__(self) -> str:
        return f"{self.kind}({', '.join(f'{v:g}' if _number(v) else str(v) for v in self.values)})"


@dataclass(frozen=True)
class SearchSpace:
    """The searched keys of a study, and the name it was asked by (losses, optim, all, a file)."""

    name: str
    dimensions: tuple[Dimension, ...]

    @property
    def keys(self) -> list[str]:
        return [d.key for d in self.dimensions]

    def ray_space(self) -> dict[str, Any]:
        """Ray Tune's param_space: flat, keyed by the dotted config keys."""
        return {d.key: d.domain() for d in self.dimensions}

    def mutations(self, keys: tuple[str, ...]) -> dict[str, Any]:
        """PBT's hyperparam_mutations: the dimensions whose keys are in `keys`."""
        return {d.key: d.domain() for d in self.dimensions if d.key in keys}

    def clip(self, params: dict[str, Any]) -> dict[str, Any]:
        """`params` with every searched value moved into its range."""
        out = dict(params)
        for d in self.dimensions:
            if d.key in out:
                out[d.key] = d.clip(out[d.key])
        return out

    def point(self, config: GanConfig) -> dict[str, Any] | None:
        """The config's own values of the searched keys, or None when one lies outside."""
        values = flatten(config)
        point = {d.key: values[d.key] for d in self.dimensions}
        return point if all(d.contains(point[d.key]) for d in self.dimensions) else None

    def to_yaml(self) -> str:
        """The space in the YAML format this module reads."""
        data = {d.key: {d.kind: list(d.values)} for d in self.dimensions}
        return yaml.safe_dump(data, sort_keys=False)

    def describe(self) -> str:
        return ", ".join(f"{d.key} ~ {d}" for d in self.dimensions)


def apply_params(base: GanConfig, params: dict[str, Any]) -> GanConfig:
    """`base` with the dotted keys of `params` set; DganError when the result is invalid."""
    from pydantic import ValidationError

    from dgan.config import format_validation_error

    data = base.model_dump(mode="json")
    for key, value in params.items():
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node[section]
        node[name] = value
    try:
        return GanConfig.model_validate(data)
    except ValidationError as err:
        raise DganError(format_validation_error(GanConfig, err), exit_code=2) from None


def _log_around(values: dict[str, float]) -> tuple[Dimension, ...]:
    return tuple(Dimension(k, "loguniform", (v / SPREAD, v * SPREAD)) for k, v in values.items())


BUILTIN = {
    "losses": _log_around(PAPER_LOSS_WEIGHTS),
    "optim": _log_around(PAPER_LEARNING_RATES),
    "all": _log_around(PAPER_LOSS_WEIGHTS | PAPER_LEARNING_RATES),
}


def load_space(spec: str, base: GanConfig) -> SearchSpace:
    """A built-in space by name (losses, optim, all) or a YAML file, checked against `base`.

    DganError (exit code 2) names the file, the key and what is wrong with it.
    """
    if spec in BUILTIN:
        space = SearchSpace(spec, BUILTIN[spec])
    else:
        path = Path(spec)
        if not path.is_file():
            raise DganError(
                f"--space {spec!r} is neither a built-in space ({', '.join(BUILTIN)}) nor a YAML "
                "file",
                exit_code=2,
            )
        space = SearchSpace(str(path), _read_space_file(path))
    check_space(space, base)
    return space


def _read_space_file(path: Path) -> tuple[Dimension, ...]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise DganError(f"{path} is not valid YAML: {err}", exit_code=2) from None
    if not isinstance(data, dict) or not data:
        raise DganError(
            f"{path}: a search space is a mapping of config keys to one distribution each, e.g. "
            "'loss.lambda_rec: {loguniform: [1.25, 20]}'",
            exit_code=2,
        )
    return tuple(_parse_dimension(str(key), spec, path) for key, spec in data.items())


def _parse_dimension(key: str, spec: Any, where: Path) -> Dimension:
    here = f"{where}: {key}"
    if not isinstance(spec, dict) or len(spec) != 1:
        raise DganError(
            f"{here}: give one distribution as {{KIND: VALUES}}, KIND one of "
            f"{', '.join(DISTRIBUTIONS)}; got {spec!r}",
            exit_code=2,
        )
    kind, values = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise DganError(
            f"{here}: unknown distribution {kind!r}; use {', '.join(DISTRIBUTIONS)}", exit_code=2
        )
    if not isinstance(values, list) or not values:
        raise DganError(f"{here}: {kind} needs a list of values, got {values!r}", exit_code=2)
    if kind == "choice":
        if len(set(map(repr, values))) != len(values):
            raise DganError(f"{here}: choice lists a value twice: {values}", exit_code=2)
        return Dimension(key, kind, tuple(values))
    if len(values) != 2 or not all(_number(v) for v in values):
        raise DganError(f"{here}: {kind} needs [low, high] as numbers, got {values}", exit_code=2)
    low, high = values
    if kind == "int" and not all(float(v).is_integer() for v in values):
        raise DganError(f"{here}: int needs whole numbers, got {values}", exit_code=2)
    if not low < high:
        raise DganError(
            f"{here}: the range [{low}, {high}] is {'empty' if low == high else 'inverted'}; "
            "give [low, high] with low below high",
            exit_code=2,
        )
    if kind == "loguniform" and low <= 0:
        raise DganError(f"{here}: loguniform needs low > 0, got {low}", exit_code=2)
    if kind == "int":
        return Dimension(key, kind, (int(low), int(high)))
    return Dimension(key, kind, (float(low), float(high)))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_space(space: SearchSpace, base: GanConfig) -> None:
    """Each key exists, suits its distribution, and gives a valid config at both ends."""
    known = flatten(base)
    seen: set[str] = set()
    for d in space.dimensions:
        where = f"space {space.name}: {d.key}"
        if d.key in seen:
            raise DganError(f"{where} is searched twice", exit_code=2)
        seen.add(d.key)
        if d.key not in known:
            section = d.key.split(".")[0]
            keys = sorted(k.split(".", 1)[1] for k in known if k.startswith(f"{section}."))
            hint = (
                f"keys of {section}: {', '.join(keys)}"
                if keys
                else "sections: " + ", ".join(sorted({k.split(".")[0] for k in known}))
            )
            raise DganError(f"{where} is not a key of the GAN config; {hint}", exit_code=2)
        current = known[d.key]
        if d.kind != "choice" and not _number(current):
            raise DganError(
                f"{where} is {current!r} in the base config, not a number: search it with "
                "{choice: [...]}",
                exit_code=2,
            )
        if d.kind in ("uniform", "loguniform") and isinstance(current, int):
            raise DganError(
                f"{where} takes whole numbers: search it with {{int: [low, high]}}", exit_code=2
            )
        for value in d.values:
            _check_value(base, where, {d.key: value})
    if all(d.kind != "choice" for d in space.dimensions):  # the corners, together
        for end in (0, 1):
            _check_value(
                base, f"space {space.name}", {d.key: d.values[end] for d in space.dimensions}
            )


def _check_value(base: GanConfig, where: str, params: dict[str, Any]) -> None:
    try:
        apply_params(base, params)
    except DganError as err:
        shown = ", ".join(f"{k}={v}" for k, v in params.items())
        raise DganError(f"{where}: the config is invalid at {shown}:\n{err}", exit_code=2) from None
