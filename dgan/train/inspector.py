"""Defect inspector training on Accelerate (Sec. 3.2 and 4.2), one to N processes.

Each step is one SGD update of the multi-label objective on real and synthesized images; with
synthesized images, the source classifier f_src learns real vs synthetic through the GRL, which
pushes the backbone towards features where the two look alike (Fig. 3). After every epoch the
inspector is scored on val; the best epoch by multi-target accuracy is kept in run_dir/inspector/
and scored on test at the end (Sec. 4.2: "We use the validation set to select the best
performing model and report the performance on the test set").

    runs/inspector/00003-<name>/
        config.yaml, status.json, checkpoints/iter-<step>/   as for the GAN (dgan.train.checkpoint)
        inspector/{model.safetensors, config.yaml, classes.json, metrics.json}   the best epoch
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from dgan.config import InspectorConfig, config_hash, flatten, to_yaml
from dgan.data.inspector import (
    InspectionData,
    eval_loader,
    load_inspection_data,
    steps_per_epoch,
    to_unit_interval,
    train_loader,
)
from dgan.errors import DganError
from dgan.io import atomic_write_text
from dgan.metrics.classification import InspectionMetrics, InspectionReport
from dgan.models.inspector import Inspector, build_inspector, grl_alpha, save_inspector
from dgan.train import checkpoint as ckpt
from dgan.train.interrupt import InterruptFlag
from dgan.train.launch import prepare_on_main, spawn_workers, under_launcher
from dgan.train.progress import Progress

# Changing these keys between a checkpoint and a resume would not change what the weights mean.
COMPATIBLE_PREFIXES = ("log.", "train.epochs", "data.num_workers", "data.root")
SHOWN = ("loss_cls", "loss_src", "source_accuracy")


# ---------------------------------------------------------------------------------------------
# The objective (Sec. 3.2)
# ---------------------------------------------------------------------------------------------


def multi_label_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """The inspection objective: per-category binary cross-entropy, as categories co-occur."""
    return F.binary_cross_entropy_with_logits(logits, labels)


def source_loss(source_logits: Tensor, synthetic: Tensor) -> Tensor:
    """f_src's objective (Sec. 3.2, Fig. 3): tell synthesized (1) from real (0) images.

    f_src minimises it; through the GRL the backbone receives its gradient reversed.
    """
    return F.binary_cross_entropy_with_logits(source_logits, synthetic)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Tensor,
    labels: Tensor,
    synthetic: Tensor,
    alpha: float | None,
    accelerator,
) -> dict[str, Tensor]:
    """One SGD step; `alpha` is the GRL strength, None without a source classifier."""
    logits, source_logits = model(images, alpha)
    terms = {"loss_cls": multi_label_loss(logits.float(), labels)}
    total = terms["loss_cls"]
    if source_logits is not None:
        terms["loss_src"] = source_loss(source_logits.float(), synthetic)
        terms["source_accuracy"] = ((source_logits > 0).float() == synthetic).float().mean()
        total = total + terms["loss_src"]
    terms["loss_total"] = total
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(total)
    optimizer.step()
    return {k: v.detach().float() for k, v in terms.items()}


def random_flip(images: Tensor) -> Tensor:
    """Mirror each image left-right with probability 1/2, drawn from the checkpointed RNG."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


