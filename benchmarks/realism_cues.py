"""Which cue tells a generator's images from real ones: colour, or detail finer than 4 px.

python benchmarks/realism_cues.py runs/gan/00000-demo                  # its latest checkpoint
python benchmarks/realism_cues.py models:/defect-gan@champion --data data/demo --seed 1

Runs the realism test of `dgan eval synth` (a classifier two-sample test; 0.5: the classifier
cannot tell the sets apart, 1.0: it always can) on the same defacements and restorations four
times: on the images as they are, in grey (each pixel's mean over the channels), blurred (4 x 4
block means, resized back), and both. Where the AUC falls from the first view to a second, the
cue that view drops is what gave the fakes away: colour (fringes, tints), or fine detail
(outlines, stripes, edges sharper or softer than a real defect's). Where it stays, the fakes
differ in what is left: the shape, size and tone of the defect.
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
    parser.add_argument("--split", default="train", help="which split's real images (train)")
    parser.add_argument("--seed", type=int, default=0, help="inputs, noise and classifier")
    parser.add_argument("--steps", type=int, default=None, help="classifier steps (default 300)")
    args = parser.parse_args(argv)

    from dgan.data import open_dataset
    from dgan.data.loader import select_classes
    from dgan.errors import DganError
    from dgan.evaluation.inputs import require_split
    from dgan.evaluation.realism import make_realism_inputs, synthesize
    from dgan.metrics.realism import CUES, STEPS, realism_by_cue
    from dgan.tracking.source import load_generator_from, resolve_model

    steps = STEPS if args.steps is None else args.steps
    try:
        if steps < 1:
            raise DganError(f"--steps must be at least 1, got {steps}", exit_code=2)
        G, config, classes = load_generator_from(resolve_model(args.model, "gan"), "cpu")
        index = open_dataset(args.data or config.data.root or Path("data/demo"))
        require_split(index, args.split)
        columns = select_classes(index, classes)
        size = config.data.image_size
        inputs = make_realism_inputs(index, args.split, columns, classes, size, args.seed)
    except DganError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    fakes, restored = synthesize(G, inputs, args.seed, 64, "cpu")
    defaced = realism_by_cue(inputs.defects, fakes, args.seed, groups=inputs.groups, steps=steps)
    back = realism_by_cue(inputs.normals, restored, args.seed, steps=steps)
    print(
        f"realism AUC by view ({inputs.n} real defects of split {args.split!r}, {size} px, "
        f"seed {args.seed}, {steps} steps; 0.5: told apart no better than chance)"
    )
    print(f"{'view':<10} {'defacements':>12} {'restorations':>13}")
    for cue in CUES:
        print(f"{cue:<10} {defaced[cue].auc:>12.3f} {back[cue].auc:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
