"""Embedding stores: lazy row reads against numpy indexing, every error names its file."""

from __future__ import annotations

import itertools
import os
import sys

import numpy as np
import pytest
import torch

from sotalign.data import EmbeddingStore, Rows, ShardedStore, check_aligned, open_store, save_store, scan

h5py = pytest.importorskip("h5py")
from safetensors.torch import save_file  # noqa: E402

SUFFIXES = [".npy", ".safetensors", ".h5"]


def _data(n=300, d=7, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(dtype)


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_rows_match_numpy_indexing(tmp_path, suffix, dtype):
    data = _data(dtype=dtype)
    path = tmp_path / f"emb{suffix}"
    save_store(path, data)
    store = open_store(path)
    assert isinstance(store, EmbeddingStore)
    assert (len(store), store.dim, store.path) == (300, 7, str(path))
    idx = np.array([299, 0, 5, 5, 6, 7, 120, 3, 299])  # any order, repeats, runs
    for indices in (idx, idx.tolist(), torch.from_numpy(idx)):
        got = store.rows(indices)
        assert got.dtype == torch.float32 and got.shape == (len(idx), 7)
        np.testing.assert_array_equal(got.numpy(), data[idx].astype(np.float32))
    np.testing.assert_array_equal(store.read(10, 25).numpy(), data[10:25].astype(np.float32))
    np.testing.assert_array_equal(store.read(290, 400).numpy(), data[290:].astype(np.float32))
    assert store.rows([]).shape == (0, 7)


def test_bfloat16_safetensors(tmp_path):
    t = torch.randn(50, 4).to(torch.bfloat16)
    save_store(tmp_path / "b.safetensors", t)
    np.testing.assert_array_equal(
        open_store(tmp_path / "b.safetensors").rows([3, 1]).numpy(), t.float()[[3, 1]].numpy()
    )


def test_keys(tmp_path):
    a, b = torch.randn(5, 3), torch.randn(5, 3)
    path = tmp_path / "two.safetensors"
    save_file({"embeddings": a, "other": b}, str(path))
    torch.testing.assert_close(open_store(path).read(0, 5), a)
    torch.testing.assert_close(open_store(path, key="other").read(0, 5), b)
    save_file({"x": a, "y": b}, str(path))
    with pytest.raises(ValueError, match=r"two\.safetensors.*\['x', 'y'\]"):
        open_store(path)
    with pytest.raises(ValueError, match=r"two\.safetensors.*'z'"):
        open_store(path, key="z")
    h5 = tmp_path / "two.h5"
    with h5py.File(h5, "w") as f:
        f["x"], f["y"] = a.numpy(), b.numpy()
    torch.testing.assert_close(open_store(h5, key="y").read(0, 5), b)
    with pytest.raises(ValueError, match=r"two\.h5.*\['x', 'y'\]"):
        open_store(h5)
    np.save(tmp_path / "a.npy", a.numpy())
    with pytest.raises(ValueError, match=r"a\.npy.*key"):
        open_store(tmp_path / "a.npy", key="embeddings")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_bad_files_name_the_file(tmp_path, suffix):
    with pytest.raises(FileNotFoundError, match="missing" + suffix.replace(".", r"\.")):
        open_store(tmp_path / f"missing{suffix}")
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(b"\x93NUMPY garbage" * 3)
    with pytest.raises(ValueError, match="corrupt"):
        open_store(corrupt)
    one_d = tmp_path / f"one_d{suffix}"
    three_d = tmp_path / f"three_d{suffix}"
    ints = tmp_path / f"ints{suffix}"
    _write_raw(one_d, np.zeros(5, np.float32))
    _write_raw(three_d, np.zeros((2, 2, 2), np.float32))
    _write_raw(ints, np.zeros((4, 3), np.int32))
    with pytest.raises(ValueError, match=r"one_d.*2-D"):
        open_store(one_d)
    with pytest.raises(ValueError, match=r"three_d.*2-D"):
        open_store(three_d)
    with pytest.raises(TypeError, match=r"ints.*floating"):
        open_store(ints)


def test_a_text_file_named_npy_is_not_taken_for_a_pickle(tmp_path):
    text = tmp_path / "notes.npy"
    text.write_text("garbage")
    with pytest.raises(ValueError, match=r"notes\.npy: not a \.npy file") as error:
        open_store(text)
    assert "pickle" not in str(error.value)


def _write_raw(path, array):
    """Write any array (save_store rightly refuses non-embeddings) in the format of its suffix."""
    if path.suffix == ".npy":
        np.save(path, array)
    elif path.suffix == ".safetensors":
        save_file({"embeddings": torch.from_numpy(array)}, str(path))
    else:
        with h5py.File(path, "w") as f:
            f["embeddings"] = array


def test_truncated_npy_and_unknown_suffix(tmp_path):
    path = tmp_path / "t.npy"
    np.save(path, _data())
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match=r"t\.npy"):
        open_store(path)
    (tmp_path / "e.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match=r"e\.txt.*suffix"):
        open_store(tmp_path / "e.txt")


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_bad_indices_name_the_store(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    save_store(path, _data(n=10))
    store = open_store(path)
    with pytest.raises(IndexError, match=rf"s\{suffix}.*10"):
        store.rows([0, 10])
    with pytest.raises(IndexError, match=rf"s\{suffix}.*-1"):
        store.rows([-1])
    with pytest.raises(TypeError, match=rf"s\{suffix}"):
        store.rows(np.array([0.5]))
    with pytest.raises(ValueError, match=rf"s\{suffix}.*1-D"):
        store.rows(np.zeros((2, 2), dtype=int))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_check_finite_names_file_and_first_bad_row(tmp_path, suffix):
    data = _data(n=1000, d=3)
    path = tmp_path / f"f{suffix}"
    save_store(path, data)
    open_store(path).check_finite(chunk_rows=64)
    data[700, 1], data[900, 0] = np.inf, np.nan
    save_store(path, data)
    with pytest.raises(ValueError, match=rf"f\{suffix}: row 700 "):
        open_store(path).check_finite(chunk_rows=64)
    with pytest.raises(ValueError, match=r"row 700 "):
        open_store(path).check_finite()


def test_sharded_directory_list_and_glob(tmp_path):
    data = _data(n=100, d=5)
    cuts = [0, 13, 40, 41, 100]
    names = ["part2.npy", "part10.safetensors", "part11.h5", "part30.npy"]  # natural order ≠ lexicographic
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    for name, (a, b) in zip(names, itertools.pairwise(cuts), strict=True):
        save_store(shard_dir / name, data[a:b])
    (shard_dir / "README.md").write_text("not a shard")
    stores = [
        open_store(shard_dir),
        open_store([shard_dir / n for n in names]),
        open_store(str(shard_dir / "part*")),
    ]
    idx = np.array([99, 12, 13, 40, 41, 0, 12, 55, 39])
    for store in stores:
        assert isinstance(store, ShardedStore) and (len(store), store.dim) == (100, 5)
        np.testing.assert_array_equal(store.rows(idx).numpy(), data[idx])
        np.testing.assert_array_equal(store.read(10, 45).numpy(), data[10:45])
        np.testing.assert_array_equal(store.read(0, 100).numpy(), data)
    with pytest.raises(IndexError, match="shards"):
        stores[0].rows([100])
    save_store(shard_dir / "part31.npy", _data(n=4, d=6))
    with pytest.raises(ValueError, match=r"part31\.npy.*dim 6"):
        open_store(shard_dir)
    with pytest.raises(FileNotFoundError, match=r"nothing\*"):
        open_store(str(tmp_path / "nothing*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        open_store(empty)


def test_sharded_check_finite_names_the_shard(tmp_path):
    a, b = _data(n=20, d=3), _data(n=30, d=3, seed=1)
    b[7, 2] = np.nan
    save_store(tmp_path / "s0.npy", a)
    save_store(tmp_path / "s1.h5", b)
    with pytest.raises(ValueError, match=r"s1\.h5: row 7 .*row 27 "):
        open_store(tmp_path).check_finite(chunk_rows=4)


def test_rows_are_checked_as_they_are_read_naming_the_shard_and_the_row(tmp_path):
    a, b = _data(n=20, d=3), _data(n=30, d=3, seed=1)
    b[7, 2] = np.inf
    save_store(tmp_path / "s0.npy", a)
    save_store(tmp_path / "s1.safetensors", b)
    view = Rows.whole(open_store(tmp_path))
    np.testing.assert_array_equal(view.get([26, 3, 28]).numpy(), np.stack([b[6], a[3], b[8]]))
    with pytest.raises(
        ValueError, match=r"s1\.safetensors: row 7 \(row 27 of the sharded store .*\) contains NaN or Inf"
    ):
        view.get([3, 26, 27, 28])


def test_finite_values_whose_sum_overflows_are_accepted(tmp_path):
    huge = np.full((6, 4), 3e38, dtype=np.float32)  # finite, but their float32 sum is inf
    save_store(tmp_path / "huge.npy", huge)
    store = open_store(tmp_path / "huge.npy")
    np.testing.assert_array_equal(Rows.whole(store).get(np.arange(6)).numpy(), huge)
    assert store.first_nonfinite() is None


def test_a_whole_store_scan_is_remembered_for_that_very_store(tmp_path, monkeypatch):
    monkeypatch.setattr(scan, "SCANS", tmp_path / "scans")
    data = _data(n=200, d=4)
    data[150, 1] = np.nan
    path = tmp_path / "x.npy"
    save_store(path, data)
    first = scan.scan_store(open_store(path))
    assert (first["first_nonfinite"], first["cached"]) == (150, False)
    assert first["problem"] == f"{path}: row 150 contains NaN or Inf"
    assert scan.scan_store(open_store(path))["cached"]
    with pytest.raises(ValueError, match=r"x\.npy: row 150 contains NaN or Inf \(found by"):
        scan.refuse_known_bad(open_store(path))
    # the same size and the same sampled rows, but rewritten: another store, scanned again
    data[150, 1] = 0.0
    save_store(path, data)
    assert scan.cached_scan(open_store(path)) is None
    scan.refuse_known_bad(open_store(path))
    second = scan.scan_store(open_store(path))
    assert (second["first_nonfinite"], second["cached"]) == (None, False)
    assert scan.scan_store(open_store(path), rescan=True)["cached"] is False
    for record in (tmp_path / "scans").iterdir():  # a damaged cache is no cache
        record.write_text("{not json")
    assert scan.cached_scan(open_store(path)) is None
    scan.refuse_known_bad(open_store(path))


def test_save_store_is_atomic_and_validates(tmp_path, monkeypatch):
    path = tmp_path / "e.npy"
    save_store(path, _data(n=5))
    before = path.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_store(path, _data(n=6, seed=1))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["e.npy"]  # no temporary file left behind
    with pytest.raises(ValueError, match=r"x\.npy.*2-D"):
        save_store(tmp_path / "x.npy", np.zeros(3, np.float32))
    with pytest.raises(TypeError, match=r"x\.h5.*floating"):
        save_store(tmp_path / "x.h5", np.zeros((3, 2), np.int64))
    with pytest.raises(FileNotFoundError, match="no-dir"):
        save_store(tmp_path / "no-dir" / "x.npy", np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match=r"x\.csv"):
        save_store(tmp_path / "x.csv", np.zeros((3, 2), np.float32))
    assert sorted(os.listdir(tmp_path)) == ["e.npy"]


def test_check_aligned(tmp_path):
    save_store(tmp_path / "img.npy", _data(n=10))
    save_store(tmp_path / "txt.h5", _data(n=10, d=3))
    save_store(tmp_path / "short.safetensors", _data(n=9))
    check_aligned(open_store(tmp_path / "img.npy"), open_store(tmp_path / "txt.h5"))
    with pytest.raises(ValueError, match=r"img\.npy.*10.*short\.safetensors.*9"):
        check_aligned(open_store(tmp_path / "img.npy"), open_store(tmp_path / "short.safetensors"))


def test_missing_h5py_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"x\.h5.*pip install sotalign\[hdf5\]"):
        save_store(tmp_path / "x.h5", _data(n=3))


# --- memory: rows() reads only the requested rows -------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_rows_are_memory_mapped(tmp_path, suffix):
    n, d = 16384, 1024  # 64 MiB on disk
    path = tmp_path / f"big{suffix}"
    if suffix == ".npy":
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
        for start in range(0, n, 1024):
            out[start : start + 1024] = np.arange(start, start + 1024, dtype=np.float32)[:, None]
        out.flush()
        del out
    else:
        save_file(
            {"embeddings": torch.arange(n, dtype=torch.float32)[:, None].expand(n, d).contiguous()}, str(path)
        )
    store = open_store(path)
    assert isinstance(store._array, np.memmap)
    before = _rss_bytes()
    got = store.rows([5, 16000, 7, 9000])
    grown = _rss_bytes() - before
    np.testing.assert_array_equal(got.numpy(), np.repeat([[5.0], [16000], [7], [9000]], d, axis=1))
    assert not isinstance(got.numpy(), np.memmap)
    assert grown < 8 * 2**20, f"reading 4 rows of a 64 MiB file grew RSS by {grown / 2**20:.1f} MiB"


class _Spy:
    """Wraps a store's row source and records every selection it is asked for."""

    def __init__(self, source):
        self.source, self.calls = source, []

    def __getitem__(self, item):
        self.calls.append((item.start, item.stop) if isinstance(item, slice) else np.asarray(item).tolist())
        return self.source[item]


def test_hdf5_reads_only_requested_rows(tmp_path):
    data = _data(n=1000, d=4)
    save_store(tmp_path / "s.h5", data)
    store = open_store(tmp_path / "s.h5")
    spy = store._source = _Spy(store._source)
    idx = np.array([900, 3, 4, 5, 3, 500, 501, 77])
    np.testing.assert_array_equal(store.rows(idx).numpy(), data[idx])
    assert spy.calls == [[3, 4, 5, 77, 500, 501, 900]]  # one selection of the distinct rows
    spy.calls.clear()
    store.read(10, 20)
    assert spy.calls == [(10, 20)]


def test_safetensors_ranges_use_get_slice(tmp_path):
    data = _data(n=1000, d=4)
    save_store(tmp_path / "s.safetensors", data)
    store = open_store(tmp_path / "s.safetensors")
    spy = store._source = _Spy(store._source)
    np.testing.assert_array_equal(store.read(10, 20).numpy(), data[10:20])
    assert spy.calls == [(10, 20)]
