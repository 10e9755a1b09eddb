"""One typed, validated config per job: GAN training, inspector training, synthesis, tuning.

The paper's values are the defaults (Sec. 3.1, 4.1 and 4.2 of Defect-GAN, WACV 2021). Presets in
`dgan/configs/<job>/*.yaml` override them, `--config FILE` and `--set section.key=value` override
the presets, and the result is validated before any work starts.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dgan.errors import DganError

PRESET_DIR = Path(__file__).parent / "configs"


MAX_REALISM_REPEATS = 20  # classifier seeds per realism figure (eval.realism_repeats)
MAX_CONTROL_REPEATS = 20  # defacements per real defect that the inspector judges


def check_realism_repeats(repeats: int) -> None:
    """DganError (exit code 2) unless 1 <= repeats <= MAX_REALISM_REPEATS, in the words of the
    --realism-repeats option (`dgan eval synth`, and its queued job)."""
    if not 1 <= repeats <= MAX_REALISM_REPEATS:
        raise DganError(
            f"--realism-repeats must be between 1 and {MAX_REALISM_REPEATS}, got {repeats}: "
            "each repeat trains one more classifier per test (1 for the plain test)",
            exit_code=2,
        )


def check_realism_options(
    realism_n: int | None, realism: bool, by_set: bool = False, steps: int | None = None
) -> None:
    """DganError (exit code 2) for a --realism-n below 4 or --realism-steps below 1, or for
    --realism-n, --realism-steps or --realism-by-set given with --no-realism (`dgan eval synth`,
    and its queued job)."""
    if by_set and not realism:
        raise DganError(
            "--realism-by-set adds to the realism test, which --no-realism skips: drop one of them",
            exit_code=2,
        )
    if steps is not None and not realism:
        raise DganError(
            f"--realism-steps {steps} trains the realism test's classifier, which --no-realism "
            "skips: drop one of them",
            exit_code=2,
        )
    if steps is not None and steps < 1:
        raise DganError(
            f"--realism-steps must be at least 1, got {steps}: it is the classifier's Adam steps "
            "per 600 training images (300 by default)",
            exit_code=2,
        )
    if realism_n is None:
        return
    if not realism:
        raise DganError(
            f"--realism-n {realism_n} sizes the realism test, which --no-realism skips: drop one "
            "of them",
            exit_code=2,
        )
    if realism_n < 4:
        raise DganError(
            f"--realism-n must be at least 4, got {realism_n}: the test holds out half of the "
            "real defects",
            exit_code=2,
        )


def check_control_repeats(repeats: int, inspector: str | None, realism: bool) -> None:
    """DganError (exit code 2) unless 1 <= repeats <= MAX_CONTROL_REPEATS and, above 1, there
    is an inspector and the realism test whose images it judges; in the words of the
    --control-repeats option (`dgan eval synth`, and its queued job)."""
    if not 1 <= repeats <= MAX_CONTROL_REPEATS:
        raise DganError(
            f"--control-repeats must be between 1 and {MAX_CONTROL_REPEATS}, got {repeats}: "
            "each repeat defaces every label set once more, on other normals (1 for one "
            "defacement per real defect)",
            exit_code=2,
        )
    if repeats > 1 and (inspector is None or not realism):
        missing = "--inspector" if inspector is None else "the realism test (drop --no-realism)"
        raise DganError(
            f"--control-repeats {repeats} repeats the defacements that the inspector judges "
            f"with the realism test's images, and needs {missing}",
            exit_code=2,
        )


class Section(BaseModel):
    """Base of every config section: unknown keys and wrong types are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------------------------------------
# Defect-GAN
# ---------------------------------------------------------------------------------------------


