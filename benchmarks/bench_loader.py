"""Throughput of the Defect-GAN training stream (decode, resize, flip, collate), images/s.

python benchmarks/bench_loader.py --data data/demo --size 32 --batch 16 --workers 0 1 2
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from dgan.data import ensure_demo_dataset, open_dataset
from dgan.data.loader import UnpairedStream, gan_loader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16, help="images per step (half normals)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    index = open_dataset(args.data or ensure_demo_dataset())
    columns = list(range(len(index.classes)))
    stream = UnpairedStream(
        index.select("train", normal=True),
        index.select("train", normal=False),
        columns,
        args.size,
        flip=True,
        seed=0,
    )
    print(
        f"{index.root}: {len(stream.normals)} normals, {len(stream.defects)} defects, "
        f"resized to {args.size} px"
    )
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    for workers in args.workers:
        loader = gan_loader(stream, args.batch // 2, num_workers=workers)
        batches = iter(loader)
        next(batches)  # start-up of the workers is not throughput
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(batches)
        dt = time.perf_counter() - t0
        print(f"  workers {workers}: {args.steps * args.batch / dt:8.0f} images/s")


if __name__ == "__main__":
    main()
