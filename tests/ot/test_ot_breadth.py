"""Costs, weights, relaxed marginals, batches and the Sinkhorn divergence, on every backend,
against independent oracles: POT's log-domain and unbalanced Sinkhorn, the primal objective
computed from the dense plan, finite differences, S_ε(a, a) = 0, and each problem of a batch
solved alone."""

from __future__ import annotations

import math
import warnings

import numpy as np
import ot
import pytest
import torch

import sotalign
from sotalign.kernels import BACKEND_NAMES, backend_error

SLOW = ("triton", "keops")
BACKENDS = [pytest.param(name, marks=[pytest.mark.slow] * (name in SLOW)) for name in BACKEND_NAMES]
CONVERGED = dict(n_iters=3000, tol=1e-13, check_every=5)


@pytest.fixture(params=BACKENDS)
def backend(request):
    error = backend_error(request.param)
    if error is not None:
        pytest.skip(f"{request.param}: {error}")
    return request.param


def clouds(n=9, m=7, d=3, seed=0, batch=()):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch, n, d, generator=generator, dtype=torch.float64)
    y = torch.randn(*batch, m, d, generator=generator, dtype=torch.float64) + 0.5
    return x, y


def cost_matrix(cost, x, y):
    if cost == "sqeuclidean":
        return torch.cdist(x, y) ** 2
    if cost == "dot":
        return -x @ y.mT
    unit = torch.nn.functional.normalize
    return 1 - unit(x, dim=-1) @ unit(y, dim=-1).mT


def generalised_kl(p, q):
    return (torch.where(p > 0, p * torch.log(p / q), 0.0) - p + q).sum()


def primal(P, C, a, b, eps, reg_m=(math.inf, math.inf)):
    """⟨P, C⟩ + ε KL(P ‖ a⊗b) + ρ_a KL(P1 ‖ a) + ρ_b KL(Pᵀ1 ‖ b), from the dense plan."""
    value = (P * C).sum() + eps * generalised_kl(P, torch.outer(a, b))
    for reach, marginal, w in ((reg_m[0], P.sum(1), a), (reg_m[1], P.sum(0), b)):
        if not math.isinf(reach):
            value = value + reach * generalised_kl(marginal, w)
    return value


@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine", "dot"])
def test_balanced_plan_and_value_match_pot(backend, cost):
    x, y = clouds()
    a = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.1
    a = a / a.sum()
    b = torch.full((7,), 1 / 7, dtype=torch.float64)
    C = cost_matrix(cost, x, y)
    eps = 0.5 if cost == "sqeuclidean" else 0.1
    result = sotalign.sinkhorn(x, y, eps, cost=cost, a=a, backend=backend, symmetric=False, **CONVERGED)
    expected = ot.sinkhorn(
        a.numpy(), b.numpy(), C.numpy(), eps, method="sinkhorn_log", stopThr=1e-15, numItermax=20000
    )
    np.testing.assert_allclose(result.plan().numpy(), expected, atol=1e-11)
    assert float(result.value) == pytest.approx(
        float(primal(torch.from_numpy(expected), C, a, b, eps)), rel=1e-9
    )
    # the potentials are in the units of the affinity −C + c₀ (c₀ = 1 for cosine)
    constant = 1.0 if cost == "cosine" else 0.0
    log_plan = (result.f[:, None] + result.g[None, :] - C + constant) / eps
    np.testing.assert_allclose(log_plan.exp().numpy(), expected, atol=1e-11)


