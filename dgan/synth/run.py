"""`dgan synth`: batched defacement (and restoration) of normals into a labelled defect set.

The pipeline keeps the generator busy: loader workers read and resize source normals ahead of
it, the EMA generator runs in inference mode (bf16 and channels_last on a GPU), and a pool of
writer threads encodes PNGs behind it. With `--gpus N` (dgan.run.launch), N processes take
every N-th chunk of indices; the main one merges their manifests. See dgan/synth/output.py for
the on-disk contract.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dgan.config import SynthConfig
from dgan.data import DatasetIndex, image_files, open_dataset
from dgan.data.loader import leave_signals_to_the_main_process, load_image, to_unit_range
from dgan.errors import DganError
from dgan.events import ConsoleEvents, Events
from dgan.run.launch import (
    main_only,
    make_accelerator,
    prepare_on_main,
    spawn_workers,
    under_launcher,
)
from dgan.run.result import JobResult
from dgan.synth.output import CHUNK, SynthOutput, chunk_range, image_name, n_chunks, write_png
from dgan.synth.plan import Labels, Plan, read_boxes, region_masks

PAPER_N = 50_000  # Sec. 4.2


@dataclass
class Job:
    """Everything resolved from a SynthConfig, identical in every process."""

    config: SynthConfig
    generator: torch.nn.Module
    classes: list[str]
    size: int
    generator_uri: str
    generator_identity: str
    normals: list[Path]
    masks: list[Path]
    plan: Plan
    n: int

    def identity(self) -> dict:
        """What the output depends on; batch size, workers and processes are not in it."""
        c = self.config
        return {
            "generator": self.generator_identity,
            "n": self.n,
            "seed": c.seed,
            "labels": _labels_identity(self.plan.labels),
            "classes": self.classes,
            "region": c.region,
            "region_source": _files_digest(_region_files(c)),
            "normals": _files_digest(self.normals),
            "restored": c.restored,
            "size": self.size,
            "precision": resolve_precision(c.precision, _device()),
        }


def _labels_identity(labels: Labels) -> str:
    if labels.per_class is not None:
        return f"per_class={labels.per_class}:{labels.fixed_columns()}"
    if labels.fixed is not None:
        return f"fixed={list(labels.fixed)}"
    return "prior=" + hashlib.sha256(np.ascontiguousarray(labels.prior).tobytes()).hexdigest()[:16]


def _region_files(config: SynthConfig) -> list[Path]:
    if config.region == "boxes":
        return [Path(config.region_path)]
    if config.region == "masks":
        return image_files(Path(config.region_path))
    return []


def _files_digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        st = p.stat()
        digest.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise DganError("--precision bf16 needs a GPU; use fp32 or auto on a CPU", exit_code=2)
    return precision


# ---------------------------------------------------------------------------------------------
# Resolving the inputs
# ---------------------------------------------------------------------------------------------


def _open_images(root: Path) -> DatasetIndex | list[Path]:
    """A dataset in a supported layout, or a plain directory of images (all taken as normals)."""
    root = Path(root)
    if not root.is_dir():
        raise DganError(f"normals directory {root} does not exist", exit_code=2)
    try:
        return open_dataset(root)
    except DganError:
        if files := image_files(root):
            return files
        raise DganError(
            f"{root} has no normal images: it is neither a dataset (folder format or CODEBRIM) "
            "nor a directory of .png/.jpg images. Point --normals at one.",
            exit_code=2,
        ) from None


def source_normals(config: SynthConfig, generator_data: Path | None) -> list[Path]:
    root = config.normals or generator_data
    if root is None or not Path(root).exists():
        raise DganError(
            "no source of normal images: the generator's training set "
            f"({generator_data}) is not here. Give one with --normals DIR.",
            exit_code=2,
        )
    found = _open_images(root)
    if isinstance(found, list):
        return found
    normals = [s.path for s in found.select(config.normals_split, normal=True)]
    if not normals:
        splits = sorted({s.split for s in found.select(normal=True)})
        raise DganError(
            f"{root} has no normal images in split {config.normals_split!r}"
            + (f" (normals are in {', '.join(splits)})" if splits else "")
            + ". Choose a split with --normals-split, or another --normals.",
            exit_code=2,
        )
    return normals


def label_prior(classes: list[str], roots: list[Path | None]) -> np.ndarray:
    """The real defects' label sets (co-occurrence included), in the generator's class order.

    Read from the first of `roots` (the generator's training set, then --normals) that is a
    labelled dataset with every class of the generator; its train split when it has one.
    """
    for root in roots:
        if root is None or not Path(root).is_dir():
            continue
        try:
            found = open_dataset(Path(root))
        except DganError:
            continue
        if not set(classes) <= set(found.classes):
            continue
        columns = [found.classes.index(c) for c in classes]
        split = "train" if found.select("train", normal=False) else None
        rows = [[s.labels[c] for c in columns] for s in found.select(split, normal=False)]
        if rows := [r for r in rows if any(r)]:
            return np.array(rows, dtype=np.int64)
    raise DganError(
        "cannot sample labels from the training distribution: neither the generator's training "
        "set nor --normals is a labelled dataset with its classes. Give --classes or --per-class.",
        exit_code=2,
    )


def build_labels(config: SynthConfig, classes: list[str], roots: list[Path | None]) -> Labels:
    fixed = None
    if config.classes:
        unknown = [c for c in config.classes if c not in classes]
        if unknown:
            raise DganError(
                f"--classes {','.join(config.classes)}: the generator does not know "
                f"{', '.join(unknown)}; its categories are {', '.join(classes)}",
                exit_code=2,
            )
        fixed = [int(c in config.classes) for c in classes]
    if config.per_class is not None:
        return Labels(len(classes), fixed=fixed, per_class=config.per_class)
    if fixed is not None:
        return Labels(len(classes), fixed=fixed)
    return Labels(len(classes), prior=label_prior(classes, roots))


def resolve_n(config: SynthConfig, labels: Labels) -> int:
    if labels.per_class is None:
        return config.n or PAPER_N
    total = labels.per_class * len(labels.fixed_columns())
    if config.n is not None and config.n != total:
        raise DganError(
            f"--per-class {labels.per_class} over {len(labels.fixed_columns())} categories makes "
            f"{total} images, but --n is {config.n}; drop --n or make it {total}",
            exit_code=2,
        )
    return total


def prepare_job(config: SynthConfig) -> Job:
    """Resolve and check every input; nothing is written."""
    from dgan.tracking.source import load_generator_from, resolve_model

    if config.region in ("boxes", "masks") and config.region_path is None:
        raise DganError(f"--region {config.region} needs a path: --region {config.region} PATH")
    source = resolve_model(config.generator, "gan", config.run_root, config.tracking_uri)
    generator, gan_config, classes = load_generator_from(source)
    size = gan_config.data.image_size
    data_root = gan_config.data.root
    normals = [p.resolve() for p in source_normals(config, data_root)]
    labels = build_labels(config, classes, [data_root, config.normals])
    n = resolve_n(config, labels)
    boxes = read_boxes(config.region_path, size) if config.region == "boxes" else None
    masks = region_masks(config.region_path) if config.region == "masks" else []
    plan = Plan(n, len(normals), labels, config.seed, size, config.region, boxes, len(masks))
    return Job(
        config, generator, classes, size, source.uri, source.identity, normals, masks, plan, n
    )


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


class SynthItems(Dataset):
    """Item i: the source normal (uint8), target labels, region mask and noise seeds."""

    def __init__(self, job: Job) -> None:
        self.plan, self.normals, self.masks, self.size = job.plan, job.normals, job.masks, job.size

    def __len__(self) -> int:
        return self.plan.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.plan.item(i)
        region = np.ones((1, self.size, self.size), np.uint8)
        if item.boxes is not None:
            region[:] = 0
            for x0, y0, x1, y1 in item.boxes:
                region[:, y0:y1, x0:x1] = 1
        elif item.mask is not None:
            region = (load_image(self.masks[item.mask], self.size)[:1] > 127).astype(np.uint8)
        return {
            "index": torch.tensor(i),
            "normal": torch.from_numpy(load_image(self.normals[item.normal], self.size)),
            "labels": torch.tensor(item.labels, dtype=torch.float32),
            "region": torch.from_numpy(region),
            "deface_seed": torch.tensor(item.deface_seed, dtype=torch.int64),
            "restore_seed": torch.tensor(item.restore_seed, dtype=torch.int64),
        }


class _Batches:
    """Batches of indices within each chunk, generated lazily (memory does not grow with n)."""

    def __init__(self, chunks: list[int], n: int, batch_size: int) -> None:
        self.chunks, self.n, self.batch_size = chunks, n, batch_size

    def __iter__(self):
        for chunk in self.chunks:
            indices = chunk_range(chunk, self.n)
            for start in range(indices.start, indices.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, indices.stop)))

    def __len__(self) -> int:
        return sum(-(-len(chunk_range(c, self.n)) // self.batch_size) for c in self.chunks)


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3), converted on the device."""
    out = images.float().add(1).mul(127.5).round_().clamp_(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).cpu().numpy()


def _mask_uint8(masks: torch.Tensor) -> np.ndarray:
    return masks.float().mul(255).round_().clamp_(0, 255).to(torch.uint8)[:, 0].cpu().numpy()


def _region_text(item, masks: list[Path]) -> str:
    if item.boxes is not None:
        return "boxes:" + ";".join(",".join(map(str, b)) for b in item.boxes)
    return "full" if item.mask is None else f"mask:{masks[item.mask]}"


class Pipeline:
    """Generator forward on the main thread, PNG writing on `writers` threads, chunk bookkeeping."""

    def __init__(self, job: Job, out: SynthOutput, device: torch.device) -> None:
        self.job, self.out, self.device = job, out, device
        self.precision = resolve_precision(job.config.precision, device)
        self.pool = ThreadPoolExecutor(job.config.writers, thread_name_prefix="dgan-png")
        self.inflight: deque[Future] = deque()
        self.open_chunks: dict[int, list] = {}  # chunk -> [futures, images left]
        G = job.generator.to(device)
        if device.type == "cuda":
            G = G.to(memory_format=torch.channels_last)
        self.G = G.eval()

    def run(self, chunks: list[int], progress=None) -> int:
        """Synthesize every image of `chunks`; returns how many images were written."""
        job = self.job
        loader = DataLoader(
            SynthItems(job),
            batch_sampler=_Batches(chunks, job.n, job.config.batch_size),
            num_workers=job.config.num_workers,
            worker_init_fn=leave_signals_to_the_main_process,
            pin_memory=self.device.type == "cuda",
            prefetch_factor=4 if job.config.num_workers > 0 else None,
        )
        for chunk in chunks:
            self.open_chunks[chunk] = [[], len(chunk_range(chunk, job.n))]
        written = 0
        try:
            for batch in loader:
                written += self._step(batch)
                self._close_finished_chunks()
                if progress is not None:
                    progress(written)
            self._drain()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return written

    @torch.inference_mode()
    def _step(self, batch: dict[str, torch.Tensor]) -> int:
        from dgan.inference import deface, restore

        dev = self.device
        fmt = torch.channels_last if dev.type == "cuda" else torch.contiguous_format
        normals = to_unit_range(batch["normal"].to(dev, non_blocking=True)).contiguous(
            memory_format=fmt
        )
        labels = batch["labels"].to(dev, non_blocking=True)
        region = batch["region"].to(dev, non_blocking=True).float()
        deface_seeds = batch["deface_seed"].tolist()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            defects, masks = deface(self.G, normals, labels, region, seed=deface_seeds)
            restored = None
            if self.job.config.restored:
                restored, _ = restore(self.G, defects, seed=batch["restore_seed"].tolist())
        arrays = (
            _to_uint8(defects),
            _mask_uint8(masks),
            None if restored is None else _to_uint8(restored),
        )
        indices = batch["index"].tolist()
        future = self.pool.submit(self._write, indices, *arrays)
        self.inflight.append(future)
        for i in indices:
            chunk = i // CHUNK
            state = self.open_chunks[chunk]
            if not state[0] or state[0][-1] is not future:
                state[0].append(future)
            state[1] -= 1
        while len(self.inflight) > 2 * self.job.config.writers:  # bound memory: backpressure
            self.inflight.popleft().result()
        return len(indices)

    def _write(self, indices, defects, masks, restored) -> list[list]:
        """Write one batch's files (on a writer thread); return its manifest rows."""
        root = self.out.root
        for k, i in enumerate(indices):
            name = image_name(i)
            write_png(defects[k], root / "defect" / name)
            write_png(masks[k], root / "masks" / name)
            if restored is not None:
                write_png(restored[k], root / "normal" / name)
        return [self._manifest_row(i) for i in indices]

    def _manifest_row(self, i: int) -> list:
        job, item = self.job, self.job.plan.item(i)
        name = image_name(i)
        return [
            i,
            f"defect/{name}",
            f"masks/{name}",
            f"normal/{name}" if job.config.restored else "",
            str(job.normals[item.normal]),
            "+".join(c for c, v in zip(job.classes, item.labels, strict=True) if v),
            _region_text(item, job.masks),
            item.deface_seed,
            item.restore_seed,
            job.generator_uri,
        ]

    def _close_finished_chunks(self) -> None:
        for chunk in list(self.open_chunks):
            futures, left = self.open_chunks[chunk]
            if left == 0 and all(f.done() for f in futures):
                rows = [row for f in futures for row in f.result() if row[0] // CHUNK == chunk]
                self.out.write_part(chunk, sorted(rows, key=lambda r: r[0]))
                del self.open_chunks[chunk]

    def _drain(self) -> None:
        while self.inflight:
            self.inflight.popleft().result()
        self._close_finished_chunks()


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


def run_synth(
    config: SynthConfig, gpus: int = 1, quiet: bool = False, events: Events | None = None
) -> JobResult:
    """Synthesize config.n defect images into config.out, resuming whatever is already there.

    One process, `gpus` processes through Accelerate's launcher (dgan.run.launch), or every
    process of a launcher the user started. The result's metrics: images written this time
    (`written`), `images_per_second` and `processes`.
    """
    if gpus < 1:
        raise DganError(f"--gpus must be at least 1, got {gpus}", exit_code=2)
    events = events or ConsoleEvents(quiet)
    if under_launcher():  # started by torchrun / accelerate launch
        accelerator = make_accelerator("synth", "no", int(os.environ["WORLD_SIZE"]))
        return synthesize(config, accelerator, main_only(events, accelerator))
    if gpus == 1:
        return synthesize(config, make_accelerator("synth", "no", None), events)
    job = prepare_job(config)  # every input checked before any worker starts
    if open_output(job, SynthOutput(config.out)):
        return _already_done(job, events)
    return spawn_workers("synth", config.out, gpus, "no", ["--quiet"] if quiet else [])


def open_output(job: Job, out: SynthOutput) -> bool:
    """Claim the output for this set (its config pinned to the resolved generator) and make
    its directories. True when the set is already complete."""
    pinned = job.config.model_copy(update={"generator": job.generator_uri})
    if out.open(job.identity(), json.loads(pinned.model_dump_json())):
        return True
    out.prepare()
    return False


def synthesize(config: SynthConfig, accelerator, events: Events) -> JobResult:
    """Every process calls this; chunk c goes to process c mod N, the main one finalizes."""
    job = prepare_job(config)
    out = SynthOutput(config.out)
    if prepare_on_main(accelerator, lambda: open_output(job, out)):
        return _already_done(job, events)
    world, rank = accelerator.num_processes, accelerator.process_index
    pending = sorted(set(range(n_chunks(job.n))) - out.done_chunks())
    done_before = job.n - _count(pending, job.n)
    events.info(
        f"synthesizing {job.n} images ({done_before} already done) from {job.generator_uri} "
        f"into {config.out}: {job.size}px, region {config.region}, "
        f"{world} process{'es' if world > 1 else ''}"
    )
    mine = [c for c in pending if c % world == rank]
    t0 = time.perf_counter()
    try:
        own_before = done_before if world == 1 else 0
        _run_chunks(job, out, mine, own_before + _count(mine, job.n), own_before, events)
    except KeyboardInterrupt:
        done = job.n - _count(sorted(set(range(n_chunks(job.n))) - out.done_chunks()), job.n)
        raise DganError(
            f"interrupted with {done} of {job.n} images complete in {config.out}; "
            "rerun the same command to continue",
            exit_code=130,
        ) from None
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - t0
    written = job.n - done_before
    result = JobResult(
        kind="synth", state="finished", run_dir=Path(config.out), step=job.n, total=job.n,
        metrics={"written": written, "images_per_second": written / max(seconds, 1e-9),
                 "processes": world},
        seconds=seconds,
    )  # fmt: skip
    if accelerator.is_main_process:
        out.finalize(job.n, job.classes, config.restored)
        result.write(config.out)
    accelerator.wait_for_everyone()
    return result


def _already_done(job: Job, events: Events) -> JobResult:
    events.info(f"{job.config.out}: all {job.n} images are already there; nothing to do")
    out = Path(job.config.out)
    return JobResult("synth", "finished", out, job.n, job.n, metrics={"written": 0})


def _count(chunks: list[int], n: int) -> int:
    return sum(len(chunk_range(c, n)) for c in chunks)


def _run_chunks(
    job: Job, out: SynthOutput, chunks: list[int], total: int, done_before: int, events: Events
) -> int:
    """Synthesize `chunks`, reporting progress at most every 0.5 s (10 s on plain output)."""
    events.begin(done_before)
    every = 0.5 if getattr(events, "live", False) else 10.0
    last = [time.perf_counter()]

    def report(written: int) -> None:
        now = time.perf_counter()
        if now - last[0] >= every:
            last[0] = now
            events.progress(done_before + written, total, unit="img")

    try:
        written = Pipeline(job, out, _device()).run(chunks, report)
        events.progress(done_before + written, total, unit="img")
    finally:
        events.close()
    return written


def worker(out: Path, processes: int, events: Events, resume=None, stop_at=None) -> JobResult:
    """One process of `dgan synth --gpus N` (dgan.run.launch): the config is OUT/synth.json's."""
    meta = SynthOutput(out).read_meta()
    if not meta:
        raise DganError(f"{out} holds no synthesis settings (synth.json); rerun 'dgan synth'")
    accelerator = make_accelerator("synth", "no", processes)
    config = SynthConfig.model_validate(meta["config"])
    return synthesize(config, accelerator, main_only(events, accelerator))
