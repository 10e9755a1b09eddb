"""Does D see what the realism test sees? A trained critic's own ranking of real over fake.

python benchmarks/critic_probe.py runs/gan/00000-demo
python benchmarks/critic_probe.py runs/gan/00000-demo/checkpoints/iter-00002000 --data data/ref

Per label set of --min real defects or more, and over all of them: the held-out ROC-AUC with which
the run's trained D_src (the mean of its patch map) ranks the split's real defects above G's
defacements of as many normals, asked for the same label sets; beside it, two classifiers trained
from scratch on the other half of each set (--steps Adam steps per 600 training images, as the
realism test's): one of D's own architecture, read through the same D_src output, and the
realism test's small CNN. The defacements are made by G's running average (what synthesis uses)
and by G itself (what D was trained against). A trained critic well below a fresh one of its
shape has stopped looking at what gives the fakes away; one level with it sees the flaw, and G
does not follow it there.
0.5: cannot tell them apart; 1.0: always can.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, help="a Defect-GAN run directory or checkpoint")
    parser.add_argument("--data", type=Path, default=None, help="dataset (default: the run's)")
    parser.add_argument("--split", default="train", help="whose real defects and normals (train)")
    parser.add_argument("--n", type=int, default=600, help="real defects, at most (600)")
    parser.add_argument("--min", type=int, default=40, help="real defects for a set's row (40)")
    parser.add_argument("--steps", type=int, default=300, help="fresh classifiers' steps (300)")
    parser.add_argument("--seed", type=int, default=0, help="inputs, halves and noise (0)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from torch.nn import functional as F
    from torchmetrics.functional.classification import binary_auroc

    from dgan.data import open_dataset
    from dgan.data.loader import select_classes
    from dgan.errors import DganError
    from dgan.evaluation.inputs import require_split
    from dgan.evaluation.realism import make_realism_inputs, synthesize
    from dgan.metrics.realism import BATCH, _as_unit, _halves, scaled_steps, two_sample_test
    from dgan.models import build_gan
    from dgan.run.checkpoint import list_checkpoints, load_checkpoint
    from dgan.tracking.source import ModelSource, read_model_config

    def auc(real: torch.Tensor, fake: torch.Tensor) -> float:
        scores = torch.cat([fake, real])
        target = torch.cat([torch.zeros(len(fake)), torch.ones(len(real))]).long()
        return float(binary_auroc(scores, target))

    try:
        if args.n < 4 or args.min < 4 or args.steps < 1:
            raise DganError("--n and --min must be at least 4, --steps at least 1", exit_code=2)
        path = args.run
        if not path.exists():
            raise DganError(f"{path} does not exist; give a Defect-GAN run directory or checkpoint")
        checkpoint = path if (path / "state.pt").is_file() else None
        if checkpoint is None and (found := list_checkpoints(path)):
            checkpoint = found[-1]
        if checkpoint is None:
            raise DganError(
                f"{path} holds no training checkpoint (state.pt, or checkpoints/ of a run): D is "
                "saved only in checkpoints, not in an exported generator or a registered model",
                exit_code=2,
            )
        config = read_model_config(ModelSource(str(checkpoint), checkpoint=checkpoint), "gan")
        state, _ = load_checkpoint(checkpoint)
        if "D" not in state:
            raise DganError(f"{checkpoint} is not a Defect-GAN checkpoint (no discriminator)")
        classes = list(state["classes"])
        index = open_dataset(args.data or config.data.root or Path("data/demo"))
        require_split(index, args.split)
        columns = select_classes(index, classes)
        g = config.discriminator.minibatch_std
        if g and (BATCH // 2) % g:
            raise DganError(f"a D with minibatch_std={g} is not probed here: give a divisor of 32")

        torch.manual_seed(config.train.seed)
        G_ema, D = build_gan(config, classes)
        G_raw, _ = build_gan(config, classes)
        G_ema.load_state_dict(state["G_ema"] or state["G"])
        G_raw.load_state_dict(state["G"])
        D.load_state_dict(state["D"])
        for net in (G_ema, G_raw, D):
            net.eval()
        size = config.data.image_size
        inputs = make_realism_inputs(
            index, args.split, columns, classes, size, args.seed, args.n, by_set=True
        )
        groups = np.asarray(inputs.groups)
        rows = {"all": torch.arange(inputs.n)}
        for key in dict.fromkeys(inputs.groups):
            ix = np.flatnonzero(groups == key)
            if len(ix) >= args.min:
                rows[key] = torch.from_numpy(ix)

        def src_scores(net, images, labels) -> torch.Tensor:
            """D_src's mean patch logit per image, in runs of one kind (minibatch_std)."""
            out = []
            with torch.no_grad():
                parts = zip(
                    _as_unit(images).split(BATCH // 2), labels.split(BATCH // 2), strict=True
                )
                for x, y in parts:
                    out.append(net(x, y, with_cls=False)[0].mean(dim=(1, 2, 3)))
            return torch.cat(out)

        def halves(groups) -> torch.Tensor:
            """The test half that two_sample_test holds out for these items and groups."""
            rng = np.random.default_rng([args.seed, 7])
            return torch.from_numpy(_halves(len(groups), groups, rng))

        def fresh_critic(real, fake, labels, test) -> float:
            """D's architecture from scratch, trained as a logistic classifier on one half."""
            a, b, y = _as_unit(real[~test]), _as_unit(fake[~test]), labels[~test]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                _, net = build_gan(config, classes)
                opt = torch.optim.Adam(net.parameters(), lr=2e-3, betas=(0.5, 0.999))
                half = min(BATCH // 2, len(a))
                target = torch.cat([torch.ones(half), torch.zeros(half)])
                for _ in range(scaled_steps(args.steps, 2 * len(a))):  # as the CNN's
                    pick = torch.randperm(len(a))[:half]  # real and fake of the same items
                    x = torch.cat([a[pick], b[pick]])
                    logits = net(x, torch.cat([y[pick], y[pick]]), with_cls=False)[0]
                    loss = F.binary_cross_entropy_with_logits(logits.mean(dim=(1, 2, 3)), target)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                net.eval()
                return auc(
                    src_scores(net, real[test], labels[test]),
                    src_scores(net, fake[test], labels[test]),
                )

        real_src = src_scores(D, inputs.defects, inputs.labels)
        fakes = {}
        scored = {}
        for name, G in (("ema", G_ema), ("raw", G_raw)):
            fakes[name], _ = synthesize(G, inputs, args.seed, 64, "cpu")
            scored[name] = src_scores(D, fakes[name], inputs.labels)
        head = (
            f"{'label set':42s} {'n':>5s} {'trained D, G avg':>17s} {'trained D, G':>13s} "
            f"{'fresh D':>8s} {'fresh CNN':>10s}"
        )
        print(f"critic probe of {checkpoint} on {index.root} ({args.split}); held-out ROC-AUC")
        print(head)
        for key, ix in rows.items():
            # "all" is split within label sets, as realism_auc; a set's row as its own classifier
            groups = inputs.groups if key == "all" else None
            test = halves(groups if groups is not None else [key] * len(ix))
            real, fake, labels = inputs.defects[ix], fakes["ema"][ix], inputs.labels[ix]
            cnn = two_sample_test(real, fake, args.seed, groups=groups, steps=args.steps).auc
            print(
                f"{key:42s} {len(ix):5d} "
                f"{auc(real_src[ix][test], scored['ema'][ix][test]):17.3f} "
                f"{auc(real_src[ix][test], scored['raw'][ix][test]):13.3f} "
                f"{fresh_critic(real, fake, labels, test):8.3f} {cnn:10.3f}",
                flush=True,
            )
    except DganError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
