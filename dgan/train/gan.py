"""Defect-GAN training on Accelerate (Sec. 3.1 and 4.1), one to N processes.

One iteration is one D update (Eq. 11); every `n_critic`-th iteration also updates G (Eq. 12)
through both cycles, n -> d -> n^ and d -> n -> d^. The two cycles run as two batched G
forwards: first [n | d] under [A_target | 0], then the results under [0 | A_real].
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dgan import losses
from dgan.config import GanConfig, config_hash, flatten, to_yaml
from dgan.data import DatasetIndex, open_dataset
from dgan.data.loader import UnpairedStream, gan_loader, select_classes, to_unit_range
from dgan.errors import DganError
from dgan.io import atomic_save_image, atomic_write_text
from dgan.models import build_gan
from dgan.models.generator import Generator, GeneratorOutput, control_map_from_labels
from dgan.train import checkpoint as ckpt
from dgan.train.interrupt import InterruptFlag
from dgan.train.progress import Progress

# Changing these keys between a checkpoint and a resume would change what the weights mean.
COMPATIBLE_PREFIXES = ("log.", "eval.", "train.iterations", "data.num_workers", "data.root")
D_TERMS = ("d_adv", "d_gp", "d_cls_r", "d_cls_fake", "d_total")
G_TERMS = ("g_adv", "g_cls_f", "g_rec", "g_sd_cyc", "g_sd_con", "g_outside", "g_total")


@dataclass
class Nets:
    """The prepared networks and optimizers, and the EMA copy of G (never wrapped)."""

    G: torch.nn.Module
    D: torch.nn.Module
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    G_ema: Generator | None
    G_raw: Generator  # G without DDP, for no-grad forwards
    D_raw: torch.nn.Module  # D without DDP, for G's step (D is not updated there)
    inv_scale: Any = field(default=None)  # 1 / grad-scaler scale (fp16), a device tensor


# ---------------------------------------------------------------------------------------------
# The two steps of Algorithm (Sec. 3.1, 4.1)
# ---------------------------------------------------------------------------------------------


def target_region(region: Tensor, height: int, width: int) -> Tensor:
    """(B, 1, H, W) map of where defacement is asked: the sample's box if flagged, else all."""
    use, x0, y0, bw, bh = region.unbind(1)
    ys = (torch.arange(height, device=region.device) + 0.5) / height
    xs = (torch.arange(width, device=region.device) + 0.5) / width
    in_y = (ys >= y0[:, None]) & (ys < (y0 + bh)[:, None])
    in_x = (xs >= x0[:, None]) & (xs < (x0 + bw)[:, None])
    box = (in_y[:, :, None] & in_x[:, None, :]).to(region.dtype)
    return torch.where(use[:, None, None] > 0, box, torch.ones_like(box))[:, None]


def first_stage_control(
    batch: dict[str, Tensor], height: int, width: int, boxes: bool
) -> list[Tensor]:
    """A for the first G pass over [n | d]: the target label (inside its region) for the
    normals, "normal" (0) for the defects.

    Parts in G's cheap label form where A is constant over space: always for the defects, and
    for the normals unless training asks for random target boxes (`boxes`, from the config: a
    static choice, so no flag is read back from the device).
    """
    target = batch["target_labels"]
    deface = target
    if boxes:
        where = target_region(batch["region"], height, width)
        deface = control_map_from_labels(target, height, width) * where
    return [deface, torch.zeros_like(target)]


def uses_boxes(config: GanConfig) -> bool:
    return config.train.random_region_prob > 0


def first_pass(nets: Nets, batch: dict[str, Tensor], config: GanConfig) -> GeneratorOutput:
    """G's first stage over [n | d]: [d' | n'], with the autograd graph that G's update needs."""
    n = batch["normal"]
    control = first_stage_control(batch, n.shape[2], n.shape[3], uses_boxes(config))
    return nets.G(torch.cat([n, batch["defect"]]), control)


