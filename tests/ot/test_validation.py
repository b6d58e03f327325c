"""Every kind of bad input gets a ValueError or TypeError that names the problem."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import klot_problem

import sotalign
from sotalign.ot import validation as check


@pytest.fixture
def problem():
    return klot_problem(6, 7, 4, 3, dtype=torch.float32)


def call_klot(problem, **changes):
    arguments = dict(zip(("x", "y", "x_teacher", "y_teacher"), problem, strict=True))
    arguments.update(changes)
    return sotalign.klot(**arguments)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["x", "y", "x_teacher", "y_teacher"])
def test_non_finite_inputs(problem, name, bad):
    index = ("x", "y", "x_teacher", "y_teacher").index(name)
    broken = problem[index].clone()
    broken[1, 2] = bad
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        call_klot(problem, **{name: broken})


def test_non_finite_dense_and_sinkhorn_inputs(problem):
    K = torch.zeros(3, 4)
    K[0, 0] = math.nan
    with pytest.raises(ValueError, match="K contains NaN or Inf"):
        sotalign.sinkhorn_dense(K)
    with pytest.raises(ValueError, match="K_teacher contains NaN or Inf"):
        sotalign.klot_dense(torch.zeros(3, 4), K)
    with pytest.raises(ValueError, match="y contains NaN or Inf"):
        sotalign.sinkhorn(problem[0], torch.full((3, 4), math.inf))


@pytest.mark.parametrize("eps", [0.0, -0.05, math.nan, math.inf])
def test_bad_eps(problem, eps):
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        call_klot(problem, eps=eps)
    with pytest.raises(ValueError, match="eps_teacher must be a finite number > 0"):
        call_klot(problem, eps_teacher=eps)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        sotalign.sinkhorn(problem[0], problem[1], eps=eps)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        sotalign.KLOTLoss(eps=eps)


def test_eps_of_wrong_type(problem):
    with pytest.raises(TypeError, match="eps must be a real number"):
        call_klot(problem, eps="0.05")


def test_feature_dimension_mismatch(problem):
    x, y, x_teacher, y_teacher = problem
    with pytest.raises(ValueError, match="x and y must have the same feature dimension"):
        call_klot(problem, y=torch.randn(7, 5))
    with pytest.raises(ValueError, match="x_teacher and y_teacher must have the same feature dimension"):
        call_klot(problem, y_teacher=torch.randn(7, 2))
    with pytest.raises(ValueError, match="x and y must have the same feature dimension"):
        sotalign.sinkhorn(x, torch.randn(7, 5))


def test_teacher_rows_differ_from_student_rows(problem):
    with pytest.raises(ValueError, match="teacher rows must match the student rows"):
        call_klot(problem, x_teacher=torch.randn(5, 3))
    with pytest.raises(ValueError, match="teacher rows must match the student rows"):
        call_klot(problem, y_teacher=torch.randn(8, 3))


@pytest.mark.parametrize("shape", [(0, 4), (6, 0)])
def test_empty_batches(problem, shape):
    with pytest.raises(ValueError, match="x is empty"):
        call_klot(problem, x=torch.randn(shape))
    with pytest.raises(ValueError, match="K is empty"):
        sotalign.sinkhorn_dense(torch.randn(*shape))


@pytest.mark.parametrize("shape", [(6,), (2, 3, 4), ()])
def test_inputs_not_2d(problem, shape):
    with pytest.raises(ValueError, match="x must be 2-D"):
        call_klot(problem, x=torch.randn(shape))
    with pytest.raises(ValueError, match="K must be 2-D"):
        sotalign.klot_dense(torch.randn(shape), torch.randn(2, 2))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_dtypes(problem, dtype):
    with pytest.raises(TypeError, match="y must have a floating-point dtype"):
        call_klot(problem, y=torch.ones(7, 4, dtype=dtype))
    with pytest.raises(TypeError, match="K must have a floating-point dtype"):
        sotalign.sinkhorn_dense(torch.ones(3, 3, dtype=dtype))


def test_not_a_tensor(problem):
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        call_klot(problem, x=[[1.0, 2.0]])


@pytest.mark.parametrize("n_iters", [0, -3])
def test_n_iters_below_one(problem, n_iters):
    with pytest.raises(ValueError, match="n_iters must be >= 1"):
        call_klot(problem, n_iters=n_iters)
    with pytest.raises(ValueError, match="n_iters must be >= 1"):
        sotalign.sinkhorn(problem[0], problem[1], n_iters=n_iters)


def test_n_iters_not_an_integer(problem):
    with pytest.raises(TypeError, match="n_iters must be an integer"):
        call_klot(problem, n_iters=10.5)


@pytest.mark.parametrize("backend", ["cuda", "gpu", "keops-typo", ""])
def test_unknown_backend(problem, backend):
    with pytest.raises(ValueError, match=f"unknown backend {backend!r}"):
        call_klot(problem, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        sotalign.sinkhorn_dense(torch.zeros(2, 2), backend=backend)


def test_unknown_affinity_and_path(problem):
    with pytest.raises(ValueError, match="unknown cost 'euclid'"):
        call_klot(problem, cost="euclid")
    with pytest.raises(ValueError, match="unknown path 'sparse'"):
        call_klot(problem, path="sparse")


def test_dense_matrices_of_different_shapes():
    with pytest.raises(ValueError, match="K and K_teacher must have the same shape"):
        sotalign.klot_dense(torch.zeros(3, 4), torch.zeros(4, 3))


def test_devices_that_differ(problem):
    """Without a second real device here, the device check itself, on a meta tensor (which the
    entry points refuse earlier, as a tensor without values)."""
    x = problem[0]
    with pytest.raises(ValueError, match="same device.*y on meta"):
        check.check_same_device(x=x, y=torch.empty(7, 4, device="meta"))
    with pytest.raises(TypeError, match="y is a meta tensor"):
        call_klot(problem, y=torch.empty(7, 4, device="meta"))
    with pytest.raises(TypeError, match="K_teacher is a meta tensor"):
        sotalign.klot_dense(torch.zeros(3, 4), torch.empty(3, 4, device="meta"))


def test_bad_weights(problem):
    x, y = problem[0], problem[1]
    with pytest.raises(ValueError, match="a must have shape"):
        sotalign.sinkhorn(x, y, a=torch.ones(5) / 5)
    with pytest.raises(ValueError, match="b must be finite and non-negative"):
        sotalign.sinkhorn(x, y, b=torch.tensor([0.5, 0.5, -1, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="a must be finite and non-negative"):
        sotalign.sinkhorn(x, y, a=torch.tensor([0.5, 0.5, math.nan, 0, 0, 0]))
    # balanced problems scale each side to mass one: unequal masses are the same problem
    torch.testing.assert_close(
        sotalign.sinkhorn(x, y, a=torch.ones(6), b=torch.ones(7)).f, sotalign.sinkhorn(x, y).f
    )


def test_bad_tol_and_warm_start(problem):
    x, y = problem[0], problem[1]
    with pytest.raises(ValueError, match="tol must be a finite number > 0"):
        sotalign.sinkhorn(x, y, tol=-1.0)
    with pytest.raises(ValueError, match="warm_start"):
        sotalign.sinkhorn(x, y, warm_start=(torch.zeros(6), torch.zeros(3)))
    with pytest.raises(ValueError, match="memory_budget must be a finite number > 0"):
        sotalign.sinkhorn(x, y, memory_budget=0)
