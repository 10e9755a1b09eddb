"""Defect-GAN's loss terms (Sec. 3.1 and 4.1), one function per term, each citing its equation.

The trainer composes them into Eq. 11 (D) and Eq. 12 (G). Eq. 5 is replaced by WGAN-GP, as
Sec. 4.1 says the implementation does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def adversarial_loss_d(real_src: Tensor, fake_src: Tensor) -> Tensor:
    """-L_adv for D (Eq. 5 as WGAN, Sec. 4.1): push D_src up on real, down on fake."""
    return fake_src.mean() - real_src.mean()


def adversarial_loss_g(fake_src: Tensor) -> Tensor:
    """L_adv for G (Eq. 5 as WGAN, Sec. 4.1): make D_src score the fakes as real."""
    return -fake_src.mean()


def gradient_penalty(grad: Tensor) -> Tensor:
    """WGAN-GP's penalty (Sec. 4.1, Gulrajani et al.): (||dD_src/dx_hat||_2 - 1)^2, batch mean.

    `grad` is the gradient of D_src at the interpolates; the trainer takes it with
    create_graph=True so the penalty itself can be backpropagated.
    """
    norm = grad.flatten(1).norm(2, dim=1)
    return ((norm - 1) ** 2).mean()


def classification_loss(cls_logits: Tensor, labels: Tensor) -> Tensor:
    """L_cls^r (Eq. 6) on real samples and L_cls^f (Eq. 7) on generated ones.

    Categories are not exclusive, so -log D_cls(c|x) is a per-category binary cross-entropy,
    summed over categories and averaged over the batch (StarGAN's multi-label form).
    """
    bce = F.binary_cross_entropy_with_logits(cls_logits, labels, reduction="sum")
    return bce / cls_logits.shape[0]


def weakest_category_loss(cls_logits: Tensor, labels: Tensor) -> Tensor:
    """Beyond the paper: Eq. 7 on each defacement's least convincing asked category, -log
    D_cls(c|x) for the asked c where it is largest, averaged over the defacements that ask for
    any. Eq. 7 sums over the categories, so G can leave one of two asked categories faint and
    still lower it by drawing the other one better; this term is paid on the faint one alone."""
    asked = labels > 0.5
    per_category = F.softplus(-cls_logits).masked_fill(~asked, float("-inf"))
    worst = per_category.max(dim=1).values
    rows = asked.any(dim=1)
    return torch.where(rows, worst, torch.zeros_like(worst)).sum() / rows.sum().clamp_min(1)


def fake_classification_loss_d(fake_cls_logits: Tensor) -> Tensor:
    """Beyond the paper: D_cls learns that G's defacements show no real defect, i.e. the
    classification loss of Eq. 6 on defaced fakes d' with every category off. Eq. 6 trains D_cls
    on real images only, so a tinted blob that no real image resembles can still score as a
    crack; with this term, G's Eq. 7 can only raise a category's score by looking like its real
    examples. Restored fakes n' stay out: "no defect" is what Eq. 7 asks of them too, so the
    term would only teach D_cls to accept restoration artifacts as normal."""
    return classification_loss(fake_cls_logits, torch.zeros_like(fake_cls_logits))


def restored_classification_loss_d(restored_cls_logits: Tensor, source_labels: Tensor) -> Tensor:
    """Beyond the paper: D_cls learns that G's restorations n' still show the defect they were
    made from, i.e. the classification loss of Eq. 6 on n' against the real defect's labels.
    Eq. 6 labels only real normals "no defect", so a restoration that paints a colour no real
    defect has passes D_cls as normal; with this term, G's Eq. 7 ("no defect" for n') can only
    be met by restorations that D_cls cannot tell from real normals."""
    return classification_loss(restored_cls_logits, source_labels)


def restored_output_loss_d(normal_logits: Tensor, restored_logits: Tensor) -> Tensor:
    """Beyond the paper: D_cls's extra "restoration" logit learns to tell G's restorations n'
    (1) from real normals (0), Eq. 6's binary cross-entropy, averaged over both sets. G's Eq. 7
    asks that logit to be 0 for n', so a restoration must pass as a real normal without bending
    the category logits that defacements are judged by."""
    real = F.binary_cross_entropy_with_logits(normal_logits, torch.zeros_like(normal_logits))
    fake = F.binary_cross_entropy_with_logits(restored_logits, torch.ones_like(restored_logits))
    return (real + fake) / 2


def reconstruction_loss(x: Tensor, x_reconstructed: Tensor, weight: Tensor | None = None) -> Tensor:
    """L_rec, Eq. 8: mean L1 between an input and its cycle reconstruction (n vs n^, d vs d^).

    Beyond the paper, `weight` (B, 1, H, W) scales each pixel's error before the mean (the trainer
    passes 1 - m of the first pass, detached, with loss.rec_region=outside_mask)."""
    error = (x - x_reconstructed).abs()
    return (error if weight is None else error * weight).mean()


def sd_cycle_loss(defect_mask: Tensor, repaint_mask: Tensor) -> Tensor:
    """L_sd-cyc, Eq. 9: the repaint map of restoration should equal the defect map it undoes."""
    return (defect_mask - repaint_mask).abs().mean()


def sd_region_loss(defect_mask: Tensor, repaint_mask: Tensor) -> Tensor:
    """L_sd-con, Eq. 10: L1 of both maps towards 0, so neither layer takes over the image."""
    return defect_mask.abs().mean() + repaint_mask.abs().mean()


def outside_region_loss(defect_mask: Tensor, region: Tensor) -> Tensor:
    """Beyond the paper: the defect map m where A asked for "normal" (the spatial counterpart of
    Eq. 10). Zero when the region is the whole image, as in the paper's training."""
    return (defect_mask * (1 - region)).mean()


def binary_mask_loss(defect_mask: Tensor) -> Tensor:
    """Beyond the paper: mean m(1 - m), zero where m is 0 or 1 and largest at 0.5. Eq. 2 and 4
    then compose each pixel from one layer, the surface or the foreground, not from a blend."""
    return (defect_mask * (1 - defect_mask)).mean()


def diversity_loss(defect_mask: Tensor, redrawn_mask: Tensor, cap: float) -> Tensor:
    """Beyond the paper: the diversity-sensitive term of Yang et al. (ICLR 2019), -min(|m1 - m2|,
    tau), on two maps that G paints for the same input and A with two draws of ANI's noise. Each
    image's mean |m1 - m2| counts up to the cap tau, so the term asks for a new defect shape per
    draw without rewarding noise for its own sake. Every noise map is N(0, 1), so the distance
    between the draws, which Yang et al.'s ratio divides by, is the same for each image and left
    out."""
    distance = (defect_mask - redrawn_mask).abs().flatten(1).mean(dim=1)
    return -distance.clamp(max=cap).mean()


def interpolate(real: Tensor, fake: Tensor, alpha: Tensor) -> Tensor:
    """Random points between real and fake samples, where WGAN-GP evaluates the penalty."""
    a = alpha.view(-1, 1, 1, 1).to(real.dtype)
    return torch.lerp(fake, real, a)
