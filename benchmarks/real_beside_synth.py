"""Real defects of a label set beside G's defacements asked for the same set: a PNG to look at.

python benchmarks/real_beside_synth.py runs/gan/00000-demo --out real-beside-synth.png
python benchmarks/real_beside_synth.py runs/gan/00000-demo --sets crack spallation-exposed_bars

For each label set (categories joined by "-", as the realism figures name them), two rows of
--per-row images: real defects of exactly that set from the split, then G's defacements of as many
of the split's normals, asked for that set. Sets are separated by a white line. The realism
test's figures say how often a fresh classifier tells the two apart; this shows how.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_SETS = ("spallation-exposed_bars", "crack", "efflorescence")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a run directory, checkpoint, export or models:/ URI")
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: the model's)")
    parser.add_argument("--split", default="train", help="which split's images (train)")
    parser.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), help="label sets")
    parser.add_argument("--per-row", type=int, default=10, help="images per row (10)")
    parser.add_argument("--scale", type=int, default=3, help="pixels per image pixel (3)")
    parser.add_argument("--seed", type=int, default=0, help="the noise of the defacements")
    parser.add_argument("--out", type=Path, default=Path("real-beside-synth.png"))
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    from dgan.data import open_dataset
    from dgan.data.loader import select_classes, to_unit_range
    from dgan.errors import DganError
    from dgan.evaluation.inputs import load_images, require_split
    from dgan.evaluation.realism import label_set_name
    from dgan.inference import deface
    from dgan.io import atomic_save_image
    from dgan.tracking.source import load_generator_from, resolve_model

    try:
        if args.per_row < 1 or args.scale < 1:
            raise DganError("--per-row and --scale must be at least 1", exit_code=2)
        G, config, classes = load_generator_from(resolve_model(args.model, "gan"), "cpu")
        index = open_dataset(args.data or config.data.root or Path("data/demo"))
        require_split(index, args.split)
        columns = select_classes(index, classes)
        normals = index.select(args.split, normal=True)[: args.per_row]
        if not normals:
            raise DganError(f"split {args.split!r} of {index.root} has no normal image")
        by_set: dict[str, list] = {}
        for s in index.select(args.split, normal=False):
            by_set.setdefault(label_set_name([s.labels[c] for c in columns], classes), []).append(s)
        for name in args.sets:
            if not by_set.get(name):
                known = ", ".join(sorted(by_set))
                raise DganError(
                    f"split {args.split!r} has no real defect of label set {name!r}; its sets: "
                    f"{known}",
                    exit_code=2,
                )
    except DganError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    size = config.data.image_size
    x = to_unit_range(load_images([s.path for s in normals], size))

    def row(images) -> np.ndarray:  # [-1, 1] (B, 3, S, S) -> (S, per_row * S, 3) uint8
        cells = np.full((size, args.per_row * size, 3), 255, dtype=np.uint8)
        for i, image in enumerate(images[: args.per_row]):
            pixels = image.permute(1, 2, 0).add(1).mul(127.5).round().clamp(0, 255)
            cells[:, i * size : (i + 1) * size] = pixels.to(torch.uint8).numpy()
        return cells

    white = np.full((2, args.per_row * size, 3), 255, dtype=np.uint8)
    rows = []
    for name in args.sets:
        real = to_unit_range(load_images([s.path for s in by_set[name][: args.per_row]], size))
        labels = torch.tensor([float(c in name.split("-")) for c in classes]).expand(len(x), -1)
        with torch.inference_mode():
            fakes, _ = deface(G, x, labels.clone(), seed=args.seed)
        rows += [row(real), row(fakes), white]
    sheet = np.concatenate(rows[:-1]).repeat(args.scale, 0).repeat(args.scale, 1)
    atomic_save_image(Image.fromarray(sheet), args.out, compress_level=9)
    print(f"wrote {args.out}: {', '.join(args.sets)}; real rows above G's ({args.split} split)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
