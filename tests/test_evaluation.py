"""FID/KID under honest names, cached reference statistics, synthesis quality, `dgan eval fid`,
`dgan eval synth`, and periodic evaluation during `dgan train gan`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_INSPECTOR, tiny_gan_config
from fakes import fake_defect_labels, write_image
from typer.testing import CliRunner

from dgan.data import CODEBRIM_CLASSES, Sample
from dgan.data.folder import write_labels
from dgan.errors import DganError
from dgan.evaluation.synth_report import wilson_interval
from dgan.events import ConsoleEvents, Events
from dgan.metrics import synthesis
from dgan.metrics.fid import (
    FeatureSet,
    cache_path,
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    polynomial_mmd2,
)

TINY_INSPECTOR_RUN = [*TINY_INSPECTOR, "train.epochs=1", "log.log_model=false"]


def make_dataset(root: Path, size: int = 32, layout: dict | None = None, labels_of=None) -> Path:
    """Train/val/test normals and defects, plus a held-out surface family in split transfer;
    `layout`: split -> (normals, defects); `labels_of(k)`: defect k's labels in each split."""
    labels_of = labels_of or (lambda k: fake_defect_labels(k, 5))
    samples = []
    layout = layout or {"train": (8, 8), "val": (2, 3), "test": (2, 3), "transfer": (4, 4)}
    seed = 0
    for split, (n_normal, n_defect) in layout.items():
        for i in range(n_normal):
            path = write_image(root / "normal" / f"{split}_{i:02d}.png", size, seed=seed)
            samples.append(Sample(path, (0,) * 5, split, family=split))
            seed += 1
        for k in range(n_defect):
            path = write_image(root / "defect" / f"{split}_{k:02d}.png", size, seed=seed)
            samples.append(Sample(path, labels_of(k), split, family=split))
            seed += 1
    write_labels(root, CODEBRIM_CLASSES, samples)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """A tiny generator and a tiny inspector trained on the same small set (seconds)."""
    from dgan.config import load_config
    from dgan.train.gan import run_gan
    from dgan.train.inspector import run_inspector

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    data = make_dataset(root / "data")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = [f"log.run_root={root / 'runs'}", f"log.tracking_uri={uri}"]
    gan = run_gan(tiny_gan_config(data, "train.iterations=5", *common), quiet=True).run_dir
    config = load_config("inspector", [], [*TINY_INSPECTOR_RUN, f"data.root={data}", *common])
    inspector = run_inspector(config, quiet=True, check_data=False).run_dir
    yield SimpleNamespace(root=root, data=data, uri=uri, gan=gan, inspector=inspector)
    torch.set_num_threads(threads)


def invoke(*args: str):
    """Run the CLI in this process; returns click's result (exit_code, stdout, stderr)."""
    import cli

    return CliRunner().invoke(cli.app, list(args))


def clean_exit(result) -> bool:
    """A handled exit: a message and an exit code, no traceback."""
    return result.exception is None or isinstance(result.exception, SystemExit)


# ---------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------


def test_feature_statistics_are_the_mean_and_unbiased_covariance():
    features = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [1.0, -2.0], [-1.0, 2.0]])
    mean, cov = feature_statistics(features)
    assert torch.equal(mean, torch.zeros(2, dtype=torch.float64))
    # Sums of squares 4 and 16 over N - 1 = 3; the two coordinates are uncorrelated.
    torch.testing.assert_close(
        cov, torch.tensor([[4 / 3, 0.0], [0.0, 16 / 3]], dtype=torch.float64)
    )


