"""The benchmarks' own code: the device check end to end in its CPU smoke mode, and the
helpers every report relies on (roofline, crossover rule, machine names), against hand-computed
or published figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package lives at the repository root
    sys.path.insert(0, str(ROOT))

from benchmarks import roofline  # noqa: E402
from benchmarks.machine import machine_slug  # noqa: E402
from benchmarks.report import crossover_dim, ot_goals, targets  # noqa: E402

GPU_TESTS = "tests/kernels/test_triton_gpu.py"


def gpu_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))
    )
    command = [sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(out), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_section(tmp_path):
    """Every section runs; the GPU test file is executed (and skips without CUDA); the
    accuracy columns hold (the times mean nothing); the measured dispatch.json is written
    where copying the output folder over the repository puts it."""
    pytest.importorskip("triton")
    run = gpu_check(tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = tmp_path / "benchmarks" / "results"
    (report_path,) = results.glob("smoke-*-gpu-check.json")
    report = json.loads(report_path.read_text())
    assert report_path.with_suffix(".md").read_text().startswith("# GPU check")
    tests = report["tests"]
    assert tests["file"] == GPU_TESTS and (ROOT / GPU_TESTS).is_file()
    assert tests["status"] == "skipped" and any("needs a CUDA GPU" in line for line in tests["summary"]), (
        tests
    )
    for section in ("sinkhorn", "klot", "scale"):
        for case in report[section]["cases"]:
            ours = [row for row in case["rows"] if row["provider"].startswith("sotalign")]
            assert ours and all("seconds" in row for row in ours), ours
    (klot,) = report["klot"]["cases"]
    for row in klot["rows"][1:]:
        bound = 2e-3 if row["provider"].endswith(("fp16", "tf32")) else 5e-5
        assert row["grad_error"] < bound and row["value_error"] < 1e-4, row
    precisions = {row["route"]["precision"] for row in klot["rows"] if "route" in row}
    assert {"fp32", "tf32x3", "fp16x3", "tf32", "fp16"} <= precisions
    crossover = report["crossover"]
    assert crossover["timed_d"] == [8, 16, 32] and crossover["crossover_d"] is not None
    tuning = json.loads((tmp_path / "sotalign" / "ot" / "dispatch.json").read_text())
    assert tuning["dense_min_dim"]["cuda"]["value"] == crossover["crossover_d"]
    assert tuning["dense_min_dim"]["cuda"]["provenance"].startswith("smoke")
    assert (
        tuning["dense_min_dim"]["cpu"]
        == json.loads((ROOT / "sotalign/ot/dispatch.json").read_text())["dense_min_dim"]["cpu"]
    )


@pytest.mark.slow
def test_gpu_check_fails_when_its_tests_fail(tmp_path):
    """A tests section that does not pass makes the check exit 1 and says so in the report."""
    missing = "tests/" + "absent_on_purpose.py"  # a path that must not exist
    run = gpu_check(tmp_path, "--sections", "tests", "--tests", missing)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    (report_path,) = (tmp_path / "benchmarks" / "results").glob("*.json")
    assert json.loads(report_path.read_text())["tests"]["status"].startswith("failed")


def test_roofline_reproduces_design():
    """The roofline gives docs/design.md's 0.72 ms (dense) and 0.56 ms (online fp16) per iteration."""
    n, d = 16384, 512
    dense = roofline.sinkhorn_iteration_bound(n, n, d, "dense", "h100-sxm")
    online = roofline.sinkhorn_iteration_bound(n, n, d, "online", "h100-sxm", "fp16")
    assert round(dense * 1e3, 2) == 0.72 and round(online * 1e3, 2) == 0.56
    assert roofline.best_iteration_bound(n, n, d) == online
    # a KLOT step with d = d* = 512 is bound near 0.11 s
    assert 0.11 <= roofline.klot_step_bound(n, n, d, d, "online", precision="fp16") <= 0.115
    assert roofline.gpu_key("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert roofline.gpu_key("NVIDIA H100 PCIe") == "h100-pcie"
    assert roofline.gpu_key("NVIDIA H200") == "h200"
    assert roofline.gpu_key("NVIDIA A100-SXM4-80GB") is None


@pytest.mark.parametrize(
    "dense, online, expected",
    [
        ({8: 2.0, 16: 1.0, 32: 1.0}, {8: 1.0, 16: 1.5, 32: 2.0}, 16),  # dense wins from 16 on
        ({8: 1.0, 16: 2.0, 32: 1.0}, {8: 2.0, 16: 1.5, 32: 2.0}, 32),  # a reversal at 16
        ({8: 2.0, 16: 2.0}, {8: 1.0, 16: 1.0}, None),  # online always faster
        ({8: 1.0, 16: 1.0, 32: 1.0}, {8: 2.0, 32: 2.0}, 8),  # 16 timed on one path only
    ],
)
def test_crossover_dim(dense, online, expected):
    times = {(d, "dense"): t for d, t in dense.items()} | {(d, "online"): t for d, t in online.items()}
    assert crossover_dim(times) == expected


def test_machine_names():
    assert (
        machine_slug({"cpu_model": "AMD EPYC 9R14 96-Core Processor", "cores": 2})
        == "cpu-amd-epyc-9r14-2core"
    )
    assert machine_slug({"cpu_model": "Intel(R) Xeon(R) CPU @ 2.20GHz", "cores": 8}) == "cpu-intel-xeon-8core"
    assert (
        machine_slug({"cpu_model": "x", "cores": 1, "gpu_name": "NVIDIA H100 80GB HBM3"})
        == "nvidia-h100-80gb-hbm3"
    )


def test_targets_of_a_gpu_report():
    """targets.json checked on a hand-made report: the best bound of the headline Sinkhorn on
    an H100 SXM is 0.556 ms per iteration (fp16 online), so 100 iterations in 0.1 s is 1.80×."""
    sinkhorn = {
        "case": [16384, 512, 100],
        "rows": [
            {"provider": "paper-dense", "seconds": 0.5},
            {"provider": "sotalign-online-fp16", "seconds": 0.1},
            {"provider": "sotalign-online-fp32", "seconds": 2.0},
            {"provider": "flashsinkhorn-fp32", "seconds": 2.6},
            {"provider": "flashsinkhorn-tf32", "skipped": "flash_sinkhorn does not import"},
        ],
    }
    klot_rows = [
        {"provider": "paper-dense", "seconds": 4.0},
        {
            "provider": "sotalign-auto",
            "seconds": 1.0,
            "bound_seconds": 0.5,
            "route": {"path": "online"},
            "peak_extra_bytes": 300 * 2**20,
        },
    ]
    report = {
        "roofline_gpu": "h100-sxm",
        "sinkhorn": {"cases": [sinkhorn]},
        "klot": {"cases": [{"case": [32768, 256, 128, 100], "rows": klot_rows}]},
    }
    found = {target: (measured, met) for target, measured, met in targets(report)}
    best = next(value for key, value in found.items() if "best roofline bound" in key)
    assert best == ("sotalign-online-fp16: 1.80×", False)
    flash = {key.split("(")[1][:4]: value for key, value in found.items() if "FlashSinkhorn" in key}
    assert flash == {"fp32": ("1.30× FlashSinkhorn", True), "tf32": ("–", None)}
    klot = {
        key.split(": ", 1)[1]: value
        for key, value in found.items()
        if key.startswith("KLOT n = m = 32768, d = 256")
    }
    assert klot == {
        "sotalign-auto ≥ 8× the paper's step": ("4.00×", False),
        "sotalign-auto ≤ 1.5× the bound of its path": ("2.00×", False),
    }
    assert found["KLOT online paths: peak ≤ 1024 MiB beyond the inputs"] == ("300 MiB (sotalign-auto)", True)
    assert all(value == ("–", None) for key, value in found.items() if "d = 1024" in key)


def test_ot_goals_of_hand_made_rows():
    """The OT goals on hand-made rows: POT is compared with sotalign's largest iteration count
    (10 s / 1 s = 10×, not with the faster 5-iteration row), and each GeomLoss row with the
    fastest sotalign row at least as accurate (4 s over the 50-iteration row's 0.5 s = 8×; no
    sotalign row reaches 1e-12)."""
    group = "ot fixed n=8 d=2"

    def row(provider, setting, median, error):
        return {
            "provider": provider,
            "setting": setting,
            "median": median,
            "value_error": error,
            "group": group,
        }

    fixed = [
        row("sotalign-auto", 5, 0.05, 1e-3),
        row("sotalign-auto", 50, 0.5, 1e-8),
        row("sotalign-auto", 100, 1.0, 1e-11),
        row("pot-sinkhorn_log-sqeuclidean", 100, 10.0, 1e-11),
        row("geomloss-tensorized-sqeuclidean", 20, 4.0, 1e-6),
        row("geomloss-keops-sqeuclidean", 40, 9.0, 1e-12),
    ]
    found = {goal: (measured, met) for goal, measured, met in ot_goals({group: fixed})}
    pot = found["CPU Sinkhorn n=8 d=2, 100 iterations: sotalign-auto ≥ 5× pot-sinkhorn_log-sqeuclidean"]
    assert pot == ("10.00×", True)
    tensorized = next(value for goal, value in found.items() if "geomloss-tensorized" in goal)
    assert tensorized == ("20 steps (1e-06): 8.0×", True)
    keops = next(value for goal, value in found.items() if "geomloss-keops" in goal)
    assert keops == ("40 steps (1e-12): no sotalign row as accurate", False)
