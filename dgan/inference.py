"""Defacement and restoration with a trained generator (Sec. 3.1; Fig. 5 and 6).

`deface` paints defects of the asked categories onto normals, where asked; `restore` removes them.
Both return images in [-1, 1] and the generator's spatial distribution maps m in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from dgan.errors import DganError
from dgan.models.generator import Generator, split_top_layer, stack_layers

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end-exclusive


def region_mask(
    region: None | Tensor | Sequence[Box | Sequence[Box]], batch: int, height: int, width: int
) -> Tensor:
    """A (B, 1, H, W) map in [0, 1] of where defects may go: full image, boxes or given masks.

    `region` is None (everywhere), a tensor (B or 1, 1, H, W) or (B, H, W), or one box list per
    image (a single box per image is accepted too).
    """
    if region is None:
        return torch.ones(batch, 1, height, width)
    if isinstance(region, Tensor):
        mask = region.float()
        if mask.dim() == 3:
            mask = mask[:, None]
        if mask.shape[-2:] != (height, width):
            mask = torch.nn.functional.interpolate(mask, size=(height, width), mode="nearest")
        return mask.expand(batch, 1, height, width).clamp(0, 1)
    if len(region) != batch:
        raise DganError(f"got {len(region)} box lists for {batch} images; give one per image")
    mask = torch.zeros(batch, 1, height, width)
    for i, boxes in enumerate(region):
        boxes = [boxes] if boxes and isinstance(boxes[0], int) else boxes
        for x0, y0, x1, y1 in boxes:
            if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
                raise DganError(
                    f"box ({x0}, {y0}, {x1}, {y1}) of image {i} is outside the "
                    f"{width}x{height} image or empty; boxes are x0,y0,x1,y1 with 0<=x0<x1<={width}"
                )
            mask[i, 0, y0:y1, x0:x1] = 1.0
    return mask


def control_map(labels: Tensor, where: Tensor) -> Tensor:
    """A = label (B, C) at the pixels of `where` (B, 1, H, W) and 0 ("normal") elsewhere."""
    return labels[:, :, None, None] * where


def _noise_generator(device: torch.device, seed: int | Sequence[int] | None):
    """No generator (global RNG), one for the batch (an int), or one per image (a sequence)."""
    if seed is None:
        return None
    if isinstance(seed, int):
        return torch.Generator(device=device).manual_seed(seed)
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seed]


@torch.inference_mode()
def deface(
    generator: Generator,
    normals: Tensor,
    labels: Tensor,
    region: None | Tensor | Sequence = None,
    seed: int | Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Defect images and their spatial distribution maps m for normals (B, 3, H, W) in [-1, 1].

    `labels` (B, C) are multi-hot target categories; `region` restricts where (see region_mask).
    With layered label sets (generator.label_sets), a set of two layers or more is painted in two
    passes: its last layer, in painting order, over the others.
    `seed`: an int seeds the batch's noise; one int per image makes image i depend only on its
    own seed, whatever batch it is computed in.
    Without LWC there is no m; the returned map is then the normalised change |d - n|.
    """
    b, _, h, w = normals.shape
    if labels.shape != (b, generator.num_classes):
        raise DganError(
            f"labels must have shape ({b}, {generator.num_classes}), got {tuple(labels.shape)}"
        )
    labels = labels.to(normals)
    where = None if region is None else region_mask(region, b, h, w).to(normals)

    def control(asked: Tensor) -> Tensor:  # labels alone are G's cheap form of A everywhere
        return asked if where is None else control_map(asked, where)

    noise = _noise_generator(normals.device, seed)
    if generator.layers is None:
        out = generator(normals, control(labels), noise)
        return out.image, _mask_of(out, normals)
    # A layered label set: its last layer, in painting order, over the others (split_top_layer).
    under, top, stacked = split_top_layer(labels, generator.layers, labels.new_ones(b))
    first = generator(normals, control(under), noise)
    if not bool(stacked.any()):  # one sync per batch: a batch of one-layer sets takes one pass
        return first.image, first.defect_mask
    out = stack_layers(first, generator(first.image, control(top), noise), stacked)
    return out.image, out.defect_mask


@torch.inference_mode()
def restore(
    generator: Generator, defects: Tensor, seed: int | Sequence[int] | None = None
) -> tuple[Tensor, Tensor]:
    """Restored normals and repaint maps for defect images (B, 3, H, W) in [-1, 1] (A = 0)."""
    a = defects.new_zeros(defects.shape[0], generator.num_classes)  # "normal" at every pixel
    out = generator(defects, a, _noise_generator(defects.device, seed))
    return out.image, _mask_of(out, defects)


def _mask_of(out, inputs: Tensor) -> Tensor:
    if out.defect_mask is not None:
        return out.defect_mask
    change = (out.image - inputs).abs().mean(1, keepdim=True)
    return change / change.amax(dim=(2, 3), keepdim=True).clamp_min(1e-6)