def test_frechet_distance_matches_the_hand_computed_value_for_diagonal_gaussians():
    # |mu1 - mu2|^2 = 1 + 4; traces 5 + 5; sqrt(S1 S2) = diag(2, 2): 5 + 10 - 2 * 4 = 7.
    mu1, mu2 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 2.0])
    s1, s2 = torch.diag(torch.tensor([1.0, 4.0])), torch.diag(torch.tensor([4.0, 1.0]))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(7.0, abs=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    # On tiny features: a shifted copy has the same covariance, so only |shift|^2 = 1 + 4 remains.
    x = torch.tensor([[1.0, 2.0], [-1.0, -2.0], [1.0, -2.0], [-1.0, 2.0]])
    a, b = FeatureSet.from_features(x), FeatureSet.from_features(x + torch.tensor([1.0, 2.0]))
    assert frechet_distance(a.mean, a.cov, b.mean, b.cov) == pytest.approx(5.0, abs=1e-9)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_frechet_distance_and_kid_agree_with_torchmetrics_on_random_features():
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    class Identity(torch.nn.Module):
        num_features = 6

        def forward(self, x):
            return x

    g = torch.Generator().manual_seed(0)
    real = torch.randn(40, 6, generator=g, dtype=torch.float64)
    fake = torch.randn(40, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    fid = FrechetInceptionDistance(feature=Identity(), normalize=True)
    kid = KernelInceptionDistance(feature=Identity(), subsets=1, subset_size=40, normalize=True)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    ours = FeatureSet.from_features(real), FeatureSet.from_features(fake)
    mine = frechet_distance(ours[0].mean, ours[0].cov, ours[1].mean, ours[1].cov)
    assert mine == pytest.approx(float(fid.compute()), rel=1e-6)
    # One subset of all 40 is every pair: the MMD^2 of the whole sets, as ours.
    assert kernel_inception_distance(real, fake)[0] == pytest.approx(
        float(kid.compute()[0]), rel=1e-6
    )


def test_kid_matches_the_hand_computed_unbiased_mmd_on_two_points_per_set():
    # d = 1, k(a, b) = (ab + 1)^3. xx: k(0,1) = 1; yy: k(1,2) = 27; xy: 1, 1, 8, 27 (mean 9.25).
    # MMD^2 = 1 + 27 - 2 * 9.25 = 9.5.
    x, y = torch.tensor([[0.0], [1.0]]), torch.tensor([[1.0], [2.0]])
    assert polynomial_mmd2(x, y) == pytest.approx(9.5)
    assert kernel_inception_distance(x, y) == (pytest.approx(9.5), 0.0)


def test_too_few_images_for_fid_or_kid_says_how_many_are_needed_and_given():
    one = FeatureSet.from_features(torch.zeros(2, 3))
    with pytest.raises(DganError, match="needs at least 2 images in each set, got 1"):
        kernel_inception_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(DganError, match="needs at least 2 images, got 1"):
        feature_statistics(torch.zeros(1, 3))
    assert one.n == 2


# ---------------------------------------------------------------------------------------------
# Reference statistics cache
# ---------------------------------------------------------------------------------------------


class MeanColour(torch.nn.Module):
    """A cheap extractor with a name and a weights hash, as the real ones have."""

    name, weights_hash, num_features = "mean-colour", "none", 3

    def forward(self, images):
        return images.mean(dim=(2, 3))


def test_reference_statistics_are_cached_atomically_and_reused_without_reading_images(tmp_path):
    from dgan.evaluation.measure import reference_features

    files = [write_image(tmp_path / "real" / f"{i}.png", 16, seed=i) for i in range(6)]
    cache = tmp_path / "cache"
    first, path, reused = reference_features(files, MeanColour(), 16, cache, 4, "cpu")
    assert not reused and path.parent == cache and path.suffix == ".npz"
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temp file left behind
    stamp = path.stat().st_mtime_ns
    for f in files:  # same sizes, unreadable content: recomputing would fail
        f.write_bytes(b"\0" * f.stat().st_size)
    second, again, reused = reference_features(files, MeanColour(), 16, cache, 4, "cpu")
    assert reused and again == path and path.stat().st_mtime_ns == stamp
    assert torch.equal(first.features, second.features) and torch.equal(first.cov, second.cov)
    # The key follows the file list, sizes, extractor, weights and resolution.
    assert cache_path(cache, files[:5], "mean-colour", "none", 16) != path
    assert cache_path(cache, files, "mean-colour", "other", 16) != path
    assert cache_path(cache, files, "mean-colour", "none", 32) != path
    files[0].write_bytes(b"\0" * (files[0].stat().st_size + 1))
    assert cache_path(cache, files, "mean-colour", "none", 16) != path


# ---------------------------------------------------------------------------------------------
# Extractors
# ---------------------------------------------------------------------------------------------


def test_inception_weights_with_a_wrong_checksum_or_missing_are_refused(tmp_path):
    from dgan.metrics.features import INCEPTION_SHA256, InceptionFeatures

    wrong = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    wrong.write_bytes(b"not the network")
    with pytest.raises(DganError, match=f"expected {INCEPTION_SHA256}") as err:
        InceptionFeatures(wrong)
    assert hashlib.sha256(b"not the network").hexdigest() in str(err.value)
    assert err.value.exit_code == 2
    with pytest.raises(DganError, match="no such file"):
        InceptionFeatures(tmp_path / "absent.pth")


def test_standard_inception_path_runs_on_a_verified_file_of_the_same_layout(tmp_path):
    """No real weights here: a randomly initialised Inception-v3 of the same layout, verified
    against its own checksum, goes through the same code (bytes, weights-only check, 299 px)."""
    from torchvision.models import inception_v3

    from dgan.metrics.features import InceptionFeatures

    state = inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    path = tmp_path / "inception.pth"
    torch.save(state.state_dict(), path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    extractor = InceptionFeatures(path, expected_sha256=digest)
    features = extractor(torch.rand(2, 3, 16, 16))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert extractor.metric_names == ("fid", "kid") and extractor.weights_hash == digest


# ---------------------------------------------------------------------------------------------
# Synthesis figures
# ---------------------------------------------------------------------------------------------


def test_synthesis_figures_on_hand_made_images():
    normals = -torch.ones(1, 3, 32, 32)
    masks = torch.zeros(1, 1, 32, 32)
    masks[..., 8:16, 8:16] = 1.0
    inside = normals.clone()
    inside[..., 8:16, 8:16] = 1.0  # change 1.0 (in 0-1 units) only under m
    assert synthesis.background_change(normals, inside, masks).item() == 0.0
    assert synthesis.background_area(masks).item() == 1 - 10 * 10 / 1024  # 8x8 grown by 1 px
    assert synthesis.background_change(normals, inside, torch.ones_like(masks)).isnan().all()
    outside = inside.clone()
    outside[..., 0, 0] = 1.0  # one pixel far from the (1-pixel dilated) mask changes fully
    outside_area = 32 * 32 - 10 * 10
    assert synthesis.background_change(normals, outside, masks).item() == pytest.approx(
        1 / outside_area
    )
    assert synthesis.spatial_precision(normals, inside, masks).item() == 1.0
    assert synthesis.spatial_precision(normals, outside, masks).item() == pytest.approx(64 / 65)
    assert synthesis.pairwise_l1(inside, inside).item() == 0.0
    assert synthesis.pairwise_l1(normals, inside).item() == pytest.approx(64 / 1024)
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.9], [0.2, 0.8]])
    asked = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    figures = synthesis.category_control(probs, asked, ["crack", "stain"])
    assert figures == {
        "category_accuracy": pytest.approx(2 / 3),
        "category_accuracy_crack": 1.0,
        "category_accuracy_stain": 1.0,
    }


# ---------------------------------------------------------------------------------------------
# dgan eval fid / dgan eval synth
# ---------------------------------------------------------------------------------------------


