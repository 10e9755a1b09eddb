"""The procedural demo set: concrete surfaces with painted CODEBRIM-style defects.

It is the default dataset, so training, synthesis and evaluation run without a download.
`generate_demo` writes the folder format (see `dgan.data.folder`):

    out/normal/NNNNNN.png    defect-free surfaces, four visibly different families
    out/defect/NNNNNN.png    surfaces with one to three defects (multi-hot over CODEBRIM_CLASSES)
    out/masks/NNNNNN.png     union mask of the defects of the defect image with the same name
    out/labels.csv           file,split,family,<class...>

File numbers run on from the normals into the defects, so a mask name never matches a normal.
Image i of a kind depends only on (seed, kind, i): the set is identical for any worker count.
The family `HELD_OUT_FAMILY` goes entirely to split "transfer", for the cross-surface test.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dgan.data.folder import read_folder, write_labels
from dgan.data.index import CODEBRIM_CLASSES, DatasetIndex, Sample
from dgan.errors import DganError
from dgan.io import atomic_save_image

FAMILIES: tuple[str, ...] = ("smooth_grey", "coarse_aggregate", "pitted_dark", "warm_weathered")
HELD_OUT_FAMILY: str = "warm_weathered"

KINDS: tuple[str, ...] = ("normal", "defect")
_CHUNK = 64  # images per worker task: large enough to amortise pickling, small enough to balance

# Label sets and their frequencies. exposed_bars always sits in a spall and rusts 11 times in 18;
# every class ends up in 18-35% of the defect images.
_LABEL_SETS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("crack",), 0.20),
    (("spallation",), 0.13),
    (("efflorescence",), 0.18),
    (("corrosion_stain",), 0.14),
    (("crack", "spallation"), 0.04),
    (("crack", "efflorescence"), 0.05),
    (("efflorescence", "corrosion_stain"), 0.05),
    (("crack", "corrosion_stain"), 0.03),
    (("spallation", "exposed_bars"), 0.07),
    (("spallation", "exposed_bars", "corrosion_stain"), 0.11),
)
_LABEL_CDF = np.cumsum([w for _, w in _LABEL_SETS])
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_LIGHT = np.array([-0.6, -0.8])  # direction towards the light in (x, y) image coordinates


@dataclass(frozen=True)
class SurfaceFamily:
    """Parameters of one kind of concrete surface. Lengths are fractions of the image side."""

    base: tuple[float, float, float]  # mean RGB
    tone: float  # amplitude of large-scale brightness variation
    grain: float  # amplitude of fine sand grain
    tint: float  # amplitude of large-scale colour variation
    stones: float  # probability of an aggregate stone per `stone_cell` cell
    stone_cell: float
    stone_radius: tuple[float, float]
    stone_contrast: float
    pores: float  # probability of an air void per `pore_cell` cell
    pore_cell: float
    pore_radius: tuple[float, float]
    stains: float  # darkening of large blotches
    rain_streaks: float  # darkening of vertical weathering streaks
    light: float  # strength of the lighting gradient


SURFACE_FAMILIES: dict[str, SurfaceFamily] = {
    # Smooth formwork face: light, even, a few small bug holes.
    "smooth_grey": SurfaceFamily(
        base=(0.68, 0.68, 0.67), tone=0.05, grain=0.03, tint=0.01,
        stones=0.0, stone_cell=0.1, stone_radius=(0.0, 0.0), stone_contrast=0.0,
        pores=0.25, pore_cell=0.14, pore_radius=(0.006, 0.013),
        stains=0.05, rain_streaks=0.0, light=0.12,
    ),
    # Exposed aggregate: packed pebbles of mixed tone in a sandy matrix.
    "coarse_aggregate": SurfaceFamily(
        base=(0.56, 0.54, 0.51), tone=0.05, grain=0.08, tint=0.02,
        stones=0.95, stone_cell=0.077, stone_radius=(0.02, 0.035), stone_contrast=0.22,
        pores=0.15, pore_cell=0.16, pore_radius=(0.006, 0.011),
        stains=0.04, rain_streaks=0.0, light=0.15,
    ),
    # Dark blue-grey face riddled with air voids.
    "pitted_dark": SurfaceFamily(
        base=(0.40, 0.41, 0.44), tone=0.07, grain=0.05, tint=0.015,
        stones=0.0, stone_cell=0.1, stone_radius=(0.0, 0.0), stone_contrast=0.0,
        pores=0.6, pore_cell=0.085, pore_radius=(0.01, 0.026),
        stains=0.10, rain_streaks=0.0, light=0.18,
    ),
    # Sun-warmed tan concrete with rain streaks and blotches, strongly side-lit.
    "warm_weathered": SurfaceFamily(
        base=(0.72, 0.64, 0.52), tone=0.08, grain=0.045, tint=0.03,
        stones=0.25, stone_cell=0.1, stone_radius=(0.015, 0.03), stone_contrast=0.12,
        pores=0.15, pore_cell=0.16, pore_radius=(0.006, 0.011),
        stains=0.12, rain_streaks=0.22, light=0.30,
    ),
}  # fmt: skip


@dataclass
class RenderedSample:
    """One generated image (HxWx3 uint8) with its labels; `surface` is the image before defects."""

    image: np.ndarray
    mask: np.ndarray | None  # HxW uint8 0/255, defects only
    labels: tuple[int, ...]
    family: str
    surface: np.ndarray


# ---------------------------------------------------------------- noise and geometry primitives


@functools.lru_cache(maxsize=64)
def _upsampler(cells: int, size: int) -> np.ndarray:
    """The cells x size matrix that bicubic-upsamples one axis (PIL's resampling kernel)."""
    basis = Image.fromarray(np.eye(cells, dtype=np.float32))
    return np.asarray(basis.resize((size, cells), Image.BICUBIC))


def _smooth_noise(
    rng: np.random.Generator, size: int, cells: float, rows: float | None = None
) -> np.ndarray:
    """Band-limited noise in about [-1, 1]: a random grid bicubic-upsampled to size x size.

    The grid has `cells` columns and `rows` rows (default: as many as columns).
    """
    nx = min(size, max(2, round(cells) + 1))
    ny = min(size, max(2, round(cells if rows is None else rows) + 1))
    grid = rng.uniform(-1.0, 1.0, (ny, nx)).astype(np.float32)
    if nx == size and ny == size:
        return grid
    # Bicubic resampling is separable: one small matrix product per axis.
    return _upsampler(ny, size).T @ grid @ _upsampler(nx, size)


def _fractal_noise(rng: np.random.Generator, size: int, cells: float, octaves: int) -> np.ndarray:
    """Sum of `_smooth_noise` octaves, each twice as fine and half as strong."""
    out = np.zeros((size, size), np.float32)
    for k in range(octaves):
        out += _smooth_noise(rng, size, cells * 2**k) * 0.5**k
    return out / (2.0 - 0.5 ** (octaves - 1))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y) as fractions of the image side."""
    t = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(t, t)


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


@dataclass
class _Scatter:
    """Per-pixel view of round objects scattered on a jittered grid (see `_scatter`)."""

    dist: np.ndarray  # distance to the nearest object's centre, in units of its radius
    radius: np.ndarray  # that object's radius in pixels
    ux: np.ndarray  # unit vector from the pixel towards that object's centre
    uy: np.ndarray
    attr: np.ndarray  # that object's random attribute in [0, 1]

    def coverage(self) -> np.ndarray:
        """Antialiased inside-ness, one pixel wide at the edge, so sub-pixel objects still show."""
        return np.clip((1.0 - self.dist) * self.radius + 0.5, 0.0, 1.0)


def _scatter(
    rng: np.random.Generator,
    size: int,
    cell: float,
    prob: float,
    radius: tuple[float, float],
    aspect: float = 1.0,
) -> _Scatter:
    """Objects on a jittered grid of `cell`-sized cells, present with probability `prob`.

    Objects are ellipses up to `aspect` long at random angles. A centre lies at least 0.2 cell
    from its cell's border and an object reaches at most 0.7 cell, so a pixel can only be
    covered from its own cell and the three neighbours on the side of the cell it lies in:
    4 passes over the image.
    """
    n = max(1, round(1.0 / cell))
    if radius[1] * aspect > 0.7 / n:
        raise ValueError(f"objects of radius {radius[1]} x {aspect} do not fit cells of {1 / n}")
    cell_px = size / n
    shape = (n + 2, n + 2)  # a ring of extra cells so border pixels have all their neighbours
    present = rng.random(shape) < prob
    cx = (np.arange(-1, n + 1)[None, :] + rng.uniform(0.2, 0.8, shape)) * cell_px
    cy = (np.arange(-1, n + 1)[:, None] + rng.uniform(0.2, 0.8, shape)) * cell_px
    rad = rng.uniform(radius[0] * size, radius[1] * size, shape)
    theta = rng.uniform(0.0, math.pi, shape)
    stretch = rng.uniform(1.0, aspect, shape)
    attr = rng.random(shape)
    # Per-cell constants of the ellipse distance, stacked so one gather fetches them all.
    table = np.stack(
        [
            cx, cy,
            np.cos(theta) / (stretch * rad), np.sin(theta) / (stretch * rad),
            np.cos(theta) * np.sqrt(stretch) / rad, np.sin(theta) * np.sqrt(stretch) / rad,
            np.where(present, 0.0, np.inf),
        ]
    ).astype(np.float32)  # fmt: skip
    centres = (np.arange(size, dtype=np.float32) + 0.5)[:, None]
    position = centres[:, 0] / cell_px
    cell_of = np.minimum(position.astype(int), n - 1) + 1  # for rows and for columns alike
    side = np.where(position % 1.0 < 0.5, -1, 1)  # towards the nearer neighbouring cell
    best = np.full((size, size), np.inf, np.float32)  # squared distance, in radii
    best_k = np.zeros((size, size), np.int8)
    steps = ((0, 0), (0, 1), (1, 0), (1, 1))
    for k, (di, dj) in enumerate(steps):
        # A pixel's cell row depends only on its row and the column only on its column,
        # so the per-cell constants expand to pixels by a row gather then a column gather.
        rows, cols = cell_of + di * side, cell_of + dj * side
        x0, y0, cu, su, cv, sv, absent = table[:, rows][:, :, cols]
        dx, dy = centres.T - x0, centres - y0
        u, v = dx * cu + dy * su, dy * cv - dx * sv
        d2 = u * u + v * v + absent
        closer = d2 < best
        best = np.where(closer, d2, best)
        best_k[closer] = k
    chosen = np.array(steps)[best_k]
    i = cell_of[:, None] + chosen[..., 0] * side[:, None]
    j = cell_of[None, :] + chosen[..., 1] * side[None, :]
    dx, dy = (cx[i, j] - centres.T).astype(np.float32), (cy[i, j] - centres).astype(np.float32)
    norm = np.maximum(np.sqrt(dx * dx + dy * dy), 1e-6)
    rad, attr = rad.astype(np.float32), attr.astype(np.float32)
    return _Scatter(np.sqrt(best), rad[i, j], dx / norm, dy / norm, attr[i, j])


def _coarse(img: np.ndarray, cells: int) -> np.ndarray:
    """The image's colour averaged over a `cells` x `cells` grid and smoothly upsampled."""
    size = img.shape[0]
    channels = []
    for k in range(img.shape[2]):
        plane = Image.fromarray(img[..., k].astype(np.float32))
        small = plane.resize((cells, cells), Image.BOX)
        channels.append(np.asarray(small.resize((size, size), Image.BILINEAR)))
    return np.stack(channels, axis=-1)


