"""Iteration counts of a KLOT step: how many Sinkhorn iterations a tolerance needs.

The counts do not depend on the device (same maths on every backend), so this suite runs on
the CPU (``backend="auto"``) as well as on a GPU. For each student ε ∈ {0.05, 0.01} (teacher
ε* = 0.01 always) and each ε-scaling setting (off, or factor 0.5 from the spread of K down
to ε), one KLOT step with ``tol = 1e-4`` on the L1 marginal error (checked every iteration,
``check_every=1``, so the counts are exact; at most ``MAX_ITERS``) is compared with the
default step of 100 fixed iterations:

* ``student_iters`` / ``teacher_iters``: iterations ``sotalign.sinkhorn`` needs to reach the
  tolerance on the student (ε) and teacher (ε*) affinities with the same options (the
  KLOT step runs these two solves); ε-scaling iterations count;
* ``fixed_error`` / ``fixed_error_teacher``: the marginal error after the 100 fixed iterations;
* ``value_change``: |KLOT(tol) − KLOT(100)| / |KLOT(tol)|, and ``grad_change``:
  ‖∇(tol) − ∇(100)‖ / ‖∇(tol)‖ over both feature gradients — how far the default step is
  from the converged one.

The timed call is the tolerance step (forward + backward): median of 5 rounds after one
warm-up round (the counts are the measurement; the time is for orientation).

Features (:func:`low_rank_features`): realistic unpaired batches — n = m rows drawn from 32
clusters in a rank-16 latent space, mapped to d = 256 (student) and d* = 128 (teacher) by
fixed random linear maps, plus isotropic noise (relative norm 0.5 student, 0.3 teacher);
images and texts are independent draws (no row correspondence), n = m ∈ {1024, 2048}.
"""

from __future__ import annotations

import math

import pytest
import torch

import sotalign
from benchmarks.cpu import SMOKE

EPS_TEACHER = 0.01
TOL = 1e-4
FIXED_ITERS = 100
MAX_ITERS = 200 if SMOKE else 5000
SIZES = [64] if SMOKE else [1024, 2048]
DIM, DIM_TEACHER, RANK, CLUSTERS = (16, 8, 4, 4) if SMOKE else (256, 128, 16, 32)


def low_rank_features(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(x, y, x_teacher, y_teacher): clustered rank-RANK codes through fixed maps, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLUSTERS, RANK, generator=gen)
    maps = [
        torch.randn(RANK, dim, generator=gen) / math.sqrt(RANK)
        for dim in (DIM, DIM, DIM_TEACHER, DIM_TEACHER)
    ]

    def codes():
        labels = torch.randint(CLUSTERS, (n,), generator=gen)
        return centers[labels] + 0.5 * torch.randn(n, RANK, generator=gen)

    z_x, z_y = codes(), codes()
    out = []
    for z, A, noise in ((z_x, maps[0], 0.5), (z_y, maps[1], 0.5), (z_x, maps[2], 0.3), (z_y, maps[3], 0.3)):
        clean = z @ A
        scale = noise * clean.norm(dim=1, keepdim=True).mean() / math.sqrt(A.shape[1])
        out.append((clean + scale * torch.randn(n, A.shape[1], generator=gen)).contiguous())
    return tuple(out)


def klot_step(features, eps: float, **options):
    """KLOT value and the concatenated feature gradients of one step."""
    x, y, x_t, y_t = features
    x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
    value = sotalign.klot(x, y, x_t, y_t, eps=eps, eps_teacher=EPS_TEACHER, **options)
    value.backward()
    return value.detach(), torch.cat([x.grad.flatten(), y.grad.flatten()])


_FIXED: dict = {}


def fixed_step(features, n: int, eps: float):
    """The default step (100 fixed iterations, no ε-scaling), cached per (n, ε)."""
    if (n, eps) not in _FIXED:
        _FIXED[(n, eps)] = klot_step(features, eps, n_iters=FIXED_ITERS)
    return _FIXED[(n, eps)]


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("eps", [0.05, 0.01], ids=lambda e: f"eps{e}")
@pytest.mark.parametrize("eps_scaling", [None, 0.5], ids=lambda s: f"scaling{s}")
def test_iterations(benchmark, n, eps, eps_scaling):
    """Iterations to tol = 1e-4 and the move from 100 fixed iterations (see the module doc)."""
    features = low_rank_features(n, seed=n)
    x, y, x_t, y_t = features
    options = dict(tol=TOL, check_every=1, n_iters=MAX_ITERS, eps_scaling=eps_scaling)
    student = sotalign.sinkhorn(x, y, eps, **options)
    teacher = sotalign.sinkhorn(x_t, y_t, EPS_TEACHER, **options)
    fixed_student = sotalign.sinkhorn(x, y, eps, n_iters=FIXED_ITERS)
    fixed_teacher = sotalign.sinkhorn(x_t, y_t, EPS_TEACHER, n_iters=FIXED_ITERS)
    fixed_value, fixed_grad = fixed_step(features, n, eps)

    benchmark.group = f"iterations n={n}"
    value, grad = benchmark.pedantic(
        lambda: klot_step(features, eps, **options), rounds=5, iterations=1, warmup_rounds=1
    )
    benchmark.extra_info.update(
        suite="iterations",
        provider=f"sotalign-{student.backend}",
        backend=student.backend,
        path=student.path,
        n=n,
        m=n,
        d=DIM,
        d_teacher=DIM_TEACHER,
        eps=eps,
        eps_teacher=EPS_TEACHER,
        eps_scaling=eps_scaling,
        tol=TOL,
        check_every=1,
        max_iters=MAX_ITERS,
        dtype="float32",
        student_iters=student.n_iters,
        teacher_iters=teacher.n_iters,
        total_iters=student.n_iters + teacher.n_iters,
        student_error=student.marginal_error,
        teacher_error=teacher.marginal_error,
        fixed_iters=FIXED_ITERS,
        fixed_error=fixed_student.marginal_error,
        fixed_error_teacher=fixed_teacher.marginal_error,
        value_tol=float(value),
        value_fixed=float(fixed_value),
        value_change=float((value - fixed_value).abs() / value.abs()),
        grad_change=float((grad - fixed_grad).norm() / grad.norm()),
    )
    assert torch.isfinite(value) and torch.isfinite(grad).all()
