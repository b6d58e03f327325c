"""Embed images and texts with frozen encoders into cached, sharded embedding stores.

    store = embed_images(load_image_encoder("efficientnet-lite0"), emoji_pairs().images)
    store = embed_texts(load_text_encoder("minilm"), captions)

The output is a directory of `.npy` shards (`shard-00000.npy`, … of `shard_rows` rows each)
that `open_store` reads as one store. It lives under `~/.cache/sotalign/embeddings/<key>/`
(or `cache_dir`), where `key` hashes the encoder's `config` (model, weights version and
preprocessing), the data (`ImageSource.key`, or the texts themselves) and the shard size, so a
different model, image size or dataset never reuses a stale cache. Shards are written
atomically and a shard that exists is never recomputed: an interrupted run resumes where it
stopped. `manifest.json` records the key's inputs and, once every shard exists, `complete`.
Two processes embedding the same data at once both finish (each may compute a shard the other
also writes; the bytes are the same), and hidden temporary shards of a killed writer are
removed after an hour.

Images are decoded and preprocessed in `workers` DataLoader processes and batched through the
encoder (fp16 autocast on GPU); a progress bar (tqdm) shows rows done.

Under `torchrun` (an initialised `torch.distributed` process group) the shards still missing
are dealt out to the ranks in turn (rank r computes the r-th, (r+W)-th, … of them) and every
rank writes only its own; rank 0 completes the manifest once all ranks are done. The shard
boundaries do not depend on the number of ranks, so the store is the same as one process's.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import suppress
from pathlib import Path

import numpy as np

from ..rundir import write_json
from .encoders import CACHE
from .stores import _natural_key, open_store, save_store

MANIFEST = "manifest.json"


def cache_key(kind: str, encoder_config: dict, data_key: str, shard_rows: int) -> str:
    """The hex key of an embedding: changes with the encoder config, the data and the sharding."""
    blob = json.dumps(
        {"kind": kind, "encoder": encoder_config, "data": data_key, "shard_rows": shard_rows}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def texts_key(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\0")
    return digest.hexdigest()[:16]


def _shard_path(directory: Path, k: int) -> Path:
    return directory / f"shard-{k:05d}.npy"


#: A temporary shard file older than this is a killed writer's leftover (a live writer's is younger).
STALE_SECONDS = 3600


def _prepare(directory: Path, manifest: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for stray in directory.glob(".shard-*"):  # a killed writer's temporary file (a live one is younger)
        with suppress(FileNotFoundError):  # a concurrent writer may have renamed it meanwhile
            if now - stray.stat().st_mtime > STALE_SECONDS:
                stray.unlink()
    path = directory / MANIFEST
    if not path.exists() and _rank_and_world()[0] == 0:
        write_json(path, manifest)


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks of the current process group (0, 1 without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def join_process_group() -> int:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), join its process group (gloo: embedding needs
    only barriers) unless one exists; returns this process's rank (0 without torchrun)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo")
    return _rank_and_world()[0]


def _barrier() -> None:
    import torch.distributed as dist

    if _rank_and_world()[1] > 1:
        dist.barrier()


def _finish(directory: Path, n_shards: int):
    _barrier()  # every rank's shards are written
    path = directory / MANIFEST
    if _rank_and_world()[0] == 0:
        manifest = json.loads(path.read_text())
        if not manifest.get("complete"):
            write_json(path, {**manifest, "complete": True})
    _barrier()
    return open_store([_shard_path(directory, k) for k in range(n_shards)])


def _bar(total: int, done: int, label: str, progress: bool):
    if not progress:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, desc=label, unit="row", dynamic_ncols=True)


def _run_shards(directory: Path, n: int, shard_rows: int, compute, label: str, progress: bool, on_shard=None):
    n_shards = max(1, -(-n // shard_rows))
    _barrier()  # rank 0 has prepared the directory
    rank, world = _rank_and_world()
    missing = [k for k in range(n_shards) if not _shard_path(directory, k).exists()]
    _barrier()  # every rank has listed the same missing shards before any is written
    todo = missing[rank::world]
    rows_left = sum(min(shard_rows, n - k * shard_rows) for k in missing)
    bar = _bar(n, n - rows_left, label, progress and rank == 0)
    for k in todo:
        start, stop = k * shard_rows, min(n, (k + 1) * shard_rows)
        features = compute(start, stop, bar)
        if features.shape[0] != stop - start:
            raise RuntimeError(f"encoder returned {features.shape[0]} rows for {stop - start} inputs")
        if not np.isfinite(features).all():
            raise ValueError(f"{label}: the encoder produced NaN or Inf in rows {start}..{stop}")
        save_store(_shard_path(directory, k), np.ascontiguousarray(features, dtype=np.float32))
        if on_shard is not None:
            on_shard(k)
    if bar is not None:
        bar.close()
    return _finish(directory, n_shards)


class _Images:
    """A map-style dataset: row i → the encoder's preprocessed array of source image i."""

    def __init__(self, source, encoder):
        self.source, self.preprocess = source, encoder.preprocess

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.preprocess(self.source.load(i))


def _default_cache(cache_dir) -> Path:
    return Path(cache_dir) if cache_dir is not None else CACHE / "embeddings"