def _blob(
    rng: np.random.Generator,
    size: int,
    centre: tuple[float, float],
    radius: float,
    roughness: float = 1.0,
    elongation: float = 1.6,
) -> np.ndarray:
    """Irregular blob: per pixel, distance to `centre` relative to the boundary (1 on the edge).

    The boundary is a random harmonic outline, stretched along a random axis and frayed by noise.
    """
    x, y = _grid(size)
    dx, dy = x - centre[0], y - centre[1]
    axis = rng.uniform(0.0, math.pi)
    stretch = rng.uniform(1.0, elongation)
    u = (dx * math.cos(axis) + dy * math.sin(axis)) / stretch
    v = -dx * math.sin(axis) + dy * math.cos(axis)
    angle = np.arctan2(v, u)
    outline = np.ones_like(angle)
    for k in range(2, 7):
        outline += rng.uniform(0.0, 0.28 / k) * roughness * np.cos(k * angle + rng.uniform(0, 6.3))
    fray = 0.08 * roughness * _smooth_noise(rng, size, 10)
    return np.sqrt(u * u + v * v) * math.sqrt(stretch) / (radius * outline) + fray


def _segment_distances(px: np.ndarray, py: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Distance from points (px, py) to each segment of the polyline `line` (all in pixels).

    Returns an array with one leading entry per segment.
    """
    a = line[:-1, :, None, None].astype(np.float32)
    ab = (line[1:] - line[:-1])[:, :, None, None].astype(np.float32)
    ax, ay, abx, aby = a[:, 0], a[:, 1], ab[:, 0], ab[:, 1]
    t = np.clip(((px - ax) * abx + (py - ay) * aby) / np.maximum(abx**2 + aby**2, 1e-9), 0, 1)
    ex, ey = px - ax - t * abx, py - ay - t * aby
    return np.sqrt(ex * ex + ey * ey)


def _luma(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], np.float32)


# ---------------------------------------------------------------- surfaces


def render_surface(rng: np.random.Generator, family: str, size: int) -> np.ndarray:
    """A defect-free concrete surface of `family` as HxWx3 float32 in [0, 1]."""
    f = SURFACE_FAMILIES[family]
    x, y = _grid(size)
    lum = 1.0 + f.tone * _fractal_noise(rng, size, 3, 3)
    lum += f.grain * _fractal_noise(rng, size, size / 3, 2)
    lum += 0.5 * f.grain * rng.standard_normal((size, size)).astype(np.float32)
    stain = _smoothstep(0.1, 0.7, _fractal_noise(rng, size, 4, 2))
    lum *= 1.0 - f.stains * stain
    if f.rain_streaks:
        # Rain runs down from the top edge: narrow columns, long in y, fading downward.
        streaks = np.clip(_smooth_noise(rng, size, 24, 2), 0.0, 1.0) * _smoothstep(0.0, 1.0, 1 - y)
        lum *= 1.0 - f.rain_streaks * streaks
    angle = rng.uniform(0.0, 2.0 * math.pi)
    lum *= 1.0 + f.light * ((x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle))
    img = lum[..., None] * np.array(f.base, np.float32)
    tint = _smooth_noise(rng, size, 3)
    img += f.tint * tint[..., None] * np.array([1.0, 0.3, -0.8], np.float32)
    if f.stones:
        stones = _scatter(rng, size, f.stone_cell, f.stones, f.stone_radius, aspect=1.5)
        frayed = stones.dist + 0.2 * _smooth_noise(rng, size, size / 5)
        edge = np.clip((1.0 - frayed) * stones.radius + 0.5, 0.0, 1.0)
        tone = 1.0 + f.stone_contrast * (2.0 * stones.attr - 1.0)
        warm = np.where(stones.attr > 0.7, 1.0, 0.0)[..., None] * np.array([0.04, 0.01, -0.03])
        rim = np.clip(1.0 - np.abs(frayed - 1.0) * stones.radius, 0.0, 1.0) * 0.07
        stone = img * tone[..., None] + warm.astype(np.float32)
        img = (img + edge[..., None] * (stone - img)) * (1.0 - rim)[..., None]
    if f.pores:
        img = _paint_pores(rng, img, f.pore_cell, f.pores, f.pore_radius)
    return img.astype(np.float32)


def _paint_pores(
    rng: np.random.Generator,
    img: np.ndarray,
    cell: float,
    prob: float,
    radius: tuple[float, float],
) -> np.ndarray:
    """Air voids: dark holes whose inner wall is lit on the side facing away from the light."""
    pores = _scatter(rng, img.shape[0], cell, prob, radius, aspect=1.3)
    # The wall lit by the light is the one on the far side of the centre from the light.
    lit = np.clip(pores.ux * _LIGHT[0] + pores.uy * _LIGHT[1], 0.0, 1.0)
    lit *= _smoothstep(0.3, 1.0, pores.dist)
    factor = 0.35 + 0.6 * lit
    return img * (1.0 - pores.coverage() * (1.0 - factor))[..., None]


# ---------------------------------------------------------------- defects


def _paint_crack(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Thin dark branching line: two random walks out of one point, plus one or two branches."""
    size = img.shape[0]
    step = rng.uniform(0.025, 0.035) * size
    heading = rng.uniform(0.0, math.pi)
    start = rng.uniform(0.25, 0.75, 2) * size
    # Hairline at any size: about 1.5 px at 64 px, growing slower than the image.
    width = max(1.3, rng.uniform(1.2, 2.0) * (size / 64) ** 0.6)

    def walk(origin: np.ndarray, direction: float, steps: int) -> np.ndarray:
        points, h = [origin], direction
        for _ in range(steps):
            h += rng.normal(0.0, 0.4) + 0.25 * (direction - h)
            points.append(points[-1] + step * np.array([math.cos(h), math.sin(h)]))
        return np.array(points)

    polylines = [
        (walk(start, heading, int(rng.integers(9, 18))), width),
        (walk(start, heading + math.pi, int(rng.integers(9, 18))), width),
    ]
    for _ in range(int(rng.integers(1, 3))):
        trunk, _ = polylines[int(rng.integers(0, 2))]
        k = int(rng.integers(1, len(trunk) - 1))
        trunk_heading = math.atan2(*(trunk[k + 1] - trunk[k])[::-1])
        branch = walk(trunk[k], trunk_heading + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1), 9)
        polylines.append((branch[: int(rng.integers(4, 10))], max(1.0, 0.7 * width)))
    core = np.zeros((size, size), np.float32)
    halo = np.zeros((size, size), np.float32)
    for line, w in polylines:
        half = np.maximum(1.0, w * np.linspace(1.0, rng.uniform(0.5, 0.8), len(line) - 1)) / 2
        # Work in the polyline's bounding box (plus the halo's reach), not the whole image.
        reach = 5.0 * w + 2.0
        lo = np.clip(np.floor(line.min(axis=0) - reach), 0, size).astype(int)
        hi = np.clip(np.ceil(line.max(axis=0) + reach), 0, size).astype(int)
        if np.any(hi <= lo):
            continue
        box = np.s_[lo[1] : hi[1], lo[0] : hi[0]]
        py, px = np.mgrid[box].astype(np.float32) + 0.5
        d = _segment_distances(px, py, line)
        core[box] = np.maximum(core[box], np.clip(half[:, None, None] + 0.5 - d, 0, 1).max(0))
        halo[box] = np.maximum(halo[box], np.exp(-((d.min(0) / (2.5 * w)) ** 2)))
    darkness = rng.uniform(0.72, 0.84) + 0.12 * _smooth_noise(rng, size, 6)
    img *= ((1.0 - darkness * core) * (1.0 - 0.12 * halo))[..., None]
    return core > 0.35


