"""The generator's Table 2 switches, layer-wise composition, control maps, and D's depth."""

import pytest
import torch

from dgan.errors import DganError
from dgan.inference import deface, region_mask, restore
from dgan.models.discriminator import Discriminator, default_depth
from dgan.models.generator import (
    SPADE,
    Generator,
    NoiseInjection,
    compose,
    control_map_from_labels,
    layer_of_categories,
    split_top_layer,
    subsample_chroma,
)
from dgan.models.speedups import Conv3x3, DownConv

C = 5


def tiny(**switches) -> Generator:
    torch.manual_seed(0)
    return Generator(C, conv_dim=8, repeat_num=2, spade_hidden=8, **switches)


def test_layer_wise_composition_keeps_background_where_mask_is_zero():
    G = tiny()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = G(x, torch.zeros(2, C, 16, 16))
    assert out.defect_mask.shape == (2, 1, 16, 16)
    assert out.defect_mask.min() >= 0 and out.defect_mask.max() <= 1
    torch.testing.assert_close(out.image, compose(x, out.foreground, out.defect_mask))
    m = torch.zeros(1, 1, 2, 2)
    bg, fg = torch.full((1, 3, 2, 2), 0.3), torch.full((1, 3, 2, 2), -0.7)
    assert torch.equal(compose(bg, fg, m), bg)
    assert torch.equal(compose(bg, fg, m + 1), fg)


def test_an_offset_foreground_starts_as_the_input_and_an_image_foreground_does_not():
    x = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    a = torch.zeros(2, C, 16, 16)
    for mode, starts_as_input in (("offset", True), ("image", False)):
        G = tiny(foreground=mode, ani=False)
        with torch.no_grad():
            G.to_foreground.weight.zero_()
            G.to_foreground.bias.zero_()
        f = G(x, a).foreground
        assert torch.allclose(f, x, atol=1e-5) == starts_as_input, mode
    # The offset still moves f: its head's gradient reaches the conv.
    G = tiny(foreground="offset")
    G(x, a).foreground.sum().backward()
    assert G.to_foreground.weight.grad.abs().sum() > 0


def test_subsampled_chroma_keeps_a_one_pixel_grey_line_and_spreads_a_one_pixel_colour():
    painted = torch.zeros(1, 3, 16, 16)
    painted[0, :, 5, :] = -0.8  # a dark line one pixel wide, grey in every channel
    painted[0, 0, 10, 10], painted[0, 1, 10, 10] = 0.9, -0.9  # one red-not-green pixel
    out = subsample_chroma(painted, 4)
    torch.testing.assert_close(out.mean(dim=1), painted.mean(dim=1))  # the grey is untouched
    torch.testing.assert_close(out[0, :, 5, :], painted[0, :, 5, :])  # so the line stays sharp
    colour = (out - out.mean(dim=1, keepdim=True)).abs().amax(dim=1)[0]
    assert colour[10, 10] < 0.9 / 8  # the pixel's colour is averaged over its 4x4 block
    assert (colour > 0.01).sum() > 1  # and resized back over its neighbours, not dropped
    uniform = torch.tensor([0.4, -0.2, 0.1]).view(1, 3, 1, 1).expand(1, 3, 16, 16)
    torch.testing.assert_close(subsample_chroma(uniform, 4), uniform)  # a flat colour survives
    G = tiny(chroma_stride=4)
    G(torch.zeros(2, 3, 16, 16), torch.zeros(2, C, 16, 16)).foreground.sum().backward()
    assert G.to_foreground.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_resize_upsampling_doubles_the_side_then_convolves_without_a_transposed_conv(mode):
    from dgan.models.generator import upsample_conv

    up = upsample_conv(4, 2, mode)
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in up.modules())
    x = torch.zeros(1, 4, 2, 2)
    x[0, :, 0, 0] = 1.0  # one bright pixel in the corner of a 2x2 map
    resized = up[0](x)
    assert resized.shape == (1, 4, 4, 4)
    if mode == "nearest":  # a 2x2 block of ones, hard edges
        assert torch.equal(resized[0, 0], torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0],
                                                        [0, 0, 0, 0], [0, 0, 0, 0]]))  # fmt: skip
    else:  # interpolated: values between 0 and 1 next to the pixel
        assert 0 < resized[0, 0, 1, 2] < 1 and 0 < resized[0, 0, 2, 1] < 1
    G = tiny(upsample=mode)
    out = G(torch.zeros(2, 3, 16, 16), torch.zeros(2, C, 16, 16))
    assert out.image.shape == (2, 3, 16, 16)


def test_all_switches_off_is_stargan_with_label_concatenated_to_input():
    G = tiny(scc=False, ani=False, lwc=False)
    assert G.encoder[0]["conv"].in_channels == 3 + C
    assert not any(isinstance(m, (SPADE, NoiseInjection)) for m in G.modules())
    out = G(torch.zeros(1, 3, 16, 16), torch.zeros(1, C, 16, 16))
    assert out.defect_mask is None and out.foreground is None


