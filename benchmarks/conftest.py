"""Shared fixtures and helpers of the sotalign benchmark suites (CPU, and the GPU harness).

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

The GPU suites (``bench_gpu_*.py``, run by ``run_gpu.sh``) use the helpers of the last
section instead: CUDA-synchronised timing, CUDA peak memory, and skip rules for memory and
time budgets.
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

# In smoke mode without a GPU the Triton providers run in Triton's interpreter; Triton picks
# interpreted or compiled helpers when first imported, so this must precede any import of it.
if os.environ.get("SOTALIGN_BENCH_SMOKE") == "1" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from report import local_machine  # noqa: E402

from sotalign.memory import peak_memory  # noqa: E402

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
    is_bench = (
        file_path.suffix == ".py" and file_path.name.startswith("bench_") and file_path.parent == parent.path
    )
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
        metafunc.parametrize(
            "sinkhorn_shape", SINKHORN_SHAPES, ids=[f"n{n}-d{d}" for n, d in SINKHORN_SHAPES]
        )
    if "klot_shape" in names:
        metafunc.parametrize("klot_shape", KLOT_SHAPES, ids=[f"n{n}-d{d}-t{t}" for n, d, t in KLOT_SHAPES])
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
def make_problem(
    n: int, m: int, d: int, d_teacher: int, seed: int = 0, device: torch.device | str = "cpu"
) -> Problem:
    """Seeded fp32 features with some shared structure (row i of x resembles row i of y).

    Both sides mix a common latent code with independent noise, so the cosine affinities
    and the plans are not those of pure noise; the teacher is a random projection of it.
    The numbers depend on the device's generator (the CPU ones are those of the CPU suites).
    """
    gen = torch.Generator(device).manual_seed(seed)
    k = max(n, m)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    latent = randn(k, d)
    x = latent[:n] + 0.7 * randn(n, d)
    y = latent[:m] + 0.7 * randn(m, d)
    proj = randn(d, d_teacher) / math.sqrt(d)
    x_t = x @ proj + 0.3 * randn(n, d_teacher)
    y_t = y @ proj + 0.3 * randn(m, d_teacher)
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


def run_benchmark(benchmark, fn, *, suite: str, provider: str, group: str, rounds: int | None = None, **info):
    """Time ``fn()`` with pytest-benchmark and fill ``extra_info``; returns fn's result.

    One untimed warm-up call comes first; it doubles as the probe that measures the peak RSS
    increase (:func:`sotalign.memory.peak_memory`), records the backend/path sotalign picked (:class:`RouteSpy`)
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
    with peak_memory() as memory, RouteSpy() as routes:
        start = time.perf_counter()
        fn()
        probe_seconds = time.perf_counter() - start
    benchmark.extra_info.update(
        peak_rss_delta_mib=round(memory.mib, 2), warmup_seconds=round(probe_seconds, 4), **routes.info()
    )
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
    """Record the CPU model and core count that report.py puts in its file names (and the GPU)."""
    machine_info["sotalign"] = {
        **local_machine(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "smoke": SMOKE,
        "malloc": MALLOC,
        **gpu_versions(),
    }


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
            write(
                f"d={d:4d}  dense {dense * 1e3:9.1f} ms  online {online * 1e3:9.1f} ms  "
                f"online/dense {online / dense:5.2f}  -> {'dense' if dense <= online else 'online'}"
            )
    write(f"crossover d (dense wins from here on): {crossover_dim(CROSSOVER_RESULTS)}")


# --------------------------------------------------------------------------- GPU harness
# Shared by bench_gpu_sinkhorn.py and bench_gpu_klot.py (run by run_gpu.sh). Without CUDA they
# run only in smoke mode, on tiny shapes on the CPU, to check the harness itself.

#: The device of the GPU suites.
GPU_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: Timed seconds aimed at per GPU case, and the bounds on its number of rounds.
GPU_TARGET_SECONDS = 0.2 if SMOKE else 1.0
GPU_MIN_ROUNDS, GPU_MAX_ROUNDS = (2 if SMOKE else 3), 20
#: A second untimed call probes the duration when the first (compiling, autotuning) took less.
GPU_PROBE_BELOW_SECONDS = 0.0 if SMOKE else 2.0
#: Cases predicted to take longer per call than this are skipped (time budget).
GPU_MAX_CALL_SECONDS = float(os.environ.get("SOTALIGN_GPU_MAX_CALL_SECONDS", "4"))
#: Wall seconds one pytest session may spend before it skips its remaining cases (a device
#: command is killed at 10 minutes, and pytest writes its JSON only at the end).
GPU_SESSION_BUDGET = float(os.environ.get("SOTALIGN_GPU_BUDGET_SECONDS", "420"))
#: Cases whose estimated peak memory is above this fraction of the GPU's memory are skipped.
GPU_MEMORY_FRACTION = 0.6
_SESSION_START = time.perf_counter()


def gpu_versions() -> dict:
    """Versions of torch and triton and, on CUDA, the GPU's name and memory."""
    info = {"device": str(GPU_DEVICE), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if GPU_DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(GPU_DEVICE)
        info.update(
            gpu_name=torch.cuda.get_device_name(GPU_DEVICE),
            cuda=torch.version.cuda,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
        )
    return info


def synchronize() -> None:
    if GPU_DEVICE.type == "cuda":
        torch.cuda.synchronize(GPU_DEVICE)


def gpu_case_gate(
    *, memory_bytes: float, predicted_seconds: float, max_call_seconds: float | None = None
) -> None:
    """Skip (with the reason) a case that cannot run here, would not fit, or is over budget.

    ``memory_bytes`` is the case's estimated peak allocation on top of its inputs and
    ``predicted_seconds`` the roofline bound of one call times the provider's assumed
    slowdown (both from the suite's provider table), held to ``max_call_seconds``
    (default :data:`GPU_MAX_CALL_SECONDS`). Smoke runs only check the CUDA rule.
    """
    max_call_seconds = GPU_MAX_CALL_SECONDS if max_call_seconds is None else max_call_seconds
    if GPU_DEVICE.type != "cuda":
        if not SMOKE:
            pytest.skip("the GPU suites need CUDA (SOTALIGN_BENCH_SMOKE=1 runs them on CPU)")
        return
    if SMOKE:
        return
    limit = GPU_MEMORY_FRACTION * torch.cuda.get_device_properties(GPU_DEVICE).total_memory
    if memory_bytes > limit:
        pytest.skip(
            f"estimated peak {memory_bytes / 2**30:.1f} GiB > {GPU_MEMORY_FRACTION:.0%} "
            f"of GPU memory ({limit / 2**30:.1f} GiB)"
        )
    if predicted_seconds > max_call_seconds:
        pytest.skip(
            f"predicted {predicted_seconds:.1f} s per call > {max_call_seconds:g} s "
            "(time budget; roofline bound × assumed slowdown)"
        )
    if time.perf_counter() - _SESSION_START > GPU_SESSION_BUDGET:
        pytest.skip(f"session time budget ({GPU_SESSION_BUDGET:.0f} s) spent")


def run_gpu_benchmark(
    benchmark, fn, *, check, suite: str, provider: str, group: str, rounds: int | None = None, **info
) -> None:
    """Time ``fn()`` (followed by a device synchronisation) with pytest-benchmark.

    The first call is untimed (it compiles, autotunes and JITs); its result goes to
    ``check`` and is then dropped, and the sotalign route it took is recorded. When it took
    under :data:`GPU_PROBE_BELOW_SECONDS` a second untimed call measures the duration that
    sizes the rounds (:data:`GPU_TARGET_SECONDS`, capped by the session budget). Then
    ``benchmark.pedantic(rounds=R, iterations=1)``; the timed calls return nothing, so the
    peak memory over them (``peak_mem_delta_mib``: CUDA ``max_memory_allocated`` minus what
    was allocated before, i.e. beyond the inputs; peak RSS increase on CPU) is the call's own.
    Under ``--benchmark-disable`` fn runs once and is checked.
    """
    benchmark.group = group
    benchmark.extra_info.update(suite=suite, provider=provider, **gpu_versions(), **info)
    if benchmark.disabled:
        check(benchmark.pedantic(fn, rounds=1, iterations=1))
        return

    def call() -> None:
        fn()
        synchronize()

    with RouteSpy() as routes:
        start = time.perf_counter()
        result = fn()
        synchronize()
        first = time.perf_counter() - start
    check(result)
    del result
    probe = first
    if first < GPU_PROBE_BELOW_SECONDS:
        start = time.perf_counter()
        call()
        probe = time.perf_counter() - start
    if rounds is None:
        rounds = int(GPU_TARGET_SECONDS / max(probe, 1e-9))
        rounds = max(GPU_MIN_ROUNDS, min(GPU_MAX_ROUNDS, rounds))
    remaining = GPU_SESSION_BUDGET - (time.perf_counter() - _SESSION_START)
    rounds = max(1, min(rounds, int(remaining / max(probe, 1e-9))))
    with peak_memory(GPU_DEVICE) as memory:
        benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(
        peak_mem_delta_mib=round(memory.mib, 2),
        memory_kind="cuda max_memory_allocated" if GPU_DEVICE.type == "cuda" else "cpu peak RSS",
        first_call_seconds=round(first, 4),
        **routes.info(),
    )


#: Skipped benchmark cases and their reasons, written into the JSON (the GPU report lists them).
SKIPPED: list[dict] = []


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call") and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2].removeprefix("Skipped: ")
        SKIPPED.append({"name": report.nodeid.split("::")[-1], "file": report.fspath, "reason": reason})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["skipped"] = SKIPPED


@pytest.fixture(scope="session")
def gpu_bench():
    """The :func:`run_gpu_benchmark` helper, as a fixture."""
    return run_gpu_benchmark


@pytest.fixture(scope="session")
def gpu_gate():
    """The :func:`gpu_case_gate` helper, as a fixture."""
    return gpu_case_gate


@pytest.fixture(scope="session")
def gpu_device() -> torch.device:
    return GPU_DEVICE


_DEVICE_PROBLEM: dict[tuple, Problem] = {}


@pytest.fixture(scope="session")
def device_problem():
    """``device_problem(n, d, d_teacher=1)``: :func:`make_problem` features on GPU_DEVICE.

    Only the latest shape is kept, so cached inputs never crowd the GPU for the next case.
    """

    def get(n: int, d: int, d_teacher: int = 1) -> Problem:
        key = (n, d, d_teacher)
        if key not in _DEVICE_PROBLEM:
            _DEVICE_PROBLEM.clear()
            if GPU_DEVICE.type == "cuda":
                torch.cuda.empty_cache()
            _DEVICE_PROBLEM[key] = make_problem.__wrapped__(n, n, d, d_teacher, device=GPU_DEVICE)
        return _DEVICE_PROBLEM[key]

    return get
