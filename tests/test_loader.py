"""The unpaired training stream: seeded, resumable, and split across processes without overlap."""

from __future__ import annotations

import pytest
import torch

from dgan.data import open_dataset
from dgan.data.loader import UnpairedStream, gan_loader, select_classes, to_unit_range
from dgan.errors import DganError


def stream_of(root, seed=0, flip=True) -> UnpairedStream:
    index = open_dataset(root)
    columns = list(range(len(index.classes)))
    normals = index.select("train", normal=True)
    defects = index.select("train", normal=False)
    return UnpairedStream(normals, defects, columns, 16, flip, seed)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same(a, b) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_two_loaders_with_one_seed_yield_identical_batches(tiny_folder):
    a = take(gan_loader(stream_of(tiny_folder), 4), 5)
    b = take(gan_loader(stream_of(tiny_folder), 4, num_workers=2), 5)
    assert all(same(x, y) for x, y in zip(a, b, strict=True))
    c = take(gan_loader(stream_of(tiny_folder, seed=1), 4), 5)
    assert not all(same(x, y) for x, y in zip(a, c, strict=True))


def test_batches_hold_both_domains_with_labels_and_uint8_images(tiny_folder):
    (batch,) = take(gan_loader(stream_of(tiny_folder), 3), 1)
    assert batch["normal"].shape == batch["defect"].shape == (3, 3, 16, 16)
    assert batch["normal"].dtype == torch.uint8
    assert batch["defect_labels"].shape == batch["target_labels"].shape == (3, 5)
    assert (batch["defect_labels"].sum(1) > 0).all()  # every defect has a category
    assert batch["alpha"].shape == (3, 2)
    x = to_unit_range(batch["normal"])
    assert x.min() >= -1 and x.max() <= 1


def test_processes_split_each_step_and_together_see_the_single_process_batch(tiny_folder):
    whole = take(gan_loader(stream_of(tiny_folder), 4), 3)
    rank0 = take(gan_loader(stream_of(tiny_folder), 4, rank=0, world=2), 3)
    rank1 = take(gan_loader(stream_of(tiny_folder), 4, rank=1, world=2), 3)
    for w, a, b in zip(whole, rank0, rank1, strict=True):
        for k in w:
            assert torch.equal(w[k], torch.cat([a[k], b[k]]))


def test_starting_at_a_step_continues_the_stream_exactly(tiny_folder):
    whole = take(gan_loader(stream_of(tiny_folder), 4), 8)
    resumed = take(gan_loader(stream_of(tiny_folder), 4, start_step=5), 3)
    assert all(same(x, y) for x, y in zip(whole[5:], resumed, strict=True))


def test_stream_passes_over_every_image_each_epoch(tiny_folder):
    stream = stream_of(tiny_folder, flip=False)
    n = len(stream.defects)
    picked = {stream._pick(1, p, n) for p in range(n)}
    assert picked == set(range(n))


def test_global_batch_that_does_not_divide_over_processes_is_refused(tiny_folder):
    with pytest.raises(DganError, match="multiple of 6"):
        gan_loader(stream_of(tiny_folder), 4, rank=0, world=3)


def test_unknown_class_and_missing_domain_are_refused(tiny_folder):
    index = open_dataset(tiny_folder)
    with pytest.raises(DganError, match="unknown category rust"):
        select_classes(index, ["crack", "rust"])
    with pytest.raises(DganError, match="no defect images"):
        UnpairedStream(index.select("train", normal=True), [], [0], 16, True, 0)


@pytest.mark.parametrize("power", [1.0, 0.0])
def test_set_power_draws_real_and_asked_label_sets_by_count_to_that_power(tiny_folder, power):
    index = open_dataset(tiny_folder)
    columns = list(range(len(index.classes)))
    normals, defects = index.select("train", normal=True), index.select("train", normal=False)
    # The stream's defects with one label set made rare: 1 in 9 copies of the list.
    rare = [s for s in defects if s.labels == defects[0].labels][:1]
    common = [s for s in defects if s.labels != defects[0].labels]
    assert common, "the tiny set needs two label sets"
    pool = rare + common * 8
    stream = UnpairedStream(normals, pool, columns, 16, False, 0, set_power=power)
    rows = [tuple(r) for r in stream.labels.tolist()]
    counts = {s: rows.count(s) for s in set(rows)}
    weights = {s: c**power for s, c in counts.items()}
    rare_set = rows[0]
    expected = weights[rare_set] / sum(weights.values())
    n = 2000
    items = [stream[p] for p in range(n)]
    for key in ("target_labels", "defect_labels"):  # what is asked, and the real defect drawn
        drawn = [tuple(item[key].tolist()) for item in items]
        assert set(drawn) == set(rows), key  # only label sets that occur, and every one
        share = drawn.count(rare_set) / n
        assert share == pytest.approx(expected, abs=0.03), key
        if power == 0:  # the same share as any other set, far above its share of the defects
            assert share > 2 * counts[rare_set] / len(pool), key
