"""Shared fixtures and helpers of the sotalign CPU benchmark suites.

Run a suite (the files are ``bench_*.py``; this conftest makes pytest collect them)::

    .venv/bin/python -m pytest benchmarks/bench_sinkhorn.py --benchmark-json=benchmarks/results/x.json
    .venv/bin/python benchmarks/report.py benchmarks/results/x.json

``SOTALIGN_BENCH_SMOKE=1`` shrinks every shape to n ≤ 128 so the whole suite runs in seconds
(use it with ``--benchmark-disable`` as a CI smoke test).

Each benchmark is grouped per problem shape, timed with ``benchmark.pedantic`` (one untimed
warm-up call, then 2–7 rounds of one call, fewer for slow providers so the full suites stay
near 20 minutes on 2 cores), and records in ``extra_info`` the provider, the sotalign
backend/path actually chosen, and the peak resident-memory increase of the warm-up call
(exact: the kernel's VmHWM, reset before the call; see sotalign.memory).
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from unittest import mock

import pytest
import torch
from report import local_machine

from sotalign.memory import peak_memory

SMOKE = os.environ.get("SOTALIGN_BENCH_SMOKE") == "1"
#: Keep glibc's default malloc (see :func:`_tune_malloc`) when set to 1.
SYSTEM_MALLOC = os.environ.get("SOTALIGN_BENCH_SYSTEM_MALLOC") == "1"

#: (n = m, d) of the Sinkhorn suite; the headline is (4096, 64).
SINKHORN_SHAPES = [(n, d) for n in (1024, 2048, 4096) for d in (64, 256)]
#: (n = m, d, teacher d) of the KLOT suite; the headline is (2048, 256, 128).
KLOT_SHAPES = [(n, d, d // 2) for n in (1024, 2048) for d in (64, 256)]
#: Feature dimensions of the dense-versus-online crossover suite, at n = m = CROSSOVER_N.
CROSSOVER_DIMS = [4, 8, 16, 32, 64, 128, 256]
CROSSOVER_N = 2048
if SMOKE:
    SINKHORN_SHAPES = [(n // 32, d // 8) for n, d in SINKHORN_SHAPES]
    KLOT_SHAPES = [(n // 16, d // 8, d // 16) for n, d, _ in KLOT_SHAPES]
    CROSSOVER_N = 128


# --------------------------------------------------------------------------- allocator

def _tune_malloc() -> str:
    """Serve large allocations from a reused heap instead of fresh mmaps (fairer to the peers).

    With glibc's defaults every n×m temporary of the dense torch peers (paper, POT, the
    ``torch`` backend) is a fresh mmap that is page-faulted in and unmapped again: at n = 2048
    that is ~1.7 M page faults and more system than user time per 100-iteration solve, and
    whether it happens depends on glibc's adaptive threshold (runs flip between ~0.8 s and
    ~2.7 s). Disabling mmap for malloc and heap trimming removes that cost for everyone (the
    usual advice of jemalloc/tcmalloc for torch on CPU, done here with mallopt). Memory
    deltas stay honest: :func:`sotalign.memory.peak_memory` calls ``malloc_trim(0)`` first.
    """
    if SYSTEM_MALLOC:
        return "glibc defaults"
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        if libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**62):
            return "glibc, mallopt(M_MMAP_MAX=0, M_TRIM_THRESHOLD=2**62)"
    except (OSError, AttributeError):
        pass
    return "default (mallopt unavailable)"


MALLOC = _tune_malloc()


# --------------------------------------------------------------------------- collection

def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` in this folder (pytest's default pattern is ``test_*.py``)."""
    is_bench = (file_path.suffix == ".py" and file_path.name.startswith("bench_")
                and file_path.parent == parent.path)
    if is_bench and not parent.session.isinitpath(file_path):  # named files are collected anyway
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def available_backends() -> list[str]:
    """``sotalign.available_backends()``, or the pure-torch ones while the extension is broken."""
    import sotalign

    try:
        return sotalign.available_backends()
    except Exception as error:  # the cpu extension may be mid-build
        warnings.warn(f"sotalign.available_backends() failed ({error}); timing 'torch' only")
        return ["reference", "torch"]


