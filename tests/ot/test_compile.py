"""KLOT under torch.compile: the custom ops trace without graph breaks, and the compiled
value and gradients equal the eager ones and the float64 reference backend."""

from __future__ import annotations

import pytest
import torch
from conftest import klot_problem, relative_error
from torch import nn

import sotalign
from sotalign import SolverOptions

OPTIONS = dict(eps=0.05, eps_teacher=0.01, n_iters=40)


class Student(nn.Module):
    """Linear heads into a shared space, then KLOT against fixed teacher features."""

    def __init__(self, d_in: int, d_out: int, backend: str = "auto", dtype=torch.float64):
        super().__init__()
        generator = torch.Generator().manual_seed(3)
        self.image = nn.Linear(d_in, d_out, dtype=dtype)
        self.text = nn.Linear(d_in, d_out, dtype=dtype)
        with torch.no_grad():
            for head in (self.image, self.text):
                head.weight.copy_(torch.randn(head.weight.shape, generator=generator, dtype=dtype))
                head.bias.zero_()
        self.loss = sotalign.KLOTLoss(backend=backend, **OPTIONS)

    def forward(self, x, y, x_teacher, y_teacher):
        return self.loss(self.image(x), self.text(y), x_teacher, y_teacher)


def loss_and_grads(model, inputs):
    model.zero_grad()
    loss = model(*inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.fixture(scope="module")
def problem():
    return klot_problem(24, 31, 6, 4, seed=2)


def assert_same(result, expected, tolerance):
    (loss, grads), (loss_expected, grads_expected) = result, expected
    assert loss.shape == ()
    assert relative_error(loss, loss_expected) < tolerance
    for grad, grad_expected in zip(grads, grads_expected, strict=True):
        assert relative_error(grad, grad_expected) < tolerance


def test_fullgraph_aot_eager_matches_eager_and_reference(problem):
    torch._dynamo.reset()
    model = Student(6, 5)
    eager = loss_and_grads(model, problem)
    compiled = loss_and_grads(torch.compile(model, fullgraph=True, backend="aot_eager"), problem)
    assert_same(compiled, eager, 1e-12)
    reference = Student(6, 5, backend="reference")
    reference.load_state_dict(model.state_dict())
    assert_same(compiled, loss_and_grads(reference, problem), 1e-9)


def test_fullgraph_with_the_default_inductor_backend(problem):
    torch._dynamo.reset()
    x, y, x_teacher, y_teacher = [t.float() for t in problem]
    model = Student(6, 5, dtype=torch.float32)
    eager = loss_and_grads(model, (x, y, x_teacher, y_teacher))
    compiled = loss_and_grads(torch.compile(model, fullgraph=True), (x, y, x_teacher, y_teacher))
    assert_same(compiled, eager, 1e-5)


def test_compiled_dense_klot_and_solver_options(problem):
    """klot_dense traces too, and options (tolerance, ε-scaling) cross the op boundary."""
    torch._dynamo.reset()
    x, y, x_teacher, y_teacher = problem
    K_teacher = (
        torch.nn.functional.normalize(x_teacher, dim=1) @ torch.nn.functional.normalize(y_teacher, dim=1).T
    )

    def loss_fn(K):
        return sotalign.klot_dense(K, K_teacher, tol=1e-6, eps_scaling=0.5, **OPTIONS)

    def grad_of(fn):
        K = (x @ y.T / 10).requires_grad_()
        loss = fn(K)
        loss.backward()
        return loss.detach(), [K.grad]

    eager = grad_of(loss_fn)
    compiled = grad_of(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
    assert_same(compiled, eager, 1e-12)
    reference = grad_of(
        lambda K: sotalign.klot_dense(K, K_teacher, backend="reference", tol=1e-6, eps_scaling=0.5, **OPTIONS)
    )
    assert_same(compiled, reference, 1e-9)


@pytest.mark.parametrize("scale", [3.0, -0.5])
def test_backward_scales_by_grad_output(problem, scale):
    x, y, x_teacher, y_teacher = problem

    def grads(factor):
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        (factor * sotalign.klot(xs, ys, x_teacher, y_teacher, **OPTIONS)).backward()
        return xs.grad, ys.grad

    for scaled, plain in zip(grads(scale), grads(1.0), strict=True):
        torch.testing.assert_close(scaled, scale * plain, rtol=1e-12, atol=0)
    K = (x @ y.T / 10).requires_grad_()
    K_teacher = x_teacher @ y_teacher.T / 10
    (scale * sotalign.klot_dense(K, K_teacher, **OPTIONS)).backward()
    expected = torch.autograd.grad(sotalign.klot_dense(K, K_teacher, **OPTIONS), K)[0]
    torch.testing.assert_close(K.grad, scale * expected, rtol=1e-12, atol=0)


def weights(n, m, dtype):
    return torch.full((n,), 1.0 / n, dtype=dtype), torch.full((m,), 1.0 / m, dtype=dtype)


@pytest.mark.parametrize("cost", ["cosine", "sqeuclidean"])
def test_opcheck_feature_ops(problem, cost):
    x, y, x_teacher, y_teacher = [t[:, :4].contiguous() for t in problem]
    a, b = weights(x.shape[0], y.shape[0], x.dtype)
    scalars = [0.05, 0.01, cost, SolverOptions(n_iters=20).encode()]
    args = [x.requires_grad_(), y.requires_grad_(), x_teacher, y_teacher, a, b, *scalars]
    torch.library.opcheck(torch.ops.sotalign.klot_features.default, args)
    value, f, g, f_t, g_t, errors = torch.ops.sotalign.klot_features(
        x.detach(), y.detach(), x_teacher, y_teacher, a, b, *scalars
    )
    assert errors.shape == (2,)
    backward_args = [torch.tensor(2.0, dtype=x.dtype), x.detach(), y.detach(), x_teacher, y_teacher]
    torch.library.opcheck(
        torch.ops.sotalign.klot_features_backward.default, [*backward_args, f, g, f_t, g_t, *scalars]
    )


def test_opcheck_dense_ops(problem):
    x, y, x_teacher, y_teacher = problem
    K = (x @ y.T / 10).requires_grad_()
    K_teacher = x_teacher @ y_teacher.T / 10
    a, b = weights(*K.shape, K.dtype)
    solver = SolverOptions(n_iters=20, tol=1e-6, check_every=5, eps_scaling=0.5).encode()
    torch.library.opcheck(torch.ops.sotalign.klot_dense.default, [K, K_teacher, a, b, 0.05, 0.01, solver])
    value, f, g, f_t, g_t, _ = torch.ops.sotalign.klot_dense(K.detach(), K_teacher, a, b, 0.05, 0.01, solver)
    backward_args = [
        torch.tensor(-1.5, dtype=K.dtype),
        K.detach(),
        K_teacher,
        f,
        g,
        f_t,
        g_t,
        0.05,
        0.01,
        solver,
    ]
    torch.library.opcheck(torch.ops.sotalign.klot_dense_backward.default, backward_args)


@pytest.mark.parametrize("batched", [False, True])
def test_opcheck_ot_value_ops(batched):
    generator = torch.Generator().manual_seed(4)
    shape = (3,) if batched else ()
    x = torch.randn(*shape, 9, 3, dtype=torch.float64, generator=generator)
    y = torch.randn(*shape, 7, 3, dtype=torch.float64, generator=generator)
    a = torch.rand(*shape, 9, dtype=torch.float64, generator=generator)
    b = torch.rand(*shape, 7, dtype=torch.float64, generator=generator)
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    scalars = [
        0.5,
        "sqeuclidean",
        2.0,
        float("inf"),
        SolverOptions(n_iters=30, backend="reference").encode(),
        False,
    ]
    args = [x.requires_grad_(), y.requires_grad_(), a.requires_grad_(), b.requires_grad_(), *scalars]
    torch.library.opcheck(torch.ops.sotalign.ot_value.default, args)
    value, f, g = torch.ops.sotalign.ot_value(x.detach(), y.detach(), a.detach(), b.detach(), *scalars)
    assert value.shape == shape
    grad = torch.ones(shape, dtype=x.dtype)
    backward_args = [grad, x.detach(), y.detach(), a.detach(), b.detach(), f, g, *scalars[:-2]]
    torch.library.opcheck(
        torch.ops.sotalign.ot_value_backward.default, [*backward_args, scalars[-2], scalars[-1]]
    )


def test_sinkhorn_divergence_traces_fullgraph():
    """The divergence is three custom ops: compiled value and gradients equal the eager ones."""
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(12, 3, dtype=torch.float64, generator=generator)
    y = torch.randn(10, 3, dtype=torch.float64, generator=generator) + 1

    def loss(p):
        return sotalign.sinkhorn_divergence(p, y, 0.5, n_iters=50)

    def value_and_grad(fn):
        p = x.clone().requires_grad_()
        value = fn(p)
        value.backward()
        return value.detach(), p.grad

    eager = value_and_grad(loss)
    compiled = value_and_grad(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    assert relative_error(compiled[0], eager[0]) < 1e-12
    assert relative_error(compiled[1], eager[1]) < 1e-12