def test_scc_feeds_the_control_map_through_spade_in_the_decoder_only():
    G = tiny(scc=True, ani=False)
    assert G.encoder[0]["conv"].in_channels == 3
    spades = [m for m in G.modules() if isinstance(m, SPADE)]
    assert len(spades) == 2 * 1 + 2  # one decoder residual block (2 norms) + 2 up blocks
    x = torch.rand(1, 3, 16, 16)
    a0, a1 = torch.zeros(1, C, 16, 16), torch.zeros(1, C, 16, 16)
    a1[:, 0] = 1
    with torch.no_grad():
        for s in spades:  # SPADE starts near identity; make A's effect visible
            s.gamma.weight.normal_()
    assert not torch.allclose(G(x, a0).image, G(x, a1).image)


@pytest.mark.parametrize(("spade_from", "controlled"), [("decoder", [False, True]),
                                                       ("bottleneck", [True, True])])  # fmt: skip
def test_spade_from_sets_which_bottleneck_blocks_the_control_map_steers(spade_from, controlled):
    G = tiny(ani=False, spade_from=spade_from)  # 2 bottleneck blocks: 1 encodes, 1 decodes
    steered = [b.norm1.spade is not None and b.norm2.spade is not None for b in G.bottleneck]
    assert steered == controlled
    assert all(
        b.norm1.norm is not None for b, s in zip(G.bottleneck, steered, strict=True) if not s
    )
    assert G.encoder[0]["conv"].in_channels == 3  # A still enters through SPADE only
    # A's effect reaches the output through the first block alone when it is steered
    x = torch.rand(1, 3, 16, 16)
    a0, a1 = torch.zeros(1, C, 16, 16), torch.zeros(1, C, 16, 16)
    a1[:, 0] = 1
    first = G.bottleneck[0]
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, SPADE):
                m.gamma.weight.zero_()  # every SPADE blind to A (and to the bias below) ...
                m.gamma.bias.zero_()
                m.beta.weight.zero_()
                m.beta.bias.zero_()
        if first.norm1.spade is not None:
            first.norm1.spade.gamma.weight.normal_()  # ... but the first block's
    changed = not torch.allclose(G(x, a0).image, G(x, a1).image)
    assert changed == (spade_from == "bottleneck")


@pytest.mark.parametrize(("height", "width"), [(32, 32), (28, 44), (20, 24), (16, 16)])
@pytest.mark.parametrize("stargan", [False, True])
def test_labels_as_control_equal_their_map_repeated_over_space_through_the_backward(
    height, width, stargan
):
    # Labels are G's cheap form of a constant A (SPADE on a 5x5 map, spread to the border
    # pattern). Output and parameter gradients must be those of the full map, at sizes where
    # the bottleneck is wider than 5 (the 5x5 path) and at most 5 (the full path), in both
    # G's SPADE form and StarGAN's concatenated input. A mixed batch takes parts in order.
    switches = {"scc": False, "ani": False, "lwc": False} if stargan else {"ani": False}
    G = tiny(fine_blocks=1, **switches)
    with torch.no_grad():
        for s in (m for m in G.modules() if isinstance(m, SPADE)):
            s.gamma.weight.normal_()  # SPADE starts near identity; make A's effect visible
    x = torch.rand(3, 3, height, width) * 2 - 1
    labels = torch.tensor([[1.0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 0, 0]])
    as_map = control_map_from_labels(labels, height, width)
    box = torch.zeros(1, C, height, width)
    box[:, 2, 4:12, 3:9] = 1
    runs = [
        (labels, as_map),
        ([labels[:2], box], torch.cat([as_map[:2], box])),  # labels, then a map
    ]
    for control, reference in runs:
        outs = [G(x, c) for c in (control, reference)]
        grads = [torch.autograd.grad(o.image.square().sum(), list(G.parameters())) for o in outs]
        torch.testing.assert_close(outs[0].image, outs[1].image, rtol=0, atol=1e-5)
        for (name, _), a, b in zip(G.named_parameters(), *grads, strict=True):
            # Sums over H x W in another order: equal to float error of the gradient's scale.
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name
    other = labels.flip(0)  # and A still matters: other labels give another image
    assert not torch.allclose(G(x, other).image, G(x, labels).image, atol=1e-3)


