"""BatchSampler.shard: the data-parallel slices of a step's batch."""

from __future__ import annotations

import numpy as np
import pytest

from sotalign.data import BatchSampler


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_shards_partition_the_batch_in_rank_order(world):
    sampler = BatchSampler(np.arange(1000, 1100), 30, seed=5, stream="unpaired_images")
    for step in (0, 1, 3, 17):
        shards = [sampler.shard(step, rank, world) for rank in range(world)]
        assert np.array_equal(np.concatenate(shards), sampler.batch(step))
        sizes = [len(s) for s in shards]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 30


def test_shards_of_a_resumed_run_on_another_world_size_cover_the_same_rows():
    sampler = BatchSampler(np.arange(64), 16, seed=0, stream="paired")
    two = np.concatenate([sampler.shard(9, r, 2) for r in range(2)])
    three = np.concatenate(
        [BatchSampler(np.arange(64), 16, seed=0, stream="paired").shard(9, r, 3) for r in range(3)]
    )
    assert np.array_equal(two, three)


@pytest.mark.parametrize(
    "rank,world,message",
    [
        (2, 2, "rank must be in"),
        (-1, 2, "rank must be >= 0"),
        (0, 0, "world_size must be >= 1"),
        (0, 20, "cannot be split across 20 ranks"),
    ],
)
def test_bad_ranks_are_named(rank, world, message):
    with pytest.raises(ValueError, match=message):
        BatchSampler(np.arange(64), 16, seed=0, stream="paired").shard(0, rank, world)