def sotalign_variants() -> list[tuple[str, str, str]]:
    """(label, backend, path) of every sotalign configuration to time on this machine.

    ``auto`` is what users get; then each available backend except the dense ``reference``
    oracle, with the ``cpu`` backend's two paths timed separately.
    """
    available = available_backends()
    variants = [("sotalign-auto", "auto", "auto")]
    for name in available:
        if name == "cpu":
            variants += [("sotalign-cpu-dense", "cpu", "dense"), ("sotalign-cpu-online", "cpu", "online")]
        elif name != "reference":
            variants.append((f"sotalign-{name}", name, "auto"))
    return variants


def pytest_generate_tests(metafunc):
    """Parametrize the shape and variant fixtures the benchmark functions ask for."""
    names = metafunc.fixturenames
    if "sinkhorn_shape" in names:
        metafunc.parametrize("sinkhorn_shape", SINKHORN_SHAPES,
                             ids=[f"n{n}-d{d}" for n, d in SINKHORN_SHAPES])
    if "klot_shape" in names:
        metafunc.parametrize("klot_shape", KLOT_SHAPES,
                             ids=[f"n{n}-d{d}-t{t}" for n, d, t in KLOT_SHAPES])
    if "crossover_dim" in names:
        metafunc.parametrize("crossover_dim", CROSSOVER_DIMS, ids=[f"d{d}" for d in CROSSOVER_DIMS])
    if "variant" in names:
        variants = sotalign_variants()
        metafunc.parametrize("variant", variants, ids=[label for label, _, _ in variants])


# --------------------------------------------------------------------------- data

@dataclass(frozen=True)
class Problem:
    """Student features x (n×d), y (m×d) and teacher features of the same rows (d_t wide)."""

    x: torch.Tensor
    y: torch.Tensor
    x_teacher: torch.Tensor
    y_teacher: torch.Tensor


@functools.lru_cache(maxsize=4)
def make_problem(n: int, m: int, d: int, d_teacher: int, seed: int = 0) -> Problem:
    """Seeded fp32 features with some shared structure (row i of x resembles row i of y).

    Both sides mix a common latent code with independent noise, so the cosine affinities
    and the plans are not those of pure noise; the teacher is a random projection of it.
    """
    gen = torch.Generator().manual_seed(seed)
    k = max(n, m)
    latent = torch.randn(k, d, generator=gen)
    x = latent[:n] + 0.7 * torch.randn(n, d, generator=gen)
    y = latent[:m] + 0.7 * torch.randn(m, d, generator=gen)
    proj = torch.randn(d, d_teacher, generator=gen) / math.sqrt(d)
    x_t = x @ proj + 0.3 * torch.randn(n, d_teacher, generator=gen)
    y_t = y @ proj + 0.3 * torch.randn(m, d_teacher, generator=gen)
    return Problem(x.contiguous(), y.contiguous(), x_t.contiguous(), y_t.contiguous())


@pytest.fixture(scope="session")
def problem():
    """``problem(n, d, d_teacher=1)``: the cached features of one shape (n = m)."""
    def get(n: int, d: int, d_teacher: int = 1) -> Problem:
        return make_problem(n, n, d, d_teacher)
    return get


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows (cosine affinity = dot product of unit rows)."""
    return torch.nn.functional.normalize(t, dim=1)


@pytest.fixture(scope="session")
def cosine():
    """``cosine(x, y)``: the dense n×m cosine affinity, as the dense peers compute it."""
    return lambda x, y: unit_rows(x) @ unit_rows(y).T


# --------------------------------------------------------------------------- routes

@functools.cache
def _route_modules():
    """The sotalign modules that import ``choose_route`` by name."""
    return [importlib.import_module(name) for name in ("sotalign.ot.sinkhorn", "sotalign.ot.klot")]


class RouteSpy:
    """Records the (backend, path) that sotalign's dispatch picks during a block."""

    def __init__(self):
        self.routes: list[tuple[str, str]] = []

    def __enter__(self):
        from sotalign.ot import dispatch

        def spy(*args, **kwargs):
            route = dispatch.choose_route(*args, **kwargs)
            self.routes.append((route.backend.name, route.path))
            return route

        self._patches = [mock.patch.object(module, "choose_route", spy) for module in _route_modules()]
        for patch in self._patches:
            patch.start()
        return self

    def __exit__(self, *exc):
        for patch in self._patches:
            patch.stop()
        return False

    def info(self) -> dict:
        """``backend``/``path`` of the (single, or '+'-joined distinct) routes seen."""
        backends = sorted({b for b, _ in self.routes})
        paths = sorted({p for _, p in self.routes})
        return {"backend": "+".join(backends), "path": "+".join(paths)} if self.routes else {}


