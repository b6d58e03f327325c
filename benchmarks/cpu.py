"""The CPU harness of the pytest-benchmark suites: smoke mode, allocator tuning, the suites'
shapes and sotalign variants, timing with peak resident memory, and the crossover summary.

Each benchmark is grouped per problem shape, timed with ``benchmark.pedantic`` (one untimed
warm-up call, then 2–7 rounds of one call, fewer for slow providers so the full suites stay
near 20 minutes on 2 cores), and records in ``extra_info`` the provider, the sotalign
backend/path actually taken, and the peak resident-memory increase of the warm-up call
(exact: the kernel's VmHWM, reset before the call; see sotalign.memory).
"""

from __future__ import annotations

import ctypes
import os
import time
import warnings

import torch

from sotalign import DEFAULT_MEMORY_BUDGET, SinkhornResult
from sotalign.memory import peak_memory
from sotalign.ot.dispatch import choose_route

from .report import crossover_table

#: ``SOTALIGN_BENCH_SMOKE=1`` shrinks every shape so a suite runs in seconds (CI smoke test).
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


def available_backends() -> list[str]:
    """``sotalign.available_backends()``, or the pure-torch ones while the extension is broken."""
    import sotalign

    try:
        return sotalign.available_backends()
    except Exception as error:  # the cpu extension may be mid-build
        warnings.warn(f"sotalign.available_backends() failed ({error}); timing 'torch' only", stacklevel=2)
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


#: Timed seconds aimed at per benchmark, and the bounds on its number of rounds.
TARGET_SECONDS = 10.0
MIN_ROUNDS, MAX_ROUNDS = 2, 7


def rounds_for(probe_seconds: float) -> int:
    """Rounds that fit ``TARGET_SECONDS`` given one warm-up call's duration (few for big shapes)."""
    return max(MIN_ROUNDS, min(MAX_ROUNDS, int(TARGET_SECONDS / max(probe_seconds, 1e-9))))


def klot_route(x: torch.Tensor, x_teacher: torch.Tensor, n_columns: int, backend: str, path: str) -> dict:
    """The backend and path :func:`sotalign.klot` takes for these features: both solves run on
    one route, sized for two stored n×m matrices and the smaller of the two feature dimensions."""
    feature_dim = min(x.shape[1], x_teacher.shape[1])
    route = choose_route(
        backend, path, x.device, x.shape[0], n_columns, feature_dim, x.dtype, 2, DEFAULT_MEMORY_BUDGET
    )
    return {"backend": route.backend.name, "path": route.path}


def route_info(result, route: dict | None) -> dict:
    """``backend``/``path`` of the sotalign route of a call: as given (``route``), else read off
    a :class:`~sotalign.SinkhornResult`; empty for the peers."""
    if route is not None:
        return route
    if isinstance(result, SinkhornResult):
        return {"backend": result.backend, "path": result.path}
    return {}


def run_benchmark(
    benchmark,
    fn,
    *,
    suite: str,
    provider: str,
    group: str,
    rounds: int | None = None,
    route: dict | None = None,
    **info,
):
    """Time ``fn()`` with pytest-benchmark and fill ``extra_info``; returns fn's result.

    One untimed warm-up call comes first; it doubles as the probe that measures the peak RSS
    increase (:func:`sotalign.memory.peak_memory`), records the backend/path sotalign took
    (``route``, or read off the call's :class:`~sotalign.SinkhornResult`: :func:`route_info`)
    and sizes the number of timed rounds (:func:`rounds_for`, unless ``rounds`` is given).
    Then ``benchmark.pedantic(fn, rounds=R, iterations=1)``. Under ``--benchmark-disable``
    fn runs once, without the probe.
    """
    benchmark.group = group
    benchmark.extra_info.update(
        suite=suite,
        provider=provider,
        threads=torch.get_num_threads(),
        load_avg_1min=os.getloadavg()[0],
        **info,
    )
    if benchmark.disabled:
        return benchmark.pedantic(fn, rounds=1, iterations=1)
    with peak_memory() as memory:
        start = time.perf_counter()
        result = fn()
        probe_seconds = time.perf_counter() - start
    benchmark.extra_info.update(
        peak_rss_delta_mib=round(memory.mib, 2),
        warmup_seconds=round(probe_seconds, 4),
        **route_info(result, route),
    )
    del result
    rounds = rounds_for(probe_seconds) if rounds is None else rounds
    return benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)


#: (d, path) -> median seconds, filled by bench_crossover.py for the terminal summary.
CROSSOVER_RESULTS: dict[tuple[int, str], float] = {}


def crossover_summary(write) -> None:
    """The terminal summary of the crossover suite, one ``write(line)`` per line."""
    for line in crossover_table(CROSSOVER_RESULTS):
        write(line)
