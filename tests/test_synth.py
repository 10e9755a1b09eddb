"""`dgan synth`: determinism, resumption after SIGKILL and Ctrl-C, control inputs, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_gan_config
from fakes import make_folder_dataset
from PIL import Image

from dgan.config import load_config
from dgan.data import open_dataset
from dgan.data.inspector import read_synthetic
from dgan.errors import DganError
from dgan.events import CollectEvents, Events
from dgan.synth.output import CHUNK
from dgan.synth.run import SynthItems, prepare_job, run_synth

REPO = Path(__file__).resolve().parents[1]
DGAN = [sys.executable, "-m", "cli"]
CLASSES = ["crack", "spallation", "efflorescence", "exposed_bars", "corrosion_stain"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A tiny generator trained a few iterations, logged to MLflow with its model."""
    from dgan.train.gan import run_gan

    base = tmp_path_factory.mktemp("gan")
    data = make_folder_dataset(base / "data", n_normal=12, n_defect=12, size=32)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    config = tiny_gan_config(
        data, "train.iterations=4", f"log.run_root={base / 'runs'}", f"log.tracking_uri={uri}",
        "log.log_model=true",
    )  # fmt: skip
    torch.set_num_threads(1)
    run_dir = run_gan(config, quiet=True).run_dir
    status = json.loads((run_dir / "status.json").read_text())
    return {"run": run_dir, "data": data, "tracking_uri": uri, "model_uri": status["model_uri"]}


