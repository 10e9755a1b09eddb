"""Defect-GAN training on Accelerate (Sec. 3.1 and 4.1), one to N processes.

One iteration is one D update (Eq. 11); every `n_critic`-th iteration also updates G (Eq. 12)
through both cycles, n -> d -> n^ and d -> n -> d^. The two cycles run as two batched G
forwards: first [n | d] under [A_target | 0], then the results under [0 | A_real]. With layered
label sets (generator.label_sets), a third forward paints the top layer of each defacement.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dgan import losses
from dgan.config import GanConfig
from dgan.data import DatasetIndex, open_dataset
from dgan.data.loader import UnpairedStream, gan_loader, select_classes, to_unit_range
from dgan.errors import DganError
from dgan.events import Events
from dgan.io import atomic_save_image
from dgan.metrics.registry import GAN_D_TERMS, GAN_G_TERMS
from dgan.models import build_gan
from dgan.models.generator import (
    Generator,
    GeneratorOutput,
    control_map_from_labels,
    layer_of_categories,
    smooth_of_categories,
    split_top_layer,
    stack_layers,
)
from dgan.run.harness import Cadence, Export, TrainingJob
from dgan.run.launch import launch_training, training_worker
from dgan.run.result import JobResult
from dgan.tracking import PYFUNC_DIR
from dgan.train.augment import augment


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


def target_region(region: Tensor, height: int, width: int, shape: str = "box") -> Tensor:
    """(B, 1, H, W) map of where defacement is asked: the sample's box (or, with shape "ellipse",
    the ellipse inscribed in it; pixel centres on its edge count as inside) if flagged, else all."""
    use, x0, y0, bw, bh = region.unbind(1)
    ys = (torch.arange(height, device=region.device) + 0.5) / height
    xs = (torch.arange(width, device=region.device) + 0.5) / width
    if shape == "ellipse":
        dy = (ys - (y0 + bh / 2)[:, None]) / (bh / 2)[:, None]
        dx = (xs - (x0 + bw / 2)[:, None]) / (bw / 2)[:, None]
        inside = dy[:, :, None] ** 2 + dx[:, None, :] ** 2 <= 1
    else:
        in_y = (ys >= y0[:, None]) & (ys < (y0 + bh)[:, None])
        in_x = (xs >= x0[:, None]) & (xs < (x0 + bw)[:, None])
        inside = in_y[:, :, None] & in_x[:, None, :]
    area = inside.to(region.dtype)
    return torch.where(use[:, None, None] > 0, area, torch.ones_like(area))[:, None]


def first_stage_control(
    batch: dict[str, Tensor],
    height: int,
    width: int,
    config: GanConfig,
    labels: Tensor | None = None,
) -> list[Tensor]:
    """A for the first G pass over [n | d]: the target label (or `labels`, part of it) inside its
    region for the normals, "normal" (0) for the defects.

    Parts in G's cheap label form where A is constant over space: always for the defects, and
    for the normals unless training asks for random target regions (`uses_boxes`, from the
    config: a static choice, so no flag is read back from the device).
    """
    target = batch["target_labels"] if labels is None else labels
    return [defacement_control(batch, target, height, width, config), torch.zeros_like(target)]


def defacement_control(
    batch: dict[str, Tensor], labels: Tensor, height: int, width: int, config: GanConfig
) -> Tensor:
    """A for defacing the batch's normals with `labels`: inside the asked regions when training
    asks for them, else the labels alone (G's cheap form)."""
    if not uses_boxes(config):
        return labels
    where = target_region(batch["region"], height, width, config.train.region_shape)
    return control_map_from_labels(labels, height, width) * where


def uses_boxes(config: GanConfig) -> bool:
    return config.train.random_region_prob > 0


def first_pass(
    nets: Nets, batch: dict[str, Tensor], config: GanConfig, G: torch.nn.Module | None = None
) -> GeneratorOutput:
    """G's first stage over [n | d]: [d' | n'], with the autograd graph that G's update needs
    (G: nets.G; nets.G_raw under no_grad for D's step alone).

    With layered label sets (generator.label_sets), d' of a set of two layers or more is a second
    pass of G over the first: the set's other layers first, then the layer that the batch's
    layer_draw picks on top (split_top_layer)."""
    G = nets.G if G is None else G
    n, layers = batch["normal"], nets.G_raw.layers
    h, w = n.shape[2:]
    if layers is None:
        return G(torch.cat([n, batch["defect"]]), first_stage_control(batch, h, w, config))
    under, top, stacked = split_top_layer(batch["target_labels"], layers, batch["layer_draw"])
    both = G(torch.cat([n, batch["defect"]]), first_stage_control(batch, h, w, config, under))
    b = n.shape[0]
    first = GeneratorOutput(both.image[:b], both.foreground[:b], both.defect_mask[:b])
    defaced = paint_on_top(G, first, batch, config, top, stacked)
    return GeneratorOutput(
        image=torch.cat([defaced.image, both.image[b:]]),
        foreground=None,
        defect_mask=torch.cat([defaced.defect_mask, both.defect_mask[b:]]),
    )


def paint_on_top(
    G: torch.nn.Module,
    under: GeneratorOutput,
    batch: dict[str, Tensor],
    config: GanConfig,
    top: Tensor,
    stacked: Tensor,
) -> GeneratorOutput:
    """The second pass of a layered defacement: G paints the `top` labels over under.image."""
    h, w = under.image.shape[2:]
    over = G(under.image, defacement_control(batch, top, h, w, config))
    return stack_layers(under, over, stacked)


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
        with torch.no_grad():  # D's update needs the fakes, not G's graph
            first = first_pass(nets, batch, config, nets.G_raw)
    b = n.shape[0]
    policy, draws = config.discriminator.augment, batch["d_augment"]
    real = augment(torch.cat([d, n]), torch.cat([draws[:, 0], draws[:, 1]]), policy)
    # [d' from n | n' from d]
    fake_images = augment(first.image.detach(), torch.cat([draws[:, 2], draws[:, 3]]), policy)
    alpha = torch.cat([batch["alpha"][:, 0], batch["alpha"][:, 1]])
    x_hat = losses.interpolate(real, fake_images, alpha).requires_grad_(True)
    # Labels of what each image shows, for a projection D: real ones their own, fakes the asked.
    real_labels = torch.cat([batch["defect_labels"], zeros])
    fake_labels = torch.cat([batch["target_labels"], zeros])
    hat_labels = torch.lerp(fake_labels, real_labels, alpha[:, None].to(real_labels.dtype))
    # Two D calls, not one on [real | fake | x_hat]: the penalty's gradient and its double
    # backward then cover the interpolates only (3.2 s to 2.6 s per D update at 128 px, batch 4).
    src, cls = nets.D(torch.cat([real, fake_images]), torch.cat([real_labels, fake_labels]))
    num_classes = zeros.shape[1]
    cls, restored = cls[:, :num_classes], cls[:, num_classes:]  # restored: empty unless asked
    src_real, src_fake = src.float().chunk(2)
    src_hat, _ = nets.D(x_hat, hat_labels, with_cls=False)  # the penalty reads D_src only
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
    if lw.lambda_cls_restored_d > 0 and config.discriminator.restored_output:
        # real normals against the restorations n', on D_cls's extra logit
        terms["d_cls_restored"] = losses.restored_output_loss_d(
            restored[b : 2 * b].float(), restored[3 * b :].float()
        )
    elif lw.lambda_cls_restored_d > 0:  # restorations n' (see restored_classification_loss_d)
        terms["d_cls_restored"] = losses.restored_classification_loss_d(
            cls[3 * b :].float(), batch["defect_labels"]
        )
    else:
        terms["d_cls_restored"] = n.new_zeros(())
    terms["d_total"] = (
        terms["d_adv"]
        + lw.lambda_gp * terms["d_gp"]
        + lw.lambda_cls_r * terms["d_cls_r"]
        + lw.lambda_cls_fake_d * terms["d_cls_fake"]
        + lw.lambda_cls_restored_d * terms["d_cls_restored"]
    )
    nets.opt_D.zero_grad(set_to_none=True)
    accelerator.backward(terms["d_total"])
    nets.opt_D.step()
    return terms


def rec_weight(first: GeneratorOutput, config: GanConfig) -> Tensor | None:
    """L_rec's pixel weights: None (every pixel alike, the paper), or with rec_region=outside_mask
    1 - [m_d | m_n] of the first pass, detached: n^ need not recover the surface under the defect
    d' painted, nor d^ the defect that n' painted over, so m gains nothing in the cycle by staying
    half transparent, and gets no gradient from the weight itself."""
    if config.loss.rec_region == "image":
        return None
    return 1 - first.defect_mask.detach()


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
    where = target_region(batch["region"], n.shape[2], n.shape[3], config.train.region_shape)
    if first is None:
        first = first_pass(nets, batch, config)  # [d' | n']
    # [n^ | d^]; A as labels, i.e. repeated over space (training-time control map, Sec. 3.1).
    second = nets.G(first.image, torch.cat([zeros, c_real]), noise=config.generator.cycle_noise)
    for p in nets.D_raw.parameters():
        p.requires_grad_(False)
    draws = batch["d_augment"]
    seen = augment(first.image, torch.cat([draws[:, 4], draws[:, 5]]), config.discriminator.augment)
    src, cls = nets.D_raw(seen, torch.cat([c_target, zeros]))
    for p in nets.D_raw.parameters():
        p.requires_grad_(True)
    lw, use_sc = config.loss, config.generator.sc
    terms = {
        "g_adv": losses.adversarial_loss_g(src.float()),
        "g_cls_f": losses.classification_loss(
            cls[:, : zeros.shape[1]].float(), torch.cat([c_target, zeros])
        ),
        "g_rec": losses.reconstruction_loss(
            torch.cat([n, d]), second.image, rec_weight(first, config)
        ),
    }
    if config.discriminator.restored_output:  # Eq. 7 also asks n' not to look restored
        restored = cls[b:, zeros.shape[1] :].float()
        terms["g_cls_f"] = terms["g_cls_f"] + losses.classification_loss(
            restored, torch.zeros_like(restored)
        ) * (restored.shape[0] / cls.shape[0])
    if lw.lambda_cls_f_weakest > 0:
        terms["g_cls_f_weakest"] = losses.weakest_category_loss(
            cls[:b, : zeros.shape[1]].float(), c_target
        )
    else:
        terms["g_cls_f_weakest"] = n.new_zeros(())
    if use_sc:
        # first.defect_mask = [m_d | m_n]; second = [m_n^ | m_d^]: each map against its inverse.
        terms["g_sd_cyc"] = losses.sd_cycle_loss(first.defect_mask, second.defect_mask)
        terms["g_sd_con"] = losses.sd_region_loss(first.defect_mask, second.defect_mask)
        terms["g_outside"] = losses.outside_region_loss(first.defect_mask[:b], where)
    else:
        terms["g_sd_cyc"] = terms["g_sd_con"] = terms["g_outside"] = n.new_zeros(())
    # both maps of the first pass, m_d and m_n, as Eq. 10 takes them
    has_mask = first.defect_mask is not None and lw.lambda_binary > 0
    terms["g_binary"] = losses.binary_mask_loss(first.defect_mask) if has_mask else n.new_zeros(())
    if lw.lambda_diversity > 0:  # the config refuses it without ANI and LWC
        # the defacements again, with a second draw of ANI's noise: same n, same A, same layers
        h, w = n.shape[2:]
        if nets.G_raw.layers is None:
            redrawn = nets.G(n, defacement_control(batch, c_target, h, w, config)).defect_mask
        else:
            under, top, stacked = split_top_layer(c_target, nets.G_raw.layers, batch["layer_draw"])
            again = nets.G(n, defacement_control(batch, under, h, w, config))
            redrawn = paint_on_top(nets.G, again, batch, config, top, stacked).defect_mask
        terms["g_diversity"] = losses.diversity_loss(
            first.defect_mask[:b], redrawn, lw.diversity_cap
        )
    else:
        terms["g_diversity"] = n.new_zeros(())
    terms["g_total"] = (
        terms["g_adv"]
        + lw.lambda_cls_f * terms["g_cls_f"]
        + lw.lambda_cls_f_weakest * terms["g_cls_f_weakest"]
        + lw.lambda_rec * terms["g_rec"]
        + lw.lambda_sd_cyc * terms["g_sd_cyc"] * use_sc
        + lw.lambda_sd_con * terms["g_sd_con"] * use_sc
        + lw.lambda_outside * terms["g_outside"] * use_sc
        + lw.lambda_binary * terms["g_binary"]
        + lw.lambda_diversity * terms["g_diversity"]
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


def ema_beta(config: GanConfig, iteration: int) -> float:
    """0 (copy G) until ema_start, then ema_beta."""
    return 0.0 if iteration <= config.train.ema_start else config.train.ema_beta


# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def check_minibatch_std(config: GanConfig, num_processes: int) -> None:
    """D's runs of `discriminator.minibatch_std` images must not straddle two kinds of image in
    one process's batch, which holds train.batch_size / 2 / num_processes of each kind."""
    group = config.discriminator.minibatch_std
    local = config.train.batch_size // 2 // num_processes
    if group and local % group:
        raise DganError(
            f"discriminator.minibatch_std={group} must divide each process's "
            f"{local} images of one kind (train.batch_size={config.train.batch_size} over "
            f"{num_processes} processes, half normals and half defects); use a divisor of "
            f"{local}, or 0",
            exit_code=2,
        )


def build_nets(config: GanConfig, classes: int | Sequence[str], accelerator) -> Nets:
    """G, D, their optimizers and G's EMA copy, prepared by Accelerate; `classes` as build_gan."""
    check_minibatch_std(config, accelerator.num_processes)
    torch.manual_seed(config.train.seed)  # identical initial weights on every process
    G, D = build_gan(config, classes)
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


def load_training_data(config: GanConfig) -> tuple[DatasetIndex, list[str], UnpairedStream]:
    """The index, the trained categories and the unpaired stream of the config's train split."""
    if config.data.root is None:
        raise DganError("data.root is not set; the launcher resolves it (dgan.run.launch)")
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
        config.train.set_power,
    )
    return index, classes, stream


def to_device(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    out["normal"] = to_unit_range(out["normal"])
    out["defect"] = to_unit_range(out["defect"])
    return out


def evaluation_due(config: GanConfig, start: int) -> bool:
    """Whether an evaluation falls in (start, iterations]: multiples of log.eval_every."""
    every = config.log.eval_every
    return every > 0 and config.train.iterations // every > start // every


# ---------------------------------------------------------------------------------------------
# The job: what the run harness (dgan.run.harness) needs of Defect-GAN
# ---------------------------------------------------------------------------------------------


class GanJob(TrainingJob):
    """Defect-GAN training: nets and data are built here; the harness runs the lifecycle."""

    kind = "gan"
    step_name = "iteration"
    resumable_keys = ("log.", "eval.", "train.iterations", "data.num_workers", "data.root")
    # Read from the config at every step (set_learning_rates, d_step, g_step), so a population-
    # based-training exploit may resume another trial's checkpoint with these perturbed.
    schedulable_keys = (
        "loss.lambda_gp", "loss.lambda_cls_r", "loss.lambda_cls_f", "loss.lambda_rec",
        "loss.lambda_sd_cyc", "loss.lambda_sd_con", "loss.lambda_outside",
        "loss.lambda_binary", "loss.lambda_cls_fake_d", "loss.lambda_diversity", "train.lr_g",
        "train.lr_d",
    )  # fmt: skip
    guarded_terms = (*GAN_D_TERMS, *GAN_G_TERMS)
    divergence_advice = (
        "Lower the learning rates (train.lr_g, train.lr_d), or use mixed_precision=no, and "
        "resume from it."
    )

    def __init__(self, config: GanConfig, accelerator, events: Events) -> None:
        self.config, self.accelerator, self.events = config, accelerator, events
        self.seed = config.train.seed
        self.index, self.classes, self.stream = load_training_data(config)
        self.nets = build_nets(config, self.classes, accelerator)
        log = config.log
        self.cadence = Cadence(
            config.train.iterations, log.log_every, log.checkpoint_every, log.eval_every,
            log.sample_every,
        )  # fmt: skip
        self.evaluator = None

    def step(self, iteration: int, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """One iteration of the Algorithm (Sec. 3.1, 4.1): D's update on Eq. 11; every
        n_critic-th iteration also G's update on Eq. 12 through both cycles, then the EMA."""
        nets, config, accelerator = self.nets, self.config, self.accelerator
        batch = to_device(batch, accelerator.device)
        set_learning_rates(nets, config, iteration)
        update_g = iteration % config.train.n_critic == 0
        first = first_pass(nets, batch, config) if update_g else None  # shared by both steps
        terms = d_step(nets, batch, config, accelerator, first)
        if update_g:
            terms |= g_step(nets, batch, config, accelerator, first)
            if nets.G_ema is not None:
                update_ema(nets.G_ema, nets.G_raw, ema_beta(config, iteration))
        return terms

    def batches(self, start: int):
        return gan_loader(
            self.stream,
            self.config.train.batch_size // 2,  # each stream position: one normal, one defect
            self.accelerator.process_index,
            self.accelerator.num_processes,
            start_step=start,
            num_workers=self.config.data.num_workers,
            pin_memory=self.accelerator.device.type == "cuda",
        )

    def state_dict(self) -> dict[str, Any]:
        nets = self.nets
        return {
            "G": nets.G_raw.state_dict(),
            "D": nets.D_raw.state_dict(),
            "G_ema": nets.G_ema.state_dict() if nets.G_ema is not None else {},
            "opt_G": nets.opt_G.state_dict(),
            "opt_D": nets.opt_D.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        nets = self.nets
        nets.G_raw.load_state_dict(state["G"])
        nets.D_raw.load_state_dict(state["D"])
        if nets.G_ema is not None:
            nets.G_ema.load_state_dict(state["G_ema"])
        nets.opt_G.load_state_dict(state["opt_G"])
        nets.opt_D.load_state_dict(state["opt_D"])

    def begin(self, start: int, run_dir: Path) -> None:
        """The fixed inputs of every sample grid, and the evaluator when one falls due."""
        if self.accelerator.is_main_process:
            (run_dir / "samples").mkdir(exist_ok=True)
        self.grid_inputs = fixed_samples(self.stream, self.accelerator.device)
        if evaluation_due(self.config, start):
            from dgan.evaluation.periodic import TrainingEvaluator

            self.evaluator = TrainingEvaluator(
                self.config, self.classes, self.accelerator, self.events
            )

    def logged(self, step: int, means: dict[str, float]) -> dict[str, float]:
        return {**means, "lr_g": self.nets.opt_G.param_groups[0]["lr"]}

    def shown(self, step: int, logged: dict[str, float]) -> dict[str, float]:
        keys = ("d_adv", "g_adv", "g_cls_f", "g_rec", "mask_mean")
        return {k: logged[k] for k in keys if k in logged}

    def evaluate(self, step: int, run_dir: Path) -> dict[str, float]:
        """The sampling generator on the fixed eval sets, sharded over processes."""
        if self.evaluator is None:
            return {}
        metrics = self.evaluator(self.sampling_generator())
        shown = ("fid", "fid_inspector", "realism_auc", "realism_auc_restored", "category_accuracy",
                 "background_change", "spatial_precision", "diversity_l1")  # fmt: skip
        line = ", ".join(f"{k} {metrics[k]:.4g}" for k in shown if k in metrics)
        self.events.info(f"evaluation at iteration {step}: {line}")
        return metrics

    def sampling_generator(self) -> Generator:
        return self.nets.G_ema if self.nets.G_ema is not None else self.nets.G_raw

    def write_samples(self, step: int, run_dir: Path) -> Path:
        from dgan.grid import sample_grid

        G = self.sampling_generator()
        was_training = G.training
        G.eval()
        image = sample_grid(G, *self.grid_inputs, self.classes, multi_label_row(self.classes))
        G.train(was_training)
        path = run_dir / "samples" / f"iter-{step:08d}.png"
        atomic_save_image(image, path)
        return path

    def finish(self, run_dir: Path) -> Export | None:
        if not self.accelerator.is_main_process:
            return None
        from dgan.models.export import save_generator

        G = self.sampling_generator()
        model_dir = save_generator(G, self.config, self.classes, run_dir / "generator")
        return Export(model_dir, PYFUNC_DIR / "pyfunc_generator.py", "generator")

    def version_metrics(self, final: dict[str, float]) -> dict[str, float]:
        from dgan.tracking.registry import gan_key_metrics

        return gan_key_metrics(final)

    def dataset_hash(self) -> str:
        from dgan.data import dataset_hash

        return dataset_hash(self.index)

    # -- checks before a run directory exists (dgan.run.launch.prepare_run) ---------------------

    @staticmethod
    def check_config(config: GanConfig) -> GanConfig:
        return config

    @staticmethod
    def check_data(config: GanConfig, start: int, decode: bool = True) -> None:
        """The data is usable, the categories exist, and the evaluation asked for can run."""
        from dgan.data.check import require_usable

        index = require_usable(config.data.root)
        columns = select_classes(index, config.data.classes or None)
        names = [index.classes[c] for c in columns]
        if config.generator.label_sets == "layered":
            layer_of_categories(names, config.generator.layers)
        smooth_of_categories(names, config.generator.smooth_categories)
        if evaluation_due(config, start):
            from dgan.evaluation.periodic import check_evaluation

            check_evaluation(config, index)


def fixed_samples(stream: UnpairedStream, device, count: int = 6) -> tuple[Tensor, Tensor]:
    """The same normals and defects for every sample grid of a run."""
    items = [stream[p] for p in range(count)]
    normals = torch.stack([i["normal"] for i in items]).to(device)
    defects = torch.stack([i["defect"] for i in items]).to(device)
    return to_unit_range(normals), to_unit_range(defects)


def multi_label_row(classes: list[str]) -> list[str]:
    """The multi-category row of the grid: spall + bars + corrosion when present (Fig. 5)."""
    preferred = [c for c in ("spallation", "exposed_bars", "corrosion_stain") if c in classes]
    return preferred if len(preferred) >= 2 else classes[:2]


def run_gan(config: GanConfig, resume: str | None = None, gpus: int = 1, **options) -> JobResult:
    """Train Defect-GAN on `gpus` processes; returns the typed result.

    `options` are dgan.run.launch.launch_training's: run_name, quiet, events, and `callback`,
    which receives every log, evaluation and checkpoint and may ask for a checkpoint or a stop;
    `stop_at` pauses the run at that iteration with a checkpoint (state "paused"), as a
    scheduler preempting it would, and `resume` continues it on the same schedule.
    """
    return launch_training(GanJob, config, resume, gpus, **{"run_name": "gan", **options})


def worker(run_dir: Path, processes: int, events: Events, resume, stop_at) -> JobResult:
    """One process of `dgan train gan --gpus N` (dgan.run.launch)."""
    return training_worker(GanJob, run_dir, processes, events, resume, stop_at)
