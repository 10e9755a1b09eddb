"""The folder format: labels.csv written and read back, and malformed files rejected."""

import re
from pathlib import Path

import pytest
from fakes import make_codebrim_tree, make_folder_dataset, write_image

from dgan.data import CODEBRIM_CLASSES, Sample, open_dataset
from dgan.data.folder import is_folder_layout, read_folder, write_labels
from dgan.errors import DganError

CLASSES = ("crack", "stain")


def write_csv(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "labels.csv").write_text(text)
    return root


def test_write_then_read_returns_the_same_samples(tmp_path):
    samples = [
        Sample(tmp_path / "normal" / "a.png", (0, 0), "train", family="concrete"),
        Sample(Path("defect/b.png"), (1, 0), "val"),
        Sample(tmp_path / "defect" / "c.png", (1, 1), "transfer", family="steel"),
    ]
    write_labels(tmp_path, CLASSES, samples)

    index = read_folder(tmp_path)

    assert index.layout == "folder"
    assert index.classes == CLASSES
    assert [(s.path, s.labels, s.split, s.family) for s in index.samples] == [
        (tmp_path / "normal" / "a.png", (0, 0), "train", "concrete"),
        (tmp_path / "defect" / "b.png", (1, 0), "val", None),
        (tmp_path / "defect" / "c.png", (1, 1), "transfer", "steel"),
    ]


def test_labels_csv_stores_paths_relative_to_root(tmp_path):
    write_labels(tmp_path, CLASSES, [Sample(tmp_path / "normal" / "a.png", (0, 0))])

    rows = (tmp_path / "labels.csv").read_text().splitlines()

    assert rows == ["file,split,family,crack,stain", "normal/a.png,train,,0,0"]


def test_mask_is_attached_when_masks_holds_a_file_of_the_same_name(tmp_path):
    write_labels(
        tmp_path,
        CLASSES,
        [Sample(Path("defect/a.png"), (1, 0)), Sample(Path("defect/b.png"), (0, 1))],
    )
    write_image(tmp_path / "masks" / "a.png", 16, mode="L")

    a, b = read_folder(tmp_path).samples

    assert a.mask == tmp_path / "masks" / "a.png"
    assert b.mask is None


def test_without_split_column_every_image_is_in_train(tmp_path):
    write_csv(tmp_path, "file,crack,stain\nnormal/a.png,0,0\ndefect/b.png,0,1\n")

    index = read_folder(tmp_path)

    assert [s.split for s in index.samples] == ["train", "train"]
    assert index.classes == CLASSES


def test_samples_with_all_zero_labels_are_normal(tmp_path):
    make_folder_dataset(tmp_path, n_normal=3, n_defect=4, size=16)

    index = read_folder(tmp_path)

    assert len(index.select(normal=True)) == 3
    assert len(index.select(normal=False)) == 4
    assert all(s.path.parent.name == "normal" for s in index.select(normal=True))


def test_blank_lines_are_skipped(tmp_path):
    write_csv(tmp_path, "file,split,crack\n\nnormal/a.png,train,0\n\n")

    assert len(read_folder(tmp_path).samples) == 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("file,split,crack\nnormal/a.png,train\n", "labels.csv:2: 2 fields, the header has 3"),
        ("file,split,crack\nnormal/a.png,train,0\nb.png,train,0,1\n", "labels.csv:3: 4 fields"),
        (
            "file,split,crack\ndefect/a.png,train,2\n",
            "labels.csv:2: class columns must hold 0 or 1",
        ),
        ("file,split,crack\ndefect/a.png,train,yes\n", "labels.csv:2: class columns must hold 0"),
        ("file,split,crack\ndefect/a.png,holdout,1\n", "split 'holdout' is not one of train"),
        ("name,crack\na.png,0\n", "must be a header with a 'file' column"),
        ("", "must be a header with a 'file' column"),
        ("file,split,family\na.png,train,\n", "no class columns"),
    ],
    ids=[
        "too-few-fields",
        "too-many-fields",
        "label-2",
        "label-word",
        "unknown-split",
        "no-file-column",
        "empty-file",
        "no-classes",
    ],
)
def test_malformed_labels_csv_raises_error_naming_the_line(tmp_path, text, expected):
    write_csv(tmp_path, text)

    with pytest.raises(DganError, match=re.escape(expected)):
        read_folder(tmp_path)


def test_missing_labels_csv_raises_error_that_describes_the_format(tmp_path):
    with pytest.raises(DganError, match="has no labels.csv") as err:
        read_folder(tmp_path)
    assert "file,split,family" in str(err.value)


def test_is_folder_layout_needs_labels_csv(tmp_path):
    assert not is_folder_layout(tmp_path)
    write_csv(tmp_path, "file,crack\n")
    assert is_folder_layout(tmp_path)


def test_open_dataset_reads_folder_and_codebrim_layouts(tmp_path):
    folder = make_folder_dataset(tmp_path / "folder", n_normal=1, n_defect=1, size=16)
    codebrim = make_codebrim_tree(tmp_path / "codebrim", size=16)

    assert open_dataset(folder).layout == "folder"
    assert open_dataset(codebrim).layout == "codebrim"
    assert open_dataset(codebrim).classes == CODEBRIM_CLASSES


def test_open_dataset_rejects_a_directory_in_neither_layout(tmp_path):
    (tmp_path / "images").mkdir()

    with pytest.raises(DganError, match="neither a folder dataset"):
        open_dataset(tmp_path)


def test_open_dataset_rejects_a_missing_directory(tmp_path):
    with pytest.raises(DganError, match="does not exist"):
        open_dataset(tmp_path / "nowhere")