def test_eval_fid_without_inception_weights_uses_the_inspector_and_says_so(
    trained, tmp_path, monkeypatch
):
    monkeypatch.delenv("DGAN_INCEPTION_WEIGHTS", raising=False)
    out = tmp_path / "fid.json"
    args = [str(trained.gan), str(trained.data), "--inspector", str(trained.inspector)]
    cache = ["--cache-dir", str(tmp_path / "cache")]
    result = invoke("eval", "fid", *args, *cache, "--json", str(out))
    assert result.exit_code == 0, result.output
    assert "standard FID not computed" in result.output
    assert "fid_inspector" in result.output and "kid_inspector" in result.output
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {"fid_inspector", "kid_inspector", "kid_inspector_std"}
    assert "fid" not in report["metrics"]
    assert report["n_real"] == report["n_synthesized"] == 8  # every real training defect
    assert report["metrics"]["fid_inspector"] > 0
    again = invoke("eval", "fid", *args, *cache, "--json", str(out))
    assert "reused from" in again.output
    assert json.loads(out.read_text())["metrics"] == report["metrics"]  # same inputs, same value


def test_eval_fid_split_real_compares_two_halves_without_a_model(trained, tmp_path):
    out = tmp_path / "floor.json"
    cache = str(tmp_path / "cache")
    result = invoke(
        "eval", "fid", str(trained.data), "--split-real", "--inspector", str(trained.inspector),
        "--cache-dir", cache, "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "two random halves" in result.output and "ideal defect synthesizer" in result.output
    report = json.loads(out.read_text())
    assert report["mode"] == "split-real" and report["n_real"] == report["n_synthesized"] == 4
    assert report["image_size"] == 16  # the inspector's size when no generator fixes one
    assert len(list(Path(cache).glob("*.npz"))) == 2  # both halves are cached


@pytest.mark.parametrize(
    "args,message,code",
    [
        (["{data}"], "expected MODEL DATA (or DATA alone with --split-real)", 2),
        (["{gan}", "{data}"], "no feature extractor: give --inspector SPEC", 2),
        (["{gan}", "{data}", "--inspector", "{inspector}", "--n", "50"],
         "FID/KID at N=50 need 50 real defects in split 'train'", 1),
        (["{data}", "--split-real", "--inspector", "{inspector}", "--n", "5"],
         "--split-real at N=5 needs at least 10 real defects in split 'train'", 1),
        (["{gan}", "{data}", "--inception-weights", "{bad_weights}"], "have SHA-256", 2),
        (["{gan}", "{data}", "--inspector", "{data}/nowhere"], "does not exist", 1),
        (["{gan}", "{data}", "--inspector", "{inspector}", "--split", "holdout"],
         "has no split 'holdout'", 2),
        (["{gan}", "{data}", "--inspector", "{inspector}", "--image-size", "32"],
         "drop --image-size", 2),
    ],
)  # fmt: skip
def test_eval_fid_bad_input_gets_a_message_and_exit_code_without_traceback(
    trained, tmp_path, monkeypatch, args, message, code
):
    monkeypatch.delenv("DGAN_INCEPTION_WEIGHTS", raising=False)
    bad_weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    bad_weights.write_bytes(b"\0" * 64)
    names = {"data": trained.data, "gan": trained.gan, "inspector": trained.inspector}
    filled = [a.format(**names, bad_weights=bad_weights) for a in args]
    result = invoke("eval", "fid", *filled, "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == code, result.output
    assert message in result.output
    assert clean_exit(result), result.exception


def test_eval_synth_reports_every_figure_on_the_split_and_on_the_transfer_family(trained, tmp_path):
    out = tmp_path / "synth.json"
    result = invoke(
        "eval", "synth", str(trained.gan), str(trained.data), "--inspector", str(trained.inspector),
        "--n", "6", "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "category-control accuracy" in result.output and "transfer (N=6)" in result.output
    report = json.loads(out.read_text())
    assert set(report["figures"]) == {"train", "transfer"}
    for split, figures in report["figures"].items():
        assert 0 <= figures["category_accuracy"] <= 1
        assert 0 <= figures["background_area"] <= 1  # m may cover everything after 5 iterations
        assert (figures["background_change"] is None) == (figures["background_area"] == 0)
        assert 0 <= figures["spatial_precision"] <= 1
        assert 0 < figures["spatial_chance"] < 1
        assert figures["diversity_l1"] >= 0
        for name in ("realism_auc", "realism_auc_restored"):
            assert 0 <= figures[name] <= 1, name
        assert 0 <= figures["restored_called_normal"] <= 1
        assert 0 <= figures["real_called_normal"] <= 1
        sets = [k.removeprefix("set_accuracy_") for k in figures if k.startswith("set_accuracy_")]
        assert sets
        for g in sets:
            assert 0 <= figures[f"real_set_accuracy_{g}"] <= 1, g
            for category in g.split("-"):  # each asked category: the share called without it
                assert 0 <= figures[f"set_missed_{category}_{g}"] <= 1, (category, g)
                assert f"    called without {category}" in result.output, result.output
            assert 0 <= figures[f"set_added_{g}"] <= 1, g
        # every defacement is judged in exactly one label set
        assert sum(figures[f"set_size_{g}"] for g in sets) == report["realism_n"][split]
        assert not any(k.startswith(("real_set_missed", "real_set_size")) for k in figures)
    assert "called with a category not asked" in result.output
    assert "its 95% interval (Wilson), of n images" in result.output
    for g in sets:  # the transfer split's last: its interval, of its own n
        low, high = wilson_interval(figures[f"set_accuracy_{g}"], int(figures[f"set_size_{g}"]))
        assert f"{low:.2f}-{high:.2f} of {int(figures[f'set_size_{g}'])}" in result.output
    assert report["n"] == {"train": 6, "transfer": 6}
    assert report["realism_n"] == {"train": 8, "transfer": 4}
    floors = [report["figures"][s]["realism_floor"] for s in ("train", "transfer")]
    assert 0 <= floors[0] <= 1 and floors[1] is None  # transfer's 4 defects are too few for one
    assert "0.5: it cannot tell G's images from real ones" in result.output
    assert "its floor: two halves of the real defects" in result.output
    assert "its ceiling: real normals called defect-free" in result.output
    assert report["realism_repeats"] == 1  # one classifier per test: no spread to print
    assert "realism_auc_std" not in report["figures"]["train"] and "spread" not in result.output


def test_eval_synth_realism_repeats_average_classifier_seeds_and_print_their_spread(
    trained, tmp_path
):
    out = tmp_path / "synth.json"
    result = invoke(
        "eval", "synth", str(trained.gan), str(trained.data), "--n", "4", "--realism-repeats", "2",
        "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "its spread: std over the classifier seeds" in result.output
    assert "each realism figure is the mean of 2 classifier seeds" in result.output
    assert "asked std" not in result.output and "asked restored" not in result.output
    report = json.loads(out.read_text())
    assert report["realism_repeats"] == 2
    train = report["figures"]["train"]
    assert 0 <= train["realism_auc_std"] <= 0.6 and 0 <= train["realism_auc_restored_std"] <= 0.6
    assert 0 <= train["realism_floor_std"] <= 0.6


def test_eval_synth_realism_n_sizes_the_realism_test_on_each_split(trained, tmp_path):
    # two normals for each defect the test uses: train 6 of 10 defects, transfer all 5
    layout = {"train": (12, 10), "val": (2, 3), "test": (2, 3), "transfer": (10, 5)}
    data = make_dataset(tmp_path / "more", layout=layout)
    runs = {}
    for realism_n in (None, "6"):
        out = tmp_path / f"synth-{realism_n}.json"
        extra = ("--realism-n", realism_n) if realism_n else ()
        result = invoke(
            "eval", "synth", str(trained.gan), str(data), "--n", "4", *extra, "--json", str(out)
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        runs[realism_n] = json.loads(out.read_text())["realism_n"]
    assert runs[None] == {"train": 10, "transfer": 5}  # every real defect, by default
    assert runs["6"] == {"train": 6, "transfer": 5}
    assert "realism test sizes (real defects per split): train 6, transfer 5" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--realism-n", "3"), "--realism-n must be at least 4, got 3"),
        (("--realism-n", "8", "--no-realism"), "which --no-realism skips: drop one of them"),
        (("--realism-n", "1000"), "--realism-n 1000 uses 8 real defects of split 'train', and so"),
    ],
    ids=["too-few", "without-the-test", "too-few-normals"],
)
def test_eval_synth_bad_realism_n_gets_a_message_and_exit_2(trained, extra, message):
    result = invoke("eval", "synth", str(trained.gan), str(trained.data), *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert clean_exit(result), result.exception


@pytest.mark.parametrize("option", ["--realism-repeats", "--control-repeats"])
@pytest.mark.parametrize("repeats", ["0", "21"])
def test_eval_synth_bad_repeats_get_a_message_and_exit_2(trained, option, repeats):
    result = invoke("eval", "synth", str(trained.gan), str(trained.data), option, repeats)
    assert result.exit_code == 2, result.output
    assert f"{option} must be between 1 and 20, got {repeats}" in result.output
    assert clean_exit(result), result.exception


@pytest.mark.parametrize(
    ("extra", "missing"),
    [
        ((), "needs --inspector"),
        (("--inspector", "INSPECTOR", "--no-realism"), "drop --no-realism"),
    ],
)
def test_control_repeats_without_an_inspector_or_the_realism_test_are_refused(
    trained, extra, missing
):
    extra = tuple(str(trained.inspector) if a == "INSPECTOR" else a for a in extra)
    result = invoke(
        "eval", "synth", str(trained.gan), str(trained.data), "--control-repeats", "3", *extra
    )
    assert result.exit_code == 2, result.output
    assert "--control-repeats 3 repeats the defacements that the inspector judges" in result.output
    assert missing in result.output
    assert clean_exit(result), result.exception


def test_control_repeats_judge_each_label_set_on_more_defacements_and_leave_realism_alone(
    trained, tmp_path
):
    reports = []
    for k in ("1", "3"):
        out = tmp_path / f"synth-{k}.json"
        result = invoke(
            "eval", "synth", str(trained.gan), str(trained.data), "--inspector",
            str(trained.inspector), "--n", "4", "--split", "train", "--control-repeats", k,
            "--json", str(out),
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        reports.append(json.loads(out.read_text()))
    assert "label sets judged on 3 defacements per real defect" in result.output
    assert (reports[0]["control_repeats"], reports[1]["control_repeats"]) == (1, 3)
    for split, once in reports[0]["figures"].items():
        thrice = reports[1]["figures"][split]
        sets = [k.removeprefix("set_size_") for k in once if k.startswith("set_size_")]
        assert sets
        for g in sets:  # three times the images, each set; the real defects' ceiling unchanged
            assert thrice[f"set_size_{g}"] == 3 * once[f"set_size_{g}"], g
            assert thrice[f"real_set_accuracy_{g}"] == once[f"real_set_accuracy_{g}"], g
        # the realism test and restorations take the first defacement per real defect, as before
        for name in ("realism_auc", "realism_auc_restored", "restored_called_normal"):
            assert thrice[name] == once[name], (split, name)


class PixelJudge:
    """An inspector that calls class c present where pixel (0, c) of the red channel is bright."""

    def features_and_logits(self, images):
        logits = images[:, 0, 0, :2].float() - 0.5
        return logits, logits


def test_control_figures_their_misses_and_ceilings_on_hand_made_images():
    from dgan.evaluation.realism import RealismInputs, _inspector_calls

    def images(*codes):  # each code: the classes pixel (0, c) says are present
        out = torch.zeros(len(codes), 3, 4, 4, dtype=torch.uint8)
        for i, code in enumerate(codes):
            out[i, 0, 0, list(code)] = 255
        return out

    labels = torch.tensor([[1, 0], [1, 0], [1, 1], [1, 1]], dtype=torch.float32)
    inputs = RealismInputs(
        "train", images((0,), (1,), (0, 1), (0, 1)), labels, ["a", "a", "a-b", "a-b"],
        images((), (), (), ()), images((), (), (), (0,)), "hand-made",
    )  # fmt: skip
    fakes, restored = images((0,), (0, 1), (0,), ()), images((1,), (), (), ())
    figures = _inspector_calls(PixelJudge(), [0, 1], fakes, restored, inputs, "cpu")
    assert figures == {
        "set_accuracy_a": 0.5,  # one called exactly "a", one "a" and "b"
        "set_accuracy_a-b": 0.0,  # one called "a" alone, one nothing
        "set_missed_a_a": 0.0,
        "set_added_a": 0.5,  # the "b" not asked
        "set_missed_a_a-b": 0.5,  # the one called nothing
        "set_missed_b_a-b": 1.0,  # neither called "b"
        "set_added_a-b": 0.0,
        "set_size_a": 2.0,
        "set_size_a-b": 2.0,
        "real_set_accuracy_a": 0.5,  # the real "a" that reads "b" is a miss
        "real_set_accuracy_a-b": 1.0,
        "restored_called_normal": 0.75,
        "real_called_normal": 0.75,  # the last real normal reads "a"
    }


def test_wilson_interval_matches_its_closed_form_and_stays_inside_0_and_1():
    low, high = wilson_interval(0.5, 10)  # 5 of 10: 0.2366-0.7634 in every table of it
    assert (round(low, 4), round(high, 4)) == (0.2366, 0.7634)
    low, high = wilson_interval(0.0, 10)  # none of 10: not empty, and no bound below 0
    assert low == 0.0 and round(high, 4) == 0.2775
    low, high = wilson_interval(1.0, 17)
    assert high == 1.0 and round(low, 4) == 0.8157  # n / (n + z^2) at p = 1
    wide, narrow = wilson_interval(0.9, 17), wilson_interval(0.9, 170)
    assert wide[0] < narrow[0] < 0.9 < narrow[1] < wide[1]
    assert all(v != v for v in wilson_interval(0.5, 0))  # no images: no interval (NaN)


def test_control_repeats_count_every_defacement_in_its_label_set():
    from dgan.evaluation.realism import RealismInputs, _inspector_calls

    def images(*codes):
        out = torch.zeros(len(codes), 3, 4, 4, dtype=torch.uint8)
        for i, code in enumerate(codes):
            out[i, 0, 0, list(code)] = 255
        return out

    labels = torch.tensor([[1, 0], [1, 1]], dtype=torch.float32)
    inputs = RealismInputs(
        "train", images((0,), (0, 1)), labels, ["a", "a-b"], images((), ()), images((), ()),
        "hand-made", control_repeats=3,
    )  # fmt: skip
    # three repeats, one after another: [a, a-b], [a, a-b], [a, a-b]
    fakes = images((0,), (0, 1), (0, 1), (0,), (), (0, 1))
    figures = _inspector_calls(PixelJudge(), [0, 1], fakes, images((), ()), inputs, "cpu")
    assert figures["set_size_a"] == 3.0 and figures["set_size_a-b"] == 3.0
    assert figures["set_accuracy_a"] == pytest.approx(1 / 3)  # "a", then "a-b", then nothing
    assert figures["set_added_a"] == pytest.approx(1 / 3)
    assert figures["set_missed_a_a"] == pytest.approx(1 / 3)
    assert figures["set_accuracy_a-b"] == pytest.approx(2 / 3)  # "a-b", "a" alone, "a-b"
    assert figures["set_missed_b_a-b"] == pytest.approx(1 / 3)
    assert figures["real_set_accuracy_a"] == 1.0  # the real defects count once


def test_a_label_sets_own_classifier_sees_that_sets_flaw_and_nothing_in_a_flawless_set():
    from dgan.evaluation.realism import OWN_MIN, RealismInputs, own_set_figures, realism_floors

    assert 4 < OWN_MIN <= 48  # "flawed" and "flawless" get a classifier of their own, "tiny" not
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (100, 3, 16, 16), generator=g, dtype=torch.uint8)
    groups = ["flawed"] * 48 + ["flawless"] * 48 + ["tiny"] * 4
    fakes = real.clone()  # a perfect generator everywhere but on "flawed", which it stripes
    fakes[:48, :, ::4] = (fakes[:48, :, ::4].int() + 40).clamp(0, 255).to(torch.uint8)
    inputs = RealismInputs(
        "train", real, torch.zeros(100, 2), groups, real, real, "own-sets", steps=150,
        by_set=True,
    )  # fmt: skip
    assert set(inputs.own_sets()) == {"flawed", "flawless"}
    figures = own_set_figures(inputs, fakes, seed=0)
    assert figures["realism_own_auc_flawed"] > 0.9  # its own classifier sees the stripes
    assert figures["realism_own_auc_flawless"] == pytest.approx(0.5)  # identical: cannot tell
    assert "realism_own_auc_tiny" not in figures
    floors = realism_floors(inputs, 0, cache_dir=None)
    assert 0.2 < floors["realism_own_floor_flawed"] < 0.8  # two halves of one real set
    inputs.by_set = False
    assert own_set_figures(inputs, fakes, seed=0) == {}


def test_eval_synth_realism_by_set_prints_each_sets_own_test_beside_its_floor(trained, tmp_path):
    # train: 40 defects of the first category, 4 of the second; only the first gets its own test
    layout = {"train": (44, 44), "val": (2, 3), "test": (2, 3), "transfer": (4, 4)}
    data = make_dataset(
        tmp_path / "sets", layout=layout, labels_of=lambda k: (int(k < 40), int(k >= 40), 0, 0, 0)
    )
    first, second = CODEBRIM_CLASSES[:2]
    out = tmp_path / "synth.json"
    result = invoke(
        "eval", "synth", str(trained.gan), str(data), "--n", "4", "--realism-by-set",
        "--json", str(out),
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())["figures"]
    own = sorted(k for s in figures.values() for k in s if k.startswith("realism_own_"))
    assert own == [f"realism_own_auc_{first}", f"realism_own_floor_{first}"]
    assert 0 <= figures["train"][f"realism_own_auc_{first}"] <= 1
    assert 0 <= figures["train"][f"realism_own_floor_{first}"] <= 1
    assert f"realism, {first} alone: a classifier of its own" in result.output
    assert "its floor: two halves of its real defects" in result.output
    assert f"realism, {second} alone" not in result.output  # 4 real defects: too few


def test_real_beside_synth_puts_each_sets_real_defects_above_gs_defacements(trained, tmp_path):
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    from dgan.data import open_dataset
    from dgan.evaluation.inputs import load_images
    from dgan.evaluation.realism import label_set_name

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "real_beside_synth.py"
    out = tmp_path / "sheet.png"

    def run(*args):
        return subprocess.run(
            [sys.executable, str(script), str(trained.gan), "--data", str(trained.data), *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    done = run("--sets", "crack", "spallation", "--per-row", "4", "--scale", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    sheet = np.asarray(Image.open(out))
    size = sheet.shape[1] // (4 * 2)
    assert sheet.shape == ((4 * size + 2) * 2, 4 * size * 2, 3)  # two sets, a white line between
    index = open_dataset(trained.data)
    crack = next(
        s for s in index.select("train", normal=False)
        if label_set_name(s.labels, index.classes) == "crack"
    )  # fmt: skip
    first = load_images([crack.path], size)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(sheet[: 2 * size : 2, : 2 * size : 2], first)  # real, top left
    assert (sheet[4 * size : 4 * size + 4] == 255).all()  # the line between the sets
    missing = run("--sets", "bogus", "--out", str(tmp_path / "none.png"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "has no real defect of label set 'bogus'; its sets: " in missing.stderr
    assert not (tmp_path / "none.png").exists()


def test_eval_synth_realism_by_set_without_the_test_is_refused(trained):
    result = invoke(
        "eval", "synth", str(trained.gan), str(trained.data), "--realism-by-set", "--no-realism"
    )
    assert result.exit_code == 2, result.output
    assert "--realism-by-set adds to the realism test, which --no-realism skips" in result.output
    assert clean_exit(result), result.exception


def test_eval_synth_without_inspector_says_what_it_skips(trained):
    result = invoke(
        "eval", "synth", str(trained.gan), str(trained.data), "--n", "4", "--no-realism"
    )
    assert result.exit_code == 0, result.output
    assert "category-control accuracy needs --inspector" in result.output
    assert "outside the dilated mask" in result.output and "diversity" in result.output
    assert "realism" not in result.output  # --no-realism


# ---------------------------------------------------------------------------------------------
# Periodic evaluation during training
# ---------------------------------------------------------------------------------------------


def test_training_evaluator_uses_the_same_inputs_every_time(trained):
    from accelerate import Accelerator

    from dgan.evaluation.periodic import TrainingEvaluator
    from dgan.tracking.source import load_generator_from, resolve_model

    G, gan_config, classes = load_generator_from(resolve_model(trained.gan, "gan"))
    config = gan_config.model_copy(
        update={
            "eval": gan_config.eval.model_copy(
                update={"n": 6, "inspector": str(trained.inspector)}
            ),
            "log": gan_config.log.model_copy(update={"run_root": trained.root / "runs"}),
        }
    )
    evaluator = TrainingEvaluator(config, classes, Accelerator(cpu=True), Events())
    first, second = evaluator(G), evaluator(G)
    first.pop("eval_seconds"), second.pop("eval_seconds")
    assert first == second
    assert {"fid_inspector", "kid_inspector", "category_accuracy", "diversity_l1"} <= set(first)
    assert "fid_inspector_transfer" in first and "background_area_transfer" in first


def test_more_defacements_paint_each_label_set_again_on_other_normals(trained):
    from dgan.data import open_dataset
    from dgan.data.loader import select_classes
    from dgan.evaluation.realism import make_realism_inputs, more_defacements, synthesize
    from dgan.tracking.source import load_generator_from, resolve_model

    G, gan_config, classes = load_generator_from(resolve_model(trained.gan, "gan"))
    index = open_dataset(trained.data)
    inputs = make_realism_inputs(
        index, "train", select_classes(index, classes), classes, gan_config.data.image_size, 0,
        control_repeats=3,
    )  # fmt: skip
    first, _ = synthesize(G, inputs, 0, 64, "cpu")
    more = more_defacements(G, inputs, 0, 64, "cpu")
    n = inputs.n
    assert more.shape == (2 * n, *first.shape[1:]) and more.dtype == torch.uint8

    def distance(a, b):
        return (a.float() - b.float()).abs().mean()

    # G keeps some of its input after 5 iterations: the first pass is nearer the normals it
    # defaced, and each repeat nearer the other normals it was given (rolled by j * n // 3).
    for j, repeat in enumerate(more.split(n), start=1):
        rolled = inputs.to_deface.roll(j * n // 3, dims=0)
        assert distance(repeat, rolled) < distance(repeat, inputs.to_deface), j
        assert distance(first, inputs.to_deface) < distance(first, rolled), j
    inputs.control_repeats = 1
    assert len(more_defacements(G, inputs, 0, 64, "cpu")) == 0


def test_training_evaluator_judges_label_sets_on_its_control_repeats(trained):
    from accelerate import Accelerator

    from dgan.evaluation.periodic import TrainingEvaluator
    from dgan.tracking.source import load_generator_from, resolve_model

    G, gan_config, classes = load_generator_from(resolve_model(trained.gan, "gan"))

    def metrics(repeats: int) -> dict[str, float]:
        e = gan_config.eval.model_copy(
            update={"n": 4, "realism_n": 8, "realism_steps": 5, "control_repeats": repeats,
                    "inspector": str(trained.inspector)}
        )  # fmt: skip
        log = gan_config.log.model_copy(update={"run_root": trained.root / "runs"})
        config = gan_config.model_copy(update={"eval": e, "log": log})
        return TrainingEvaluator(config, classes, Accelerator(cpu=True), Events())(G)

    one, two = metrics(1), metrics(2)
    sizes = {k: v for k, v in one.items() if k.startswith("set_size_")}
    assert sizes and sum(sizes.values()) == 8  # one per real defect of the test
    assert {k: two[k] for k in sizes} == {k: 2 * v for k, v in sizes.items()}
    assert two["realism_auc"] == one["realism_auc"]


def test_training_evaluator_averages_realism_repeats_and_logs_their_spread(trained):
    from accelerate import Accelerator

    from dgan.evaluation.periodic import TrainingEvaluator
    from dgan.tracking.source import load_generator_from, resolve_model

    G, gan_config, classes = load_generator_from(resolve_model(trained.gan, "gan"))

    def metrics(repeats: int) -> dict[str, float]:
        e = gan_config.eval.model_copy(
            update={"n": 4, "realism_n": 8, "realism_steps": 5, "realism_repeats": repeats}
        )
        log = gan_config.log.model_copy(update={"run_root": trained.root / "runs"})
        config = gan_config.model_copy(update={"eval": e, "log": log})
        return TrainingEvaluator(config, classes, Accelerator(cpu=True), Events())(G)

    one, three = metrics(1), metrics(3)
    assert "realism_auc_std" not in one and "realism_floor_std" not in one
    for key in ("realism_auc_std", "realism_auc_restored_std", "realism_floor_std"):
        assert 0 <= three[key] <= 0.6, key  # NaN (one test) fails this too


def test_a_run_that_names_an_inspector_trains_exactly_as_one_that_does_not(trained, tmp_path):
    # Opening the judge builds the inspector's network, whose throwaway initial weights come from
    # torch's global generator; training's noise and targets must not shift with that.
    from dgan.train.gan import run_gan

    common = ("train.iterations=10", "log.eval_every=10", "eval.n=4", "eval.realism_n=8",
              "eval.realism_steps=2", f"log.tracking_uri={trained.uri}")  # fmt: skip
    plain = run_gan(
        tiny_gan_config(trained.data, *common, f"log.run_root={tmp_path / 'plain'}"), quiet=True
    )
    judged = run_gan(
        tiny_gan_config(
            trained.data, *common, f"log.run_root={tmp_path / 'judged'}",
            f"eval.inspector={trained.inspector}",
        ),
        quiet=True,
    )  # fmt: skip
    assert "category_accuracy" in judged.metrics and "category_accuracy" not in plain.metrics
    a, b = (
        torch.load(r.run_dir / "checkpoints" / "iter-00000010" / "state.pt", weights_only=True)
        for r in (plain, judged)
    )
    for net in ("G", "D"):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), f"{net}.{k}"


def test_training_logs_evaluation_metrics_with_their_step_to_mlflow(trained):
    import mlflow

    from dgan.run import checkpoint as ckpt
    from dgan.train.gan import run_gan

    config = tiny_gan_config(
        trained.data, "train.iterations=10", "log.eval_every=5", "eval.n=6",
        f"eval.inspector={trained.inspector}", f"log.run_root={trained.root / 'runs'}",
        f"log.tracking_uri={trained.uri}",
    )  # fmt: skip
    run_dir = run_gan(config, quiet=True).run_dir
    client = mlflow.MlflowClient(trained.uri)
    run_id = ckpt.read_status(run_dir)["mlflow_run_id"]
    for name in (
        "fid_inspector", "kid_inspector", "category_accuracy", "background_area",
        "spatial_precision", "diversity_l1", "fid_inspector_transfer", "category_accuracy_transfer",
    ):  # fmt: skip
        history = client.get_metric_history(run_id, name)
        assert [m.step for m in history] == [5, 10], name
    assert not client.get_metric_history(run_id, "fid")  # no Inception weights, no plain fid


def test_a_run_asking_for_an_unusable_evaluation_is_refused_before_it_starts(trained, tmp_path):
    from dgan.train.gan import run_gan

    runs = tmp_path / "runs"
    config = tiny_gan_config(
        trained.data, "train.iterations=10", "log.eval_every=5", "eval.n=50",
        f"eval.inspector={trained.inspector}", f"log.run_root={runs}",
    )  # fmt: skip
    with pytest.raises(DganError, match="eval.n=50 needs 50 real training defects"):
        run_gan(config, quiet=True)
    assert not runs.exists() or not any(runs.rglob("status.json"))


def test_inception_weights_named_by_the_environment_are_checked(trained, tmp_path, monkeypatch):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"x")
    monkeypatch.setenv("DGAN_INCEPTION_WEIGHTS", str(bad))
    result = invoke("eval", "fid", str(trained.gan), str(trained.data))
    assert result.exit_code == 2 and "have SHA-256" in result.output
    assert os.environ["DGAN_INCEPTION_WEIGHTS"] == str(bad)


SHARDED_EVALUATION = """
import json, sys
from dgan.config import load_config
from dgan.evaluation.periodic import TrainingEvaluator
from dgan.events import ConsoleEvents
from dgan.models.export import load_generator
from dgan.run.launch import make_accelerator

# The product's accelerator: it closes the gloo group at exit, as every dgan process does.
accelerator = make_accelerator("gan", "no", 2)
G, _, classes = load_generator(sys.argv[2])
config = load_config("gan", [sys.argv[1]])
evaluator = TrainingEvaluator(config, classes, accelerator, ConsoleEvents())
metrics = evaluator(G)
if accelerator.is_main_process:
    print("METRICS " + json.dumps(metrics))
"""


@pytest.mark.slow
def test_evaluation_sharded_over_two_processes_equals_one_process(trained, tmp_path):
    import subprocess
    import sys

    from accelerate import Accelerator

    from dgan.config import to_yaml
    from dgan.evaluation.periodic import TrainingEvaluator
    from dgan.models import build_gan
    from dgan.models.export import save_generator
    from dgan.run.launch import free_port

    # Noise injection off, so that outputs do not depend on how images fall into batches.
    config = tiny_gan_config(
        trained.data, "generator.ani=false", "eval.n=7", f"eval.inspector={trained.inspector}",
        f"log.run_root={tmp_path / 'two'}",
    )  # fmt: skip
    torch.manual_seed(0)
    G, _ = build_gan(config, len(CODEBRIM_CLASSES))
    generator = save_generator(G.eval(), config, list(CODEBRIM_CLASSES), tmp_path / "generator")
    (tmp_path / "config.yaml").write_text(to_yaml(config))
    (tmp_path / "evaluate.py").write_text(SHARDED_EVALUATION)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env |= {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_port()), str(tmp_path / "evaluate.py")]
    result = subprocess.run(
        [*cmd, str(tmp_path / "config.yaml"), str(generator)], env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "computed" in result.stdout  # the references were extracted by the two processes
    line = next(x for x in result.stdout.splitlines() if x.startswith("METRICS "))
    two = json.loads(line.removeprefix("METRICS "))
    single = config.model_copy(
        update={"log": config.log.model_copy(update={"run_root": tmp_path / "one"})}
    )
    one = TrainingEvaluator(single, list(CODEBRIM_CLASSES), Accelerator(cpu=True), ConsoleEvents())(
        G
    )
    one.pop("eval_seconds"), two.pop("eval_seconds")
    assert two.keys() == one.keys() and "fid_inspector" in one and "fid_inspector_transfer" in one
    for k, v in one.items():
        assert two[k] == pytest.approx(v, rel=1e-5, abs=1e-7), k


def test_critic_probe_scores_the_trained_critic_beside_the_realism_test(trained, tmp_path):
    import subprocess
    import sys

    from dgan.evaluation.synth_report import evaluate_synthesis

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "critic_probe.py"

    def run(*args):
        return subprocess.run(
            [sys.executable, str(script), *args], capture_output=True, text=True, timeout=300
        )

    done = run(str(trained.gan), "--data", str(trained.data), "--steps", "20")
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[2:]}
    n, trained_avg, trained_g, fresh_d, cnn = rows["all"]
    assert int(n) == 8  # the train split's real defects
    assert all(0.0 <= float(v) <= 1.0 for v in (trained_avg, trained_g, fresh_d, cnn))
    # Its fresh CNN is the realism test's: the same inputs, halves, defacements and classifier.
    report = evaluate_synthesis(
        str(trained.gan), trained.data, realism_steps=20, cache_dir=tmp_path / "cache"
    )
    figure = report.to_dict()["figures"]["train"]["realism_auc"]
    assert float(cnn) == pytest.approx(figure, abs=6e-4)  # printed to 3 decimals
    exported = run(str(trained.gan / "generator"), "--data", str(trained.data))
    assert exported.returncode == 2 and "Traceback" not in exported.stderr
    assert "holds no training checkpoint" in exported.stderr
    small = run(str(trained.gan), "--n", "2")
    assert small.returncode == 2 and "--n and --min must be at least 4" in small.stderr


def test_eval_synth_realism_steps_train_the_classifier_for_that_many_steps(
    trained, tmp_path, monkeypatch
):
    import json

    from dgan.evaluation.synth_report import evaluate_synthesis

    monkeypatch.chdir(tmp_path)  # the CLI caches floors under runs/ of the working directory
    out = tmp_path / "steps.json"
    args = ("eval", "synth", str(trained.gan), str(trained.data), "--n", "4")
    result = invoke(*args, "--realism-steps", "7", "--json", str(out))
    assert result.exit_code == 0, result.output
    printed = json.loads(out.read_text())["figures"]["train"]
    again = evaluate_synthesis(
        str(trained.gan), trained.data, n=4, realism_steps=7, cache_dir=tmp_path / "cache"
    )
    expected = again.to_dict()["figures"]["train"]
    for key in ("realism_auc", "realism_auc_restored", "realism_floor"):
        assert printed[key] == pytest.approx(expected[key], abs=1e-9), key
    for bad, message in (
        (["--realism-steps", "0"], "--realism-steps must be at least 1, got 0"),
        (["--realism-steps", "7", "--no-realism"], "--realism-steps 7 trains the realism test's"),
    ):
        refused = invoke(*args, *bad)
        assert refused.exit_code == 2, refused.output
        assert message in refused.output
        assert clean_exit(refused), refused.exception
