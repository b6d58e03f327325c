"""Fixtures and hooks of the sotalign benchmark suites; the harnesses live in harness/.

Run a suite (the files are ``bench_*.py``; this conftest makes pytest collect them)::

    .venv/bin/python -m pytest benchmarks/bench_sinkhorn.py --benchmark-json=benchmarks/results/x.json
    .venv/bin/python benchmarks/report.py benchmarks/results/x.json

``SOTALIGN_BENCH_SMOKE=1`` shrinks every shape to n ≤ 128 so the whole suite runs in seconds
(use it with ``--benchmark-disable`` as a CI smoke test). The CPU suites time with
:mod:`harness.cpu`, the GPU suites (``bench_gpu_*.py``, run by ``run_gpu.sh``) with
:mod:`harness.gpu`; both share :mod:`harness.common`.
"""

from __future__ import annotations

import os

import pytest
import torch

# In smoke mode without a GPU the Triton providers run in Triton's interpreter; Triton picks
# interpreted or compiled helpers when first imported, so this must precede any import of it.
if os.environ.get("SOTALIGN_BENCH_SMOKE") == "1" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness import cpu, gpu  # noqa: E402
from harness.common import SMOKE, make_problem, unit_rows  # noqa: E402
from report import local_machine  # noqa: E402


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` in this folder (pytest's default pattern is ``test_*.py``)."""
    is_bench = (
        file_path.suffix == ".py" and file_path.name.startswith("bench_") and file_path.parent == parent.path
    )
    if is_bench and not parent.session.isinitpath(file_path):  # named files are collected anyway
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_generate_tests(metafunc):
    """Parametrize the shape and variant fixtures the benchmark functions ask for."""
    names = metafunc.fixturenames
    if "sinkhorn_shape" in names:
        shapes = cpu.SINKHORN_SHAPES
        metafunc.parametrize("sinkhorn_shape", shapes, ids=[f"n{n}-d{d}" for n, d in shapes])
    if "klot_shape" in names:
        shapes = cpu.KLOT_SHAPES
        metafunc.parametrize("klot_shape", shapes, ids=[f"n{n}-d{d}-t{t}" for n, d, t in shapes])
    if "crossover_dim" in names:
        metafunc.parametrize("crossover_dim", cpu.CROSSOVER_DIMS, ids=[f"d{d}" for d in cpu.CROSSOVER_DIMS])
    if "variant" in names:
        variants = cpu.sotalign_variants()
        metafunc.parametrize("variant", variants, ids=[label for label, _, _ in variants])


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the CPU model and core count that report.py puts in its file names (and the GPU)."""
    machine_info["sotalign"] = {
        **local_machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "smoke": SMOKE,
        "malloc": cpu.MALLOC,
        **gpu.gpu_versions(),
    }


def pytest_terminal_summary(terminalreporter):
    if cpu.CROSSOVER_RESULTS:
        terminalreporter.section(f"sotalign cpu: dense vs online at n = m = {cpu.CROSSOVER_N}")
        cpu.crossover_summary(terminalreporter.write_line)


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call") and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        gpu.SKIPPED.append({"name": report.nodeid.split("::")[-1], "file": report.fspath, "reason": reason})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = gpu.SKIPPED


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def problem():
    """``problem(n, d, d_teacher=1)``: the cached features of one shape (n = m)."""

    def get(n: int, d: int, d_teacher: int = 1):
        return make_problem(n, n, d, d_teacher)

    return get


@pytest.fixture(scope="session")
def cosine():
    """``cosine(x, y)``: the dense n×m cosine affinity, as the dense peers compute it."""
    return lambda x, y: unit_rows(x) @ unit_rows(y).T


@pytest.fixture(scope="session")
def bench():
    """The :func:`harness.cpu.run_benchmark` helper, as a fixture (bench files never import conftest)."""
    return cpu.run_benchmark


@pytest.fixture(scope="session")
def smoke() -> bool:
    return SMOKE


@pytest.fixture(scope="session")
def crossover_results():
    return cpu.CROSSOVER_RESULTS


@pytest.fixture(scope="session")
def crossover_n() -> int:
    return cpu.CROSSOVER_N


@pytest.fixture(scope="session")
def cpu_backend():
    """Skips the test unless sotalign's C++ ``cpu`` backend is built."""
    if "cpu" not in cpu.available_backends():
        pytest.skip("the cpu backend (sotalign._C) is not built")


@pytest.fixture(scope="session")
def gpu_bench():
    """The :func:`harness.gpu.run_gpu_benchmark` helper, as a fixture."""
    return gpu.run_gpu_benchmark


@pytest.fixture(scope="session")
def gpu_gate():
    """The :func:`harness.gpu.gpu_case_gate` helper, as a fixture."""
    return gpu.gpu_case_gate


@pytest.fixture(scope="session")
def gpu_device() -> torch.device:
    return gpu.GPU_DEVICE


@pytest.fixture(scope="session")
def device_problem():
    """``device_problem(n, d, d_teacher=1)``: :func:`harness.gpu.device_problem`."""
    return gpu.device_problem
