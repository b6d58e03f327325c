"""Fixtures and hooks of the CPU benchmark suites (pytest-benchmark; timing in
:mod:`benchmarks.cpu`).

Run a suite (the files are ``bench_*.py``; this conftest makes pytest collect them)::

    .venv/bin/python -m pytest benchmarks/bench_sinkhorn.py --benchmark-json=benchmarks/results/x.json
    .venv/bin/python -m benchmarks.report benchmarks/results/x.json   # writes <machine>-sinkhorn.md

``SOTALIGN_BENCH_SMOKE=1`` shrinks every shape to n ≤ 128 so the whole suite runs in seconds
(use it with ``--benchmark-disable`` as a CI smoke test). The GPU benchmark is not a pytest
suite: ``python -m benchmarks.gpu`` (:mod:`benchmarks.gpu`).
"""

from __future__ import annotations

import functools

import pytest
import torch

from benchmarks import cpu
from benchmarks.cpu import SMOKE
from benchmarks.machine import this_machine
from benchmarks.problems import make_problem


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
    """Record the CPU model and core count that the report puts in its file names."""
    machine_info["sotalign"] = {
        **this_machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "smoke": SMOKE,
        "malloc": cpu.MALLOC,
    }


def pytest_terminal_summary(terminalreporter):
    if cpu.CROSSOVER_RESULTS:
        terminalreporter.section(f"sotalign cpu: dense vs online at n = m = {cpu.CROSSOVER_N}")
        cpu.crossover_summary(terminalreporter.write_line)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def problem():
    """``problem(n, d, d_teacher=1)``: the cached features of one shape (n = m)."""

    @functools.lru_cache(maxsize=4)
    def get(n: int, d: int, d_teacher: int = 1):
        return make_problem(n, n, d, d_teacher)

    return get


@pytest.fixture(scope="session")
def cpu_backend():
    """Skips the test unless sotalign's C++ ``cpu`` backend is built."""
    if "cpu" not in cpu.available_backends():
        pytest.skip("the cpu backend (sotalign._C) is not built")
