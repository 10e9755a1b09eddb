"""benchmarks/report.py at a tiny size: the same code path as the full miniature tables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_report_writes_its_tables_search_and_speed_and_a_rerun_trains_nothing(tmp_path):
    out = tmp_path / "report"
    args = "--iterations 4 --seeds 1 --epochs 1 --n 8 --eval-n 8 --realism-steps 2 --n-normal 120"
    args += " --n-defect 60"
    study = ["gan.train.iterations=2", "gan.log.eval_every=2", "gan.log.sample_every=2",
             "gan.log.log_every=2", "grace_iterations=2", "gan.eval.n=4",
             "gan.eval.realism_n=8", "gan.eval.realism_steps=2"]  # fmt: skip
    args = [*args.split(), "--rows", "stargan,full", "--out", str(out), "--tune-trials", "2",
            *[x for kv in study for x in ("--tune-set", kv)], "--no-screenshot", "--settle", "0",
            "--speed", "tiny"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "report.py"), *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (out / "README.md").read_text()
    assert "## Table 2: the ablation" in text and "## Table 3: inspection" in text
    assert text.count("`python benchmarks/report.py --iterations 4") == 1  # the run that worked
    assert re.search(r"at commit [0-9a-f]{7,}(\+changes)?\)", text)  # the code, so the presets
    number = r"\d\.\d{4}(?! ±)"  # one seed: the value alone, no spread
    for row in ("stargan", "full"):
        assert re.search(rf"\| {row} \| {number} \| {number} \|", text), row
        assert (out / "grids" / f"{row}.png").stat().st_size > 0
    for source in ("real only", "+ StarGAN", "+ Defect-GAN"):
        assert re.search(rf"\| {re.escape(source)} \| (no|yes) \| {number} \| {number} \|", text)
    assert (out / "table2.png").stat().st_size > 0
    # the search: the study's ranked table, its base trial, and which of them won
    search = text.split("## The search", 1)[1].split("## Speed", 1)[0]
    assert "the base config" in search and "rank" in search
    assert "ranked first" in search or "beat the preset's values" in search
    # speed: each benchmark of the tiny set (all but Ray Tune's) ran, its output pasted, none failed
    speed = text.split("## Speed", 1)[1]
    for figure in ("official stargan", "ratio end-to-end / bare forward", "submit latency"):
        assert figure in speed.lower(), figure
    assert "It failed" not in speed
    runs = sorted((out / "work" / "runs" / "gan").iterdir())
    assert len(runs) == 2
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted((out / "work" / "runs" / "gan").iterdir()) == runs  # every result was kept


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rows", "stargan,bogus"], "rows must be among stargan, scc"),
        (["--tune-trials", "-1"], "--tune-trials and --settle must be 0 or more"),
        (["--speed", "fast"], "invalid choice: 'fast'"),
        (["--realism-steps", "0"], "--realism-steps must be at least 1"),
    ],
)
def test_bad_report_arguments_exit_2_with_the_reason_and_no_traceback(args, message, tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "report.py"), "--out", str(tmp_path), *args]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "work").exists()  # refused before any work