def d_step(
    nets: Nets,
    batch: dict[str, Tensor],
    config: GanConfig,
    accelerator,
    first: GeneratorOutput | None = None,
) -> dict[str, Tensor]:
    """Update D on Eq. 11 with WGAN-GP: real [d | n] against G's fakes [d' | n'] and their mixes.

    `first` is G's first pass on this batch when the iteration also updates G: D then reads its
    images, detached, and G's step reuses the same pass, so G runs that forward once, not twice.
    """
    n, d = batch["normal"], batch["defect"]
    zeros = torch.zeros_like(batch["defect_labels"])
    if first is None:
        control = first_stage_control(batch, n.shape[2], n.shape[3], uses_boxes(config))
        with torch.no_grad():  # D's update needs the fakes, not G's graph
            first = nets.G_raw(torch.cat([n, d]), control)
    b = n.shape[0]
    real = torch.cat([d, n])
    fake_images = first.image.detach()  # [d' from n | n' from d]
    alpha = torch.cat([batch["alpha"][:, 0], batch["alpha"][:, 1]])
    x_hat = losses.interpolate(real, fake_images, alpha).requires_grad_(True)
    # Labels of what each image shows, for a projection D: real ones their own, fakes the asked.
    real_labels = torch.cat([batch["defect_labels"], zeros])
    fake_labels = torch.cat([batch["target_labels"], zeros])
    hat_labels = torch.lerp(fake_labels, real_labels, alpha[:, None].to(real_labels.dtype))
    # Two D calls, not one on [real | fake | x_hat]: the penalty's gradient and its double
    # backward then cover the interpolates only (3.2 s to 2.6 s per D update at 128 px, batch 4).
    src, cls = nets.D(torch.cat([real, fake_images]), torch.cat([real_labels, fake_labels]))
    src_real, src_fake = src.float().chunk(2)
    src_hat, _ = nets.D(x_hat, hat_labels)
    out_hat = src_hat.float().sum()
    if nets.inv_scale is not None:  # fp16: take the penalty's gradient on the scaled output
        out_hat = accelerator.scaler.scale(out_hat)
    (grad,) = torch.autograd.grad(out_hat, x_hat, create_graph=True)
    if nets.inv_scale is not None:
        grad = grad * nets.inv_scale
    terms = {
        "d_adv": losses.adversarial_loss_d(src_real, src_fake),
        "d_gp": losses.gradient_penalty(grad.float()),
        # Real defects carry their labels; real normals are labelled "no defect".
        "d_cls_r": losses.classification_loss(cls[: 2 * b].float(), real_labels),
    }
    lw = config.loss
    if lw.lambda_cls_fake_d > 0:  # defacements d' only (see fake_classification_loss_d)
        terms["d_cls_fake"] = losses.fake_classification_loss_d(cls[2 * b : 3 * b].float())
    else:
        terms["d_cls_fake"] = n.new_zeros(())
    terms["d_total"] = (
        terms["d_adv"]
        + lw.lambda_gp * terms["d_gp"]
        + lw.lambda_cls_r * terms["d_cls_r"]
        + lw.lambda_cls_fake_d * terms["d_cls_fake"]
    )
    nets.opt_D.zero_grad(set_to_none=True)
    accelerator.backward(terms["d_total"])
    nets.opt_D.step()
    return terms


