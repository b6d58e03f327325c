"""Which rows are paired, unpaired or held out, and a stateless, resumable batch sampler.

SOTAlign's setting (paper §3): from N aligned (image, text) rows keep a few pairs, a validation
set, and large pools of unpaired images and unpaired texts drawn independently, so an unpaired
image's own caption is generally not among the unpaired texts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..ot.validation import check_count


@dataclass(frozen=True)
class Split:
    """Row indices (int64, sorted ascending) into aligned image/text stores of N rows.

    `val` and `paired` are disjoint; the unpaired pools avoid `val` always and avoid
    `paired` unless the split was made with `overlap=True`.
    """

    paired: np.ndarray
    unpaired_images: np.ndarray
    unpaired_texts: np.ndarray
    val: np.ndarray


def make_split(
    n_total: int,
    n_pairs: int,
    n_val: int,
    *,
    n_unpaired: int | None = None,
    overlap: bool = False,
    disjoint_unpaired: bool = False,
    seed: int = 0,
) -> Split:
    """Split N aligned rows into pairs, unpaired image/text pools and a validation set.

    1. A random permutation of the N rows (seeded by `seed`): the first `n_val` rows are `val`,
       the next `n_pairs` are `paired`.
    2. The pool is the remaining rows (with `overlap=True`: every row outside `val`, so paired
       rows may reappear as unpaired samples).
    3. `unpaired_images` and `unpaired_texts` are two independent random subsets of the pool
       of size `n_unpaired` each (None: the whole pool, i.e. the same rows for both modalities;
       their batches are still drawn independently by `BatchSampler`). With
       `disjoint_unpaired=True` the pool is first cut into two random halves, images from one
       and texts from the other, so no unpaired image has its caption among the unpaired texts
       (None then means the whole half).
    """
    n_total = check_count("n_total", n_total)
    n_pairs = check_count("n_pairs", n_pairs, 0)
    n_val = check_count("n_val", n_val, 0)
    seed = check_count("seed", seed, 0)
    if n_val + n_pairs > n_total:
        raise ValueError(f"n_val + n_pairs = {n_val} + {n_pairs} exceeds n_total = {n_total}")
    rng = np.random.default_rng([seed, 0])
    perm = rng.permutation(n_total)
    val, paired = perm[:n_val], perm[n_val : n_val + n_pairs]
    pool = perm[n_val:] if overlap else perm[n_val + n_pairs :]
    if disjoint_unpaired:
        shuffled = np.random.default_rng([seed, 1]).permutation(pool)
        half = len(pool) // 2
        image_pool, text_pool = shuffled[:half], shuffled[half : 2 * half]
    else:
        image_pool = text_pool = pool
    available = len(image_pool)
    if n_unpaired is None:
        n_unpaired = available
    n_unpaired = check_count("n_unpaired", n_unpaired, 0)
    if n_unpaired > available:
        raise ValueError(
            f"n_unpaired = {n_unpaired} but only {available} rows are available per modality "
            f"(n_total {n_total} − n_val {n_val}"
            + ("" if overlap else f" − n_pairs {n_pairs}")
            + (", halved by disjoint_unpaired" if disjoint_unpaired else "")
            + ")"
        )
    images = np.random.default_rng([seed, 2]).choice(image_pool, size=n_unpaired, replace=False)
    texts = np.random.default_rng([seed, 3]).choice(text_pool, size=n_unpaired, replace=False)

    def done(a):
        a = np.sort(a).astype(np.int64)
        a.flags.writeable = False
        return a

    return Split(paired=done(paired), unpaired_images=done(images), unpaired_texts=done(texts), val=done(val))


def _stream_id(stream: str) -> int:
    """A stable 64-bit id for a stream name (Python's hash() changes between processes)."""
    return int.from_bytes(hashlib.sha256(stream.encode()).digest()[:8], "little")


class BatchSampler:
    """Batches of `indices` as a pure function of (seed, stream, step): resumable without state.

    Let N = len(indices), B = batch_size and E = N // B batches per epoch. Step t belongs to
    epoch e = t // E and is batch b = t mod E of that epoch:

        batch(t) = indices[π_e[b·B : (b+1)·B]],
        π_e = the permutation of range(N) seeded by (seed, stream, e)

    So a batch never straddles two epochs and never repeats a row; the last N mod B rows of
    each epoch's permutation are skipped (different rows each epoch). When B divides N this is
    exactly e = t·B // N. B > N is an error (shrink the batch to N instead). Different `stream`
    names (e.g. "paired", "unpaired_images", "unpaired_texts") give independent orders from one
    seed, so image and text batches are drawn independently.
    """

    def __init__(self, indices, batch_size: int, *, seed: int, stream: str):
        self.indices = np.asarray(indices)
        if self.indices.ndim != 1 or (self.indices.size and self.indices.dtype.kind not in "iu"):
            raise ValueError(
                f"indices must be a 1-D integer array, got shape {self.indices.shape} "
                f"and dtype {self.indices.dtype}"
            )
        self.indices = self.indices.astype(np.int64, copy=False)
        self.batch_size = check_count("batch_size", batch_size)
        self.seed = check_count("seed", seed, 0)
        if not isinstance(stream, str):
            raise TypeError(f"stream must be a str, got {type(stream).__name__}")
        self.stream = stream
        n = len(self.indices)
        if self.batch_size > n:
            raise ValueError(
                f"batch_size {self.batch_size} exceeds the {n} indices of stream {stream!r}; "
                f"use batch_size=min(batch_size, {n})"
            )
        self.batches_per_epoch = n // self.batch_size
        self._cached: tuple[int, np.ndarray] | None = None

    def epoch(self, step: int) -> int:
        return check_count("step", step, 0) // self.batches_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        """π_e: the order of epoch e (kept for the latest epoch only: a cache, not state)."""
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, _stream_id(self.stream), epoch])
            self._cached = (epoch, rng.permutation(len(self.indices)))
        return self._cached[1]

    def batch(self, step: int) -> np.ndarray:
        """The int64 row indices of step `step` (see the class docstring for the rule)."""
        epoch = self.epoch(step)
        b = step % self.batches_per_epoch
        return self.indices[self.permutation(epoch)[b * self.batch_size : (b + 1) * self.batch_size]]

    def shard(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """Rank ``rank``'s part of ``batch(step)`` among ``world_size`` data-parallel ranks:
        consecutive slices of sizes differing by at most one (``np.array_split``), disjoint, in
        rank order, whose concatenation is ``batch(step)``. Stateless like ``batch``, so a run
        resumes on any number of ranks."""
        world_size = check_count("world_size", world_size)
        if not 0 <= check_count("rank", rank, 0) < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if world_size > self.batch_size:
            raise ValueError(
                f"a batch of {self.batch_size} rows cannot be split across "
                f"{world_size} ranks (stream {self.stream!r})"
            )
        return np.array_split(self.batch(step), world_size)[rank]
