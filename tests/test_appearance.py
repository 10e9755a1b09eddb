"""dgan.metrics.appearance: a defect's size, tone, colour and texture inside its region."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dgan.metrics.appearance import appearance, chroma, texture


def test_texture_is_the_laplacians_size_zero_on_flat_and_linear_patches():
    flat = torch.full((1, 3, 9, 9), 0.3)
    ramp = torch.linspace(-1, 1, 9).expand(1, 3, 9, 9)  # a linear shading
    assert torch.all(texture(flat) == 0)
    assert torch.allclose(texture(ramp)[..., 1:-1, 1:-1], torch.zeros(1, 1, 7, 7), atol=1e-6)
    dot = torch.zeros(1, 3, 9, 9)
    dot[..., 4, 4] = 1.0  # one white pixel: |-4| on it, 1 on each of its 4 neighbours
    t = texture(dot)[0, 0]
    assert t[4, 4] == 4 and t[3, 4] == t[5, 4] == t[4, 3] == t[4, 5] == 1
    assert t[3, 3] == 0 and t.sum() == 8


def test_chroma_is_zero_for_grey_and_the_mean_distance_from_grey_otherwise():
    grey = torch.full((1, 3, 2, 2), -0.2)
    assert torch.all(chroma(grey) == 0)
    red = torch.tensor([1.0, -1.0, -1.0])[None, :, None, None].expand(1, 3, 2, 2)
    # grey -1/3: |1 + 1/3|, |-1 + 1/3| twice -> mean 8/9
    torch.testing.assert_close(chroma(red), torch.full((1, 1, 2, 2), 8 / 9))


def test_appearance_weighs_each_pixel_by_its_mask_or_map_value():
    images = torch.zeros(2, 3, 9, 9)
    images[0, :, 4, 4] = 1.0  # image 0: a white dot on black; image 1: black
    weights = torch.zeros(2, 1, 9, 9)
    weights[0, :, 3:6, 3:6] = 1.0  # the dot and its 8 neighbours
    a = appearance(images, weights)
    assert a.area == pytest.approx(9 / (2 * 81))
    assert a.texture == pytest.approx((4 + 4 * 1) / 9)  # the dot's 4 and its neighbours' 1s
    assert a.grey == pytest.approx(1 / 9) and a.chroma == 0
    half = appearance(images, weights * 0.5)  # a map that half blends: same figures inside
    assert half.area == pytest.approx(a.area / 2) and half.texture == pytest.approx(a.texture)
    weights[1, :, 0, 0] = 3.0  # image 1's black corner, weighted three times a dot pixel
    mixed = appearance(images, weights)
    assert mixed.grey == pytest.approx(1 / 12)  # 1 of a total weight of 12 is white


def test_appearance_refuses_weights_that_do_not_match_or_select_nothing():
    images = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match="do not match"):
        appearance(images, torch.ones(3, 1, 8, 8))
    with pytest.raises(ValueError, match="do not match"):
        appearance(images, torch.ones(2, 3, 8, 8))
    with pytest.raises(ValueError, match="0 everywhere"):
        appearance(images, torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["runs/none", "--n", "0"], 2, "--n must be at least 1, got 0"),
        (["runs/none"], 1, "runs/none"),
    ],
)
def test_the_benchmark_refuses_bad_input_with_a_message_and_no_traceback(
    args, code, message, tmp_path
):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "defect_appearance.py"
    done = subprocess.run(
        [sys.executable, str(script), *args], cwd=tmp_path, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == code, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