def embed_images(
    encoder,
    source,
    *,
    batch_size: int = 64,
    workers: int = 2,
    shard_rows: int = 1024,
    cache_dir=None,
    progress: bool = True,
    on_shard=None,
):
    """Embed every image of `source` (an `ImageSource`) with `encoder`; returns the store.

    `on_shard(k)` is called after shard k is written (tests use it to interrupt a run).
    """
    import torch
    from torch.utils.data import DataLoader, Subset

    if len(source) == 0:
        raise ValueError("no images to embed")
    key = cache_key("images", encoder.config, source.key, shard_rows)
    directory = _default_cache(cache_dir) / key
    _prepare(
        directory,
        {
            "kind": "images",
            "encoder": encoder.config,
            "data": source.key,
            "rows": len(source),
            "dim": encoder.dim,
            "shard_rows": shard_rows,
            "complete": False,
        },
    )
    dataset = _Images(source, encoder)

    def compute(start, stop, bar):
        loader = DataLoader(
            Subset(dataset, range(start, stop)),
            batch_size=batch_size,
            num_workers=workers,
            pin_memory=encoder.device is not None and encoder.device.type == "cuda",
        )
        out = []
        for batch in loader:
            out.append(encoder.forward(batch if isinstance(batch, torch.Tensor) else torch.as_tensor(batch)))
            if bar is not None:
                bar.update(len(batch))
        return np.concatenate(out)

    return _run_shards(
        directory, len(source), shard_rows, compute, f"{encoder.name} images", progress, on_shard
    )


def embed_texts(
    encoder,
    texts,
    *,
    batch_size: int = 256,
    shard_rows: int = 4096,
    cache_dir=None,
    progress: bool = True,
    on_shard=None,
):
    """Embed `texts` (a list of strings) with `encoder` (a `TextEncoder`); returns the store."""
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to embed")
    if not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be strings")
    data_key = texts_key(texts)
    key = cache_key("texts", encoder.config, data_key, shard_rows)
    directory = _default_cache(cache_dir) / key
    _prepare(
        directory,
        {
            "kind": "texts",
            "encoder": encoder.config,
            "data": data_key,
            "rows": len(texts),
            "dim": encoder.dim,
            "shard_rows": shard_rows,
            "complete": False,
        },
    )

    def compute(start, stop, bar):
        out = []
        for s in range(start, stop, batch_size):
            chunk = texts[s : min(stop, s + batch_size)]
            out.append(encoder(chunk))
            if bar is not None:
                bar.update(len(chunk))
        return np.concatenate(out)

    return _run_shards(
        directory, len(texts), shard_rows, compute, f"{encoder.name} texts", progress, on_shard
    )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp", ".tif", ".tiff")
DATASETS = ("emoji", "openclipart", "fashion-mnist", "fashion-mnist-train", "wordnet")


def read_input(source: str):
    """What `sotalign embed --input` names: (name, ImageSource or None, texts or None, labels, classes).

    - `dataset:<name>`: a built-in dataset (emoji, openclipart, fashion-mnist[-train] = test/train,
      wordnet = glosses, texts only);
    - a directory: its image files (natural order of their relative paths), no texts;
    - `.csv` (header with `image` and `caption` columns) or `.jsonl` (objects with `image` and
      `caption`): image paths relative to the file's directory, and their captions;
    - `.txt`: one text per line (blank lines skipped).
    """
    from . import datasets
    from .datasets import ImageSource

    scheme, sep, name = source.partition(":")
    if sep and scheme == "dataset":
        if name not in DATASETS:
            raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
        if name == "wordnet":
            return name, None, [s.text for s in datasets.wordnet_glosses()], None, None
        data = {
            "emoji": datasets.emoji_pairs,
            "openclipart": datasets.openclipart_pairs,
            "fashion-mnist": lambda: datasets.fashion_mnist("test"),
            "fashion-mnist-train": lambda: datasets.fashion_mnist("train"),
        }[name]()
        return name, data.images, list(data.captions), data.labels, data.classes
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES),
            key=lambda p: _natural_key(str(p.relative_to(path))),
        )
        if not files:
            raise ValueError(f"{source}: no image files ({', '.join(IMAGE_SUFFIXES)})")
        return path.name, ImageSource("files", tuple(str(p) for p in files)), None, None, None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"{source}: no text lines")
        return path.stem, None, texts, None, None
    if suffix not in (".csv", ".jsonl"):
        raise ValueError(f"{source}: expected dataset:<name>, a directory, .csv, .jsonl or .txt")
    rows = []
    if suffix == ".csv":
        import csv

        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{source}: the CSV header must name 'image' and 'caption' columns")
            rows = [(r["image"], r["caption"]) for r in reader]
    else:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                rows.append((item["image"], item["caption"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(
                    f"{source}:{number}: expected a JSON object with 'image' and 'caption'"
                ) from None
    if not rows:
        raise ValueError(f"{source}: no rows")
    images = []
    for image, caption in rows:
        if not isinstance(caption, str) or not isinstance(image, str):
            raise ValueError(f"{source}: image and caption must be strings, got {image!r}, {caption!r}")
        full = (path.parent / image).expanduser()
        if not full.exists():
            raise FileNotFoundError(f"{source}: image {image} not found (looked at {full})")
        images.append(str(full.resolve()))
    return path.stem, ImageSource("files", tuple(images)), [c for _, c in rows], None, None
