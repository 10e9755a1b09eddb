"""The official StarGAN training step (yunjey/stargan, model.py and solver.py), as the timing bar.

Written here from that code's structure so that the bar is timed in the same process, on the
same machine state, as dgan's step. Architecture and step follow it unchanged:

- G: 7x7 conv to conv_dim, two 4x4 stride-2 convs, `repeat_num` residual blocks, two 4x4
  transposed convs, 7x7 conv and tanh; InstanceNorm(affine, track_running_stats) throughout; the
  label is concatenated to the image.
- D: `n_layers` 4x4 stride-2 convs with LeakyReLU 0.01, a 3x3 PatchGAN head and a
  classification head whose kernel covers the last map.
- D step: D(real), G(real, c_trg) with its autograd graph, D(fake.detach()), then D(x_hat) for
  the gradient penalty; one backward of the sum, one Adam step.
- G step: G(real, c_trg), D(fake), G(fake, c_org); one backward (which also fills D's
  gradients, as the official code does), one Adam step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _norm(channels: int) -> nn.InstanceNorm2d:
    return nn.InstanceNorm2d(channels, affine=True, track_running_stats=True)


class _Residual(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False),
            _norm(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, 1, 1, bias=False),
            _norm(dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.main(x)


class ReferenceGenerator(nn.Module):
    def __init__(self, conv_dim: int = 64, c_dim: int = 5, repeat_num: int = 6) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(3 + c_dim, conv_dim, 7, 1, 3, bias=False),
            _norm(conv_dim),
            nn.ReLU(inplace=True),
        ]
        dim = conv_dim
        for _ in range(2):
            layers += [nn.Conv2d(dim, dim * 2, 4, 2, 1, bias=False), _norm(dim * 2)]
            layers.append(nn.ReLU(inplace=True))
            dim *= 2
        layers += [_Residual(dim) for _ in range(repeat_num)]
        for _ in range(2):
            layers += [nn.ConvTranspose2d(dim, dim // 2, 4, 2, 1, bias=False), _norm(dim // 2)]
            layers.append(nn.ReLU(inplace=True))
            dim //= 2
        layers += [nn.Conv2d(dim, 3, 7, 1, 3, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        c = c[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
        return self.main(torch.cat([x, c], dim=1))


class ReferenceDiscriminator(nn.Module):
    def __init__(self, image_size: int, conv_dim: int = 64, c_dim: int = 5, n_layers: int = 6):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, conv_dim, 4, 2, 1), nn.LeakyReLU(0.01)]
        dim = conv_dim
        for _ in range(1, n_layers):
            layers += [nn.Conv2d(dim, dim * 2, 4, 2, 1), nn.LeakyReLU(0.01)]
            dim *= 2
        self.main = nn.Sequential(*layers)
        self.conv1 = nn.Conv2d(dim, 1, 3, 1, 1, bias=False)
        self.conv2 = nn.Conv2d(dim, c_dim, image_size >> n_layers, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.main(x)
        return self.conv1(h), self.conv2(h).flatten(1)


class ReferenceStep:
    """StarGAN's iterations on a fixed in-memory batch: `d()` is a D-only iteration, `g()` the
    iteration that also updates G (its D step, then its G step)."""

    def __init__(self, image_size: int, batch: int, conv_dim: int, n_layers: int, c_dim: int = 5):
        torch.manual_seed(0)
        self.G = ReferenceGenerator(conv_dim, c_dim)
        self.D = ReferenceDiscriminator(image_size, conv_dim, c_dim, n_layers)
        self.g_opt = torch.optim.Adam(self.G.parameters(), 1e-4, betas=(0.5, 0.999))
        self.d_opt = torch.optim.Adam(self.D.parameters(), 1e-4, betas=(0.5, 0.999))
        self.x = torch.rand(batch, 3, image_size, image_size) * 2 - 1
        self.c_org = (torch.rand(batch, c_dim) > 0.5).float()
        self.c_trg = (torch.rand(batch, c_dim) > 0.5).float()

    def _reset(self) -> None:
        self.g_opt.zero_grad()
        self.d_opt.zero_grad()

    def d(self) -> None:
        out_src, out_cls = self.D(self.x)
        loss_real = -out_src.mean()
        loss_cls = F.binary_cross_entropy_with_logits(out_cls, self.c_org, reduction="sum")
        loss_cls = loss_cls / out_cls.shape[0]
        x_fake = self.G(self.x, self.c_trg)
        out_src, _ = self.D(x_fake.detach())
        loss_fake = out_src.mean()
        alpha = torch.rand(self.x.shape[0], 1, 1, 1)
        x_hat = (alpha * self.x + (1 - alpha) * x_fake.detach()).requires_grad_(True)
        out_src, _ = self.D(x_hat)
        (grad,) = torch.autograd.grad(
            out_src, x_hat, torch.ones_like(out_src), retain_graph=True, create_graph=True
        )
        norm = grad.flatten(1).pow(2).sum(1).sqrt()
        loss_gp = ((norm - 1) ** 2).mean()
        loss = loss_real + loss_fake + loss_cls + 10 * loss_gp
        self._reset()
        loss.backward()
        self.d_opt.step()

    def g(self) -> None:
        self.d()
        self.g_step()

    def g_step(self) -> None:
        x_fake = self.G(self.x, self.c_trg)
        out_src, out_cls = self.D(x_fake)
        loss_fake = -out_src.mean()
        loss_cls = F.binary_cross_entropy_with_logits(out_cls, self.c_trg, reduction="sum")
        loss_cls = loss_cls / out_cls.shape[0]
        x_rec = self.G(x_fake, self.c_org)
        loss_rec = (self.x - x_rec).abs().mean()
        loss = loss_fake + 10 * loss_rec + loss_cls
        self._reset()
        loss.backward()
        self.g_opt.step()
