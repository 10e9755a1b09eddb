"""The defect inspector (Sec. 3.2, Fig. 3): a backbone f_theta, a multi-label head over the
defect categories, and a source classifier f_src (real vs synthesized) behind a Gradient
Reversal Layer, so that the backbone learns features in which the two sources look alike.

    inspector/model.safetensors   weights (the source classifier's too, when it was trained)
    inspector/config.yaml         the run's resolved InspectorConfig
    inspector/classes.json        the categories, in the head's output order

Loading reads tensors and YAML only: nothing is unpickled.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from torch import Tensor, nn

from dgan.config import InspectorConfig
from dgan.errors import DganError

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's pretrained weights expect this input
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCE_HIDDEN = 256  # DANN's domain classifier: one hidden layer
# What to download on a machine with internet access, for --pretrained.
TORCHVISION_FILES = {
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",
}


# ---------------------------------------------------------------------------------------------
# Gradient reversal (Ganin & Lempitsky 2015, cited as [11] in Sec. 3.2)
# ---------------------------------------------------------------------------------------------


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -alpha."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: float) -> Tensor:
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.alpha * grad, None


def grad_reverse(x: Tensor, alpha: float) -> Tensor:
    """x, with its gradient reversed and scaled by alpha on the way back."""
    return GradientReversal.apply(x, alpha)


def dann_alpha(progress: float, max_alpha: float = 1.0) -> float:
    """DANN's GRL strength 2/(1+exp(-10p))-1 at training progress p in [0, 1], times max_alpha.

    It starts at 0, so the source classifier's noisy early gradient does not disturb f_theta.
    """
    p = min(max(progress, 0.0), 1.0)
    return max_alpha * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)


def grl_alpha(config: InspectorConfig, progress: float) -> float:
    """The GRL strength the config asks for at training progress p."""
    m = config.model
    return dann_alpha(progress, m.grl_alpha) if m.grl_schedule == "dann" else m.grl_alpha


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


class SmallBackbone(nn.Module):
    """Four conv-BN-ReLU stages with max pooling and global average pooling: a CPU-sized f_theta."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for k in range(4):
            out_ch = width << k
            layers += [
                nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2) if k < 3 else nn.AdaptiveAvgPool2d(1),
            ]
            in_ch = out_ch
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.out_features = in_ch

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)


class Inspector(nn.Module):
    """inspector(images in [0, 1], alpha) -> (class logits (B, C), source logits (B,) or None).

    Source logits come only when the source classifier exists and `alpha` is given; the GRL
    between it and the backbone scales the reversed gradient by `alpha`.
    """

    def __init__(
        self, backbone: nn.Module, feature_dim: int, num_classes: int, source_head: bool
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.source_classifier = (
            nn.Sequential(
                nn.Linear(feature_dim, SOURCE_HIDDEN),
                nn.ReLU(inplace=True),
                nn.Linear(SOURCE_HIDDEN, 1),
            )
            if source_head
            else None
        )
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor, alpha: float | None = None) -> tuple[Tensor, Tensor | None]:
        features = self.backbone((images - self.mean) / self.std)
        logits = self.classifier(features)
        if self.source_classifier is None or alpha is None:
            return logits, None
        return logits, self.source_classifier(grad_reverse(features, alpha)).squeeze(1)


def _torchvision_backbone(arch: str) -> tuple[nn.Module, int]:
    """The torchvision network with weights=None (nothing is downloaded) and its feature width."""
    from torchvision import models

    net = getattr(models, arch)(weights=None)
    return net, (net.fc.in_features if arch.startswith("resnet") else net.classifier.in_features)


def _drop_head(net: nn.Module, arch: str) -> nn.Module:
    if arch.startswith("resnet"):
        net.fc = nn.Identity()
    else:
        net.classifier = nn.Identity()
    return net


def build_inspector(
    config: InspectorConfig, num_classes: int, source_head: bool, load_pretrained: bool = True
) -> Inspector:
    """The inspector the config describes; `source_head` adds f_src behind the GRL.

    With `load_pretrained`, model.pretrained (a local torchvision state dict) initialises the
    backbone; the exported model skips it, since its own weights replace the backbone's.
    """
    arch = config.model.arch
    if arch == "small":  # the config refuses pretrained weights for it
        backbone: nn.Module = SmallBackbone()
        return Inspector(backbone, backbone.out_features, num_classes, source_head)
    net, feature_dim = _torchvision_backbone(arch)
    if config.model.pretrained is not None and load_pretrained:
        load_pretrained_backbone(net, arch, config.model.pretrained)
    return Inspector(_drop_head(net, arch), feature_dim, num_classes, source_head)


