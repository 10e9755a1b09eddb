"""Each Defect-GAN loss term against a value computed by hand on a tiny tensor."""

import math

import pytest
import torch

from dgan import losses


def test_adversarial_losses_are_wgan_critic_differences():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([0.5, -0.5])
    assert losses.adversarial_loss_d(real, fake).item() == pytest.approx(0.0 - 2.0)
    assert losses.adversarial_loss_g(fake).item() == pytest.approx(0.0)
    assert losses.adversarial_loss_g(torch.tensor([2.0, 4.0])).item() == pytest.approx(-3.0)


def test_gradient_penalty_is_squared_distance_of_gradient_norm_from_one():
    grad = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 1.0]]]])  # norms 5 and 1
    assert losses.gradient_penalty(grad).item() == pytest.approx(((5 - 1) ** 2 + 0) / 2)


def test_classification_loss_sums_binary_cross_entropy_over_categories_per_sample():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    def bce(z, y):
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    expected = (bce(0, 1) + bce(2, 0) + bce(-1, 0) + bce(0, 1)) / 2
    assert losses.classification_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_weakest_category_loss_takes_each_defacements_least_convincing_asked_category():
    # row 0 asks for both: -log sigmoid(-1) (the weaker, whatever the other's 3); row 1 for its
    # first only, so the unasked category's logit of -5 does not count; row 2 asks for nothing
    # and is left out of the mean.
    logits = torch.tensor([[3.0, -1.0, 0.0], [2.0, 2.0, -5.0], [-9.0, -9.0, -9.0]])
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])

    def nll(z):
        return -math.log(1 / (1 + math.exp(-z)))

    expected = (nll(-1.0) + nll(2.0)) / 2
    got = losses.weakest_category_loss(logits, labels).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # the term moves only the weaker category's logit
    logits.requires_grad_(True)
    losses.weakest_category_loss(logits, labels).backward()
    assert logits.grad[0, 0].item() == 0.0 and logits.grad[0, 1].item() < 0
    assert logits.grad[2].abs().sum().item() == 0.0
    assert losses.weakest_category_loss(logits[2:], labels[2:]).item() == 0.0


def test_fake_classification_loss_for_d_is_the_classification_loss_with_every_category_off():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 3.0]])
    p = [[1 / (1 + math.exp(-z)) for z in row] for row in logits.tolist()]
    expected = -sum(math.log(1 - q) for row in p for q in row) / 2
    got = losses.fake_classification_loss_d(logits).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_reconstruction_loss_is_mean_absolute_error():
    x = torch.tensor([[1.0, -1.0], [0.5, 0.0]])
    y = torch.tensor([[0.0, -1.0], [0.0, 1.0]])
    assert losses.reconstruction_loss(x, y).item() == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_reconstruction_loss_weighs_each_pixels_error_when_given_weights():
    x = torch.tensor([[[[1.0, -1.0], [0.5, 0.0]]]])
    y = torch.tensor([[[[0.0, -1.0], [0.0, 1.0]]]])
    weight = torch.tensor([[[[0.5, 1.0], [0.0, 1.0]]]])
    assert losses.reconstruction_loss(x, y, weight).item() == pytest.approx((0.5 + 0 + 0 + 1) / 4)


def test_sd_cycle_loss_compares_defect_map_with_repaint_map():
    m_d = torch.tensor([0.2, 0.8, 0.0, 1.0])
    m_rep = torch.tensor([0.2, 0.4, 0.5, 1.0])
    assert losses.sd_cycle_loss(m_d, m_rep).item() == pytest.approx((0 + 0.4 + 0.5 + 0) / 4)


def test_sd_region_loss_penalises_both_maps_towards_zero():
    m_d = torch.tensor([0.2, 0.6])
    m_rep = torch.tensor([0.1, 0.1])
    assert losses.sd_region_loss(m_d, m_rep).item() == pytest.approx(0.4 + 0.1)


def test_outside_region_loss_counts_the_map_only_where_normal_was_asked():
    m = torch.tensor([[[[0.5, 1.0], [0.0, 0.25]]]])
    region = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert losses.outside_region_loss(m, region).item() == pytest.approx((1.0 + 0.25) / 4)
    assert losses.outside_region_loss(m, torch.ones_like(m)).item() == 0.0


def test_binary_mask_loss_is_zero_at_either_layer_and_pushes_a_blend_to_the_nearer_one():
    assert losses.binary_mask_loss(torch.tensor([0.0, 1.0, 1.0, 0.0])).item() == 0.0
    assert losses.binary_mask_loss(torch.tensor([0.5, 0.5])).item() == pytest.approx(0.25)
    m = torch.tensor([0.3, 0.8], requires_grad=True)
    losses.binary_mask_loss(m).backward()
    # descending the loss moves 0.3 down towards the surface and 0.8 up towards f
    assert m.grad[0].item() > 0 > m.grad[1].item()


def test_diversity_loss_rewards_each_images_map_distance_up_to_the_cap():
    m1 = torch.tensor([[[[0.0, 1.0], [0.5, 0.5]]], [[[0.2, 0.2], [0.2, 0.2]]]])
    m2 = torch.tensor([[[[0.0, 0.0], [0.5, 0.5]]], [[[0.2, 0.2], [0.2, 0.3]]]])
    # per image: mean |m1 - m2| = 0.25 and 0.025; capped at 0.1: 0.1 and 0.025
    assert losses.diversity_loss(m1, m2, cap=0.1).item() == pytest.approx(-(0.1 + 0.025) / 2)
    assert losses.diversity_loss(m1, m2, cap=1.0).item() == pytest.approx(-(0.25 + 0.025) / 2)
    assert losses.diversity_loss(m1, m1.clone(), cap=0.1).item() == 0.0
    a = m1.clone().requires_grad_(True)
    losses.diversity_loss(a, m2, cap=0.1).backward()
    # the first image is past the cap: no gradient. In the second, descending the loss moves the
    # differing pixel (0.2 against 0.3) down, away from the other draw; equal pixels get nothing.
    assert a.grad[0].abs().sum().item() == 0.0
    assert a.grad[1, 0, 1, 1].item() > 0 and a.grad[1, 0, 0, 0].item() == 0.0


def test_interpolate_mixes_real_and_fake_by_alpha():
    real, fake = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    mixed = losses.interpolate(real, fake, torch.tensor([0.25, 1.0]))
    assert mixed.flatten().tolist() == pytest.approx([0.25, 1.0])