class GeneratorConfig(Section):
    conv_dim: int = Field(64, ge=4, le=512)  # StarGAN G width
    repeat_num: int = Field(6, ge=0, le=16)  # StarGAN residual blocks in the bottleneck
    spade_hidden: int = Field(128, ge=4, le=1024)  # SPADE (Park et al. 2019) hidden width
    upsample: Literal["transpose", "nearest", "bilinear"] = "transpose"  # StarGAN: 4x4 transposed
    # Beyond the paper: residual blocks at full resolution after the last upsampling (SPADE when
    # scc is on). 0 is the paper's decoder: one conv at full resolution before the heads.
    fine_blocks: int = Field(0, ge=0, le=8)
    # Beyond the paper: where A starts to enter G through SPADE. "decoder" is the paper's (every
    # block of the decoder part: the second half of the bottleneck on). "bottleneck" makes every
    # bottleneck block's norms SPADE, so that the category can shape a defect's layout before
    # the decoder paints it.
    spade_from: Literal["decoder", "bottleneck"] = "decoder"
    # Beyond the paper: "offset" paints the foreground f as an offset of the input in tanh space,
    # f = tanh(atanh(x) + h), so that f starts as the surface itself and a change of colour or
    # texture is learned, not painted from a flat colour. "image" is the paper's f = tanh(h).
    foreground: Literal["image", "offset"] = "image"
    # Beyond the paper: what G paints into f is split into its grey and its colour (each channel's
    # difference from the grey), and the colour is averaged over blocks of this many pixels and
    # resized back bilinearly, as JPEG subsamples chroma. A crack stays a pixel wide in brightness
    # but cannot be fringed with single magenta or green pixels. 1 is the paper's f.
    chroma_stride: int = Field(1, ge=1, le=16)
    # Beyond the paper: where chroma_stride's averaging and grain act on f. "logit" (the default):
    # on what G paints, before f's tanh. There a black crack or a white bloom saturates tanh, so
    # its colour is free of any loss and the averaging carries it onto the lighter neighbours as
    # a coloured fringe, and grain shifts the colour of a pixel that has one. "image": after the
    # tanh, on f's pixel values (clipped to [-1, 1]), so the averaged colour is the one seen and
    # grain changes brightness alone. The same f when chroma_stride is 1 and grain 0.
    paint_space: Literal["logit", "image"] = "logit"
    # Where grain alone is added, when it differs from paint_space (None: paint_space's). "logit"
    # with paint_space "image": grit before the tanh, which fades on a saturated black or white
    # pixel, and its colour averaged after it.
    grain_space: Literal["logit", "image"] | None = None
    # Beyond the paper: ANI's learned noise strengths are kept divided by this gain, so each
    # optimizer step moves a strength this many times further (Adam's step does not scale with
    # the parameter). 1 is the paper's: in the demo preset's 600 G updates no strength passed 0.035,
    # and the noise barely changed an image. Needs generator.ani.
    noise_gain: float = Field(1.0, gt=0, le=1000)
    # Beyond the paper: a third head beside f and m predicts, at each pixel, the amplitude (from 0
    # up to this cap) of fresh N(0, 1) noise added to f's grey before its tanh (after it with
    # grain_space, or paint_space, "image"), so that a spall's grit or a bloom's crystals need
    # not be drawn by the convs from ANI's feature noise. Drawn
    # in every pass of G that draws noise (generator.cycle_noise decides for the cycle's second
    # pass), with or without ANI. 0 is the paper's G (no such head). Needs generator.lwc.
    grain: float = Field(0.0, ge=0, le=10)
    # Beyond the paper: categories painted without grain. Where A asks one of them, grain's
    # amplitude is 0, so a smooth defect (a rust stain) does not carry the grit that a spall's
    # texture needs. Restorations (A = 0) keep their grain. Needs generator.grain > 0.
    smooth_categories: list[str] = []
    # Ablation switches of Table 2; all off is StarGAN.
    scc: bool = True  # spatial and categorical control: A enters the decoder through SPADE
    ani: bool = True  # adaptive noise injection after every conv block
    lwc: bool = True  # layer-wise composition, Eq. 1-4
    # Beyond the paper: false runs the cycle's second pass (n^ and d^, Eq. 5-6) without ANI's
    # noise (or grain's). There L_rec asks d^ to repeat a real defect's texture to the pixel, so
    # any noise costs L1 and G learns to turn it off everywhere, defacements included. True is
    # the paper's.
    cycle_noise: bool = True
    sc: bool = True  # spatial constraints, Eq. 9-10 (needs lwc)
    # Beyond the paper: how G paints a label set that spans more than one layer (see `layers`).
    # "joint" is the paper's: one pass of G under the multi-hot A. "layered": two passes, the second
    # on the first's output, Eq. 4 applied twice: first the set without one of its layers, then
    # that layer on top. Training puts one of the set's layers on top at random, inference the
    # last in layer order; D judges the composite under the whole set. A set of one layer takes one
    # pass either way. Costs one more pass of G over the normals in each step. Needs lwc.
    label_sets: Literal["joint", "layered"] = "joint"
    # With label_sets "layered": categories painted together as one layer, the layers listed in
    # painting order (e.g. exposed bars with the spallation they show through). Every category not
    # listed is a layer of its own, painted after these in A's channel order.
    layers: list[list[str]] = []