@pytest.mark.parametrize("reg_m", [(1.0, 3.0), 0.5])
def test_unbalanced_plan_and_value_match_pot(backend, reg_m):
    x, y = clouds(seed=2)
    C = cost_matrix("sqeuclidean", x, y)
    a, b = torch.full((9,), 0.1, dtype=torch.float64), torch.full((7,), 0.2, dtype=torch.float64)
    result = sotalign.sinkhorn(
        x, y, 0.5, cost="sqeuclidean", a=a, b=b, reg_m=reg_m, backend=backend, symmetric=False, **CONVERGED
    )
    reach = reg_m if isinstance(reg_m, tuple) else (reg_m, reg_m)
    expected = ot.unbalanced.sinkhorn_unbalanced(
        a.numpy(),
        b.numpy(),
        C.numpy(),
        0.5,
        reach,
        method="sinkhorn",
        reg_type="kl",
        stopThr=1e-15,
        numItermax=100000,
    )
    np.testing.assert_allclose(result.plan().numpy(), expected, atol=1e-11)
    assert float(result.value) == pytest.approx(
        float(primal(torch.from_numpy(expected), C, a, b, 0.5, reach)), rel=1e-9
    )


def test_semi_relaxed_keeps_the_exact_marginal_and_is_the_primal_optimum(backend):
    x, y = clouds(seed=3)
    C = cost_matrix("sqeuclidean", x, y)
    reach = (math.inf, 0.7)
    a, b = torch.full((9,), 1 / 9, dtype=torch.float64), torch.full((7,), 1 / 7, dtype=torch.float64)
    result = sotalign.sinkhorn(
        x, y, 0.5, cost="sqeuclidean", reg_m=reach, backend=backend, symmetric=False, **CONVERGED
    )
    P = result.plan()
    torch.testing.assert_close(P.sum(1), a, atol=1e-11, rtol=0)
    assert float(result.value) == pytest.approx(float(primal(P, C, a, b, 0.5, reach)), rel=1e-9)
    # the optimum: nudging the plan along any direction does not lower the primal objective
    direction = torch.randn(P.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for step in (1e-4, -1e-4):
        nudged = P * torch.exp(step * direction)
        nudged = nudged * (a / nudged.sum(1))[:, None]  # stay feasible for the exact side
        assert float(primal(nudged, C, a, b, 0.5, reach)) >= float(result.value) - 1e-12


def test_zero_weights_get_zero_mass_and_no_nan(backend):
    x, y = clouds(seed=5)
    a = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    a[[0, 4]] = 0
    result = sotalign.sinkhorn(x, y, 0.3, cost="sqeuclidean", a=a, backend=backend, **CONVERGED)
    P = result.plan()
    assert not bool(torch.isnan(P).any()) and float(P[[0, 4]].abs().max()) == 0.0
    assert bool((result.f[[0, 4]] == -math.inf).all()) and math.isfinite(float(result.value))
    kept = [i for i in range(9) if i not in (0, 4)]
    alone = sotalign.sinkhorn(x[kept], y, 0.3, cost="sqeuclidean", a=a[kept], backend=backend, **CONVERGED)
    torch.testing.assert_close(P[kept], alone.plan(), atol=1e-12, rtol=0)
    torch.testing.assert_close(result.value, alone.value, atol=1e-12, rtol=0)


@pytest.mark.parametrize("reg_m", [None, 2.0])
def test_a_batch_is_each_problem_alone(backend, reg_m):
    """Three problems of unequal sizes, zero-padded to one batch, in one solve."""
    sizes = [(9, 7), (4, 6), (8, 3)]
    x, y = torch.zeros(3, 9, 3, dtype=torch.float64), torch.zeros(3, 7, 3, dtype=torch.float64)
    a, b = torch.zeros(3, 9, dtype=torch.float64), torch.zeros(3, 7, dtype=torch.float64)
    for k, (n, m) in enumerate(sizes):
        x[k, :n], y[k, :m] = clouds(n, m, seed=10 + k)
        a[k, :n], b[k, :m] = 1 / n, 1 / m
    options = dict(cost="sqeuclidean", reg_m=reg_m, backend=backend, n_iters=200)
    batch = sotalign.sinkhorn(x, y, 0.5, a=a, b=b, **options)
    assert batch.f.shape == (3, 9) and batch.value.shape == (3,) and batch.plan().shape == (3, 9, 7)
    for k, (n, m) in enumerate(sizes):
        alone = sotalign.sinkhorn(x[k, :n], y[k, :m], 0.5, **options)
        torch.testing.assert_close(batch.plan()[k, :n, :m], alone.plan(), atol=1e-12, rtol=0)
        torch.testing.assert_close(batch.value[k], alone.value, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(batch.f[k, :n], alone.f, atol=1e-10, rtol=0)
    V = torch.randn(3, 7, 2, dtype=torch.float64)
    torch.testing.assert_close(batch.apply(V), batch.plan() @ V)


@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine", "dot"])
@pytest.mark.parametrize("reg_m", [None, (1.0, 3.0)])
def test_divergence_gradients_match_finite_differences(cost, reg_m):
    x, y = clouds(seed=7)
    a = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) + 0.2
    b = torch.rand(7, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) + 0.2

    def divergence(x, y, a, b):
        return sotalign.sinkhorn_divergence(
            x, y, 0.5, cost=cost, a=a, b=b, reg_m=reg_m, backend="reference", **CONVERGED
        )

    inputs = [t.clone().requires_grad_() for t in (x, y, a, b)]
    divergence(*inputs).backward()
    for index, (tensor, entry) in enumerate(zip(inputs, [(0, 1), (2, 0), (3,), (5,)], strict=True)):
        h = 1e-5
        plus = [t.detach().clone() for t in inputs]
        minus = [t.detach().clone() for t in inputs]
        plus[index][entry] += h
        minus[index][entry] -= h
        finite_difference = (divergence(*plus) - divergence(*minus)) / (2 * h)
        assert float(tensor.grad[entry]) == pytest.approx(float(finite_difference), rel=1e-5, abs=1e-8)


def test_divergence_of_a_measure_with_itself_is_zero_and_debias_false_is_the_value(backend):
    x, y = clouds(seed=11)
    a = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(12)) + 0.1
    for reg_m in (None, 1.5):
        same = sotalign.sinkhorn_divergence(x, x, 0.5, a=a, b=a, reg_m=reg_m, backend=backend, **CONVERGED)
        assert abs(float(same)) < 1e-10
    plain = sotalign.sinkhorn_divergence(x, y, 0.5, debias=False, backend=backend, **CONVERGED)
    value = sotalign.sinkhorn(x, y, 0.5, cost="sqeuclidean", backend=backend, **CONVERGED).value
    torch.testing.assert_close(plain, value, rtol=1e-12, atol=1e-12)
    assert float(sotalign.sinkhorn_divergence(x, y, 0.5, backend=backend, **CONVERGED)) > 0


