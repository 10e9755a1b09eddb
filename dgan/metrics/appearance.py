"""What a defect looks like inside its region: its size, tone, colour and texture.

The realism test says how often a fresh classifier tells synthesized defects from real ones, not
in what way they differ. These figures compare the two inside the defect itself: a real defect
inside its annotated mask, a synthesized one weighted by G's spatial distribution map m (Eq. 1-4),
so a pixel that m half blends counts half. Pixels are in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

# The 4-neighbour Laplacian: 0 on a flat or linear patch, large on speckle, edges and thin lines.
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def grey(images: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W): each pixel's mean over the channels."""
    return images.mean(1, keepdim=True)


def chroma(images: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W): mean |channel - the channels' mean|."""
    return (images - grey(images)).abs().mean(1, keepdim=True)


def texture(images: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W): |Laplacian| of the grey image (borders replicated)."""
    padded = F.pad(grey(images), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, LAPLACIAN.to(images)[None, None]).abs()


@dataclass(frozen=True)
class Appearance:
    """One set of defects: the share of the image they cover and, inside them, the weighted mean
    of grey, chroma and texture."""

    area: float
    grey: float
    chroma: float
    texture: float


def appearance(images: Tensor, weights: Tensor) -> Appearance:
    """Figures of `images` (N, 3, H, W) inside `weights` (N, 1, H, W) in [0, 1]: a mask, or m."""
    if images.shape[0] != weights.shape[0] or weights.shape[1] != 1:
        raise ValueError(f"weights {tuple(weights.shape)} do not match images {images.shape}")
    w = weights.float()
    total = w.sum()
    if total <= 0:
        raise ValueError("the weights are 0 everywhere: no defect pixel to describe")

    def inside(values: Tensor) -> float:
        return float((values * w).sum() / total)

    return Appearance(
        area=float(w.mean()),
        grey=inside(grey(images)),
        chroma=inside(chroma(images)),
        texture=inside(texture(images)),
    )
