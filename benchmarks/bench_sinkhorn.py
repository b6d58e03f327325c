"""Sinkhorn speed: sotalign against its peers on one problem.

The problem (:mod:`benchmarks.peers`): cosine affinity K between n = m seeded fp32 feature
rows, cost −K, ε = 0.05, uniform marginals of mass one, 100 fixed iterations, starting from
the raw features (every provider normalises the rows and forms or streams K inside the timed
call).

Peers on the same problem (every one of :data:`benchmarks.peers.PEERS` that runs on CPU):
the SOTAlign authors' dense torch loop (``paper-dense``), POT ``ot.bregman.sinkhorn_log`` on
torch tensors and on numpy arrays (``stopThr=0``, so all 100 iterations), and GeomLoss online
with KeOps, which anneals ε (its plan ends ~0.04 in L1 from the ε = 0.05 plan at n = 128,
where the fixed-ε solvers are within 1e-4), skipped where KeOps' CPU code would take minutes.
"""

from __future__ import annotations

import pytest
import torch

import sotalign
from benchmarks.cpu import run_benchmark
from benchmarks.peers import PEERS, cosine

EPS = 0.05
N_ITERS = 100
#: Largest n·m·d GeomLoss/KeOps is timed at (KeOps' CPU reductions run ~4 GFLOP/s here).
GEOMLOSS_MAX_WORK = 2048 * 2048 * 64
CPU = torch.device("cpu")
CPU_PEERS = [name for name, peer in PEERS.items() if "cpu" in peer.devices and peer.cost == "cosine"]


def metadata(n: int, d: int) -> dict:
    return dict(suite="sinkhorn", group=f"sinkhorn n={n} d={d}", n=n, m=n, d=d, eps=EPS, n_iters=N_ITERS)


def test_sotalign(benchmark, problem, sinkhorn_shape, variant):
    """sotalign.sinkhorn with one backend/path (``auto`` is what users get)."""
    label, backend, path = variant
    data = problem(*sinkhorn_shape)
    result = run_benchmark(
        benchmark,
        lambda: sotalign.sinkhorn(data.x, data.y, EPS, n_iters=N_ITERS, backend=backend, path=path),
        provider=label,
        requested_backend=backend,
        requested_path=path,
        **metadata(*sinkhorn_shape),
    )
    assert torch.isfinite(result.f).all() and torch.isfinite(result.g).all()


@pytest.mark.parametrize("name", CPU_PEERS)
def test_peer(benchmark, problem, sinkhorn_shape, name):
    """One peer library on the same problem."""
    peer = PEERS[name]
    reason = peer.missing(CPU)
    if reason:
        pytest.skip(reason)
    n, d = sinkhorn_shape
    if name == "geomloss-keops" and n * n * d > GEOMLOSS_MAX_WORK:
        pytest.skip(f"GeomLoss/KeOps on CPU would take minutes per call at n={n}, d={d}")
    data = problem(n, d)
    solve = peer.make(EPS, N_ITERS)
    f, g = run_benchmark(
        benchmark,
        lambda: solve(data.x, data.y),
        provider=name,
        backend=name.split("-")[0],
        path="online" if name == "geomloss-keops" else "dense",
        **({"note": peer.note} if peer.note else {}),
        **metadata(n, d),
    )
    assert torch.isfinite(f).all() and torch.isfinite(g).all()


def test_peers_solve_the_same_problem(problem):
    """Not timed: every peer's plan, from the potentials it returns, is sotalign's plan on a
    small instance (which also checks each wrapper's conversion of the potentials)."""
    data = problem(128, 16)
    ours = sotalign.sinkhorn(data.x, data.y, EPS, n_iters=N_ITERS, backend="reference").plan()
    K = cosine(data.x, data.y)
    for name in CPU_PEERS:
        if PEERS[name].missing(CPU):
            continue
        f, g = PEERS[name].make(EPS, N_ITERS)(data.x, data.y)
        plan = ((f.float()[:, None] + g.float()[None, :] + K) / EPS).exp()
        error = float((plan - ours).abs().sum())  # L1 distance between plans of mass one
        bound = 0.1 if name == "geomloss-keops" else 1e-3
        assert error < bound, f"{name} solves a different problem (L1 plan distance {error:.3g})"
