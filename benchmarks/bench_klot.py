"""KLOT step speed: forward + backward of the unpaired SOTAlign loss.

One step = ``loss = klot(x, y, x_teacher, y_teacher); loss.backward()`` from raw fp32
features (student d, teacher d/2), student ε = 0.05, teacher ε* = 0.01, 100 iterations for
each of the two Sinkhorn solves. sotalign (each backend/path) against the SOTAlign authors'
dense torch step :func:`paper_klot_features` (two dense solves, plans stored, surrogate
gradient through autograd).
"""

from __future__ import annotations

import torch
from harness.common import klot_route

import sotalign
from sotalign.ot.paper import paper_klot_features

EPS, EPS_TEACHER = 0.05, 0.01
N_ITERS = 100


def _setup(problem, klot_shape):
    """Leaf student features that collect gradients, the constant teacher, and the metadata."""
    n, d, d_teacher = klot_shape
    data = problem(n, d, d_teacher)
    x = data.x.clone().requires_grad_()
    y = data.y.clone().requires_grad_()
    meta = dict(
        suite="klot",
        group=f"klot n={n} d={d} teacher={d_teacher}",
        n=n,
        m=n,
        d=d,
        d_teacher=d_teacher,
        eps=EPS,
        eps_teacher=EPS_TEACHER,
        n_iters=N_ITERS,
        dtype="float32",
    )
    return x, y, data.x_teacher, data.y_teacher, meta


def step(loss_fn, x, y, x_teacher, y_teacher):
    """One forward + backward; returns the loss value (gradients land in x.grad, y.grad)."""
    x.grad = y.grad = None
    loss = loss_fn(x, y, x_teacher, y_teacher)
    loss.backward()
    return loss.detach()


def _check(value, x, y):
    assert torch.isfinite(value) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


def test_sotalign(benchmark, bench, problem, klot_shape, variant):
    """sotalign.klot with one backend/path (``auto`` is what users get)."""
    label, backend, path = variant
    x, y, x_t, y_t, meta = _setup(problem, klot_shape)

    def loss_fn(*args):
        return sotalign.klot(
            *args, eps=EPS, eps_teacher=EPS_TEACHER, n_iters=N_ITERS, backend=backend, path=path
        )

    value = bench(
        benchmark,
        lambda: step(loss_fn, x, y, x_t, y_t),
        provider=label,
        requested_backend=backend,
        requested_path=path,
        route=klot_route(x, x_t, y.shape[0], backend, path),
        **meta,
    )
    _check(value, x, y)


def test_paper_dense(benchmark, bench, problem, klot_shape):
    """The paper's dense step (its Sinkhorn loops, stored plans, surrogate gradient)."""
    x, y, x_t, y_t, meta = _setup(problem, klot_shape)

    def loss_fn(*args):
        return paper_klot_features(*args, eps=EPS, eps_teacher=EPS_TEACHER, n_iters=N_ITERS)

    value = bench(
        benchmark,
        lambda: step(loss_fn, x, y, x_t, y_t),
        provider="paper-dense",
        backend="paper",
        path="dense",
        **meta,
    )
    _check(value, x, y)


def test_sotalign_matches_paper(problem):
    """Not timed: sotalign's loss and gradients equal the paper's on a small instance."""
    x, y, x_t, y_t, _ = _setup(problem, (96, 16, 8))
    ours = step(
        lambda *a: sotalign.klot(*a, eps=EPS, eps_teacher=EPS_TEACHER, n_iters=N_ITERS), x, y, x_t, y_t
    )
    grads = x.grad.clone(), y.grad.clone()
    theirs = step(
        lambda *a: paper_klot_features(*a, eps=EPS, eps_teacher=EPS_TEACHER, n_iters=N_ITERS), x, y, x_t, y_t
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)
    for mine, paper in zip(grads, (x.grad, y.grad), strict=True):
        torch.testing.assert_close(mine, paper, rtol=1e-2, atol=1e-3 * float(paper.abs().max()))
