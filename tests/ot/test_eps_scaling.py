"""ε-scaling: the annealing schedule, its starting ε, and that it reaches the fp64 reference
plan at the target ε in fewer iterations than a plain solve."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import features, relative_error

import sotalign
from sotalign.kernels import Affinity
from sotalign.ot.sinkhorn import affinity_spread, eps_schedule


def test_schedule_by_hand():
    assert eps_schedule(0.01, 6, 0.5, 0.08) == [0.08, 0.04, 0.02, 0.01, 0.01, 0.01]
    # the levels count toward n_iters, even when they do not reach the target
    assert eps_schedule(0.01, 2, 0.5, 0.08) == [0.08, 0.04]
    assert eps_schedule(0.05, 3, None, None) == [0.05] * 3
    # starting at or below the target: no annealing
    assert eps_schedule(0.05, 3, 0.5, 0.05) == [0.05] * 3


def test_spread_bounds_the_affinity():
    x, y = features(30, 20, 6)
    K = x @ y.T
    spread = float(K.max() - K.min())
    assert affinity_spread(Affinity.from_dense(K)) == pytest.approx(spread, rel=1e-15)
    bound = affinity_spread(Affinity.from_features(x, y))
    assert spread <= bound <= 2 * float(x.norm(dim=1).max() * y.norm(dim=1).max()) * (1 + 1e-15)
    unit = torch.nn.functional.normalize
    assert affinity_spread(Affinity.from_features(unit(x, dim=1), unit(y, dim=1))) == pytest.approx(2.0)


@pytest.mark.parametrize("n,m,d,seed", [(60, 80, 5, 0), (120, 90, 8, 1)])
def test_reaches_the_reference_plan_in_fewer_iterations(n, m, d, seed):
    """Measured with tol = 1e-4 at ε = 0.01 (torch backend): 340 → 290 and 690 → 550
    iterations for these two problems with factor 0.9; the plan is as close to the converged
    fp64 reference as the plain solve's."""
    x, y = features(n, m, d, seed=seed)
    reference = sotalign.sinkhorn(x, y, eps=0.01, n_iters=100000, tol=1e-11, backend="reference")
    options = dict(eps=0.01, n_iters=100000, tol=1e-4, backend="torch")
    plain = sotalign.sinkhorn(x, y, **options)
    scaled = sotalign.sinkhorn(x, y, eps_scaling=0.9, **options)
    assert scaled.eps == 0.01 and scaled.marginal_error < 1e-4
    assert relative_error(scaled.plan(), reference.plan()) < 2e-3
    assert relative_error(plain.plan(), reference.plan()) < 2e-3
    assert scaled.n_iters < plain.n_iters


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_every_route_anneals_the_same_way(backend):
    if backend not in sotalign.available_backends():
        pytest.skip(f"backend {backend!r} is not available")
    x, y = features(25, 35, 4)
    expected = sotalign.sinkhorn(x, y, eps=0.02, n_iters=30, eps_scaling=0.6, backend="reference")
    result = sotalign.sinkhorn(x, y, eps=0.02, n_iters=30, eps_scaling=0.6, backend=backend)
    assert result.n_iters == 30
    assert relative_error(result.plan(), expected.plan()) < 1e-10
    # the annealed solve differs from the plain one after 30 iterations
    plain = sotalign.sinkhorn(x, y, eps=0.02, n_iters=30, backend="reference")
    assert relative_error(plain.plan(), expected.plan()) > 1e-6


def test_annealing_by_hand():
    """Three levels from the spread of a dense K, each one row and one column update."""
    x, y = features(7, 9, 3)
    K = x @ y.T / 10
    spread = float(K.max() - K.min())
    eps, factor = spread / 5, 0.5
    f, g = None, torch.zeros(9, dtype=torch.float64)
    log_a, log_b = -math.log(7), -math.log(9)
    for level in (spread, spread / 2, spread / 4, eps, eps):
        f = level * (log_a - torch.logsumexp((K + g) / level, dim=1))
        g = level * (log_b - torch.logsumexp((K + f[:, None]) / level, dim=0))
    result = sotalign.sinkhorn_dense(
        K, eps=eps, n_iters=5, eps_scaling=factor, symmetric=False, backend="reference"
    )
    torch.testing.assert_close(result.f, f, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(result.g, g, rtol=1e-13, atol=1e-15)


def test_warm_start_composes_with_eps_scaling():
    x, y = features(40, 30, 5)
    converged = sotalign.sinkhorn(x, y, eps=0.02, n_iters=20000, tol=1e-10, backend="torch")
    # from a result at the target ε there is nothing to anneal: it is done at once
    restarted = sotalign.sinkhorn(
        x,
        y,
        eps=0.02,
        n_iters=20000,
        tol=1e-9,
        check_every=1,
        backend="torch",
        warm_start=converged,
        eps_scaling=0.5,
    )
    assert restarted.n_iters <= 2
    assert relative_error(restarted.plan(), converged.plan()) < 1e-8
    # from a result at a larger ε, annealing starts at that ε and reaches the same plan
    coarse = sotalign.sinkhorn(x, y, eps=0.2, n_iters=20000, tol=1e-10, backend="torch")
    annealed = sotalign.sinkhorn(
        x, y, eps=0.02, n_iters=20000, tol=1e-10, backend="torch", warm_start=coarse, eps_scaling=0.5
    )
    assert relative_error(annealed.plan(), converged.plan()) < 1e-7
    # an (f, g) pair carries no ε: annealing starts from the spread of K
    pair = sotalign.sinkhorn(
        x,
        y,
        eps=0.02,
        n_iters=20000,
        tol=1e-10,
        backend="torch",
        warm_start=(coarse.f, coarse.g),
        eps_scaling=0.5,
    )
    assert relative_error(pair.plan(), converged.plan()) < 1e-7


def test_klot_with_eps_scaling_matches_the_reference():
    from conftest import klot_problem

    x, y, x_teacher, y_teacher = klot_problem(30, 26, 5, 3)
    options = dict(eps=0.05, eps_teacher=0.01, n_iters=2000, tol=1e-9, eps_scaling=0.7)
    values = [
        sotalign.klot(x, y, x_teacher, y_teacher, backend=backend, **options)
        for backend in ("reference", "torch")
    ]
    assert relative_error(values[1], values[0]) < 1e-8


@pytest.mark.parametrize(
    "bad,error",
    [
        (1.0, ValueError),
        (0.0, ValueError),
        (-0.5, ValueError),
        (1.5, ValueError),
        ("0.5", TypeError),
        (True, TypeError),
    ],
)
def test_bad_factor(bad, error):
    x, y = features(5, 6, 3)
    with pytest.raises(error, match="eps_scaling must be"):
        sotalign.sinkhorn(x, y, eps_scaling=bad)
    with pytest.raises(error, match="eps_scaling must be"):
        sotalign.klot(x, y, x, y, eps_scaling=bad)