def test_noise_gain_scales_what_an_optimizer_step_does_to_each_noise_strength():
    torch.manual_seed(0)
    plain, fast = tiny(ani=True), tiny(ani=True, noise_gain=20.0)
    fast.load_state_dict(plain.state_dict())  # same parameters: the gain is not one of them
    x, a = torch.rand(2, 3, 16, 16), torch.zeros(2, C, 16, 16)
    with torch.no_grad():
        for p, f in zip(plain.noise, fast.noise, strict=True):
            p.noise_strength.fill_(0.2)
            f.noise_strength.fill_(0.01)  # w = 20 * 0.01 = 0.2 as well
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.testing.assert_close(fast(x, a, g1).image, plain(x, a, g2).image)
    # One Adam step of lr moves each parameter by lr: w moves 20 times as far under the gain.
    lr = 1e-3
    moved = []
    for G in (plain, fast):
        before = [float(n.strength.detach()) for n in G.noise]
        optimizer = torch.optim.Adam([n.noise_strength for n in G.noise], lr=lr)
        out = G(x, a, torch.Generator().manual_seed(1)).image
        (out - x).square().mean().backward()
        optimizer.step()
        moved.append(
            [abs(float(n.strength.detach()) - b) for n, b in zip(G.noise, before, strict=True)]
        )
    for p_move, f_move in zip(*moved, strict=True):
        assert p_move == pytest.approx(lr, rel=1e-3) and f_move == pytest.approx(20 * lr, rel=1e-3)
    # The config's generator.noise_gain reaches every injection of the G that training builds.
    from dgan.config import load_config
    from dgan.models import build_gan

    built, _ = build_gan(load_config("gan", ["demo"], ["generator.noise_gain=30"]), CLASSES)
    assert built.noise and all(n.gain == 30 for n in built.noise)


def test_image_paint_space_averages_the_seen_colour_and_grain_keeps_each_pixels_colour():
    from dgan.models.generator import paint_foreground

    painted = torch.zeros(1, 3, 8, 8)  # a grey field...
    painted[0, :, 4, 4] = torch.tensor([-9.0, -5.0, -9.0])  # ...and a black pixel, green in logits
    colour = {}
    for space in ("logit", "image"):
        f = paint_foreground(painted, chroma_stride=2, space=space)
        colour[space] = (f - f.mean(dim=1, keepdim=True)).abs().amax(dim=1)[0]
    # Before the tanh, the green that tanh hides is averaged onto the grey neighbours: a fringe.
    assert float(colour["logit"][4, 5]) > 0.3 and float(colour["logit"][5, 5]) > 0.3
    # After it, the black pixel has no colour to give: the neighbours stay grey.
    assert float(colour["image"].max()) < 0.01
    f = paint_foreground(painted, chroma_stride=2, space="image")
    assert float(f[0, :, 4, 4].max()) < -0.99  # and the pixel stays black
    # Without averaging or grain, both spaces are the paper's f = tanh(painted).
    torch.testing.assert_close(paint_foreground(painted, space="image"), torch.tanh(painted))
    # Grain in image space: a brightness change, the same in R, G and B, clipped at +-1.
    grain = 0.5 * torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    grainy = paint_foreground(painted, grain, chroma_stride=2, space="image")
    z, inside = grainy - f, (f + grain).abs().amax(dim=1) < 1  # pixels the clip leaves alone
    torch.testing.assert_close(z[:, 0][inside], grain[:, 0][inside])
    torch.testing.assert_close(z[:, 1][inside], grain[:, 0][inside])
    torch.testing.assert_close(z[:, 2][inside], grain[:, 0][inside])
    assert float(grainy.abs().max()) <= 1.0 and int(inside.sum()) > 40
    # grain_space "logit": grit before the tanh, which fades on the saturated black pixel, and
    # its colour averaged after it.
    mixed = paint_foreground(painted, grain, 2, "image", grain_space="logit")
    torch.testing.assert_close(
        mixed, paint_foreground(painted + grain, chroma_stride=2, space="image")
    )
    assert abs(float(mixed[0, 0, 4, 4] - f[0, 0, 4, 4])) < 1e-3
    assert float((mixed - mixed.mean(dim=1, keepdim=True)).abs().max()) < 0.01
    # The config's generator.paint_space reaches the G that training builds, which trains. The
    # demo preset paints after the tanh, in image space; the default paints before it.
    from dgan.config import load_config
    from dgan.models import build_gan

    built, _ = build_gan(load_config("gan", ["demo"]), CLASSES)
    assert (built.paint_space, built.grain_space) == ("image", "image")
    logit_g, _ = build_gan(load_config("gan", ["demo"], ["generator.paint_space=logit"]), CLASSES)
    assert (logit_g.paint_space, logit_g.grain_space) == ("logit", "logit")
    overrides = ["generator.paint_space=image", "generator.grain_space=logit"]
    mixed_g, _ = build_gan(load_config("gan", ["demo"], overrides), CLASSES)
    assert (mixed_g.paint_space, mixed_g.grain_space) == ("image", "logit")
    out = built(torch.rand(2, 3, 32, 32) * 2 - 1, torch.ones(2, len(CLASSES)))
    out.image.sum().backward()
    assert built.to_grain.weight.grad.abs().sum() > 0


