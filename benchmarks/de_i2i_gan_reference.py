"""The de-i2i-gan Defect-GAN training step (jason2714/de-i2i-gan), as a second timing bar.

Written here from that code's structure so that the bar is timed in the same process, on the
same machine state, as dgan's step. It follows, at the repository's default options for the
"spade" generator:

- models/networks/generator.py `DefectGanGenerator`, models/networks/architecture.py
  (`ConvBlock`, `ResBlock`, `NormResBlock`, `NormConvBlock`, `DeConvBlock`, `NoiseInjection`) and
  models/networks/normalization.py `SPADE`, at commit 04f5a236bfdc9fafdf7228f9a3b49843a340e902;
- models/networks/discriminator.py `DefectGanDiscriminator` at commit
  acdd21174514e0b4ad989d41f71f49bcf2ed40cb;
- models/defectgan_model.py `_compute_discriminator_loss` / `_compute_generator_loss` (and the
  train/eval switching in `__call__`) and options/defectgan_options.py at commit 04f5a236;
- trainers/defectgan_trainer.py `_train_epoch`, `_train_discriminator_once`,
  `_train_generator_once` at commit 8631b28cefcc0c4e368b285e39712f320e42f888, with the optimizers
  of trainers/base_trainer.py (commit a4a716a5274f791a55a524a30043e6f3381c99db) and the init of
  models/networks/base_network.py (N(0, 0.02) conv weights, zero biases).

Architecture (ngf = ndf = `width`, label_nc = `classes` + 1, channel 0 being "background"):

- G: 7x7 conv (BatchNorm, LeakyReLU 0.2); two 4x4 stride-2 convs (BatchNorm, LeakyReLU); three
  plain residual blocks (3x3 conv, BatchNorm, LeakyReLU, 3x3 conv, BatchNorm, identity skip); three
  SPADE residual blocks (SPADE hidden 128, InstanceNorm, ReLU, noise after each conv; their
  shortcut SPADE and conv are built, as the reference builds them, but unused at equal width and
  scale); two up blocks (nearest x2, SPADE, ReLU, 3x3 conv, noise); a 3x3 tanh foreground head and
  a 3x3 sigmoid mask head; output = x * (1 - m) + foreground * m. All non-SPADE convs are
  bias-free with reflect padding; SPADE convs have biases and zero padding. Noise is
  `weight * N(0, 1)` of shape (B, 1, H, W), `weight` one scalar initialised to 0. The control map
  is the (B, label_nc, 1, 1) label vector, which SPADE resizes to each feature map.
- D: 4x4 stride-2 conv to `width`, then `n_layers` 4x4 stride-2 convs doubling the width, all
  bias-free, reflect-padded, LeakyReLU 0.2, no norm; a 3x3 source head and a classification head
  whose kernel covers the last map.
- D step (every iteration): G in eval mode, D in train mode; under no_grad G(normal, A_defect)
  and G(defect, A_normal); four D forwards (fake defect, fake normal, real defect, real normal),
  each on a whole batch; BCE GAN loss (4 terms, averaged), BCE classification on the two reals
  (averaged), loss = gan + 2 * clf; D's zero_grad, one backward, one Adam step.
- G step (every `n_critic` = 5th iteration, after that iteration's D step): G in train mode, D in
  eval mode; four G forwards with graph (normal -> defect -> normal, defect -> normal -> defect);
  two D forwards on the fakes; BCE GAN and classification losses, L1 reconstruction, L1
  mask-cycle (sd_cyc) and L1 mask-sparsity (sd_con) losses; loss weights (2, 5, 5, 5, 1) of the
  options' `loss_weight`; G's zero_grad, one backward (which also fills D's gradients, as the
  reference does), one Adam step on G.

Adam: lr 2e-4, betas (0.5, 0.999), one optimizer per network.

Deviations: the batch is synthetic, fixed and in memory (data loading, augmentation, logging,
checkpointing and the per-epoch LR scheduler are not timed); the defect and the normal batch each
hold `batch` images, as the reference's two loaders do. Noise injection is on: it is the
reference's `--add_noise`, off in options/defectgan_options.py but passed by the example command
at the end of train_defectgan.py (commit 872972fe97bb0e2aed52399ef4a48de985298099; the README
gives no training command). Spectral norm is off (the option default; that example command also
passes `--use_spectral`); `spectral=True` applies it where `--use_spectral` does (every conv but
the SPADE convs and the G and D heads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import spectral_norm

SPADE_HIDDEN = 128
LOSS_WEIGHTS = {"clf_d": 2.0, "clf_g": 5.0, "rec": 5.0, "sd_cyc": 5.0, "sd_con": 1.0}


def _conv(
    c_in: int,
    c_out: int,
    kernel: int,
    stride: int = 1,
    padding: int | str = "same",
    sn: bool = False,
) -> nn.Module:
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, padding_mode="reflect", bias=False)
    return spectral_norm(conv) if sn else conv


def control_map(c: Tensor) -> Tensor:
    """(B, classes) defect labels -> (B, classes + 1, 1, 1) map; all-zero labels give the one-hot
    "background" map A that the reference uses as the restoration target."""
    background = (c.sum(1, keepdim=True) == 0).to(c.dtype)
    return torch.cat([background, c], dim=1)[:, :, None, None]


class _Noise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        return x + self.weight * x.new_empty(b, 1, h, w).normal_()


def _noise(on: bool) -> nn.Module:
    return _Noise() if on else nn.Identity()


class _Spade(nn.Module):
    def __init__(self, label_nc: int, channels: int, hidden: int = SPADE_HIDDEN) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.shared = nn.Sequential(
            nn.Conv2d(label_nc, hidden, 3, padding=1), nn.ReLU(inplace=True)
        )
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: Tensor, seg: Tensor) -> Tensor:
        actv = self.shared(F.interpolate(seg, size=x.shape[2:], mode="nearest"))
        return self.norm(x) * (1 + self.gamma(actv)) + self.beta(actv)


class _Residual(nn.Module):
    def __init__(self, dim: int, sn: bool) -> None:
        super().__init__()
        self.main = nn.Sequential(
            _conv(dim, dim, 3, sn=sn),
            nn.BatchNorm2d(dim),
            nn.LeakyReLU(0.2, inplace=True),
            _conv(dim, dim, 3, sn=sn),
            nn.BatchNorm2d(dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x) + x


class _SpadeResidual(nn.Module):
    def __init__(self, label_nc: int, dim: int, noise: bool, sn: bool) -> None:
        super().__init__()
        self.norm_0, self.norm_1 = _Spade(label_nc, dim), _Spade(label_nc, dim)
        self.conv_0, self.conv_1 = _conv(dim, dim, 3, sn=sn), _conv(dim, dim, 3, sn=sn)
        # The shortcut branch exists (and counts in the parameters) but is only used when the
        # block changes scale, which it never does here: the skip is the identity.
        self.norm_s, self.conv_s = _Spade(label_nc, dim), _conv(dim, dim, 3, sn=sn)
        self.noise_0, self.noise_1 = _noise(noise), _noise(noise)

    def forward(self, x: Tensor, seg: Tensor) -> Tensor:
        h = self.noise_0(self.conv_0(F.relu(self.norm_0(x, seg), inplace=True)))
        h = self.noise_1(self.conv_1(F.relu(self.norm_1(h, seg), inplace=True)))
        return h + x


class _SpadeUp(nn.Module):
    def __init__(self, label_nc: int, c_in: int, c_out: int, noise: bool, sn: bool) -> None:
        super().__init__()
        self.norm = _Spade(label_nc, c_in)
        self.conv = _conv(c_in, c_out, 3, sn=sn)
        self.noise = _noise(noise)

    def forward(self, x: Tensor, seg: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.noise(self.conv(F.relu(self.norm(x, seg), inplace=True)))


class DeI2iGenerator(nn.Module):
    """`forward(x, c)` takes (B, classes) defect labels (all zero: restore to normal) and returns
    (image, mask), as the reference's G does."""

    def __init__(
        self,
        ngf: int = 64,
        classes: int = 5,
        num_scales: int = 2,
        num_res: int = 6,
        noise: bool = True,
        spectral: bool = False,
    ) -> None:
        super().__init__()
        label_nc = classes + 1
        stem: list[nn.Module] = [
            _conv(3, ngf, 7, sn=spectral),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        dim = ngf
        for _ in range(num_scales):
            stem += [
                _conv(dim, dim * 2, 4, 2, 1, sn=spectral),
                nn.BatchNorm2d(dim * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            dim *= 2
        stem += [_Residual(dim, spectral) for _ in range(num_res // 2)]
        self.encoder = nn.Sequential(*stem)
        self.spade_res = nn.ModuleList(
            _SpadeResidual(label_nc, dim, noise, spectral) for _ in range(num_res - num_res // 2)
        )
        ups = []
        for _ in range(num_scales):
            ups.append(_SpadeUp(label_nc, dim, dim // 2, noise, spectral))
            dim //= 2
        self.ups = nn.ModuleList(ups)
        self.foreground_head = _conv(dim, 3, 3)
        self.mask_head = _conv(dim, 1, 3)

    def forward(self, x: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
        seg = control_map(c)
        feat = self.encoder(x)
        for block in self.spade_res:
            feat = block(feat, seg)
        for block in self.ups:
            feat = block(feat, seg)
        if feat.isnan().any():
            feat = feat.nan_to_num()
        foreground = torch.tanh(self.foreground_head(feat))
        mask = torch.sigmoid(self.mask_head(feat))
        return x * (1 - mask) + foreground * mask, mask


class DeI2iDiscriminator(nn.Module):
    def __init__(
        self,
        image_size: int,
        ndf: int = 64,
        label_nc: int = 6,
        n_layers: int = 5,
        spectral: bool = False,
    ) -> None:
        super().__init__()
        last = image_size >> (n_layers + 1)
        if last < 2:
            raise ValueError(
                f"de-i2i-gan's D needs image_size >= {2 ** (n_layers + 2)} for n_layers={n_layers} "
                f"(its 3x3 reflect-padded head needs a map of at least 2x2)"
            )
        layers: list[nn.Module] = [
            _conv(3, ndf, 4, 2, 1, sn=spectral),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        dim = ndf
        for _ in range(n_layers):
            layers += [_conv(dim, dim * 2, 4, 2, 1, sn=spectral), nn.LeakyReLU(0.2, inplace=True)]
            dim *= 2
        self.main = nn.Sequential(*layers)
        self.src = _conv(dim, 1, 3)
        self.cls = nn.Conv2d(dim, label_nc, last, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.main(x)
        return self.src(h), self.cls(h).flatten(1)


def _init_weights(net: nn.Module, std: float = 0.02) -> None:
    """base_network.init_weights('normal', 0.02): convs N(0, std), BatchNorm N(1, std), biases 0."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            weight = m.weight_orig if hasattr(m, "weight_orig") else m.weight
            nn.init.normal_(weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _bce(logits: Tensor, target: float | Tensor) -> Tensor:
    if isinstance(target, float):
        target = torch.full_like(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


class DeI2iGanStep:
    """de-i2i-gan's iterations on a fixed in-memory batch: `d()` is a D-only iteration, `g()` the
    iteration that also updates G (its D step, then its G step)."""

    def __init__(
        self,
        size: int,
        batch: int,
        width: int,
        n_layers: int = 5,
        classes: int = 5,
        noise: bool = True,
        spectral: bool = False,
    ) -> None:
        torch.manual_seed(0)
        self.G = DeI2iGenerator(width, classes, noise=noise, spectral=spectral)
        self.D = DeI2iDiscriminator(size, width, classes + 1, n_layers, spectral)
        _init_weights(self.G)
        _init_weights(self.D)
        self.g_opt = torch.optim.Adam(self.G.parameters(), 2e-4, betas=(0.5, 0.999))
        self.d_opt = torch.optim.Adam(self.D.parameters(), 2e-4, betas=(0.5, 0.999))
        self.normal = torch.rand(batch, 3, size, size) * 2 - 1
        self.defect = torch.rand(batch, 3, size, size) * 2 - 1
        c = (torch.rand(batch, classes) > 0.5).float()
        c[c.sum(1) == 0, 0] = 1  # every defect image carries at least one defect
        self.c_defect = c
        self.c_normal = torch.zeros(batch, classes)
        # D's classification targets over label_nc = classes + 1 (channel 0: background).
        self.y_defect = control_map(self.c_defect).flatten(1)
        self.y_normal = control_map(self.c_normal).flatten(1)
        self.losses: dict[str, float] = {}

    def d(self) -> None:
        self.D.train()
        self.G.eval()
        self.d_opt.zero_grad()
        with torch.no_grad():
            fake_defect, _ = self.G(self.normal, self.c_defect)
            fake_normal, _ = self.G(self.defect, self.c_normal)
        src_fd, _ = self.D(fake_defect)
        src_fn, _ = self.D(fake_normal)
        src_rd, cls_rd = self.D(self.defect)
        src_rn, cls_rn = self.D(self.normal)
        gan = torch.stack(
            [_bce(src_fd, 0.0), _bce(src_fn, 0.0), _bce(src_rd, 1.0), _bce(src_rn, 1.0)]
        ).mean()
        clf = torch.stack([_bce(cls_rd, self.y_defect), _bce(cls_rn, self.y_normal)]).mean()
        (gan + LOSS_WEIGHTS["clf_d"] * clf).backward()
        self.d_opt.step()
        self.losses.update(gan_D=gan.item(), clf_D=clf.item())

    def g(self) -> None:
        self.d()
        self.g_step()

    def g_step(self) -> None:
        self.D.eval()
        self.G.train()
        self.g_opt.zero_grad()
        # normal -> defect -> normal
        fake_defect, m_defect = self.G(self.normal, self.c_defect)
        rec_normal, m_rec_defect = self.G(fake_defect, self.c_normal)
        # defect -> normal -> defect
        fake_normal, m_normal = self.G(self.defect, self.c_normal)
        rec_defect, m_rec_normal = self.G(fake_normal, self.c_defect)
        src_fd, cls_fd = self.D(fake_defect)
        src_fn, cls_fn = self.D(fake_normal)
        gan = torch.stack([_bce(src_fd, 1.0), _bce(src_fn, 1.0)]).mean()
        clf = torch.stack([_bce(cls_fd, self.y_defect), _bce(cls_fn, self.y_normal)]).mean()
        rec = torch.stack(
            [F.l1_loss(rec_defect, self.defect), F.l1_loss(rec_normal, self.normal)]
        ).mean()
        sd_cyc = torch.stack(
            [F.l1_loss(m_defect, m_rec_defect), F.l1_loss(m_normal, m_rec_normal)]
        ).mean()
        zeros = torch.zeros_like(m_defect)
        sd_con = torch.stack(
            [F.l1_loss(m, zeros) for m in (m_defect, m_normal, m_rec_defect, m_rec_normal)]
        ).mean()
        w = LOSS_WEIGHTS
        loss = gan + w["clf_g"] * clf + w["rec"] * rec + w["sd_cyc"] * sd_cyc + w["sd_con"] * sd_con
        loss.backward()
        self.g_opt.step()
        self.losses.update(
            gan_G=gan.item(),
            clf_G=clf.item(),
            rec=rec.item(),
            sd_cyc=sd_cyc.item(),
            sd_con=sd_con.item(),
        )
