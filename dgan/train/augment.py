"""Differentiable augmentation of every image D sees (DiffAugment; Zhao et al., NeurIPS 2020).

Beyond the paper. With a few hundred real defects D learns them by heart, and G then learns what
that overfit D accepts. DiffAugment shows D only augmented images, real and fake alike, in D's
update and in G's, and lets G's gradient flow back through the augmentation, so that G is still
pushed towards the real images themselves and not towards augmented ones.

Every transform keeps an image's label set: translation (up to `TRANSLATION` of a side, the
uncovered border filled with 0, mid grey) and a mild brightness and contrast change. DiffAugment's
saturation change and cutout are left out: a grey corrosion stain, or a crack cut out, would no
longer show its label to D_cls, which reads the same augmented images.

The random draws come from the data stream (`d_augment` in a batch, uniform in [0, 1)), so a seed
still identifies a run and nothing here touches torch's generators.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

TRANSLATION = 0.125  # DiffAugment's ratio: 4 px at 32 px, 16 px at 128 px
BRIGHTNESS = 0.25  # added, at most, in [-1, 1] units (an eighth of the range)
CONTRAST = 0.25  # deviation from the image's mean scaled by 1 +- this, at most

POLICIES = ("none", "translation", "translation_colour")


def augment(images: Tensor, draws: Tensor, policy: str) -> Tensor:
    """images (B, 3, H, W) in [-1, 1]; draws (B, 4) uniform [0, 1): x and y shift, brightness,
    contrast. Differentiable with respect to `images`."""
    if policy == "none":
        return images
    if policy not in POLICIES:
        raise ValueError(f"unknown augmentation policy {policy!r}; use one of {POLICIES}")
    draws = draws.to(images.dtype)
    images = translate(images, draws[:, 0], draws[:, 1])
    if policy == "translation_colour":
        images = colour(images, draws[:, 2], draws[:, 3])
    return images


def translate(images: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Shift each image by a whole number of pixels, at most TRANSLATION of each side, filling
    with 0."""
    b, _, h, w = images.shape
    max_x, max_y = int(w * TRANSLATION), int(h * TRANSLATION)
    # u in [0, 1) -> a shift in {-max, ..., max} pixels
    sx = (u * (2 * max_x + 1)).floor() - max_x
    sy = (v * (2 * max_y + 1)).floor() - max_y
    theta = images.new_zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * sx / w  # the grid samples the source: move the content by +sx
    theta[:, 1, 2] = -2 * sy / h
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def colour(images: Tensor, brightness: Tensor, contrast: Tensor) -> Tensor:
    """Add up to +-BRIGHTNESS, then scale the deviation from each image's mean by 1 +- CONTRAST."""
    images = images + ((2 * brightness - 1) * BRIGHTNESS)[:, None, None, None]
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    scale = (1 + (2 * contrast - 1) * CONTRAST)[:, None, None, None]
    return (images - mean) * scale + mean
