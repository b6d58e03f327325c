"""A rank that raises before a collective, or calls another function, never hangs the others:
they fail within the process group's timeout with an error naming the rank."""

from __future__ import annotations

import time

import pytest
import torch
from distributed_cluster import Cluster

TIMEOUT = 4.0


def klot_unless_rank_one_raises(rank, world):
    import sotalign.distributed as sd

    if rank == 1:
        raise RuntimeError("rank 1 crashed before the loss")
    x = torch.randn(4, 3, dtype=torch.float64)
    start = time.monotonic()
    try:
        sd.klot(x, x, x, x, n_iters=3)
    except sd.DistributedError as error:
        return time.monotonic() - start, str(error)
    raise AssertionError("klot returned although rank 1 never joined")


def different_functions(rank, world):
    import sotalign.distributed as sd

    x = torch.randn(4, 3, dtype=torch.float64)
    if rank == 0:
        return sd.klot(x, x, x, x, n_iters=3)
    return sd.sinkhorn(x, x, n_iters=3)


def rank_one_dies_inside_the_solve(rank, world):
    import os

    import sotalign.distributed as sd
    import sotalign.distributed.solver as solver

    if rank == 1:
        solver.RingOperator.lse_rows = lambda *args: os._exit(3)
    x = torch.randn(4, 3, dtype=torch.float64)
    start = time.monotonic()
    try:
        sd.sinkhorn(x, x, n_iters=3, path="online")
    except sd.DistributedError as error:
        return time.monotonic() - start, str(error)
    raise AssertionError("sinkhorn returned although rank 1 died")


@pytest.fixture
def cluster():
    c = Cluster(2, timeout=TIMEOUT)
    yield c
    c.close()


def test_a_rank_that_raises_before_the_collective_is_named_within_the_timeout(cluster):
    (ok0, value0), (ok1, value1) = cluster.outcomes(klot_unless_rank_one_raises, wait=60)
    assert not ok1 and value1[1] == "rank 1 crashed before the loss"
    assert ok0, value0
    seconds, message = value0
    assert seconds < 3 * TIMEOUT
    assert message.startswith("rank 0 of 2: the start of klot"), message
    assert "Ranks 1 failed to pass monitoredBarrier" in message, message


def test_ranks_calling_different_functions_fail_on_both(cluster):
    for ok, error in cluster.outcomes(different_functions, wait=60):
        assert not ok and error[0] == "ValueError"
        assert "rank 1 has function='sinkhorn' where rank 0 has 'klot'" in error[1]


def test_a_rank_that_dies_inside_the_solve_is_named(cluster):
    (ok, value), lost = cluster.outcomes(rank_one_dies_inside_the_solve, wait=60, ranks=[0])
    assert lost is None and ok, value
    seconds, message = value
    assert seconds < 3 * TIMEOUT
    assert message.startswith("rank 0 of 2: a ring transfer with ranks [1, 1] failed"), message
