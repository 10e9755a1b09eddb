"""Synthesis quality beyond FID: does the generator do what it was asked, where, and with variety?

Per-image figures on images in [-1, 1]; changes are reported in [0, 1] intensity units (mean
absolute difference per pixel and channel, i.e. |a - b| / 2). None needs Inception.

- **Category-control accuracy** (`category_accuracy`): an inspector trained on real data
  classifies each synthesized defect; an image counts when every category matches the asked ones
  at sigmoid > 0.5 (CODEBRIM's multi-target exact match). Per class (`category_accuracy_<c>`):
  of the images asked to show c, the share the inspector calls c.
- **Background preservation** (`background_change`): the mean absolute change outside the defect
  region, where the region is the spatial distribution map m thresholded at MASK_THRESHOLD and
  dilated by `dilation_radius(size)` pixels (a square max-pool), so that soft mask borders do not
  count as background. Layer-wise composition should bring it near zero. `background_area` is the
  share of the image left as background; an image without any is left out (a generator whose m
  covers everything preserves no background: the figure is then undefined, not zero).
- **Spatial-control precision** (`spatial_precision`): defects asked only inside a random box; the
  share of the total absolute change that falls inside the box. Uniform change would score the
  box's area share (`spatial_chance`); 1 is perfect.
- **Diversity** (`diversity_l1`): the mean absolute pixel difference (L1, no learned features)
  between two samples of the same input and labels under two noise seeds. 0 means the noise
  changes nothing (collapse to one defect per input).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

MASK_THRESHOLD = 0.1  # m above this is defect: composition leaves <10% of the input there
THRESHOLD = 0.5  # the inspector's decision threshold, as in CODEBRIM


def dilation_radius(size: int) -> int:
    """Pixels by which the defect region grows before background is measured: 1 per 32 px."""
    return max(1, size // 32)


def absolute_change(before: Tensor, after: Tensor) -> Tensor:
    """(B, 1, H, W) mean absolute change over channels, in [0, 1] units, of [-1, 1] images."""
    return (after.float() - before.float()).abs().mean(1, keepdim=True) / 2


def background(masks: Tensor, threshold: float = MASK_THRESHOLD) -> Tensor:
    """(B, 1, H, W) 1 where the image counts as background: outside the dilated m > threshold."""
    r = dilation_radius(masks.shape[-1])
    region = F.max_pool2d((masks.float() > threshold).float(), 2 * r + 1, stride=1, padding=r)
    return 1.0 - region


def background_area(masks: Tensor, threshold: float = MASK_THRESHOLD) -> Tensor:
    """(B,) share of each image that counts as background."""
    return background(masks, threshold).mean(dim=(1, 2, 3))


def background_change(
    normals: Tensor, defects: Tensor, masks: Tensor, threshold: float = MASK_THRESHOLD
) -> Tensor:
    """(B,) mean absolute change outside the dilated region m > threshold; NaN if none is left."""
    outside = background(masks, threshold)
    change = absolute_change(normals, defects)
    area = outside.sum(dim=(1, 2, 3))
    value = (change * outside).sum(dim=(1, 2, 3)) / area.clamp_min(1)
    return torch.where(area > 0, value, torch.full_like(value, float("nan")))


def spatial_precision(normals: Tensor, defects: Tensor, region: Tensor) -> Tensor:
    """(B,) share of the total absolute change inside `region` (B, 1, H, W); NaN without change."""
    change = absolute_change(normals, defects)
    total = change.sum(dim=(1, 2, 3))
    inside = (change * region.float()).sum(dim=(1, 2, 3))
    share = inside / total.clamp_min(1e-12)
    return torch.where(total > 0, share, torch.full_like(total, float("nan")))


def pairwise_l1(a: Tensor, b: Tensor) -> Tensor:
    """(B,) mean absolute difference between two samples per input, in [0, 1] units."""
    return absolute_change(a, b).mean(dim=(1, 2, 3))


def category_control(probs: Tensor, asked: Tensor, classes: Sequence[str]) -> dict[str, float]:
    """Multi-target exact match of the inspector's calls with the asked categories, and per class
    the share of images asked for it that the inspector calls it (absent when never asked)."""
    called = probs > THRESHOLD
    wanted = asked > 0.5
    out = {"category_accuracy": float((called == wanted).all(dim=1).float().mean())}
    for k, name in enumerate(classes):
        if wanted[:, k].any():
            out[f"category_accuracy_{name}"] = float(called[wanted[:, k], k].float().mean())
    return out


def nan_mean(values: Tensor) -> float:
    """Mean over the defined (non-NaN) values; NaN when none is."""
    v = values.float()
    v = v[~torch.isnan(v)]
    return float(v.mean()) if v.numel() else float("nan")