class DiscriminatorConfig(Section):
    conv_dim: int = Field(64, ge=4, le=512)  # StarGAN D width
    # Stride-2 layers; None derives it from the image size so the last map is 2x2.
    n_layers: int | None = Field(None, ge=2, le=8)
    max_dim: int = Field(2048, ge=8)  # channel cap; StarGAN's D grows to 2048 at 128 px
    # Beyond the paper: a second PatchGAN D_src head after this many stride-2 layers (at 32 px,
    # 2 gives an 8x8 map of 18 px patches), summed into the WGAN loss. None: the paper's one head.
    fine_src_layer: int | None = Field(None, ge=1, le=7)
    # Beyond the paper: class-conditional D_src by projection (Miyato and Koyama 2018). The
    # paper's D judges realism without the label and the class with D_cls alone.
    projection: bool = False
    # Beyond the paper: one more D_cls logit, "a restoration by G" (see loss.lambda_cls_restored_d).
    restored_output: bool = False
    # Beyond the paper: D sees every image, real and fake, in its update and in G's, through a
    # differentiable augmentation (DiffAugment, Zhao et al. 2020), so that it cannot learn a few
    # hundred real defects by heart. "translation": shifts of up to 1/8 of a side;
    # "translation_colour": also a mild brightness and contrast change (dgan/train/augment.py).
    augment: Literal["none", "translation", "translation_colour"] = "none"
    # Beyond the paper: each D_src head also reads the standard deviation of its features over
    # groups of this many images of one kind (Karras et al. 2018, "minibatch standard deviation"),
    # so that D can tell a batch of fakes that all draw one shape at one place from varied real
    # defects. 0: off, the paper's D.
    minibatch_std: int = Field(0, ge=0, le=64)
    # Beyond the paper: D_src reads a trunk of its own, of the same shape, instead of sharing
    # StarGAN's trunk with D_cls, whose three category losses otherwise shape the features that
    # tell real from fake. False: the paper's (StarGAN's) shared trunk.
    separate_src: bool = False
    # Beyond the paper: a 3x3 stride-1 conv of this many channels at full resolution before D's
    # first stride-2 layer (StarGAN's D starts with a 4x4 stride-2 conv), so that D reads each
    # pixel with its neighbours, as the realism test's classifier does. 0: off, the paper's D.
    stem: int = Field(0, ge=0, le=512)


class GanDataConfig(Section):
    root: Path | None = None  # None: the procedural demo set under data/demo (made when absent)
    image_size: int = Field(128, ge=16, le=1024)  # Sec. 4.1: all images resized to 128x128
    flip: bool = True  # random horizontal flip
    classes: list[str] | None = None  # None: every class of the dataset
    num_workers: int = Field(2, ge=0, le=64)


class GanTrainConfig(Section):
    iterations: int = Field(500_000, ge=1)  # Sec. 4.1; one iteration = one D update
    # Sec. 4.1. Images per iteration over all processes: half normals, half defects, so one
    # iteration does the work of one StarGAN iteration at the same batch size.
    batch_size: int = Field(4, ge=2)
    n_critic: int = Field(5, ge=1)  # Sec. 4.1: one G update every five D updates
    lr_g: float = Field(2e-4, gt=0)  # Sec. 4.1
    lr_d: float = Field(2e-4, gt=0)  # Sec. 4.1
    lr_end: float = Field(1e-6, ge=0)  # Sec. 4.1: "reducing to 1e-6"
    lr_decay_start: float = Field(0.0, ge=0, le=1)  # fraction of the run before linear decay
    beta1: float = Field(0.5, ge=0, lt=1)  # Sec. 4.1, Adam
    beta2: float = Field(0.999, ge=0, lt=1)  # Sec. 4.1, Adam
    # Beyond the paper: this share of defacements asks for the defect inside a random box (A is
    # the label there and "normal" elsewhere), so the spatial control of Fig. 6 is trained, not
    # only hoped for from constant maps. 0 is the paper's constant A.
    random_region_prob: float = Field(0.0, ge=0, le=1)
    # The asked region's shape in training: the box, or the ellipse inscribed in it (no straight
    # edge in A or in the outside-region term for G to copy into m). Boxes at inference either way.
    region_shape: Literal["box", "ellipse"] = "box"
    # Beyond the paper: the label set of each real defect drawn and of each defacement asked for
    # is drawn with probability proportional to (its count among the training defects) **
    # set_power, a real defect then uniformly within its set. 1 is the data's own distribution,
    # co-occurrence included, each defect once per pass (the paper's); 0 draws every set that
    # occurs equally often. Real and asked sets follow one distribution, so D_src cannot tell
    # defacements by how often their kind occurs.
    set_power: float = Field(1.0, ge=0, le=1)
    ema: bool = True  # EMA of G for sampling and evaluation (StyleGAN practice)
    ema_beta: float = Field(0.999, ge=0, lt=1)
    ema_start: int = Field(0, ge=0)  # iterations before the EMA starts tracking (copies G)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0