def g_step(
    nets: Nets,
    batch: dict[str, Tensor],
    config: GanConfig,
    accelerator,
    first: GeneratorOutput | None = None,
) -> dict[str, Tensor]:
    """Update G on Eq. 12 through both cycles: n -> d -> n^ and d -> n -> d^.

    `first` is G's first pass on this batch (see first_pass), when D's step already ran it.
    """
    n, d = batch["normal"], batch["defect"]
    c_target, c_real = batch["target_labels"], batch["defect_labels"]
    zeros = torch.zeros_like(c_real)
    b = n.shape[0]
    where = target_region(batch["region"], n.shape[2], n.shape[3])
    if first is None:
        first = first_pass(nets, batch, config)  # [d' | n']
    # [n^ | d^]; A as labels, i.e. repeated over space (training-time control map, Sec. 3.1).
    second = nets.G(first.image, torch.cat([zeros, c_real]))
    for p in nets.D_raw.parameters():
        p.requires_grad_(False)
    src, cls = nets.D_raw(first.image, torch.cat([c_target, zeros]))
    for p in nets.D_raw.parameters():
        p.requires_grad_(True)
    lw, use_sc = config.loss, config.generator.sc
    terms = {
        "g_adv": losses.adversarial_loss_g(src.float()),
        "g_cls_f": losses.classification_loss(cls.float(), torch.cat([c_target, zeros])),
        "g_rec": losses.reconstruction_loss(torch.cat([n, d]), second.image),
    }
    if use_sc:
        # first.defect_mask = [m_d | m_n]; second = [m_n^ | m_d^]: each map against its inverse.
        terms["g_sd_cyc"] = losses.sd_cycle_loss(first.defect_mask, second.defect_mask)
        terms["g_sd_con"] = losses.sd_region_loss(first.defect_mask, second.defect_mask)
        terms["g_outside"] = losses.outside_region_loss(first.defect_mask[:b], where)
    else:
        terms["g_sd_cyc"] = terms["g_sd_con"] = terms["g_outside"] = n.new_zeros(())
    terms["g_total"] = (
        terms["g_adv"]
        + lw.lambda_cls_f * terms["g_cls_f"]
        + lw.lambda_rec * terms["g_rec"]
        + lw.lambda_sd_cyc * terms["g_sd_cyc"] * use_sc
        + lw.lambda_sd_con * terms["g_sd_con"] * use_sc
        + lw.lambda_outside * terms["g_outside"] * use_sc
    )
    terms["mask_mean"] = (
        first.defect_mask[:b].mean() if first.defect_mask is not None else zeros.sum()
    )
    nets.opt_G.zero_grad(set_to_none=True)
    accelerator.backward(terms["g_total"])
    nets.opt_G.step()
    return terms


def set_learning_rates(nets: Nets, config: GanConfig, iteration: int) -> None:
    for opt, base in ((nets.opt_G, config.train.lr_g), (nets.opt_D, config.train.lr_d)):
        for group in opt.param_groups:
            group["lr"] = learning_rate(config, base, iteration)


@torch.no_grad()
def update_ema(G_ema: torch.nn.Module, G: torch.nn.Module, beta: float) -> None:
    """G_ema <- beta * G_ema + (1 - beta) * G, with one fused kernel per tensor list."""
    ema_params = list(G_ema.parameters())
    params = [p.detach() for p in G.parameters()]
    torch._foreach_lerp_(ema_params, params, 1.0 - beta)


def learning_rate(config: GanConfig, base: float, iteration: int) -> float:
    """Linear decay from `base` to lr_end (Sec. 4.1), after `lr_decay_start` of the run."""
    t = config.train
    start = t.lr_decay_start * t.iterations
    if iteration <= start:
        return base
    progress = min(1.0, (iteration - start) / max(1.0, t.iterations - start))
    return base + (t.lr_end - base) * progress


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def make_accelerator(config: GanConfig, expected_processes: int | None):
    """An Accelerator for 1..N processes; the process count is checked, not assumed."""
    from accelerate import Accelerator

    # G and D hold no buffers (instance norm keeps no running stats), so DDP has none to sync.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=config.train.mixed_precision
    )
    if expected_processes is not None and accelerator.num_processes != expected_processes:
        raise DganError(
            f"asked for {expected_processes} processes but the launcher started "
            f"{accelerator.num_processes}. On a CPU-only machine use 'dgan train gan --gpus N' "
            "(it sets ACCELERATE_USE_CPU=1 and --multi_gpu), or torchrun --nproc_per_node N."
        )
    return accelerator