def synth_config(trained: dict, out: Path, *extra: str):
    return load_config(
        "synth",
        [],
        [f"generator={trained['run']}", f"out={out}", "num_workers=0", "batch_size=16", *extra],
    )


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def manifest(out: Path) -> list[dict[str, str]]:
    with (out / "manifest.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([*DGAN, *args], cwd=cwd, env=env, capture_output=True, text=True)


def assert_complete(out: Path, n: int, restored: bool = True) -> None:
    """Exactly n images per folder, every PNG whole, and a manifest and labels that match."""
    subdirs = ("defect", "masks", "normal") if restored else ("defect", "masks")
    for sub in subdirs:
        names = sorted(p.name for p in (out / sub).iterdir())
        assert names == [f"{i:08d}.png" for i in range(n)], sub
        for name in names:
            with Image.open(out / sub / name) as img:
                img.load()  # raises on a truncated or corrupt file
    rows = manifest(out)
    assert [int(r["index"]) for r in rows] == list(range(n))
    assert all((out / r["defect"]).is_file() and (out / r["mask"]).is_file() for r in rows)
    index = open_dataset(out)
    assert len(index.select(normal=False)) == n
    assert len(index.select(normal=True)) == (n if restored else 0)
    assert json.loads((out / "synth.json").read_text())["state"] == "finished"


def test_a_set_has_exactly_n_images_masks_restored_normals_and_a_manifest_readers_accept(
    trained, tmp_path, one_thread
):
    out = tmp_path / "synth"
    result = run_synth(synth_config(trained, out, "n=37"), events=Events())
    assert result.metrics["written"] == 37
    assert_complete(out, 37)
    rows = manifest(out)
    assert {r["generator"] for r in rows} == {str((trained["run"] / "generator").resolve())}
    assert all(Path(r["source_normal"]).is_file() for r in rows)
    with Image.open(out / "masks" / "00000000.png") as mask:
        assert mask.mode == "L" and mask.size == (16, 16)
    # The inspector's reader takes the set as synthetic training data, masks included.
    images = read_synthetic(out, CLASSES, check=False)  # 16 px is below the check's minimum
    assert len(images) == 74 and all(img.synthetic for img in images)
    assert all(s.mask is not None for s in open_dataset(out).select(normal=False))


def test_image_i_depends_only_on_seed_and_i_not_on_batch_size(trained, tmp_path, one_thread):
    a, b = tmp_path / "a", tmp_path / "b"
    run_synth(synth_config(trained, a, "n=20", "batch_size=3"), events=Events())
    run_synth(synth_config(trained, b, "n=20", "batch_size=16"), events=Events())
    for sub in ("defect", "masks", "normal"):
        assert files(a / sub) == files(b / sub)
    assert (a / "manifest.csv").read_bytes() == (b / "manifest.csv").read_bytes()
    c = tmp_path / "c"
    run_synth(synth_config(trained, c, "n=20", "seed=1"), events=Events())
    assert files(c / "defect") != files(a / "defect")


@pytest.mark.slow
def test_two_processes_write_the_same_set_as_one(trained, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    n = CHUNK + 40  # two chunks, one per process
    args = ["--generator", str(trained["run"]), "--n", str(n), "--quiet", "--set", "num_workers=0"]
    assert cli("synth", *args, "--out", str(one), cwd=tmp_path).returncode == 0
    result = cli(
        "synth", *args, "--out", str(two), "--gpus", "2", "--batch-size", "24", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "2 processes" in result.stdout  # the main worker's own account
    assert json.loads((two / "result.json").read_text())["metrics"]["processes"] == 2
    assert_complete(two, n)
    for sub in ("defect", "masks", "normal"):
        assert files(one / sub) == files(two / sub)
    assert (one / "manifest.csv").read_bytes() == (two / "manifest.csv").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_at_any_moment_a_rerun_completes_to_exactly_n_images(trained, tmp_path, sig):
    n = CHUNK + 150
    out = tmp_path / "synth"
    args = ["synth", "--generator", str(trained["run"]), "--n", str(n), "--out", str(out)]
    args += ["--batch-size", "8", "--quiet", "--set", "num_workers=0", "--set", "writers=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [*DGAN, *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # A shell's background job (`pytest &`) starts with SIGINT ignored, and children inherit
        # that; Ctrl-C from a terminal finds the default disposition, so give the child that.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        done = len(list((out / "defect").glob("*.png"))) if (out / "defect").is_dir() else 0
        if done >= CHUNK + 20:  # past the first chunk, in the middle of the second
            break
        time.sleep(0.05)
    assert proc.poll() is None, "synthesis finished before it could be interrupted"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130
        assert b"rerun the same command" in err and b"Traceback" not in err
    else:
        assert proc.returncode == -signal.SIGKILL
    # A half-written set is never presented as complete.
    assert not (out / "labels.csv").exists() and not (out / "manifest.csv").exists()
    assert json.loads((out / "synth.json").read_text())["state"] == "running"
    before = len(list((out / "defect").glob("*.png")))
    assert 0 < before < n

    result = subprocess.run([*DGAN, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not list(out.rglob(".tmp-*"))
    assert_complete(out, n)
    rows = manifest(out)
    assert len({r["defect"] for r in rows}) == n  # no duplicates

    clean = tmp_path / "clean"
    cfg = synth_config(trained, clean, f"n={n}", "batch_size=64")
    torch.set_num_threads(1)
    run_synth(cfg, events=Events())
    assert files(out / "defect") == files(clean / "defect")  # resumed == uninterrupted
    assert files(out / "normal") == files(clean / "normal")


def test_rerunning_a_finished_set_writes_nothing(trained, tmp_path, one_thread):
    out = tmp_path / "synth"
    run_synth(synth_config(trained, out, "n=10"), events=Events())
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    said = CollectEvents()
    result = run_synth(synth_config(trained, out, "n=10"), events=said)
    assert result.state == "finished" and result.metrics["written"] == 0
    assert "nothing to do" in said.lines[-1]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("seed=3", "seed"),
        ("n=11", "n"),
        ("classes=[crack]", "labels"),
        ("region=random-box", "region"),
    ],
)
def test_rerunning_into_a_set_with_other_settings_refuses_and_touches_nothing(
    trained, tmp_path, one_thread, change, named
):
    out = tmp_path / "synth"
    run_synth(synth_config(trained, out, "n=10"), events=Events())
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(DganError, match=rf"different synthesized set \(.*{named}: "):
        run_synth(synth_config(trained, out, "n=10", change), events=Events())
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps


def test_a_generator_from_another_run_is_refused_in_the_same_directory(
    trained, tmp_path, one_thread
):
    from dgan.train.gan import run_gan

    out = tmp_path / "synth"
    run_synth(synth_config(trained, out, "n=5"), events=Events())
    config = tiny_gan_config(
        trained["data"], "train.iterations=2", f"log.run_root={tmp_path / 'runs'}",
        f"log.tracking_uri={trained['tracking_uri']}", "train.seed=9",
    )  # fmt: skip
    other = run_gan(config, quiet=True).run_dir
    cfg = synth_config(trained, out, "n=5", f"generator={other}")
    with pytest.raises(DganError, match="different synthesized set.*generator"):
        run_synth(cfg, events=Events())


def test_default_labels_follow_the_training_label_sets(trained, tmp_path, one_thread):
    out = tmp_path / "synth"
    run_synth(synth_config(trained, out, "n=60"), events=Events())
    real = {
        frozenset(c for c, v in zip(CLASSES, s.labels, strict=True) if v)
        for s in open_dataset(trained["data"]).select("train", normal=False)
    }
    drawn = [frozenset(r["labels"].split("+")) for r in manifest(out)]
    assert set(drawn) <= real
    assert len(set(drawn)) > 1  # sampled, not one fixed label
    assert any(len(s) > 1 for s in drawn)  # co-occurrence is kept


def test_classes_fix_the_labels_and_per_class_balances_them(trained, tmp_path, one_thread):
    fixed = tmp_path / "fixed"
    cfg = synth_config(trained, fixed, "n=12", "classes=[crack, efflorescence]")
    run_synth(cfg, events=Events())
    assert {r["labels"] for r in manifest(fixed)} == {"crack+efflorescence"}

    balanced = tmp_path / "balanced"
    run_synth(synth_config(trained, balanced, "per_class=3"), events=Events())
    counts = {}
    for r in manifest(balanced):
        counts[r["labels"]] = counts.get(r["labels"], 0) + 1
    assert counts == {c: 3 for c in CLASSES}

    with pytest.raises(DganError, match="makes 15 images, but --n is 10"):
        run_synth(synth_config(trained, tmp_path / "x", "per_class=3", "n=10"), events=Events())


def test_regions_random_boxes_box_files_and_mask_directories(trained, tmp_path, one_thread):
    boxes = tmp_path / "boxes.csv"
    boxes.write_text("image,x0,y0,x1,y1\n0,0,0,8,8\n0,10,10,16,16\n1,4,4,12,12\n")
    cfg = synth_config(trained, tmp_path / "b", "n=4", "region=boxes", f"region_path={boxes}")
    job = prepare_job(cfg)
    items = SynthItems(job)
    first = items[0]["region"][0].numpy()
    assert first[:8, :8].all() and first[10:, 10:].all() and first.sum() == 64 + 36
    assert items[1]["region"][0].numpy().sum() == 64 and np.array_equal(
        items[2]["region"], items[0]["region"]
    )
    run_synth(cfg, events=Events())
    assert [r["region"] for r in manifest(tmp_path / "b")][:2] == [
        "boxes:0,0,8,8;10,10,16,16",
        "boxes:4,4,12,12",
    ]

    random_job = prepare_job(synth_config(trained, tmp_path / "r", "n=6", "region=random-box"))
    regions = [SynthItems(random_job)[i]["region"][0].numpy() for i in range(6)]
    assert all(0 < r.sum() < 256 for r in regions) and len({r.tobytes() for r in regions}) > 1

    masks = tmp_path / "masks"
    masks.mkdir()
    ring = np.zeros((32, 32), np.uint8)
    ring[8:24, 8:24] = 255
    Image.fromarray(ring).save(masks / "a.png")
    mask_job = prepare_job(
        synth_config(trained, tmp_path / "m", "n=2", "region=masks", f"region_path={masks}")
    )
    region = SynthItems(mask_job)[1]["region"][0].numpy()  # resized to the generator's 16 px
    assert region[4:12, 4:12].all() and region.sum() == 64


def test_an_mlflow_model_uri_gives_the_same_set_as_the_run_directory(
    trained, tmp_path, one_thread, monkeypatch
):
    monkeypatch.setenv("DGAN_MODEL_CACHE", str(tmp_path / "cache"))
    by_run = tmp_path / "run"
    run_synth(synth_config(trained, by_run, "n=6"), events=Events())
    by_uri = tmp_path / "uri"
    cfg = synth_config(
        trained, by_uri, "n=6", f"generator={trained['model_uri']}",
        f"tracking_uri={trained['tracking_uri']}",
    )  # fmt: skip
    run_synth(cfg, events=Events())
    assert files(by_run / "defect") == files(by_uri / "defect")
    assert {r["generator"] for r in manifest(by_uri)} == {trained["model_uri"]}


def test_bad_input_gets_a_message_a_non_zero_exit_and_no_partial_set(trained, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    run = str(trained["run"])
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_boxes = tmp_path / "boxes.csv"
    bad_boxes.write_text("x0,y0,x1,y1\n0,0,8,8\n4,4,40,12\n")
    cases = [
        (["--n", "0"], "--n must be at least 1"),
        (["--n", "-5"], "--n must be at least 1"),
        (["--generator", "models:/no-such-model@champion", "--tracking-uri",
          trained["tracking_uri"]], "no registered model 'no-such-model'"),
        (["--generator", str(tmp_path / "nowhere")], "does not exist"),
        (["--classes", "crack,rust"], "the generator does not know rust"),
        (["--normals", str(empty)], "has no normal images"),
        (["--region", f"boxes:{bad_boxes}"], "boxes.csv:3: box (4, 4, 40, 12) is outside"),
        (["--region", "circle"], "use full, random-box, boxes:FILE.csv or masks:DIR"),
        (["--region", f"masks:{empty}"], "has no mask images"),
        (["--per-class", "0"], "--per-class must be at least 1"),
    ]  # fmt: skip
    for k, (args, message) in enumerate(cases):
        out = tmp_path / f"out{k}"
        full = ["synth", "--n", "4", "--generator", run, *args, "--out", str(out), "--quiet"]
        result = CliRunner().invoke(app, full)
        assert result.exit_code not in (0, None), args
        assert message in result.output, (args, result.output)
        assert not isinstance(result.exception, Exception) or isinstance(
            result.exception, SystemExit
        ), result.exception  # a clean exit, never an uncaught error
        assert not (out / "labels.csv").exists()
    # And from a real process: the message, exit code 2, no traceback.
    result = cli("synth", "--generator", run, "--n", "0", cwd=tmp_path)
    assert result.returncode == 2 and "--n must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr
