"""Networks: Defect-GAN's generator and discriminator, and the defect inspector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dgan.config import GanConfig
    from dgan.models.discriminator import Discriminator
    from dgan.models.generator import Generator


def build_gan(config: GanConfig, classes: int | Sequence[str]) -> tuple[Generator, Discriminator]:
    """G and D as the config describes them, for these categories (names, or only their count
    where the config paints no layered label sets)."""
    from dgan.errors import DganError
    from dgan.models.discriminator import Discriminator
    from dgan.models.generator import Generator, layer_of_categories, smooth_of_categories

    g, d = config.generator, config.discriminator
    num_classes = classes if isinstance(classes, int) else len(classes)
    layer_of = None
    if g.label_sets == "layered":
        if isinstance(classes, int):
            raise DganError("a generator with layered label sets needs its categories' names")
        layer_of = layer_of_categories(classes, g.layers)
    smooth_of = None
    if g.smooth_categories:
        if isinstance(classes, int):
            raise DganError("generator.smooth_categories needs the categories' names")
        smooth_of = smooth_of_categories(classes, g.smooth_categories)
    generator = Generator(
        num_classes,
        conv_dim=g.conv_dim,
        repeat_num=g.repeat_num,
        spade_hidden=g.spade_hidden,
        scc=g.scc,
        ani=g.ani,
        lwc=g.lwc,
        upsample=g.upsample,
        fine_blocks=g.fine_blocks,
        spade_from=g.spade_from,
        foreground=g.foreground,
        chroma_stride=g.chroma_stride,
        paint_space=g.paint_space,
        grain_space=g.grain_space,
        noise_gain=g.noise_gain,
        grain=g.grain,
        layer_of=layer_of,
        smooth_of=smooth_of,
    )
    discriminator = Discriminator(
        config.data.image_size,
        num_classes,
        d.conv_dim,
        d.n_layers,
        d.max_dim,
        fine_src_layer=d.fine_src_layer,
        projection=d.projection,
        restored_output=d.restored_output,
        minibatch_std=d.minibatch_std,
        separate_src=d.separate_src,
        stem=d.stem,
    )
    return generator, discriminator
