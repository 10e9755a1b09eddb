"""Category control of a trained Defect-GAN, judged by an independent inspector.

For a generator (any model spec: run, checkpoint, model directory, MLflow URI) and an inspector
trained on real data only (`dgan train inspector`), prints per category:

- control: share of defaced test normals in which the inspector finds the asked category
  (sigmoid > 0.5); `only` counts those where it finds that category and no other.
- L1 out: mean |d - n| (in [0, 1] units, channel mean) at pixels where G's map m < 0.5, i.e.
  how much the background changes outside the defect G says it painted (0 is perfect).
- L1 box-out: the same outside an asked box, when the category is asked only inside a central
  half-size box: spatial control (Fig. 6).
- area: mean share of pixels with m > 0.5, beside the real defects' mask area for the category
  (a thin crack covers a few percent of the image; a blob covers much more).
- feat dist: distance between the centroids of the inspector's features on the defaced images
  and on real test defects of the category, over the same distance for real test normals. Below
  1, the fakes sit nearer the real defects than the normals do; a classifier fooled by a blob of
  the right colour shows as high control with a large distance (FIELD-NOTES lesson 3).

and, for restoration: the share of real test defects (per category of the defect) that the
inspector calls normal after `restore`, with the mean L1 outside the real defect masks.

Same seed, same normals, same figures: compare checkpoints at equal iterations.

    python benchmarks/control_accuracy.py RUN/checkpoints/iter-00002000 \
        --inspector runs/inspector/00000-inspector --data data/demo --count 150
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dgan.data import DatasetIndex, open_dataset
from dgan.data.loader import load_image, to_unit_range
from dgan.inference import deface, restore
from dgan.models.inspector import load_inspector
from dgan.report import text_table
from dgan.tracking.source import load_generator_from, resolve_model


def busy_note() -> str:
    load1 = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    return f"load average {load1:.2f} on {cores} cores" + (
        " (BUSY: other processes compete)" if load1 > 0.5 * cores else ""
    )


def load_images(samples, size: int) -> Tensor:
    """Samples as (B, 3, size, size) in [-1, 1]."""
    return to_unit_range(torch.from_numpy(np.stack([load_image(s.path, size) for s in samples])))


def load_masks(samples, size: int) -> Tensor:
    """Ground-truth defect masks as (B, 1, size, size) in {0, 1}; all ones when a mask is absent."""
    from PIL import Image

    masks = []
    for s in samples:
        if s.mask is None:
            masks.append(np.ones((size, size), np.float32))
            continue
        with Image.open(s.mask) as img:
            m = img.convert("L").resize((size, size), Image.Resampling.NEAREST)
            masks.append((np.asarray(m) > 127).astype(np.float32))
    return torch.from_numpy(np.stack(masks))[:, None]


@torch.inference_mode()
def inspect(inspector, images: Tensor, batch: int = 64) -> tuple[Tensor, Tensor]:
    """(presence (B, C) bool, backbone features (B, F)) for images in [-1, 1]."""
    present, features = [], []
    for chunk in images.split(batch):
        x = (chunk + 1) / 2
        feats = inspector.backbone((x - inspector.mean) / inspector.std)
        present.append(inspector.classifier(feats) > 0)
        features.append(feats.flatten(1))
    return torch.cat(present), torch.cat(features)


def l1_where(a: Tensor, b: Tensor, where: Tensor) -> float:
    """Mean |a - b| in [0, 1] units (channel mean) over pixels where `where` is 1."""
    change = (a - b).abs().mean(1, keepdim=True) / 2
    return float((change * where).sum() / where.sum().clamp_min(1))


def centroid_ratio(fake: Tensor, real: Tensor, normal: Tensor) -> float:
    """|mean(fake) - mean(real)| / |mean(normal) - mean(real)| in the inspector's feature space."""
    target = real.mean(0)
    return float((fake.mean(0) - target).norm() / (normal.mean(0) - target).norm().clamp_min(1e-8))


def central_box(size: int) -> tuple[int, int, int, int]:
    q = size // 4
    return (q, q, size - q, size - q)