def _paint_spall(
    rng: np.random.Generator, img: np.ndarray, radius: tuple[float, float] = (0.12, 0.26)
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Chipped-out region: darker and rougher, shadowed under the rim on the side of the light.

    Returns the mask, the blob field (1 on the outline) and the centre, for bars to sit in.
    """
    size = img.shape[0]
    r = rng.uniform(*radius)
    centre = (rng.uniform(0.7 * r, 1.0 - 0.7 * r), rng.uniform(0.7 * r, 1.0 - 0.7 * r))
    s = _blob(rng, size, centre, r, roughness=1.4)
    inside = 1.0 - _smoothstep(0.94, 1.02, s)
    x, y = _grid(size)
    nx, ny = x - centre[0], y - centre[1]
    norm = np.maximum(np.sqrt(nx * nx + ny * ny), 1e-6)
    facing = (nx * _LIGHT[0] + ny * _LIGHT[1]) / norm  # 1 on the rim nearest the light
    rim = _smoothstep(0.55, 1.0, s)
    # Rough fracture face: a bumpy height field lit from the light direction.
    height = _fractal_noise(rng, size, 14, 3)
    gy, gx = np.gradient(height)
    relief = np.clip((gx * _LIGHT[0] + gy * _LIGHT[1]) * size / 14.0, -1.0, 1.0)
    grit = 0.05 * rng.standard_normal((size, size)).astype(np.float32)
    pit = (
        0.62
        + 0.14 * relief
        + grit
        - 0.32 * rim * np.clip(facing, 0, 1)
        + 0.15 * rim * np.clip(-facing, 0, 1)
    )
    fresh = np.array([1.02, 1.0, 0.95], np.float32)  # broken cement paste is slightly warmer
    broken = _scatter(rng, size, 0.07, 0.7, (0.012, 0.026), aspect=1.7)
    stones = broken.coverage() * (0.3 * broken.attr - 0.12)
    # The chipped face replaces the old skin, so pores and stains inside it are gone.
    inner = _coarse(img, 4) * ((pit + stones)[..., None] * fresh)
    lip = np.exp(-(((s - 1.0) / 0.03) ** 2)) * 0.3  # the broken edge reads as a dark outline
    img[:] = img + inside[..., None] * (inner - img)
    img *= (1.0 - lip)[..., None]
    return s < 1.0, s, centre


def _paint_bars(
    rng: np.random.Generator, img: np.ndarray, spall: np.ndarray, centre: tuple[float, float]
) -> tuple[np.ndarray, tuple[float, float]]:
    """Parallel rebars in the spall: shaded cylinders with ribs, rusty or dark steel.

    Returns the mask and the lowest point of the bars, where a rust stain would run from.
    """
    size = img.shape[0]
    x, y = _grid(size)
    angle = rng.choice([0.0, math.pi / 2]) + rng.normal(0.0, 0.12)
    along = (x - centre[0]) * math.cos(angle) + (y - centre[1]) * math.sin(angle)
    across = -(x - centre[0]) * math.sin(angle) + (y - centre[1]) * math.cos(angle)
    half = max(1.1 / size, rng.uniform(0.03, 0.045))
    n_bars = int(rng.choice([1, 2, 2, 3]))
    spacing = rng.uniform(0.16, 0.22)
    offsets = (np.arange(n_bars) - (n_bars - 1) / 2) * spacing + rng.normal(0.0, 0.03)
    signed = across[..., None] - offsets
    signed = np.take_along_axis(signed, np.argmin(np.abs(signed), axis=-1)[..., None], -1)[..., 0]
    dq = np.abs(signed)
    inside = spall < 0.9
    bar = (dq < half) & inside
    # Cylinder shading: surface normal across the bar, lit from the usual side.
    normal_x = signed / half * -math.sin(angle)
    normal_y = signed / half * math.cos(angle)
    z = np.sqrt(np.clip(1.0 - (dq / half) ** 2, 0.0, 1.0))
    lambert = np.clip(0.55 * z + 0.45 * (normal_x * _LIGHT[0] + normal_y * _LIGHT[1]) + 0.2, 0, 1)
    # Deformed bar: thin transverse ribs every ~1.5 bar diameters.
    ribs = 1.0 - 0.2 * _smoothstep(0.5, 0.95, np.sin(2 * math.pi * along / (3.2 * half)))
    rust = np.array([0.48, 0.28, 0.16], np.float32)
    scale = np.array([0.24, 0.20, 0.18], np.float32)  # dark mill scale and pitting
    mix = np.clip(0.6 + 0.5 * _fractal_noise(rng, size, 8, 2) + rng.uniform(-0.2, 0.3), 0, 1)
    colour = scale + mix[..., None] * (rust - scale)
    painted = colour * ((0.35 + 0.85 * lambert) * ribs)[..., None]
    soft = np.clip((half - dq) * size + 0.5, 0.0, 1.0) * inside
    # Each bar throws a shadow on the pit floor on the side away from the light.
    away = (signed * (-math.sin(angle) * _LIGHT[0] + math.cos(angle) * _LIGHT[1])) < 0
    shadow = np.clip((1.8 * half - dq) * size, 0.0, 1.0) * inside * (1 - soft) * away * 0.5
    img *= (1.0 - shadow)[..., None]
    img[:] = img + soft[..., None] * (painted - img)
    ys, xs = np.nonzero(bar)
    if len(ys):
        k = int(np.argmax(ys + rng.uniform(0, 2, len(ys))))
        low = ((xs[k] + 0.5) / size, (ys[k] + 0.5) / size)
    else:
        low = centre
    return bar, low


def _paint_efflorescence(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Diffuse white crystalline bloom, patchy and soft-edged, often running downward."""
    size = img.shape[0]
    r = rng.uniform(0.13, 0.28)
    centre = (rng.uniform(0.2, 0.8), rng.uniform(0.15, 0.7))
    s = _blob(rng, size, centre, r, roughness=1.2, elongation=2.0)
    _, y = _grid(size)
    drip = rng.uniform(0.0, 1.2)
    s = s / np.where(y > centre[1], 1.0 + drip * (y - centre[1]) / r, 1.0) ** 0.5
    body = 1.0 - _smoothstep(0.45, 1.05, s)
    patchy = 0.65 + 0.35 * _smooth_noise(rng, size, 8)
    speckle = rng.random((size, size), np.float32) ** 3  # sparse bright crystals
    alpha = np.clip(body * (patchy + 0.5 * speckle), 0.0, 1.0) * rng.uniform(0.8, 0.95)
    white = np.array([0.95, 0.95, 0.92], np.float32)
    img[:] = img + alpha[..., None] * (white - img)
    return alpha > 0.3


def _paint_corrosion(
    rng: np.random.Generator, img: np.ndarray, source: tuple[float, float] | None
) -> np.ndarray:
    """Orange-brown rust stain: a blotch at the source with streaks running down from it."""
    size = img.shape[0]
    x, y = _grid(size)
    if source is None:
        source = (rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.55))
    r = rng.uniform(0.07, 0.14)
    blotch = 1.0 - _smoothstep(0.4, 1.1, _blob(rng, size, source, r, roughness=1.5))
    streaks = np.zeros_like(x)
    for _ in range(int(rng.integers(4, 10))):
        x0 = source[0] + rng.normal(0.0, 0.5 * r)
        y0 = source[1] + rng.uniform(-0.5, 0.5) * r
        width = rng.uniform(0.015, 0.045)
        length = rng.uniform(0.2, 0.6)
        wiggle = 0.01 * np.sin(2 * math.pi * y / rng.uniform(0.1, 0.3) + rng.uniform(0, 6.3))
        across = np.exp(-(((x - x0 - wiggle) / width) ** 2))
        down = _smoothstep(0.0, 0.03, y - y0) * np.exp(-np.clip(y - y0, 0, None) / length)
        streaks = np.maximum(streaks, across * down * rng.uniform(0.7, 1.0))
    texture = 0.75 + 0.25 * _fractal_noise(rng, size, 10, 2)
    alpha = np.clip(np.maximum(blotch, streaks) * texture, 0.0, 1.0) * rng.uniform(0.8, 0.95)
    # Rust darkens and reddens what it covers; the thick core is a deeper brown.
    hue = np.array([1.1, 0.58, 0.27], np.float32) - 0.25 * blotch[..., None] * np.array(
        [0.3, 0.35, 0.2], np.float32
    )
    rust = (0.25 + 0.8 * _luma(img))[..., None] * hue
    img[:] = img + alpha[..., None] * (rust - img)
    return alpha > 0.25


