"""Multi-process training: 2 processes over gloo equal 1 process with the same global batch."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gan_config

from dgan.run import checkpoint as ckpt
from dgan.train.gan import run_gan


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
    a = torch.load(single / "checkpoints" / "iter-00000006" / "state.pt", weights_only=True)
    b = torch.load(double / "checkpoints" / "iter-00000006" / "state.pt", weights_only=True)
    for net in ("G", "D", "G_ema"):
        for k, v in a[net].items():
            torch.testing.assert_close(b[net][k], v, rtol=1e-4, atol=1e-5, msg=f"{net}.{k}")
    # Adam's update is blind to a uniform gradient scale; its moments are not: gradients summed
    # over processes instead of averaged would double exp_avg.
    for opt in ("opt_G", "opt_D"):
        for param, moments in a[opt]["state"].items():
            for name in ("exp_avg", "exp_avg_sq"):
                one, two = moments[name], b[opt]["state"][param][name]
                where = f"{opt}[{param}].{name}"
                assert two.norm() / one.norm() == pytest.approx(1.0, abs=1e-3), where
                scale = one.abs().max().item()
                torch.testing.assert_close(two, one, rtol=1e-3, atol=1e-3 * scale, msg=where)
    assert a["iteration"] == b["iteration"] == 6


@pytest.mark.slow
def test_cli_under_torchrun_runs_one_job_across_two_processes(tiny_folder, workdir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import TINY_GAN

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "ACCELERATE_USE_CPU": "1"}
    sets = [f"--set={s}" for s in (*TINY_GAN, "train.iterations=4")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    from dgan.run.launch import free_port

    cmd += [
        "--master_port",
        str(free_port()),
        "-m",
        "cli",
        "train",
        "gan",
        "--data",
        str(tiny_folder),
        "--quiet",
    ]
    result = subprocess.run([*cmd, *sets], cwd=workdir, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((workdir / "runs" / "gan").iterdir())
    assert len(runs) == 1  # the main process made the run directory, the other joined it
    assert result.stdout.count("run directory:") == 1
    final = runs[0] / "checkpoints" / "iter-00000004"
    assert {p.name for p in final.iterdir()} == {"state.pt", "rng-0.pt", "rng-1.pt"}
    assert ckpt.read_status(runs[0])["state"] == "finished"
