"""`sotalign embed` under torchrun: the ranks split the missing shards, each writes its own, and
the store is the one a single process writes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from distributed_cluster import Cluster


class HashingTextEncoder:
    """A deterministic stand-in for a text encoder: 16 numbers from the SHA-256 of each text.
    What is under test is which rank writes which shard, not the embedding itself."""

    name, dim = "hashing", 16
    config = {"model": "hashing-16"}

    def __call__(self, texts):
        rows = [np.frombuffer(hashlib.sha256(t.encode()).digest()[:16], dtype=np.uint8) for t in texts]
        return np.stack(rows).astype(np.float32) / 255.0


TEXTS = [f"sentence number {i}" for i in range(70)]


def embed_on_each_rank(rank, world, cache_dir, written_by):
    import os

    from sotalign.data import embed

    def record(k):
        (written_by / f"shard{k}-rank{rank}").touch()

    os.makedirs(written_by, exist_ok=True)
    store = embed.embed_texts(
        HashingTextEncoder(), TEXTS, shard_rows=8, cache_dir=cache_dir, progress=False, on_shard=record
    )
    return store.read(0, len(store)).numpy()


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(2, timeout=60.0)
    yield c
    c.close()


def test_two_ranks_write_disjoint_shards_and_the_single_process_store(cluster, tmp_path):
    from sotalign.data import embed

    single = embed.embed_texts(
        HashingTextEncoder(), TEXTS, shard_rows=8, cache_dir=tmp_path / "one", progress=False
    )
    expected = single.read(0, len(single)).numpy()

    results = cluster.run(embed_on_each_rank, tmp_path / "two", tmp_path / "written")
    for result in results:
        np.testing.assert_array_equal(result, expected)
    marks = sorted(p.name for p in (tmp_path / "written").iterdir())
    shards = {int(m.split("-")[0][5:]) for m in marks}
    assert shards == set(range(9)) and len(marks) == 9  # every shard written once, by one rank
    assert {m.split("-")[1] for m in marks} == {"rank0", "rank1"}  # both ranks did work


def test_a_resumed_distributed_embedding_computes_only_the_missing_shards(cluster, tmp_path):
    from sotalign.data import embed

    cache = tmp_path / "cache"
    first = embed.embed_texts(HashingTextEncoder(), TEXTS, shard_rows=8, cache_dir=cache, progress=False)
    directory = next(cache.iterdir())
    for k in (2, 5, 6):
        (directory / f"shard-{k:05d}.npy").unlink()
    results = cluster.run(embed_on_each_rank, cache, tmp_path / "written")
    assert sorted(int(p.name.split("-")[0][5:]) for p in (tmp_path / "written").iterdir()) == [2, 5, 6]
    for result in results:
        np.testing.assert_array_equal(result, first.read(0, len(first)).numpy())