class GanLossConfig(Section):
    lambda_gp: float = Field(10.0, ge=0)  # WGAN-GP (Gulrajani et al. 2017), as StarGAN
    lambda_cls_r: float = Field(2.0, ge=0)  # Eq. 11
    lambda_cls_f: float = Field(5.0, ge=0)  # Eq. 12
    # Beyond the paper: Eq. 7 once more on each defacement's least convincing asked category
    # (losses.weakest_category_loss), so that a two-category ask gets both (0 by default).
    lambda_cls_f_weakest: float = Field(0.0, ge=0)
    lambda_rec: float = Field(5.0, ge=0)  # Eq. 12
    lambda_sd_cyc: float = Field(5.0, ge=0)  # Eq. 12
    lambda_sd_con: float = Field(1.0, ge=0)  # Eq. 12
    lambda_outside: float = Field(5.0, ge=0)  # beyond the paper: m outside the asked region
    # Beyond the paper: m(1 - m), so that G either replaces a pixel by f or keeps it, instead of
    # blending f in at m ~ 0.5 (0 by default: the paper's m is free in [0, 1]).
    lambda_binary: float = Field(0.0, ge=0)
    # Beyond the paper: D_cls also learns that defacements d' show no real defect (0 by default).
    lambda_cls_fake_d: float = Field(0.0, ge=0)
    # Beyond the paper: D_cls also learns that restorations n' still show the defect they came
    # from (0 by default).
    lambda_cls_restored_d: float = Field(0.0, ge=0)
    # Beyond the paper: where L_rec (Eq. 8) compares an input with its cycle reconstruction.
    # "image": everywhere (the paper). "outside_mask": each pixel weighted by 1 - m of the first
    # pass, so that what a layer painted over need not be recovered, and m is not rewarded for
    # letting the surface show through a defect (or a defect through a restoration).
    rec_region: Literal["image", "outside_mask"] = "image"
    # Beyond the paper: diversity-sensitive term (Yang et al. 2019): two noise draws of the same
    # defacement should paint different maps m, their mean |m1 - m2| rewarded up to
    # diversity_cap (0 by default: the paper's ANI has no such term).
    lambda_diversity: float = Field(0.0, ge=0)
    diversity_cap: float = Field(0.05, gt=0, le=1)


class LogConfig(Section):
    run_root: Path = Path("runs")
    experiment: str = "defect-gan"
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    log_every: int = Field(100, ge=1)
    sample_every: int = Field(5_000, ge=1)
    checkpoint_every: int = Field(10_000, ge=1)
    keep_checkpoints: int = Field(3, ge=1)
    log_model: bool = True  # log the final EMA generator to MLflow
    # Register the logged generator as a new version of this MLflow model; empty: do not.
    registered_model: str | None = "defect-gan"
    # Move alias `champion` to the new version only when this metric improves on the champion's;
    # "auto": fid with the Inception weights, else realism_auc (dgan.metrics.registry).
    promote_if_better: str | None = None
    promote_mode: Literal["min", "max"] | None = None  # None: the metric's registered direction
    # Iterations between evaluations of the EMA generator (see `eval`), at multiples of it; 0
    # turns them off. Runs shorter than this never evaluate.
    eval_every: int = Field(10_000, ge=0)

    _empty_is_off = field_validator("registered_model", "promote_if_better", mode="before")(
        lambda v: v or None
    )

    @model_validator(mode="after")
    def _check_registry(self) -> LogConfig:
        return check_registry_keys(self)


def check_registry_keys(log: Any) -> Any:
    """Promotion needs a logged, registered model and a known direction of improvement."""
    metric = log.promote_if_better
    if metric is None or metric == "auto":  # the job's config resolves "auto"
        return log
    if not (log.log_model and log.registered_model):
        raise ValueError(
            f"promote_if_better={metric} needs log.log_model=true and a log.registered_model: "
            "only a registered version can be promoted"
        )
    if log.promote_mode is None:
        from dgan.metrics.registry import metric_direction

        if metric_direction(metric) is None:
            raise ValueError(
                f"promote_if_better={metric}: the name does not say whether higher or lower is "
                "better; set log.promote_mode=max or log.promote_mode=min"
            )
    return log


class GanEvalConfig(Section):
    """Periodic evaluation during training (dgan.evaluation): the same fixed inputs every time."""

    # Synthesized images per evaluation, and real training defects they are compared with; FID
    # and KID are comparable only at the same N. 1,000 keeps an evaluation to seconds on a GPU.
    n: int = Field(1000, ge=2)
    # A frozen inspector trained on real data (run dir, model dir or models:/NAME@alias): gives
    # fid_inspector, kid_inspector and category-control accuracy. None: neither is computed.
    inspector: str | None = None
    # The standard Inception weights (dgan.metrics.features): gives fid and kid. None: the file
    # named by $DGAN_INCEPTION_WEIGHTS, if any.
    inception_weights: Path | None = None
    batch_size: int = Field(64, ge=1)
    seed: int = 0  # which normals, labels, boxes and noise the evaluation uses
    # The realism test (dgan.metrics.realism): a fresh classifier's held-out ROC-AUC telling G's
    # defacements from real defects and its restorations from real normals (0.5: indistinguishable).
    realism: bool = True
    realism_n: int = Field(600, ge=4)  # real training defects it uses, at most
    # Adam steps of the test's classifier (dgan.metrics.realism.STEPS), for up to 600 training
    # images; a larger test trains for proportionally more (scaled_steps). Fewer make a cheaper,
    # blunter test, e.g. for the many short evaluations of a `dgan tune` study.
    realism_steps: int = Field(300, ge=1)
    # Classifier seeds per realism test, averaged (each its own halves and initial weights): the
    # figures are their means, realism_auc_std and realism_auc_restored_std their spread. 1 is
    # one test; each repeat costs one more.
    realism_repeats: int = Field(1, ge=1, le=MAX_REALISM_REPEATS)
    # Defacements per real defect that eval.inspector judges, each repeat on other normals: the
    # label-set figures (set_accuracy_<set> and how a set is missed) count K times as many
    # images, for the rare sets. The realism test still takes one per real defect.
    control_repeats: int = Field(1, ge=1, le=MAX_CONTROL_REPEATS)


