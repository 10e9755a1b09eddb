"""How far a trained Defect-GAN's restoration replaces a real defect, and how far it blends.

python benchmarks/mask_coverage.py runs/gan/00000-demo                 # its latest checkpoint
python benchmarks/mask_coverage.py runs/gan/00000-demo --data data/demo --n 128

Restoration is G(d, A = 0) = d * (1 - m) + f * m (Eq. 1-4). Where m < 1 inside a defect, (1 - m)
of the defect stays in the output, and f can only hide it by painting past the surface colour, on
the far side of it from the defect's: the cyan or green blob left where rust was. This prints, over
the real test defects that have a mask: m's mean inside the true defect mask and the share of
those pixels where m > 0.9 (a replacement, not a blend), and the chroma (mean |pixel - its grey|,
pixels in [-1, 1]) of the output and of f there, beside the real normals' chroma.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a dgan train gan run directory")
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: the run's)")
    parser.add_argument("--n", type=int, default=64, help="real test defects with a mask")
    args = parser.parse_args(argv)

    from dgan.config import load_config
    from dgan.data import open_dataset
    from dgan.data.loader import to_unit_range
    from dgan.errors import DganError
    from dgan.evaluation.inputs import load_images, load_masks
    from dgan.metrics.appearance import chroma
    from dgan.models import build_gan
    from dgan.run import checkpoint as ckpt

    checkpoints = ckpt.list_checkpoints(args.run_dir) if args.run_dir.is_dir() else []
    if not checkpoints:
        print(f"error: {args.run_dir} holds no checkpoint; name a dgan train gan run directory")
        return 2
    try:
        config = load_config("gan", [str(args.run_dir / "config.yaml")])
    except DganError as err:
        print(f"error: {args.run_dir / 'config.yaml'} is not a config this dgan reads:\n{err}")
        return 2
    state = torch.load(checkpoints[-1] / "state.pt", map_location="cpu", weights_only=True)
    G, _ = build_gan(config, state["classes"])
    G.load_state_dict(state["G_ema"] or state["G"])
    G.eval()
    index = open_dataset(args.data or config.data.root)
    size = config.data.image_size
    defects = [s for s in index.select("test", normal=False) if s.mask is not None][: args.n]
    normals = index.select("test", normal=True)[: args.n]
    if not defects:
        print(f"error: {index.root} has no test defect with a mask; masks are what this measures")
        return 2
    x = to_unit_range(load_images([s.path for s in defects], size))
    inside = load_masks([s.mask for s in defects], size)
    real_normals = to_unit_range(load_images([s.path for s in normals], size))
    with torch.no_grad():
        out = G(x, torch.zeros(len(x), len(state["classes"])))

    def mean_inside(t: torch.Tensor) -> float:
        return float((t * inside).sum() / inside.sum())

    m = out.defect_mask
    print(f"{checkpoints[-1]} ({len(defects)} real test defects, {size} px)")
    print(f"  m inside the true defect mask: mean {mean_inside(m):.3f}, "
          f"share above 0.9 {mean_inside((m > 0.9).float()):.3f}")  # fmt: skip
    print(f"  chroma there: restored output {mean_inside(chroma(out.image)):.3f}, "
          f"foreground f {mean_inside(chroma(out.foreground)):.3f}, "
          f"real normals {float(chroma(real_normals).mean()):.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
