"""Multi-process training: 2 processes over gloo equal 1 process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_GAN, assert_same_training_state, tiny_gan_config

from dgan.run import checkpoint as ckpt
from dgan.run.launch import free_port
from dgan.train.gan import run_gan

LAYERED = ("generator.label_sets=layered", "generator.layers=[[spallation, exposed_bars]]")


@pytest.mark.slow
def test_two_process_run_equals_one_process_run_of_the_same_global_batch(tiny_folder, workdir):
    # Noise injection off: it is the one per-process random stream.
    extra = ("generator.ani=false", "train.iterations=6", "log.checkpoint_every=6")
    single = run_gan(
        tiny_gan_config(tiny_folder, *extra), gpus=1, quiet=True, run_name="one"
    ).run_dir
    double = run_gan(
        tiny_gan_config(tiny_folder, *extra), gpus=2, quiet=True, run_name="two"
    ).run_dir
    assert ckpt.read_status(double)["state"] == "finished"
    assert (double / "checkpoints" / "iter-00000006" / "rng-1.pt").is_file()  # two processes ran
    step = Path("checkpoints") / "iter-00000006"
    assert_same_training_state(single / step, double / step)


@pytest.mark.slow
def test_layered_label_sets_train_the_same_in_two_processes_as_in_one(tiny_folder, workdir):
    # G runs three forwards before one backward (two layers, then the cycle), through DDP. One
    # iteration that updates D and G: later Adam steps turn float-order differences between one
    # and two processes into visible ones, with one pass or two alike.
    import torch

    from dgan.data.loader import gan_loader
    from dgan.models.generator import layer_of_categories, split_top_layer
    from dgan.train.gan import load_training_data

    extra = ("generator.ani=false", "train.iterations=1", "train.n_critic=1", "train.seed=1",
             "log.checkpoint_every=1", *LAYERED)  # fmt: skip
    config = tiny_gan_config(tiny_folder, *extra)
    _, classes, stream = load_training_data(config)
    batch = next(iter(gan_loader(stream, 2, 0, 1)))  # the step's two defacements, one per process
    layers = torch.eye(4)[layer_of_categories(classes, config.generator.layers)]
    stacked = split_top_layer(batch["target_labels"], layers, batch["layer_draw"])[2]
    assert stacked.tolist() == [True, False]  # one process paints two layers, the other one
    single = run_gan(config, gpus=1, quiet=True, run_name="one").run_dir
    double = run_gan(config, gpus=2, quiet=True, run_name="two").run_dir
    step = Path("checkpoints") / "iter-00000001"
    assert (double / step / "rng-1.pt").is_file()  # two processes ran
    assert_same_training_state(single / step, double / step)


# The CLI's Typer app run twice in each process under torchrun: one process can run several
# jobs. The handler registered first runs last at exit: it says whether the process group is
# still open after dgan's own exit handler (left open, gloo can abort the process at exit).
CLI_TWICE = """
import atexit, os, sys


def report():
    import torch.distributed as dist

    print(f"rank {os.environ['RANK']}: process group open at exit: {dist.is_initialized()}")


atexit.register(report)
from cli import app

for _ in range(2):
    app(sys.argv[1:], standalone_mode=False)
"""


@pytest.mark.slow
def test_cli_under_torchrun_runs_jobs_across_two_processes_and_closes_its_process_group_at_exit(
    tiny_folder, workdir
):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "ACCELERATE_USE_CPU": "1"}
    sets = [f"--set={s}" for s in (*TINY_GAN, "train.iterations=4")]
    script = workdir / "cli_twice.py"
    script.write_text(CLI_TWICE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += [
        "--master_port", str(free_port()), str(script),
        "train", "gan", "--data", str(tiny_folder), "--quiet",
    ]  # fmt: skip
    result = subprocess.run([*cmd, *sets], cwd=workdir, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((workdir / "runs" / "gan").iterdir())
    assert len(runs) == 2  # each time, the main process made the run directory, the other joined
    assert result.stdout.count("run directory:") == 2
    for run in runs:
        final = run / "checkpoints" / "iter-00000004"
        assert {p.name for p in final.iterdir()} == {"state.pt", "rng-0.pt", "rng-1.pt"}
        assert ckpt.read_status(run)["state"] == "finished"
    for rank in (0, 1):
        assert f"rank {rank}: process group open at exit: False" in result.stdout


SLOW_RANK_SAVE = """
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from dgan.run.checkpoint import save_checkpoint

accelerator = Accelerator(cpu=True)
if accelerator.process_index == 1:  # rank 1 reaches its RNG file a second after rank 0
    get_rng_state = torch.get_rng_state
    torch.get_rng_state = lambda: (time.sleep(1.0), get_rng_state())[1]
final = save_checkpoint(accelerator, Path(sys.argv[1]), 6, {"step": torch.tensor(6)}, keep=3)
print(f"rank {accelerator.process_index}: saved {final.name}")
"""


@pytest.mark.slow
def test_a_checkpoint_is_published_only_after_the_slowest_process_wrote_its_rng_state(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "ACCELERATE_USE_CPU": "1"}
    script = tmp_path / "slow_rank_save.py"
    script.write_text(SLOW_RANK_SAVE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(script), str(tmp_path / "run")]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "run" / "checkpoints" / "iter-00000006"
    assert {p.name for p in final.iterdir()} == {"state.pt", "rng-0.pt", "rng-1.pt"}
    assert not (tmp_path / "run" / "checkpoints" / ".tmp-iter-00000006").exists()
    assert ckpt.load_checkpoint(final, process_index=1)[1] is not None


def test_close_process_group_destroys_an_open_group_and_does_nothing_without_one():
    import torch.distributed as dist

    from dgan.run.launch import close_process_group

    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
        )
        assert dist.is_initialized()
        close_process_group()
        assert not dist.is_initialized()
        close_process_group()  # none open: nothing to do
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
