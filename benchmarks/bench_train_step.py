"""Training-step cost of Defect-GAN and of its StarGAN setting (all switches off), same size.

Prints, per setting: the D-only iteration, the iteration with the G update, their n_critic mean
(ms and images/s), and the bare G forward as the floor. Batches are synthetic and in memory, so
this measures the step, not the loader. Reference figures for the official StarGAN code and for
de-i2i-gan on this machine class come from shared/FIELD-NOTES.md and are printed beside ours.

    python benchmarks/bench_train_step.py --size 32 64 128 --batch 4 --width 64 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from dgan.config import load_config
from dgan.train.gan import build_nets, d_step, g_step, make_accelerator, update_ema

# Seconds per iteration (median) on 2 CPU threads, batch 4, conv_dim 64 (FIELD-NOTES.md).
STARGAN_REFERENCE = {32: (0.57, 0.62), 64: (2.46, 2.60), 128: (3.2, 3.8)}
STARGAN_REFERENCE_MEAN = {32: (0.65, 0.70), 64: (2.62, 2.81), 128: (4.0, 4.5)}
DE_I2I_GAN_MEAN_128 = 7.6


def busy_note() -> str:
    load1 = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    return f"load average {load1:.2f} on {cores} cores" + (
        " (BUSY: other processes compete; figures are pessimistic)" if load1 > 0.5 * cores else ""
    )


def time_setting(
    size: int, batch: int, width: int, switches: bool, repeats: int, d_layers: int | None
):
    overrides = [
        f"data.image_size={size}",
        f"train.batch_size={batch}",
        f"generator.conv_dim={width}",
        f"discriminator.conv_dim={width}",
        "data.root=.",
    ]
    if d_layers:
        overrides.append(f"discriminator.n_layers={d_layers}")
    presets = [] if switches else ["table2/stargan"]
    config = load_config("gan", presets, overrides)
    accelerator = make_accelerator(config, None)
    classes = 5
    nets = build_nets(config, classes, accelerator)
    gen = torch.Generator().manual_seed(0)
    half = batch // 2  # train.batch_size counts images: half normals, half defects
    batch_t = {
        "normal": torch.rand(half, 3, size, size, generator=gen) * 2 - 1,
        "defect": torch.rand(half, 3, size, size, generator=gen) * 2 - 1,
        "defect_labels": (torch.rand(half, classes, generator=gen) > 0.5).float(),
        "target_labels": (torch.rand(half, classes, generator=gen) > 0.5).float(),
        "alpha": torch.rand(half, 2, generator=gen),
        "region": torch.zeros(half, 5),  # the paper's constant control map
    }
    d_times, g_times, fwd_times = [], [], []
    for r in range(repeats + 1):  # the first round warms up
        t0 = time.perf_counter()
        d_step(nets, batch_t, config, accelerator)
        t1 = time.perf_counter()
        g_step(nets, batch_t, config, accelerator)
        if nets.G_ema is not None:
            update_ema(nets.G_ema, nets.G_raw, 0.999)
        t2 = time.perf_counter()
        with torch.no_grad():  # the forward-pass limit: G on a whole batch, nothing else
            x = torch.cat([batch_t["normal"], batch_t["defect"]])
            nets.G_raw(x, torch.zeros(batch, classes, size, size))
        t3 = time.perf_counter()
        if r:
            d_times.append(t1 - t0)
            g_times.append(t2 - t1)
            fwd_times.append(t3 - t2)
    d, g, f = (statistics.median(x) for x in (d_times, g_times, fwd_times))
    n_critic = config.train.n_critic
    mean_iter = d + g / n_critic
    params_g = sum(p.numel() for p in nets.G_raw.parameters()) / 1e6
    params_d = sum(p.numel() for p in nets.D_raw.parameters()) / 1e6
    return {"d": d, "dg": d + g, "mean": mean_iter, "fwd": f, "pg": params_g, "pd": params_d}


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
        # StarGAN's D: 6 stride-2 layers, 5 at 32 px (as in the reference timing).
        d_layers = 5 if size == 32 else 6
        rows = {
            "stargan setting": time_setting(
                size, args.batch, args.width, False, args.repeats, d_layers
            ),
            "defect-gan": time_setting(size, args.batch, args.width, True, args.repeats, d_layers),
        }
        print(f"\n{size} px")
        print(
            f"  {'setting':<16} {'G/D Mparams':>12} {'D-only s':>9} {'D+G s':>8} "
            f"{'mean s/it':>10} {'img/s':>7} {'G fwd s':>8}"
        )
        for name, r in rows.items():
            print(
                f"  {name:<16} {r['pg']:5.1f}/{r['pd']:<6.1f} {r['d']:9.3f} {r['dg']:8.3f} "
                f"{r['mean']:10.3f} {args.batch / r['mean']:7.1f} {r['fwd']:8.3f}"
            )
        s, full = rows["stargan setting"], rows["defect-gan"]
        lo, hi = STARGAN_REFERENCE.get(size, (float("nan"),) * 2)
        mlo, mhi = STARGAN_REFERENCE_MEAN.get(size, (float("nan"),) * 2)
        print(f"  official StarGAN (FIELD-NOTES): median {lo}-{hi} s/it, mean {mlo}-{mhi} s/it")
        print(
            f"  stargan setting / official median: "
            f"{s['mean'] / ((lo + hi) / 2):.2f}x (goal <= 0.8x)"
        )
        print(f"  defect-gan / stargan setting:      {full['mean'] / s['mean']:.2f}x (goal <= 2x)")
        if size == 128:
            print(
                f"  defect-gan / de-i2i-gan mean {DE_I2I_GAN_MEAN_128} s: "
                f"{full['mean'] / DE_I2I_GAN_MEAN_128:.2f}x (goal <= 0.5x)"
            )
    print(f"\n{busy_note()}")


if __name__ == "__main__":
    main()
