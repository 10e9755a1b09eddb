"""Synthesis throughput: the bare generator forward against end-to-end `dgan synth`, and memory.

1. Bare forward: the EMA generator's work per image (defacement, plus restoration when restored
   normals are written) on batches already in memory, in inference mode: the ceiling.
2. End to end: `run_synth` on the same batch and image size, reading normals from disk and
   writing PNGs, masks and the manifest; the rate counts from the first batch to the last file.
3. Their ratio (the goal is at least 0.9).
4. Peak memory (max RSS of the synth process, and of its loader workers) for two values of --n,
   each in a fresh process: it must not grow with n.

The generator is the given one, or a freshly initialised one of the preset's architecture (the
cost of a forward does not depend on the weights).

    python benchmarks/bench_synth.py --config demo --batch 64 --n 2000 --memory-n 1000 20000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `dgan synth` sets it, before torch

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image

from dgan.config import load_config
from dgan.events import Events
from dgan.inference import deface, restore
from dgan.synth.run import _device, prepare_job, run_synth


def busy_note() -> str:
    load1 = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    return f"load average {load1:.2f} on {cores} cores" + (
        " (BUSY: other processes compete; figures are pessimistic)" if load1 > 0.5 * cores else ""
    )


def make_generator(work: Path, presets: list[str], size: int) -> Path:
    from dgan.models import build_gan
    from dgan.models.export import save_generator

    config = load_config("gan", presets, [f"data.image_size={size}", f"data.root={work}"])
    classes = ["crack", "spallation", "efflorescence", "exposed_bars", "corrosion_stain"]
    G, _ = build_gan(config, classes)
    for injection in G.noise:  # noise on, as in a trained model
        torch.nn.init.constant_(injection.noise_strength, 0.1)
    return save_generator(G.eval(), config, classes, work / "generator")


def make_normals(directory: Path, count: int, size: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(60, 200, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"n{i:05d}.png")
    return directory


def synth_config(generator: Path, normals: Path, out: Path, n: int, args) -> object:
    return load_config(
        "synth",
        [],
        [
            f"generator={generator}", f"normals={normals}", f"out={out}", f"n={n}",
            f"batch_size={args.batch}", f"num_workers={args.workers}", f"writers={args.writers}",
            f"restored={str(not args.no_restored).lower()}", "classes=[crack]",
        ],
    )  # fmt: skip


def bare_forward(config, batches: int) -> float:
    """Images per second of the generator alone, on in-memory batches."""
    job = prepare_job(config)
    device = _device()
    G = job.generator.to(device).eval()
    b, size = config.batch_size, job.size
    normals = torch.rand(b, 3, size, size, device=device) * 2 - 1
    labels = torch.zeros(b, len(job.classes), device=device)
    labels[:, 0] = 1
    seeds = list(range(b))
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            deface(G, normals, labels, None, seed=seeds)
        t0 = time.perf_counter()
        for _ in range(batches):
            defects, masks = deface(G, normals, labels, None, seed=seeds)
            if config.restored:
                restore(G, defects, seed=seeds)
            # the pipeline also moves results to the host; so does the ceiling
            defects.cpu(), masks.cpu()
        seconds = time.perf_counter() - t0
    return batches * b / seconds


def peak_memory(generator: Path, normals: Path, out: Path, n: int, args) -> dict:
    """Run synthesis for n images in a fresh process; report its peak RSS and its workers'."""
    code = f"""
import json, resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from bench_synth import synth_config
from dgan.events import Events
from dgan.synth.run import run_synth
import argparse
args = argparse.Namespace(**json.loads({json.dumps(vars(args), default=str)!r}))
run_synth(synth_config({str(generator)!r}, {str(normals)!r}, {str(out)!r}, {n}, args),
          events=Events())
print(json.dumps({{"self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "workers_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}}))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", default=None, help="GAN preset(s)")
    parser.add_argument("--generator", type=Path, help="a trained generator (default: fresh)")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--no-restored", action="store_true")
    parser.add_argument("--memory-n", type=int, nargs="*", default=[1000, 20000])
    args = parser.parse_args()
    presets = args.config or ["demo"]

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generator = args.generator or make_generator(work, presets, args.size)
        normals = make_normals(work / "normals", 500, args.size)
        config = synth_config(generator, normals, work / "synth", args.n, args)
        print(f"device {_device()}, torch threads {torch.get_num_threads()}; {busy_note()}")
        what = "deface + restore" if config.restored else "deface"
        ceiling = bare_forward(config, batches=max(3, args.n // args.batch // 2))
        print(f"bare generator forward ({what}), batch {args.batch}: {ceiling:.1f} images/s")
        result = run_synth(config, events=Events())  # silent
        rate = result.metrics["images_per_second"]
        print(f"end-to-end dgan synth, n={args.n}: {rate:.1f} images/s ({result.seconds:.1f} s)")
        print(f"ratio end-to-end / bare forward: {rate / ceiling:.3f} (goal >= 0.9)")
        for n in args.memory_n:
            mem = peak_memory(generator, normals, work / f"mem{n}", n, args)
            print(
                f"peak RSS for n={n}: synth process {mem['self_mb']:.0f} MB, "
                f"largest loader worker {mem['workers_mb']:.0f} MB"
            )
        print(busy_note())


if __name__ == "__main__":
    main()
