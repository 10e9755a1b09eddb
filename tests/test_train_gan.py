"""`dgan train gan`: a run's outputs, exact resume, the divergence guard, Ctrl-C and bad input."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY_GAN, tiny_gan_config

from dgan import losses
from dgan.errors import DganError
from dgan.run import checkpoint as ckpt
from dgan.train.gan import run_gan

DGAN = [sys.executable, "-m", "cli"]
REPO = Path(__file__).resolve().parents[1]


def wait_for_line(stream, wanted, timeout: float) -> str:
    """The first line of `stream` for which `wanted` is true, read on a thread: the test fails
    after `timeout` seconds, or when the stream ends first, instead of hanging."""
    found: queue.Queue = queue.Queue()

    def read() -> None:
        for line in stream:
            if wanted(line):
                found.put(line)
                return
        found.put(None)

    threading.Thread(target=read, daemon=True).start()
    try:
        line = found.get(timeout=timeout)
    except queue.Empty:
        pytest.fail(f"no awaited line within {timeout} s")
    assert line is not None, "the process ended before printing the awaited line"
    return line


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    return {f"{net}.{k}": v for net in ("G", "D", "G_ema") for k, v in state[net].items()}


def test_a_run_writes_config_checkpoints_samples_generator_and_mlflow_metrics(tiny_folder, workdir):
    config = tiny_gan_config(
        tiny_folder, "train.iterations=10", "log.keep_checkpoints=1", "log.log_model=true"
    )
    run_dir = run_gan(config, quiet=True).run_dir
    assert (run_dir / "config.yaml").read_text().count("image_size: 16") == 1
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["iter-00000010"]  # last K=1 kept
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "iter-00000005.png",
        "iter-00000010.png",
    ]
    assert {p.name for p in (run_dir / "generator").iterdir()} == {
        "model.safetensors",
        "config.yaml",
        "classes.json",
    }
    status = ckpt.read_status(run_dir)
    assert status["state"] == "finished" and status["iteration"] == 10

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{Path('mlflow.db').resolve()}")
    run = client.get_run(status["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.n_critic"] == "5"
    assert run.data.params["loss.lambda_sd_cyc"] == "5.0"
    history = client.get_metric_history(run.info.run_id, "g_rec")
    assert [m.step for m in history] == [6, 10]  # G updates at 5 and 10 fall in these windows
    assert {m.key for m in client.get_metric_history(run.info.run_id, "d_gp")}
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"samples"}

    import numpy as np

    model = mlflow.pyfunc.load_model(status["model_uri"])  # loads code + safetensors, no pickle
    out = model.predict({"images": np.zeros((2, 3, 16, 16), np.float32), "labels": np.eye(5)[:2]})
    assert out.shape == (2, 3, 16, 16)


def test_resume_continues_exactly_as_an_uninterrupted_run(tiny_folder, workdir):
    # Noise injection and random target regions on: all randomness must resume exactly.
    extra = ("train.iterations=10", "train.random_region_prob=0.5")
    straight = run_gan(tiny_gan_config(tiny_folder, *extra), quiet=True).run_dir
    config = tiny_gan_config(tiny_folder, *extra, "log.checkpoint_every=3")
    first = run_gan(config, quiet=True, stop_at=5).run_dir
    assert ckpt.read_status(first)["state"] == "paused"
    assert ckpt.checkpoint_iteration(ckpt.list_checkpoints(first)[-1]) == 5
    resumed = run_gan(config, resume=str(first), quiet=True).run_dir
    assert resumed == first
    a = weights(straight / "checkpoints" / "iter-00000010")
    b = weights(resumed / "checkpoints" / "iter-00000010")
    assert ckpt.read_status(resumed)["state"] == "finished"
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_seed_identifies_a_run_whatever_evaluation_and_loader_workers_do(tiny_folder, workdir):
    # Periodic evaluation (realism test, fixed inputs) and a loader process must not touch
    # training's random streams: the same seed gives the same weights, another seed others.
    base = ("train.iterations=10", "train.random_region_prob=0.5", "eval.realism_n=8",
            "eval.realism_steps=2", "eval.n=4")  # fmt: skip
    plain = run_gan(tiny_gan_config(tiny_folder, *base, "log.eval_every=100"), quiet=True)
    busy = tiny_gan_config(tiny_folder, *base, "log.eval_every=3", "data.num_workers=1")
    evaluated = run_gan(busy, quiet=True)
    assert "realism_auc" in evaluated.metrics and "realism_auc" not in plain.metrics
    other = run_gan(tiny_gan_config(tiny_folder, *base, "train.seed=1"), quiet=True)
    runs = (plain, evaluated, other)
    a, b, c = (weights(r.run_dir / "checkpoints" / "iter-00000010") for r in runs)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_non_finite_loss_stops_with_the_iteration_and_term_and_keeps_last_good_checkpoint(
    tiny_folder, workdir, monkeypatch
):
    from dgan import losses

    calls = {"n": 0}
    real = losses.reconstruction_loss

    def poisoned(x, y, weight=None):
        calls["n"] += 1  # the second G update (iteration 10) returns NaN
        return real(x, y, weight) * (float("nan") if calls["n"] >= 2 else 1.0)

    monkeypatch.setattr(losses, "reconstruction_loss", poisoned)
    config = tiny_gan_config(tiny_folder, "train.iterations=12", "log.log_every=100")
    with pytest.raises(DganError, match=r"g_rec became NaN/inf at iteration 10"):
        run_gan(config, quiet=True)
    run_dir = next((workdir / "runs" / "gan").iterdir())
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["iter-00000005"]
    assert ckpt.read_status(run_dir)["state"] == "failed"


def test_incompatible_checkpoint_is_refused_naming_the_differing_keys(tiny_folder, workdir):
    first = run_gan(tiny_gan_config(tiny_folder, "train.iterations=5"), quiet=True).run_dir
    other = tiny_gan_config(tiny_folder, "train.iterations=10", "generator.conv_dim=16")
    with pytest.raises(DganError, match=r"generator.conv_dim: checkpoint 8, now 16"):
        run_gan(other, resume=str(first), quiet=True)


def test_a_checkpoint_from_before_a_config_key_existed_resumes_while_the_key_is_at_its_default(
    tiny_folder, workdir
):
    import json

    import torch

    first = run_gan(tiny_gan_config(tiny_folder, "train.iterations=5"), quiet=True).run_dir
    # Make the checkpoint as a dgan without generator.spade_from would have written it.
    path = first / "checkpoints" / "iter-00000005" / "state.pt"
    state = torch.load(path, weights_only=True)
    saved = json.loads(state["config_json"])
    assert saved.pop("generator.spade_from") == "decoder"
    state["config_json"] = json.dumps(saved)
    state["config_hash"] = "from-an-older-dgan"
    torch.save(state, path)
    steered = tiny_gan_config(tiny_folder, "train.iterations=6", "generator.spade_from=bottleneck")
    with pytest.raises(DganError, match=r"generator.spade_from: checkpoint None, now 'bottleneck'"):
        run_gan(steered, resume=str(first), quiet=True)
    longer = tiny_gan_config(tiny_folder, "train.iterations=6")
    result = run_gan(longer, resume=str(first), quiet=True)
    assert result.state == "finished" and result.step == 6


def test_resume_path_that_is_not_a_checkpoint_is_refused(tiny_folder, workdir):
    (workdir / "junk").mkdir()
    with pytest.raises(DganError, match="not a checkpoint"):
        run_gan(tiny_gan_config(tiny_folder), resume=str(workdir / "junk"), quiet=True)
    with pytest.raises(DganError, match="no run under"):
        run_gan(tiny_gan_config(tiny_folder), resume="latest", quiet=True)


def test_dataset_without_defects_is_refused_before_a_run_directory_exists(tmp_path, workdir):
    from fakes import make_folder_dataset

    root = make_folder_dataset(tmp_path / "normals-only", n_normal=6, n_defect=0, size=32)
    with pytest.raises(DganError, match="defect"):
        run_gan(tiny_gan_config(root), quiet=True)
    assert not (workdir / "runs" / "gan").exists() or not any((workdir / "runs" / "gan").iterdir())


def test_unknown_category_is_refused_naming_the_dataset_classes(tiny_folder, workdir):
    with pytest.raises(DganError, match=r"unknown category rust.*crack, spallation"):
        run_gan(tiny_gan_config(tiny_folder, "data.classes=[crack, rust]"), quiet=True)


@pytest.mark.parametrize(
    "overrides,option",
    [
        (("generator.label_sets=layered", "generator.layers=[[spallation, rust]]"), "layers"),
        (("generator.grain=0.5", "generator.smooth_categories=[rust]"), "smooth_categories"),
    ],
)
def test_a_generator_option_naming_an_unknown_category_is_refused_before_a_run_directory_exists(
    overrides, option, tiny_folder, workdir
):
    config = tiny_gan_config(tiny_folder, *overrides)
    message = rf"generator.{option} names 'rust', which is not among the categories \(crack, sp"
    with pytest.raises(DganError, match=message):
        run_gan(config, quiet=True)
    assert not (workdir / "runs").exists()


def test_a_layered_run_saves_a_generator_that_paints_in_its_layers(tiny_folder, workdir):
    from dgan.models.export import load_generator

    config = tiny_gan_config(tiny_folder, "train.iterations=5", *LAYERED)
    run_dir = run_gan(config, quiet=True).run_dir
    G, saved, classes = load_generator(run_dir / "generator")
    assert saved.generator.label_sets == "layered"
    # spallation and bars one layer, painted first; then crack, efflorescence, corrosion
    assert G.layers.argmax(1).tolist() == [1, 0, 2, 0, 3]
    state = torch.load(ckpt.list_checkpoints(run_dir)[-1] / "state.pt", weights_only=True)
    assert "layers" not in state["G"]  # the checkpoint is that of a joint G


def _cli(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*DGAN, *args], cwd=cwd, env=env, capture_output=True, text=True, **kw)


LAYERED_WITHOUT_LWC = [f"--set=generator.{kv}" for kv in ("label_sets=layered", "lwc=false",
                                                           "sc=false", "grain=0")]  # fmt: skip


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "data.image_size=48"], "must be a power of two"),
        (["--set", "data.image_size=8"], "greater than or equal to 16"),
        (["--set", "train.batch_size=3"], "must be even"),
        (["--set", "train.bogus=1"], "train.bogus: unknown key; allowed here: batch_size"),
        (["--set", "generator.sc=true", "--set", "generator.lwc=false"], "needs generator.lwc"),
        (["--config", "paper", "--set", "generator.layers=[[crack]]"], "but label_sets is joint"),
        (
            LAYERED_WITHOUT_LWC,
            "paints one layer over another with Eq. 4, which needs generator.lwc",
        ),
        (
            ["--set", "generator.grain=0", "--set", "generator.smooth_categories=[crack]"],
            "but generator.grain is 0 (no grain)",
        ),
        (["--config", "nope"], "Presets: demo, paper, table2/full"),
    ],
)
def test_cli_rejects_bad_config_with_exit_2_and_no_traceback(args, message, workdir):
    result = _cli("train", "gan", *args, cwd=workdir)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workdir / "runs").exists()


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(tiny_folder, workdir):
    args = ["train", "gan", "--quiet", "--data", str(tiny_folder), "--config", "paper"]
    args += [f"--set={s}" for s in TINY_GAN] + [
        "--set=train.iterations=100000",
        "--set=log.log_every=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [*DGAN, *args],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:  # wait until training is under way; fail, not hang, when it never says so
        wait_for_line(proc.stdout, lambda line: line.lstrip().startswith("3/"), timeout=120)
    finally:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at iteration" in out
    run_dir = next((workdir / "runs" / "gan").iterdir())
    assert ckpt.read_status(run_dir)["state"] == "interrupted"
    saved = ckpt.list_checkpoints(run_dir)
    assert saved and ckpt.checkpoint_iteration(saved[-1]) >= 3
    result = _cli(
        "train",
        "gan",
        "--quiet",
        "--resume",
        "latest",
        "--set",
        "train.iterations=" + str(ckpt.checkpoint_iteration(saved[-1]) + 2),
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    assert ckpt.read_status(run_dir)["state"] == "finished"
    assert (
        json.loads((run_dir / "status.json").read_text())["iteration"]
        == ckpt.checkpoint_iteration(saved[-1]) + 2
    )


def test_sigterm_to_the_whole_process_group_checkpoints_even_with_loader_workers(
    tiny_folder, workdir
):
    # A queue's cancel and a terminal's Ctrl-C signal the job's whole process group, loader
    # workers included: they must leave the stop to the main process, not crash its loader.
    args = ["train", "gan", "--quiet", "--data", str(tiny_folder), "--config", "paper"]
    args += [f"--set={s}" for s in TINY_GAN] + [
        "--set=train.iterations=100000",
        "--set=log.log_every=1",
        "--set=data.num_workers=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [*DGAN, *args], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for_line(proc.stdout, lambda line: line.lstrip().startswith("3/"), timeout=120)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at iteration" in out
    run_dir = next((workdir / "runs" / "gan").iterdir())
    assert ckpt.read_status(run_dir)["state"] == "interrupted"
    assert ckpt.list_checkpoints(run_dir)


@pytest.mark.parametrize(
    ("switch", "weight"),
    [
        ("discriminator.fine_src_layer=1", "fine_src.weight"),  # the fine D_src head
        ("discriminator.projection=true", "embed.weight"),  # the projection's label embedding
        ("discriminator.minibatch_std=2", "src.weight"),  # D_src reading its run's spread
        ("discriminator.separate_src=true", "src_main.0.weight"),  # D_src's own trunk
        ("discriminator.stem=4", "main.0.weight"),  # the full-resolution stem
    ],
)
def test_optional_discriminator_part_trains_and_reaches_the_checkpoint(
    switch, weight, tiny_folder, workdir
):
    config = tiny_gan_config(tiny_folder, "train.iterations=5", switch)
    run_dir = run_gan(config, quiet=True).run_dir
    trained = weights(ckpt.list_checkpoints(run_dir)[-1])
    torch.manual_seed(config.train.seed)
    from dgan.models import build_gan

    _, D0 = build_gan(config, len(ckpt.read_status(run_dir)["classes"]))
    assert trained[f"D.{weight}"].shape == D0.state_dict()[weight].shape
    assert not torch.equal(trained[f"D.{weight}"], D0.state_dict()[weight])


def test_grain_head_trains_and_reaches_the_checkpoint_and_set_power_the_stream(
    tiny_folder, workdir
):
    from dgan.models import build_gan
    from dgan.train.gan import load_training_data

    config = tiny_gan_config(
        tiny_folder, "train.iterations=5", "generator.grain=0.5", "train.set_power=0"
    )
    assert load_training_data(config)[2].set_power == 0  # the config's draw of label sets
    run_dir = run_gan(config, quiet=True).run_dir
    trained = weights(ckpt.list_checkpoints(run_dir)[-1])
    torch.manual_seed(config.train.seed)
    G0, _ = build_gan(config, len(ckpt.read_status(run_dir)["classes"]))
    initial = G0.state_dict()["to_grain.weight"]
    assert trained["G.to_grain.weight"].shape == initial.shape
    assert not torch.equal(trained["G.to_grain.weight"], initial)


def test_minibatch_std_is_checked_against_each_processs_share_of_the_batch(tiny_folder):
    from dgan.errors import DganError
    from dgan.train.gan import check_minibatch_std

    config = tiny_gan_config(tiny_folder, "train.batch_size=16", "discriminator.minibatch_std=8")
    check_minibatch_std(config, 1)  # 8 of each kind in one process
    with pytest.raises(DganError, match=r"minibatch_std=8 must divide each process's 4 images"):
        check_minibatch_std(config, 2)  # 4 of each kind per process: a run of 8 mixes kinds
    check_minibatch_std(tiny_gan_config(tiny_folder, "train.batch_size=16",
                                        "discriminator.minibatch_std=4"), 2)  # fmt: skip


LAYERED = ("generator.label_sets=layered", "generator.layers=[[spallation, exposed_bars]]")


@pytest.mark.parametrize("layers", [(), LAYERED], ids=["joint", "layered"])
def test_g_iteration_reusing_the_first_pass_equals_running_it_in_each_step(layers, tiny_folder):
    # The training loop runs G's first pass once on G's iterations and hands it to both steps;
    # that must be the very update of running it inside each step (noise off, same batch), with
    # layered label sets too.
    from dgan.data.loader import gan_loader
    from dgan.run.launch import make_accelerator
    from dgan.train.gan import (
        build_nets,
        d_step,
        first_pass,
        g_step,
        load_training_data,
        to_device,
    )

    config = tiny_gan_config(tiny_folder, "generator.ani=false", *layers)
    accelerator = make_accelerator("gan", config.train.mixed_precision, None)
    _, classes, stream = load_training_data(config)
    batch = to_device(next(iter(gan_loader(stream, 2, 0, 1))), accelerator.device)
    if layers:  # a set of two layers, so that the step paints one over the other
        batch["target_labels"][0] = torch.tensor([1.0, 1, 0, 1, 0])
    initial = build_nets(config, classes, accelerator).G_raw.to_foreground.weight.clone()
    results = []
    for shared in (False, True):
        nets = build_nets(config, classes, accelerator)
        first = first_pass(nets, batch, config) if shared else None
        terms = d_step(nets, batch, config, accelerator, first)
        terms |= g_step(nets, batch, config, accelerator, first)
        results.append((terms, nets.G_raw.state_dict(), nets.D_raw.state_dict()))
    (terms_a, g_a, d_a), (terms_b, g_b, d_b) = results
    assert not torch.equal(g_a["to_foreground.weight"], initial)  # G was updated
    for key in ("d_total", "g_total", "g_rec"):
        torch.testing.assert_close(terms_a[key], terms_b[key], rtol=0, atol=1e-6)
    for a, b in ((g_a, g_b), (d_a, d_b)):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def one_batch_and_nets(config):
    """An accelerator, one training batch of 2 + 2 images on its device, and fresh nets: what a
    test of a single D or G step needs."""
    from dgan.data.loader import gan_loader
    from dgan.run.launch import make_accelerator
    from dgan.train.gan import build_nets, load_training_data, to_device

    accelerator = make_accelerator("gan", config.train.mixed_precision, None)
    _, classes, stream = load_training_data(config)
    batch = to_device(next(iter(gan_loader(stream, 2, 0, 1))), accelerator.device)
    return accelerator, batch, build_nets(config, classes, accelerator)


def test_layered_defacement_paints_the_drawn_layer_over_the_rest_of_the_set(tiny_folder):
    # generator.label_sets=layered: d' of a set of two layers or more is G's pass over G's pass,
    # the layer that the batch's layer_draw picks on top; a one-layer set is one pass, and the
    # restorations n' are the joint pass's. The cycle, D and the losses read that composite.
    from dgan.train.gan import first_pass, g_step

    config = tiny_gan_config(tiny_folder, "generator.ani=false", *LAYERED)
    accelerator, batch, nets = one_batch_and_nets(config)
    assert batch["layer_draw"].min() >= 0 and batch["layer_draw"].max() < 1  # the loader's draw
    # crack + spallation + bars (two layers), and spallation + bars alone (one layer)
    batch["target_labels"] = torch.tensor([[1.0, 1, 0, 1, 0], [0, 1, 0, 1, 0]])
    batch["layer_draw"] = torch.tensor([0.2, 0.9])  # layer 0 of [spallation + bars, crack]
    n, d = batch["normal"], batch["defect"]
    first = first_pass(nets, batch, config)
    crack, spall = torch.eye(5)[[0]], torch.tensor([[0.0, 1, 0, 1, 0]])
    with torch.no_grad():
        G = nets.G_raw
        under = G(torch.cat([n, d]), [torch.cat([crack, spall]), torch.zeros(2, 5)])
        over = G(under.image[:1], spall)
        expected = torch.cat([over.image, under.image[1:]])
    torch.testing.assert_close(first.image.detach(), expected)
    union = 1 - (1 - under.defect_mask[:1]) * (1 - over.defect_mask)
    torch.testing.assert_close(first.defect_mask[:1].detach(), union)
    torch.testing.assert_close(first.defect_mask[1:].detach(), under.defect_mask[1:])
    assert not torch.equal(first.image[:1], G(n[:1], batch["target_labels"][:1]).image)
    terms = g_step(nets, batch, config, accelerator, first)
    assert torch.isfinite(terms["g_total"])
    torch.testing.assert_close(terms["mask_mean"].detach(), first.defect_mask[:2].mean().detach())


def test_g_step_asks_restorations_to_score_not_restored_on_ds_extra_logit(tiny_folder):
    # With discriminator.restored_output, Eq. 7 for G also asks D_cls's "restoration" logit to
    # be 0 on the restorations n' (not on the defacements), averaged over the whole batch as
    # the category terms are.
    from dgan.train.gan import first_pass, g_step

    config = tiny_gan_config(
        tiny_folder,
        "generator.ani=false",
        "loss.lambda_cls_restored_d=1",
        "discriminator.restored_output=true",
    )
    accelerator, batch, nets = one_batch_and_nets(config)
    first = first_pass(nets, batch, config)
    zeros = torch.zeros_like(batch["target_labels"])
    with torch.no_grad():
        _, cls = nets.D_raw(first.image, torch.cat([batch["target_labels"], zeros]))
    b, num_classes = zeros.shape
    categories = losses.classification_loss(
        cls[:, :num_classes], torch.cat([batch["target_labels"], zeros])
    )
    restored = cls[b:, num_classes:]
    expected = categories + losses.classification_loss(restored, torch.zeros_like(restored)) / 2
    terms = g_step(nets, batch, config, accelerator, first)
    torch.testing.assert_close(terms["g_cls_f"], expected, rtol=1e-5, atol=1e-6)
    assert terms["g_cls_f"] > categories + 0.1  # the extra logit's term is there


@pytest.mark.parametrize("weight", [0.0, 1.5])
def test_d_step_adds_d_cls_on_defacements_with_every_category_off_at_its_weight(
    weight, tiny_folder
):
    # loss.lambda_cls_fake_d (beyond the paper): D_cls also learns that G's defacements show no
    # real defect. The term is D_cls on d' (not the restorations n') against all-zero labels,
    # before D's update, and d_total carries it at its weight; at 0 it is absent.
    from dgan.train.gan import d_step, first_pass

    config = tiny_gan_config(tiny_folder, "generator.ani=false", f"loss.lambda_cls_fake_d={weight}")
    accelerator, batch, nets = one_batch_and_nets(config)
    with torch.no_grad():
        fakes = first_pass(nets, batch, config).image
        zeros = torch.zeros_like(batch["target_labels"])
        _, cls = nets.D_raw(fakes, torch.cat([batch["target_labels"], zeros]))
    terms = d_step(nets, batch, config, accelerator)
    b = batch["normal"].shape[0]
    expected = losses.fake_classification_loss_d(cls[:b]) if weight else torch.tensor(0.0)
    torch.testing.assert_close(terms["d_cls_fake"], expected, rtol=1e-5, atol=1e-6)
    lw = config.loss
    rest = terms["d_adv"] + lw.lambda_gp * terms["d_gp"] + lw.lambda_cls_r * terms["d_cls_r"]
    torch.testing.assert_close(terms["d_total"] - rest, weight * expected, rtol=1e-4, atol=1e-5)
    assert weight == 0 or expected > 0


@pytest.mark.parametrize(("weight", "extra"), [(0.0, False), (1.5, False), (1.5, True)])
def test_d_step_adds_d_cls_on_restorations_at_its_weight(weight, extra, tiny_folder):
    # loss.lambda_cls_restored_d (beyond the paper): D_cls also learns that G's restorations n'
    # still show the defect they came from (D_cls on n', not the defacements, against the real
    # defects' labels), or with discriminator.restored_output that they are restorations (an
    # extra logit, 0 on the real normals and 1 on n'); before D's update, carried by d_total at
    # its weight; at 0 it is absent (and restored_output needs a weight above 0).
    from dgan.train.gan import d_step, first_pass

    config = tiny_gan_config(
        tiny_folder,
        "generator.ani=false",
        f"loss.lambda_cls_restored_d={weight}",
        f"discriminator.restored_output={str(extra).lower()}",
    )
    accelerator, batch, nets = one_batch_and_nets(config)
    with torch.no_grad():
        fakes = first_pass(nets, batch, config).image
        zeros = torch.zeros_like(batch["target_labels"])
        _, cls = nets.D_raw(fakes, torch.cat([batch["target_labels"], zeros]))
        _, real_cls = nets.D_raw(batch["normal"], zeros)
    terms = d_step(nets, batch, config, accelerator)
    b = batch["normal"].shape[0]
    num_classes = zeros.shape[1]
    assert cls.shape[1] == num_classes + extra
    if not weight:
        expected = torch.tensor(0.0)
    elif extra:
        expected = losses.restored_output_loss_d(real_cls[:, num_classes:], cls[b:, num_classes:])
    else:
        expected = losses.restored_classification_loss_d(cls[b:], batch["defect_labels"])
    torch.testing.assert_close(terms["d_cls_restored"], expected, rtol=1e-5, atol=1e-6)
    lw = config.loss
    rest = terms["d_adv"] + lw.lambda_gp * terms["d_gp"] + lw.lambda_cls_r * terms["d_cls_r"]
    torch.testing.assert_close(terms["d_total"] - rest, weight * expected, rtol=1e-4, atol=1e-5)
    assert weight == 0 or expected > 0


@pytest.mark.parametrize("region", ["image", "outside_mask"])
def test_rec_region_weights_each_pixels_cycle_error_by_what_the_first_pass_left_unpainted(
    region, tiny_folder
):
    # loss.rec_region=outside_mask (beyond the paper): L_rec's error at each pixel of n and d is
    # weighted by 1 - m of the first pass over it (m_d of d', m_n of n'); "image" weighs all alike.
    from dgan.train.gan import first_pass, g_step

    config = tiny_gan_config(tiny_folder, "generator.ani=false", f"loss.rec_region={region}")
    accelerator, batch, nets = one_batch_and_nets(config)
    first = first_pass(nets, batch, config)
    zeros = torch.zeros_like(batch["target_labels"])
    x = torch.cat([batch["normal"], batch["defect"]])
    with torch.no_grad():
        second = nets.G_raw(first.image, torch.cat([zeros, batch["defect_labels"]]))
        error = (x - second.image).abs()
        weighted = (error * (1 - first.defect_mask)).mean()
        plain = error.mean()
    terms = g_step(nets, batch, config, accelerator, first)
    expected = weighted if region == "outside_mask" else plain
    torch.testing.assert_close(terms["g_rec"].detach(), expected, rtol=1e-5, atol=1e-6)
    assert float(weighted) < float(plain)  # m > 0 somewhere: the two differ


@pytest.mark.parametrize("cycle_noise", [True, False])
def test_cycle_noise_switch_decides_whether_the_second_pass_draws_ani_noise(
    cycle_noise, tiny_folder
):
    # generator.cycle_noise=false: n^ and d^ (L_rec's images) come from G without ANI's noise,
    # while the first pass keeps it.
    from dgan.train.gan import first_pass, g_step

    config = tiny_gan_config(tiny_folder, f"generator.cycle_noise={str(cycle_noise).lower()}")
    accelerator, batch, nets = one_batch_and_nets(config)
    with torch.no_grad():
        for injection in nets.G_raw.noise:
            injection.noise_strength.fill_(0.5)  # noise that shows
    first = first_pass(nets, batch, config)
    zeros = torch.zeros_like(batch["target_labels"])
    with torch.no_grad():
        quiet = nets.G_raw(first.image, torch.cat([zeros, batch["defect_labels"]]), noise=False)
        expected = losses.reconstruction_loss(
            torch.cat([batch["normal"], batch["defect"]]), quiet.image
        )
    terms = g_step(nets, batch, config, accelerator, first)
    if cycle_noise:
        assert abs(float(terms["g_rec"].detach()) - float(expected)) > 1e-4
    else:
        torch.testing.assert_close(terms["g_rec"], expected)


def weighted_sum_without_optional_terms(terms, lw):
    """G's Eq. 12 total with the outside-region term, as g_step weights them: g_total less the
    optional terms that are 0 unless their weight is set (g_binary, g_diversity)."""
    return (
        terms["g_adv"]
        + lw.lambda_cls_f * terms["g_cls_f"]
        + lw.lambda_rec * terms["g_rec"]
        + lw.lambda_sd_cyc * terms["g_sd_cyc"]
        + lw.lambda_sd_con * terms["g_sd_con"]
        + lw.lambda_outside * terms["g_outside"]
    )


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_g_step_adds_the_binary_mask_term_on_both_first_pass_maps_at_its_weight(
    weight, tiny_folder
):
    # loss.lambda_binary (beyond the paper): m(1 - m) over m_d and m_n of the first pass, carried
    # by g_total at its weight; at 0 it is absent.
    from dgan.train.gan import first_pass, g_step

    config = tiny_gan_config(tiny_folder, "generator.ani=false", f"loss.lambda_binary={weight}")
    accelerator, batch, nets = one_batch_and_nets(config)
    first = first_pass(nets, batch, config)
    expected = losses.binary_mask_loss(first.defect_mask.detach()) if weight else torch.tensor(0.0)
    terms = g_step(nets, batch, config, accelerator, first)
    torch.testing.assert_close(terms["g_binary"].detach(), expected, rtol=1e-5, atol=1e-6)
    beyond = terms["g_total"] - weighted_sum_without_optional_terms(terms, config.loss)
    torch.testing.assert_close(beyond.detach(), weight * expected, rtol=1e-4, atol=1e-5)
    assert weight == 0 or expected > 0


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_g_step_adds_eq7_on_each_defacements_weakest_asked_category_at_its_weight(
    weight, tiny_folder
):
    # loss.lambda_cls_f_weakest (beyond the paper): Eq. 7 once more on the asked category that
    # D_cls believes least in each defacement d', carried by g_total at its weight.
    from dgan.train.gan import first_pass, g_step

    config = tiny_gan_config(
        tiny_folder, "generator.ani=false", f"loss.lambda_cls_f_weakest={weight}"
    )
    accelerator, batch, nets = one_batch_and_nets(config)
    first = first_pass(nets, batch, config)
    with torch.no_grad():
        _, cls = nets.D_raw(first.image[: batch["normal"].shape[0]].detach(), None)
    c = batch["target_labels"].shape[1]
    expected = losses.weakest_category_loss(cls[:, :c], batch["target_labels"]) if weight else 0.0
    terms = g_step(nets, batch, config, accelerator, first)
    torch.testing.assert_close(
        terms["g_cls_f_weakest"].detach(), torch.as_tensor(expected), rtol=1e-4, atol=1e-5
    )
    beyond = terms["g_total"] - weighted_sum_without_optional_terms(terms, config.loss)
    torch.testing.assert_close(
        beyond.detach(), weight * torch.as_tensor(expected), rtol=1e-4, atol=1e-4
    )
    assert weight == 0 or expected > 0


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_g_step_rewards_defacement_maps_that_differ_between_two_noise_draws(weight, tiny_folder):
    # loss.lambda_diversity (beyond the paper): G defaces the same normals with the same A once
    # more, with a second draw of ANI's noise; g_diversity is -mean min(|m1 - m2|, cap) over the
    # defacements, carried by g_total at its weight. At 0 it is absent.
    from dgan.train.gan import first_pass, g_step

    cap = 1e-3
    config = tiny_gan_config(
        tiny_folder, f"loss.lambda_diversity={weight}", f"loss.diversity_cap={cap}"
    )
    accelerator, batch, nets = one_batch_and_nets(config)
    first = first_pass(nets, batch, config)
    terms = g_step(nets, batch, config, accelerator, first)
    # ANI's strengths start at 0: both draws paint the same map, and the term is exactly 0
    assert terms["g_diversity"].item() == 0.0
    with torch.no_grad():
        for injection in nets.G_raw.noise:
            injection.noise_strength.fill_(0.5)  # noise that shows
    first = first_pass(nets, batch, config)
    terms = g_step(nets, batch, config, accelerator, first)
    # the maps now differ by more than the cap in every image: each counts as the cap
    expected = torch.tensor(-cap if weight else 0.0)
    torch.testing.assert_close(terms["g_diversity"].detach(), expected)
    beyond = terms["g_total"] - weighted_sum_without_optional_terms(terms, config.loss)
    torch.testing.assert_close(beyond.detach(), weight * expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", ["box", "ellipse"])
def test_training_region_shape_reaches_gs_control_map_and_the_outside_region_term(
    shape, tiny_folder
):
    # train.region_shape: every asked region (random_region_prob=1) is the box, or the ellipse
    # inscribed in it, both in A for the defacing pass and in the outside-region term.
    from dgan.models.generator import control_map_from_labels
    from dgan.train.gan import first_pass, g_step, target_region

    config = tiny_gan_config(
        tiny_folder,
        "generator.ani=false",
        "train.random_region_prob=1",
        f"train.region_shape={shape}",
    )
    accelerator, batch, nets = one_batch_and_nets(config)
    n, d, target = batch["normal"], batch["defect"], batch["target_labels"]
    h, w = n.shape[2:]
    where = target_region(batch["region"], h, w, shape)
    box = target_region(batch["region"], h, w, "box")
    assert (where <= box).all() and (box.flatten(1).sum(1) < h * w).all()  # every ask is boxed
    if shape == "ellipse":
        assert where.sum() < box.sum()  # the corners are cut
    else:
        assert torch.equal(where, box)
    first = first_pass(nets, batch, config)
    asked = [control_map_from_labels(target, h, w) * where, torch.zeros_like(target)]
    with torch.no_grad():
        expected = nets.G_raw(torch.cat([n, d]), asked)
    torch.testing.assert_close(first.image.detach(), expected.image)
    outside = losses.outside_region_loss(first.defect_mask[: n.shape[0]].detach(), where)
    terms = g_step(nets, batch, config, accelerator, first)
    torch.testing.assert_close(terms["g_outside"].detach(), outside)