def measure(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    source = resolve_model(args.generator, "gan")
    G, _, classes = load_generator_from(source)
    inspector, inspector_config, inspector_classes = load_inspector(args.inspector)
    if list(inspector_classes) != list(classes):
        raise SystemExit(f"inspector classes {inspector_classes} differ from G's {classes}")
    size = inspector_config.data.image_size
    index: DatasetIndex = open_dataset(args.data)
    columns = [index.classes.index(c) for c in classes]
    normals_s = index.select(args.split, normal=True)[: args.count]
    defects_s = index.select(args.split, normal=False)
    normals = load_images(normals_s, size)
    defects = load_images(defects_s, size)
    _, normal_feats = inspect(inspector, normals)
    _, defect_feats = inspect(inspector, defects)
    n = len(normals)
    box = central_box(size)
    outside_box = torch.ones(n, 1, size, size)
    outside_box[:, :, box[1] : box[3], box[0] : box[2]] = 0

    print(f"generator {source.uri}")
    print(f"inspector {args.inspector}; {n} {args.split} normals, seed {args.seed}; {busy_note()}")
    started = time.perf_counter()
    rows = []
    for k, name in enumerate(classes):
        labels = torch.zeros(n, len(classes))
        labels[:, k] = 1
        images, masks = deface(G, normals, labels, seed=args.seed)
        present, feats = inspect(inspector, images)
        only = present[:, k] & (present.sum(1) == 1)
        boxed, _ = deface(G, normals, labels, region=[box] * n, seed=args.seed)
        boxed_present, _ = inspect(inspector, boxed)
        of_class = torch.tensor([s.labels[columns[k]] == 1 for s in defects_s])
        real_masks = load_masks([s for s, c in zip(defects_s, of_class, strict=True) if c], size)
        real_area = float(real_masks.mean())
        rows.append(
            [
                name,
                f"{present[:, k].float().mean():.3f}",
                f"{only.float().mean():.3f}",
                f"{boxed_present[:, k].float().mean():.3f}",
                f"{l1_where(images, normals, (masks < 0.5).float()):.4f}",
                f"{l1_where(boxed, normals, outside_box):.4f}",
                f"{(masks > 0.5).float().mean():.3f}",
                f"{real_area:.3f}",
                f"{centroid_ratio(feats, defect_feats[of_class], normal_feats):.3f}",
            ]
        )
    header = [
        "category",
        "control",
        "only",
        "box control",
        "L1 out",
        "L1 box-out",
        "area",
        "real area",
        "feat dist",
    ]
    print("\ndefacement (one category asked, whole image; box: central half-size box)")
    print("\n".join(text_table(header, rows)))

    restored, _ = restore(G, defects, seed=args.seed)
    present, _ = inspect(inspector, restored)
    called_normal = ~present.any(1)
    truth = load_masks(defects_s, size)
    rows = []
    for k, name in enumerate(classes):
        of_class = torch.tensor([s.labels[columns[k]] == 1 for s in defects_s])
        rows.append(
            [
                name,
                str(int(of_class.sum())),
                f"{called_normal[of_class].float().mean():.3f}",
                f"{l1_where(restored[of_class], defects[of_class], 1 - truth[of_class]):.4f}",
            ]
        )
    rows.append(
        [
            "all",
            str(len(defects)),
            f"{called_normal.float().mean():.3f}",
            f"{l1_where(restored, defects, 1 - truth):.4f}",
        ]
    )
    print(f"\nrestoration of real {args.split} defects")
    print("\n".join(text_table(["category", "defects", "called normal", "L1 out"], rows)))
    print(f"\n{time.perf_counter() - started:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("generator", help="run, checkpoint, model directory or MLflow URI")
    parser.add_argument("--inspector", type=Path, required=True, help="inspector run or directory")
    parser.add_argument("--data", type=Path, default=Path("data/demo"), help="dataset root")
    parser.add_argument("--split", default="test", help="split of normals and defects")
    parser.add_argument("--count", type=int, default=150, help="normals to deface")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of G")
    measure(parser.parse_args())


if __name__ == "__main__":
    main()