def paint_defects(
    rng: np.random.Generator, img: np.ndarray, classes: tuple[str, ...]
) -> np.ndarray:
    """Paint the named defects onto `img` (HxWx3 float, in place); returns their union mask.

    Order is physical: the spall is chipped first, bars lie in it, rust runs from the bars,
    efflorescence blooms over the surface and a crack cuts through everything.
    """
    mask = np.zeros(img.shape[:2], bool)
    rust_source = None
    if "spallation" in classes:
        bars = "exposed_bars" in classes
        spall_mask, field, centre = _paint_spall(rng, img, (0.24, 0.34) if bars else (0.12, 0.26))
        mask |= spall_mask
        if bars:
            bar_mask, rust_source = _paint_bars(rng, img, field, centre)
            mask |= bar_mask
    if "corrosion_stain" in classes:
        mask |= _paint_corrosion(rng, img, rust_source)
    if "efflorescence" in classes:
        mask |= _paint_efflorescence(rng, img)
    if "crack" in classes:
        mask |= _paint_crack(rng, img)
    return mask


# ---------------------------------------------------------------- samples and the dataset


def defect_classes(seed: int, index: int) -> tuple[str, ...]:
    """The defect classes of defect image `index`.

    A golden-ratio sequence spreads the label sets evenly over consecutive indices, so even a
    twenty-image set has every class in about its intended share.
    """
    offset = np.random.default_rng([seed, 2]).random()
    u = (offset + index * _GOLDEN) % 1.0
    k = min(
        int(np.searchsorted(_LABEL_CDF, u * _LABEL_CDF[-1], side="right")), len(_LABEL_SETS) - 1
    )
    return _LABEL_SETS[k][0]