# --------------------------------------------------------------------------- timing

#: Timed seconds aimed at per benchmark, and the bounds on its number of rounds.
TARGET_SECONDS = 10.0
MIN_ROUNDS, MAX_ROUNDS = 2, 7


def rounds_for(probe_seconds: float) -> int:
    """Rounds that fit ``TARGET_SECONDS`` given one warm-up call's duration (few for big shapes)."""
    return max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_SECONDS / max(probe_seconds, 1e-9))))


def run_benchmark(benchmark, fn, *, suite: str, provider: str, group: str,
                  rounds: int | None = None, **info):
    """Time ``fn()`` with pytest-benchmark and fill ``extra_info``; returns fn's result.

    One untimed warm-up call comes first; it doubles as the probe that measures the peak RSS
    increase (:func:`sotalign.memory.peak_memory`), records the backend/path sotalign picked (:class:`RouteSpy`)
    and sizes the number of timed rounds (:func:`rounds_for`, unless ``rounds`` is given).
    Then ``benchmark.pedantic(fn, rounds=R, iterations=1)``. Under ``--benchmark-disable``
    fn runs once, without the probe.
    """
    benchmark.group = group
    benchmark.extra_info.update(suite=suite, provider=provider, threads=torch.get_num_threads(),
                                load_avg_1min=os.getloadavg()[0], **info)
    if benchmark.disabled:
        return benchmark.pedantic(fn, rounds=1, iterations=1)
    with peak_memory() as memory, RouteSpy() as routes:
        start = time.perf_counter()
        fn()
        probe_seconds = time.perf_counter() - start
    benchmark.extra_info.update(peak_rss_delta_mib=round(memory.mib, 2),
                                warmup_seconds=round(probe_seconds, 4), **routes.info())
    rounds = rounds_for(probe_seconds) if rounds is None else rounds
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)


@pytest.fixture(scope="session")
def bench():
    """The :func:`run_benchmark` helper, as a fixture (bench files never import conftest)."""
    return run_benchmark


@pytest.fixture(scope="session")
def smoke() -> bool:
    return SMOKE


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record the CPU model and core count that report.py puts in its file names."""
    machine_info["sotalign"] = {**local_machine(), "torch_threads": torch.get_num_threads(),
                                "torch": torch.__version__, "smoke": SMOKE, "malloc": MALLOC}


# --------------------------------------------------------------------------- crossover summary

#: (d, path) -> median seconds, filled by bench_crossover.py for the terminal summary.
CROSSOVER_RESULTS: dict[tuple[int, str], float] = {}


@pytest.fixture(scope="session")
def crossover_results():
    return CROSSOVER_RESULTS


@pytest.fixture(scope="session")
def crossover_n() -> int:
    return CROSSOVER_N


@pytest.fixture(scope="session")
def cpu_backend():
    """Skips the test unless sotalign's C++ ``cpu`` backend is built."""
    if "cpu" not in available_backends():
        pytest.skip("the cpu backend (sotalign._C) is not built")


def crossover_dim(results: dict[tuple[int, str], float]) -> int | None:
    """Smallest d from which the dense path is at least as fast as online for every larger d."""
    dims = sorted({d for d, _ in results})
    answer = None
    for d in reversed(dims):
        dense, online = results.get((d, "dense")), results.get((d, "online"))
        if dense is None or online is None or dense > online:
            break
        answer = d
    return answer


def pytest_terminal_summary(terminalreporter):
    if not CROSSOVER_RESULTS:
        return
    write = terminalreporter.write_line
    terminalreporter.section(f"sotalign cpu: dense vs online at n = m = {CROSSOVER_N}")
    for d in sorted({d for d, _ in CROSSOVER_RESULTS}):
        dense, online = CROSSOVER_RESULTS.get((d, "dense")), CROSSOVER_RESULTS.get((d, "online"))
        if dense and online:
            write(f"d={d:4d}  dense {dense * 1e3:9.1f} ms  online {online * 1e3:9.1f} ms  "
                  f"online/dense {online / dense:5.2f}  -> {'dense' if dense <= online else 'online'}")
    write(f"crossover d (dense wins from here on): {crossover_dim(CROSSOVER_RESULTS)}")
