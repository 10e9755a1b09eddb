"""The dataset check: every problem kind named with its file, usability, counts and sizes."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fakes import make_folder_dataset, write_image
from PIL import Image

from dgan.data import Sample
from dgan.data.check import (
    ALL_ZERO_DEFECT,
    BAD_MASK,
    BAD_MODE,
    DUPLICATE_ROW,
    EMPTY_FILE,
    MISSING_FILE,
    NO_DEFECTS,
    NO_NORMALS,
    NORMAL_WITH_LABELS,
    TOO_SMALL,
    UNLISTED_FILE,
    UNREADABLE,
    check_dataset,
    require_usable,
)
from dgan.data.folder import read_folder, write_labels
from dgan.errors import DganError

CLASSES = ("crack", "stain", "bloom")


@pytest.fixture
def dataset(tmp_path) -> Path:
    """Four normals and six defects of 40x40 in train/val/test, with no problem."""
    return make_folder_dataset(tmp_path / "data", n_normal=4, n_defect=6, size=40, classes=CLASSES)


def only_problem(report, kind):
    found = [p for p in report.problems if p.kind == kind]
    assert len(found) == 1, report.format()
    return found[0]


def test_clean_dataset_is_usable_with_no_problems(dataset):
    report = check_dataset(dataset)

    assert report.usable
    assert report.problems == []
    assert report.layout == "folder"
    assert report.classes == CLASSES


def test_counts_per_split_and_class(dataset):
    report = check_dataset(dataset)

    train = report.counts["train"]
    assert (train.n_normal, train.n_defect) == (2, 4)
    # Train defects 0, 1, 4, 5: crack, stain, stain, (bloom, crack)
    assert train.positives == {"crack": 2, "stain": 2, "bloom": 1}
    assert (report.counts["val"].n_normal, report.counts["val"].n_defect) == (1, 1)
    assert list(report.counts) == ["train", "val", "test"]


def test_cooccurrence_counts_images_positive_for_both_classes(tmp_path):
    root = tmp_path / "data"
    rows = [("normal/n.png", (0, 0, 0)), ("defect/a.png", (1, 1, 0)), ("defect/b.png", (1, 1, 1))]
    rows += [("defect/c.png", (0, 0, 1)), ("defect/d.png", (1, 0, 0))]
    for i, (file, _) in enumerate(rows):
        write_image(root / file, 32, seed=i)
    write_labels(root, CLASSES, [Sample(Path(f), labels) for f, labels in rows])

    report = check_dataset(root)

    assert report.cooccurrence == [[3, 2, 1], [2, 2, 1], [1, 1, 2]]


def test_sizes_count_each_width_and_height(tmp_path):
    root = make_folder_dataset(tmp_path, n_normal=2, n_defect=2, size=(48, 32), classes=CLASSES)
    write_image(root / "normal" / "normal_000.png", (64, 40))

    assert check_dataset(root).sizes == Counter({(48, 32): 3, (64, 40): 1})


def write_truncated_png(path: Path) -> None:
    write_image(path, 40)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_16_bit(path: Path) -> None:
    Image.fromarray(np.full((40, 40), 40000, dtype=np.uint16)).save(path)


BAD_IMAGES = {
    "zero-bytes": (lambda p: p.write_bytes(b""), EMPTY_FILE),
    "truncated-png": (write_truncated_png, UNREADABLE),
    "not-an-image": (lambda p: p.write_text("hello"), UNREADABLE),
    "grayscale": (lambda p: write_image(p, 40, mode="L"), BAD_MODE),
    "rgba": (lambda p: write_image(p, 40, mode="RGBA"), BAD_MODE),
    "palette": (lambda p: write_image(p, 40, mode="P"), BAD_MODE),
    "16-bit": (write_16_bit, BAD_MODE),
    "tiny": (lambda p: write_image(p, (40, 20)), TOO_SMALL),
}


@pytest.mark.parametrize("case", list(BAD_IMAGES))
def test_bad_image_is_a_fatal_problem_naming_its_path(dataset, case):
    write_bad, kind = BAD_IMAGES[case]
    bad = dataset / "defect" / "defect_001.png"
    write_bad(bad)

    report = check_dataset(dataset, min_size=32)

    problem = only_problem(report, kind)
    assert problem.path == bad
    assert problem.fatal
    assert not report.usable
    assert f"{kind}: {bad}" in report.format()


def test_16_bit_image_reports_its_mode(dataset):
    write_16_bit(dataset / "normal" / "normal_000.png")

    assert "mode I;16" in only_problem(check_dataset(dataset), BAD_MODE).detail


def test_min_size_sets_the_smallest_allowed_side(dataset):
    assert check_dataset(dataset, min_size=40).usable
    report = check_dataset(dataset, min_size=41)
    assert {p.kind for p in report.problems} == {TOO_SMALL}
    assert len(report.problems) == 10


def test_image_on_disk_not_in_labels_is_a_warning(dataset):
    write_image(dataset / "normal" / "extra.png", 40)
    write_image(dataset / "defect" / "extra.jpg", 40)

    report = check_dataset(dataset)

    assert [p.path.name for p in report.problems] == ["extra.jpg", "extra.png"]
    assert all(p.kind == UNLISTED_FILE and not p.fatal for p in report.problems)
    assert report.usable


def test_listed_file_that_does_not_exist_is_fatal(dataset):
    missing = dataset / "defect" / "defect_002.png"
    missing.unlink()

    report = check_dataset(dataset)

    assert only_problem(report, MISSING_FILE).path == missing
    assert not report.usable


def test_image_under_normal_with_positive_labels_is_fatal(dataset):
    text = (dataset / "labels.csv").read_text()
    (dataset / "labels.csv").write_text(
        text.replace("normal/normal_001.png,train,,0,0,0", "normal/normal_001.png,train,,0,1,0")
    )

    problem = only_problem(check_dataset(dataset), NORMAL_WITH_LABELS)

    assert problem.path == dataset / "normal" / "normal_001.png"
    assert "stain" in problem.detail
    assert problem.fatal


def test_image_under_defect_with_zero_labels_is_fatal(dataset):
    text = (dataset / "labels.csv").read_text()
    (dataset / "labels.csv").write_text(
        text.replace("defect/defect_000.png,train,,1,0,0", "defect/defect_000.png,train,,0,0,0")
    )

    problem = only_problem(check_dataset(dataset), ALL_ZERO_DEFECT)

    assert problem.path == dataset / "defect" / "defect_000.png"
    assert problem.fatal


def test_row_listed_twice_is_fatal_only_when_labels_disagree(dataset):
    labels_csv = dataset / "labels.csv"
    original = labels_csv.read_text()
    labels_csv.write_text(original + "defect/defect_000.png,train,,1,0,0\n")
    assert not only_problem(check_dataset(dataset), DUPLICATE_ROW).fatal

    labels_csv.write_text(original + "defect/defect_000.png,train,,0,1,0\n")
    assert only_problem(check_dataset(dataset), DUPLICATE_ROW).fatal


def test_mask_of_another_size_or_mode_is_fatal(dataset):
    write_image(dataset / "masks" / "defect_000.png", 40, mode="L")
    assert check_dataset(dataset).usable

    write_image(dataset / "masks" / "defect_000.png", 20, mode="L")
    assert "must match its image's size" in only_problem(check_dataset(dataset), BAD_MASK).detail

    write_image(dataset / "masks" / "defect_000.png", 40, mode="RGB")
    assert "mode RGB" in only_problem(check_dataset(dataset), BAD_MASK).detail


def test_no_normal_image_in_train_makes_the_set_unusable(tmp_path):
    root = make_folder_dataset(tmp_path, n_normal=0, n_defect=3, size=32, classes=CLASSES)

    report = check_dataset(root)

    assert only_problem(report, NO_NORMALS).path == root
    assert not report.usable


def test_no_defect_image_in_train_makes_the_set_unusable(tmp_path):
    root = make_folder_dataset(tmp_path, n_normal=3, n_defect=0, size=32, classes=CLASSES)

    report = check_dataset(root)

    assert only_problem(report, NO_DEFECTS).fatal
    assert not report.usable


def test_format_shows_counts_cooccurrence_sizes_and_problems(dataset):
    write_image(dataset / "normal" / "extra.png", 40)

    text = check_dataset(dataset).format()

    for expected in ("split", "train", "bloom", "co-occurrence", "40 x 40: 10", "extra.png"):
        assert expected in text
    assert "0 errors, 1 warnings" in text


def test_to_dict_is_json_serialisable(dataset):
    (dataset / "defect" / "defect_003.png").write_bytes(b"")

    data = json.loads(json.dumps(check_dataset(dataset).to_dict()))

    assert data["usable"] is False
    assert data["counts"]["train"]["n_normal"] == 2
    assert data["sizes"] == [{"width": 40, "height": 40, "count": 9}]
    assert data["problems"][0]["kind"] == EMPTY_FILE
    assert data["problems"][0]["path"].endswith("defect_003.png")


def test_report_is_the_same_for_any_number_of_workers(dataset):
    write_image(dataset / "defect" / "defect_004.png", 40, mode="L")
    (dataset / "normal" / "normal_002.png").write_bytes(b"")

    one = check_dataset(dataset, workers=1).to_dict()

    assert check_dataset(dataset, workers=4).to_dict() == one


def test_require_usable_returns_the_index_of_a_usable_set(dataset):
    index = require_usable(dataset)

    assert index.samples == read_folder(dataset).samples


def test_require_usable_raises_error_listing_the_bad_files(dataset):
    bad = dataset / "defect" / "defect_005.png"
    bad.write_bytes(b"")

    with pytest.raises(DganError) as err:
        require_usable(dataset)

    message = str(err.value)
    assert "not usable for training (1 errors)" in message
    assert f"{EMPTY_FILE}: {bad}" in message


def test_malformed_labels_csv_error_propagates(dataset):
    (dataset / "labels.csv").write_text("file,split,crack\nnormal/a.png,train,7\n")

    with pytest.raises(DganError, match="class columns must hold 0 or 1"):
        check_dataset(dataset)


def test_directory_in_no_known_layout_raises_error(tmp_path):
    write_image(tmp_path / "a.png", 32)

    with pytest.raises(DganError, match="neither a folder dataset"):
        check_dataset(tmp_path)


@pytest.mark.parametrize(
    ("kwargs", "expected"), [({"min_size": 0}, "min_size"), ({"workers": 0}, "workers")]
)
def test_invalid_arguments_raise_error(dataset, kwargs, expected):
    with pytest.raises(DganError, match=expected):
        check_dataset(dataset, **kwargs)
