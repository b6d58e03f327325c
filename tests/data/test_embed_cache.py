"""Sharded, cached, resumable embedding (`sotalign.data.embed`) and `sotalign embed` inputs.

The encoder here is a tiny deterministic stand-in (per-channel mean and std of the resized
image), so the expected features are computed independently with numpy.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from sotalign.data.datasets import ImageSource  # noqa: E402
from sotalign.data.embed import cache_key, embed_images, embed_texts, read_input  # noqa: E402


class ChannelStats:
    """Image → (mean R, G, B, std R, G, B) at `size` px; counts the images it embeds."""

    name, dim, device = "channel-stats", 6, torch.device("cpu")

    def __init__(self, size=8):
        self.size, self.calls = size, 0
        self.config = {"encoder": self.name, "size": size}

    def preprocess(self, image):
        return (
            np.asarray(image.convert("RGB").resize((self.size, self.size)), np.float32)
            .transpose(2, 0, 1)
            .copy()
        )

    def forward(self, batch):
        self.calls += len(batch)
        x = batch.numpy().reshape(len(batch), 3, -1)
        return np.concatenate([x.mean(2), x.std(2)], 1)


def _pixels(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 12, 12, 3), dtype=np.uint8)


def _expected(pixels, size=8):
    out = []
    for p in pixels:
        x = np.asarray(Image.fromarray(p).resize((size, size)), np.float32).reshape(-1, 3)
        out.append(np.concatenate([x.mean(0), x.std(0)]))
    return np.array(out, np.float32)


def test_embed_images_matches_an_independent_computation(tmp_path):
    pixels = _pixels(23)
    store = embed_images(
        ChannelStats(),
        ImageSource("array", pixels=pixels),
        batch_size=4,
        workers=0,
        shard_rows=10,
        cache_dir=tmp_path,
        progress=False,
    )
    assert len(store) == 23 and store.dim == 6
    np.testing.assert_allclose(store.read(0, 23).numpy(), _expected(pixels), rtol=1e-5, atol=1e-4)
    (directory,) = tmp_path.iterdir()
    assert sorted(p.name for p in directory.glob("shard-*.npy")) == [f"shard-0000{k}.npy" for k in range(3)]
    assert json.loads((directory / "manifest.json").read_text())["complete"] is True


def test_an_interrupted_embedding_resumes_without_recomputing_finished_shards(tmp_path):
    pixels = _pixels(25, seed=1)
    source = ImageSource("array", pixels=pixels)
    encoder = ChannelStats()

    def stop_after_first(k):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_images(
            encoder,
            source,
            workers=0,
            shard_rows=10,
            cache_dir=tmp_path,
            progress=False,
            on_shard=stop_after_first,
        )
    assert encoder.calls == 10
    (directory,) = tmp_path.iterdir()
    assert json.loads((directory / "manifest.json").read_text())["complete"] is False
    stale = directory / ".shard-00001.npy.x.tmp.npy"  # a killed writer's leftover, hours old
    stale.write_bytes(b"half-written")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    live = directory / ".shard-00002.npy.y.tmp.npy"  # a concurrent writer's: must be left alone
    live.write_bytes(b"being written")
    resumed = ChannelStats()
    store = embed_images(resumed, source, workers=0, shard_rows=10, cache_dir=tmp_path, progress=False)
    assert resumed.calls == 15  # only the two unfinished shards
    np.testing.assert_allclose(store.read(0, 25).numpy(), _expected(pixels), rtol=1e-5, atol=1e-4)
    again = ChannelStats()
    embed_images(again, source, workers=0, shard_rows=10, cache_dir=tmp_path, progress=False)
    assert again.calls == 0  # fully cached
    assert not stale.exists() and live.exists()


def test_the_cache_key_changes_with_preprocessing_data_and_model(tmp_path):
    pixels = _pixels(5)
    source = ImageSource("array", pixels=pixels)
    small, large = ChannelStats(size=8), ChannelStats(size=4)
    a = embed_images(small, source, workers=0, cache_dir=tmp_path, progress=False)
    b = embed_images(large, source, workers=0, cache_dir=tmp_path, progress=False)
    assert large.calls == 5 and a.path != b.path
    np.testing.assert_allclose(b.read(0, 5).numpy(), _expected(pixels, size=4), rtol=1e-5, atol=1e-4)
    assert len(list(tmp_path.iterdir())) == 2
    base = cache_key("images", small.config, source.key, 1024)
    assert cache_key("images", large.config, source.key, 1024) != base
    assert (
        cache_key("images", small.config, ImageSource("array", pixels=_pixels(5, seed=2)).key, 1024) != base
    )
    assert cache_key("images", {**small.config, "encoder": "other"}, source.key, 1024) != base
    assert cache_key("images", dict(small.config), source.key, 1024) == base


class Lengths:
    name, dim = "lengths", 2
    config = {"encoder": "lengths"}

    def __init__(self):
        self.calls = 0

    def __call__(self, texts):
        self.calls += len(texts)
        return np.array([[len(t), t.count(" ")] for t in texts], np.float32)


def test_embed_texts_shards_and_caches(tmp_path):
    texts = [f"sentence number {i} " * (i % 3 + 1) for i in range(11)]
    encoder = Lengths()
    store = embed_texts(encoder, texts, batch_size=3, shard_rows=4, cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(store.read(0, 11).numpy(), Lengths()(texts))
    again = Lengths()
    embed_texts(again, texts, batch_size=3, shard_rows=4, cache_dir=tmp_path, progress=False)
    assert again.calls == 0
    with pytest.raises(ValueError, match="no texts"):
        embed_texts(encoder, [], cache_dir=tmp_path)


def test_read_input_forms(tmp_path):
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    for name in ("b10.png", "b2.png", "sub/a.png"):
        Image.fromarray(_pixels(1)[0]).save(images / name)
    (images / "notes.txt").write_text("not an image")
    name, source, texts, _, _ = read_input(str(images))
    assert texts is None and [p.split("imgs/")[1] for p in source.items] == ["b2.png", "b10.png", "sub/a.png"]
    assert source.load(0).size == (12, 12)

    (tmp_path / "pairs.csv").write_text(
        'image,caption\nimgs/b2.png,a red dog\nimgs/sub/a.png,"a cat, asleep"\n'
    )
    _, source, texts, _, _ = read_input(str(tmp_path / "pairs.csv"))
    assert texts == ["a red dog", "a cat, asleep"] and source.items[1].endswith("imgs/sub/a.png")
    (tmp_path / "pairs.jsonl").write_text(
        '{"image": "imgs/b2.png", "caption": "one"}\n\n{"image": "imgs/b10.png", "caption": "two"}\n'
    )
    _, source, texts, _, _ = read_input(str(tmp_path / "pairs.jsonl"))
    assert texts == ["one", "two"] and len(source) == 2
    (tmp_path / "lines.txt").write_text("first line\n\nsecond line\n")
    assert read_input(str(tmp_path / "lines.txt"))[2] == ["first line", "second line"]

    (tmp_path / "bad.csv").write_text("path,text\nx,y\n")
    with pytest.raises(ValueError, match="'image' and 'caption'"):
        read_input(str(tmp_path / "bad.csv"))
    (tmp_path / "missing.jsonl").write_text('{"image": "nope.png", "caption": "x"}\n')
    with pytest.raises(FileNotFoundError, match="nope.png"):
        read_input(str(tmp_path / "missing.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"image": 1\n')
    with pytest.raises(ValueError, match="broken.jsonl:1"):
        read_input(str(tmp_path / "broken.jsonl"))
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        read_input("dataset:imagenet")
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_input(str(tmp_path / "absent.csv"))


def test_two_writers_of_the_same_cache_entry_both_finish(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"text {i}" for i in range(40)]

    def embed(_):
        return (
            embed_texts(Lengths(), texts, batch_size=5, shard_rows=8, cache_dir=tmp_path, progress=False)
            .read(0, 40)
            .numpy()
        )

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(embed, range(2))
    np.testing.assert_array_equal(a, Lengths()(texts))
    np.testing.assert_array_equal(b, a)
