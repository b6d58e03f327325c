"""Embedding stores: row-addressable matrices of frozen-encoder features on disk.

A store is an n × d matrix of embeddings (row i = sample i) read lazily: `rows(indices)` reads
only the requested rows, so a 1M × 1024 pool never has to fit in memory. Formats:

- `.npy`: memory-mapped (`np.load(mmap_mode="r")`); a fancy index touches only the pages of
  the requested rows.
- `.safetensors`: opened and validated with `safe_open(framework="pt")`; contiguous blocks are
  read with `get_slice`, scattered rows through a read-only memmap of the tensor's bytes (the
  format is an 8-byte header length, a JSON header with each tensor's dtype, shape and byte
  offsets, then raw little-endian C-order data), since one `get_slice` call per row costs
  much more than a memmap gather for a batch of random rows.
- `.h5` / `.hdf5`: an h5py dataset; scattered rows are one HDF5 point selection of the sorted,
  distinct indices (optional dependency, `pip install sotalign[hdf5]`).
- a directory of shards, a list of paths or a glob: a `ShardedStore` that concatenates the
  shards' rows in order (natural filename order for directories and globs, so `part2` comes
  before `part10`), reading each shard lazily.

Every store returns float32 torch tensors whatever the dtype on disk (float16, bfloat16,
float32, float64), and every error names the file.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch

from ..rundir import atomic_output

SUFFIXES = (".npy", ".safetensors", ".h5", ".hdf5")
PathLike = str | os.PathLike

_SAFETENSORS_FLOAT = {"F16", "BF16", "F32", "F64"}


class EmbeddingStore(ABC):
    """An n × dim matrix of embeddings on disk, read by rows.

    Subclasses set `path`, `dim`, `_n` and implement `_read_range(start, stop)` (a contiguous
    block of rows, as a numpy array or torch tensor) and `_gather(unique_sorted)` (the rows at
    sorted, distinct indices); `rows` handles any order and repeats on top.
    """

    path: str
    dim: int
    _n: int

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, rows={self._n}, dim={self.dim})"

    @abstractmethod
    def _read_range(self, start: int, stop: int):
        """Rows [start, stop) (0 <= start < stop <= len) as an array or tensor."""

    @abstractmethod
    def _gather(self, unique_sorted: np.ndarray) -> torch.Tensor:
        """float32 rows at sorted, distinct, in-range indices."""

    def rows(self, indices) -> torch.Tensor:
        """float32 tensor (len(indices), dim): row j is stored row indices[j] (any order, repeats ok)."""
        idx = _check_indices(indices, self._n, self.path)
        if idx.size == 0:
            return torch.empty(0, self.dim)
        unique, inverse = np.unique(idx, return_inverse=True)
        out = self._gather(unique)
        if len(unique) == len(idx) and np.array_equal(unique, idx):
            return out
        return out[torch.from_numpy(inverse.reshape(-1))]

    def read(self, start: int, stop: int) -> torch.Tensor:
        """float32 tensor of the contiguous rows [start, stop) (clipped to the store, like a slice)."""
        start, stop, _ = slice(start, stop).indices(self._n)
        if stop <= start:
            return torch.empty(0, self.dim)
        return _as_float32(self._read_range(start, stop))

    def fingerprint(self, sample_rows: int = 8) -> dict:
        """What identifies this store's contents cheaply: rows, dim, bytes on disk, and a hash of
        ``sample_rows`` rows spread over the store (a run records it; a changed store differs)."""
        sample = np.unique(np.linspace(0, self._n - 1, min(sample_rows, self._n)).astype(np.int64))
        digest = hashlib.sha256(self.rows(sample).numpy().tobytes()).hexdigest()
        return {"rows": self._n, "dim": self.dim, "bytes": self._disk_bytes(), "sample_sha256": digest}

    def _disk_bytes(self) -> int:
        return sum(os.path.getsize(file) for file in self.files())

    def files(self) -> list[str]:
        """The files holding the store's rows."""
        return [self.path]

    def describe_row(self, row: int) -> str:
        """Where stored row ``row`` lives, for an error message: ``<file>: row <row>``."""
        return f"{self.path}: row {row}"

    def finite_rows(self, indices) -> torch.Tensor:
        """As :meth:`rows`, and a ValueError naming the file and the row if one holds NaN or Inf."""
        block = self.rows(indices)
        position = _first_nonfinite_row(block)
        if position is not None:
            raise ValueError(f"{self.describe_row(int(np.asarray(indices)[position]))} contains NaN or Inf")
        return block

    def first_nonfinite(self, chunk_rows: int = 65536) -> int | None:
        """Index of the first row holding a NaN or ±Inf (streamed in chunks), or None."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        for start in range(0, self._n, chunk_rows):
            position = _first_nonfinite_row(self.read(start, start + chunk_rows))
            if position is not None:
                return start + position
        return None

    def check_finite(self, chunk_rows: int = 65536) -> None:
        """Stream through the store; ValueError naming the file and first bad row on NaN/Inf."""
        row = self.first_nonfinite(chunk_rows)
        if row is not None:
            raise ValueError(f"{self.describe_row(row)} contains NaN or Inf")


NPY_MAGIC = b"\x93NUMPY"


class NpyStore(EmbeddingStore):
    """A memory-mapped `.npy` file (nothing is read until rows are asked for)."""

    def __init__(self, path: PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as file:
            # np.load reads anything else as a pickle and then suggests allow_pickle
            if file.read(len(NPY_MAGIC)) != NPY_MAGIC:
                raise ValueError(
                    f"{self.path}: not a .npy file (it does not start with the .npy magic bytes)"
                )
        try:
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ValueError(f"{self.path}: not a readable .npy file ({exc})") from None
        _check_shape_dtype(self.path, array.shape, array.dtype.kind == "f", str(array.dtype))
        self._array = array
        self._n, self.dim = (int(s) for s in array.shape)

    def _read_range(self, start, stop):
        return self._array[start:stop]

    def _gather(self, unique_sorted):
        # a fancy index on a memmap copies only the requested rows (and touches only their pages)
        return _as_float32(self._array[unique_sorted])


class SafetensorsStore(EmbeddingStore):
    """One 2-D tensor of a `.safetensors` file: ranges through `get_slice`, gathers through a memmap."""

    def __init__(self, path: PathLike, key: str | None = None):
        from safetensors import safe_open

        self.path = os.fspath(path)
        try:
            self._file = safe_open(self.path, framework="pt")
            keys = list(self._file.keys())
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError)
            raise ValueError(f"{self.path}: not a readable .safetensors file ({exc})") from None
        self.key = _choose_key(self.path, keys, key)
        self._source = self._file.get_slice(self.key)
        dtype = self._source.get_dtype()
        _check_shape_dtype(
            self.path, tuple(self._source.get_shape()), dtype in _SAFETENSORS_FLOAT, dtype, self.key
        )
        self._n, self.dim = (int(s) for s in self._source.get_shape())
        self._array = _safetensors_memmap(self.path, self.key, dtype, (self._n, self.dim))

    def _read_range(self, start, stop):
        return self._source[start:stop]

    def _gather(self, unique_sorted):
        block = self._array[unique_sorted]
        if block.dtype == np.uint16:  # bfloat16 is the high half of a float32
            block = (block.astype(np.uint32) << 16).view(np.float32)
        return _as_float32(block)


class HDF5Store(EmbeddingStore):
    """One 2-D dataset of an HDF5 file, read by row ranges (needs h5py: `pip install sotalign[hdf5]`)."""

    def __init__(self, path: PathLike, key: str | None = None):
        h5py = _import_h5py(path)
        self.path = os.fspath(path)
        try:
            self._file = h5py.File(self.path, "r")
            keys = [name for name, obj in self._file.items() if isinstance(obj, h5py.Dataset)]
        except OSError as exc:
            raise ValueError(f"{self.path}: not a readable HDF5 file ({exc})") from None
        self.key = _choose_key(self.path, keys, key)
        self._source = self._file[self.key]
        _check_shape_dtype(
            self.path, self._source.shape, self._source.dtype.kind == "f", str(self._source.dtype), self.key
        )
        self._n, self.dim = (int(s) for s in self._source.shape)

    def _read(self, selection, what: str):
        try:
            return self._source[selection]
        except OSError as exc:  # a truncated or damaged file fails only when its chunks are read
            raise ValueError(f"{self.path}: cannot read {what} ({exc})") from None

    def _read_range(self, start, stop):
        return self._read(slice(start, stop), f"rows {start}..{stop - 1}")

    def _gather(self, unique_sorted):
        # h5py reads increasing, distinct indices as one selection
        return _as_float32(self._read(unique_sorted, f"{len(unique_sorted)} rows"))


class ShardedStore(EmbeddingStore):
    """Shards concatenated along rows: global row r is row r − offset[s] of shard s."""

    def __init__(self, shards: Sequence[EmbeddingStore], path: str):
        if not shards:
            raise ValueError(f"{path}: no shards")
        dims = {s.dim for s in shards}
        if len(dims) > 1:
            odd = next(s for s in shards if s.dim != shards[0].dim)
            raise ValueError(
                f"{odd.path}: shard has dim {odd.dim}, but {shards[0].path} has dim "
                f"{shards[0].dim}; all shards must have the same dim"
            )
        self.shards = list(shards)
        self.path = path
        self.dim = shards[0].dim
        self.offsets = np.cumsum([0] + [len(s) for s in shards])
        self._n = int(self.offsets[-1])

    def _pieces(self, start: int, stop: int):
        """(shard, local start, local stop) covering the global rows [start, stop)."""
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        for s in range(first, len(self.shards)):
            lo, hi = max(start, self.offsets[s]), min(stop, self.offsets[s + 1])
            if lo >= stop:
                break
            if hi > lo:
                yield s, int(lo - self.offsets[s]), int(hi - self.offsets[s])

    def _read_range(self, start, stop):
        return torch.cat([self.shards[s].read(a, b) for s, a, b in self._pieces(start, stop)])

    def _gather(self, unique_sorted):
        shard_of = np.searchsorted(self.offsets, unique_sorted, side="right") - 1
        parts = []
        for s in np.unique(shard_of):
            local = unique_sorted[shard_of == s] - self.offsets[s]
            parts.append(self.shards[s]._gather(local))
        return torch.cat(parts)

    def files(self) -> list[str]:
        return [file for shard in self.shards for file in shard.files()]

    def describe_row(self, row: int) -> str:
        s = int(np.searchsorted(self.offsets, row, side="right")) - 1
        local = self.shards[s].describe_row(row - int(self.offsets[s]))
        return f"{local} (row {row} of the sharded store {self.path})"


def open_store(source, *, key: str | None = None) -> EmbeddingStore:
    """Open embeddings lazily from a file, a directory of shards, a list of paths or a glob.

    `key` names the tensor (safetensors) or dataset (HDF5); by default the file's only one,
    else the one called "embeddings". Shards are concatenated along rows and must share `dim`.
    """
    if isinstance(source, EmbeddingStore):
        return source
    if isinstance(source, (list, tuple)):
        paths = [os.fspath(p) for p in source]
        if len(paths) == 1:
            return _open_file(paths[0], key)
        label = f"{paths[0]} (+{len(paths) - 1} shards)" if paths else "[]"
        return ShardedStore([_open_file(p, key) for p in paths], label)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a path, a list of paths or a glob, got {type(source).__name__}")
    path = os.fspath(source)
    if os.path.isdir(path):
        names = sorted((n for n in os.listdir(path) if n.lower().endswith(SUFFIXES)), key=_natural_key)
        if not names:
            raise FileNotFoundError(f"{path}: directory holds no embedding files ({', '.join(SUFFIXES)})")
        return ShardedStore([_open_file(os.path.join(path, n), key) for n in names], path)
    if not os.path.exists(path) and any(c in path for c in "*?["):
        matches = sorted(globlib.glob(path), key=_natural_key)
        if not matches:
            raise FileNotFoundError(f"{path}: glob matches no files")
        if len(matches) == 1:
            return _open_file(matches[0], key)
        return ShardedStore([_open_file(p, key) for p in matches], path)
    return _open_file(path, key)


def save_store(path: PathLike, array, *, key: str = "embeddings") -> None:
    """Write a 2-D float matrix to `path` by its suffix (.npy, .safetensors, .h5/.hdf5), atomically.

    The write is atomic and durable (:func:`sotalign.rundir.atomic_output`): a reader never
    sees a half-written store.
    """
    path = os.fspath(path)
    suffix = _suffix(path)
    data = array.detach().cpu() if isinstance(array, torch.Tensor) else np.asarray(array)
    if len(data.shape) != 2:
        raise ValueError(f"{path}: embeddings must be 2-D (rows × dim), got shape {tuple(data.shape)}")
    if not (data.dtype.is_floating_point if isinstance(data, torch.Tensor) else data.dtype.kind == "f"):
        raise TypeError(f"{path}: embeddings must have a floating-point dtype, got {data.dtype}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{path}: directory {directory} does not exist")
    with atomic_output(path) as tmp:
        if suffix == ".npy":
            np.save(tmp, _to_numpy(data), allow_pickle=False)
        elif suffix == ".safetensors":
            from safetensors.torch import save_file

            tensor = data if isinstance(data, torch.Tensor) else torch.from_numpy(np.array(data))
            save_file({key: tensor.contiguous()}, tmp)
        else:
            h5py = _import_h5py(path)
            with h5py.File(tmp, "w") as f:
                f.create_dataset(key, data=_to_numpy(data))


def check_aligned(images: EmbeddingStore, texts: EmbeddingStore) -> None:
    """Paired stores are aligned by row (image i ↔ text i): their lengths must agree."""
    if len(images) != len(texts):
        raise ValueError(
            f"paired stores are not aligned: {images.path} has {len(images)} rows but "
            f"{texts.path} has {len(texts)} (row i of the images pairs with row i of the texts)"
        )


def _open_file(path: str, key: str | None) -> EmbeddingStore:
    suffix = _suffix(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, expected a {suffix} file")
    if suffix == ".npy":
        if key is not None:
            raise ValueError(f"{path}: a .npy file holds one array; key={key!r} does not apply")
        return NpyStore(path)
    if suffix == ".safetensors":
        return SafetensorsStore(path, key)
    return HDF5Store(path, key)


def _safetensors_memmap(path: str, key: str, dtype: str, shape: tuple[int, int]) -> np.memmap:
    """A read-only memmap of one tensor's bytes, located through the file's JSON header."""
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        start, stop = json.loads(f.read(header_len))[key]["data_offsets"]
    np_dtype = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "BF16": "<u2"}[dtype]
    if stop - start != shape[0] * shape[1] * np.dtype(np_dtype).itemsize:
        raise ValueError(f"{path}[{key!r}]: header byte range does not match shape {shape} and dtype {dtype}")
    return np.memmap(path, dtype=np_dtype, mode="r", offset=8 + header_len + start, shape=shape)


def _suffix(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"{path}: unknown embedding file suffix {suffix!r}; expected one of {', '.join(SUFFIXES)}"
        )
    return suffix


def _choose_key(path: str, keys: list[str], key: str | None) -> str:
    if key is not None:
        if key not in keys:
            raise ValueError(f"{path}: no tensor named {key!r}; it holds {sorted(keys)}")
        return key
    if len(keys) == 1:
        return keys[0]
    if "embeddings" in keys:
        return "embeddings"
    raise ValueError(
        f"{path}: holds {sorted(keys)}; name one with key=... (none is called 'embeddings')"
        if keys
        else f"{path}: holds no tensors"
    )


def _check_shape_dtype(path: str, shape, is_float: bool, dtype: str, key: str | None = None) -> None:
    where = f"{path}[{key!r}]" if key is not None else path
    if len(shape) != 2:
        raise ValueError(f"{where}: embeddings must be 2-D (rows × dim), got shape {tuple(shape)}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{where}: embeddings are empty, shape {tuple(shape)}")
    if not is_float:
        raise TypeError(f"{where}: embeddings must have a floating-point dtype, got {dtype}")


def _check_indices(indices, n: int, path: str) -> np.ndarray:
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    idx = np.asarray(indices)
    if idx.ndim != 1:
        raise ValueError(f"{path}: row indices must be 1-D, got shape {idx.shape}")
    if idx.size and idx.dtype.kind not in "iu":
        raise TypeError(f"{path}: row indices must be integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = int(idx[(idx < 0) | (idx >= n)][0])
        raise IndexError(f"{path}: row index {bad} out of range for a store of {n} rows")
    return idx


def _first_nonfinite_row(block: torch.Tensor) -> int | None:
    """The first row of ``block`` holding a NaN or ±Inf, or None. Both propagate into a sum,
    which is one fast pass (the row-wise test is ~100× slower), so rows are tested only when
    the sum is not finite: a bad value, or finite values whose sum overflows."""
    if bool(torch.isfinite(block.sum())):
        return None
    bad = ~torch.isfinite(block).all(dim=1)
    return int(torch.nonzero(bad)[0, 0]) if bool(bad.any()) else None


def _as_float32(block) -> torch.Tensor:
    if isinstance(block, torch.Tensor):
        return block.to(torch.float32)
    array = np.asarray(block)
    # copy read-only views (a memmap slice) so the tensor owns writable memory
    if array.dtype != np.float32 or not array.flags.writeable:
        array = array.astype(np.float32)
    return torch.from_numpy(array)


def _to_numpy(data) -> np.ndarray:
    if isinstance(data, torch.Tensor):
        # numpy has no bfloat16
        return (data.float() if data.dtype == torch.bfloat16 else data).numpy()
    return data


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.fspath(name))]


def _import_h5py(path):
    try:
        import h5py
    except ImportError:
        raise ImportError(
            f"{os.fspath(path)}: reading or writing HDF5 needs h5py: pip install sotalign[hdf5]"
        ) from None
    return h5py
