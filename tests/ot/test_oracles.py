"""The reference backend against independent oracles: POT's log-domain Sinkhorn, finite
differences of the KLOT value (Theorem 5.1 on the implementation), hand-computed cases."""

from __future__ import annotations

import math

import ot
import pytest
import torch
from conftest import features, klot_problem, relative_error

import sotalign

CONVERGED = dict(n_iters=5000, tol=1e-12, check_every=1, symmetric=False)


def cosine(x, y):
    normalize = torch.nn.functional.normalize
    return normalize(x, dim=1) @ normalize(y, dim=1).T


@pytest.mark.parametrize("eps", [0.5, 0.05])
@pytest.mark.parametrize("n,m", [(30, 45), (17, 5)])
def test_reference_plan_matches_pot(n, m, eps):
    x, y = features(n, m, 6, seed=n)
    result = sotalign.sinkhorn(x, y, eps=eps, backend="reference", **CONVERGED)
    a = torch.full((n,), 1.0 / n, dtype=torch.float64)
    b = torch.full((m,), 1.0 / m, dtype=torch.float64)
    expected = ot.bregman.sinkhorn_log(a, b, -cosine(x, y), eps, numItermax=20000, stopThr=1e-14)
    assert relative_error(result.plan(), expected) < 1e-9


def test_reference_with_weights_matches_pot():
    x, y = features(25, 40, 5, seed=1)
    generator = torch.Generator().manual_seed(2)
    a = torch.rand(25, generator=generator, dtype=torch.float64) + 0.1
    b = torch.rand(40, generator=generator, dtype=torch.float64) + 0.1
    a, b = a / a.sum(), b / b.sum()
    result = sotalign.sinkhorn(x, y, eps=0.1, backend="reference", a=a, b=b, **CONVERGED)
    expected = ot.bregman.sinkhorn_log(a, b, -cosine(x, y), 0.1, numItermax=20000, stopThr=1e-14)
    assert relative_error(result.plan(), expected) < 1e-9


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_reference_matches_pot_iteration_by_iteration():
    """POT updates the columns first; on Kᵀ that is our row-first order, step for step."""
    x, y = features(12, 9, 4, seed=4)
    K = cosine(x, y)
    for n_iters in (1, 2, 7):
        ours = sotalign.sinkhorn_dense(K, eps=0.1, n_iters=n_iters, symmetric=False, backend="reference")
        pot = ot.bregman.sinkhorn_log(
            torch.full((9,), 1 / 9, dtype=torch.float64),
            torch.full((12,), 1 / 12, dtype=torch.float64),
            -K.T,
            0.1,
            numItermax=n_iters,
            stopThr=0.0,
        )
        assert relative_error(ours.plan(), pot.T) < 1e-12


def test_two_point_problem_by_hand():
    """For a 2×2 K = [[k, 0], [0, k]] the plan is [[p, q], [q, p]]/2 with p/q = exp(k/ε)."""
    k, eps = 0.3, 0.1
    K = torch.tensor([[k, 0.0], [0.0, k]], dtype=torch.float64)
    plan = sotalign.sinkhorn_dense(K, eps=eps, backend="reference", **CONVERGED).plan()
    p = math.exp(k / eps) / (1 + math.exp(k / eps))
    expected = torch.tensor([[p, 1 - p], [1 - p, p]], dtype=torch.float64) / 2
    torch.testing.assert_close(plan, expected, rtol=1e-12, atol=1e-15)


def test_identical_teacher_and_student_give_zero_loss():
    x, y = features(20, 20, 5)
    loss = sotalign.klot(x, y, x, y, eps=0.05, eps_teacher=0.05, backend="reference")
    assert abs(float(loss)) < 1e-12


@pytest.mark.parametrize("affinity", ["cosine", "dot"])
def test_klot_gradient_matches_finite_differences(affinity):
    x, y, x_teacher, y_teacher = klot_problem(9, 13, 5, 3, seed=7)
    options = dict(eps=0.2, eps_teacher=0.1, affinity=affinity, backend="reference", **CONVERGED)
    x.requires_grad_()
    y.requires_grad_()
    loss = sotalign.klot(x, y, x_teacher, y_teacher, **options)
    grad_x, grad_y = torch.autograd.grad(loss, (x, y))
    generator = torch.Generator().manual_seed(0)
    h = 1e-6
    for _ in range(3):
        dx = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        dy = torch.randn(y.shape, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            plus = sotalign.klot(x + h * dx, y + h * dy, x_teacher, y_teacher, **options)
            minus = sotalign.klot(x - h * dx, y - h * dy, x_teacher, y_teacher, **options)
        numeric = float(plus - minus) / (2 * h)
        analytic = float((grad_x * dx).sum() + (grad_y * dy).sum())
        assert abs(numeric - analytic) < 1e-6 * max(1.0, abs(analytic))


def test_dense_klot_gradient_matches_finite_differences():
    x, y, x_teacher, y_teacher = klot_problem(7, 6, 4, 4, seed=8)
    K, K_teacher = cosine(x, y).requires_grad_(), cosine(x_teacher, y_teacher)
    options = dict(eps=0.1, eps_teacher=0.05, backend="reference", **CONVERGED)
    (grad,) = torch.autograd.grad(sotalign.klot_dense(K, K_teacher, **options), K)
    direction = torch.randn(K.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        numeric = (
            sotalign.klot_dense(K + h * direction, K_teacher, **options)
            - sotalign.klot_dense(K - h * direction, K_teacher, **options)
        ) / (2 * h)
    assert abs(float(numeric) - float((grad * direction).sum())) < 1e-6
