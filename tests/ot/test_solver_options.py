"""Solver options (tolerance, warm start, symmetric step, weights, CUDA graphs), plan products
and the backend choice."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from conftest import features, relative_error

import sotalign
from sotalign import SolverOptions
from sotalign.ot import dispatch


def test_tolerance_stops_early_and_meets_it(any_route):
    x, y = features(40, 60, 5)
    backend, path = any_route
    result = sotalign.sinkhorn(
        x, y, eps=0.2, n_iters=5000, tol=1e-8, check_every=5, backend=backend, path=path, symmetric=False
    )
    assert result.n_iters < 5000 and result.n_iters % 5 == 0
    assert result.marginal_error < 1e-8
    fixed = sotalign.sinkhorn(
        x, y, eps=0.2, n_iters=result.n_iters, backend=backend, path=path, symmetric=False
    )
    torch.testing.assert_close(fixed.f, result.f)


def test_warm_start_from_converged_potentials_needs_one_check():
    x, y = features(30, 20, 4)
    converged = sotalign.sinkhorn(x, y, eps=0.1, n_iters=4000, tol=1e-12, check_every=1, backend="torch")
    restarted = sotalign.sinkhorn(
        x, y, eps=0.1, n_iters=4000, tol=1e-10, check_every=1, backend="torch", warm_start=converged
    )
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
    f_next = 0.05 * (
        -torch.log(torch.tensor(15.0, dtype=torch.float64)) - torch.logsumexp((K + plain.g) / 0.05, dim=1)
    )
    g_next = 0.05 * (
        -torch.log(torch.tensor(25.0, dtype=torch.float64))
        - torch.logsumexp((K + plain.f[:, None]) / 0.05, dim=0)
    )
    torch.testing.assert_close(sym.f, 0.5 * (plain.f + f_next))
    torch.testing.assert_close(sym.g, 0.5 * (plain.g + g_next))


def test_weights_are_used_by_every_route(any_route):
    x, y = features(20, 12, 4)
    a = torch.linspace(1, 2, 20, dtype=torch.float64)
    b = torch.linspace(3, 1, 12, dtype=torch.float64)
    a, b = a / a.sum(), b / b.sum()
    backend, path = any_route
    plan = sotalign.sinkhorn(
        x, y, eps=0.3, n_iters=3000, tol=1e-11, a=a, b=b, backend=backend, path=path
    ).plan()
    torch.testing.assert_close(plan.sum(1), a, atol=1e-10, rtol=0)
    torch.testing.assert_close(plan.sum(0), b, atol=1e-10, rtol=0)


def test_auto_stays_online_at_the_memory_test_size():
    device = torch.device("cpu")
    route = dispatch.choose_route(
        "auto", "auto", device, 24000, 24000, 64, torch.float32, 2, dispatch.DEFAULT_MEMORY_BUDGET
    )
    assert not route.dense
    assert route.backend.online


def test_auto_uses_dense_when_it_fits_and_d_is_large():
    route = dispatch.choose_route(
        "auto", "auto", torch.device("cpu"), 2048, 2048, 256, torch.float32, 2, dispatch.DEFAULT_MEMORY_BUDGET
    )
    assert route.dense
    small_budget = dispatch.choose_route(
        "auto", "auto", torch.device("cpu"), 2048, 2048, 256, torch.float32, 2, 2048 * 2048 * 4
    )
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
    assert set(names) <= {"reference", "torch", "cpu", "triton", "keops"}


@pytest.mark.parametrize("affinity", ["cosine", "dot"])
def test_apply_and_apply_t_equal_products_with_the_dense_plan(any_route, affinity):
    x, y = features(33, 21, 5)
    backend, path = any_route
    result = sotalign.sinkhorn(x, y, eps=0.1, affinity=affinity, backend=backend, path=path)
    V = torch.randn(21, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    U = torch.randn(33, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    plan = result.plan()
    assert relative_error(result.apply(V), plan @ V) < 1e-12
    assert relative_error(result.apply_t(U), plan.T @ U) < 1e-12
    # the marginals, as products with ones
    ones = torch.ones(21, 1, dtype=torch.float64)
    torch.testing.assert_close(result.apply(ones).squeeze(1), plan.sum(1))


def test_apply_on_a_dense_affinity_and_bad_factors():
    x, y = features(12, 9, 3)
    result = sotalign.sinkhorn_dense(x @ y.T / 3, eps=0.1, backend="torch")
    V = torch.randn(9, 2, dtype=torch.float64)
    assert relative_error(result.apply(V), result.plan() @ V) < 1e-12
    with pytest.raises(ValueError, match="V must have shape"):
        result.apply(torch.randn(12, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="U must have shape"):
        result.apply_t(V)


def count_host_reads(monkeypatch):
    """Counts Tensor → Python float conversions (each one waits for the device)."""
    reads = []
    original = torch.Tensor.__float__

    def counting(self):
        reads.append(1)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "__float__", counting)
    return reads


def test_the_loop_reads_the_device_only_at_checks(monkeypatch):
    from sotalign.kernels import load_backend
    from sotalign.ot.problem import uniform_problem
    from sotalign.ot.sinkhorn import solve

    x, y = features(20, 30, 4)
    problem = uniform_problem(load_backend("torch"), sotalign.kernels.Affinity.from_features(x / 3, y / 3))
    reads = count_host_reads(monkeypatch)
    state = solve(problem, 0.001, SolverOptions(n_iters=60, tol=1e-30, check_every=7))
    assert state.done == 60
    assert len(reads) == 8  # iterations 7, 14, ..., 56
    reads.clear()
    solve(problem, 0.001, SolverOptions(n_iters=60))
    assert reads == []


@pytest.mark.parametrize(
    "device, n_iters, check_every, flag, expected",
    [
        ("cuda", 100, 10, None, True),
        ("cuda", 19, 10, None, False),
        ("cuda", 100, 10, False, False),
        ("cpu", 100, 10, None, False),
        ("cpu", 100, 10, True, True),
    ],
)
def test_cuda_graphs_are_on_by_default_on_cuda_from_two_chunks(device, n_iters, check_every, flag, expected):
    from sotalign.ot.sinkhorn import use_cuda_graph

    options = SolverOptions(n_iters=n_iters, check_every=check_every, cuda_graph=flag)
    assert use_cuda_graph(options, torch.device(device)) is expected


class FakeGraph:
    """Stands in for a captured CUDA graph on CPU: runs the body at capture (the warm-up
    counts) and at each replay, so the chunked control flow can be checked here."""

    captures = 0

    def __init__(self, body):
        FakeGraph.captures += 1
        self.body = body
        body()

    def replay(self):
        self.body()


@pytest.mark.parametrize(
    "n_iters,check_every,tol,eps_scaling,captures",
    [
        (40, 10, None, None, 1),
        (47, 10, None, None, 1),
        (300, 5, 1e-6, None, 1),
        (500, 7, 1e-9, None, 1),
        (500, 10, 1e-9, 0.7, 1),
        (9, 10, None, None, 0),
        (23, 4, None, 0.5, 1),
    ],
)
def test_graphed_loop_equals_the_eager_loop(monkeypatch, n_iters, check_every, tol, eps_scaling, captures):
    from sotalign.kernels import load_backend
    from sotalign.ot.problem import uniform_problem

    sinkhorn_module = importlib.import_module("sotalign.ot.sinkhorn")  # the function shadows it

    monkeypatch.setattr(sinkhorn_module, "_capture", FakeGraph)
    FakeGraph.captures = 0
    x, y = features(25, 18, 4)
    K = sotalign.kernels.Affinity.from_features(x / 2, y / 2)
    problem = uniform_problem(load_backend("torch"), K)
    options = SolverOptions(n_iters=n_iters, tol=tol, check_every=check_every, eps_scaling=eps_scaling)
    spread = sinkhorn_module.affinity_spread(K)
    eager = sinkhorn_module.solve(problem, 0.05, options, spread=spread)
    graphed = sinkhorn_module.solve(
        problem, 0.05, dataclasses.replace(options, cuda_graph=True), spread=spread
    )
    assert graphed.done == eager.done
    torch.testing.assert_close(graphed.f, eager.f, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(graphed.g, eager.g, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(graphed.row_error, eager.row_error, rtol=1e-12, atol=1e-15)
    assert FakeGraph.captures == captures
    if tol is not None:
        assert eager.done < n_iters  # it stopped on the tolerance, at a chunk start


def test_a_failed_capture_falls_back_to_the_eager_loop(monkeypatch):
    from sotalign.kernels import load_backend
    from sotalign.ot.problem import uniform_problem

    sinkhorn_module = importlib.import_module("sotalign.ot.sinkhorn")

    def refuse(body):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(sinkhorn_module, "_capture", refuse)
    x, y = features(25, 18, 4)
    problem = uniform_problem(load_backend("torch"), sotalign.kernels.Affinity.from_features(x / 2, y / 2))
    options = SolverOptions(n_iters=47, tol=1e-9, check_every=10)
    eager = sinkhorn_module.solve(problem, 0.05, options)
    with pytest.warns(RuntimeWarning, match="capturing the loop into a CUDA graph failed"):
        fallback = sinkhorn_module.solve(problem, 0.05, dataclasses.replace(options, cuda_graph=True))
    assert fallback.done == eager.done
    torch.testing.assert_close(fallback.f, eager.f, rtol=0, atol=0)
    torch.testing.assert_close(fallback.g, eager.g, rtol=0, atol=0)


def test_cuda_graph_needs_cuda_tensors():
    x, y = features(5, 6, 3)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors, got tensors on cpu"):
        sotalign.sinkhorn(x, y, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA tensors"):
        sotalign.klot(x, y, x, y, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        sotalign.sinkhorn(x, y, cuda_graph=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tol", [None, 1e-5])
def test_cuda_graph_matches_the_eager_loop_on_cuda(tol):
    x, y = features(300, 200, 16, dtype=torch.float32)
    x, y = x.cuda(), y.cuda()
    options = dict(eps=0.05, n_iters=95, tol=tol, check_every=10, backend="torch")
    eager = sotalign.sinkhorn(x, y, **options)
    graphed = sotalign.sinkhorn(x, y, cuda_graph=True, **options)
    assert graphed.n_iters == eager.n_iters
    torch.testing.assert_close(graphed.f, eager.f, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(graphed.g, eager.g, rtol=1e-5, atol=1e-6)
    x_t, y_t = features(300, 200, 8, dtype=torch.float32, seed=1)
    loss = sotalign.klot(x, y, x_t.cuda(), y_t.cuda(), cuda_graph=True, backend="torch", n_iters=40)
    expected = sotalign.klot(x, y, x_t.cuda(), y_t.cuda(), backend="torch", n_iters=40)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- the SolverOptions object


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(n_iters=0), ValueError, "n_iters must be >= 1"),
        (dict(n_iters=2.5), TypeError, "n_iters must be an integer"),
        (dict(tol=-1.0), ValueError, "tol must be a finite number > 0"),
        (dict(check_every=True), TypeError, "check_every must be an integer"),
        (dict(symmetric="no"), TypeError, "symmetric must be a bool"),
        (dict(cuda_graph=1), TypeError, "cuda_graph must be a bool"),
        (dict(eps_scaling=1.5), ValueError, r"eps_scaling must be a factor in \(0, 1\)"),
        (dict(backend="nope"), ValueError, "unknown backend 'nope'"),
        (dict(backend=3), TypeError, "backend must be a string"),
        (dict(path="sparse"), ValueError, "unknown path 'sparse'"),
        (dict(precision="fp8"), ValueError, "unknown precision 'fp8'"),
        (dict(memory_budget=0), ValueError, "memory_budget must be a finite number > 0"),
    ],
)
def test_solver_options_are_validated_once_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        sotalign.SolverOptions(**options)
    x, y = features(6, 5, 3)
    with pytest.raises(error, match=message):  # the same check behind every entry point
        sotalign.sinkhorn(x, y, **options)
    with pytest.raises(error, match=message):
        sotalign.klot(x, y, x, y, **options)


def test_solver_options_are_frozen_and_normalised():
    options = sotalign.SolverOptions(tol=1, memory_budget=2**20)
    assert options.tol == 1.0 and isinstance(options.tol, float)
    with pytest.raises(AttributeError):
        options.n_iters = 5
    assert sotalign.SolverOptions.decode(options.encode()) == options
    with pytest.raises(TypeError, match=r"unknown solver option\(s\) \['tolerance'\]"):
        sotalign.SolverOptions.resolve(options, tolerance=1e-3)
    assert sotalign.SolverOptions.resolve(options, n_iters=7) == dataclasses.replace(options, n_iters=7)


def test_klot_loss_validates_at_construction():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        sotalign.KLOTLoss(backend="nope")
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        sotalign.KLOTLoss(symmetric="no")
    with pytest.raises(TypeError, match=r"unknown solver option\(s\) \['tolerance'\]"):
        sotalign.KLOTLoss(tolerance=1e-3)
    loss = sotalign.KLOTLoss(n_iters=30, backend="torch", tol=1e-6, path="online")
    assert (loss.options.n_iters, loss.options.backend, loss.options.path) == (30, "torch", "online")
    x, y = features(12, 9, 4)
    expected = sotalign.klot(x, y, x, y, n_iters=30, backend="torch", tol=1e-6, path="online")
    assert torch.equal(loss(x, y, x, y), expected)