def build_nets(config: GanConfig, num_classes: int, accelerator) -> Nets:
    torch.manual_seed(config.train.seed)  # identical initial weights on every process
    G, D = build_gan(config, num_classes)
    t = config.train
    fused = accelerator.device.type in ("cpu", "cuda")  # one kernel per step, not one per tensor
    opt_G = torch.optim.Adam(G.parameters(), t.lr_g, betas=(t.beta1, t.beta2), fused=fused)
    opt_D = torch.optim.Adam(D.parameters(), t.lr_d, betas=(t.beta1, t.beta2), fused=fused)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False) if t.ema else None
    G_p, D_p, opt_G, opt_D = accelerator.prepare(G, D, opt_G, opt_D)
    if G_ema is not None:
        G_ema.to(accelerator.device)
    inv_scale = None
    if accelerator.scaler is not None:
        inv_scale = 1.0 / accelerator.scaler.scale(torch.ones((), device=accelerator.device))
    return Nets(
        G=G_p,
        D=D_p,
        opt_G=opt_G,
        opt_D=opt_D,
        G_ema=G_ema,
        G_raw=accelerator.unwrap_model(G_p),
        D_raw=accelerator.unwrap_model(D_p),
        inv_scale=inv_scale,
    )


def training_state(nets: Nets, config: GanConfig, classes: list[str], iteration: int) -> dict:
    return {
        "iteration": iteration,
        "G": nets.G_raw.state_dict(),
        "D": nets.D_raw.state_dict(),
        "G_ema": nets.G_ema.state_dict() if nets.G_ema is not None else {},
        "opt_G": nets.opt_G.state_dict(),
        "opt_D": nets.opt_D.state_dict(),
        "classes": classes,
        "config_hash": config_hash(config, COMPATIBLE_PREFIXES),
        "config_json": json.dumps(flatten(config)),
    }


def restore_state(
    nets: Nets, state: dict, config: GanConfig, classes: list[str], where: Path
) -> int:
    """Load a checkpoint into `nets`; refuse one from an incompatible config or class list."""
    if state.get("config_hash") != config_hash(config, COMPATIBLE_PREFIXES):
        saved = json.loads(state.get("config_json", "{}"))
        now = flatten(config)
        diffs = [
            f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
            for k in sorted(set(saved) | set(now))
            if not k.startswith(COMPATIBLE_PREFIXES) and saved.get(k) != now.get(k)
        ]
        raise DganError(
            f"checkpoint {where} comes from an incompatible config:\n  "
            + "\n  ".join(diffs or ["(unknown config)"])
            + "\nResume with the run's own config (--config RUN/config.yaml) or start a new run."
        )
    if state.get("classes") != classes:
        raise DganError(
            f"checkpoint {where} was trained on classes {state.get('classes')}, "
            f"the dataset now gives {classes}"
        )
    nets.G_raw.load_state_dict(state["G"])
    nets.D_raw.load_state_dict(state["D"])
    if nets.G_ema is not None:
        nets.G_ema.load_state_dict(state["G_ema"])
    nets.opt_G.load_state_dict(state["opt_G"])
    nets.opt_D.load_state_dict(state["opt_D"])
    return int(state["iteration"])


