"""Frozen feature extractors for the distances of `dgan.metrics.fid`, each with a stable name.

- **Standard Inception** (`fid`, `kid`): torch-fidelity's Inception-v3 port of the TensorFlow FID
  network (2015-12-05 graph), 2048-d pool features, through torchmetrics. Its weights come from a
  local file, `--inception-weights PATH` or $DGAN_INCEPTION_WEIGHTS; nothing is downloaded. The file
  is `weights-inception-2015-12-05-6726825d.pth` (torch-fidelity's release v0.2.0; pytorch-fid
  ships the same bytes as `pt_inception-2015-12-05-6726825d.pth`), 95,628,359 bytes, SHA-256
  INCEPTION_SHA256. Its whole SHA-256 is verified before use. Images are resized to 299x299 with
  the TensorFlow-1.x-compatible bilinear resize (torchmetrics' antialias=False), as the reference
  FID code does.
- **Inspector** (`fid_inspector`, `kid_inspector`): the pooled penultimate features of a frozen
  defect inspector (the input of its classification head), on images resized to the size it was
  trained at. Its name carries the SHA-256 prefix of its weights.

Every extractor takes float images in [0, 1], (B, 3, H, W), and returns (B, d) features.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dgan.errors import DganError
from dgan.events import Events

INCEPTION_ENV = "DGAN_INCEPTION_WEIGHTS"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_BYTES = 95_628_359
INCEPTION_HINT = (
    f"Standard FID needs the Inception weights {INCEPTION_FILE} ({INCEPTION_BYTES:,} bytes, "
    f"SHA-256 {INCEPTION_SHA256}): fetch it on a machine with internet access "
    "(torch-fidelity's GitHub release v0.2.0, or pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
    f"), copy it here and pass --inception-weights PATH or set {INCEPTION_ENV}."
)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inception_weights_path(explicit: Path | str | None) -> Path | None:
    """The Inception weights file asked for: the explicit path, else $DGAN_INCEPTION_WEIGHTS."""
    chosen = explicit or os.environ.get(INCEPTION_ENV) or None
    return None if chosen is None else Path(chosen)


def read_inception_weights(path: Path, expected_sha256: str = INCEPTION_SHA256) -> bytes:
    """The file's bytes once their SHA-256 matches; a missing or different file is refused."""
    path = Path(path)
    if not path.is_file():
        raise DganError(f"Inception weights {path}: no such file. {INCEPTION_HINT}", exit_code=2)
    data = path.read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise DganError(
            f"Inception weights {path} have SHA-256 {actual} ({len(data):,} bytes), expected "
            f"{expected_sha256}: the file is damaged or holds another network, and FID computed "
            f"with it would not be the standard FID. {INCEPTION_HINT}",
            exit_code=2,
        )
    return data


class InceptionFeatures(nn.Module):
    """Standard FID features: 2048-d Inception-v3 pool features of images in [0, 1]."""

    metric_names = ("fid", "kid")

    def __init__(self, weights: Path, expected_sha256: str = INCEPTION_SHA256) -> None:
        super().__init__()
        data = read_inception_weights(weights, expected_sha256)
        # A plain state dict loads under weights_only=True; anything else is refused here.
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any failure means it is not a state dict
            raise DganError(
                f"Inception weights {weights} are not a plain state dict: {err}"
            ) from None
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ModuleNotFoundError as err:  # pragma: no cover - a dependency of dgan
            raise DganError(f"standard FID needs torch-fidelity ({err}): pip install it") from None
        # torchmetrics reads the verified bytes themselves, not the path again.
        self.net = NoTrainInceptionV3(
            "inception-v3-compat", ["2048"], io.BytesIO(data), antialias=False
        )
        self.weights_hash = expected_sha256
        self.name = "inception-v3-2015-12-05"
        self.description = f"standard Inception-v3 (2015-12-05, SHA-256 {expected_sha256[:12]})"
        self.num_features = 2048

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        pixels = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return self.net(pixels).float()


class InspectorFeatures(nn.Module):
    """Pooled penultimate features of a frozen inspector, and its class logits on the same pass."""

    metric_names = ("fid_inspector", "kid_inspector")

    def __init__(self, inspector, image_size: int, classes: list[str], uri: str, identity: str):
        super().__init__()
        self.inspector = inspector.eval().requires_grad_(False)
        self.image_size, self.classes = image_size, list(classes)
        self.weights_hash = identity
        self.name = f"inspector-{identity}"
        self.description = f"inspector {uri} (weights SHA-256 {identity[:12]}, {image_size} px)"
        self.num_features = inspector.classifier.in_features

    def _resize(self, images: Tensor) -> Tensor:
        if images.shape[-1] == self.image_size and images.shape[-2] == self.image_size:
            return images.float()
        return F.interpolate(
            images.float(), size=(self.image_size, self.image_size), mode="bilinear",
            align_corners=False, antialias=True,
        )  # fmt: skip

    @torch.no_grad()
    def features_and_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(features (B, d), class logits (B, C)) of images in [0, 1]."""
        m = self.inspector
        features = m.backbone((self._resize(images) - m.mean) / m.std)
        return features.float(), m.classifier(features).float()

    def forward(self, images: Tensor) -> Tensor:
        return self.features_and_logits(images)[0]


def open_inspector_features(
    spec: str, device: torch.device | str = "cpu", tracking_uri: str | None = None
) -> InspectorFeatures:
    """The inspector named by `spec` (run dir, model dir, checkpoint or MLflow URI), frozen."""
    from dgan.tracking.source import load_inspector_from, resolve_model

    source = resolve_model(spec, "inspector", tracking_uri=tracking_uri)
    model, config, classes = load_inspector_from(source)  # safetensors refuses "cpu:0"
    frozen = InspectorFeatures(model, config.data.image_size, classes, source.uri, source.identity)
    return frozen.to(device)


def open_extractors(
    inception_weights: Path | str | None,
    inspector: str | None,
    device: torch.device | str = "cpu",
    tracking_uri: str | None = None,
    events: Events | None = None,
    required: bool = True,
) -> tuple[InceptionFeatures | None, InspectorFeatures | None]:
    """The extractors available: standard Inception when its weights are given (verified), the
    inspector when named. Says which is used; refuses when there is neither and one is required."""
    events = events or Events()
    weights = inception_weights_path(inception_weights)
    inception = InceptionFeatures(weights).to(device) if weights is not None else None
    frozen = open_inspector_features(inspector, device, tracking_uri) if inspector else None
    if inception is None and frozen is None and not required:
        return None, None
    if inception is None and frozen is None:
        raise DganError(
            "no feature extractor: give --inspector SPEC (an inspector trained on real data: run "
            "directory or models:/NAME@alias) for fid_inspector/kid_inspector, or the Inception "
            f"weights for standard FID. {INCEPTION_HINT}",
            exit_code=2,
        )
    if inception is None:
        events.info(
            f"standard FID not computed: no Inception weights (--inception-weights or "
            f"{INCEPTION_ENV}); computing fid_inspector and kid_inspector on the features of "
            f"{frozen.description} instead."
        )
    return inception, frozen
