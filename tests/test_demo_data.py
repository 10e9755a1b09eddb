"""Specification of the procedural demo set (dgan.data.demo)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dgan.data import CODEBRIM_CLASSES, demo
from dgan.data.demo import (
    FAMILIES,
    HELD_OUT_FAMILY,
    contact_sheet,
    defect_classes,
    generate_demo,
    render_sample,
    split_of,
)
from dgan.data.folder import read_folder
from dgan.errors import DganError

N_NORMAL, N_DEFECT, SIZE = 20, 20, 32


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "set"
    generate_demo(out, N_NORMAL, N_DEFECT, SIZE, seed=3, workers=1)
    return out


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def _class_index(name: str) -> int:
    return CODEBRIM_CLASSES.index(name)


def test_same_seed_gives_identical_set_for_any_worker_count(tmp_path: Path, demo_set: Path):
    parallel = tmp_path / "parallel"
    generate_demo(parallel, N_NORMAL, N_DEFECT, SIZE, seed=3, workers=2)
    assert (parallel / "labels.csv").read_bytes() == (demo_set / "labels.csv").read_bytes()
    files = sorted(p.relative_to(demo_set) for p in demo_set.rglob("*.png"))
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*.png"))
    for rel in files:
        np.testing.assert_array_equal(_pixels(parallel / rel), _pixels(demo_set / rel))


def test_different_seeds_give_different_images(tmp_path: Path, demo_set: Path):
    other = tmp_path / "other"
    generate_demo(other, 2, 2, SIZE, seed=4, workers=1)
    first = demo_set / "normal" / "000000.png"
    assert not np.array_equal(_pixels(other / "normal" / "000000.png"), _pixels(first))


def test_writes_the_folder_format_that_read_folder_reads_back(tmp_path: Path):
    out = tmp_path / "set"
    index = generate_demo(out, 5, 4, SIZE, seed=0, workers=1)
    assert read_folder(out).samples == index.samples
    assert index.classes == CODEBRIM_CLASSES
    assert len(list((out / "normal").iterdir())) == 5
    assert len(list((out / "defect").iterdir())) == 4
    assert len(list((out / "masks").iterdir())) == 4
    assert [p.name for p in out.parent.iterdir()] == ["set"]  # no partial directory left over
    for sample in index.samples:
        with Image.open(sample.path) as im:
            assert (im.mode, im.size) == ("RGB", (SIZE, SIZE))


def test_every_defect_has_a_non_empty_binary_mask_and_labels(demo_set: Path):
    defects = read_folder(demo_set).select(normal=False)
    assert len(defects) == N_DEFECT
    for sample in defects:
        assert sample.mask is not None and sample.mask.name == sample.path.name
        with Image.open(sample.mask) as im:
            assert (im.mode, im.size) == ("L", (SIZE, SIZE))
            mask = np.asarray(im)
        assert set(np.unique(mask)) <= {0, 255}
        assert mask.any()
        assert any(sample.labels)


def test_normals_have_no_labels_and_no_mask(demo_set: Path):
    normals = [s for s in read_folder(demo_set).samples if s.path.parent.name == "normal"]
    assert len(normals) == N_NORMAL
    assert all(not any(s.labels) and s.mask is None for s in normals)


def test_every_family_is_represented_and_the_held_out_one_only_in_transfer(demo_set: Path):
    samples = read_folder(demo_set).samples
    assert {s.family for s in samples} == set(FAMILIES)
    assert HELD_OUT_FAMILY in FAMILIES and len(FAMILIES) >= 4
    for s in samples:
        assert (s.split == "transfer") == (s.family == HELD_OUT_FAMILY)


def test_splits_are_about_80_10_10_within_the_other_families():
    splits = Counter(split_of(i) for i in range(4000))
    assert splits["transfer"] == 1000
    assert (splits["train"], splits["val"], splits["test"]) == (2400, 300, 300)


def test_exposed_bars_always_come_with_spallation_and_often_with_rust():
    label_sets = [defect_classes(0, i) for i in range(2000)]
    with_bars = [c for c in label_sets if "exposed_bars" in c]
    assert with_bars and all("spallation" in c for c in with_bars)
    rusty = sum("corrosion_stain" in c for c in with_bars) / len(with_bars)
    assert 0.5 < rusty < 0.7


def test_every_class_is_in_a_healthy_share_of_defects_and_most_are_single_label():
    label_sets = [defect_classes(1, i) for i in range(2000)]
    for name in CODEBRIM_CLASSES:
        assert sum(name in c for c in label_sets) / len(label_sets) >= 0.15, name
    assert 0.6 < sum(len(c) == 1 for c in label_sets) / len(label_sets) < 0.8


def test_even_a_tiny_set_has_every_class(demo_set: Path):
    defects = read_folder(demo_set).select(normal=False)
    for k, name in enumerate(CODEBRIM_CLASSES):
        assert any(s.labels[k] for s in defects), name


@pytest.mark.parametrize("name", CODEBRIM_CLASSES)
def test_each_class_changes_the_image_inside_its_mask_not_outside(name: str):
    wanted = ("spallation", "exposed_bars") if name == "exposed_bars" else (name,)
    index = next(i for i in range(200) if defect_classes(0, i) == wanted)
    sample = render_sample(0, "defect", index, SIZE)
    change = np.abs(sample.image.astype(float) - sample.surface).mean(axis=-1)
    inside = sample.mask > 0
    assert change[inside].mean() > 20.0
    assert change[inside].mean() > 4.0 * change[~inside].mean()


def test_cracks_stay_dark_and_visible_at_32_pixels():
    for index in [i for i in range(100) if defect_classes(0, i) == ("crack",)][:5]:
        sample = render_sample(0, "defect", index, 32)
        luma = sample.image.mean(axis=-1)
        assert (sample.mask > 0).sum() >= 12  # a line, not a speck
        assert luma[sample.mask > 0].min() < 0.4 * np.median(sample.surface.mean(axis=-1))


@pytest.mark.parametrize("size", [16, 256])
def test_renders_at_the_smallest_and_a_large_size(size: int):
    for index in range(3):
        sample = render_sample(0, "defect", index, size)
        assert sample.image.shape == (size, size, 3) and sample.image.dtype == np.uint8
        assert sample.mask.shape == (size, size) and sample.mask.any()


def test_refuses_to_write_into_a_non_empty_directory(tmp_path: Path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(DganError, match="not empty"):
        generate_demo(tmp_path, 2, 2, SIZE)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_writes_into_an_existing_empty_directory(tmp_path: Path):
    out = tmp_path / "empty"
    out.mkdir()
    generate_demo(out, 2, 2, SIZE, workers=1)
    assert (out / "labels.csv").is_file()


@pytest.mark.parametrize(
    ("n_normal", "n_defect", "size"),
    [(0, 5, 32), (5, 0, 32), (5, 5, 8), (5, 5, 2048)],
)
def test_rejects_bad_arguments_with_a_usage_error(
    tmp_path: Path, n_normal: int, n_defect: int, size: int
):
    with pytest.raises(DganError) as err:
        generate_demo(tmp_path / "out", n_normal, n_defect, size)
    assert err.value.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_an_interrupted_run_leaves_no_dataset_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    real = demo.render_sample

    def failing(seed: int, kind: str, index: int, size: int):
        if kind == "defect" and index == 1:
            raise RuntimeError("interrupted")
        return real(seed, kind, index, size)

    monkeypatch.setattr(demo, "render_sample", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        generate_demo(tmp_path / "out", 3, 3, SIZE, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_contact_sheet_has_a_row_per_family_and_per_class(demo_set: Path, tmp_path: Path):
    sheet = contact_sheet(demo_set, tmp_path / "sheet.png", per_row=4)
    with Image.open(sheet) as im:
        width, height = im.size
    rows = len(FAMILIES) + len(CODEBRIM_CLASSES)
    tile = max(64, SIZE)
    assert height == rows * (tile + 4) + 4
    assert width > 4 * tile


def test_progress_reports_every_image_once(tmp_path: Path):
    calls: list[tuple[int, int]] = []
    generate_demo(tmp_path / "out", 3, 2, SIZE, workers=1, progress=lambda *a: calls.append(a))
    assert calls[-1] == (5, 5)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
