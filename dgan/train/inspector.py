"""Defect inspector training on Accelerate (Sec. 3.2 and 4.2), one to N processes.

Each step is one SGD update of the multi-label objective on real and synthesized images; with
synthesized images, the source classifier f_src learns real vs synthetic through the GRL, which
pushes the backbone towards features where the two look alike (Fig. 3). After every epoch the
inspector is scored on val; the best epoch by multi-target accuracy is kept in run_dir/inspector/
and scored on test at the end (Sec. 4.2: "We use the validation set to select the best
performing model and report the performance on the test set").

    runs/inspector/00003-<name>/
        config.yaml, status.json, checkpoints/iter-<step>/   as for the GAN (dgan.run.checkpoint)
        inspector/{model.safetensors, config.yaml, classes.json, metrics.json}   the best epoch
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dgan.config import InspectorConfig
from dgan.data.inspector import (
    InspectionData,
    eval_loader,
    load_inspection_data,
    steps_per_epoch,
    to_unit_interval,
    train_loader,
)
from dgan.errors import DganError
from dgan.events import Events
from dgan.io import atomic_write_text
from dgan.metrics.classification import InspectionMetrics, InspectionReport
from dgan.models.inspector import Inspector, build_inspector, grl_alpha, save_inspector
from dgan.run.harness import Cadence, Export, TrainingJob
from dgan.run.launch import launch_training, training_worker
from dgan.run.result import JobResult
from dgan.tracking import PYFUNC_DIR

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


def read_data(config: InspectorConfig, check: bool = False, events: Events | None = None):
    """The real and synthesized images the config names (data.root must be resolved)."""
    d = config.data
    if d.root is None:
        raise DganError("data.root is not set; the launcher resolves it (dgan.run.launch)")
    return load_inspection_data(
        d.root, d.synthetic, d.synthetic_ratio, d.defect_fraction, d.subsample_seed, check,
        events or Events(),
    )  # fmt: skip


def uses_source_classifier(config: InspectorConfig, data: InspectionData) -> bool:
    """f_src exists when GRL is on and there is something synthetic to tell apart from real."""
    return config.model.grl and data.synthetic_per_epoch > 0


@dataclass
class Best:
    """The best epoch so far by val multi-target accuracy (0 before the first validation)."""

    epoch: int = 0
    score: float = -1.0


# ---------------------------------------------------------------------------------------------
# The job: what the run harness (dgan.run.harness) needs of the inspector
# ---------------------------------------------------------------------------------------------


class InspectorJob(TrainingJob):
    """Inspector training: one SGD step per batch, validation and export of the best epoch."""

    kind = "inspector"
    resumable_keys = ("log.", "train.epochs", "data.num_workers", "data.root")
    guarded_terms = ("loss_total",)
    divergence_advice = "Lower train.lr, or use mixed_precision=no, and resume from it."

    def __init__(self, config: InspectorConfig, accelerator, events: Events) -> None:
        self.config, self.accelerator, self.events = config, accelerator, events
        t = config.train
        self.seed = t.seed
        self.data = read_data(config, events=events)
        self.classes = self.data.classes
        self.source_head = uses_source_classifier(config, self.data)
        torch.manual_seed(t.seed)  # identical initial weights on every process
        model = build_inspector(config, len(self.classes), self.source_head)
        optimizer = torch.optim.SGD(
            model.parameters(), t.lr, momentum=t.momentum, weight_decay=t.weight_decay
        )
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.raw: Inspector = accelerator.unwrap_model(self.model)
        self.steps = steps_per_epoch(self.data, t.batch_size)
        self.cadence = Cadence(
            self.steps * t.epochs, config.log.log_every, checkpoint_every=self.steps,
            eval_every=self.steps, epoch=self.steps,
        )  # fmt: skip
        self.best = Best()
        self.alpha: float | None = None
        self.metrics = InspectionMetrics(self.classes, accelerator.device)

    def step(self, step: int, batch) -> dict[str, Tensor]:
        """One SGD step on the multi-label objective, and f_src's through the GRL (Sec. 3.2)."""
        images, labels, synthetic = (
            v.to(self.accelerator.device, non_blocking=True) for v in batch
        )
        images = to_unit_interval(images)
        images = random_flip(images) if self.config.data.flip else images
        total = self.cadence.total
        self.alpha = grl_alpha(self.config, step / total) if self.source_head else None
        return train_step(
            self.model, self.optimizer, images, labels, synthetic, self.alpha, self.accelerator
        )

    def batches(self, start: int):
        t, size = self.config.train, self.config.data.image_size
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        return train_loader(
            self.data, size, t.batch_size, start // self.steps + 1, t.epochs, t.seed, rank, world,
            self.config.data.num_workers, pin_memory=self.accelerator.device.type == "cuda",
            skip=start % self.steps,
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.raw.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "best_epoch": self.best.epoch,
            "best_score": self.best.score,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.raw.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.best = Best(int(state["best_epoch"]), float(state["best_score"]))

    def begin(self, start: int, run_dir: Path) -> None:
        self.events.info(self.data.balance())
        if missing := self.data.classes_without_positives():
            self.events.warning(
                f"no training image is positive for {', '.join(missing)}; the inspector cannot "
                "learn to detect them (their recall will be 0). Add examples or synthesize them."
            )
        d = self.config.data
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        self.val_loader = eval_loader(
            self.data.val, d.image_size, self.config.train.batch_size, rank, world, d.num_workers
        )

    def logged(self, step: int, means: dict[str, float]) -> dict[str, float]:
        logged = {f"train_{k}": v for k, v in means.items()}
        logged["lr"] = self.optimizer.param_groups[0]["lr"]
        if self.alpha is not None:
            logged["grl_alpha"] = self.alpha
        return logged

    def shown(self, step: int, logged: dict[str, float]) -> dict[str, float]:
        epoch = -(-step // self.steps)
        return {
            "epoch": epoch,
            **{k: logged[f"train_{k}"] for k in SHOWN if f"train_{k}" in logged},
        }

    def evaluate(self, step: int, run_dir: Path) -> dict[str, float]:
        """Validate; when val multi-target accuracy improves, export this epoch as the best."""
        epoch = step // self.steps
        _sync_buffers(self.raw, self.accelerator)
        report = evaluate(self.raw, self.val_loader, self.metrics, self.accelerator.device, "val")
        improved = report.multi_target_accuracy > self.best.score
        if improved:
            self.best = Best(epoch, report.multi_target_accuracy)
        if improved and self.accelerator.is_main_process:
            out = save_inspector(self.raw, self.config, self.classes, run_dir / "inspector")
            summary = {"best_epoch": epoch, "val": report.to_dict()}
            atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
        best = self.best
        self.events.info(
            f"epoch {epoch}: val multi-target accuracy {report.multi_target_accuracy:.4f}, "
            f"macro F1 {_fmt(report.macro['f1'])}"
            + (" (best so far)" if improved else f" (best: epoch {best.epoch}, {best.score:.4f})")
        )
        self.accelerator.wait_for_everyone()
        return {**report.metrics(), "epoch": epoch, "best_val_multi_target_accuracy": best.score}

    def finish(self, run_dir: Path) -> Export | None:
        """Score the best epoch on test and write its metrics.json (every process scores)."""
        from safetensors.torch import load_file

        best_dir = run_dir / "inspector"
        self.raw.load_state_dict(load_file(str(best_dir / "model.safetensors")))
        d, t, acc = self.config.data, self.config.train, self.accelerator
        loader = eval_loader(
            self.data.test, d.image_size, t.batch_size, acc.process_index, acc.num_processes,
            d.num_workers,
        )  # fmt: skip
        report = evaluate(self.raw, loader, InspectionMetrics(self.classes, acc.device), acc.device,
                          "test")  # fmt: skip
        if not acc.is_main_process:
            return None
        summary = json.loads((best_dir / "metrics.json").read_text())
        summary["test"] = report.to_dict()
        atomic_write_text(best_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
        best = self.best
        self.events.info(
            f"best epoch {best.epoch} (val multi-target accuracy {best.score:.4f}) on test:\n"
            + report.format()
        )
        version = {
            "val_multi_target_accuracy": summary["val"]["multi_target_accuracy"],
            "test_multi_target_accuracy": report.multi_target_accuracy,
        }
        if report.macro["f1"] is not None:
            version["test_macro_f1"] = report.macro["f1"]
        return Export(
            best_dir, PYFUNC_DIR / "pyfunc_inspector.py", "inspector",
            metrics={**report.metrics(), "best_epoch": best.epoch}, step=best.epoch,
            artifacts=[best_dir / "metrics.json"],
            status={"epoch": t.epochs, "best_epoch": best.epoch,
                    "best_val_multi_target_accuracy": best.score,
                    "test_multi_target_accuracy": report.multi_target_accuracy},
            version_metrics=version,
        )  # fmt: skip

    def status_fields(self) -> dict[str, Any]:
        return {"steps_per_epoch": self.steps, "source_classifier": self.source_head}

    def run_tags(self) -> dict[str, str]:
        return {"dgan.source_classifier": str(self.source_head).lower()}

    def dataset_hash(self) -> str:
        return inspection_dataset_hash(self.config)

    def pause_step(self, stop_at: int) -> int:
        """`stop_at` counts epochs: the run pauses after that epoch's checkpoint."""
        return stop_at * self.steps

    # -- checks before a run directory exists (dgan.run.launch.prepare_run) ---------------------

    @staticmethod
    def check_config(config: InspectorConfig) -> InspectorConfig:
        """Pretrained weights exist (before any demo data is made)."""
        from dgan.models.inspector import pretrained_hint

        weights = config.model.pretrained
        if weights is not None and not Path(weights).is_file():
            raise DganError(
                f"--pretrained {weights}: no such file. {pretrained_hint(config.model.arch)}", 2
            )
        return config

    @staticmethod
    def check_data(config: InspectorConfig, start: int, decode: bool = True) -> None:
        """Every image decodes (unless `decode` is off) and pretrained weights fit."""
        data = read_data(config, check=decode)
        if config.model.pretrained is not None:
            build_inspector(config, len(data.classes), source_head=False)  # fails on a wrong file


def run_inspector(
    config: InspectorConfig, resume: str | None = None, gpus: int = 1, **options
) -> JobResult:
    """Train the inspector on `gpus` processes; returns the typed result.

    `options` are dgan.run.launch.launch_training's (run_name, quiet, events, callback, tags,
    check_data=False to skip decoding every image first); `stop_at` counts epochs here.
    """
    options = {"run_name": "inspector", **options}
    return launch_training(InspectorJob, config, resume, gpus, **options)


def worker(run_dir: Path, processes: int, events: Events, resume, stop_at) -> JobResult:
    """One process of `dgan train inspector --gpus N` (dgan.run.launch)."""
    return training_worker(InspectorJob, run_dir, processes, events, resume, stop_at)


def inspection_dataset_hash(config: InspectorConfig) -> str:
    """dgan.data.dataset_hash of the real set and every synthesized set, as one."""
    from dgan.data import dataset_hash, open_dataset

    return dataset_hash(*(open_dataset(p) for p in [config.data.root, *config.data.synthetic]))


def _sync_buffers(raw: torch.nn.Module, accelerator) -> None:
    """Give every process rank 0's BatchNorm statistics, so all validate the same network."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        for buffer in raw.buffers():
            buffer.copy_(broadcast(buffer.clone(), from_process=0))


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

    `model` is any spec dgan.tracking.source.resolve_model takes: an inspector directory, its run
    directory, a checkpoint, or an MLflow URI (models:/defect-inspector@champion, models:/m-...).
    The dataset must have the inspector's classes (by name; extra classes are ignored).
    """
    from dgan.data import SPLITS, open_dataset
    from dgan.data.inspector import LabelledImage
    from dgan.data.loader import select_classes
    from dgan.tracking.source import load_inspector_from, resolve_model

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
