"""Fréchet distance and KID between two sets of image features, and cached reference statistics.

- **Fréchet distance** (Heusel et al. 2017): ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2),
  with the mean and the unbiased (N - 1) covariance of each set's features; Tr((S_r S_g)^1/2) is
  the sum of the square roots of the eigenvalues of S_r S_g, as in torchmetrics. On the standard
  Inception-v3 pool features it is FID; on any other features the metric carries the extractor's
  name (`fid_inspector`), never plain `fid`. It is biased at small N: compare values only at the
  same N, image size and reference set.
- **KID** (Binkowski et al. 2018): the unbiased estimate of MMD^2 under the cubic polynomial kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets of equal size drawn from each set
  (torchmetrics' defaults: 100 subsets of 1000, smaller when a set is smaller). It is unbiased at
  small N and may come out slightly below zero when the sets match.

Reference statistics (mean, covariance and the features KID needs) of a set of real images are
cached as .npz files under a content hash of the sorted file list with sizes, the extractor's name
and weights hash, the image size and N, written atomically and reused across runs.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dgan.errors import DganError
from dgan.io import atomic_write_bytes

MIN_IMAGES = 2  # a covariance and the unbiased MMD^2 both need two samples per set
KID_SUBSETS = 100  # torchmetrics' KernelInceptionDistance defaults
KID_SUBSET_SIZE = 1000
CACHE_VERSION = 1  # bump when the statistics change meaning


SMALL_SET_HINT = "Add images to the dataset."


def require_images(
    given: int, metric: str, what: str, needed: int = MIN_IMAGES, hint: str = SMALL_SET_HINT
) -> None:
    """Refuse a set too small for `metric`, saying how many images it needs and how many it got."""
    if given < needed:
        raise DganError(f"{metric} needs at least {needed} {what}, got {given}. {hint}")


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (d,) and unbiased covariance (d, d) of features (N, d), in float64."""
    x = features.double()
    require_images(x.shape[0], "a feature covariance", "images")
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^1/2) between two Gaussians."""
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    mean_term = (mu1 - mu2).square().sum()
    # sigma1 sigma2 is similar to a PSD matrix: its eigenvalues are real and >= 0 up to rounding.
    root_trace = torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()
    return float(mean_term + sigma1.trace() + sigma2.trace() - 2 * root_trace)


def polynomial_mmd2(x: Tensor, y: Tensor) -> float:
    """Unbiased MMD^2 between x (m, d) and y (m, d) under k(a, b) = (a.b / d + 1)^3."""
    x, y = x.double(), y.double()
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    off_diagonal = k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()
    return float(off_diagonal / (m * (m - 1)) - 2 * k_xy.mean())


def kernel_inception_distance(
    real: Tensor,
    fake: Tensor,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    seed: int = 0,
) -> tuple[float, float]:
    """(mean, std) of the polynomial MMD^2 over random subsets of min(subset_size, N) per set."""
    size = min(subset_size, real.shape[0], fake.shape[0])
    require_images(size, "KID", "images in each set")
    if size == real.shape[0] == fake.shape[0]:
        return polynomial_mmd2(real, fake), 0.0  # every subset is the whole set
    rng = torch.Generator().manual_seed(seed)
    values = [
        polynomial_mmd2(
            real[torch.randperm(real.shape[0], generator=rng)[:size]],
            fake[torch.randperm(fake.shape[0], generator=rng)[:size]],
        )
        for _ in range(subsets)
    ]
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std(unbiased=False))


@dataclass
class FeatureSet:
    """Features of one image set with the statistics the distances need."""

    features: Tensor  # (N, d) float32 on the CPU; KID needs the features themselves
    mean: Tensor  # (d,) float64
    cov: Tensor  # (d, d) float64

    @classmethod
    def from_features(cls, features: Tensor) -> FeatureSet:
        features = features.detach().float().cpu()
        mean, cov = feature_statistics(features)
        return cls(features, mean, cov)

    @property
    def n(self) -> int:
        return self.features.shape[0]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, features=self.features.numpy(), mean=self.mean.numpy(), cov=self.cov.numpy())
        return buf.getvalue()

    @classmethod
    def from_file(cls, path: Path) -> FeatureSet:
        with np.load(path, allow_pickle=False) as f:
            return cls(*(torch.from_numpy(f[k].copy()) for k in ("features", "mean", "cov")))


def fid_and_kid(real: FeatureSet, fake: FeatureSet, seed: int = 0) -> dict[str, float]:
    """Fréchet distance, and KID's mean and std, between two feature sets."""
    require_images(real.n, "the Fréchet distance", "real images")
    require_images(fake.n, "the Fréchet distance", "synthesized images")
    kid, kid_std = kernel_inception_distance(real.features, fake.features, seed=seed)
    return {
        "fid": frechet_distance(real.mean, real.cov, fake.mean, fake.cov),
        "kid": kid,
        "kid_std": kid_std,
    }


def reference_key(files: Sequence[Path], extractor: str, weights_hash: str, image_size: int) -> str:
    """Content hash of a reference set: sorted files with sizes, extractor, weights, size and N."""
    listing = sorted((str(Path(p).resolve()), Path(p).stat().st_size) for p in files)
    payload = {
        "version": CACHE_VERSION,
        "files": listing,
        "extractor": extractor,
        "weights": weights_hash,
        "image_size": image_size,
        "n": len(listing),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cache_path(
    cache_dir: Path, files: Sequence[Path], extractor: str, weights_hash: str, image_size: int
) -> Path:
    """Where the statistics of this reference set live: names say what, the hash says which."""
    key = reference_key(files, extractor, weights_hash, image_size)
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in extractor)
    return Path(cache_dir) / f"{safe}-{image_size}px-n{len(files)}-{key[:20]}.npz"


def save_feature_set(stats: FeatureSet, path: Path) -> None:
    """Write statistics as .npz atomically (temp file in the same directory, then rename)."""
    atomic_write_bytes(path, stats.to_bytes())
