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


def logistic_loss_d(real_src: Tensor, fake_src: Tensor) -> Tensor:
    """-L_adv for D, Eq. 5 as the paper writes it: -log D_src(d_real) - log(1 - D_src(d)), with
    D_src = sigmoid of the logits, averaged over patches and the batch."""
    return F.softplus(-real_src).mean() + F.softplus(fake_src).mean()


def logistic_loss_g(fake_src: Tensor) -> Tensor:
    """L_adv for G, Eq. 5 in its non-saturating form (Goodfellow et al. 2014): -log D_src(d)."""
    return F.softplus(-fake_src).mean()


def r1_penalty(grad: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): ||dD_src/dx||^2 on real images, halved, batch mean. It keeps
    Eq. 5's D from growing steep around the real data, the role WGAN-GP's penalty plays."""
    return 0.5 * grad.flatten(1).pow(2).sum(1).mean()


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


def fake_classification_loss_d(fake_cls_logits: Tensor) -> Tensor:
    """Beyond the paper: D_cls learns that G's defacements show no real defect, i.e. the
    classification loss of Eq. 6 on defaced fakes d' with every category off. Eq. 6 trains D_cls
    on real images only, so a tinted blob that no real image resembles can still score as a
    crack; with this term, G's Eq. 7 can only raise a category's score by looking like its real
    examples. Restored fakes n' stay out: "no defect" is what Eq. 7 asks of them too, so the
    term would only teach D_cls to accept restoration artifacts as normal."""
    return classification_loss(fake_cls_logits, torch.zeros_like(fake_cls_logits))


def reconstruction_loss(x: Tensor, x_reconstructed: Tensor) -> Tensor:
    """L_rec, Eq. 8: mean L1 between an input and its cycle reconstruction (n vs n^, d vs d^)."""
    return (x - x_reconstructed).abs().mean()


def masked_reconstruction_loss(x: Tensor, x_reconstructed: Tensor, weight: Tensor) -> Tensor:
    """Beyond the paper: Eq. 8's L1 where `weight` (B, 1, H, W) is 1, i.e. outside what the first
    pass painted over (weight = 1 - m, detached), averaged over all pixels as Eq. 8 is."""
    return ((x - x_reconstructed).abs() * weight).mean()


def sd_cycle_loss(defect_mask: Tensor, repaint_mask: Tensor) -> Tensor:
    """L_sd-cyc, Eq. 9: the repaint map of restoration should equal the defect map it undoes."""
    return (defect_mask - repaint_mask).abs().mean()


def sd_region_loss(defect_mask: Tensor, repaint_mask: Tensor) -> Tensor:
    """L_sd-con, Eq. 10: L1 of both maps towards 0, so neither layer takes over the image."""
    return defect_mask.abs().mean() + repaint_mask.abs().mean()


def mask_binary_loss(*masks: Tensor) -> Tensor:
    """Beyond the paper: m (1 - m), averaged over pixels and summed over the maps given; zero only
    where m is 0 or 1. Eq. 10 pulls m towards 0, so inside a defect m settles between 0 and 1 and
    the output keeps (1 - m) of the input there: a restoration must then paint the complement of
    the defect's colour to cancel it (a cyan blob where rust was), and a defacement must paint
    colours beyond the defect's to reach it through the blend."""
    return sum((m * (1 - m)).mean() for m in masks)


def outside_region_loss(defect_mask: Tensor, region: Tensor) -> Tensor:
    """Beyond the paper: the defect map m where A asked for "normal" (the spatial counterpart of
    Eq. 10). Zero when the region is the whole image, as in the paper's training."""
    return (defect_mask * (1 - region)).mean()


def interpolate(real: Tensor, fake: Tensor, alpha: Tensor) -> Tensor:
    """Random points between real and fake samples, where WGAN-GP evaluates the penalty."""
    a = alpha.view(-1, 1, 1, 1).to(real.dtype)
    return torch.lerp(fake, real, a)
