"""Solver options (tolerance, warm start, symmetric step, weights) and the backend choice."""

from __future__ import annotations

import pytest
import torch

import sotalign
from sotalign.ot import dispatch

from conftest import features, relative_error


def test_tolerance_stops_early_and_meets_it(any_route):
    x, y = features(40, 60, 5)
    backend, path = any_route
    result = sotalign.sinkhorn(x, y, eps=0.2, n_iters=5000, tol=1e-8, check_every=5,
                               backend=backend, path=path, symmetric=False)
    assert result.n_iters < 5000 and result.n_iters % 5 == 0
    assert result.marginal_error < 1e-8
    fixed = sotalign.sinkhorn(x, y, eps=0.2, n_iters=result.n_iters, backend=backend, path=path,
                              symmetric=False)
    torch.testing.assert_close(fixed.f, result.f)


def test_warm_start_from_converged_potentials_needs_one_check():
    x, y = features(30, 20, 4)
    converged = sotalign.sinkhorn(x, y, eps=0.1, n_iters=4000, tol=1e-12, check_every=1, backend="torch")
    restarted = sotalign.sinkhorn(x, y, eps=0.1, n_iters=4000, tol=1e-10, check_every=1,
                                  backend="torch", warm_start=converged)
    assert restarted.n_iters <= 2
    assert relative_error(restarted.plan(), converged.plan()) < 1e-9
    same = sotalign.sinkhorn(x, y, eps=0.1, n_iters=3, backend="torch", warm_start=(None, converged.g))
    assert relative_error(same.plan(), converged.plan()) < 1e-9


def test_symmetric_step_is_the_average_of_both_updates():
    """The paper's final step: (f, g) ← ½[(f, g) + (f', g')] with f' from g, g' from f."""
    x, y = features(15, 25, 3)
    plain = sotalign.sinkhorn(x, y, eps=0.05, n_iters=10, symmetric=False, backend="reference")
    sym = sotalign.sinkhorn(x, y, eps=0.05, n_iters=10, backend="reference")
    K = plain.affinity.materialize().dense
    f_next = 0.05 * (-torch.log(torch.tensor(15.0, dtype=torch.float64))
                     - torch.logsumexp((K + plain.g) / 0.05, dim=1))
    g_next = 0.05 * (-torch.log(torch.tensor(25.0, dtype=torch.float64))
                     - torch.logsumexp((K + plain.f[:, None]) / 0.05, dim=0))
    torch.testing.assert_close(sym.f, 0.5 * (plain.f + f_next))
    torch.testing.assert_close(sym.g, 0.5 * (plain.g + g_next))


def test_weights_are_used_by_every_route(any_route):
    x, y = features(20, 12, 4)
    a = torch.linspace(1, 2, 20, dtype=torch.float64)
    b = torch.linspace(3, 1, 12, dtype=torch.float64)
    a, b = a / a.sum(), b / b.sum()
    backend, path = any_route
    plan = sotalign.sinkhorn(x, y, eps=0.3, n_iters=3000, tol=1e-11, a=a, b=b,
                             backend=backend, path=path).plan()
    torch.testing.assert_close(plan.sum(1), a, atol=1e-10, rtol=0)
    torch.testing.assert_close(plan.sum(0), b, atol=1e-10, rtol=0)


def test_auto_stays_online_at_the_memory_test_size():
    device = torch.device("cpu")
    route = dispatch.choose_route("auto", "auto", device, 24000, 24000, 64, torch.float32, 2,
                                  dispatch.DEFAULT_MEMORY_BUDGET)
    assert not route.dense
    assert route.backend.online


def test_auto_uses_dense_when_it_fits_and_d_is_large():
    route = dispatch.choose_route("auto", "auto", torch.device("cpu"), 2048, 2048, 256,
                                  torch.float32, 2, dispatch.DEFAULT_MEMORY_BUDGET)
    assert route.dense
    small_budget = dispatch.choose_route("auto", "auto", torch.device("cpu"), 2048, 2048, 256,
                                         torch.float32, 2, 2048 * 2048 * 4)
    assert not small_budget.dense


def test_auto_prefers_the_cpu_extension_when_built():
    x, y = features(10, 10, 3)
    expected = "cpu" if "cpu" in sotalign.available_backends() else "torch"
    assert sotalign.sinkhorn(x, y).backend == expected


def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "cpu_extension_error", lambda: "simulated: no compiler")
    monkeypatch.setattr(dispatch, "_warned_missing_extension", False)
    x, y = features(10, 12, 3, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ extension sotalign._C is not available") as record:
        first = sotalign.sinkhorn(x, y)
        second = sotalign.sinkhorn(x, y)
    assert len(record) == 1
    assert first.backend == second.backend == "torch"


def test_reference_backend_is_listed_and_unknown_is_not():
    names = sotalign.available_backends()
    assert names[:2] == ["reference", "torch"]
    assert set(names) <= {"reference", "torch", "cpu"}
