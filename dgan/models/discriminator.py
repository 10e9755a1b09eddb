"""Defect-GAN's discriminator D (Sec. 3.1): StarGAN's, a PatchGAN D_src and a multi-label D_cls.

The depth follows the image size so that the last feature map is 2x2 (StarGAN at 128 px uses six
stride-2 layers); a fixed depth breaks at other sizes. Beyond the paper, a second PatchGAN head can
read an early, high-resolution feature map, so that D judges small patches (a thin crack) and not
only the whole image. Another switch makes D_src class-conditional by projection (Miyato and
Koyama 2018), so that D judges "is this a real crack" and not only "is this a real image".
A third lets each D_src head read how much its features vary over a few images of one kind
(Karras et al. 2018), so that a generator that draws one shape at one place on every input
scores worse than varied real defects. A fourth gives D_src a trunk of its own, so that its
features are learnt for telling real from fake alone and not shared with D_cls's categories.
A fifth puts a stride-1 conv at full resolution before the first stride-2 layer, so that D reads
each pixel with its neighbours (a one-pixel colour fringe, a dark rim) before it downsamples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dgan.models.speedups import DownConv


def default_depth(image_size: int) -> int:
    """Stride-2 layers that take `image_size` down to a 2x2 map: 6 at 128 px, 4 at 32 px."""
    return max(1, int(math.log2(image_size)) - 1)


class Discriminator(nn.Module):
    """D(x, labels) -> (D_src patch logits (B, 1, h, w), D_cls logits (B, C)).

    With `fine_src_layer` k, a second D_src head reads the features after the k-th stride-2 layer
    (image_size / 2^k on a side). Its patch map is average-pooled onto the last one and added, so
    that the mean of D_src is the sum of both heads' means: the WGAN loss sums the two critics.
    With `projection`, each patch logit adds <W y, h> for the multi-hot labels y (B, C) of the
    images (their own for real ones, the asked ones for fakes); `labels` is then required.
    With `restored_output`, D_cls has one more logit after the categories,
    "this is one of G's restorations".
    With `minibatch_std` g, each D_src head also reads one more channel: the standard deviation of
    its input features over each run of g consecutive images, averaged over channels, per
    position. Callers order a batch so that every run of g holds images of one kind (real
    defects, real normals, defacements or restorations); D_cls does not read it.
    With `separate_src`, D_src's heads (and the projection) read a second trunk of the same shape,
    `src_main`, and D_cls alone reads `main`.
    With `stem` s > 0, each trunk starts with a 3x3 stride-1 conv of s channels (and a LeakyReLU)
    at the image's resolution; the stride-2 layers and the fine head's layer count follow it.
    """

    def __init__(
        self,
        image_size: int,
        num_classes: int,
        conv_dim: int = 64,
        n_layers: int | None = None,
        max_dim: int = 2048,
        fine_src_layer: int | None = None,
        projection: bool = False,
        restored_output: bool = False,
        minibatch_std: int = 0,
        separate_src: bool = False,
        stem: int = 0,
    ) -> None:
        super().__init__()
        self.minibatch_std = minibatch_std
        extra = 1 if minibatch_std else 0
        n_layers = n_layers or default_depth(image_size)

        def trunk() -> tuple[nn.Sequential, int]:
            layers: list[nn.Module] = []
            in_ch, out_ch = 3, conv_dim
            if stem:
                layers += [nn.Conv2d(3, stem, 3, padding=1), nn.LeakyReLU(0.01)]
                in_ch = stem
            for _ in range(n_layers):
                layers += [DownConv(in_ch, out_ch), nn.LeakyReLU(0.01)]
                in_ch, out_ch = out_ch, min(out_ch * 2, max_dim)
            return nn.Sequential(*layers), in_ch

        self.main, in_ch = trunk()
        final = image_size >> n_layers
        self.src = nn.Conv2d(in_ch + extra, 1, 3, padding=1, bias=False)  # PatchGAN head
        # One logit per category, and with `restored_output` one more: "a restoration by G".
        self.cls = nn.Conv2d(in_ch, num_classes + restored_output, final, bias=False)
        self.embed = nn.Linear(num_classes, in_ch, bias=False) if projection else None
        self.fine_src_layer = fine_src_layer
        self.stem_layers = 2 if stem else 0  # the stem's conv and LeakyReLU
        self.fine_src = None
        if fine_src_layer is not None:
            if not 1 <= fine_src_layer < n_layers:
                raise ValueError(f"fine_src_layer must be in 1..{n_layers - 1}: {fine_src_layer}")
            fine_ch = min(conv_dim << (fine_src_layer - 1), max_dim)
            self.fine_src = nn.Conv2d(fine_ch + extra, 1, 3, padding=1, bias=False)
        # Built last, so that every other weight starts as it does without the switch.
        self.src_main = trunk()[0] if separate_src else None

    def with_group_std(self, h: Tensor) -> Tensor:
        """h and, as one more channel, the std of h over each run of `minibatch_std` images."""
        if not self.minibatch_std:
            return h
        b, c, height, width = h.shape
        g = self.minibatch_std
        if b % g:
            raise ValueError(
                f"a batch of {b} images does not split into runs of minibatch_std={g} images"
            )
        runs = h.float().reshape(b // g, g, c, height, width)
        std = (runs.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=1, keepdim=True)
        std = std.repeat_interleave(g, dim=0).to(h.dtype)  # (b, 1, height, width)
        return torch.cat([h, std], dim=1)

    def forward(
        self, x: Tensor, labels: Tensor | None = None, *, with_cls: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """D_src's patch map and D_cls's logits; D_cls is skipped (None) when not `with_cls`."""
        trunk = self.main if self.src_main is None else self.src_main
        if self.fine_src is None:
            h = trunk(x)
            src = self.src(self.with_group_std(h))
        else:
            # Each layer is a conv and a LeakyReLU, after the stem's.
            split = self.stem_layers + 2 * self.fine_src_layer
            early = trunk[:split](x)
            h = trunk[split:](early)
            src = self.src(self.with_group_std(h))
            fine = self.fine_src(self.with_group_std(early))
            src = src + nn.functional.adaptive_avg_pool2d(fine, src.shape[2:])
        if self.embed is not None:
            if labels is None:
                raise ValueError("a projection discriminator needs the images' labels")
            src = src + (self.embed(labels.to(h.dtype))[:, :, None, None] * h).sum(1, keepdim=True)
        if not with_cls:
            return src, None
        if self.src_main is not None:
            h = self.main(x)  # D_cls's own trunk
        return src, self.cls(h).flatten(1)
