"""The GPU harness (``bench_gpu_*.py``, run by ``run_gpu.sh``): CUDA-synchronised timing, CUDA
peak memory, and skip rules for memory and time budgets. Without CUDA the suites run only in
smoke mode, on tiny shapes on the CPU, to check the harness itself."""

from __future__ import annotations

import os
import time

import pytest
import torch

from sotalign.memory import peak_memory

from .common import SMOKE, Problem, make_problem, route_info

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
    benchmark,
    fn,
    *,
    check,
    suite: str,
    provider: str,
    group: str,
    rounds: int | None = None,
    route: dict | None = None,
    **info,
) -> None:
    """Time ``fn()`` (followed by a device synchronisation) with pytest-benchmark.

        The first call is untimed (it compiles, autotunes and JITs); its result goes to
        ``check`` and is then dropped, and the sotalign route it took is recorded (``route``, or read
    off a :class:`~sotalign.SinkhornResult`: :func:`~harness.common.route_info`). When it took
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

    start = time.perf_counter()
    result = fn()
    synchronize()
    first = time.perf_counter() - start
    check(result)
    taken = route_info(result, route)
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
        **taken,
    )


#: Skipped benchmark cases and their reasons, written into the JSON (the GPU report lists them).
SKIPPED: list[dict] = []


def device_problem(n: int, d: int, d_teacher: int = 1) -> Problem:
    """:func:`~harness.common.make_problem` features on GPU_DEVICE. Only the latest shape is
    kept, so cached inputs never crowd the GPU for the next case."""
    key = (n, d, d_teacher)
    if key not in _DEVICE_PROBLEM:
        _DEVICE_PROBLEM.clear()
        if GPU_DEVICE.type == "cuda":
            torch.cuda.empty_cache()
        _DEVICE_PROBLEM[key] = make_problem.__wrapped__(n, n, d, d_teacher, device=GPU_DEVICE)
    return _DEVICE_PROBLEM[key]


_DEVICE_PROBLEM: dict[tuple, Problem] = {}
