"""The whole-store NaN/Inf scan, remembered by the store's identity.

Training checks each batch as it reads it (:meth:`sotalign.data.Rows.get`), so a run starts at
once whatever the size of its pools. ``sotalign check-store PATH`` (:func:`scan_store`) scans a
whole store first, for those who want every row checked before a run; its outcome is kept in
``~/.cache/sotalign/store-scans/`` (``$SOTALIGN_CACHE/store-scans``) under the store's identity:
its absolute path, the size and modification time of each of its files, and its fingerprint
(rows, dim and a hash of a few rows). Rewriting, replacing or adding a file changes the
identity, so an outcome is never applied to other data. :func:`refuse_known_bad` is what
``fit`` does at set-up: a file stat and a few rows per store, then a store that a scan found bad
is refused before anything is written.

The outcome lives in the user's cache rather than beside the store because datasets are often
read-only or shared (a file next to them could not be written, or would be trusted by other
users' runs), and ``.npy`` files and directories of shards have no metadata of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

from ..rundir import RunDirError, read_json, write_json
from .encoders import CACHE
from .stores import EmbeddingStore

SCANS = CACHE / "store-scans"


def _identity(store: EmbeddingStore) -> dict:
    files = []
    for file in store.files():
        stat = os.stat(file)
        files.append([os.path.abspath(file), stat.st_size, stat.st_mtime_ns])
    return {"path": os.path.abspath(store.path), "files": files, **store.fingerprint()}


def _record_path(identity: dict) -> Path:
    return SCANS / (hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32] + ".json")


def cached_scan(store: EmbeddingStore) -> dict | None:
    """The outcome of an earlier scan of this very store (see :func:`scan_store`), or None."""
    identity = _identity(store)
    path = _record_path(identity)
    try:
        record = read_json(path)
    except RunDirError:  # none, or damaged: a cache never stops a run, the scan is redone
        return None
    return record if record.get("identity") == identity else None


def scan_store(store: EmbeddingStore, *, rescan: bool = False) -> dict:
    """Scan every row of ``store`` for NaN or Inf (or reuse the outcome of an earlier scan).

    Returns ``{"identity", "first_nonfinite" (a row or None), "problem" (the message naming the
    file and the row, or None), "seconds" (of the scan), "cached" (True: not scanned again)}``.
    """
    if not rescan:
        record = cached_scan(store)
        if record is not None:
            return {**record, "cached": True}
    started = time.perf_counter()
    row = store.first_nonfinite()
    record = {
        "identity": _identity(store),
        "first_nonfinite": row,
        "problem": None if row is None else f"{store.describe_row(row)} contains NaN or Inf",
        "seconds": round(time.perf_counter() - started, 3),
    }
    try:
        SCANS.mkdir(parents=True, exist_ok=True)
        write_json(_record_path(record["identity"]), record)
    except OSError as error:
        warnings.warn(f"{SCANS}: cannot keep the outcome of the scan ({error})", RuntimeWarning, stacklevel=2)
    return {**record, "cached": False}


def refuse_known_bad(store: EmbeddingStore) -> None:
    """A ValueError if a scan of this very store found a NaN or Inf (naming the file and row)."""
    record = cached_scan(store)
    if record is not None and record["problem"] is not None:
        raise ValueError(f"{record['problem']} (found by sotalign check-store)")