def family_of(index: int) -> str:
    """Families take turns by index, so every family has the same share of each kind."""
    return FAMILIES[index % len(FAMILIES)]


def split_of(index: int) -> str:
    """Split by rank within the family: 8 train, 1 val, 1 test in 10; held-out family: transfer."""
    if family_of(index) == HELD_OUT_FAMILY:
        return "transfer"
    rank = (index // len(FAMILIES)) % 10
    return "train" if rank < 8 else ("val" if rank == 8 else "test")


def render_sample(seed: int, kind: str, index: int, size: int) -> RenderedSample:
    """Image `index` of `kind` ("normal" or "defect"); depends only on (seed, kind, index, size)."""
    rng = np.random.default_rng([seed, KINDS.index(kind), index])
    family = family_of(index)
    surface = np.clip(render_surface(rng, family, size), 0.0, 1.0)
    img = surface.copy()
    mask = None
    classes: tuple[str, ...] = ()
    if kind == "defect":
        classes = defect_classes(seed, index)
        mask = paint_defects(rng, img, classes)
    return RenderedSample(
        image=_to_uint8(img),
        mask=None if mask is None else mask.astype(np.uint8) * 255,
        labels=tuple(int(c in classes) for c in CODEBRIM_CLASSES),
        family=family,
        surface=_to_uint8(surface),
    )


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class _Chunk:
    root: Path
    seed: int
    kind: str
    start: int
    stop: int
    size: int
    first_number: int  # file number of image `start`


def _file_name(number: int) -> str:
    return f"{number:06d}.png"


def _write_chunk(chunk: _Chunk) -> tuple[str, list[tuple[int, tuple[int, ...]]]]:
    """Render and save images start..stop-1 of one kind; returns the kind and (index, labels)."""
    written = []
    for index in range(chunk.start, chunk.stop):
        sample = render_sample(chunk.seed, chunk.kind, index, chunk.size)
        name = _file_name(chunk.first_number + index)
        atomic_save_image(Image.fromarray(sample.image), chunk.root / chunk.kind / name)
        if sample.mask is not None:
            atomic_save_image(Image.fromarray(sample.mask), chunk.root / "masks" / name)
        written.append((index, sample.labels))
    return chunk.kind, written


def _validate(out: Path, n_normal: int, n_defect: int, size: int) -> None:
    if n_normal < 1 or n_defect < 1:
        raise DganError(
            f"the demo set needs at least one normal and one defect image, got "
            f"n_normal={n_normal}, n_defect={n_defect}.",
            exit_code=2,
        )
    if not 16 <= size <= 1024:
        raise DganError(f"image size must be between 16 and 1024 pixels, got {size}.", exit_code=2)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DganError(
            f"{out} already exists and is not empty; choose another --out or delete it first."
        )


def generate_demo(
    out: Path,
    n_normal: int = 2000,
    n_defect: int = 1000,
    size: int = 64,
    seed: int = 0,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DatasetIndex:
    """Write the demo set to `out` in the folder format and return its index.

    The set is built in a hidden sibling directory and renamed to `out` when complete, so an
    interrupted run never leaves something that looks like a finished dataset. `workers=None`
    uses every CPU; the result is the same for any number of workers. `progress(done, total)`
    is called after each chunk of images.
    """
    out = Path(out)
    _validate(out, n_normal, n_defect, size)
    workers = max(1, os.cpu_count() or 1) if workers is None else max(1, workers)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    for sub in ("normal", "defect", "masks"):
        (partial / sub).mkdir(parents=True)
    counts = {"normal": n_normal, "defect": n_defect}
    first = {"normal": 0, "defect": n_normal}
    chunks = [
        _Chunk(partial, seed, kind, start, min(start + _CHUNK, counts[kind]), size, first[kind])
        for kind in KINDS
        for start in range(0, counts[kind], _CHUNK)
    ]
    labels: dict[tuple[str, int], tuple[int, ...]] = {}
    total, done = n_normal + n_defect, 0
    try:
        with contextlib.ExitStack() as stack:
            if workers > 1 and len(chunks) > 1:
                pool = stack.enter_context(Pool(min(workers, len(chunks))))
                results = pool.imap_unordered(_write_chunk, chunks)
            else:
                results = map(_write_chunk, chunks)
            for kind, written in results:
                for index, lab in written:
                    labels[kind, index] = lab
                done += len(written)
                if progress is not None:
                    progress(done, total)
        samples = []
        for kind in KINDS:
            for index in range(counts[kind]):
                name = _file_name(first[kind] + index)
                samples.append(
                    Sample(
                        path=Path(kind) / name,
                        labels=labels[kind, index],
                        split=split_of(index),
                        mask=Path("masks") / name if kind == "defect" else None,
                        family=family_of(index),
                    )
                )
        write_labels(partial, CODEBRIM_CLASSES, samples)
        if out.is_dir():
            out.rmdir()  # empty (checked above); rename cannot replace a directory on every OS
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return DatasetIndex(
        root=out,
        classes=CODEBRIM_CLASSES,
        samples=[
            Sample(
                path=out / s.path,
                labels=s.labels,
                split=s.split,
                mask=None if s.mask is None else out / s.mask,
                family=s.family,
            )
            for s in samples
        ],
        layout="folder",
    )


# ---------------------------------------------------------------- contact sheet


def contact_sheet(root: Path, out_png: Path, per_row: int = 8) -> Path:
    """Draw a labelled grid: one row of normals per family, then one row of defects per class.

    Defect rows show images with the fewest other defects first, so each row shows its class.
    Small images are enlarged (nearest neighbour) to at least 64 pixels so they can be judged.
    """
    index = read_folder(Path(root))
    if not index.samples:
        raise DganError(f"{root} holds no images to draw.")
    rows: list[tuple[str, list[Sample]]] = []
    families = sorted({s.family or "" for s in index.samples}, key=_family_order)
    for family in families:
        normals = [s for s in index.select(normal=True) if (s.family or "") == family]
        tag = " (held out)" if family == HELD_OUT_FAMILY else ""
        rows.append((f"normal\n{family or '-'}{tag}", normals[:per_row]))
    defects = index.select(normal=False)
    for k, name in enumerate(index.classes):
        having = sorted((s for s in defects if s.labels[k]), key=lambda s: sum(s.labels))
        rows.append((name, having[:per_row]))
    with Image.open(index.samples[0].path) as first:
        side = first.width
    tile = max(64, side)
    pad, label_w = 4, 150
    sheet = Image.new(
        "RGB",
        (label_w + per_row * (tile + pad) + pad, len(rows) * (tile + pad) + pad),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(sheet)
    for r, (title, samples) in enumerate(rows):
        top = pad + r * (tile + pad)
        draw.multiline_text((pad, top + tile // 2 - 12), title, fill=(0, 0, 0))
        for c, s in enumerate(samples):
            with Image.open(s.path) as im:
                thumb = im.convert("RGB").resize((tile, tile), Image.NEAREST)
            sheet.paste(thumb, (label_w + c * (tile + pad), top))
    out_png = Path(out_png)
    atomic_save_image(sheet, out_png)
    return out_png


def _family_order(family: str) -> tuple[int, str]:
    return (FAMILIES.index(family), family) if family in FAMILIES else (len(FAMILIES), family)
