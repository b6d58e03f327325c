"""make_split's set algebra and BatchSampler's stateless, resumable batches."""

from __future__ import annotations

import numpy as np
import pytest

from sotalign.data import BatchSampler, Split, make_split


def _disjoint(a, b) -> bool:
    return len(np.intersect1d(a, b)) == 0


def test_split_sizes_and_disjointness():
    s = make_split(1000, 100, 50, n_unpaired=300, seed=3)
    assert isinstance(s, Split)
    assert [len(s.paired), len(s.unpaired_images), len(s.unpaired_texts), len(s.val)] == [100, 300, 300, 50]
    for a in (s.paired, s.unpaired_images, s.unpaired_texts, s.val):
        assert a.dtype == np.int64 and np.all(np.diff(a) > 0) and a.min() >= 0 and a.max() < 1000
    assert _disjoint(s.val, s.paired)
    for pool in (s.unpaired_images, s.unpaired_texts):
        assert _disjoint(pool, s.val) and _disjoint(pool, s.paired)
    assert not np.array_equal(s.unpaired_images, s.unpaired_texts)  # drawn independently


def test_unpaired_pools_are_independent_subsets():
    # two independent uniform 300-subsets of an 850-row pool share 300²/850 ≈ 105.9 rows on average
    overlaps = [
        len(np.intersect1d(s.unpaired_images, s.unpaired_texts))
        for s in (make_split(1000, 100, 50, n_unpaired=300, seed=seed) for seed in range(40))
    ]
    assert abs(np.mean(overlaps) - 300**2 / 850) < 4


def test_all_available_overlap_and_disjoint_modes():
    s = make_split(200, 30, 20, seed=1)
    rest = np.setdiff1d(np.arange(200), np.concatenate([s.val, s.paired]))
    np.testing.assert_array_equal(s.unpaired_images, rest)
    np.testing.assert_array_equal(s.unpaired_texts, rest)
    o = make_split(200, 30, 20, overlap=True, seed=1)
    np.testing.assert_array_equal(o.paired, s.paired)
    np.testing.assert_array_equal(o.unpaired_images, np.setdiff1d(np.arange(200), s.val))
    d = make_split(201, 30, 20, disjoint_unpaired=True, seed=1)
    assert len(d.unpaired_images) == len(d.unpaired_texts) == 75
    assert _disjoint(d.unpaired_images, d.unpaired_texts)
    assert _disjoint(np.concatenate([d.unpaired_images, d.unpaired_texts]), np.concatenate([d.val, d.paired]))


def test_split_is_a_function_of_the_seed():
    a, b, c = (make_split(500, 50, 50, n_unpaired=100, seed=s) for s in (7, 7, 8))
    for field in ("paired", "unpaired_images", "unpaired_texts", "val"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.paired, c.paired)


def test_split_errors():
    with pytest.raises(ValueError, match="exceeds n_total"):
        make_split(100, 60, 50)
    with pytest.raises(ValueError, match="only 40 rows"):
        make_split(100, 30, 30, n_unpaired=41)
    make_split(100, 30, 30, n_unpaired=70, overlap=True)
    with pytest.raises(ValueError, match="only 20 rows"):
        make_split(100, 30, 30, n_unpaired=21, disjoint_unpaired=True)
    with pytest.raises(ValueError, match="n_pairs"):
        make_split(100, -1, 10)
    with pytest.raises(TypeError, match="n_val"):
        make_split(100, 10, 2.5)
    with pytest.raises(ValueError, match="n_total"):
        make_split(0, 0, 0)


# --- BatchSampler ------------------------------------------------------------------------------

INDICES = np.arange(1000, 1103)  # N = 103, not a multiple of the batch size


def test_batches_are_stateless_and_resumable():
    walked = BatchSampler(INDICES, 10, seed=5, stream="unpaired_images")
    history = [walked.batch(t) for t in range(60)]
    resumed = BatchSampler(INDICES, 10, seed=5, stream="unpaired_images")
    for t in np.random.default_rng(0).permutation(60):  # any order, fresh object, no saved state
        np.testing.assert_array_equal(resumed.batch(int(t)), history[t])


def test_epochs_partition_without_repeats_or_straddling():
    b = BatchSampler(INDICES, 10, seed=0, stream="s")
    assert b.batches_per_epoch == 10  # 103 // 10; the 3 left-over rows change every epoch
    skipped = []
    for e in range(6):
        batches = [b.batch(e * 10 + i) for i in range(10)]
        assert all(len(x) == 10 and x.dtype == np.int64 for x in batches)
        rows = np.concatenate(batches)
        assert len(np.unique(rows)) == 100 and np.isin(rows, INDICES).all()
        skipped.append(set(INDICES) - set(rows))
        assert b.epoch(e * 10) == b.epoch(e * 10 + 9) == e
    assert len(set().union(*skipped)) > 3  # different rows are dropped in different epochs


def test_divisible_batch_covers_each_epoch_exactly():
    idx = np.arange(40)
    b = BatchSampler(idx, 8, seed=1, stream="paired")
    for e in range(3):
        rows = np.concatenate([b.batch(e * 5 + i) for i in range(5)])
        np.testing.assert_array_equal(np.sort(rows), idx)
        assert all(b.epoch(t) == t * 8 // 40 for t in range(e * 5, e * 5 + 5))
    first = np.concatenate([b.batch(i) for i in range(5)])
    second = np.concatenate([b.batch(5 + i) for i in range(5)])
    assert not np.array_equal(first, second)  # a fresh permutation each epoch


def test_streams_and_seeds_are_independent():
    def batch(seed, stream):
        return BatchSampler(INDICES, 20, seed=seed, stream=stream).batch(0)

    np.testing.assert_array_equal(batch(0, "a"), batch(0, "a"))
    assert not np.array_equal(batch(0, "a"), batch(0, "b"))
    assert not np.array_equal(batch(0, "a"), batch(1, "a"))


def test_full_batch_and_errors():
    b = BatchSampler(np.arange(7), 7, seed=0, stream="x")
    assert sorted(b.batch(3).tolist()) == list(range(7))
    with pytest.raises(ValueError, match=r"batch_size 8 exceeds the 7 indices.*min"):
        BatchSampler(np.arange(7), 8, seed=0, stream="x")
    with pytest.raises(ValueError, match="batch_size"):
        BatchSampler(np.arange(7), 0, seed=0, stream="x")
    with pytest.raises(ValueError, match="1-D integer"):
        BatchSampler(np.zeros(4), 2, seed=0, stream="x")
    with pytest.raises(TypeError, match="stream"):
        BatchSampler(np.arange(7), 2, seed=0, stream=3)
    with pytest.raises(ValueError, match="step"):
        b.batch(-1)
