"""The paper preset's training step on one device: iterations per second in fp32 and bf16, at
batch 4 and at the largest batch that fits, with the peak device memory of each.

An iteration is the trainer's own: D's step every iteration, G's step (sharing G's first pass)
every n_critic-th, and the EMA of G; the figure is the mean over one n_critic cycle. Batches are
random tensors already on the device, so this measures the step, not the loader.

    python benchmarks/gpu_check.py --size 128 --preset paper            # on a GPU (gpu_check.sh)
    python benchmarks/gpu_check.py --size 32 --width 8 --max-batch 8    # a CPU smoke run
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

from dgan.config import load_config
from dgan.data import CODEBRIM_CLASSES
from dgan.run.launch import make_accelerator
from dgan.train.gan import build_nets, d_step, first_pass, g_step, update_ema

CLASSES = list(CODEBRIM_CLASSES)  # names: a preset may paint layered label sets


class Step:
    """The trainer's iteration on a fixed batch: `d()` D only, `g()` D then G (one first pass)."""

    def __init__(self, preset: str, size: int, batch: int, width: int | None, precision: str):
        overrides = [f"data.image_size={size}", f"train.batch_size={batch}", "data.root=."]
        overrides.append(f'train.mixed_precision="{precision}"')  # YAML reads no as false
        if width is not None:
            overrides += [f"generator.conv_dim={width}", f"discriminator.conv_dim={width}"]
        self.config = load_config("gan", [preset], overrides)
        self.accelerator = make_accelerator("gan", precision, None)
        self.nets = build_nets(self.config, CLASSES, self.accelerator)
        device = self.accelerator.device
        gen = torch.Generator().manual_seed(0)
        half = batch // 2  # train.batch_size counts images: half normals, half defects

        def rand(*shape):
            return torch.rand(*shape, generator=gen).to(device)

        self.batch = {
            "normal": rand(half, 3, size, size) * 2 - 1,
            "defect": rand(half, 3, size, size) * 2 - 1,
            "defect_labels": (rand(half, len(CLASSES)) > 0.5).float(),
            "target_labels": (rand(half, len(CLASSES)) > 0.5).float(),
            "alpha": rand(half, 2),
            "region": torch.zeros(half, 5, device=device),
            "d_augment": rand(half, 6, 4),
            "layer_draw": rand(half),
        }

    def d(self) -> None:
        d_step(self.nets, self.batch, self.config, self.accelerator)

    def g(self) -> None:
        first = first_pass(self.nets, self.batch, self.config)
        d_step(self.nets, self.batch, self.config, self.accelerator, first)
        g_step(self.nets, self.batch, self.config, self.accelerator, first)
        if self.nets.G_ema is not None:
            update_ema(self.nets.G_ema, self.nets.G_raw, 0.999)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure(step: Step, cycles: int) -> float:
    """Seconds per iteration: the median n_critic cycle over `cycles`, after one warm-up."""
    n_critic = step.config.train.n_critic
    times = []
    for c in range(cycles + 1):
        sync()
        t0 = time.perf_counter()
        for _ in range(n_critic - 1):
            step.d()
        step.g()
        sync()
        if c:
            times.append((time.perf_counter() - t0) / n_critic)
    return statistics.median(times)


def run(preset, size, batch, width, precision, cycles) -> dict | None:
    """One setting; None when it does not fit in device memory."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        step = Step(preset, size, batch, width, precision)
        seconds = measure(step, cycles)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        step = None  # noqa: F841 - free the nets before the next setting
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"batch": batch, "s_per_it": seconds, "it_per_s": 1 / seconds,
            "images_per_s": batch / seconds, "peak_gib": peak}  # fmt: skip


def row(precision: str, r: dict) -> str:
    peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
    return (
        f"  {precision:5} batch {r['batch']:4d}: {r['it_per_s']:8.2f} it/s  "
        f"{r['images_per_s']:9.1f} images/s  {r['s_per_it'] * 1000:9.1f} ms/it  peak {peak} GiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--width", type=int, default=None, help="G and D width (preset's)")
    parser.add_argument("--precision", nargs="+", default=["no", "bf16"], help="no = fp32")
    parser.add_argument("--max-batch", type=int, default=512, help="stop doubling here")
    parser.add_argument("--cycles", type=int, default=5, help="timed n_critic cycles")
    args = parser.parse_args()
    if len(args.precision) > 1:  # Accelerate's state is one per process: one process each
        for precision in args.precision:
            argv = ["--preset", args.preset, "--size", str(args.size), "--precision", precision,
                    "--max-batch", str(args.max_batch), "--cycles", str(args.cycles)]  # fmt: skip
            argv += [] if args.width is None else ["--width", str(args.width)]
            subprocess.run([sys.executable, __file__, *argv], check=False)
        return
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    where = f"device: {device}; preset {args.preset} at {args.size} px; torch {torch.__version__}"
    print(f"{args.precision[0]}: {where}")
    for precision in args.precision:
        name = "fp32" if precision == "no" else precision
        first = run(args.preset, args.size, 4, args.width, precision, args.cycles)
        if first is None:
            print(f"  {name}: batch 4 does not fit")
            continue
        print(row(name, first), flush=True)
        largest, batch = first, 8
        while batch <= args.max_batch:  # double until it does not fit
            r = run(args.preset, args.size, batch, args.width, precision, max(2, args.cycles // 2))
            if r is None:
                break
            largest, batch = r, batch * 2
        note = "" if batch <= args.max_batch else f" (stopped at --max-batch {args.max_batch})"
        print(row(name, largest) + f"  <- largest batch that fits{note}", flush=True)


if __name__ == "__main__":
    main()