class RunningMeans:
    """Per-term sums kept on the device, so logging syncs with the host once per interval."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def add(self, terms: dict[str, Tensor]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.count += 1

    def pop(self) -> dict[str, float]:
        """The means since the last pop, then reset."""
        names = list(self.sums)
        values = torch.stack([self.sums[k] for k in names]).cpu().tolist() if names else []
        means = {k: v / max(1, self.count) for k, v in zip(names, values, strict=True)}
        self.sums, self.count = {}, 0
        return means


@torch.no_grad()
def evaluate(
    model: Inspector, loader, metrics: InspectionMetrics, device, split: str
) -> InspectionReport:
    """Score `model` on a loader's images (this process's shard; metrics gather the rest)."""
    was_training = model.training
    model.eval()
    metrics.reset()
    for images, labels, _ in loader:
        logits, _ = model(to_unit_interval(images.to(device)))
        metrics.update(logits, labels.to(device))
    model.train(was_training)
    return metrics.compute(split)


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def make_accelerator(config: InspectorConfig, expected_processes: int | None):
    """An Accelerator for 1..N processes; the process count is checked, not assumed."""
    from accelerate import Accelerator

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=config.train.mixed_precision
    )
    if expected_processes is not None and accelerator.num_processes != expected_processes:
        raise DganError(
            f"asked for {expected_processes} processes but the launcher started "
            f"{accelerator.num_processes}. On a CPU-only machine use 'dgan train inspector "
            "--gpus N' (it sets ACCELERATE_USE_CPU=1 and --multi_gpu), or torchrun "
            "--nproc_per_node N."
        )
    return accelerator


def read_data(config: InspectorConfig, check: bool = False, log=print) -> InspectionData:
    """The real and synthesized images the config names (data.root must be resolved)."""
    d = config.data
    if d.root is None:
        raise DganError("data.root is not set; prepare_inspector_run resolves it")
    return load_inspection_data(
        d.root, d.synthetic, d.synthetic_ratio, d.defect_fraction, d.subsample_seed, check, log
    )


def uses_source_classifier(config: InspectorConfig, data: InspectionData) -> bool:
    """f_src exists when GRL is on and there is something synthetic to tell apart from real."""
    return config.model.grl and data.synthetic_per_epoch > 0


def prepare_inspector_run(
    config: InspectorConfig,
    resume: str | None,
    run_name: str,
    check_data: bool = True,
    tags: dict[str, str] | None = None,
) -> tuple[InspectorConfig, Path, Path | None]:
    """Check everything before any work: data, synthetic sets, pretrained weights, resume target.

    Then make the run directory. Returns (config with data.root resolved, run dir, checkpoint).
    `tags` go onto the run's MLflow run.
    """
    from dgan.data import ensure_demo_dataset
    from dgan.models.inspector import pretrained_hint

    weights = config.model.pretrained
    if weights is not None and not Path(weights).is_file():  # before any data is made
        raise DganError(
            f"--pretrained {weights}: no such file. {pretrained_hint(config.model.arch)}", 2
        )
    resume_path = None
    if resume is not None:
        resume_path = ckpt.resolve_resume(resume, config.log.run_root, "inspector")
    if config.data.root is None:
        data_cfg = config.data.model_copy(update={"root": ensure_demo_dataset()})
        config = config.model_copy(update={"data": data_cfg})
    data = read_data(config, check=check_data, log=lambda _: None)
    if config.model.pretrained is not None:
        build_inspector(config, len(data.classes), source_head=False)  # fails on a wrong file
    if resume_path is not None:
        return config, resume_path.parent.parent, resume_path
    run_dir = ckpt.new_run_dir(config.log.run_root, "inspector", run_name)
    atomic_write_text(run_dir / "config.yaml", to_yaml(config))
    ckpt.write_status(run_dir, state="created", mlflow_tags=dict(tags or {}))
    return config, run_dir, None


def run_inspector(
    config: InspectorConfig,
    resume: str | None = None,
    gpus: int = 1,
    quiet: bool = False,
    run_name: str = "inspector",
    stop_at: int | None = None,
    tags: dict[str, str] | None = None,
    check_data: bool = True,
) -> Path:
    """Train the inspector on `gpus` processes, as `run_gan` does the GAN. Returns the run dir.

    `stop_at` pauses the run after that epoch with a checkpoint; `--resume` continues it.
    `check_data=False` skips decoding every image first (for repeated runs on checked data).
    """
    if gpus < 1:
        raise DganError(f"--gpus must be at least 1, got {gpus}", exit_code=2)
    if under_launcher():
        accelerator = make_accelerator(config, int(os.environ["WORLD_SIZE"]))
        config, run_dir, resume_path = prepare_on_main(
            accelerator, lambda: prepare_inspector_run(config, resume, run_name, check_data, tags)
        )
        return train_inspector(config, run_dir, resume_path, accelerator, quiet, stop_at)
    config, run_dir, resume_path = prepare_inspector_run(config, resume, run_name, check_data, tags)
    if gpus == 1:
        return train_inspector(config, run_dir, resume_path, quiet=quiet, stop_at=stop_at)
    spawn_workers(
        "inspector", run_dir, resume_path, gpus, config.train.mixed_precision, quiet, stop_at
    )
    return run_dir


@dataclass
class Best:
    """The best epoch so far by val multi-target accuracy (0 before the first validation)."""

    epoch: int = 0
    score: float = -1.0


def training_state(model, optimizer, config, classes, step: int, best: Best) -> dict:
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "classes": classes,
        "best_epoch": best.epoch,
        "best_score": best.score,
        "config_hash": config_hash(config, COMPATIBLE_PREFIXES),
        "config_json": json.dumps(flatten(config)),
    }


def restore_state(model, optimizer, state: dict, config, classes, where: Path) -> tuple[int, Best]:
    """Load a checkpoint; refuse one from an incompatible config or class list."""
    if state.get("config_hash") != config_hash(config, COMPATIBLE_PREFIXES):
        saved, now = json.loads(state.get("config_json", "{}")), flatten(config)
        diffs = [
            f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
            for k in sorted(set(saved) | set(now))
            if not k.startswith(COMPATIBLE_PREFIXES) and saved.get(k) != now.get(k)
        ]
        raise DganError(
            f"checkpoint {where} comes from an incompatible config:\n  "
            + "\n  ".join(diffs or ["(unknown config)"])
            + "\nResume with the run's own config.yaml (--config RUN/config.yaml) "
            "or start a new run."
        )
    if state.get("classes") != classes:
        raise DganError(
            f"checkpoint {where} was trained on classes {state.get('classes')}, "
            f"the data now gives {classes}"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"]), Best(int(state["best_epoch"]), float(state["best_score"]))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train_inspector(
    config: InspectorConfig,
    run_dir: Path,
    resume: Path | None = None,
    accelerator=None,
    quiet: bool = False,
    stop_at: int | None = None,
) -> Path:
    """Train the inspector into `run_dir`; returns the run directory. All processes call this.

    `stop_at` pauses the run after that epoch with a checkpoint (state "paused").
    """
    accelerator = accelerator or make_accelerator(config, None)
    main, device = accelerator.is_main_process, accelerator.device
    data = read_data(config, log=print if main else lambda _: None)
    classes, source_head = data.classes, uses_source_classifier(config, data)
    t = config.train
    torch.manual_seed(t.seed)  # identical initial weights on every process
    model = build_inspector(config, len(classes), source_head)
    optimizer = torch.optim.SGD(
        model.parameters(), t.lr, momentum=t.momentum, weight_decay=t.weight_decay
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    raw: Inspector = accelerator.unwrap_model(model)
    steps, start, best = steps_per_epoch(data, t.batch_size), 0, Best()
    total = steps * t.epochs
    status = ckpt.read_status(run_dir)
    if resume is not None:
        state, rng = ckpt.load_checkpoint(resume, accelerator.process_index)
        start, best = restore_state(raw, optimizer, state, config, classes, resume)
        ckpt.restore_rng(rng, device)
    else:
        torch.manual_seed(t.seed + accelerator.process_index)  # flips differ per process
    if start >= total:
        if main:
            print(f"{run_dir}: already at step {start} of {total}.")
        return run_dir

    if main:
        print(data.balance())
        if missing := data.classes_without_positives():
            print(
                f"warning: no training image is positive for {', '.join(missing)}; the inspector "
                "cannot learn to detect them (their recall will be 0). Add examples or synthesize "
                "them."
            )
    rank, world = accelerator.process_index, accelerator.num_processes
    size, workers = config.data.image_size, config.data.num_workers
    loader = train_loader(
        data, size, t.batch_size, start // steps + 1, t.epochs, t.seed, rank, world, workers,
        pin_memory=device.type == "cuda", skip=start % steps,
    )  # fmt: skip
    val_loader = eval_loader(data.val, size, t.batch_size, rank, world, workers)
    metrics = InspectionMetrics(classes, device)
    tracker = _open_tracker(config, run_dir, status, main, source_head)
    if main:
        atomic_write_text(run_dir / "config.yaml", to_yaml(config))
        ckpt.write_status(
            run_dir, state="running", classes=classes, mlflow_run_id=tracker.run_id,
            steps_per_epoch=steps, source_classifier=source_head,
        )  # fmt: skip
    progress = Progress(total, start, quiet=quiet) if main else None
    interrupt = InterruptFlag()
    means, step = RunningMeans(), start
    first_bad = torch.full((), -1, device=device)
    try:
        batches = iter(loader)
        for step in range(start + 1, total + 1):
            images, labels, synthetic = (v.to(device, non_blocking=True) for v in next(batches))
            images = to_unit_interval(images)
            images = random_flip(images) if config.data.flip else images
            alpha = grl_alpha(config, step / total) if source_head else None
            terms = train_step(model, optimizer, images, labels, synthetic, alpha, accelerator)
            means.add(terms)
            bad = ~torch.isfinite(terms["loss_total"]) & (first_bad < 0)
            first_bad = torch.where(bad, torch.full_like(first_bad, step), first_bad)

            end_of_epoch = step % steps == 0
            if step % config.log.log_every == 0 or end_of_epoch:
                _check_finite(first_bad)  # one host sync per log interval, not per step
                logged = {f"train_{k}": v for k, v in means.pop().items()}
                logged["lr"] = optimizer.param_groups[0]["lr"]
                if alpha is not None:
                    logged["grl_alpha"] = alpha
                if main:
                    tracker.log_metrics(logged, step=step)
                    shown = {k: logged[f"train_{k}"] for k in SHOWN if f"train_{k}" in logged}
                    progress.update(step, {"epoch": -(-step // steps), **shown})
            if end_of_epoch:
                best = _end_epoch(raw, val_loader, metrics, config, classes, run_dir, step // steps,
                                  step, best, accelerator, tracker, progress)  # fmt: skip
                _save(accelerator, raw, optimizer, config, classes, run_dir, step, best)
            if interrupt.requested or (stop_at is not None and step == stop_at * steps):
                break
    except KeyboardInterrupt:
        interrupt.requested = True
    except DganError:
        if main:
            ckpt.write_status(run_dir, state="failed", step=step)
            tracker.finish("FAILED")
        raise
    finally:
        interrupt.restore()
        if progress:
            progress.close()

    if interrupt.requested:
        _check_finite(first_bad)
        path = _save(accelerator, raw, optimizer, config, classes, run_dir, step, best)
        if main:
            ckpt.write_status(run_dir, state="interrupted", step=step)
            tracker.finish("KILLED")
            print(f"interrupted at step {step}; saved {path}. Continue with --resume {run_dir}")
        raise KeyboardInterrupt
    if step < total:  # paused by stop_at, after its epoch's checkpoint
        if main:
            ckpt.write_status(run_dir, state="paused", step=step, epoch=step // steps)
            tracker.finish("FINISHED")
        return run_dir
    _finish(raw, config, classes, run_dir, data, best, accelerator, tracker)
    return run_dir


def _end_epoch(
    raw, val_loader, metrics, config, classes, run_dir, epoch, step, best, accelerator, tracker,
    progress,
) -> Best:  # fmt: skip
    """Validate; when val multi-target accuracy improves, export this epoch as the best."""
    _sync_buffers(raw, accelerator)
    report = evaluate(raw, val_loader, metrics, accelerator.device, "val")
    improved = report.multi_target_accuracy > best.score
    if improved:
        best = Best(epoch, report.multi_target_accuracy)
    if accelerator.is_main_process:
        if improved:
            out = save_inspector(raw, config, classes, run_dir / "inspector")
            summary = {"best_epoch": epoch, "val": report.to_dict()}
            atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
        tracker.log_metrics(
            {**report.metrics(), "epoch": epoch, "best_val_multi_target_accuracy": best.score},
            step=step,
        )
        line = (
            f"epoch {epoch}: val multi-target accuracy {report.multi_target_accuracy:.4f}, "
            f"macro F1 {_fmt(report.macro['f1'])}"
            + (" (best so far)" if improved else f" (best: epoch {best.epoch}, {best.score:.4f})")
        )
        if progress is not None and progress.live:
            progress.close()
        print(line, flush=True)
    accelerator.wait_for_everyone()
    return best


def _finish(raw, config, classes, run_dir: Path, data, best: Best, accelerator, tracker) -> None:
    """Score the best epoch on test, write metrics.json, log it and the model to MLflow."""
    from safetensors.torch import load_file

    best_dir = run_dir / "inspector"
    raw.load_state_dict(load_file(str(best_dir / "model.safetensors")))  # copied to the device
    size, t = config.data.image_size, config.train
    loader = eval_loader(
        data.test, size, t.batch_size, accelerator.process_index, accelerator.num_processes,
        config.data.num_workers,
    )  # fmt: skip
    report = evaluate(
        raw, loader, InspectionMetrics(classes, accelerator.device), accelerator.device, "test"
    )
    if accelerator.is_main_process:
        summary = json.loads((best_dir / "metrics.json").read_text())
        summary["test"] = report.to_dict()
        atomic_write_text(best_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
        print(f"best epoch {best.epoch} (val multi-target accuracy {best.score:.4f}) on test:")
        print(report.format())
        tracker.log_metrics({**report.metrics(), "best_epoch": best.epoch}, step=best.epoch)
        tracker.log_artifact(best_dir / "metrics.json")
        model_uri = None
        if config.log.log_model:
            code = Path(__file__).parents[1] / "models" / "mlflow_inspector.py"  # not imported here
            model_uri = tracker.log_code_model("inspector", code, {"inspector": best_dir})
        ckpt.write_status(
            run_dir, state="finished", epoch=config.train.epochs, best_epoch=best.epoch,
            best_val_multi_target_accuracy=best.score,
            test_multi_target_accuracy=report.multi_target_accuracy, model_uri=model_uri,
        )  # fmt: skip
        tracker.finish("FINISHED")
        if model_uri is not None:
            _register(tracker, model_uri, config, run_dir, summary["val"], report)
    accelerator.wait_for_everyone()


def inspection_dataset_hash(config: InspectorConfig) -> str:
    """dgan.data.dataset_hash of the real set and every synthesized set, as one."""
    from dgan.data import dataset_hash, open_dataset

    return dataset_hash(*(open_dataset(p) for p in [config.data.root, *config.data.synthetic]))


def _register(tracker, model_uri: str, config, run_dir: Path, val: dict, test) -> None:
    """Register the exported epoch with its val and test scores as version tags."""
    from dgan.models.registry import register_run_model

    metrics = {
        "val_multi_target_accuracy": val["multi_target_accuracy"],
        "test_multi_target_accuracy": test.multi_target_accuracy,
    }
    if test.macro["f1"] is not None:
        metrics["test_macro_f1"] = test.macro["f1"]
    if registration := register_run_model(tracker, model_uri, config.log, metrics):
        for line in registration.lines():
            print(line, flush=True)
        ckpt.write_status(run_dir, **registration.status_fields())


def _sync_buffers(raw: torch.nn.Module, accelerator) -> None:
    """Give every process rank 0's BatchNorm statistics, so all validate the same network."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        for buffer in raw.buffers():
            buffer.copy_(broadcast(buffer.clone(), from_process=0))


