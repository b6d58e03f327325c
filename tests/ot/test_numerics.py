"""No NaN or Inf in the hard corners: small ε in float32, identical points, n = 1, and very
rectangular batches."""

from __future__ import annotations

import pytest
import torch
from conftest import ROUTES, features, klot_problem, route_id

import sotalign


def finite_klot(x, y, x_teacher, y_teacher, route, **options):
    x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
    backend, path = route
    loss = sotalign.klot(x, y, x_teacher, y_teacher, backend=backend, path=path, **options)
    grad_x, grad_y = torch.autograd.grad(loss, (x, y))
    for name, t in (("loss", loss), ("grad_x", grad_x), ("grad_y", grad_y)):
        assert bool(torch.isfinite(t).all()), f"{name} is not finite"
    return loss.detach(), grad_x, grad_y


@pytest.mark.parametrize("route", ROUTES, ids=route_id)
@pytest.mark.parametrize("eps", [1e-3, 5e-3])
def test_small_eps_in_float32(route, eps):
    problem = klot_problem(50, 80, 16, 8, dtype=torch.float32)
    loss, _, _ = finite_klot(*problem, route, eps=eps, eps_teacher=eps)
    expected = sotalign.klot(*[t.double() for t in problem], eps=eps, eps_teacher=eps, backend="reference")
    assert abs(float(loss) - float(expected)) < 2e-3 * abs(float(expected)) + 1e-4


@pytest.mark.parametrize("route", ROUTES, ids=route_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_points(route, dtype):
    x = torch.ones(20, 6, dtype=dtype)
    y = torch.ones(30, 6, dtype=dtype)
    eps = 1e-3
    loss, grad_x, _ = finite_klot(x, y, x[:, :3], y[:, :3], route, eps=eps, eps_teacher=eps)
    # both plans are uniform; what remains is the rounding of (f + g + K) / ε
    rounding = 10 * torch.finfo(dtype).eps / eps
    assert abs(float(loss)) < rounding
    assert float(grad_x.abs().max()) < rounding


@pytest.mark.parametrize("route", ROUTES, ids=route_id)
def test_single_row_gives_zero_loss(route):
    """With n = 1 both plans equal b, so the loss and its gradient vanish."""
    problem = klot_problem(1, 40, 5, 3, dtype=torch.float32)
    loss, grad_x, grad_y = finite_klot(*problem, route, eps=0.01, eps_teacher=0.005)
    assert abs(float(loss)) < 1e-5
    assert float(grad_x.abs().max()) < 1e-3 and float(grad_y.abs().max()) < 1e-3
    eps = 1e-3
    result = sotalign.sinkhorn(problem[0], problem[1], eps=eps, backend=route[0], path=route[1])
    assert result.marginal_error < 10 * torch.finfo(torch.float32).eps / eps


@pytest.mark.parametrize("route", ROUTES, ids=route_id)
@pytest.mark.parametrize("n,m", [(2, 3000), (3000, 2)])
def test_very_rectangular_batches(route, n, m):
    problem = klot_problem(n, m, 8, 4, dtype=torch.float32, seed=n)
    loss, _, _ = finite_klot(*problem, route, eps=0.005, eps_teacher=0.001, n_iters=30)
    expected = sotalign.klot(
        *[t.double() for t in problem], eps=0.005, eps_teacher=0.001, n_iters=30, backend="reference"
    )
    assert abs(float(loss) - float(expected)) < 2e-3 * abs(float(expected)) + 1e-4


@pytest.mark.parametrize("route", ROUTES, ids=route_id)
def test_half_precision_inputs_are_computed_in_float32(route):
    x, y = features(12, 9, 4, dtype=torch.float16)
    result = sotalign.sinkhorn(x, y, eps=0.01, backend=route[0], path=route[1])
    assert result.f.dtype == torch.float32
    assert bool(torch.isfinite(result.f).all() and torch.isfinite(result.g).all())
