"""Sinkhorn speed: sotalign against its peers on one problem.

The problem: cosine affinity K between n = m seeded fp32 feature rows, cost −K, ε = 0.05,
uniform marginals of mass one, 100 fixed iterations, starting from the raw features (every
provider normalises the rows and forms or streams K inside the timed call).

Peers on the same problem:
* ``paper-dense``: the SOTAlign authors' dense torch loop (:func:`paper_sinkhorn`).
* ``pot-sinkhorn_log``: POT ``ot.bregman.sinkhorn_log(a, b, M=−K, reg=ε)`` on torch
  tensors, ``stopThr=0`` so it runs all 100 iterations (POT also checks the marginal
  error every 10 iterations and returns the dense plan: that is its algorithm as shipped).
* ``geomloss-keops``: GeomLoss ``SamplesLoss("sinkhorn", p=2, backend="online")`` on the
  unit rows. There the cost is |x − y|²/2 = 1 − K (same plan as cost −K) and ε = blur², so
  blur = √ε. GeomLoss always anneals ε (ε-scaling from diameter² down to blur²) with
  symmetric averaged updates; ``scaling`` is set so the schedule has ~100 steps, so it does
  about the same number of log-sum-exp passes but only its last steps are at ε = 0.05: its
  plan ends ~0.04 (L1) from the converged ε = 0.05 plan at n = 128, where the fixed-ε
  solvers are within 1e-4 (they need ~1000 steps to get to 0.01). ``debias=False`` (one OT
  problem, not three). Needs ``geomloss`` and ``pykeops``; skipped without them, and at
  shapes where KeOps' CPU code would take minutes per call.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import sotalign
from sotalign.ot.paper import paper_sinkhorn

EPS = 0.05
N_ITERS = 100
#: Largest n·m·d GeomLoss/KeOps is timed at (KeOps' CPU reductions run ~4 GFLOP/s here).
GEOMLOSS_MAX_WORK = 2048 * 2048 * 64


def _setup(problem, sinkhorn_shape):
    n, d = sinkhorn_shape
    data = problem(n, d)
    meta = dict(
        suite="sinkhorn",
        group=f"sinkhorn n={n} d={d}",
        n=n,
        m=n,
        d=d,
        eps=EPS,
        n_iters=N_ITERS,
        dtype="float32",
    )
    return data, meta


def test_sotalign(benchmark, bench, problem, sinkhorn_shape, variant):
    """sotalign.sinkhorn with one backend/path (``auto`` is what users get)."""
    label, backend, path = variant
    data, meta = _setup(problem, sinkhorn_shape)
    result = bench(
        benchmark,
        lambda: sotalign.sinkhorn(data.x, data.y, EPS, N_ITERS, backend=backend, path=path),
        provider=label,
        requested_backend=backend,
        requested_path=path,
        **meta,
    )
    assert torch.isfinite(result.f).all() and torch.isfinite(result.g).all()


def test_paper_dense(benchmark, bench, problem, cosine, sinkhorn_shape):
    """The paper's dense torch loop (100 iterations plus its symmetric step)."""
    data, meta = _setup(problem, sinkhorn_shape)
    log_plan, _, _ = bench(
        benchmark,
        lambda: paper_sinkhorn(cosine(data.x, data.y), EPS, N_ITERS),
        provider="paper-dense",
        backend="paper",
        path="dense",
        **meta,
    )
    assert torch.isfinite(log_plan).all()


def pot_sinkhorn_log(x, y, eps, n_iters, cosine):
    """POT's log-domain Sinkhorn on the same problem; returns the dense plan."""
    ot = pytest.importorskip("ot")
    M = -cosine(x, y)
    n, m = M.shape
    a = torch.full((n,), 1.0 / n, dtype=M.dtype)
    b = torch.full((m,), 1.0 / m, dtype=M.dtype)
    return ot.bregman.sinkhorn_log(a, b, M, eps, numItermax=n_iters, stopThr=0, warn=False)


def test_pot(benchmark, bench, problem, cosine, sinkhorn_shape):
    """POT ``sinkhorn_log`` with torch tensors."""
    pytest.importorskip("ot")
    data, meta = _setup(problem, sinkhorn_shape)
    plan = bench(
        benchmark,
        lambda: pot_sinkhorn_log(data.x, data.y, EPS, N_ITERS, cosine),
        provider="pot-sinkhorn_log",
        backend="pot",
        path="dense",
        **meta,
    )
    assert torch.isfinite(plan).all()


def geomloss_solver(eps: float, n_iters: int):
    """A GeomLoss online (KeOps) solver of the same OT problem on unit rows, returning (F, G).

    On unit vectors the diameter is 2; ``scaling`` makes the ε schedule
    (diameter² → … → blur²) about ``n_iters`` steps long.
    """
    geomloss = pytest.importorskip("geomloss")
    pytest.importorskip("pykeops")
    blur, diameter = math.sqrt(eps), 2.0
    scaling = (blur / diameter) ** (1.0 / n_iters)
    return geomloss.SamplesLoss(
        "sinkhorn",
        p=2,
        blur=blur,
        diameter=diameter,
        scaling=scaling,
        debias=False,
        potentials=True,
        backend="online",
    )


def geomloss_plan(solver, x, y, eps):
    """The plan from GeomLoss potentials: π_ij = a_i b_j exp((F_i + G_j − (1 − K_ij)) / ε)."""
    x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    F, G = solver(x, y)
    n, m = x.shape[0], y.shape[0]
    return torch.exp((F.reshape(n, 1) + G.reshape(1, m) - (1 - x @ y.T)) / eps) / (n * m)


def test_geomloss_keops(benchmark, bench, problem, sinkhorn_shape):
    """GeomLoss ``backend="online"`` (KeOps), ε-scaling schedule of ~100 steps."""
    solver = geomloss_solver(EPS, N_ITERS)
    n, d = sinkhorn_shape
    if n * n * d > GEOMLOSS_MAX_WORK:
        pytest.skip(f"GeomLoss/KeOps on CPU would take minutes per call at n={n}, d={d}")
    data, meta = _setup(problem, sinkhorn_shape)
    unit = torch.nn.functional.normalize
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F, G = bench(
            benchmark,
            lambda: solver(unit(data.x, dim=1), unit(data.y, dim=1)),
            provider="geomloss-keops",
            backend="keops",
            path="online",
            note="eps-scaling schedule, symmetric updates",
            **meta,
        )
    assert torch.isfinite(F).all() and torch.isfinite(G).all()


def test_peers_solve_the_same_problem(problem, cosine):
    """Not timed: every provider's plan agrees with sotalign's on a small instance.

    GeomLoss anneals ε, so after ~100 steps it is only near the ε = 0.05 plan (see top).
    """
    data = problem(128, 16)
    ours = sotalign.sinkhorn(data.x, data.y, EPS, N_ITERS).plan()
    log_plan, _, _ = paper_sinkhorn(cosine(data.x, data.y), EPS, N_ITERS)
    plans = {
        "paper-dense": log_plan.exp(),
        "pot-sinkhorn_log": pot_sinkhorn_log(data.x, data.y, EPS, N_ITERS, cosine),
    }
    try:
        plans["geomloss-keops"] = geomloss_plan(geomloss_solver(EPS, N_ITERS), data.x, data.y, EPS)
    except pytest.skip.Exception:
        pass
    for name, plan in plans.items():
        error = float((plan - ours).abs().sum())  # L1 distance between plans of mass one
        assert error < (0.1 if name == "geomloss-keops" else 1e-3), (
            f"{name} solves a different problem (L1 plan distance {error:.3g})"
        )
