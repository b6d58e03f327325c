"""Hypothesis property tests: marginals, permutation equivariance, scale invariance."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ROUTES, features, route_id
from hypothesis import given, settings
from hypothesis import strategies as st

import sotalign

problems = st.tuples(
    st.integers(1, 24),
    st.integers(1, 24),
    st.integers(1, 6),
    st.sampled_from([1.0, 0.3, 0.05]),
    st.integers(0, 2**16),
)


def solve(x, y, eps, route, **options):
    backend, path = route
    return sotalign.sinkhorn(x, y, eps=eps, backend=backend, path=path, **options)


@pytest.mark.parametrize("route", ROUTES, ids=route_id)
@settings(max_examples=25, deadline=None)
@given(problem=problems)
def test_alternating_sinkhorn_makes_column_marginal_exact(route, problem):
    n, m, d, eps, seed = problem
    x, y = features(n, m, d, seed=seed)
    result = solve(x, y, eps, route, n_iters=30, symmetric=False)
    plan = result.plan()
    torch.testing.assert_close(
        plan.sum(0), torch.full((m,), 1 / m, dtype=torch.float64), rtol=1e-9, atol=1e-12
    )
    assert math.isclose(float(plan.sum()), 1.0, rel_tol=1e-9)
    assert result.marginal_error >= 0


@pytest.mark.parametrize("route", ROUTES, ids=route_id)
@settings(max_examples=15, deadline=None)
@given(problem=problems)
def test_converged_plan_has_both_marginals(route, problem):
    n, m, d, eps, seed = problem
    x, y = features(n, m, d, seed=seed)
    result = solve(x, y, max(eps, 0.3), route, n_iters=5000, tol=1e-10, check_every=5)
    plan = result.plan()
    assert result.marginal_error < 1e-9
    torch.testing.assert_close(plan.sum(1), torch.full((n,), 1 / n, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("route", ROUTES, ids=route_id)
@settings(max_examples=20, deadline=None)
@given(problem=problems)
def test_permutation_equivariance(route, problem):
    n, m, d, eps, seed = problem
    x, y = features(n, m, d, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    rows, cols = torch.randperm(n, generator=generator), torch.randperm(m, generator=generator)
    plan = solve(x, y, eps, route, n_iters=40).plan()
    permuted = solve(x[rows], y[cols], eps, route, n_iters=40).plan()
    torch.testing.assert_close(permuted, plan[rows][:, cols], rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("route", ROUTES, ids=route_id)
@settings(max_examples=20, deadline=None)
@given(problem=problems, scale=st.floats(1e-3, 1e3))
def test_cosine_affinity_ignores_feature_scale(route, problem, scale):
    n, m, d, eps, seed = problem
    (
        x,
        y,
    ) = features(n, m, d, seed=seed)
    x_teacher, y_teacher = features(n, m, 3, seed=seed + 1)
    generator = torch.Generator().manual_seed(seed)
    row_scales = torch.rand(n, 1, generator=generator, dtype=torch.float64) * scale + 1e-3
    backend, path = route
    loss = sotalign.klot(x, y, x_teacher, y_teacher, n_iters=30, backend=backend, path=path)
    scaled = sotalign.klot(
        x * row_scales, y * scale, x_teacher * 7.0, y_teacher, n_iters=30, backend=backend, path=path
    )
    assert math.isclose(float(loss), float(scaled), rel_tol=1e-9, abs_tol=1e-12)