def test_grain_adds_grey_noise_of_the_predicted_amplitude_to_the_foreground_only():
    plain, grainy = tiny(), tiny(grain=2.0)
    state = grainy.state_dict()
    plain.load_state_dict({k: v for k, v in state.items() if not k.startswith("to_grain")})
    x, a = torch.rand(2, 3, 16, 16) * 2 - 1, torch.ones(2, C)
    with torch.no_grad():  # grain's amplitude a = 2 * sigmoid(0) = 1 everywhere
        grainy.to_grain.weight.zero_()
        grainy.to_grain.bias.zero_()
    with torch.no_grad():
        quiet = grainy(x, a, noise=False)
        reference = plain(x, a, noise=False)
    torch.testing.assert_close(quiet.image, reference.image)  # no noise, no grain
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    with torch.no_grad():  # ANI's strengths are 0: grain is the only noise
        noisy = grainy(x, a, generator=g1)
        again = grainy(x, a, generator=g2)
    torch.testing.assert_close(noisy.image, again.image)  # same seed, same grain
    torch.testing.assert_close(noisy.defect_mask, quiet.defect_mask)  # m is untouched
    z = torch.atanh(noisy.foreground) - torch.atanh(quiet.foreground)  # before the tanh
    torch.testing.assert_close(z[:, 0], z[:, 1], atol=1e-3, rtol=1e-3)  # grey: every channel
    torch.testing.assert_close(z[:, 0], z[:, 2], atol=1e-3, rtol=1e-3)
    assert 0.8 < float(z[:, 0].std()) < 1.2  # N(0, 1) times an amplitude of 1
    with torch.no_grad():  # however large the head's output, the amplitude stays under the cap
        grainy.to_grain.bias.fill_(50.0)
        capped = grainy(x, a, generator=torch.Generator().manual_seed(3))
    z = torch.atanh(capped.foreground.clamp(-0.999999, 0.999999)) - torch.atanh(quiet.foreground)
    assert 1.6 < float(z[:, 0].std()) < 2.4  # N(0, 1) times the cap, 2
    # At initialisation the amplitude is 2 * sigmoid(-4) = 0.036: grain starts nearly off.
    assert torch.allclose(tiny(grain=2.0).to_grain.bias, torch.tensor([-4.0]))
    assert tiny().to_grain is None  # 0, the paper's G: no grain head
    # The config's generator.grain reaches the G that training builds, and needs LWC.
    from dgan.config import load_config
    from dgan.models import build_gan

    built, _ = build_gan(load_config("gan", ["demo"], ["generator.grain=0.5"]), CLASSES)
    assert built.to_grain is not None and built.grain == 0.5
    with pytest.raises(DganError, match="generator.grain=0.5 adds noise to the foreground f"):
        load_config(
            "gan", ["demo"], ["generator.grain=0.5", "generator.lwc=false", "generator.sc=false"]
        )


