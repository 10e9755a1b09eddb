"""A trained model on disk: safetensors weights, the resolved config and the class names.

    generator/model.safetensors   EMA weights of G
    generator/config.yaml         the run's resolved GanConfig
    generator/classes.json        the categories, in A's channel order

Loading reads tensors and YAML only: nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import nn

from dgan.config import GanConfig, to_yaml
from dgan.errors import DganError
from dgan.io import atomic_write_text
from dgan.models.generator import Generator


def save_model_dir(model: nn.Module, config: BaseModel, classes: list[str], out: Path) -> Path:
    """Write model.safetensors, config.yaml and classes.json into `out`, each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / ".tmp-model.safetensors"
    save_file(tensors, str(tmp))
    tmp.replace(out / "model.safetensors")
    atomic_write_text(out / "config.yaml", to_yaml(config))
    atomic_write_text(out / "classes.json", json.dumps(classes) + "\n")
    return out


def save_generator(G: Generator, config: GanConfig, classes: list[str], out: Path) -> Path:
    """Write the generator directory and return it."""
    return save_model_dir(G, config, classes, out)


def load_generator(directory: Path, device: str = "cpu") -> tuple[Generator, GanConfig, list[str]]:
    """(G in eval mode, its config, its classes) from a directory written by save_generator."""
    from dgan.models import build_gan

    directory = Path(directory)
    files = [directory / n for n in ("model.safetensors", "config.yaml", "classes.json")]
    if missing := [f.name for f in files if not f.is_file()]:
        raise DganError(f"{directory} is not a generator directory: missing {', '.join(missing)}")
    config = GanConfig.model_validate(yaml.safe_load(files[1].read_text()))
    classes = json.loads(files[2].read_text())
    G, _ = build_gan(config, classes)
    G.load_state_dict(load_file(str(files[0]), device=device))
    return G.to(device).eval(), config, classes
