"""KLOT step speed: forward + backward of the unpaired SOTAlign loss.

One step = ``loss = klot(x, y, x_teacher, y_teacher); loss.backward()`` from raw fp32
features (student d, teacher d/2), student ε = 0.05, teacher ε* = 0.01, 100 iterations for
each of the two Sinkhorn solves. sotalign (each backend/path) against the SOTAlign authors'
dense torch step (:func:`benchmarks.peers.paper_klot_loss`: two dense solves, plans stored,
surrogate gradient through autograd).
"""

from __future__ import annotations

import functools

import torch

import sotalign
from benchmarks.cpu import klot_route, run_benchmark
from benchmarks.peers import paper_klot_loss
from benchmarks.problems import klot_step

EPS, EPS_TEACHER = 0.05, 0.01
N_ITERS = 100
PAPER = paper_klot_loss(EPS, EPS_TEACHER, N_ITERS)


def sotalign_loss(backend: str = "auto", path: str = "auto"):
    return functools.partial(
        sotalign.klot, eps=EPS, eps_teacher=EPS_TEACHER, n_iters=N_ITERS, backend=backend, path=path
    )


def leaves(problem, shape):
    """Leaf student features that collect gradients, and the constant teacher."""
    data = problem(*shape)
    return data.x.clone().requires_grad_(), data.y.clone().requires_grad_(), data.x_teacher, data.y_teacher


def time_step(benchmark, problem, shape, loss, **info) -> None:
    """Time one forward + backward of ``loss`` on the features of ``shape``."""
    x, y, x_t, y_t = features = leaves(problem, shape)
    n, d, d_teacher = shape
    value = run_benchmark(
        benchmark,
        lambda: klot_step(loss, *features),
        suite="klot",
        group=f"klot n={n} d={d} teacher={d_teacher}",
        n=n,
        m=n,
        d=d,
        d_teacher=d_teacher,
        eps=EPS,
        eps_teacher=EPS_TEACHER,
        n_iters=N_ITERS,
        **info,
    )
    assert torch.isfinite(value) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


def test_sotalign(benchmark, problem, klot_shape, variant):
    """sotalign.klot with one backend/path (``auto`` is what users get)."""
    label, backend, path = variant
    data = problem(*klot_shape)
    route = klot_route(data.x, data.x_teacher, klot_shape[0], backend, path)
    info = dict(provider=label, requested_backend=backend, requested_path=path, route=route)
    time_step(benchmark, problem, klot_shape, sotalign_loss(backend, path), **info)


def test_paper_dense(benchmark, problem, klot_shape):
    """The paper's dense step (its Sinkhorn loops, stored plans, surrogate gradient)."""
    time_step(benchmark, problem, klot_shape, PAPER, provider="paper-dense", backend="paper", path="dense")


def test_sotalign_matches_paper(problem):
    """Not timed: sotalign's loss and gradients equal the paper's on a small instance."""
    features = leaves(problem, (96, 16, 8))
    x, y = features[:2]
    ours = klot_step(sotalign_loss(), *features)
    grads = x.grad.clone(), y.grad.clone()
    theirs = klot_step(PAPER, *features)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)
    for mine, paper in zip(grads, (x.grad, y.grad), strict=True):
        torch.testing.assert_close(mine, paper, rtol=1e-2, atol=1e-3 * float(paper.abs().max()))