def test_smooth_categories_get_no_grain_where_asked_and_the_others_keep_theirs():
    from dgan.config import load_config
    from dgan.models import build_gan

    G, _ = build_gan(
        load_config("gan", ["demo"], ["generator.smooth_categories=[corrosion_stain]"]), CLASSES
    )
    G.eval()
    with torch.no_grad():  # grain's amplitude at its cap everywhere, so any grain shows
        G.to_grain.bias.fill_(50.0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def spread(control) -> float:  # two noise seeds: ANI's strengths are 0, so grain alone
        a, b = (G(x, control, generator=torch.Generator().manual_seed(s)).image for s in (1, 2))
        return float((a - b).abs().max())

    corrosion, spall = torch.zeros(2, 5), torch.zeros(2, 5)
    corrosion[:, 4], spall[:, 1] = 1, 1
    assert spread(corrosion) == 0.0  # asked the smooth category: no grain at all
    assert spread(spall) > 0.01  # any other category keeps its grain
    assert spread(torch.zeros(2, 5)) > 0.01  # and so does a restoration (A = 0)
    # As a map: grain goes only where A asks corrosion, here the left half.
    half = torch.zeros(2, 5, 32, 32)
    half[:, 4, :, :16] = 1
    a, b = (G(x, half, generator=torch.Generator().manual_seed(s)).image for s in (1, 2))
    assert float((a - b)[..., :16].abs().max()) == 0.0
    assert float((a - b)[..., 16:].abs().max()) > 0.01
    with pytest.raises(DganError, match="smooth_categories names 'rust'"):
        build_gan(load_config("gan", ["demo"], ["generator.smooth_categories=[rust]"]), CLASSES)
    with pytest.raises(DganError, match="smooth_categories repeats a category"):
        build_gan(
            load_config("gan", ["demo"], ["generator.smooth_categories=[crack,crack]"]), CLASSES
        )
    with pytest.raises(DganError, match="generator.grain is 0"):
        load_config("gan", ["demo"], ["generator.grain=0", "generator.smooth_categories=[crack]"])


def test_adaptive_noise_has_one_learned_scalar_per_conv_block_starting_at_zero():
    G = tiny(ani=True)
    strengths = [m.noise_strength for m in G.modules() if isinstance(m, NoiseInjection)]
    assert len(strengths) == 3 + 2 + 2  # encoder blocks + residual blocks + up blocks
    assert all(s.item() == 0.0 and s.requires_grad for s in strengths)
    with torch.no_grad():
        for s in strengths:
            s.fill_(0.5)
    x, a = torch.rand(1, 3, 16, 16), torch.zeros(1, C, 16, 16)
    assert not torch.allclose(G(x, a).image, G(x, a).image)  # stochastic variation
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    torch.testing.assert_close(G(x, a, g1).image, G(x, a, g2).image)  # seeded noise repeats


def test_deface_places_the_label_only_inside_the_asked_box():
    where = region_mask([[(2, 4, 10, 8)]], 1, 16, 16)
    assert where.sum().item() == 8 * 4
    assert where[0, 0, 4:8, 2:10].min().item() == 1.0
    G = tiny()
    seen = []
    G.register_forward_pre_hook(lambda _, args: seen.append(args[1]))
    normals, label = torch.zeros(1, 3, 16, 16), torch.eye(C)[:1]
    images, masks = deface(G, normals, label, region=[[(2, 4, 10, 8)]], seed=0)
    assert images.shape == (1, 3, 16, 16) and masks.shape == (1, 1, 16, 16)
    # G is asked for the label inside the box and for "normal" (A = 0) everywhere else.
    control = seen[0]
    assert control.shape == (1, C, 16, 16)
    assert torch.equal(control, label[:, :, None, None] * where)
    everywhere, _ = deface(G, normals, label, seed=0)
    assert not torch.equal(images, everywhere)  # the region changes what G draws
    restored, repaint = restore(G, images, seed=0)
    assert restored.shape == images.shape and repaint.shape == masks.shape


@pytest.mark.parametrize("box", [(0, 0, 17, 4), (5, 5, 5, 9), (-1, 0, 4, 4)])
def test_out_of_range_or_empty_boxes_are_refused(box):
    with pytest.raises(DganError, match="outside"):
        region_mask([[box]], 1, 16, 16)


CLASSES = ["crack", "spallation", "efflorescence", "exposed_bars", "corrosion_stain"]


def test_layers_are_the_listed_groups_in_order_then_each_other_category_alone():
    assert layer_of_categories(CLASSES, [["spallation", "exposed_bars"]]) == [1, 0, 2, 0, 3]
    assert layer_of_categories(CLASSES, []) == [0, 1, 2, 3, 4]
    assert layer_of_categories(CLASSES, [["corrosion_stain"], ["crack"]]) == [1, 2, 3, 4, 0]
    with pytest.raises(DganError, match=r"'rust', which is not among the categories \(crack, "):
        layer_of_categories(CLASSES, [["spallation", "rust"]])
    with pytest.raises(DganError, match="puts 'crack' in two layers"):
        layer_of_categories(CLASSES, [["crack"], ["spallation", "crack"]])


def test_the_drawn_layer_of_a_set_goes_on_top_and_a_one_layer_set_stays_whole():
    layers = torch.eye(4)[layer_of_categories(CLASSES, [["spallation", "exposed_bars"]])]
    labels = torch.tensor(
        [
            [1, 1, 0, 1, 1],  # crack, spallation + bars, corrosion: three layers
            [1, 1, 0, 1, 1],
            [1, 1, 0, 1, 1],
            [0, 1, 0, 1, 0],  # spallation + bars: one layer
            [1, 0, 0, 0, 1],  # crack + corrosion: two layers
        ],
        dtype=torch.float32,
    )
    # painting order: spallation + bars, crack, corrosion; draw d picks the floor(d * K)-th
    draw = torch.tensor([0.0, 0.5, 1.0, 0.99, 0.49])
    under, top, stacked = split_top_layer(labels, layers, draw)
    assert stacked.tolist() == [True, True, True, False, True]
    expected_top = torch.tensor(
        [[0, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]],
        dtype=torch.float32,
    )
    assert torch.equal(top, expected_top)
    assert torch.equal(under + top, labels)  # nothing asked is lost or added


def test_layered_defacement_paints_the_last_layer_over_the_rest_and_one_layer_sets_once():
    layer_of = layer_of_categories(CLASSES, [["spallation", "exposed_bars"]])
    G = tiny(ani=False, layer_of=layer_of)
    joint = tiny(ani=False)
    assert torch.equal(G.layers, torch.eye(4)[layer_of])
    assert "layers" not in G.state_dict()  # the checkpoint is that of a joint G
    normals = torch.rand(3, 3, 16, 16) * 2 - 1
    labels = torch.tensor([[1, 0, 0, 0, 1], [0, 1, 0, 1, 0], [1, 1, 0, 1, 0]], dtype=torch.float32)
    images, masks = deface(G, normals, labels)
    with torch.no_grad():
        # crack + corrosion: crack, then corrosion over it (the later layer in painting order)
        crack = joint(normals[:1], torch.eye(C)[[0]])
        over = joint(crack.image, torch.eye(C)[[4]])
        torch.testing.assert_close(images[:1], over.image)
        union = 1 - (1 - crack.defect_mask) * (1 - over.defect_mask)
        torch.testing.assert_close(masks[:1], union)
        # spallation + bars is one layer: one pass, as a joint G paints it
        one = joint(normals[1:2], labels[1:2])
        torch.testing.assert_close(images[1:2], one.image)
        torch.testing.assert_close(masks[1:2], one.defect_mask)
        # crack over spallation + bars, the spallation layer being first in painting order
        spall = joint(normals[2:], labels[2:] * torch.tensor([0, 1, 0, 1, 0.0]))
        torch.testing.assert_close(images[2:], joint(spall.image, torch.eye(C)[[0]]).image)
    # a box holds both layers: each pass is asked for its layer inside the box only
    seen = []
    G.register_forward_pre_hook(lambda _, args: seen.append(args[1]))
    deface(G, normals[:1], labels[:1], region=[[(2, 2, 8, 8)]])
    where = region_mask([[(2, 2, 8, 8)]], 1, 16, 16)
    assert len(seen) == 2
    assert torch.equal(seen[0], torch.eye(C)[[0], :, None, None] * where)
    assert torch.equal(seen[1], torch.eye(C)[[4], :, None, None] * where)
    # a batch of one-layer sets only takes one pass, and paints what the joint G paints
    seen.clear()
    alone, _ = deface(G, normals[1:2], labels[1:2])
    assert len(seen) == 1
    torch.testing.assert_close(alone, images[1:2])


def test_deface_refuses_labels_of_the_wrong_width():
    with pytest.raises(DganError, match="labels must have shape"):
        deface(tiny(), torch.zeros(1, 3, 16, 16), torch.zeros(1, C + 1))


@pytest.mark.parametrize("size,depth", [(32, 4), (64, 5), (128, 6)])
def test_discriminator_depth_follows_image_size_to_a_2x2_patch_map(size, depth):
    assert default_depth(size) == depth
    D = Discriminator(size, C, conv_dim=4, max_dim=16)
    src, cls = D(torch.zeros(2, 3, size, size))
    assert src.shape == (2, 1, 2, 2) and cls.shape == (2, C)


def test_training_target_region_is_the_flagged_box_or_the_whole_image():
    from dgan.train.gan import target_region

    region = torch.tensor([[1.0, 0.25, 0.5, 0.5, 0.25], [0.0, 0.25, 0.5, 0.5, 0.25]])
    where = target_region(region, 8, 8)
    assert where.shape == (2, 1, 8, 8)
    expected = torch.zeros(8, 8)
    expected[4:6, 2:6] = 1  # y from 0.5 for 0.25 of 8 rows, x from 0.25 for 0.5 of 8 columns
    assert torch.equal(where[0, 0], expected)
    assert torch.equal(where[1, 0], torch.ones(8, 8))  # not flagged: the paper's constant A


def test_training_target_region_as_an_ellipse_is_the_box_without_its_corners():
    from dgan.train.gan import target_region

    region = torch.tensor([[1.0, 0.25, 0.25, 0.5, 0.5], [0.0, 0.25, 0.25, 0.5, 0.5]])
    where = target_region(region, 8, 8, "ellipse")
    expected = torch.zeros(8, 8)
    expected[2:6, 2:6] = 1  # the box: rows and columns 2 to 5
    for y, x in ((2, 2), (2, 5), (5, 2), (5, 5)):  # centres 0.75 radii off in x and in y: out
        expected[y, x] = 0
    assert torch.equal(where[0, 0], expected)
    assert torch.equal(where[1, 0], torch.ones(8, 8))  # not flagged: the whole image either way
    # A wide box: the ellipse spans its width on the middle rows and narrows above and below.
    wide = target_region(torch.tensor([[1.0, 0.0, 0.25, 1.0, 0.5]]), 8, 8, "ellipse")[0, 0]
    assert wide[3:5].sum(1).tolist() == [8, 8] and wide[2].sum() < 8 and wide[:2].sum() == 0


def test_fine_source_head_adds_its_mean_to_the_wgan_critic_and_keeps_the_patch_map_shape():
    torch.manual_seed(0)
    D = Discriminator(32, C, conv_dim=4, max_dim=16, fine_src_layer=1)
    x = torch.randn(2, 3, 32, 32)
    src, cls = D(x)
    assert src.shape == (2, 1, 2, 2) and cls.shape == (2, C)  # the trainer's losses are unchanged
    early = D.main[:2](x)  # after the first stride-2 layer: a 16x16 map
    coarse = D.src(D.main[2:](early))
    fine = D.fine_src(early)
    assert fine.shape == (2, 1, 16, 16)
    torch.testing.assert_close(src.mean((1, 2, 3)), coarse.mean((1, 2, 3)) + fine.mean((1, 2, 3)))


def test_fine_source_head_scores_each_small_patch_on_its_own():
    torch.manual_seed(0)
    D = Discriminator(32, C, conv_dim=4, max_dim=16, fine_src_layer=1)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    early = D.main[:2](x)
    D.fine_src(early)[0, 0, 0, 0].backward()  # one top-left patch logit
    touched = x.grad.abs().sum((0, 1)) > 0
    # 4x4 stride-2 conv then a 3x3 head: an 8 px receptive field, not the whole image.
    assert touched[:8, :8].any() and not touched[8:].any() and not touched[:, 8:].any()


def test_stem_reads_each_pixel_at_full_resolution_before_the_stride_2_layers():
    torch.manual_seed(0)
    D = Discriminator(32, C, conv_dim=4, max_dim=16, fine_src_layer=1, stem=6)
    plain = Discriminator(32, C, conv_dim=4, max_dim=16, fine_src_layer=1)
    assert isinstance(plain.main[0], DownConv) and not isinstance(D.main[0], DownConv)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    stem_out = D.main[:2](x)
    assert stem_out.shape == (2, 6, 32, 32)  # full resolution, 6 channels
    stem_out[0, 0, 5, 7].backward()  # one stem unit reads its 3x3 neighbourhood, no more
    touched = (x.grad.abs().sum((0, 1)) > 0).nonzero().tolist()
    assert sorted(touched) == [[y, x_] for y in (4, 5, 6) for x_ in (6, 7, 8)]
    # The fine head still reads the map after one stride-2 layer, and both heads keep their shapes.
    fine_in = []
    D.fine_src.register_forward_hook(lambda _m, args, _o: fine_in.append(args[0].shape))
    src, cls = D(torch.randn(2, 3, 32, 32))
    assert fine_in == [(2, 4, 16, 16)]
    assert src.shape == plain(torch.randn(2, 3, 32, 32))[0].shape == (2, 1, 2, 2)
    assert cls.shape == (2, C)


def test_minibatch_std_lets_each_source_head_read_the_spread_of_its_run_and_not_beyond():
    torch.manual_seed(0)
    D = Discriminator(32, C, conv_dim=4, max_dim=16, fine_src_layer=1, minibatch_std=2)
    assert D.src.in_channels == 17 and D.fine_src.in_channels == 5  # features + one std channel
    x = torch.randn(4, 3, 32, 32)
    x[1] = x[0]  # the first run of two: one image twice, so no spread at all
    h = D.with_group_std(D.main(x))
    assert h.shape == (4, 17, 2, 2)
    assert torch.all(h[:2, -1] < 1e-3) and torch.all(h[2:, -1] > 1e-3)
    assert torch.equal(h[2, -1], h[3, -1])  # one value per run, shared by its images
    src, cls = D(x)
    moved = x.clone()
    moved[3] = torch.randn(3, 32, 32)
    src2, cls2 = D(moved)
    assert not torch.allclose(src2[2], src[2])  # its run-mate changed: D_src reads the spread
    torch.testing.assert_close(src2[:2], src[:2])  # the other run is untouched
    torch.testing.assert_close(cls2[:3], cls[:3])  # D_cls judges each image alone
    with pytest.raises(ValueError, match="does not split into runs of minibatch_std=2"):
        D(torch.randn(3, 3, 32, 32))


@pytest.mark.parametrize("separate", [False, True])
def test_separate_src_gives_the_source_heads_a_trunk_that_d_cls_does_not_read(separate):
    torch.manual_seed(0)
    D = Discriminator(32, C, conv_dim=4, max_dim=16, fine_src_layer=2, projection=True,
                      separate_src=separate)  # fmt: skip
    x, labels = torch.randn(2, 3, 32, 32), torch.ones(2, C)
    src, cls = D(x, labels)
    assert src.shape == (2, 1, 2, 2) and cls.shape == (2, C)

    def touched(out, module):
        D.zero_grad()
        out.sum().backward(retain_graph=True)
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    if not separate:  # StarGAN's D: one trunk under both outputs
        assert D.src_main is None and not any(k.startswith("src_main.") for k in D.state_dict())
        assert touched(src, D.main) and touched(cls, D.main)
        return
    # Every D_src path (main head, fine head, projection) reads src_main and not main.
    assert touched(src, D.src_main) and not touched(src, D.main)
    assert touched(cls, D.main) and not touched(cls, D.src_main)
    assert D.src_main[0].weight.shape == D.main[0].weight.shape  # a twin of the shared trunk
    # The other weights start as they do without the switch (src_main is built last).
    torch.manual_seed(0)
    shared = Discriminator(32, C, conv_dim=4, max_dim=16, fine_src_layer=2, projection=True)
    for key, value in shared.state_dict().items():
        torch.testing.assert_close(D.state_dict()[key], value)


@pytest.mark.parametrize("separate", [False, True])
def test_without_cls_discriminator_gives_the_same_patch_map_and_runs_no_d_cls_layer(separate):
    """The gradient penalty reads D_src alone: D_cls's head, and its own trunk, stay unrun."""
    torch.manual_seed(0)
    D = Discriminator(32, C, conv_dim=4, max_dim=16, fine_src_layer=2, separate_src=separate)
    x = torch.randn(2, 3, 32, 32)
    src, _ = D(x)
    ran = []
    D.cls.register_forward_hook(lambda *_: ran.append("cls"))
    D.main[0].register_forward_hook(lambda *_: ran.append("main"))
    src_only, cls = D(x, with_cls=False)
    assert cls is None
    torch.testing.assert_close(src_only, src)
    # With a shared trunk D_src runs it; with its own, main is D_cls's alone and stays unrun.
    assert ran == ([] if separate else ["main"])


def test_without_fine_source_head_discriminator_is_the_papers():
    D = Discriminator(32, C, conv_dim=4, max_dim=16)
    assert D.fine_src is None
    assert "fine_src.weight" not in D.state_dict()


def test_fine_blocks_work_at_full_resolution_under_the_control_map_with_their_own_noise():
    G = tiny(fine_blocks=2)
    assert len(G.fine) == 2 and len(G.noise) == len(tiny().noise) + 2
    assert all(block.norm1.spade is not None for block in G.fine)  # SPADE: A steers them too
    seen = []
    G.fine[0].register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    out = G(torch.zeros(2, 3, 16, 16), torch.zeros(2, C, 16, 16))
    assert seen == [(2, 8, 16, 16)]  # conv_dim channels at the image's resolution
    assert out.image.shape == (2, 3, 16, 16)


def test_without_fine_blocks_generator_is_the_papers():
    assert not any(k.startswith("fine.") for k in tiny().state_dict())


def test_projection_discriminator_adds_label_embedding_times_features_to_each_patch():
    torch.manual_seed(0)
    D = Discriminator(32, C, conv_dim=4, max_dim=16, projection=True)
    x = torch.randn(2, 3, 32, 32)
    crack, spall = torch.eye(C)[[0, 0]], torch.eye(C)[[1, 1]]
    src_crack, cls_crack = D(x, crack)
    src_spall, cls_spall = D(x, spall)
    src_normal, _ = D(x, torch.zeros(2, C))
    h = D.main(x)
    torch.testing.assert_close(src_normal, D.src(h))  # label 0 ("normal"): the plain head
    expected = (D.embed.weight[:, 0][None, :, None, None] * h).sum(1, keepdim=True)
    torch.testing.assert_close(src_crack - src_normal, expected)
    assert not torch.allclose(src_crack, src_spall)  # the realism score depends on the class
    torch.testing.assert_close(cls_crack, cls_spall)  # D_cls does not see the label
    with pytest.raises(ValueError, match="needs the images' labels"):
        D(x)


@pytest.mark.parametrize("side", [2, 3, 4, 8, 9])
def test_down_conv_equals_conv2d_through_the_double_backward(side):
    # D's deep layers run as im2col matrix products on the CPU; WGAN-GP differentiates through
    # their input gradient, so the output, the gradient and the gradient of the gradient must
    # all be those of the plain convolution (side 9 takes the convolution path itself).
    torch.manual_seed(0)
    conv = DownConv(6, 10)
    x = torch.randn(3, 6, side, side, requires_grad=True)
    ours = conv(x)
    plain = torch.nn.functional.conv2d(x, conv.weight, conv.bias, stride=2, padding=1)
    torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    (g_ours,) = torch.autograd.grad(ours.square().sum(), x, create_graph=True)
    (g_plain,) = torch.autograd.grad(plain.square().sum(), x, create_graph=True)
    torch.testing.assert_close(g_ours, g_plain, rtol=1e-5, atol=1e-5)
    (w_ours,) = torch.autograd.grad(g_ours.square().sum(), conv.weight)
    (w_plain,) = torch.autograd.grad(g_plain.square().sum(), conv.weight)
    torch.testing.assert_close(w_ours, w_plain, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("channels", "height", "width", "winograd"),
    [
        ((128, 128), 16, 16, True),
        ((128, 256), 17, 22, True),  # partial output tiles on both axes
        ((256, 128), 30, 9, True),
        ((64, 64), 16, 16, False),  # too few channels: the transforms would cost more
        ((128, 128), 15, 15, False),  # under 16x16: mostly padding
    ],
)
def test_conv3x3_equals_conv2d_through_the_backward(channels, height, width, winograd):
    # G's 3x3 convs run as Winograd F(4x4, 3x3) tiles on the CPU where that is faster: output,
    # input gradient and weight and bias gradients must be those of the plain convolution.
    torch.manual_seed(0)
    conv = Conv3x3(*channels)
    x = torch.randn(3, channels[0], height, width, requires_grad=True)
    assert conv.uses_winograd(x) is winograd
    ours = conv(x)
    plain = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(ours, plain, rtol=1e-4, atol=1e-4)
    probe = torch.randn_like(plain)
    got = torch.autograd.grad((ours * probe).sum(), (x, conv.weight, conv.bias))
    want = torch.autograd.grad((plain * probe).sum(), (x, conv.weight, conv.bias))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-3)


def test_conv3x3_is_the_plain_convolution_under_cpu_autocast():
    conv = Conv3x3(128, 128)
    x = torch.randn(1, 128, 16, 16)
    assert conv.uses_winograd(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv.uses_winograd(x)


def test_a_forward_without_noise_is_deterministic_and_one_with_noise_is_not():
    G = tiny()
    with torch.no_grad():
        for injection in G.noise:
            injection.noise_strength.fill_(0.5)
    x, a = torch.rand(2, 3, 16, 16) * 2 - 1, torch.zeros(2, C, 16, 16)
    assert torch.equal(G(x, a, noise=False).image, G(x, a, noise=False).image)
    assert not torch.equal(G(x, a).image, G(x, a).image)
