"""How synthesized defects differ from real ones inside the defect: size, tone, colour, texture.

python benchmarks/defect_appearance.py runs/gan/00000-demo              # its latest checkpoint
python benchmarks/defect_appearance.py models:/defect-gan@champion --data data/demo --n 128

For each category, the real defects of that category alone (inside their annotated masks, at most
--n) against defacements of --n real normals of the same split asked for that category (weighted
by m, so a pixel that m half blends counts half), pixels in [-1, 1]:
- area: the share of the image the defect covers (real: its mask; synthesized: the mean of m);
- grey: the mean grey level inside (-1 black, 1 white);
- chroma: the mean |channel - the channels' mean| inside (0 for grey pixels);
- texture: the mean |Laplacian| of the grey image inside (0 on a flat patch; speckle, thin lines
  and sharp edges raise it).
The realism test says how often a fresh classifier tells the two sets apart; these say in what
way they differ. m inside: m's mean over the pixels where m > 0.1 (1: G replaces the surface there,
0.5: it blends the defect half into it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", help="a run directory, checkpoint, export or models:/ URI")
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: the model's)")
    parser.add_argument("--split", default="test", help="which split's images (test)")
    parser.add_argument("--n", type=int, default=64, help="images of each category (64)")
    parser.add_argument("--seed", type=int, default=0, help="the noise of the defacements")
    args = parser.parse_args(argv)

    import torch

    from dgan.data import open_dataset
    from dgan.data.loader import select_classes, to_unit_range
    from dgan.errors import DganError
    from dgan.evaluation.inputs import load_images, load_masks, require_split
    from dgan.inference import deface
    from dgan.metrics.appearance import appearance
    from dgan.tracking.source import load_generator_from, resolve_model

    try:
        if args.n < 1:
            raise DganError(f"--n must be at least 1, got {args.n}", exit_code=2)
        G, config, classes = load_generator_from(resolve_model(args.model, "gan"), "cpu")
        index = open_dataset(args.data or config.data.root or Path("data/demo"))
        require_split(index, args.split)
        columns = select_classes(index, classes)
        normals = index.select(args.split, normal=True)[: args.n]
        if not normals:
            raise DganError(f"split {args.split!r} of {index.root} has no normal image")
    except DganError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if not G.lwc:
        print("error: the model paints no spatial distribution map m (generator.lwc is off)",
              file=sys.stderr)  # fmt: skip
        return 2
    size = config.data.image_size
    x = to_unit_range(load_images([s.path for s in normals], size))
    print(f"inside the defect: real ({args.split} split, annotated masks) against synthesized "
          f"(defacements of {len(x)} {args.split} normals, weighted by m; {size} px, "
          f"seed {args.seed})")  # fmt: skip
    head = ("category", "n real", "area", "grey", "chroma", "texture", "m inside")
    print(f"{head[0]:<17} {head[1]:>6}  " + "  ".join(f"{h:>13}" for h in head[2:6])
          + f"  {head[6]:>8}")  # fmt: skip
    print(f"{'':<17} {'':>6}  " + "  ".join(f"{'real / synth':>13}" for _ in head[2:6]))
    for i, name in enumerate(classes):
        alone = [
            s for s in index.select(args.split, normal=False)
            if s.mask is not None and s.labels[columns[i]]
            and sum(s.labels[c] for c in columns) == 1
        ][: args.n]  # fmt: skip
        labels = torch.zeros(len(x), len(classes))
        labels[:, i] = 1
        with torch.inference_mode():
            fakes, m = deface(G, x, labels, seed=args.seed)
        synth = appearance(fakes, m)
        inside = float(m[m > 0.1].mean()) if bool((m > 0.1).any()) else float("nan")
        if alone:
            real_x = to_unit_range(load_images([s.path for s in alone], size))
            real = appearance(real_x, load_masks([s.mask for s in alone], size))
            cells = [(real.area, synth.area), (real.grey, synth.grey),
                     (real.chroma, synth.chroma), (real.texture, synth.texture)]  # fmt: skip
            row = "  ".join(f"{r:>6.3f} {s:>6.3f}" for r, s in cells)
        else:  # no real defect of this category alone: the synthesized side only
            cells = [synth.area, synth.grey, synth.chroma, synth.texture]
            row = "  ".join(f"{'-':>6} {s:>6.3f}" for s in cells)
        print(f"{name:<17} {len(alone):>6}  {row}  {inside:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
