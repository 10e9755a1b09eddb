"""D's differentiable augmentation (dgan/train/augment.py) and its place in D's and G's steps."""

from __future__ import annotations

import torch
from conftest import tiny_gan_config
from test_train_gan import one_batch_and_nets, weights

from dgan.train.augment import augment, colour, translate
from dgan.train.gan import d_step, first_pass, g_step, run_gan


def test_translation_moves_whole_pixels_up_to_an_eighth_of_a_side_and_fills_with_grey():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32) / 1e4
    u = torch.tensor([0.0, 0.5])  # the smallest draw: 4 px to the left; the middle one: 0 px
    v = torch.tensor([0.99, 0.5])  # the largest draw: 4 px down
    out = translate(images, u, v)
    torch.testing.assert_close(out[0, :, 4:, :28], images[0, :, :28, 4:])
    assert (out[0, :, :4, :] == 0).all() and (out[0, :, :, 28:] == 0).all()
    torch.testing.assert_close(out[1], images[1])


def test_colour_at_the_middle_draws_is_the_identity_and_otherwise_stays_within_its_bounds():
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    half = torch.full((4,), 0.5)
    torch.testing.assert_close(colour(images, half, half), images)
    brighter = colour(images, torch.ones(4), half)
    torch.testing.assert_close(brighter - images, torch.full_like(images, 0.25))
    flatter = colour(images, half, torch.zeros(4))
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(flatter - mean, 0.75 * (images - mean))


def test_gradients_flow_back_through_every_policy_to_the_images():
    for policy in ("translation", "translation_colour"):
        images = torch.rand(2, 3, 16, 16, requires_grad=True)
        augment(images, torch.rand(2, 4), policy).square().sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0, policy
    plain = torch.rand(2, 3, 16, 16)
    assert augment(plain, torch.rand(2, 4), "none") is plain


def test_d_and_g_steps_read_augmented_images_and_identity_draws_change_nothing(tiny_folder):
    # With every draw at the middle of its range the augmentation is the identity, so an
    # augmented step must equal the plain one; with the stream's draws it must differ.
    results = {}
    for name, policy, middle in (
        ("plain", "none", False),
        ("identity", "translation_colour", True),
        ("augmented", "translation_colour", False),
    ):
        config = tiny_gan_config(
            tiny_folder, "generator.ani=false", f"discriminator.augment={policy}"
        )
        torch.manual_seed(0)
        accelerator, batch, nets = one_batch_and_nets(config)
        if middle:
            batch["d_augment"] = torch.full_like(batch["d_augment"], 0.5)
        first = first_pass(nets, batch, config)
        terms = d_step(nets, batch, config, accelerator, first)
        terms |= g_step(nets, batch, config, accelerator, first)
        results[name] = terms
    for key in ("d_adv", "d_total", "g_adv", "g_total"):
        torch.testing.assert_close(results["identity"][key], results["plain"][key])
        assert not torch.equal(results["augmented"][key], results["plain"][key]), key


def test_an_augmented_run_is_still_identified_by_its_seed(tiny_folder, workdir):
    runs = [
        run_gan(
            tiny_gan_config(
                tiny_folder, "train.iterations=6", "discriminator.augment=translation_colour"
            ),
            quiet=True,
        )
        for _ in range(2)
    ]
    a, b = (weights(r.run_dir / "checkpoints" / "iter-00000006") for r in runs)
    for k in a:
        assert torch.equal(a[k], b[k]), k
