"""sotalign.distributed against the single-process solvers on the concatenated batch.

Three gloo ranks on CPU with shards of unequal sizes (rows 5, 9, 3; columns 7, 4, 8), fp64:
potentials, the KLOT value and both gradients agree with sotalign.sinkhorn / sotalign.klot
to 1e-6 relative, on every backend that runs on CPU, on the ring (online) and block-row
(dense) paths. One spawned cluster serves the whole module.
"""

from __future__ import annotations

import pytest
import torch
from conftest import klot_problem, relative_error
from distributed_cluster import Cluster

import sotalign
from sotalign.kernels import BACKEND_NAMES

ROWS, COLS = (5, 9, 3), (7, 4, 8)
N, M = sum(ROWS), sum(COLS)
WORLD = len(ROWS)


def shard(t: torch.Tensor, sizes, rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start : start + sizes[rank]]


def gather(parts, sizes) -> torch.Tensor:
    assert [p.shape[0] for p in parts] == list(sizes)
    return torch.cat(parts)


def routes(keops: bool = True) -> list:
    """(backend, path) of every backend that runs here; KeOps (compiles per process, ~1 min;
    only for KLOT, whose solves, value and gradient use every primitive) and Triton's online
    kernels (interpreted) are slow."""
    names = [b for b in BACKEND_NAMES if b in sotalign.available_backends() and (keops or b != "keops")]
    slow = {("keops", "online"), ("triton", "online")}
    return [
        pytest.param(b, p, marks=[pytest.mark.slow] if (b, p) in slow else [])
        for b in names
        for p in ("online", "dense")
        if (b, p) != ("keops", "dense")
    ]


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(WORLD)
    yield c
    c.close()


@pytest.fixture(scope="module")
def problem():
    return klot_problem(N, M, 6, 4, torch.float64, seed=3)


# ---------------------------------------------------------------------- tasks (run on each rank)


def sinkhorn_task(rank, world, x, y, options):
    import sotalign.distributed as sd

    r = sd.sinkhorn(shard(x, ROWS, rank), shard(y, COLS, rank), **options)
    return r.f, r.g, r.n_iters, r.marginal_error, r.path, (r.row_offset, r.col_offset, r.n, r.m)


def weighted_sinkhorn_task(rank, world, x, y, a, b, options):
    import sotalign.distributed as sd

    r = sd.sinkhorn(
        shard(x, ROWS, rank), shard(y, COLS, rank), a=shard(a, ROWS, rank), b=shard(b, COLS, rank), **options
    )
    return r.f, r.g, r.marginal_error


def klot_task(rank, world, x, y, x_t, y_t, options, weights=None):
    import sotalign.distributed as sd

    xs = shard(x, ROWS, rank).clone().requires_grad_(True)
    ys = shard(y, COLS, rank).clone().requires_grad_(True)
    if weights is not None:
        options = dict(options, a=shard(weights[0], ROWS, rank), b=shard(weights[1], COLS, rank))
    value = sd.klot(xs, ys, shard(x_t, ROWS, rank), shard(y_t, COLS, rank), **options)
    value.backward()
    return value.detach(), xs.grad, ys.grad


def traffic_task(rank, world, x, y, path, iters):
    import sotalign.distributed as sd

    counts = []
    for n_iters in iters:
        sd.traffic.reset()
        sd.sinkhorn(
            shard(x, ROWS, rank),
            shard(y, COLS, rank),
            0.1,
            n_iters=n_iters,
            backend="torch",
            path=path,
            symmetric=False,
        )
        counts.append(dict(sd.traffic.bytes))
    return counts


# ---------------------------------------------------------------------- tests


