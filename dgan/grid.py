"""Sample grids: what a person looks at to judge a Defect-GAN.

Columns are fixed inputs. Rows: the normal inputs; their defacement for each single category and
for one multi-category label, each beside its spatial distribution map m; one category per column
asked only inside an outlined box; then real defects and their restoration beside the repaint map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

from dgan.inference import deface, restore

LABEL_WIDTH = 96


def _to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3|1, H, W) in [-1, 1] (images) or [0, 1] (maps) -> (B, H, W, 3) uint8."""
    x = images.detach().float().cpu()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1) * 2 - 1
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _row(images: Tensor, maps: Tensor | None) -> np.ndarray:
    tiles = list(_to_uint8(images))
    if maps is not None:
        gap = np.full_like(tiles[0][:, :4], 255)
        tiles = [gap if t is None else t for t in [*tiles, None, *_to_uint8(maps)]]
    return np.concatenate(tiles, axis=1)


def _box_for(k: int, h: int, w: int) -> tuple[int, int, int, int]:
    """A half-size box in one of the four quadrants, changing with the column."""
    x0, y0 = (k % 2) * w // 2, (k // 2 % 2) * h // 2
    return (x0, y0, x0 + w // 2, y0 + h // 2)


def _outline(pixels: np.ndarray, boxes, width: int) -> np.ndarray:
    """Draw each column's box in red on the image half of a row."""
    out = pixels.copy()
    for k, ((x0, y0, x1, y1),) in enumerate(boxes):
        x0, x1 = x0 + k * width, x1 + k * width - 1
        out[y0, x0 : x1 + 1] = out[y1 - 1, x0 : x1 + 1] = (255, 0, 0)
        out[y0:y1, x0] = out[y0:y1, x1] = (255, 0, 0)
    return out


def sample_grid(
    generator,
    normals: Tensor,
    defects: Tensor,
    classes: Sequence[str],
    multi_label: Sequence[str] | None = None,
    seed: int = 0,
    scale: int = 2,
) -> Image.Image:
    """Render the grid for `normals` and real `defects` (same count) as one RGB image."""
    c = len(classes)
    b = normals.shape[0]
    rows: list[tuple[str, np.ndarray]] = [("normal", _row(normals, normals[:, :1] * 0))]
    targets = [(name, torch.eye(c)[i]) for i, name in enumerate(classes)]
    if multi_label:
        multi = torch.tensor([float(name in multi_label) for name in classes])
        targets.append(("+".join(n[:5] for n in multi_label), multi))
    for name, label in targets:
        labels = label.to(normals).expand(b, c)
        images, masks = deface(generator, normals, labels, seed=seed)
        rows.append((name, _row(images, masks)))
    # Spatial control (Fig. 6): column k gets category k mod C, asked only in its outlined box.
    h, w = normals.shape[2:]
    boxes = [[_box_for(k, h, w)] for k in range(b)]
    cycled = torch.eye(c)[[k % c for k in range(b)]].to(normals)
    boxed, boxed_masks = deface(generator, normals, cycled, region=boxes, seed=seed)
    rows.append(("in box", _outline(_row(boxed, boxed_masks), boxes, w)))
    restored, repaint = restore(generator, defects, seed=seed)
    rows.append(("real defect", _row(defects, defects[:, :1] * 0)))
    rows.append(("restored", _row(restored, repaint)))

    height = rows[0][1].shape[0]
    width = rows[0][1].shape[1]
    canvas = Image.new(
        "RGB", (LABEL_WIDTH + width * scale, len(rows) * (height * scale + 2)), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for i, (name, pixels) in enumerate(rows):
        y = i * (height * scale + 2)
        tile = Image.fromarray(pixels).resize(
            (width * scale, height * scale), Image.Resampling.NEAREST
        )
        canvas.paste(tile, (LABEL_WIDTH, y))
        draw.text((4, y + height * scale // 2 - 6), name, fill="black")
    return canvas