class GanConfig(Section):
    """Everything one `dgan train gan` run needs."""

    generator: GeneratorConfig = GeneratorConfig()
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    data: GanDataConfig = GanDataConfig()
    train: GanTrainConfig = GanTrainConfig()
    loss: GanLossConfig = GanLossConfig()
    log: LogConfig = LogConfig()
    eval: GanEvalConfig = GanEvalConfig()

    @model_validator(mode="after")
    def _check(self) -> GanConfig:
        if self.generator.sc and not self.generator.lwc:
            raise ValueError(
                "generator.sc=true needs generator.lwc=true: the spatial constraints act on the "
                "composition map m; set generator.sc=false or generator.lwc=true"
            )
        size = self.data.image_size
        if size % 4:
            raise ValueError(
                f"data.image_size={size} must be a multiple of 4: G downsamples by 4 (Sec. 3.1)"
            )
        if size & (size - 1):
            raise ValueError(
                f"data.image_size={size} must be a power of two (32, 64, 128, 256...): "
                "D halves it at every layer"
            )
        if self.discriminator.n_layers is not None and size >> self.discriminator.n_layers < 1:
            raise ValueError(
                f"discriminator.n_layers={self.discriminator.n_layers} halves "
                f"data.image_size={size} below 1 pixel; use at most {size.bit_length() - 1}"
            )
        depth = self.discriminator.n_layers or max(1, size.bit_length() - 2)  # as D derives it
        fine = self.discriminator.fine_src_layer
        if fine is not None and fine >= depth:
            raise ValueError(
                f"discriminator.fine_src_layer={fine} must be below D's depth ({depth} stride-2 "
                f"layers at {size} px) to read an earlier, finer map; use 1..{depth - 1} or null"
            )
        if self.discriminator.restored_output and not self.loss.lambda_cls_restored_d:
            raise ValueError(
                "discriminator.restored_output=true trains its logit with "
                "loss.lambda_cls_restored_d, which is 0; set it above 0 (1 in the demo runs "
                "measured) or discriminator.restored_output=false"
            )
        g = self.generator
        if self.loss.lambda_diversity and not (g.ani and g.lwc):
            raise ValueError(
                "loss.lambda_diversity compares the maps m of two draws of ANI's noise, which "
                "needs generator.ani=true and generator.lwc=true; turn them on or set "
                "loss.lambda_diversity=0"
            )
        if g.noise_gain != 1 and not g.ani:
            raise ValueError(
                f"generator.noise_gain={g.noise_gain} scales ANI's noise strengths, which needs "
                "generator.ani=true; turn it on or set generator.noise_gain=1"
            )
        if g.smooth_categories and not g.grain:
            raise ValueError(
                f"generator.smooth_categories={g.smooth_categories} turns grain off for those "
                "categories, but generator.grain is 0 (no grain); set generator.grain > 0 or "
                "generator.smooth_categories=[]"
            )
        if g.grain and not g.lwc:
            raise ValueError(
                f"generator.grain={g.grain} adds noise to the foreground f, which needs "
                "generator.lwc=true; turn it on or set generator.grain=0"
            )
        label_sets = g.label_sets
        if label_sets == "layered" and not g.lwc:
            raise ValueError(
                "generator.label_sets=layered paints one layer over another with Eq. 4, which "
                "needs generator.lwc=true; turn it on or set generator.label_sets=joint"
            )
        if g.layers and label_sets != "layered":
            raise ValueError(
                "generator.layers groups categories into layers for generator.label_sets=layered, "
                f"but label_sets is {label_sets}; set generator.label_sets=layered or "
                "generator.layers=[]"
            )
        if self.loss.rec_region != "image" and not g.lwc:
            raise ValueError(
                f"loss.rec_region={self.loss.rec_region} weights L_rec by G's map m, which "
                "needs generator.lwc=true; turn it on or set loss.rec_region=image"
            )
        if self.train.batch_size % 2:
            raise ValueError(
                f"train.batch_size={self.train.batch_size} must be even: half normals, half defects"
            )
        group, half = self.discriminator.minibatch_std, self.train.batch_size // 2
        if group and half % group:
            raise ValueError(
                f"discriminator.minibatch_std={group} must divide train.batch_size / 2 = {half}, "
                "so that no group mixes real images with fakes or defects with normals; "
                f"use a divisor of {half} (4 at the demo's batch of 16) or 0"
            )
        if self.train.lr_end > min(self.train.lr_g, self.train.lr_d):
            raise ValueError("train.lr_end must not exceed train.lr_g and train.lr_d")
        if self.log.promote_if_better == "auto":
            self.log.promote_if_better = gan_promotion_metric(self)
        if self.log.promote_if_better in ("realism_auc", "fid") and not self.log.eval_every:
            raise ValueError(
                f"log.promote_if_better={self.log.promote_if_better} is measured by the periodic "
                "evaluation, which log.eval_every=0 turns off; set log.eval_every"
            )
        return self


