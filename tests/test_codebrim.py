"""CODEBRIM read from its published layout, on a fake tree of that layout."""

import pytest
from fakes import make_codebrim_tree, make_folder_dataset, write_metadata

from dgan.data import CODEBRIM_CLASSES, open_dataset
from dgan.data.check import ALL_ZERO_DEFECT, UNLISTED_FILE, check_dataset
from dgan.data.codebrim import is_codebrim_layout, metadata_name, read_codebrim, scan_codebrim
from dgan.errors import DganError


def labels_by_name(index):
    return {s.path.name: s.labels for s in index.samples}


def test_classes_are_the_five_defects_in_metadata_order(tmp_path):
    index = read_codebrim(make_codebrim_tree(tmp_path))

    assert index.layout == "codebrim"
    assert index.classes == CODEBRIM_CLASSES
    assert CODEBRIM_CLASSES == (
        "crack",
        "spallation",
        "efflorescence",
        "exposed_bars",
        "corrosion_stain",
    )


def test_background_child_is_dropped_and_defect_children_map_in_order(tmp_path):
    labels = labels_by_name(read_codebrim(make_codebrim_tree(tmp_path)))

    assert labels["image_0001.png"] == (1, 0, 0, 0, 0)  # Crack
    assert labels["image_0002.png"] == (0, 1, 0, 1, 0)  # Spallation, ExposedBars
    assert labels["image_0005.png"] == (0, 0, 0, 0, 1)  # CorrosionStain
    assert labels["image_0006.png"] == (1, 0, 0, 0, 1)


def test_children_are_matched_by_tag_name_when_reordered(tmp_path):
    root = make_codebrim_tree(tmp_path, defects=[("train", "image_0001.png", (0, 1, 0, 0, 0, 0))])
    xml = root / "metadata" / "defects.xml"
    text = xml.read_text()
    # Move CorrosionStain (0) in front of Crack (1): the labels must not change.
    text = text.replace("<CorrosionStain>0</CorrosionStain>", "")
    text = text.replace("<Crack>", "<CorrosionStain>0</CorrosionStain><Crack>")
    xml.write_text(text)

    assert labels_by_name(read_codebrim(root))["image_0001.png"] == (1, 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("file_name", "entry"),
    [
        ("image_0001_-_crop3.png", "image_0001.png"),
        ("image_0000470_crop_0000001_-_2.png", "image_0000470_crop_0000001.png"),
        ("image_0001.png_-_crop3.png", "image_0001.png"),
        ("image_0001_-_a_-_b.jpg", "image_0001.jpg"),
        ("image_0001.png", "image_0001.png"),
    ],
)
def test_metadata_name_maps_crops_back_to_their_base_image(file_name, entry):
    assert metadata_name(file_name) == entry


def test_crops_take_the_labels_of_their_base_image(tmp_path):
    labels = labels_by_name(read_codebrim(make_codebrim_tree(tmp_path)))

    assert labels["image_0003_-_crop1.png"] == (0, 0, 1, 0, 1)
    assert labels["image_0003_-_crop2.png"] == (0, 0, 1, 0, 1)


def test_exact_entry_wins_over_the_base_image_entry(tmp_path):
    root = make_codebrim_tree(
        tmp_path, defects=[("train", "image_0001_-_c.png", (0, 1, 0, 0, 0, 0))]
    )
    write_metadata(
        root / "metadata" / "defects.xml",
        [("image_0001.png", (0, 1, 0, 0, 0, 0)), ("image_0001_-_c.png", (0, 0, 1, 0, 0, 0))],
    )

    assert labels_by_name(read_codebrim(root))["image_0001_-_c.png"] == (0, 1, 0, 0, 0)


def test_images_under_background_are_normal(tmp_path):
    index = read_codebrim(make_codebrim_tree(tmp_path, n_background=3))

    normals = index.select(normal=True)

    assert len(normals) == 9
    assert all(s.path.parent.name == "background" for s in normals)
    assert all(s.labels == (0, 0, 0, 0, 0) for s in normals)


def test_split_comes_from_the_top_directory(tmp_path):
    index = read_codebrim(make_codebrim_tree(tmp_path, n_background=1))

    assert {s.path.name for s in index.select("val", normal=False)} == {"image_0005.png"}
    assert {s.path.name for s in index.select("test", normal=False)} == {"image_0006.png"}
    assert all(s.path.parent.parent.name == s.split for s in index.samples)
    assert len(index.select("train", normal=False)) == 4


def test_all_zero_defect_is_left_out_and_listed(tmp_path):
    root = make_codebrim_tree(tmp_path)

    scan = scan_codebrim(root)

    assert scan.all_zero == [root / "train" / "defects" / "image_0004.png"]
    assert "image_0004.png" not in labels_by_name(scan.index)


def test_check_reports_all_zero_defect_as_a_warning(tmp_path):
    root = make_codebrim_tree(tmp_path)

    report = check_dataset(root)

    [problem] = [p for p in report.problems if p.kind == ALL_ZERO_DEFECT]
    assert problem.path == root / "train" / "defects" / "image_0004.png"
    assert not problem.fatal
    assert report.usable
    assert str(problem.path) in report.format()


def test_defect_image_missing_from_metadata_is_reported(tmp_path):
    root = make_codebrim_tree(tmp_path, unlisted=[("val", "image_0099_-_x.png")])

    report = check_dataset(root)

    assert scan_codebrim(root).unlisted == [root / "val" / "defects" / "image_0099_-_x.png"]
    [problem] = [p for p in report.problems if p.kind == UNLISTED_FILE]
    assert problem.path.name == "image_0099_-_x.png"
    assert "image_0099.png" in problem.detail
    assert report.usable


def test_layout_is_recognised_by_metadata_and_split_folders(tmp_path):
    assert is_codebrim_layout(make_codebrim_tree(tmp_path / "codebrim"))
    assert not is_codebrim_layout(make_folder_dataset(tmp_path / "folder", 1, 1, 16))
    (tmp_path / "bare" / "metadata").mkdir(parents=True)
    assert not is_codebrim_layout(tmp_path / "bare")


def test_open_dataset_dispatches_to_codebrim(tmp_path):
    root = make_codebrim_tree(tmp_path)

    assert labels_by_name(open_dataset(root)) == labels_by_name(read_codebrim(root))


def test_broken_xml_raises_error_naming_the_file(tmp_path):
    root = make_codebrim_tree(tmp_path)
    xml = root / "metadata" / "defects.xml"
    xml.write_text(xml.read_text()[:-40])

    with pytest.raises(DganError, match="defects.xml is not readable XML"):
        read_codebrim(root)


def test_missing_defects_xml_raises_error(tmp_path):
    root = make_codebrim_tree(tmp_path)
    (root / "metadata" / "defects.xml").unlink()

    with pytest.raises(DganError, match="defects.xml is missing"):
        read_codebrim(root)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ('<Defect name="a.png"><Crack>1</Crack></Defect>', "has 1 children; expected 6"),
        ("<Defect>" + "<x>0</x>" * 6 + "</Defect>", "has no name attribute"),
        ('<Defect name="a.png">' + "<x>2</x>" * 6 + "</Defect>", "must hold 0 or 1"),
    ],
    ids=["too-few-children", "no-name", "label-2"],
)
def test_malformed_entry_raises_error_naming_the_file(tmp_path, entry, expected):
    root = make_codebrim_tree(tmp_path)
    (root / "metadata" / "defects.xml").write_text(f"<Defects>{entry}</Defects>")

    with pytest.raises(DganError, match=expected) as err:
        read_codebrim(root)
    assert "defects.xml" in str(err.value)