@pytest.mark.parametrize("backend,path", routes(keops=False))
def test_sinkhorn_matches_single_process(cluster, problem, backend, path):
    x, y, _, _ = problem
    options = dict(eps=0.1, n_iters=30, backend=backend, path=path)
    single = sotalign.sinkhorn(x, y, backend=backend, path=path, eps=0.1, n_iters=30)
    parts = cluster.run(sinkhorn_task, x, y, options)
    assert relative_error(gather([p[0] for p in parts], ROWS), single.f) < 1e-6
    assert relative_error(gather([p[1] for p in parts], COLS), single.g) < 1e-6
    for rank, p in enumerate(parts):
        assert p[2] == single.n_iters
        assert p[3] == pytest.approx(single.marginal_error, rel=1e-6, abs=1e-12)
        assert p[4] == path
        assert p[5] == (sum(ROWS[:rank]), sum(COLS[:rank]), N, M)


def sharded_weights(seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    a = torch.rand(N, dtype=torch.float64, generator=generator) + 0.1
    b = torch.rand(M, dtype=torch.float64, generator=generator) + 0.1
    a[2] = 0  # a zero weight: zero plan mass, no NaN
    return a, b


@pytest.mark.parametrize("path", ["online", "dense"])
def test_squared_euclidean_cost_and_weights_match_single_process(cluster, problem, path):
    """Shards of the weights (scaled to a global mass of one) and the folded norms of the
    squared-Euclidean cost, for Sinkhorn and for KLOT's value and gradients."""
    x, y, x_t, y_t = problem
    a, b = sharded_weights()
    options = dict(eps=0.5, n_iters=40, cost="sqeuclidean", backend="torch", path=path)
    single = sotalign.sinkhorn(x, y, a=a, b=b, **options)
    parts = cluster.run(weighted_sinkhorn_task, x, y, a, b, options)
    f = gather([p[0] for p in parts], ROWS)
    assert float(f[2]) == -float("inf")
    kept = torch.arange(N) != 2
    assert relative_error(f[kept], single.f[kept]) < 1e-9
    assert relative_error(gather([p[1] for p in parts], COLS), single.g) < 1e-9
    assert parts[0][2] == pytest.approx(single.marginal_error, rel=1e-6, abs=1e-12)

    klot_options = dict(eps=1.0, eps_teacher=0.5, n_iters=40, cost="sqeuclidean", backend="torch", path=path)
    X, Y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    value = sotalign.klot(X, Y, x_t, y_t, a=a, b=b, **klot_options)
    value.backward()
    parts = cluster.run(klot_task, x, y, x_t, y_t, klot_options, (a, b))
    assert float(parts[0][0]) == pytest.approx(value.item(), rel=1e-9)
    assert relative_error(gather([p[1] for p in parts], ROWS), X.grad) < 1e-9
    assert relative_error(gather([p[2] for p in parts], COLS), Y.grad) < 1e-9


@pytest.mark.parametrize("path", ["online", "dense"])
def test_sinkhorn_tolerance_and_eps_scaling_decided_globally(cluster, problem, path):
    x, y, _, _ = problem
    options = dict(
        eps=0.02, n_iters=200, tol=1e-5, check_every=3, eps_scaling=0.5, backend="torch", path=path
    )
    parts = cluster.run(sinkhorn_task, x, y, options)
    single = sotalign.sinkhorn(x, y, **options)
    assert 0 < single.n_iters < 200, "the tolerance must stop the solve early for this test"
    assert [p[2] for p in parts] == [single.n_iters] * WORLD
    assert relative_error(gather([p[0] for p in parts], ROWS), single.f) < 1e-6
    assert relative_error(gather([p[1] for p in parts], COLS), single.g) < 1e-6


@pytest.mark.parametrize("backend,path", routes())
def test_klot_value_and_gradients_match_single_process(cluster, problem, backend, path):
    x, y, x_t, y_t = problem
    options = dict(eps=0.1, eps_teacher=0.05, n_iters=30, backend=backend, path=path)
    # the single-process run first: it compiles (KeOps, Triton) before the ranks look for it
    X, Y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    value = sotalign.klot(X, Y, x_t, y_t, **options)
    value.backward()
    parts = cluster.run(klot_task, x, y, x_t, y_t, options)
    for v, _, _ in parts:
        assert float(v) == pytest.approx(value.item(), rel=1e-6)
    assert relative_error(gather([p[1] for p in parts], ROWS), X.grad) < 1e-6
    assert relative_error(gather([p[2] for p in parts], COLS), Y.grad) < 1e-6


def test_klot_options_dot_affinity_and_float32(cluster, problem):
    x, y, x_t, y_t = (t.float() for t in problem)
    options = dict(
        eps=0.2,
        eps_teacher=0.1,
        n_iters=20,
        cost="dot",
        backend="torch",
        path="online",
        tol=1e-4,
        eps_scaling=0.7,
    )
    parts = cluster.run(klot_task, x, y, x_t, y_t, options)
    X, Y = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    value = sotalign.klot(X, Y, x_t, y_t, **options)
    value.backward()
    assert parts[0][0].dtype == torch.float32
    assert float(parts[1][0]) == pytest.approx(value.item(), rel=1e-4)
    assert relative_error(gather([p[1] for p in parts], ROWS), X.grad) < 1e-4
    assert relative_error(gather([p[2] for p in parts], COLS), Y.grad) < 1e-4


@pytest.mark.parametrize("path", ["online", "dense"])
def test_bytes_per_iteration_match_the_formula(cluster, problem, path):
    """Traffic of 7 iterations minus that of 2, over 5: per rank and iteration, the ring sends
    every shard but the next rank's, of rows and of columns, with their potential:
    (n − n_next + m − m_next)·(d + 1)·8 bytes; the block row only all-reduces the column
    partials twice (2 · 2(W−1)/W · m numbers)."""
    x, y, _, _ = problem
    d = x.shape[1]
    counts = cluster.run(traffic_task, x, y, path, (2, 7))
    for rank, (short, long) in enumerate(counts):
        per_iter = {k: (long[k] - short.get(k, 0)) / 5 for k in long if long[k] != short.get(k)}
        following = (rank + 1) % WORLD
        if path == "online":
            expected = {"p2p": (N - ROWS[following] + M - COLS[following]) * (d + 1) * 8}
        else:
            expected = {"all_reduce": 2 * 2 * (WORLD - 1) / WORLD * M * 8}
        assert per_iter == pytest.approx(expected)


def bad_options_task(rank, world, x, y):
    import sotalign.distributed as sd

    return sd.sinkhorn(shard(x, ROWS, rank), shard(y, COLS, rank), 0.1 if rank != 1 else 0.2, n_iters=5)


def nan_task(rank, world, x, y):
    import sotalign.distributed as sd

    xs = shard(x, ROWS, rank).clone()
    if rank == 2:
        xs[0, 0] = float("nan")
    return sd.sinkhorn(xs, shard(y, COLS, rank), 0.1, n_iters=5)


def non_bool_symmetric_task(rank, world, x, y):
    import sotalign.distributed as sd

    return sd.sinkhorn(shard(x, ROWS, rank), shard(y, COLS, rank), 0.1, n_iters=5, symmetric="no")


def unbalanced_task(rank, world, x, y):
    import sotalign.distributed as sd

    return sd.sinkhorn(shard(x, ROWS, rank), shard(y, COLS, rank), 0.1, reg_m=1.0)


def test_disagreeing_options_and_bad_input_fail_on_every_rank_naming_the_rank(cluster, problem):
    x, y, _, _ = problem
    for ok, error in cluster.outcomes(bad_options_task, x, y):
        assert not ok and error[0] == "ValueError"
        assert "rank 1 has eps=0.2 where rank 0 has 0.1" in error[1]
    for ok, error in cluster.outcomes(nan_task, x, y):
        assert not ok and error[0] == "ValueError"
        assert "rank 2: ValueError: x contains NaN or Inf" in error[1]
    # options go through the single-process front's SolverOptions: no truthy strings
    for ok, error in cluster.outcomes(non_bool_symmetric_task, x, y):
        assert not ok and error[0] == "ValueError"
        assert "TypeError: symmetric must be a bool, got str" in error[1]
    for ok, error in cluster.outcomes(unbalanced_task, x, y):
        assert not ok and "reg_m (unbalanced marginals) is not supported by sotalign.distributed" in error[1]
    # the group still works afterwards
    assert len(cluster.run(sinkhorn_task, x, y, dict(eps=0.1, n_iters=2))) == WORLD