def gan_promotion_metric(config: GanConfig) -> str:
    """What `--promote-if-better auto` compares for Defect-GAN: standard FID when the Inception
    weights are given, else the realism test (neither needs anything the run lacks)."""
    import os

    weights = config.eval.inception_weights or os.environ.get("DGAN_INCEPTION_WEIGHTS")
    return "fid" if weights else "realism_auc"


# ---------------------------------------------------------------------------------------------
# Inspector, synthesis and tuning
# ---------------------------------------------------------------------------------------------


class InspectorModelConfig(Section):
    arch: Literal["resnet34", "densenet121", "small"] = "resnet34"  # Sec. 4.2, Table 3
    pretrained: Path | None = None  # local torchvision state dict; nothing is downloaded
    # Source classifier through a gradient reversal layer (Sec. 3.2, Fig. 3); it is built only
    # when synthetic sets are mixed in, since with one source there is nothing to tell apart.
    grl: bool = True
    grl_schedule: Literal["dann", "constant"] = "dann"  # DANN: 2/(1+exp(-10p))-1
    grl_alpha: float = Field(1.0, ge=0)  # maximum strength


class InspectorDataConfig(Section):
    root: Path | None = None  # None: the procedural demo set under data/demo (made when absent)
    # Synthesized sets in the folder format: defects and their restored normals (Sec. 4.2).
    synthetic: list[Path] = []
    # Synthetic images drawn per real training image in each epoch. Sec. 4.2 mixes 50,000
    # synthesized defects into CODEBRIM's few thousand; a ratio keeps epochs comparable.
    synthetic_ratio: float = Field(1.0, ge=0)
    image_size: int = Field(224, ge=16, le=1024)  # Sec. 4.2
    flip: bool = True  # random horizontal flip of training images
    # Keep real training defects at this fraction of real training normals (the scarce-defect
    # setting of Table 3 in miniature); None keeps them all. Val and test are never thinned.
    defect_fraction: float | None = Field(None, gt=0)
    subsample_seed: int = 0  # which defects defect_fraction keeps; fixed across training seeds
    num_workers: int = Field(2, ge=0, le=64)


