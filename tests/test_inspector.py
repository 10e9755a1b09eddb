"""The inspector's parts: the GRL and its schedule, CODEBRIM's metrics, the data plan, the model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import make_folder_dataset

from dgan.config import load_config
from dgan.data import Sample
from dgan.data.inspector import (
    EpochBatches,
    InspectionData,
    LabelledImage,
    epoch_order,
    load_inspection_data,
    subsample_defects,
)
from dgan.errors import DganError
from dgan.metrics.classification import InspectionMetrics, multi_target_accuracy
from dgan.models.inspector import (
    _DENSENET_LEGACY,
    build_inspector,
    dann_alpha,
    grad_reverse,
    grl_alpha,
)

# Tiny nets: one torch thread (see conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["model.arch=small", "data.image_size=16"]


# ---------------------------------------------------------------------------------------------
# Gradient reversal and its schedule (Sec. 3.2, Fig. 3)
# ---------------------------------------------------------------------------------------------


def test_gradient_reversal_is_the_identity_forward_and_negates_and_scales_gradients_backward():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    (y * torch.tensor([1.0, 2.0, 4.0])).sum().backward()
    # d/dx of sum(w * x) is w; reversed and scaled: -0.3 * w.
    torch.testing.assert_close(x.grad, torch.tensor([-0.3, -0.6, -1.2]))


def test_source_loss_reaches_the_backbone_reversed_and_the_source_classifier_unchanged():
    config = load_config("inspector", [], SMALL)
    torch.manual_seed(0)
    model = build_inspector(config, num_classes=5, source_head=True)
    images = torch.rand(4, 3, 16, 16)
    grads = {}
    for alpha in (0.0, 0.5):
        model.zero_grad()
        model.train()
        _, source = model(images, alpha)
        source.sum().backward()
        grads[alpha] = {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }
    conv = "backbone.features.0.weight"
    head = "source_classifier.0.weight"
    assert grads[0.0][conv].abs().sum() == 0  # alpha 0: f_src learns, f_theta is untouched
    assert grads[0.5][conv].abs().sum() > 0
    torch.testing.assert_close(grads[0.5][head], grads[0.0][head])  # f_src itself: not reversed

    plain = build_inspector(config, num_classes=5, source_head=True)
    plain.load_state_dict(model.state_dict())
    plain.zero_grad()
    features = plain.backbone((images - plain.mean) / plain.std)
    plain.source_classifier(features).sum().backward()  # the same loss without the GRL
    torch.testing.assert_close(grads[0.5][conv], -0.5 * plain.backbone.features[0].weight.grad)


def test_dann_schedule_rises_from_zero_towards_the_maximum():
    assert dann_alpha(0.0) == 0.0
    assert dann_alpha(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1)  # 0.98661
    assert dann_alpha(1.0) == pytest.approx(0.9999092)
    assert dann_alpha(0.1, max_alpha=2.0) == pytest.approx(2 * (2 / (1 + math.exp(-1)) - 1))
    assert dann_alpha(1.5) == dann_alpha(1.0)  # clamped to the end of training
    constant = load_config("inspector", [], ["model.grl_schedule=constant", "model.grl_alpha=0.3"])
    assert grl_alpha(constant, 0.0) == grl_alpha(constant, 0.7) == 0.3


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def test_multi_target_accuracy_counts_an_image_only_when_every_label_matches():
    probs = torch.tensor(
        [
            [0.9, 0.1, 0.2],  # labels 1 0 0: all match
            [0.9, 0.6, 0.2],  # labels 1 0 0: one extra class fires -> wrong
            [0.2, 0.1, 0.4],  # normal, nothing fires: all match
            [0.7, 0.3, 0.5],  # labels 1 0 1: 0.5 is not above the threshold -> wrong
        ]
    )
    targets = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 0], [1, 0, 1]])
    assert multi_target_accuracy(probs, targets).item() == 0.5

    metrics = InspectionMetrics(["a", "b", "c"])
    metrics.update(torch.logit(probs), targets)  # the metrics take logits
    report = metrics.compute("test")
    assert report.multi_target_accuracy == pytest.approx(0.5)
    assert report.n_images == 4
    a, b, c = (report.per_class[k] for k in "abc")
    assert (a["precision"], a["recall"], a["positives"]) == (1.0, 1.0, 3)
    assert b["precision"] == 0.0  # fired once, never present
    assert b["recall"] is None and b["f1"] is None and b["ap"] is None  # no positives: undefined
    assert (c["precision"], c["recall"], c["f1"]) == (0.0, 0.0, 0.0)
    assert c["ap"] == pytest.approx(1.0)  # the one positive has the highest score of c
    assert report.macro["recall"] == pytest.approx(0.5)  # over a and c only
    logged = report.metrics()
    assert logged["test_multi_target_accuracy"] == pytest.approx(0.5)
    assert "test_f1_a" in logged and "test_f1_b" not in logged


# ---------------------------------------------------------------------------------------------
# Data: subsampling, mixing, epochs
# ---------------------------------------------------------------------------------------------


def test_defect_fraction_keeps_every_normal_and_the_same_few_defects_for_one_seed():
    train = [Sample(Path(f"n{i}"), (0, 0)) for i in range(40)]
    train += [Sample(Path(f"d{i}"), (1, 0)) for i in range(30)]
    kept, n_kept, available = subsample_defects(train, 0.05, seed=3)
    assert (n_kept, available) == (2, 30)
    assert sum(s.is_normal for s in kept) == 40 and len(kept) == 42
    assert subsample_defects(train, 0.05, seed=3)[0] == kept


def test_each_epoch_shows_every_real_image_once_and_synthetic_images_without_repeats():
    n_real, n_synthetic, per_epoch = 5, 7, 5
    first = epoch_order(n_real, n_synthetic, per_epoch, epoch=1, seed=0)
    second = epoch_order(n_real, n_synthetic, per_epoch, epoch=2, seed=0)
    for order in (first, second):
        assert sorted(order[order < n_real]) == list(range(n_real))
        assert (order >= n_real).sum() == per_epoch
    synthetic = np.concatenate([first[first >= n_real], second[second >= n_real]])
    # Epochs 1 and 2 draw 10 synthetic images: a pass over all 7 comes before any repeat.
    assert len(set(synthetic.tolist())) == n_synthetic
    assert np.array_equal(first, epoch_order(n_real, n_synthetic, per_epoch, epoch=1, seed=0))


def test_two_processes_split_each_global_batch_of_one_process():
    images = [LabelledImage(Path(f"{i}"), (0,)) for i in range(10)]
    data = InspectionData(["a"], images, [], images[:1], images[:1], synthetic_per_epoch=0)
    one = list(EpochBatches(data, batch_size=4, first=1, last=2, seed=0))
    rank0 = list(EpochBatches(data, 4, 1, 2, seed=0, rank=0, world=2))
    rank1 = list(EpochBatches(data, 4, 1, 2, seed=0, rank=1, world=2))
    assert len(one) == 6  # 10 images, batch 4: 3 steps per epoch, the last filled up
    assert [a + b for a, b in zip(rank0, rank1, strict=True)] == one
    assert list(EpochBatches(data, 4, 1, 2, seed=0, skip=2)) == one[2:]  # mid-epoch resume


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_codebrim_gives_the_five_defect_classes_and_its_three_splits(tmp_path):
    from fakes import make_codebrim_tree

    from dgan.data import CODEBRIM_CLASSES

    data = load_inspection_data(make_codebrim_tree(tmp_path / "codebrim"), [], 1.0)
    assert data.classes == list(CODEBRIM_CLASSES)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 3)  # all-zero crop left out
    (defect,) = [s for s in data.test if any(s.labels)]
    assert defect.labels == (1, 0, 0, 0, 1)  # image_0006: Crack and CorrosionStain


def test_a_synthetic_set_with_other_class_names_is_refused_naming_them(tmp_path):
    real = make_folder_dataset(tmp_path / "real", 8, 8, 32)
    synthetic = make_folder_dataset(
        tmp_path / "syn", 4, 4, 32, classes=("crack", "rust"), splits=False
    )
    with pytest.raises(DganError, match="missing spallation.*extra rust") as err:
        load_inspection_data(real, [synthetic], 1.0)
    assert str(synthetic) in str(err.value)


def test_an_empty_split_is_refused(tmp_path):
    real = make_folder_dataset(tmp_path / "real", 6, 6, 32, splits=False)  # all in train
    with pytest.raises(DganError, match="val split .* is empty"):
        load_inspection_data(real, [], 1.0)


def test_classes_without_training_positives_are_named(tmp_path):
    real = make_folder_dataset(tmp_path / "real", 8, 12, 32)
    data = load_inspection_data(real, [], 1.0, defect_fraction=0.3)  # 1 defect for 4 normals
    (defect,) = [s for s in data.train if any(s.labels)]
    absent = [c for c, v in zip(data.classes, defect.labels, strict=True) if not v]
    assert 3 <= len(absent) <= 4
    assert data.classes_without_positives() == absent


# ---------------------------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------------------------


def test_pretrained_weights_of_another_architecture_are_refused_naming_the_mismatch(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    config = load_config("inspector", [], [f"model.pretrained={path}"])  # arch resnet34
    with pytest.raises(DganError, match="does not fit model.arch=resnet34") as err:
        build_inspector(config, 5, source_head=False)
    assert "missing keys" in str(err.value) and "resnet18 has 2" in str(err.value)


def test_pretrained_torchvision_weights_load_into_the_backbone_without_their_head(tmp_path):
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet34()
    path = tmp_path / "resnet34.pth"
    torch.save(reference.state_dict(), path)  # with its 1000-class ImageNet head
    model = build_inspector(load_config("inspector", [], [f"model.pretrained={path}"]), 5, False)
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert torch.equal(
        model.backbone.layer4[2].bn2.running_var, reference.layer4[2].bn2.running_var
    )
    assert model.classifier.out_features == 5


def test_asking_for_pretrained_weights_without_a_file_says_nothing_is_downloaded(tmp_path):
    config = load_config("inspector", [], ["model.pretrained=imagenet"])
    with pytest.raises(DganError, match="no such file. Nothing is downloaded") as err:
        build_inspector(config, 5, source_head=False)
    assert "resnet34-b627a593.pth" in str(err.value) and "--pretrained PATH" in str(err.value)


def test_densenet_files_with_legacy_layer_names_are_renamed():
    old = "features.denseblock1.denselayer1.norm.1.weight"
    assert _DENSENET_LEGACY.sub(r"\1\2", old) == "features.denseblock1.denselayer1.norm1.weight"
    kept = "features.denseblock1.denselayer1.norm1.weight"
    assert _DENSENET_LEGACY.sub(r"\1\2", kept) == kept


def test_small_arch_has_no_pretrained_weights():
    with pytest.raises(DganError, match="small has no pretrained weights"):
        load_config("inspector", [], ["model.arch=small", "model.pretrained=x.pth"])


def test_without_grl_the_inspector_has_no_source_classifier():
    model = build_inspector(load_config("inspector", [], SMALL), 5, source_head=False)
    assert model.source_classifier is None
    logits, source = model(torch.rand(2, 3, 16, 16), 0.5)
    assert logits.shape == (2, 5) and source is None