def test_batched_divergence_and_its_module():
    x, y = clouds(batch=(4,), seed=13)
    loss = sotalign.SinkhornLoss(0.5, n_iters=300, tol=1e-12)
    values = loss(x, y)
    assert values.shape == (4,)
    for k in range(4):
        torch.testing.assert_close(values[k], loss(x[k], y[k]), rtol=1e-10, atol=1e-12)


def test_sqeuclidean_klot_gradient_matches_finite_differences():
    x, y = clouds(seed=14)
    x_t, y_t = clouds(seed=15, d=2)
    w = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(16)) + 0.1

    def value(x):
        return sotalign.klot(
            x, y, x_t, y_t, 1.0, 0.5, cost="sqeuclidean", a=w, backend="reference", **CONVERGED
        )

    xs = x.clone().requires_grad_()
    value(xs).backward()
    for backend in [name for name in ("torch", "cpu") if backend_error(name) is None]:
        xb = x.clone().requires_grad_()
        sotalign.klot(
            xb, y, x_t, y_t, 1.0, 0.5, cost="sqeuclidean", a=w, backend=backend, **CONVERGED
        ).backward()
        torch.testing.assert_close(xb.grad, xs.grad, rtol=1e-9, atol=1e-12)
    h = 1e-6
    plus, minus = x.clone(), x.clone()
    plus[1, 2] += h
    minus[1, 2] -= h
    assert float(xs.grad[1, 2]) == pytest.approx(float((value(plus) - value(minus)) / (2 * h)), rel=1e-5)