class InspectorTrainConfig(Section):
    epochs: int = Field(30, ge=1)  # Sec. 4.2 trains "until convergence"; val picks the epoch
    batch_size: int = Field(16, ge=1)  # Sec. 4.2
    lr: float = Field(1e-3, gt=0)  # Sec. 4.2, SGD
    momentum: float = Field(0.9, ge=0, lt=1)  # CODEBRIM baseline
    weight_decay: float = Field(0.0, ge=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 0


class InspectorLogConfig(Section):
    # Its own section, so that overriding one log key keeps the inspector's experiment name.
    run_root: Path = Path("runs")
    experiment: str = "defect-inspector"
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    log_every: int = Field(100, ge=1)  # steps between training-loss logs; val runs every epoch
    keep_checkpoints: int = Field(3, ge=1)  # one checkpoint per epoch
    log_model: bool = True  # log the best epoch as an MLflow pyfunc model (about 5 s)
    # Register the logged inspector as a new version of this MLflow model; empty: do not.
    registered_model: str | None = "defect-inspector"
    # Move alias `champion` to the new version only when this metric improves on the champion's.
    promote_if_better: str | None = None
    promote_mode: Literal["min", "max"] | None = None  # None: from the metric's name

    _empty_is_off = field_validator("registered_model", "promote_if_better", mode="before")(
        lambda v: v or None
    )

    @model_validator(mode="after")
    def _check_registry(self) -> InspectorLogConfig:
        return check_registry_keys(self)


class InspectorConfig(Section):
    """Everything one `dgan train inspector` run needs."""

    model: InspectorModelConfig = InspectorModelConfig()
    data: InspectorDataConfig = InspectorDataConfig()
    train: InspectorTrainConfig = InspectorTrainConfig()
    log: InspectorLogConfig = InspectorLogConfig()

    @model_validator(mode="after")
    def _check(self) -> InspectorConfig:
        if self.log.promote_if_better == "auto":
            self.log.promote_if_better = "val_multi_target_accuracy"
        if self.model.arch == "small" and self.model.pretrained is not None:
            raise ValueError(
                "model.arch=small has no pretrained weights; drop model.pretrained, or use "
                "resnet34 or densenet121 with a local torchvision state dict"
            )
        return self


class SynthConfig(Section):
    """Everything one `dgan synth` run needs (Sec. 4.2: 50,000 defects plus restored normals).

    Image i of a set depends only on (seed, i) and the generator: not on batch_size, workers or
    the number of processes, which are therefore free to change when a run is resumed.
    """

    generator: str | None = None  # run dir, checkpoint, model dir or MLflow URI; None: latest run
    normals: Path | None = None  # None: the generator's training set (its train split's normals)
    normals_split: str = "train"  # which split's normals, for datasets with splits
    out: Path = Path("synth")
    n: int | None = Field(None, ge=1)  # Sec. 4.2: 50,000; None with per_class: per_class * C
    classes: list[str] | None = None  # every image gets exactly these categories
    per_class: int | None = Field(None, ge=1)  # balanced: per_class single-category images each
    region: Literal["full", "random-box", "boxes", "masks"] = "full"
    region_path: Path | None = None  # the boxes CSV or the masks directory
    restored: bool = True  # also write restore(defect) into normal/ (Sec. 4.2, Fig. 8)
    seed: int = 0
    batch_size: int = Field(64, ge=1)
    num_workers: int = Field(2, ge=0)  # loader processes reading normals
    writers: int = Field(2, ge=1)  # threads encoding and writing PNGs
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on a GPU, fp32 on a CPU
    run_root: Path = Path("runs")  # where "the latest run" is looked up
    tracking_uri: str | None = None  # for MLflow model URIs


class TuneConfig(Section):
    """Everything one `dgan tune` study needs (dgan.tune): the search, its scheduler, resources,
    and the Defect-GAN config every trial starts from.

    That base is the GAN presets `base` (e.g. demo) with the GAN keys `gan` on top, nested as in
    a GAN preset. Each trial trains its schedule (`gan.train.iterations`) and reports to Ray Tune
    at each of its periodic evaluations (`gan.log.eval_every`).
    """

    base: list[str] = ["demo"]  # GAN presets or YAML files the trials start from
    gan: dict[str, Any] = {}  # GAN keys on top of `base`, nested: {train: {iterations: 800}}
    trials: int = Field(32, ge=1)  # configurations tried (the initial population under PBT)
    # losses: the five weights of Eq. 11-12; optim: the two learning rates of Sec. 4.1; all: both;
    # or a YAML file naming config keys with distributions (dgan.tune.space).
    space: str = "all"
    # A metric of dgan.metrics.registry. None: fid with Inception weights, else fid_inspector
    # with gan.eval.inspector, else realism_auc (dgan.tune.study.default_objective).
    objective: str | None = None
    mode: Literal["min", "max"] | None = None  # None: the objective's registered direction
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    # Optuna's TPE or random sampling; None: tpe, but random under PBT (Ray runs PBT without a
    # search algorithm: its population is sampled at random).
    search: Literal["tpe", "random"] | None = None
    seed: int = 0  # of the search (the trials' own seed is gan.train.seed, shared by all)
    # Trial 0 trains the base config's own values, so the table says whether the search beat it.
    include_default: bool = True
    # ASHA (Li et al. 2020): no trial is stopped before this many iterations; at each rung only
    # the best 1/reduction_factor go on.
    grace_iterations: int = Field(100, ge=1)
    reduction_factor: float = Field(4.0, gt=1)  # ASHA's eta; 4 as in Ray and the ASHA paper
    # PBT (Jaderberg et al. 2017): every pbt_interval iterations, a trial in the bottom
    # pbt_quantile copies the checkpoint of one in the top and perturbs its schedulable keys
    # (x0.8 or x1.2, or a fresh sample with probability pbt_resample), within the space's range.
    pbt_interval: int = Field(200, ge=1)
    pbt_quantile: float = Field(0.25, gt=0, le=0.5)
    pbt_resample: float = Field(0.25, ge=0, le=1)
    pbt_synch: bool = False  # wait for the whole population at each interval
    max_concurrent: int | None = Field(None, ge=1)  # None: as many as the resources allow
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)  # fractional: 0.25 packs four trials on one GPU
    root: Path = Path("runs/tune")  # each study's directory is root/NAME
    # Where Ray keeps trial checkpoints and the experiment state: None is the study directory;
    # on a cluster it must be shared storage (an NFS mount, s3://...) that every node reaches.
    storage: str | None = None
    address: str | None = None  # an existing Ray cluster; None: $RAY_ADDRESS, else a local Ray
    register_best: bool = False  # register the best trial's generator (gan.log.registered_model)
    promote_if_better: bool = False  # and move its @champion only when the objective improves

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise ValueError(
                f"gpus_per_trial={self.gpus_per_trial}: above 1 it must be a whole number (Ray "
                "packs fractions of one GPU only)"
            )
        if self.promote_if_better and not self.register_best:
            raise ValueError(
                "promote_if_better needs register_best: only a registered version moves"
            )
        self.gan_config()  # the base GAN config is valid before anything starts
        return self

    def gan_config(self) -> GanConfig:
        """The trials' base Defect-GAN config: the presets `base`, then the keys `gan`."""
        return build_gan_config(self.base, self.gan)


