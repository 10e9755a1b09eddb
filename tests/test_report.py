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
def test_the_report_writes_both_tables_plots_and_grids_and_a_rerun_trains_nothing(tmp_path):
    out = tmp_path / "report"
    args = "--iterations 4 --seeds 1 --epochs 1 --n 8 --eval-n 8 --n-normal 120 --n-defect 60"
    args = [*args.split(), "--rows", "stargan,full", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, str(REPO / "benchmarks" / "report.py"), *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = (out / "README.md").read_text()
    assert "## Table 2: the ablation" in text and "## Table 3: inspection" in text
    number = r"\d\.\d{4} ± \d\.\d{4}"
    for row in ("stargan", "full"):
        assert re.search(rf"\| {row} \| {number} \| {number} \|", text), row
        assert (out / "grids" / f"{row}.png").stat().st_size > 0
    for source in ("real only", "+ StarGAN", "+ Defect-GAN"):
        assert re.search(rf"\| {re.escape(source)} \| (no|yes) \| {number} \| {number} \|", text)
    assert (out / "table2.png").stat().st_size > 0
    runs = sorted((out / "work" / "runs" / "gan").iterdir())
    assert len(runs) == 2
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted((out / "work" / "runs" / "gan").iterdir()) == runs  # every result was kept
