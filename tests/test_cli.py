"""The `dgan` command: fast help without heavy imports, examples in every help, clean errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "cli", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
    )


def test_help_imports_neither_torch_nor_mlflow_nor_ray():
    code = (
        "import sys, cli\n"
        "try:\n    cli.app(['--help'])\nexcept SystemExit:\n    pass\n"
        "for group in ('data', 'train', 'config', 'jobs', 'tune'):\n"
        "    try:\n        cli.app([group, '--help'])\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'mlflow', 'ray', 'accelerate') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip().endswith("[]"), out.stdout + out.stderr


def _commands() -> list[list[str]]:
    import cli

    found = []
    for group in cli.app.registered_groups:
        for command in group.typer_instance.registered_commands:
            found.append([group.name, command.name or command.callback.__name__])
    for command in cli.app.registered_commands:
        found.append([command.name or command.callback.__name__])
    return found


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_every_command_help_shows_a_real_example(command):
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert f"Example: dgan {' '.join(command)}" in " ".join(result.stdout.split())


def test_data_check_names_bad_files_and_exits_non_zero(tmp_path: Path):
    from fakes import make_folder_dataset

    root = make_folder_dataset(tmp_path / "d", n_normal=4, n_defect=4, size=32)
    victim = next((root / "normal").iterdir())
    victim.write_bytes(b"")
    result = run("data", "check", str(root))
    assert result.returncode == 1
    assert str(victim) in result.stdout or victim.name in result.stdout
    assert "Traceback" not in result.stderr


def test_data_demo_draws_at_the_size_that_training_without_data_draws_by_default(tmp_path: Path):
    # The demo presets train at 32 px; a set drawn larger would be resized and blur its cracks.
    from PIL import Image

    from dgan.data import DEMO_SIZE

    result = run("data", "demo", "--out", str(tmp_path / "out"), "--n-normal", "4",
                 "--n-defect", "4", "--workers", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    images = sorted((tmp_path / "out").glob("*/*.png"))  # normals, defects and their masks
    assert len(images) == 4 + 4 + 4
    assert {Image.open(p).size for p in images} == {(DEMO_SIZE, DEMO_SIZE)} == {(32, 32)}


def test_data_demo_refuses_a_non_empty_output_without_traceback(tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run(
        "data", "demo", "--out", str(tmp_path / "out"), "--n-normal", "4", "--n-defect", "4"
    )
    assert result.returncode != 0
    assert "error:" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_missing_dataset_directory_is_explained(tmp_path: Path):
    result = run("train", "gan", "--data", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.returncode == 1
    assert "does not exist" in result.stderr and "dgan data demo" in result.stderr
    assert "Traceback" not in result.stderr