def load_training_data(config: GanConfig) -> tuple[DatasetIndex, list[str], UnpairedStream]:
    """The index, the trained categories and the unpaired stream of the config's train split."""
    if config.data.root is None:
        raise DganError("data.root is not set; the launcher resolves it (see launch.prepare_run)")
    index = open_dataset(config.data.root)
    columns = select_classes(index, config.data.classes)
    classes = [index.classes[c] for c in columns]
    normals = index.select("train", normal=True)
    defects = [s for s in index.select("train", normal=False) if any(s.labels[c] for c in columns)]
    stream = UnpairedStream(
        normals,
        defects,
        columns,
        config.data.image_size,
        config.data.flip,
        config.train.seed,
        config.train.random_region_prob,
    )
    return index, classes, stream


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _fixed_samples(stream: UnpairedStream, device, count: int = 6) -> tuple[Tensor, Tensor]:
    """The same normals and defects for every sample grid of a run."""
    items = [stream[p] for p in range(count)]
    normals = torch.stack([i["normal"] for i in items]).to(device)
    defects = torch.stack([i["defect"] for i in items]).to(device)
    return to_unit_range(normals), to_unit_range(defects)


def _multi_label(classes: list[str]) -> list[str]:
    """The multi-category row of the grid: spall + bars + corrosion when present (Fig. 5)."""
    preferred = [c for c in ("spallation", "exposed_bars", "corrosion_stain") if c in classes]
    return preferred if len(preferred) >= 2 else classes[:2]


