"""Defect-GAN's generator G (Sec. 3.1, Fig. 2), with the Table 2 switches on one network.

Encoder (stride 4) -> residual bottleneck -> decoder, as StarGAN's G, plus:
- SCC: the attribute control map A (B, C, H, W) enters every decoder block through SPADE.
- ANI: Gaussian noise, scaled by one learned scalar, after every conv block.
- LWC: G paints a foreground f and a spatial distribution map m; the output is
  x * (1 - m) + f * m (Eq. 1-4).
- Beyond the paper, grain: a third head predicts a per-pixel amplitude, up to a cap, of fresh
  Gaussian noise added to f's grey, so G can give a surface grit where it paints; before f's
  tanh or after it (paint_foreground).
- Beyond the paper, layered label sets: a set of categories from several layers is painted in
  two passes of G, one layer on top of the rest (split_top_layer, stack_layers).
With every switch off, G is StarGAN's: A's channels are concatenated to the input image.

"Normal" is encoded as A = 0: A[c, y, x] is the presence of defect c at (y, x) (Sec. 3.1), so a
pixel with no defect present is a normal pixel. Restoration uses A = 0 everywhere, and a spatial
map at inference (a box, a mask) is 0 outside its region, i.e. "leave this area normal".

G takes A as a map (B, C, H, W), as labels (B, C) meaning that label at every pixel (what
training asks, Sec. 3.1), or as a sequence of those covering consecutive parts of the batch.
Labels are the cheap form: SPADE then computes gamma and beta on a 5x5 map and spreads it (see
SPADE.modulation), where a map costs three 3x3 convs at every decoder resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dgan.errors import DganError
from dgan.models.speedups import Conv3x3, spread_border

GRAIN_BIAS = -4.0  # sigmoid(-4) = 0.018: grain starts nearly off
OFFSET_LIMIT = 0.999  # atanh of pixels at +-1 is infinite; 0.999 maps to +-3.8
# None (the global RNG), one generator for the batch, or one per image (synthesis: output i then
# depends only on its own seed, whatever the batch it is computed in).
NoiseGenerator = torch.Generator | Sequence[torch.Generator] | None
# A: a map (B, C, H, W), labels (B, C) repeated over space, or parts of the batch in order.
Control = Tensor | Sequence[Tensor]


def control_parts(control: Control) -> list[Tensor]:
    return [control] if isinstance(control, Tensor) else list(control)


def control_as_map(control: Control, height: int, width: int) -> Tensor:
    """A as one (B, C, H, W) map, whatever form it was given in."""
    maps = [
        control_map_from_labels(a, height, width)
        if a.dim() == 2
        else nn.functional.interpolate(a, size=(height, width), mode="nearest")
        for a in control_parts(control)
    ]
    return maps[0] if len(maps) == 1 else torch.cat(maps)


def instance_norm(channels: int, affine: bool = True) -> nn.InstanceNorm2d:
    # track_running_stats=False: running buffers break two forwards before one backward in DDP.
    return nn.InstanceNorm2d(channels, affine=affine, track_running_stats=False)


def draw_noise(like: Tensor, generator: NoiseGenerator) -> Tensor:
    """N(0, 1) of shape (B, 1, H, W) for a batch like `like` (ANI's and grain's noise), from the
    global RNG, one generator for the batch, or one generator per image."""
    b, _, h, w = like.shape
    kw = {"device": like.device, "dtype": like.dtype}
    if isinstance(generator, Sequence):  # one stream per image: batch-size independent
        return torch.cat([torch.randn(1, 1, h, w, generator=g, **kw) for g in generator])
    return torch.randn(b, 1, h, w, generator=generator, **kw)


class NoiseInjection(nn.Module):
    """ANI: x + w * N(0, 1), one learned scalar w per injection, initialised to 0 (Sec. 3.1).

    w is kept as `noise_strength` = w / gain: with gain k, an optimizer step that moves the
    parameter by lr moves w by k * lr."""

    def __init__(self, gain: float = 1.0) -> None:
        super().__init__()
        self.gain = gain
        self.noise_strength = nn.Parameter(torch.zeros(()))

    @property
    def strength(self) -> Tensor:
        """w, the scale of the noise this injection adds."""
        return self.gain * self.noise_strength

    def forward(self, x: Tensor, generator: NoiseGenerator = None) -> Tensor:
        return x + self.strength.to(x.dtype) * draw_noise(x, generator)


class SPADE(nn.Module):
    """Param-free instance norm modulated by gamma and beta predicted from the control map A."""

    def __init__(self, channels: int, control_channels: int, hidden: int) -> None:
        super().__init__()
        self.norm = instance_norm(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(control_channels, hidden, 3, padding=1), nn.ReLU())
        self.gamma = Conv3x3(hidden, channels)
        self.beta = Conv3x3(hidden, channels)

    def forward(self, x: Tensor, control: Control) -> Tensor:
        parts = [self.modulation(a, x.shape[2], x.shape[3]) for a in control_parts(control)]
        if len(parts) == 1:
            gamma, beta = parts[0]
        else:
            gamma, beta = (torch.cat(t) for t in zip(*parts, strict=True))
        return self.norm(x) * (1 + gamma) + beta

    def modulation(self, a: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
        """gamma and beta (n, channels, H, W) for one part of A.

        Labels (n, C) are a constant map: shared conv, ReLU and the gamma and beta convs then
        vary only within two pixels of the border, so they run on a 5x5 map and are spread to
        H x W (spread_border). The values are those of the full-size convs; at 128 px this skips
        nearly all of SPADE's cost, which otherwise exceeds the rest of G's decoder.
        """
        if a.dim() == 4:
            h = self.shared(nn.functional.interpolate(a, size=(height, width), mode="nearest"))
            return self.gamma(h), self.beta(h)
        if min(height, width) <= 5:
            h = self.shared(control_map_from_labels(a, height, width))
            return self.gamma(h), self.beta(h)
        h = self.shared(control_map_from_labels(a, 5, 5))
        gamma, beta = self.gamma(h), self.beta(h)
        return spread_border(gamma, height, width), spread_border(beta, height, width)


class Norm(nn.Module):
    """SPADE when SCC is on, affine instance norm otherwise; same call either way."""

    def __init__(self, channels: int, control_channels: int, hidden: int, spade: bool) -> None:
        super().__init__()
        self.spade = SPADE(channels, control_channels, hidden) if spade else None
        self.norm = None if spade else instance_norm(channels)

    def forward(self, x: Tensor, control: Control) -> Tensor:
        return self.spade(x, control) if self.spade is not None else self.norm(x)


class ResidualBlock(nn.Module):
    """StarGAN's residual block; its norms become SPADE in the decoder half when SCC is on."""

    def __init__(self, dim: int, control_channels: int, hidden: int, spade: bool) -> None:
        super().__init__()
        self.conv1 = Conv3x3(dim, dim, bias=False)
        self.norm1 = Norm(dim, control_channels, hidden, spade)
        self.conv2 = Conv3x3(dim, dim, bias=False)
        self.norm2 = Norm(dim, control_channels, hidden, spade)

    def forward(self, x: Tensor, control: Control) -> Tensor:
        h = torch.relu(self.norm1(self.conv1(x), control))
        return x + self.norm2(self.conv2(h), control)