def build_gan_config(presets: list[str], keys: dict[str, Any]) -> GanConfig:
    """A GanConfig from GAN presets (or YAML files) and nested keys on top; DganError naming each
    bad key as `gan.<section>.<key>`."""
    data: dict[str, Any] = {}
    for name in presets:
        data = _merge(data, _read_yaml(preset_path("gan", name)))
    data = _merge(data, keys)
    try:
        return GanConfig.model_validate(data)
    except ValidationError as err:
        text = format_validation_error(GanConfig, err).replace("\n  ", "\n  gan.")
        raise DganError(text, exit_code=2) from None


JOB_CONFIGS: dict[str, type[Section]] = {
    "gan": GanConfig,
    "inspector": InspectorConfig,
    "synth": SynthConfig,
    "tune": TuneConfig,
}
C = TypeVar("C", bound=Section)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def preset_path(job: str, name: str) -> Path:
    """Resolve a preset name (`demo`, `table2/stargan`) or a YAML path for `job`."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    packaged = PRESET_DIR / job / f"{name.removesuffix('.yaml')}.yaml"
    if packaged.is_file():
        return packaged
    known = sorted(
        p.relative_to(PRESET_DIR / job).with_suffix("").as_posix()
        for p in (PRESET_DIR / job).rglob("*.yaml")
    )
    raise DganError(
        f"config {name!r} is neither a YAML file nor a preset of '{job}'. "
        f"Presets: {', '.join(known)}.",
        exit_code=2,
    )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise DganError(f"{path} is not valid YAML: {err}", exit_code=2) from None
    if not isinstance(data, dict):
        raise DganError(f"{path} must hold a mapping of sections, not {type(data).__name__}.", 2)
    return data


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(assignment: str) -> dict[str, Any]:
    """Turn `section.key=value` into a nested dict; the value is parsed as YAML (1e-4, [a])."""
    if "=" not in assignment:
        raise DganError(
            f"--set {assignment!r}: expected section.key=value, e.g. --set train.batch_size=8",
            exit_code=2,
        )
    dotted, raw = assignment.split("=", 1)
    keys = [k for k in dotted.strip().split(".") if k]
    if not keys:
        raise DganError(f"--set {assignment!r}: the key is empty", exit_code=2)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    nested: dict[str, Any] = {keys[-1]: value}
    for key in reversed(keys[:-1]):
        nested = {key: nested}
    return nested


def _allowed_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names valid at `loc` (without its last element) in `model`."""
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        current = field.annotation
    return sorted(getattr(current, "model_fields", {}))


def format_validation_error(model: type[BaseModel], err: ValidationError) -> str:
    """One line per problem, naming the dotted key and what is allowed."""
    lines = ["invalid configuration:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc)
            lines.append(f"  {key}: unknown key; allowed here: {', '.join(allowed)}")
        elif e["type"] == "literal_error":
            lines.append(f"  {key}: {e['msg']} (got {e['input']!r})")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = f" (got {e['input']!r})" if loc and not isinstance(e["input"], dict) else ""
            lines.append(f"  {key}: {msg}{got}")
    return "\n".join(lines)


def load_config(
    job: str, configs: list[str] | None = None, overrides: list[str] | None = None
) -> Any:
    """Build the config for `job` from defaults, presets or YAML files in order, then --set pairs.

    Raises DganError (exit code 2) naming each bad key and what it allows.
    """
    model = JOB_CONFIGS[job]
    data: dict[str, Any] = {}
    for name in configs or []:
        data = _merge(data, _read_yaml(preset_path(job, name)))
    for assignment in overrides or []:
        data = _merge(data, parse_override(assignment))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise DganError(format_validation_error(model, err), exit_code=2) from None


def to_yaml(config: BaseModel) -> str:
    """The resolved config as YAML, as written into each run directory."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(config: BaseModel) -> dict[str, Any]:
    """`section.key -> value` pairs, as logged to MLflow params."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = value

    walk("", config.model_dump(mode="json"))
    return out


def config_hash(config: BaseModel, exclude: tuple[str, ...] = ()) -> str:
    """A short content hash of the config, for checkpoint compatibility and registry tags."""
    data = {k: v for k, v in flatten(config).items() if not k.startswith(exclude)}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
