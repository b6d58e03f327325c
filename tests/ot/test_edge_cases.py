"""Numerical edge cases of the front: huge inputs, overflowing
affinities, solves that did not converge, double backward, and tensors that are not plain
dense matrices. Every check is against the unscaled problem or a clear error, never a number
hard-coded from a previous run."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import klot_problem, relative_error

import sotalign

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_cosine_klot_ignores_the_scale_of_each_row(any_route, scale):
    """K = cos(x, y) does not depend on the rows' lengths, so neither do KLOT and, up to the
    chain rule's 1/scale, its gradient; in float32 a norm of entries near 1e20 overflows."""
    backend, path = any_route
    x, y, x_t, y_t = (t.float() for t in klot_problem(30, 40, 8, 4))
    options = dict(backend=backend, path=path, n_iters=30)

    def value_and_grad(s):
        xs = (x * s).requires_grad_()
        value = sotalign.klot(xs, y, x_t * s, y_t, **options)
        value.backward()
        return value.detach(), xs.grad * s

    value, grad = value_and_grad(1.0)
    scaled_value, scaled_grad = value_and_grad(scale)
    assert relative_error(scaled_value, value) < 1e-5
    assert relative_error(scaled_grad, grad) < 1e-4


def test_dot_affinities_that_overflow_are_refused():
    x, y, x_t, y_t = (t.float() for t in klot_problem(10, 12, 4, 2))
    with pytest.raises(ValueError, match=r"x, y: affinities reach .* overflows torch\.float32"):
        sotalign.klot(x * 1e20, y * 1e20, x_t, y_t, cost="dot")
    with pytest.raises(ValueError, match=r"x_teacher, y_teacher: affinities reach"):
        sotalign.klot(x, y, x_t * 1e20, y_t * 1e20, cost="dot")
    with pytest.raises(ValueError, match=r"x, y: affinities reach"):
        sotalign.sinkhorn(x * 1e20, y * 1e20, cost="dot")
    # the same inputs in float64 are representable: a finite loss
    assert torch.isfinite(
        sotalign.klot(x.double() * 1e20, y.double() * 1e20, x_t.double(), y_t.double(), cost="dot")
    )


def test_a_dense_affinity_near_the_float32_limit_is_refused():
    K = torch.full((5, 6), 3e38)
    with pytest.raises(ValueError, match=r"^K: affinities reach 3e\+38"):
        sotalign.klot_dense(K, torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"K_teacher: affinities reach"):
        sotalign.klot_dense(torch.randn(5, 6), K)
    with pytest.raises(ValueError, match=r"K: affinities reach"):
        sotalign.sinkhorn_dense(K)


def _solve_warnings(**kwargs) -> list[str]:
    x, y = (t.float() for t in klot_problem(40, 50, 6, 2)[:2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sotalign.sinkhorn(x, y, **kwargs)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return result, messages


def test_eps_too_small_for_the_dtype_is_named():
    result, messages = _solve_warnings(eps=1e-8)
    assert result.marginal_error > 1e-2
    assert len(messages) == 1 and "eps = 1e-08 is too small for torch.float32" in messages[0]


def test_too_few_iterations_for_the_eps_schedule_is_named():
    result, messages = _solve_warnings(eps=0.01, eps_scaling=0.999999)
    assert result.marginal_error > 1e-2
    assert len(messages) == 1 and "too few for eps = 0.01" in messages[0] and "eps_scaling" in messages[0]


def test_a_converged_solve_does_not_warn():
    result, messages = _solve_warnings(eps=0.05)
    assert result.marginal_error < 1e-3 and messages == []


def test_double_backward_is_a_clear_error():
    x, y, x_t, y_t = klot_problem(12, 14, 4, 2)
    x.requires_grad_()
    (grad,) = torch.autograd.grad(sotalign.klot(x, y, x_t, y_t), x, create_graph=True)
    with pytest.raises(RuntimeError, match="sotalign's OT losses have no second derivative"):
        grad.sum().backward()
    K = torch.randn(6, 7, dtype=torch.float64, requires_grad=True)
    (grad_K,) = torch.autograd.grad(sotalign.klot_dense(K, torch.randn(6, 7)), K, create_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad_K.sum().backward()
    p = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    (grad_p,) = torch.autograd.grad(
        sotalign.sinkhorn_divergence(p, torch.randn(4, 2, dtype=torch.float64)), p, create_graph=True
    )
    with pytest.raises(RuntimeError, match="no second derivative"):
        grad_p.sum().backward()


def test_plan_products_check_their_operand():
    x, y = klot_problem(10, 12, 4, 2)[:2]
    result = sotalign.sinkhorn(x, y)
    V = torch.randn(12, 3, dtype=torch.float64)
    V[4, 1] = float("nan")
    with pytest.raises(ValueError, match="V contains NaN or Inf"):
        result.apply(V)
    with pytest.raises(ValueError, match=r"V must have shape \(12, k\)"):
        result.apply(torch.randn(10, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"U must have shape \(10, k\)"):
        result.apply_t(torch.randn(12, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    "make",
    [lambda: torch.randn(5, 3).to_sparse(), lambda: torch.empty(5, 3, device="meta")],
    ids=["sparse", "meta"],
)
def test_sparse_and_meta_tensors_are_type_errors(make):
    with pytest.raises(TypeError, match="x (must be a dense|is a meta tensor)"):
        sotalign.sinkhorn(make(), torch.randn(4, 3))
    with pytest.raises(TypeError, match="x (must be a dense|is a meta tensor)"):
        sotalign.klot(make(), torch.randn(5, 3), torch.randn(5, 2), torch.randn(5, 2))