def upsample_conv(in_channels: int, out_channels: int, mode: str) -> nn.Module:
    """x2 upsampling: StarGAN's 4x4 transposed conv, or a nearest or bilinear resize + 3x3 conv.

    A resize avoids the checkerboard patterns that transposed convs print early in training
    (Odena et al. 2016), which at 32 px cover a whole defect. Nearest copies each pixel to a 2x2
    block, which the next conv can turn into stripes of period 2; bilinear interpolates.
    """
    if mode == "transpose":
        return nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False)
    resize = (
        nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        if mode == "bilinear"
        else nn.Upsample(scale_factor=2, mode="nearest")
    )
    return nn.Sequential(resize, Conv3x3(in_channels, out_channels, bias=False))


@dataclass
class GeneratorOutput:
    """What G returns: the composed image, and the LWC layers (None when LWC is off)."""

    image: Tensor
    foreground: Tensor | None
    defect_mask: Tensor | None


class Generator(nn.Module):
    """G(x, A) -> GeneratorOutput. x in [-1, 1], A in [0, 1] with one channel per category
    (a map, labels or parts: see Control)."""

    def __init__(
        self,
        num_classes: int,
        conv_dim: int = 64,
        repeat_num: int = 6,
        spade_hidden: int = 128,
        scc: bool = True,
        ani: bool = True,
        lwc: bool = True,
        upsample: str = "transpose",
        fine_blocks: int = 0,
        spade_from: str = "decoder",
        foreground: str = "image",
        chroma_stride: int = 1,
        paint_space: str = "logit",
        grain_space: str | None = None,
        noise_gain: float = 1.0,
        grain: float = 0.0,
        layer_of: Sequence[int] | None = None,
        smooth_of: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        # Categories painted without grain, as a (C,) 0/1 vector; like layers, not in the state
        # dict: it follows from the config and the classes.
        if smooth_of:
            smooth = torch.zeros(num_classes)
            smooth[list(smooth_of)] = 1.0
            self.register_buffer("smooth", smooth, persistent=False)
        else:
            self.smooth: Tensor | None = None
        # Layered label sets: layers (C, K), category c in layer k, K layers in painting order.
        # Not in the state dict: it follows from the config and the classes.
        if layer_of is None:
            self.layers: Tensor | None = None
        else:
            one_hot = nn.functional.one_hot(torch.tensor(list(layer_of)), max(layer_of) + 1)
            self.register_buffer("layers", one_hot.float(), persistent=False)
        self.foreground_mode, self.chroma_stride = foreground, chroma_stride
        self.paint_space, self.grain_space = paint_space, grain_space or paint_space
        self.num_classes, self.scc, self.ani, self.lwc = num_classes, scc, ani, lwc
        c, d = num_classes, conv_dim
        in_channels = 3 if scc else 3 + c  # StarGAN: label concatenated to the image

        def conv_block(conv: nn.Module, out: int) -> nn.ModuleDict:
            return nn.ModuleDict({"conv": conv, "norm": instance_norm(out)})

        self.encoder = nn.ModuleList(
            [
                conv_block(nn.Conv2d(in_channels, d, 7, padding=3, bias=False), d),
                conv_block(nn.Conv2d(d, 2 * d, 4, stride=2, padding=1, bias=False), 2 * d),
                conv_block(nn.Conv2d(2 * d, 4 * d, 4, stride=2, padding=1, bias=False), 4 * d),
            ]
        )
        # The first half of the bottleneck encodes; the second half decodes under A's control
        # (the paper). With spade_from="bottleneck", A controls every bottleneck block.
        n_enc = repeat_num - repeat_num // 2 if spade_from == "decoder" else 0
        self.bottleneck = nn.ModuleList(
            ResidualBlock(4 * d, c, spade_hidden, spade=scc and i >= n_enc)
            for i in range(repeat_num)
        )
        self.up = nn.ModuleList(upsample_conv(4 * d >> i, 2 * d >> i, upsample) for i in range(2))
        self.up_norm = nn.ModuleList(Norm(2 * d >> i, c, spade_hidden, scc) for i in range(2))
        # Beyond the paper: residual blocks at full resolution, under A's control, so that G has
        # more than one conv to draw structures a pixel or two wide (a crack) before its heads.
        self.fine = nn.ModuleList(
            ResidualBlock(d, c, spade_hidden, spade=scc) for _ in range(fine_blocks)
        )
        n_noise = len(self.encoder) + repeat_num + len(self.up) + fine_blocks
        self.noise = nn.ModuleList(NoiseInjection(noise_gain) for _ in range(n_noise if ani else 0))
        self.to_foreground = nn.Conv2d(d, 3, 7, padding=3)
        self.to_mask = nn.Conv2d(d, 1, 7, padding=3) if lwc else None
        # Beyond the paper: grain's amplitude a = grain * sigmoid(conv(h)), 0.018 * grain at first.
        self.grain = grain
        self.to_grain = nn.Conv2d(d, 1, 7, padding=3) if grain > 0 else None
        if self.to_grain is not None:
            nn.init.constant_(self.to_grain.bias, GRAIN_BIAS)

    def forward(
        self, x: Tensor, control: Control, generator: NoiseGenerator = None, noise: bool = True
    ) -> GeneratorOutput:
        """`noise=False` runs without ANI's noise (the cycle's second pass may ask for that)."""
        injections = iter(self.noise)

        def inject(h: Tensor) -> Tensor:
            return next(injections)(h, generator) if self.ani and noise else h

        h = x if self.scc else torch.cat([x, control_as_map(control, *x.shape[2:])], dim=1)
        for block in self.encoder:
            h = inject(torch.relu(block["norm"](block["conv"](h))))
        for block in self.bottleneck:
            h = inject(block(h, control))
        for up, norm in zip(self.up, self.up_norm, strict=True):
            h = inject(torch.relu(norm(up(h), control)))
        for block in self.fine:
            h = inject(block(h, control))
        if self.to_mask is None:
            foreground = torch.tanh(self.to_foreground(h))
            return GeneratorOutput(image=foreground, foreground=None, defect_mask=None)
        # f's and m's 7x7 convs (and grain's, when on) as one 4- or 5-channel conv: oneDNN takes
        # about as long for 4 output channels as for 3 or 1 (half the heads' cost at 128 px on a
        # CPU).
        convs = [self.to_foreground, self.to_mask]
        if self.to_grain is not None:
            convs.append(self.to_grain)
        heads = nn.functional.conv2d(
            h,
            torch.cat([c.weight for c in convs]),
            torch.cat([c.bias for c in convs]),
            padding=3,
        )
        painted, defect_mask = heads[:, :3], torch.sigmoid(heads[:, 3:4])
        grain = None
        if self.to_grain is not None and noise:
            # the same noise in every channel: grit changes brightness, not colour
            grain = self.grain * torch.sigmoid(heads[:, 4:]) * draw_noise(h, generator)
            if self.smooth is not None:  # none where A asks a smooth category
                asked = control_as_map(control, *h.shape[2:]) * self.smooth[:, None, None]
                grain = grain * (1 - asked.amax(1, keepdim=True).clamp(0, 1))
        offset = None
        if self.foreground_mode == "offset":  # f starts as x: atanh(x) + 0
            offset = torch.atanh(x.clamp(-OFFSET_LIMIT, OFFSET_LIMIT))
        foreground = paint_foreground(
            painted, grain, self.chroma_stride, self.paint_space, offset, self.grain_space
        )
        return GeneratorOutput(
            image=compose(x, foreground, defect_mask),
            foreground=foreground,
            defect_mask=defect_mask,
        )


def layer_of_categories(classes: Sequence[str], layers: Sequence[Sequence[str]]) -> list[int]:
    """Each category's layer, in painting order: the listed groups first, then every other
    category alone in A's channel order. Unknown or repeated names are refused."""
    layer_of: dict[str, int] = {}
    for k, group in enumerate(layers):
        for name in group:
            if name not in classes:
                raise DganError(
                    f"generator.layers names {name!r}, which is not among the categories "
                    f"({', '.join(classes)}); use those names",
                    exit_code=2,
                )
            if name in layer_of:
                raise DganError(
                    f"generator.layers puts {name!r} in two layers; list each category once",
                    exit_code=2,
                )
            layer_of[name] = k
    k = len(layers)
    for name in classes:
        if name not in layer_of:
            layer_of[name], k = k, k + 1
    return [layer_of[name] for name in classes]


def smooth_of_categories(classes: Sequence[str], names: Sequence[str]) -> list[int]:
    """The channels of A of the categories that generator.smooth_categories names; unknown or
    repeated names are refused."""
    unknown = [name for name in names if name not in classes]
    if unknown:
        raise DganError(
            f"generator.smooth_categories names {unknown[0]!r}, which is not among the "
            f"categories ({', '.join(classes)}); use those names",
            exit_code=2,
        )
    if len(set(names)) != len(names):
        raise DganError(
            "generator.smooth_categories repeats a category; list each once", exit_code=2
        )
    return [list(classes).index(name) for name in names]


def split_top_layer(labels: Tensor, layers: Tensor, draw: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(under, top, stacked) for multi-hot labels (B, C) and the layers (C, K) of a generator.

    `top` keeps the asked categories of one layer of the set: among the set's layers in painting
    order, the one at fraction draw (B,) in [0, 1] (1: the last). `under` keeps the rest, and
    `stacked` (B,) is true where the set has two layers or more; elsewhere top is 0 and under is
    the whole set. Device ops only: no host sync.
    """
    present = labels @ layers.to(labels) > 0  # (B, K)
    count = present.sum(1)
    stacked = count >= 2
    pick = torch.minimum((draw.to(labels) * count).floor(), count - 1)
    chosen = present & (present.cumsum(1) - 1 == pick[:, None])
    top = labels * (chosen.to(labels) @ layers.to(labels).T) * stacked[:, None].to(labels)
    return labels - top, top, stacked


def stack_layers(under: GeneratorOutput, top: GeneratorOutput, stacked: Tensor) -> GeneratorOutput:
    """A layered defacement: where `stacked`, `top` (G's pass over under.image), else `under`.

    top.image is Eq. 4 over under.image, so the image is x (1 - m_u)(1 - m_t) + ...: it departs
    from x on the union of the two maps, 1 - (1 - m_u)(1 - m_t), which is returned as m."""
    where = stacked[:, None, None, None]
    union = 1 - (1 - under.defect_mask) * (1 - top.defect_mask)
    return GeneratorOutput(
        image=torch.where(where, top.image, under.image),
        foreground=None,
        defect_mask=torch.where(where, union, under.defect_mask),
    )


def paint_foreground(
    painted: Tensor,
    grain: Tensor | None = None,
    chroma_stride: int = 1,
    space: str = "logit",
    offset: Tensor | None = None,
    grain_space: str | None = None,
) -> Tensor:
    """f in [-1, 1] from what G paints (B, 3, H, W), its grain (B, 1, H, W) and, with
    generator.foreground "offset", atanh of the input. f = tanh(painted + offset), the paper's f
    when grain is None and chroma_stride 1. In "logit" space, the colour is averaged
    (subsample_chroma) before the tanh; in "image" space after it, on f's pixel values. Grain is
    added in grain_space (None: space). Whatever changes f after the tanh is clipped to [-1, 1]."""
    grain_space = grain_space or space
    if space == "logit" and chroma_stride > 1:
        painted = subsample_chroma(painted, chroma_stride)
    if grain_space == "logit" and grain is not None:
        painted = painted + grain
    foreground = torch.tanh(painted if offset is None else painted + offset)
    averaged = space == "image" and chroma_stride > 1
    if averaged:  # a grey pixel may take a colour that passes +-1
        foreground = subsample_chroma(foreground, chroma_stride)
    grainy = grain_space == "image" and grain is not None
    if grainy:
        foreground = foreground + grain
    return foreground.clamp(-1, 1) if averaged or grainy else foreground


def subsample_chroma(painted: Tensor, stride: int) -> Tensor:
    """painted with its colour (each channel minus the channels' mean) averaged over stride x stride
    blocks and resized back bilinearly; its grey is kept at full resolution."""
    grey = painted.mean(dim=1, keepdim=True)
    chroma = nn.functional.avg_pool2d(painted - grey, stride, ceil_mode=True)
    size = painted.shape[2:]
    return grey + nn.functional.interpolate(chroma, size, mode="bilinear", align_corners=False)


def compose(background: Tensor, foreground: Tensor, defect_mask: Tensor) -> Tensor:
    """Layer-wise composition, Eq. 2 and 4: background * (1 - m) + foreground * m."""
    return background * (1 - defect_mask) + foreground * defect_mask


def control_map_from_labels(labels: Tensor, height: int, width: int) -> Tensor:
    """A for training (Sec. 3.1): the multi-hot target label repeated over every pixel."""
    return labels[:, :, None, None].expand(-1, -1, height, width)
