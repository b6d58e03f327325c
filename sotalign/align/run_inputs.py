"""The data a run was trained on, recorded so that the run always reads the same data again.

A run directory records its stores by absolute path (in ``config.json``, so it means the same
from any working directory) and by fingerprint (``data.json``: rows, dim, bytes on disk and a
hash of a few rows, :meth:`~sotalign.data.EmbeddingStore.fingerprint`). ``--resume``,
``sotalign eval RUN`` and :func:`open_run_data` check the fingerprints and refuse a store that
has changed or moved, naming it. Data that moved on purpose is re-pointed with
:func:`repoint` (``sotalign repoint RUN OLD NEW``), which checks the new files against the
recorded fingerprints before it rewrites the run's paths.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ..data import AlignmentData, DataSpec, EmbeddingStore, role_names
from ..rundir import CONFIG_FILE, DATA_FILE, RunDirError, hold_run_dir, read_json, write_json
from .config import TrainConfig, build_configs, config_dict


def _stores(data: AlignmentData) -> dict[str, EmbeddingStore]:
    """The store behind each store field of ``data.spec`` (``images``, ``paired_texts``...)."""
    if data.spec is not None and data.spec.aligned:
        return {"images": data.paired_images.store, "texts": data.paired_texts.store}
    return {name: getattr(data, name).store for name in role_names() if getattr(data, name) is not None}


def record_data(run_dir: Path, data: AlignmentData) -> None:
    """Write ``data.json``: the absolute path and fingerprint of every store the run reads."""
    write_json(
        Path(run_dir) / DATA_FILE,
        {
            name: {"path": os.path.abspath(store.path), **store.fingerprint()}
            for name, store in _stores(data).items()
        },
    )


def _repoint_hint(run_dir: Path) -> str:
    return f"if the data moved on purpose, re-point the run: sotalign repoint {run_dir} OLD_DIR NEW_DIR"


def verify_data(run_dir: Path, data: AlignmentData) -> None:
    """Refuse stores that differ from those recorded in ``data.json`` (no file: nothing to check)."""
    path = Path(run_dir) / DATA_FILE
    if not path.exists():
        return
    recorded = read_json(path)
    for name, store in _stores(data).items():
        if name not in recorded:
            raise RunDirError(
                f"{path}: records no store {name!r}, but the run's configuration names {store.path}"
            )
        now = {"path": os.path.abspath(store.path), **store.fingerprint()}
        changed = [key for key in now if now[key] != recorded[name].get(key)]
        if changed:
            details = ", ".join(f"{key} {recorded[name].get(key)!r} → {now[key]!r}" for key in changed)
            raise RunDirError(
                f"{store.path}: the {name} store differs from the one {run_dir} was trained on ({details}); "
                + _repoint_hint(run_dir)
            )


def open_run_data(run_dir) -> tuple[TrainConfig, AlignmentData]:
    """The configuration of a run and its data, opened from the recorded paths and checked
    against the recorded fingerprints."""
    run_dir = Path(run_dir)
    config, spec = build_configs(read_json(run_dir / CONFIG_FILE), str(run_dir / CONFIG_FILE))
    if spec is None:
        raise RunDirError(f"{run_dir / CONFIG_FILE} records no data")
    try:
        data = AlignmentData.from_spec(spec)
    except (OSError, ValueError) as error:
        raise RunDirError(
            f"{run_dir / CONFIG_FILE}: cannot open the run's data ({error}); {_repoint_hint(run_dir)}"
        ) from None
    verify_data(run_dir, data)
    return config, data


def repoint(run_dir, old: str, new: str) -> list[str]:
    """Replace the path prefix ``old`` by ``new`` in the run's store paths, once every store at
    its new path matches its recorded fingerprint; returns the fields re-pointed."""
    run_dir = Path(run_dir)
    values = read_json(run_dir / CONFIG_FILE)
    config, spec = build_configs(values, str(run_dir / CONFIG_FILE))
    if spec is None:
        raise RunDirError(f"{run_dir / CONFIG_FILE} records no data")
    old_prefix, new_prefix = str(Path(old).expanduser().absolute()), str(Path(new).expanduser().absolute())
    moved = {
        name: new_prefix + path[len(old_prefix) :]
        for name, path in spec.store_paths().items()
        if path == old_prefix or path.startswith(old_prefix.rstrip("/") + "/")
    }
    if not moved:
        raise ValueError(
            f"no store of {run_dir} lies under {old_prefix}: {', '.join(spec.store_paths().values())}"
        )
    new_spec: DataSpec = dataclasses.replace(spec, **moved)
    try:
        data = AlignmentData.from_spec(new_spec)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot open the data under {new_prefix} ({error})") from None
    stores = _stores(data)
    recorded = read_json(run_dir / DATA_FILE)
    for name in moved:
        now = stores[name].fingerprint()
        if any(recorded[name].get(key) != value for key, value in now.items()):
            raise ValueError(
                f"{stores[name].path}: not the {name} store {run_dir} was trained on (fingerprint differs)"
            )
        recorded[name]["path"] = os.path.abspath(stores[name].path)
    with hold_run_dir(run_dir):  # not while a fit writes the run
        write_json(run_dir / CONFIG_FILE, config_dict(config, new_spec))
        write_json(run_dir / DATA_FILE, recorded)
    return sorted(moved)
