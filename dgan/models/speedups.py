"""Speed-ups that change no parameter and no result, only how the same operation runs.

Kept here so that generator.py and discriminator.py read like StarGAN's model.py:

- `Conv3x3` (G's wide 3x3 convs) and `DownConv` (D's 4x4 stride-2 convs) are CPU-only: on CUDA,
  under reduced precision, and outside the sizes where they win, they are plain nn.Conv2d.
- `spread_border` (SPADE on a 5x5 map when A is constant over space) serves every device.

Conv3x3 runs as a Winograd F(4x4, 3x3) transform on a CPU (Lavin and Gray 2016). G's residual
blocks are 3x3, stride 1 convs at 256 channels: over half of G's forward and backward. oneDNN's
Winograd kernels need AVX-512, so on other CPUs these run as direct convolutions. Winograd's
transform does each 4x4 output tile with 36 products per channel pair instead of 144, as one
batched matrix product, and its backward is the same products transposed (autograd derives it).
Same parameters, and the same result to float rounding (max error about 1e-4 on outputs of
scale 10, against 2e-5 for the direct conv).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

# F(4x4, 3x3): output tile y = A^T [(G g G^T) * (B^T d B)] A for a 6x6 input tile d, 3x3 kernel g.
_BT = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]
_G = [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
]
_AT = [
    [1, 1, 1, 1, 1, 0],
    [0, 1, -1, 2, -2, 0],
    [0, 1, 1, 4, 4, 0],
    [0, 1, -1, 8, -8, 1],
]


def _kron(m: list[list[float]]) -> Tensor:
    """The 2-D transform M x M^T on a row-major flattened tile, as one matrix."""
    t = torch.tensor(m, dtype=torch.float64)
    return torch.kron(t, t).float()


_KERNEL, _OUTPUT = _kron(_G), _kron(_AT)  # (36, 9), (16, 36)
_INPUT = torch.tensor(_BT, dtype=torch.float32)  # (6, 6), applied along each tile axis


def winograd_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """conv2d(x, weight, bias, padding=1) for a 3x3 weight, by F(4x4, 3x3) tiles."""
    b, c, h, w = x.shape
    k = weight.shape[0]
    th, tw = -(-h // 4), -(-w // 4)  # output tiles; the last row/column may be partial
    xp = F.pad(x, (1, 1 + 4 * tw - w, 1, 1 + 4 * th - h))
    # im2col of the 6x6 tiles at stride 4 (its backward is col2im, 4x faster than Tensor.unfold's).
    tiles = F.unfold(xp, 6, stride=4).view(b, c, 36, th * tw)
    d = tiles.permute(2, 0, 3, 1).reshape(6, -1)  # (6, 6 * B * th * tw * C)
    # B^T d B one axis at a time: two 6x6 products, not one 36x36 (1.7x faster).
    bt = _INPUT.to(x.device)
    v = torch.matmul(bt, (bt @ d).view(6, 6, -1)).view(36, b * th * tw, c)
    u = (_KERNEL.to(x.device) @ weight.permute(2, 3, 1, 0).reshape(9, c * k)).view(36, c, k)
    m = torch.bmm(v, u)  # (36, tiles, K): the 36 products per tile, each over all C
    y = (_OUTPUT.to(x.device) @ m.view(36, -1)).view(4, 4, b, th, tw, k)
    y = y.permute(2, 5, 3, 0, 4, 1).reshape(b, k, 4 * th, 4 * tw)[:, :, :h, :w]
    return y if bias is None else y + bias[:, None, None]


class Conv3x3(nn.Conv2d):
    """nn.Conv2d(in, out, 3, padding=1), by Winograd where that is faster (see module doc)."""

    # The products saved grow as in * out per pixel, the transforms' memory traffic as in + out.
    # Forward + backward on 2 CPU threads, 8 images, direct against Winograd: 256 -> 256 at
    # 32x32, 0.43 s and 0.22 s; at 16x16, 0.11 s and 0.06 s; at 8x8, 30 ms and 26 ms; 128 -> 128
    # at 64x64, 0.45 s and 0.44 s; 128 -> 64 at 128x128, 0.99 s and 1.52 s.
    MIN_CHANNEL_RATIO = 64
    MIN_PIXELS = 256  # below 16x16 the tiles are mostly padding: no gain at 8x8 on 2 threads

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1, bias=bias)

    def uses_winograd(self, x: Tensor) -> bool:
        return (
            x.device.type == "cpu"
            and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and self.in_channels * self.out_channels
            >= self.MIN_CHANNEL_RATIO * (self.in_channels + self.out_channels)
            and x.shape[2] * x.shape[3] >= self.MIN_PIXELS
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.uses_winograd(x):
            return winograd_conv3x3(x, self.weight, self.bias)
        return super().forward(x)


class DownConv(nn.Conv2d):
    """D's 4x4 stride-2 conv. On a CPU, where its input map is small (8x8 or less: D's deep,
    weight-heavy layers), it runs as an explicit im2col matrix product: a whole D update with the
    penalty's double backward at 128 px, batch 4, went from 2.85 s to 1.98 s on 2 CPU cores.
    Same parameters, same result."""

    SMALL_MAP = 64  # input pixels at or below which the matrix product wins on a CPU

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 4, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        if x.device.type != "cpu" or h * w > self.SMALL_MAP:
            return super().forward(x)
        columns = F.unfold(x, 4, padding=1, stride=2)  # (B, C_in * 16, L)
        # One 2-D product over (C_in * 16, B * L): a batched matmul would expand the weight to
        # B copies in its input-gradient (G's step: 8 x 2048 x 16384 floats per layer).
        positions = columns.shape[2]
        columns = columns.transpose(0, 1).flatten(1)
        y = torch.addmm(self.bias[:, None], self.weight.flatten(1), columns)  # (C_out, B * L)
        return y.view(-1, b, positions).transpose(0, 1).reshape(b, -1, h // 2, w // 2)


def spread_border(t: Tensor, height: int, width: int) -> Tensor:
    """A 5x5 result (n, c, 5, 5) -> (n, c, H, W): rows 0, 1, 3, 4 become the two outermost rows
    on each side, row 2 every row inside them; the same for columns.

    Two 3x3 zero-padded convs over a constant map give a result that is constant except in the
    two outermost rows and columns on each side, so their 5x5 result holds every value of the
    H x W one. (Concatenated expands: about five times faster than index_select, backward
    included.)
    """

    def spread(t: Tensor, dim: int, size: int) -> Tensor:
        first, second, inside, last_but_one, last = t.split(1, dim)
        shape = [-1] * t.dim()
        shape[dim] = size - 4
        return torch.cat([first, second, inside.expand(shape), last_but_one, last], dim)

    return spread(spread(t, 2, height), 3, width)
