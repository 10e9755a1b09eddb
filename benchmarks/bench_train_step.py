"""Training-step cost of Defect-GAN, of its StarGAN setting, and of the official StarGAN step.

Per size, three settings at the same batch, width and D depth:

- "stargan setting": dgan's trainer with every Table 2 switch off;
- "defect-gan": dgan's trainer with SCC, ANI, LWC and SC on;
- "official stargan": the official StarGAN step (benchmarks/stargan_reference.py), timed in the
  same process, round by round beside ours, so that machine noise hits all three alike.

At 128 px it also times the closest public Defect-GAN, de-i2i-gan (benchmarks/
de_i2i_gan_reference.py), beside dgan's full model on the same images: de-i2i-gan's batch B is
B normals and B defects, dgan's train.batch_size counts both, so dgan runs at 2B there.

Each prints the D-only iteration, the iteration with the G update, their n_critic mean (s and
images/s) and the bare G forward as the floor. Batches are synthetic and in memory, so this
measures the step, not the loader. The figures measured for the official code and de-i2i-gan on
this machine class (shared FIELD-NOTES) are printed beside them.

    python benchmarks/bench_train_step.py --size 32 64 128 --batch 4 --width 64 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from de_i2i_gan_reference import DeI2iGanStep
from stargan_reference import ReferenceStep

from dgan.config import load_config
from dgan.run.launch import make_accelerator
from dgan.train.gan import build_nets, d_step, first_pass, g_step, update_ema

# Seconds per iteration on 2 CPU threads, batch 4, conv_dim 64 (FIELD-NOTES.md).
STARGAN_REFERENCE = {32: (0.57, 0.62), 64: (2.46, 2.60), 128: (3.2, 3.8)}
STARGAN_REFERENCE_MEAN = {32: (0.65, 0.70), 64: (2.62, 2.81), 128: (4.0, 4.5)}
DE_I2I_GAN_MEAN_128 = 7.6


def busy_note() -> str:
    load1 = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    return f"load average {load1:.2f} on {cores} cores" + (
        " (BUSY: other processes compete; figures are pessimistic)" if load1 > 0.5 * cores else ""
    )


class Ours:
    """dgan's trainer on a fixed batch: `d()` is a D-only iteration, `g()` adds G's update."""

    def __init__(self, size: int, batch: int, width: int, switches: bool, d_layers: int):
        overrides = [
            f"data.image_size={size}",
            f"train.batch_size={batch}",
            f"generator.conv_dim={width}",
            f"discriminator.conv_dim={width}",
            f"discriminator.n_layers={d_layers}",
            "data.root=.",
        ]
        presets = [] if switches else ["table2/stargan"]
        self.config = load_config("gan", presets, overrides)
        self.accelerator = make_accelerator("gan", self.config.train.mixed_precision, None)
        classes = 5
        self.nets = build_nets(self.config, classes, self.accelerator)
        gen = torch.Generator().manual_seed(0)
        half = batch // 2  # train.batch_size counts images: half normals, half defects
        self.batch = {
            "normal": torch.rand(half, 3, size, size, generator=gen) * 2 - 1,
            "defect": torch.rand(half, 3, size, size, generator=gen) * 2 - 1,
            "defect_labels": (torch.rand(half, classes, generator=gen) > 0.5).float(),
            "target_labels": (torch.rand(half, classes, generator=gen) > 0.5).float(),
            "alpha": torch.rand(half, 2, generator=gen),
            "region": torch.zeros(half, 5),  # the paper's constant control map
            "d_augment": torch.rand(half, 6, 4, generator=gen),
        }
        self.G, self.D = self.nets.G_raw, self.nets.D_raw

    def d(self) -> None:
        d_step(self.nets, self.batch, self.config, self.accelerator)

    def g(self) -> None:  # as the training loop: G's first pass once, for both steps
        first = first_pass(self.nets, self.batch, self.config)
        d_step(self.nets, self.batch, self.config, self.accelerator, first)
        g_step(self.nets, self.batch, self.config, self.accelerator, first)
        if self.nets.G_ema is not None:
            update_ema(self.nets.G_ema, self.nets.G_raw, 0.999)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_size(size: int, batch: int, width: int, repeats: int) -> dict[str, dict]:
    # StarGAN's D: 6 stride-2 layers, 5 at 32 px (as in the reference timing).
    d_layers = 5 if size == 32 else 6
    ref = ReferenceStep(size, batch, width, d_layers)
    settings = {
        "stargan setting": Ours(size, batch, width, False, d_layers),
        "defect-gan": Ours(size, batch, width, True, d_layers),
        "official stargan": ref,
    }
    x = torch.rand(batch, 3, size, size) * 2 - 1
    times: dict[str, dict[str, list[float]]] = {k: {"d": [], "g": [], "f": []} for k in settings}
    for r in range(repeats + 1):  # the first round warms up
        for name, step in settings.items():
            d, g = timed(step.d), timed(step.g)
            with torch.no_grad():  # the forward-pass limit: G on a whole batch, nothing else
                c = torch.zeros(batch, 5)  # labels: A as training gives it
                f = timed(lambda s=step, c=c: s.G(x, c))
            if r:
                times[name]["d"].append(d)
                times[name]["g"].append(g)
                times[name]["f"].append(f)
    rows = {}
    for name, step in settings.items():
        d, g, f = (statistics.median(times[name][k]) for k in ("d", "g", "f"))
        n_critic = 5
        rows[name] = {
            "d": d,
            "dg": g,
            "mean": (d * (n_critic - 1) + g) / n_critic,
            "fwd": f,
            "pg": sum(p.numel() for p in step.G.parameters()) / 1e6,
            "pd": sum(p.numel() for p in step.D.parameters()) / 1e6,
        }
    return rows


def time_de_i2i_gan(size: int, batch: int, width: int, repeats: int) -> dict[str, dict]:
    """dgan's full model and de-i2i-gan on the same images per iteration (batch pairs)."""
    settings = {
        f"defect-gan ({2 * batch})": Ours(size, 2 * batch, width, True, 6),
        f"de-i2i-gan ({batch}+{batch})": DeI2iGanStep(size, batch, width),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"d": [], "g": []} for k in settings}
    for r in range(repeats + 1):  # the first round warms up
        for name, step in settings.items():
            d, g = timed(step.d), timed(step.g)
            if r:
                times[name]["d"].append(d)
                times[name]["g"].append(g)
    rows = {}
    for name in settings:
        d, g = (statistics.median(times[name][k]) for k in ("d", "g"))
        rows[name] = {"d": d, "dg": g, "mean": (4 * d + g) / 5, "images": 2 * batch}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {busy_note()}")
    print(
        f"batch {args.batch}, conv_dim {args.width}, n_critic 5; "
        f"seconds are medians of {args.repeats}"
    )
    for size in args.size:
        rows = time_size(size, args.batch, args.width, args.repeats)
        print(f"\n{size} px")
        print(
            f"  {'setting':<17} {'G/D Mparams':>12} {'D-only s':>9} {'D+G s':>8} "
            f"{'mean s/it':>10} {'img/s':>7} {'G fwd s':>8}"
        )
        for name, r in rows.items():
            print(
                f"  {name:<17} {r['pg']:5.1f}/{r['pd']:<6.1f} {r['d']:9.3f} {r['dg']:8.3f} "
                f"{r['mean']:10.3f} {args.batch / r['mean']:7.1f} {r['fwd']:8.3f}"
            )
        s, full, ref = rows["stargan setting"], rows["defect-gan"], rows["official stargan"]
        lo, hi = STARGAN_REFERENCE_MEAN.get(size, (float("nan"),) * 2)
        print(f"  official StarGAN as measured in FIELD-NOTES: mean {lo}-{hi} s/it")
        print(
            f"  stargan setting / official stargan (this run): "
            f"{s['mean'] / ref['mean']:.2f}x (goal <= 0.8x)"
        )
        print(f"  defect-gan / stargan setting: {full['mean'] / s['mean']:.2f}x (goal <= 2x)")
        print(f"  defect-gan mean / its G forward (the floor): {full['mean'] / full['fwd']:.1f}x")
        if size == 128:
            print(
                f"  defect-gan / de-i2i-gan mean {DE_I2I_GAN_MEAN_128} s (FIELD-NOTES, batch "
                f"{args.batch}+{args.batch}): {full['mean'] / DE_I2I_GAN_MEAN_128:.2f}x"
            )
            pairs = args.batch
            print(f"\n{size} px, de-i2i-gan beside dgan on {2 * pairs} images per iteration")
            print(f"  {'setting':<22} {'D-only s':>9} {'D+G s':>8} {'mean s/it':>10} {'img/s':>7}")
            both = time_de_i2i_gan(size, pairs, args.width, args.repeats)
            for name, r in both.items():
                print(
                    f"  {name:<22} {r['d']:9.3f} {r['dg']:8.3f} {r['mean']:10.3f} "
                    f"{r['images'] / r['mean']:7.1f}"
                )
            ours, theirs = both.values()
            print(f"  de-i2i-gan as measured in FIELD-NOTES: mean {DE_I2I_GAN_MEAN_128} s/it")
            print(
                f"  defect-gan / de-i2i-gan (this run, same images): "
                f"{ours['mean'] / theirs['mean']:.2f}x (goal <= 0.5x)"
            )
    print(f"\n{busy_note()}")


if __name__ == "__main__":
    main()
