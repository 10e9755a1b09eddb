"""Throughput of the demo-set generator: images per second, written to disk as PNG.

python benchmarks/bench_demo_data.py [--images 2000] [--size 64] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from dgan.data.demo import generate_demo, render_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="normal + defect images")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="default: all CPUs")
    args = parser.parse_args()
    workers = args.workers or os.cpu_count() or 1
    n_defect = max(1, args.images // 3)
    n_normal = max(1, args.images - n_defect)

    start = time.perf_counter()
    for kind in ("normal", "defect"):
        for index in range(50):
            render_sample(0, kind, index, args.size)
    render_s = (time.perf_counter() - start) / 100

    scratch = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    try:
        start = time.perf_counter()
        generate_demo(scratch / "demo", n_normal, n_defect, args.size, workers=workers)
        elapsed = time.perf_counter() - start
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    total = n_normal + n_defect
    print(f"size {args.size}px, {total} images ({n_normal} normal, {n_defect} defect)")
    print(f"render only, 1 process: {render_s * 1e3:.2f} ms/image ({1 / render_s:.0f} images/s)")
    print(f"generate_demo, {workers} workers: {elapsed:.2f} s, {total / elapsed:.0f} images/s")


if __name__ == "__main__":
    main()
