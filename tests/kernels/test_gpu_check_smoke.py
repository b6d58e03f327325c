"""``make gpu-check`` in its CPU smoke mode: every section of benchmarks/gpu_check.py runs on
tiny shapes with Triton's interpreter, and writes its JSON, Markdown and measured-dispatch
files. The times mean nothing; the accuracy columns do (every sotalign row against the
paper's algorithm)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "cpu-smoke-gpu-check.json").read_text())
    assert (tmp_path / "cpu-smoke-gpu-check.md").read_text().startswith("# gpu-check")
    for section in ("klot", "sinkhorn", "scale"):
        rows = report[section]["rows"]
        sotalign_rows = [row for row in rows if row["provider"].startswith("sotalign")]
        assert sotalign_rows and all("seconds" in row for row in sotalign_rows), sotalign_rows
    for row in report["klot"]["rows"][1:]:
        bound = 2e-3 if row["provider"].endswith(("fp16", "tf32")) else 5e-5
        assert row["grad_rel_error"] < bound and row["value_rel_error"] < 1e-4, row
    precisions = {row["route"]["precision"] for row in report["klot"]["rows"] if "route" in row}
    assert {"fp32", "tf32x3", "fp16x3", "tf32", "fp16"} <= precisions
    crossover = report["crossover"]
    assert crossover["complete"] and crossover["crossover_d"] is not None
    tuning = json.loads((tmp_path / "cpu-smoke-gpu-check-dispatch.json").read_text())
    assert tuning["dense_min_dim"]["cuda"]["value"] == crossover["crossover_d"]
    assert tuning["dense_min_dim"]["cuda"]["provenance"].startswith("smoke")