def train_gan(
    config: GanConfig,
    run_dir: Path,
    resume: Path | None = None,
    accelerator=None,
    quiet: bool = False,
    stop_at: int | None = None,
) -> Path:
    """Train Defect-GAN into `run_dir`; returns the run directory. All processes call this.

    `stop_at` pauses the run at that iteration with a checkpoint (state "paused"), as a
    scheduler preempting it would; `--resume` continues it on the same schedule.
    """
    accelerator = accelerator or make_accelerator(config, None)
    main = accelerator.is_main_process
    index, classes, stream = load_training_data(config)
    nets = build_nets(config, len(classes), accelerator)
    start = 0
    status = ckpt.read_status(run_dir)
    if resume is not None:
        state, rng = ckpt.load_checkpoint(resume, accelerator.process_index)
        start = restore_state(nets, state, config, classes, resume)
        ckpt.restore_rng(rng, accelerator.device)
    else:  # the noise-injection stream differs per process
        torch.manual_seed(config.train.seed + accelerator.process_index)
    if start >= config.train.iterations:
        if main:
            print(f"{run_dir}: already at iteration {start} of {config.train.iterations}.")
        return run_dir

    loader = gan_loader(
        stream,
        config.train.batch_size // 2,  # each stream position gives one normal and one defect
        accelerator.process_index,
        accelerator.num_processes,
        start_step=start,
        num_workers=config.data.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    tracker = _open_tracker(config, run_dir, status, main, index)
    if main:
        atomic_write_text(run_dir / "config.yaml", to_yaml(config))
        ckpt.write_status(run_dir, state="running", classes=classes, mlflow_run_id=tracker.run_id)
        (run_dir / "samples").mkdir(exist_ok=True)
    grid_inputs = _fixed_samples(stream, accelerator.device)
    evaluator = _open_evaluator(config, classes, accelerator, start)
    progress = Progress(config.train.iterations, start, quiet=quiet) if main else None
    interrupt = InterruptFlag()
    sums: dict[str, Tensor] = {}
    counts = {"d": 0, "g": 0}
    first_bad = torch.full((len(D_TERMS) + len(G_TERMS),), -1, device=accelerator.device)
    iteration = start
    log = config.log
    try:
        batches = iter(loader)
        for iteration in range(start + 1, config.train.iterations + 1):
            batch = _to_device(next(batches), accelerator.device)
            set_learning_rates(nets, config, iteration)
            update_g = iteration % config.train.n_critic == 0
            # On G's iterations, G's first pass is run once, with its graph, for both steps.
            first = first_pass(nets, batch, config) if update_g else None
            terms = d_step(nets, batch, config, accelerator, first)
            counts["d"] += 1
            if update_g:
                terms |= g_step(nets, batch, config, accelerator, first)
                counts["g"] += 1
                if nets.G_ema is not None:
                    beta = 0.0 if iteration <= config.train.ema_start else config.train.ema_beta
                    update_ema(nets.G_ema, nets.G_raw, beta)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            first_bad = _track_non_finite(first_bad, terms, iteration)

            if iteration % log.log_every == 0 or iteration == config.train.iterations:
                _check_finite(first_bad)  # one host sync per log interval, not per step
                metrics = _averages(sums, counts)
                metrics["lr_g"] = nets.opt_G.param_groups[0]["lr"]
                sums, counts = {}, {"d": 0, "g": 0}
                if main:
                    tracker.log_metrics(metrics, step=iteration)
                    shown = {
                        k: metrics[k]
                        for k in ("d_adv", "g_adv", "g_cls_f", "g_rec", "mask_mean")
                        if k in metrics
                    }
                    progress.update(iteration, shown)
            if main and (iteration % log.sample_every == 0 or iteration == config.train.iterations):
                _write_grid(nets, grid_inputs, classes, run_dir, iteration, tracker)
            if evaluator is not None and iteration % log.eval_every == 0:
                _evaluate(evaluator, nets, iteration, tracker, progress)
            if iteration % log.checkpoint_every == 0 or iteration == config.train.iterations:
                _check_finite(first_bad)
                _save(accelerator, nets, config, classes, run_dir, iteration)
            if interrupt.requested or iteration == stop_at:
                break
    except KeyboardInterrupt:
        interrupt.requested = True
    except DganError:
        if main:
            ckpt.write_status(run_dir, state="failed", iteration=iteration)
            tracker.finish("FAILED")
        raise
    finally:
        interrupt.restore()
        if progress:
            progress.close()

    if interrupt.requested:
        _check_finite(first_bad)
        path = _save(accelerator, nets, config, classes, run_dir, iteration)
        if main:
            ckpt.write_status(run_dir, state="interrupted", iteration=iteration)
            tracker.finish("KILLED")
            print(
                f"interrupted at iteration {iteration}; saved {path}. "
                f"Continue with --resume {run_dir}"
            )
        raise KeyboardInterrupt
    if iteration < config.train.iterations:  # paused by stop_at; its checkpoint is written
        if iteration % log.checkpoint_every:
            _save(accelerator, nets, config, classes, run_dir, iteration)
        if main:
            ckpt.write_status(run_dir, state="paused", iteration=iteration)
            tracker.finish("FINISHED")
        return run_dir
    if main:
        _finish(nets, config, classes, run_dir, tracker)
    accelerator.wait_for_everyone()
    return run_dir


def _to_device(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out["normal"] = to_unit_range(out["normal"])
    out["defect"] = to_unit_range(out["defect"])
    return out


def _track_non_finite(first_bad: Tensor, terms: dict[str, Tensor], iteration: int) -> Tensor:
    """Remember, per loss term and on the device, the first iteration it was NaN or inf."""
    names = (*D_TERMS, *G_TERMS)
    values = torch.stack(
        [
            terms[k].detach().float() if k in terms else first_bad.new_zeros((), dtype=torch.float)
            for k in names
        ]
    )
    bad = ~torch.isfinite(values)
    return torch.where(bad & (first_bad < 0), torch.full_like(first_bad, iteration), first_bad)


def _check_finite(first_bad: Tensor) -> None:
    bad = first_bad.cpu().tolist()
    hits = [(it, name) for it, name in zip(bad, (*D_TERMS, *G_TERMS), strict=True) if it >= 0]
    if hits:
        it, name = min(hits)
        raise DganError(
            f"training diverged: loss term {name} became NaN/inf at iteration {it}. "
            "No checkpoint was written after it; the last good one is kept. Lower the learning "
            "rates (train.lr_g, train.lr_d), or use mixed_precision=no, and resume from it."
        )


def _averages(sums: dict[str, Tensor], counts: dict[str, int]) -> dict[str, float]:
    if not sums:
        return {}
    names = list(sums)
    values = torch.stack([sums[k] for k in names]).cpu().tolist()
    return {
        k: v / max(1, counts["d" if k.startswith("d_") else "g"])
        for k, v in zip(names, values, strict=True)
    }


def _save(accelerator, nets: Nets, config, classes, run_dir: Path, iteration: int) -> Path:
    state = training_state(nets, config, classes, iteration) if accelerator.is_main_process else {}
    return ckpt.save_checkpoint(accelerator, run_dir, iteration, state, config.log.keep_checkpoints)


def _sampling_generator(nets: Nets) -> Generator:
    return nets.G_ema if nets.G_ema is not None else nets.G_raw


def _write_grid(nets: Nets, inputs, classes, run_dir: Path, iteration: int, tracker) -> None:
    from dgan.grid import sample_grid

    G = _sampling_generator(nets)
    was_training = G.training
    G.eval()
    image = sample_grid(G, *inputs, classes, _multi_label(classes))
    G.train(was_training)
    path = run_dir / "samples" / f"iter-{iteration:08d}.png"
    atomic_save_image(image, path)
    tracker.log_artifact(path, "samples")


def evaluation_due(config: GanConfig, start: int) -> bool:
    """Whether an evaluation falls in (start, iterations]: multiples of log.eval_every."""
    every = config.log.eval_every
    return every > 0 and config.train.iterations // every > start // every


def _open_evaluator(config: GanConfig, classes: list[str], accelerator, start: int):
    """The periodic evaluator on every process, or None when no evaluation falls in this run.

    Its fixed inputs and the real references' statistics are prepared once, here."""
    if not evaluation_due(config, start):
        return None
    from dgan.evaluation import TrainingEvaluator

    return TrainingEvaluator(config, classes, accelerator)


def _evaluate(evaluator, nets: Nets, iteration: int, tracker, progress) -> None:
    """Evaluate the sampling generator on every process (sharded); log on the main one."""
    metrics = evaluator(_sampling_generator(nets))
    if tracker.enabled:
        tracker.log_metrics(metrics, step=iteration)
        shown = ("fid", "fid_inspector", "category_accuracy", "background_change",
                 "spatial_precision", "diversity_l1")  # fmt: skip
        line = ", ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics)
        if progress is not None and progress.live:
            progress.close()
        print(f"evaluation at iteration {iteration}: {line}", flush=True)


def _open_tracker(config: GanConfig, run_dir: Path, status: dict, main: bool, index):
    from dgan.data import dataset_hash
    from dgan.tracking import Tracker, run_tags

    resumed = status.get("mlflow_run_id") is not None  # the run keeps the tags it was made with
    return Tracker(
        enabled=main,
        uri=config.log.tracking_uri,
        experiment=config.log.experiment,
        run_name=run_dir.name,
        params=flatten(config),
        tags=None if resumed or not main else run_tags("gan", config, run_dir, dataset_hash(index)),
        run_id=status.get("mlflow_run_id"),
    )


def _finish(nets: Nets, config: GanConfig, classes: list[str], run_dir: Path, tracker) -> None:
    from dgan.models.export import save_generator

    model_dir = save_generator(_sampling_generator(nets), config, classes, run_dir / "generator")
    model_uri = None
    if config.log.log_model:
        code = Path(__file__).parents[1] / "models" / "mlflow_generator.py"  # not imported here
        model_uri = tracker.log_code_model("generator", code, {"generator": model_dir})
    ckpt.write_status(
        run_dir, state="finished", iteration=config.train.iterations, model_uri=model_uri
    )
    tracker.finish("FINISHED")
    if model_uri is not None:
        from dgan.models.registry import gan_key_metrics, register_run_model

        metrics = gan_key_metrics(tracker.latest_metrics())
        if registration := register_run_model(tracker, model_uri, config.log, metrics):
            for line in registration.lines():
                print(line, flush=True)
            ckpt.write_status(run_dir, **registration.status_fields())
