"""Every backend and path against the float64 reference: Sinkhorn potentials and plans, the
KLOT value and gradients, with cosine and dot affinities, on rectangular shapes."""

from __future__ import annotations

import pytest
import torch
from conftest import features, klot_problem, relative_error

import sotalign

SHAPES = [(1, 9), (9, 1), (37, 101), (130, 66)]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("affinity", ["cosine", "dot"])
@pytest.mark.parametrize("eps", [0.5, 0.05, 0.005])
@pytest.mark.parametrize("n,m", SHAPES)
def test_sinkhorn_matches_reference(fast_route, n, m, eps, affinity, dtype):
    x, y = features(n, m, 7, seed=n + m)
    if affinity == "dot":
        x, y = x / 3, y / 3
    expected = sotalign.sinkhorn(x, y, eps=eps, affinity=affinity, backend="reference")
    backend, path = fast_route
    result = sotalign.sinkhorn(
        x.to(dtype), y.to(dtype), eps=eps, affinity=affinity, backend=backend, path=path
    )
    assert (result.backend, result.path) == (backend, path)
    assert result.f.dtype == dtype and result.g.dtype == dtype
    tolerance = TOLERANCE[dtype]
    # potentials are compared in units of ε: that is the error in log P
    scale = eps * (expected.f.abs().max() + expected.g.abs().max() + 1)
    assert float((result.f.double() - expected.f).abs().max() / scale) < tolerance
    assert float((result.g.double() - expected.g).abs().max() / scale) < tolerance
    assert relative_error(result.plan(), expected.plan()) < tolerance
    assert abs(result.marginal_error - expected.marginal_error) < 10 * tolerance


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("affinity", ["cosine", "dot"])
@pytest.mark.parametrize("n,m,d,d_teacher", [(2, 40, 5, 3), (37, 101, 12, 20), (130, 66, 33, 8)])
def test_klot_matches_reference(fast_route, n, m, d, d_teacher, affinity, dtype):
    problem = klot_problem(n, m, d, d_teacher, seed=n)
    if affinity == "dot":
        problem = [t / t.norm(dim=1).mean() for t in problem]
    options = dict(eps=0.05, eps_teacher=0.01, n_iters=60, affinity=affinity)

    def run(tensors, **route):
        x, y, x_teacher, y_teacher = tensors
        x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
        loss = sotalign.klot(x, y, x_teacher, y_teacher, **options, **route)
        return (loss.detach(), *torch.autograd.grad(loss, (x, y)))

    expected = run(problem, backend="reference")
    backend, path = fast_route
    result = run([t.to(dtype) for t in problem], backend=backend, path=path)
    for value, reference in zip(result, expected, strict=True):
        assert value.dtype == dtype
        assert relative_error(value, reference) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_dense_klot_matches_reference(fast_route, dtype):
    x, y, x_teacher, y_teacher = klot_problem(45, 23, 6, 6, seed=5)
    K, K_teacher = x @ y.T / 6, x_teacher @ y_teacher.T / 6

    def run(K, backend):
        K = K.detach().requires_grad_()
        loss = sotalign.klot_dense(K, K_teacher.to(K.dtype), eps=0.05, eps_teacher=0.01, backend=backend)
        return loss.detach(), torch.autograd.grad(loss, K)[0]

    expected_loss, expected_grad = run(K, "reference")
    loss, grad = run(K.to(dtype), fast_route[0])
    assert relative_error(loss, expected_loss) < TOLERANCE[dtype]
    assert relative_error(grad, expected_grad) < TOLERANCE[dtype]
