"""Normal patches cropped from full-resolution images: reproducible, complete or absent."""

from pathlib import Path

import numpy as np
import pytest
from fakes import write_image
from PIL import Image

from dgan.data import CODEBRIM_CLASSES
from dgan.data.crop import crop_normals
from dgan.data.folder import read_folder
from dgan.errors import DganError


@pytest.fixture
def src(tmp_path) -> Path:
    """Three 'full-resolution' normal images of different sizes, one in a subfolder."""
    write_image(tmp_path / "src" / "a.png", (96, 64), seed=1)
    write_image(tmp_path / "src" / "b.jpg", (80, 80), seed=2)
    write_image(tmp_path / "src" / "site2" / "c.png", (64, 120), seed=3)
    return tmp_path / "src"


def patches(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "normal").iterdir())}


def test_writes_n_patches_of_the_requested_size(src, tmp_path):
    out = tmp_path / "out"

    assert crop_normals(src, out, n=12, size=24) == 12

    names = sorted(p.name for p in (out / "normal").iterdir())
    assert names == [f"{i:06d}.png" for i in range(12)]
    for name in names:
        with Image.open(out / "normal" / name) as image:
            assert (image.size, image.mode) == ((24, 24), "RGB")


def test_output_is_a_folder_dataset_of_train_normals(src, tmp_path):
    out = tmp_path / "out"
    crop_normals(src, out, n=5, size=16)

    index = read_folder(out)

    assert index.classes == CODEBRIM_CLASSES
    assert [s.path for s in index.samples] == [out / "normal" / f"{i:06d}.png" for i in range(5)]
    assert all(s.is_normal and s.split == "train" for s in index.samples)


def test_same_seed_gives_identical_patches_for_any_worker_count(src, tmp_path):
    crop_normals(src, tmp_path / "one", n=20, size=16, seed=7, workers=1)
    crop_normals(src, tmp_path / "four", n=20, size=16, seed=7, workers=4)

    assert patches(tmp_path / "one") == patches(tmp_path / "four")
    assert (tmp_path / "one" / "labels.csv").read_text() == (
        tmp_path / "four" / "labels.csv"
    ).read_text()


def test_patch_i_does_not_depend_on_n(src, tmp_path):
    crop_normals(src, tmp_path / "few", n=3, size=16, seed=7)
    crop_normals(src, tmp_path / "many", n=10, size=16, seed=7)

    many = patches(tmp_path / "many")
    assert patches(tmp_path / "few") == {
        name: many[name] for name in ("000000.png", "000001.png", "000002.png")
    }


def test_different_seeds_give_different_patches(src, tmp_path):
    crop_normals(src, tmp_path / "s0", n=5, size=16, seed=0)
    crop_normals(src, tmp_path / "s1", n=5, size=16, seed=1)

    assert patches(tmp_path / "s0") != patches(tmp_path / "s1")


def test_crop_at_the_image_size_copies_the_image(tmp_path):
    source = write_image(tmp_path / "src" / "a.png", 16, seed=5)

    crop_normals(source.parent, tmp_path / "out", n=2, size=16)

    expected = np.asarray(Image.open(source))
    for name in ("000000.png", "000001.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / "normal" / name)), expected)


def test_images_smaller_than_the_crop_are_skipped(tmp_path, caplog):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (20, 20), (255, 0, 0)).save(src / "small.png")
    Image.new("RGB", (40, 40), (0, 0, 255)).save(src / "large.png")

    crop_normals(src, tmp_path / "out", n=6, size=32)

    for path in (tmp_path / "out" / "normal").iterdir():
        assert np.asarray(Image.open(path))[..., 2].min() == 255  # all from the blue image
    assert "1 of 2 images are smaller than 32 px" in caplog.text


def test_error_when_every_image_is_smaller_than_the_crop(tmp_path):
    write_image(tmp_path / "src" / "a.png", 20)
    write_image(tmp_path / "src" / "b.png", (64, 30))

    with pytest.raises(DganError, match="2 of 2 images are smaller than 32 px"):
        crop_normals(tmp_path / "src", tmp_path / "out", n=1, size=32)
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_empty_output_directory(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    with pytest.raises(DganError, match="already exists"):
        crop_normals(src, out, n=1, size=16)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_an_empty_output_directory_is_filled(src, tmp_path):
    (tmp_path / "out").mkdir()

    assert crop_normals(src, tmp_path / "out", n=2, size=16) == 2
    assert len(read_folder(tmp_path / "out").samples) == 2


def test_failure_leaves_neither_output_nor_partial_directory(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.png", 64)
    data = (src / "a.png").read_bytes()
    (src / "a.png").write_bytes(data[: len(data) // 2])  # header intact, pixels truncated

    with pytest.raises(DganError, match="a.png cannot be decoded"):
        crop_normals(src, tmp_path / "out", n=3, size=16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"n": 0}, "number of crops must be at least 1"),
        ({"size": 15}, "crop size must be at least 16"),
        ({"seed": -1}, "seed must be 0 or more"),
        ({"workers": 0}, "workers must be at least 1"),
    ],
)
def test_invalid_arguments_raise_error(src, tmp_path, kwargs, expected):
    with pytest.raises(DganError, match=expected) as err:
        crop_normals(src, tmp_path / "out", **{"n": 1, "size": 16, **kwargs})
    assert err.value.exit_code == 2


def test_missing_source_directory_raises_error(tmp_path):
    with pytest.raises(DganError, match="is not a directory"):
        crop_normals(tmp_path / "nowhere", tmp_path / "out", n=1, size=16)


def test_source_without_images_raises_error(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("no images here")

    with pytest.raises(DganError, match="holds no images"):
        crop_normals(tmp_path / "src", tmp_path / "out", n=1, size=16)
