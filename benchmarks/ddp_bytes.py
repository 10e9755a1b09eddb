"""Gradient bytes DDP all-reduces per Defect-GAN iteration, and a ring all-reduce's time for them.

python benchmarks/ddp_bytes.py           # the paper preset (128 px), CODEBRIM's 5 classes
python benchmarks/ddp_bytes.py --config demo --classes 5 --gpus 2 8 --links 10 100

G and D are built by the trainer's own constructor (dgan.models.build_gan) from the resolved
config. Under DDP each is its own prepared module: every iteration all-reduces D's gradients (one
backward per D update, the gradient penalty included), and every n_critic-th iteration also G's
(D's parameters are frozen during G's update). Gradients are fp32 whatever train.mixed_precision
says: autocast changes the activations' dtype, not the parameters'. The bf16 column is what a bf16
gradient-compression hook would send (torch's bf16_compress_hook); dgan registers none.

The time is the bandwidth term of a ring all-reduce, 2 (N-1)/N x bytes / link bandwidth: no
latency term, no overlap with the backward pass (DDP overlaps its buckets with it, so the exposed
part is smaller), every hop at the link's rate.
"""

from __future__ import annotations

import argparse

MB = 1e6  # decimal megabytes, as link bandwidths are decimal


def trainable_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def buffer_bytes(module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def ring_seconds(nbytes: float, gpus: int, gbit_per_s: float) -> float:
    """The bandwidth term of a ring all-reduce of `nbytes` over `gpus` ranks."""
    return 2 * (gpus - 1) / gpus * nbytes / (gbit_per_s * 1e9 / 8)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", help="GAN preset(s) (default: paper)")
    parser.add_argument("--set", action="append", default=[], help="section.key=value")
    parser.add_argument("--classes", type=int, default=5, help="categories (CODEBRIM: 5)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--links", type=float, nargs="+", default=[10, 25, 100], help="Gb/s")
    args = parser.parse_args()

    from dgan.config import load_config
    from dgan.models import build_gan

    config = load_config("gan", args.config or ["paper"], args.set)
    G, D = build_gan(config, args.classes)
    n_critic = config.train.n_critic
    g_params, d_params = trainable_parameters(G), trainable_parameters(D)
    g_bytes, d_bytes = 4 * g_params, 4 * d_params  # fp32 gradients
    size = config.data.image_size
    print(
        f"Defect-GAN, preset {'+'.join(args.config or ['paper'])}: {size} px, {args.classes} "
        f"classes, G width {config.generator.conv_dim}, D width {config.discriminator.conv_dim}, "
        f"n_critic {n_critic}, global batch {config.train.batch_size}"
    )
    for name, params, nbytes, net in (("G", g_params, g_bytes, G), ("D", d_params, d_bytes, D)):
        print(
            f"  {name}: {params:>11,} trainable parameters -> {nbytes / MB:7.1f} MB of fp32 "
            f"gradients ({nbytes / 2 / MB:.1f} MB as bf16); buffers {buffer_bytes(net)} B"
        )
    mean = d_bytes + g_bytes / n_critic
    print(
        f"all-reduced per iteration (1 MB = 10^6 bytes), D every iteration, G every {n_critic}th:"
    )
    print(f"  D-only iteration          : {d_bytes / MB:7.1f} MB fp32")
    print(f"  iteration with G's update : {(d_bytes + g_bytes) / MB:7.1f} MB fp32")
    print(f"  mean over the cycle       : {mean / MB:7.1f} MB fp32, {mean / 2 / MB:.1f} MB bf16")
    print()
    print("Ring all-reduce, bandwidth term only: 2 (N-1)/N x bytes / link bandwidth")
    print()
    header = [
        "link",
        "GPUs",
        "D update, fp32",
        "G update, fp32",
        "mean per iteration, fp32",
        "mean per iteration, bf16",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for link in args.links:
        for gpus in args.gpus:
            cells = [
                f"{link:g} Gb/s",
                str(gpus),
                ms(ring_seconds(d_bytes, gpus, link)),
                ms(ring_seconds(g_bytes, gpus, link)),
                ms(ring_seconds(mean, gpus, link)),
                ms(ring_seconds(mean / 2, gpus, link)),
            ]
            print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