def _check_finite(first_bad: Tensor) -> None:
    step = int(first_bad.item())
    if step >= 0:
        raise DganError(
            f"training diverged: the loss became NaN/inf at step {step}. No checkpoint was "
            "written after it; the last good one is kept. Lower train.lr, or use "
            "mixed_precision=no, and resume from it."
        )


def _save(accelerator, raw, optimizer, config, classes, run_dir: Path, step: int, best: Best):
    main = accelerator.is_main_process
    state = training_state(raw, optimizer, config, classes, step, best) if main else {}
    return ckpt.save_checkpoint(accelerator, run_dir, step, state, config.log.keep_checkpoints)


def _open_tracker(config: InspectorConfig, run_dir: Path, status: dict, main: bool, source_head):
    from dgan.tracking import Tracker, run_tags

    tags = None
    if main and status.get("mlflow_run_id") is None:  # a resumed run keeps its tags
        tags = {
            **run_tags("inspector", config, run_dir, inspection_dataset_hash(config)),
            "dgan.source_classifier": str(source_head).lower(),
            **status.get("mlflow_tags", {}),
        }
    return Tracker(
        enabled=main,
        uri=config.log.tracking_uri,
        experiment=config.log.experiment,
        run_name=run_dir.name,
        params=flatten(config),
        tags=tags,
        run_id=status.get("mlflow_run_id"),
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# ---------------------------------------------------------------------------------------------
# Scoring a saved inspector
# ---------------------------------------------------------------------------------------------


def evaluate_inspector(
    model: str | Path,
    data_root: Path,
    split: str = "test",
    batch_size: int = 64,
    tracking_uri: str | None = None,
) -> InspectionReport:
    """Score a saved inspector on one split of a dataset.

    `model` is any spec dgan.models.source.resolve_model takes: an inspector directory, its run
    directory, a checkpoint, or an MLflow URI (models:/defect-inspector@champion, models:/m-...).
    The dataset must have the inspector's classes (by name; extra classes are ignored).
    """
    from dgan.data import SPLITS, open_dataset
    from dgan.data.inspector import LabelledImage
    from dgan.data.loader import select_classes
    from dgan.models.source import load_inspector_from, resolve_model

    if split not in SPLITS:
        raise DganError(f"--split {split!r}: choose one of {', '.join(SPLITS)}", exit_code=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = resolve_model(str(model), "inspector", tracking_uri=tracking_uri)
    model, config, classes = load_inspector_from(source, device)
    index = open_dataset(data_root)
    columns = select_classes(index, classes)
    images = [
        LabelledImage(s.path, tuple(s.labels[c] for c in columns)) for s in index.select(split)
    ]
    if not images:
        present = sorted({s.split for s in index.samples})
        raise DganError(
            f"{data_root} has no images in split {split!r}; it has {', '.join(present)}. "
            "Choose one with --split.",
            exit_code=2,
        )
    loader = eval_loader(images, config.data.image_size, batch_size)
    return evaluate(model, loader, InspectionMetrics(classes, device), device, split)