def test_klot_warns_when_a_plan_did_not_converge_and_records_the_errors():
    x, y = clouds(seed=17)
    with pytest.warns(RuntimeWarning, match="klot's student plan did not converge"):
        sotalign.klot(x, y, x, y, eps=1e-4, eps_teacher=1e-4, n_iters=5)
    errors = sotalign.ot.klot_marginal_errors()
    assert errors.shape == (2,) and float(errors.min()) > sotalign.ot.NOT_CONVERGED
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sotalign.klot(x, y, x, y, eps=0.1, eps_teacher=0.05, n_iters=300)
    assert float(sotalign.ot.klot_marginal_errors().max()) < sotalign.ot.NOT_CONVERGED


def test_affinity_is_a_deprecated_alias_of_cost():
    x, y = clouds(seed=18)
    with pytest.warns(DeprecationWarning, match="affinity= is deprecated; use cost="):
        old = sotalign.sinkhorn(x, y, affinity="dot")
    torch.testing.assert_close(old.f, sotalign.sinkhorn(x, y, cost="dot").f)
    with pytest.raises(TypeError, match="give cost= only"):
        sotalign.sinkhorn(x, y, cost="dot", affinity="dot")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x, y: sotalign.sinkhorn(x, y, cost="euclid"), ValueError, "unknown cost 'euclid'"),
        (lambda x, y: sotalign.sinkhorn(x, y, reg_m=-1.0), ValueError, "reg_m must be > 0"),
        (
            lambda x, y: sotalign.sinkhorn(x, y, reg_m=(1.0, 2.0, 3.0)),
            ValueError,
            "reg_m must be None, a number",
        ),
        (
            lambda x, y: sotalign.sinkhorn(x, y, a=-torch.ones(9, dtype=torch.float64)),
            ValueError,
            "non-negative",
        ),
        (
            lambda x, y: sotalign.sinkhorn(x, y, a=torch.zeros(9, dtype=torch.float64)),
            ValueError,
            "positive total",
        ),
        (
            lambda x, y: sotalign.sinkhorn(x, y, a=torch.ones(8, dtype=torch.float64)),
            ValueError,
            r"shape \(9,\)",
        ),
        (
            lambda x, y: sotalign.sinkhorn(x[None], y[None].expand(2, -1, -1)),
            ValueError,
            "batch sizes must agree",
        ),
        (
            lambda x, y: sotalign.sinkhorn(x, y, n_iter=5),
            TypeError,
            r"unknown solver option\(s\) \['n_iter'\]",
        ),
        (lambda x, y: sotalign.sinkhorn_divergence(x, y, debias=1), TypeError, "debias must be a bool"),
        (lambda x, y: sotalign.sinkhorn_divergence(x, y * math.nan), ValueError, "y contains NaN or Inf"),
    ],
)
def test_bad_input_is_named(call, error, message):
    x, y = clouds()
    with pytest.raises(error, match=message):
        call(x, y)


@pytest.mark.parametrize("cost", ["sqeuclidean", "cosine"])
def test_a_warm_start_continues_the_solve_in_every_cost(cost):
    """30 iterations then 30 from that result (or its (f, g) pair) = 60 from scratch, padded
    columns (−inf potentials) included: the warm start is read in the units results report."""
    x, y = clouds(batch=(2,), seed=19)
    b = torch.ones(2, 7, dtype=torch.float64)
    b[1, 5:] = 0
    options = dict(cost=cost, b=b, symmetric=False, backend="reference")
    straight = sotalign.sinkhorn(x, y, 0.5, n_iters=60, **options)
    first = sotalign.sinkhorn(x, y, 0.5, n_iters=30, **options)
    for warm_start in (first, (first.f, first.g)):
        resumed = sotalign.sinkhorn(x, y, 0.5, n_iters=30, warm_start=warm_start, **options)
        torch.testing.assert_close(resumed.plan(), straight.plan(), rtol=1e-12, atol=1e-14)
