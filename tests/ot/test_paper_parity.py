"""sotalign must reproduce the SOTAlign authors' algorithm: 100 fixed iterations plus the
symmetric step, value and gradient. Oracle: the paper's dense torch code run in float64."""

from __future__ import annotations

import pytest
import torch
from conftest import ROUTES, klot_problem, relative_error, route_id

import sotalign
from sotalign.ot.paper import paper_klot, paper_klot_features

EPS_PAIRS = [(0.05, 0.01), (0.01, 0.005), (0.005, 0.005)]
SHAPES = [(40, 67, 24, 12), (96, 33, 16, 16)]


def paper_oracle(x, y, x_teacher, y_teacher, eps, eps_teacher):
    x, y = x.double().requires_grad_(), y.double().requires_grad_()
    loss = paper_klot_features(x, y, x_teacher.double(), y_teacher.double(), eps, eps_teacher, 100)
    grad_x, grad_y = torch.autograd.grad(loss, (x, y))
    return loss.detach(), grad_x, grad_y


@pytest.mark.parametrize("route", ROUTES, ids=route_id)
@pytest.mark.parametrize("eps,eps_teacher", EPS_PAIRS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "dtype,tolerance", [(torch.float64, 1e-7), (torch.float32, 2e-3)], ids=["fp64", "fp32"]
)
def test_klot_matches_paper(route, eps, eps_teacher, shape, dtype, tolerance):
    problem = klot_problem(*shape, dtype=torch.float64, seed=sum(shape))
    expected_loss, expected_gx, expected_gy = paper_oracle(*problem, eps, eps_teacher)
    x, y, x_teacher, y_teacher = (t.to(dtype) for t in problem)
    x.requires_grad_()
    y.requires_grad_()
    backend, path = route
    loss = sotalign.klot(
        x, y, x_teacher, y_teacher, eps=eps, eps_teacher=eps_teacher, n_iters=100, backend=backend, path=path
    )
    grad_x, grad_y = torch.autograd.grad(loss, (x, y))
    assert loss.dtype == dtype and loss.dim() == 0
    assert relative_error(loss.detach(), expected_loss) < tolerance
    assert relative_error(grad_x, expected_gx) < tolerance
    assert relative_error(grad_y, expected_gy) < tolerance


@pytest.mark.parametrize("route", ROUTES, ids=route_id)
@pytest.mark.parametrize(
    "dtype,tolerance", [(torch.float64, 1e-7), (torch.float32, 2e-3)], ids=["fp64", "fp32"]
)
def test_klot_dense_matches_paper(route, dtype, tolerance):
    x, y, x_teacher, y_teacher = klot_problem(50, 31, 8, 8, seed=3)
    normalize = torch.nn.functional.normalize
    K = normalize(x, dim=1) @ normalize(y, dim=1).T
    K_teacher = normalize(x_teacher, dim=1) @ normalize(y_teacher, dim=1).T
    K_oracle = K.clone().requires_grad_()
    expected = paper_klot(K_oracle, K_teacher, 0.05, 0.005, 100)
    (expected_grad,) = torch.autograd.grad(expected, K_oracle)

    K_ours = K.to(dtype).requires_grad_()
    loss = sotalign.klot_dense(K_ours, K_teacher.to(dtype), eps=0.05, eps_teacher=0.005, backend=route[0])
    (grad,) = torch.autograd.grad(loss, K_ours)
    assert relative_error(loss.detach(), expected.detach()) < tolerance
    assert relative_error(grad, expected_grad) < tolerance


def test_loss_module_and_grad_output_scaling():
    """KLOTLoss is the functional API; the backward scales by the incoming gradient."""
    x, y, x_teacher, y_teacher = klot_problem(20, 30, 8, 4)
    x.requires_grad_()
    criterion = sotalign.KLOTLoss(eps=0.05, eps_teacher=0.01, n_iters=50)
    loss = criterion(x, y, x_teacher, y_teacher)
    assert torch.equal(loss.detach(), sotalign.klot(x, y, x_teacher, y_teacher, n_iters=50).detach())
    (grad_one,) = torch.autograd.grad(loss, x)
    (grad_scaled,) = torch.autograd.grad(-2.5 * criterion(x, y, x_teacher, y_teacher), x)
    torch.testing.assert_close(grad_scaled, -2.5 * grad_one)