# ---------------------------------------------------------------------------------------------
# Local pretrained weights
# ---------------------------------------------------------------------------------------------

# torchvision's DenseNet files name layers 'norm.1'; its modules now call them 'norm1'.
_DENSENET_LEGACY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def pretrained_hint(arch: str) -> str:
    """How to get weights onto a machine without internet, for error messages."""
    url = TORCHVISION_FILES.get(arch, TORCHVISION_FILES["resnet34"])
    return (
        f"Nothing is downloaded here: fetch {url} on a machine with internet access, copy it "
        "over, and pass its path: --pretrained PATH (or --set model.pretrained=PATH)."
    )


def guess_arch(keys: list[str]) -> str:
    """A person-readable guess at which torchvision network a state dict belongs to."""
    names = set(keys)
    if any(k.startswith("features.denseblock") for k in names):
        layers = len({k.split(".")[2] for k in names if k.startswith("features.denseblock3.")})
        return f"a DenseNet ({layers} layers in its third dense block; densenet121 has 24)"
    if "layer1.0.conv3.weight" in names:
        return "a ResNet with bottleneck blocks (resnet50/101/152)"
    if "layer1.0.conv1.weight" in names:
        blocks = len({k.split(".")[1] for k in names if k.startswith("layer3.")})
        return f"a ResNet with basic blocks ({blocks} blocks in layer3; resnet18 has 2, resnet34 6)"
    sample = ", ".join(sorted(names)[:3])
    return f"no torchvision ResNet or DenseNet (keys like {sample})"


def load_pretrained_backbone(net: nn.Module, arch: str, path: Path) -> None:
    """Load a local torchvision state dict into `net`; the ImageNet head is ignored.

    Raises DganError when the file is missing, unreadable or made for another architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise DganError(f"--pretrained {path}: no such file. {pretrained_hint(arch)}", exit_code=2)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise DganError(
            f"--pretrained {path} is not a readable torch state dict ({err}). "
            f"{pretrained_hint(arch)}"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DganError(
            f"--pretrained {path} holds no state dict of tensors. {pretrained_hint(arch)}"
        )
    state = {_DENSENET_LEGACY.sub(r"\1\2", k): v for k, v in state.items()}
    head = ("fc.",) if arch.startswith("resnet") else ("classifier.",)
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith(head)}
    given = {k: v for k, v in state.items() if not k.startswith(head)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = sorted(
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in set(expected) & set(given)
        if given[k].shape != expected[k].shape
    )
    if missing or unexpected or shapes:
        problems = [
            f"{len(items)} {what} (e.g. {items[0]})"
            for what, items in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches", shapes),
            )
            if items
        ]
        raise DganError(
            f"--pretrained {path} does not fit model.arch={arch}: {'; '.join(problems)}. "
            f"It looks like {guess_arch(list(state))}. Pass the {arch} file "
            f"({TORCHVISION_FILES[arch].rsplit('/', 1)[-1]}) or set --arch to match the file.",
            exit_code=2,
        )
    net.load_state_dict(given, strict=False)


# ---------------------------------------------------------------------------------------------
# The exported model
# ---------------------------------------------------------------------------------------------


def save_inspector(
    model: Inspector, config: InspectorConfig, classes: list[str], out: Path
) -> Path:
    """Write the inspector directory (each file atomically) and return it."""
    from dgan.models.export import save_model_dir

    return save_model_dir(model, config, classes, out)


def find_inspector_dir(path: Path) -> Path:
    """An inspector directory from itself or from the run directory that holds it."""
    path = Path(path)
    for candidate in (path, path / "inspector"):
        if (candidate / "model.safetensors").is_file() and (candidate / "classes.json").is_file():
            return candidate
    raise DganError(
        f"{path} is neither an inspector directory (model.safetensors, config.yaml, classes.json) "
        "nor a run directory with one in inspector/. Train one with 'dgan train inspector'.",
        exit_code=2,
    )


def load_inspector(path: Path, device: str = "cpu") -> tuple[Inspector, InspectorConfig, list[str]]:
    """(inspector in eval mode, its config, its classes) from a directory or its run directory."""
    directory = find_inspector_dir(path)
    if not (directory / "config.yaml").is_file():
        raise DganError(f"{directory} has no config.yaml; it was not written by save_inspector")
    config = InspectorConfig.model_validate(yaml.safe_load((directory / "config.yaml").read_text()))
    classes = json.loads((directory / "classes.json").read_text())
    tensors = load_file(str(directory / "model.safetensors"), device=device)
    source_head = any(k.startswith("source_classifier.") for k in tensors)
    model = build_inspector(config, len(classes), source_head, load_pretrained=False)
    model.load_state_dict(tensors)
    return model.to(device).eval(), config, classes
