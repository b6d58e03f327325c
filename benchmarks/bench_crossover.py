"""Dense versus online on the ``cpu`` backend: the feature dimension where storing K wins.

At n = m = 2048, one 20-iteration Sinkhorn solve from the raw features with ``path="dense"``
(K = x̂ŷᵀ computed once by BLAS — inside the timed call — then read each half-step) and with
``path="online"`` (K recomputed tile by tile each half-step), for d from 4 to 256. The
terminal summary (and the report) name the crossover: the smallest d from which dense is
never slower. ``dense_min_dim.cpu`` in ``sotalign/ot/dispatch.json`` should match it.
"""

from __future__ import annotations

import pytest
import torch

import sotalign
from benchmarks.cpu import CROSSOVER_N, CROSSOVER_RESULTS, run_benchmark

EPS = 0.05
N_ITERS = 20


@pytest.mark.parametrize("path", ["dense", "online"])
def test_cpu_path(benchmark, problem, cpu_backend, crossover_dim, path):
    """One cpu-backend solve on one path at feature dimension ``crossover_dim``."""
    n = CROSSOVER_N
    data = problem(n, crossover_dim)
    result = run_benchmark(
        benchmark,
        lambda: sotalign.sinkhorn(data.x, data.y, EPS, n_iters=N_ITERS, backend="cpu", path=path),
        suite="crossover",
        provider=f"sotalign-cpu-{path}",
        group=f"crossover n={n} d={crossover_dim}",
        n=n,
        m=n,
        d=crossover_dim,
        eps=EPS,
        n_iters=N_ITERS,
        requested_backend="cpu",
        requested_path=path,
    )
    assert result.path == path and torch.isfinite(result.f).all()
    if benchmark.stats is not None:  # None under --benchmark-disable
        CROSSOVER_RESULTS[(crossover_dim, path)] = benchmark.stats.stats.median
