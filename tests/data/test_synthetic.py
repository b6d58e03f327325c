"""The platonic toy and the text-encoder specs."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from sotalign.data import load_platonic_encoder, load_text_encoder, make_platonic, open_store, write_platonic


def _ridge_r2(x_train, y_train, x_test, y_test, lam=1e-2) -> float:
    """Held-out R² of a ridge regression y ≈ [x, 1] W (numpy normal equations)."""
    xt = np.hstack([x_train, np.ones((len(x_train), 1))])
    w = np.linalg.solve(xt.T @ xt + lam * np.eye(xt.shape[1]), xt.T @ y_train)
    pred = np.hstack([x_test, np.ones((len(x_test), 1))]) @ w
    return 1 - ((pred - y_test) ** 2).sum() / ((y_test - y_test.mean(0)) ** 2).sum()


def test_shapes_and_determinism():
    d = make_platonic(300, image_dim=40, text_dim=30, latent_dim=8, n_concepts=6, seed=2)
    assert d.images.shape == (300, 40) and d.texts.shape == (300, 30) and d.labels.shape == (300,)
    assert d.images.dtype == d.texts.dtype == np.float32 and d.labels.dtype == np.int64
    assert set(d.labels.tolist()) == set(range(6))
    assert len(set(d.concept_names)) == 6 and all(n.isalpha() for n in d.concept_names)
    again = make_platonic(300, image_dim=40, text_dim=30, latent_dim=8, n_concepts=6, seed=2)
    np.testing.assert_array_equal(d.images, again.images)
    np.testing.assert_array_equal(d.texts, again.texts)
    other = make_platonic(300, image_dim=40, text_dim=30, latent_dim=8, n_concepts=6, seed=3)
    assert not np.allclose(d.images, other.images)


def test_modalities_share_a_latent_but_not_a_linear_map():
    d = make_platonic(3000, image_dim=64, text_dim=48, latent_dim=8, n_concepts=10, noise=0.05, seed=0)
    tr, te = slice(0, 2000), slice(2000, 3000)
    paired = _ridge_r2(d.images[tr], d.texts[tr], d.images[te], d.texts[te])
    shuffled = _ridge_r2(
        d.images[tr], d.texts[tr][np.random.default_rng(0).permutation(2000)], d.images[te], d.texts[te]
    )
    assert paired > 0.6 and shuffled < 0.05, (paired, shuffled)
    # ... yet the maps are non-linear and different: a linear map leaves clearly more residual
    # than the noise alone (noise² · text_dim per row, vs the texts' variance)
    assert paired < 0.99
    g = d.generator
    z1, z2 = np.random.default_rng(1).standard_normal((2, 5, 8))
    for f in (g.image_map, g.text_map):
        assert not np.allclose(f(z1 + z2) - f(z1) - f(z2) + f(np.zeros(8)), 0, atol=1e-3)


def test_noise_is_independent_and_of_the_stated_size():
    kw = dict(image_dim=50, text_dim=50, latent_dim=6, n_concepts=4, seed=4)
    clean, noisy = make_platonic(4000, noise=0.0, **kw), make_platonic(4000, noise=0.2, **kw)
    np.testing.assert_array_equal(clean.labels, noisy.labels)
    xi, zeta = noisy.images - clean.images, noisy.texts - clean.texts
    assert abs(xi.std() - 0.2) < 0.005 and abs(zeta.std() - 0.2) < 0.005
    assert abs(np.corrcoef(xi.ravel(), zeta.ravel())[0, 1]) < 0.01


def test_concepts_cluster_and_prompts_classify_texts():
    d = make_platonic(2000, n_concepts=12, seed=5)
    # nearest prompt (cosine, brute force numpy) recovers each text's concept
    prompts = [f"a photo of a {name}." for name in d.concept_names]
    w = d.encode_text(prompts)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    t = d.texts / np.linalg.norm(d.texts, axis=1, keepdims=True)
    assert (np.argmax(t @ w.T, axis=1) == d.labels).mean() > 0.9


def test_encode_text_templates():
    d = make_platonic(10, n_concepts=5, noise=0.1, seed=6)
    a, b = d.concept_names[0], d.concept_names[3]
    prompts = [
        f"a photo of a {a}.",
        f"a photo of a {b}.",
        f"A sketch of the {a}",
        f"a sketch of the {b.upper()}",
    ]
    e = d.encode_text(prompts)
    # a template adds the same offset to every class; different templates differ
    np.testing.assert_allclose(e[0] - e[2], e[1] - e[3], atol=1e-5)
    assert not np.allclose(e[0], e[2])
    np.testing.assert_array_equal(e, d.encode_text(prompts))
    quiet = make_platonic(10, n_concepts=5, noise=0.0, seed=6)
    q = quiet.encode_text([f"a photo of a {a}.", f"{a}"])
    np.testing.assert_array_equal(q[0], q[1])
    with pytest.raises(ValueError, match="a photo of a dog"):
        d.encode_text(["a photo of a dog"])
    with pytest.raises(ValueError, match="a photo of a"):
        d.encode_text([f"a photo of a {a}x"])  # a concept name only counts as a whole word
    with pytest.raises(TypeError):
        d.encode_text(f"a photo of a {a}")


@pytest.mark.parametrize("fmt", ["npy", "safetensors", "h5"])
def test_write_and_reload(tmp_path, fmt):
    if fmt == "h5":
        pytest.importorskip("h5py")
    data = write_platonic(tmp_path, 120, format=fmt, n_concepts=7, image_dim=24, text_dim=16, seed=9)
    ext = {"npy": ".npy", "safetensors": ".safetensors", "h5": ".h5"}[fmt]
    np.testing.assert_array_equal(open_store(tmp_path / f"images{ext}").read(0, 120).numpy(), data.images)
    np.testing.assert_array_equal(open_store(tmp_path / f"texts{ext}").read(0, 120).numpy(), data.texts)
    np.testing.assert_array_equal(np.load(tmp_path / "labels.npy"), data.labels)
    meta = json.loads((tmp_path / "classes.json").read_text())
    assert meta["concept_names"] == data.concept_names
    prompts = [f"a photo of a {n}." for n in data.concept_names]
    for encoder in (load_platonic_encoder(tmp_path), load_text_encoder(f"platonic:{tmp_path}")):
        np.testing.assert_array_equal(encoder(prompts), data.encode_text(prompts))


@pytest.mark.parametrize(
    ("option", "error", "message"),
    [
        (dict(image_dim=0), ValueError, "image_dim must be >= 1"),
        (dict(n_concepts=2.5), TypeError, "n_concepts must be an integer"),
        (dict(hidden=True), TypeError, "hidden must be an integer"),
        (dict(noise=-0.1), ValueError, "noise must be >= 0"),
        (dict(spread=float("nan")), ValueError, "spread must be a finite number"),
        (dict(seed=-1), ValueError, "seed must be >= 0"),
    ],
)
def test_bad_generator_options_are_refused(option, error, message):
    with pytest.raises(error, match=message):
        make_platonic(10, **option)


def test_bad_platonic_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="classes.json"):
        load_platonic_encoder(tmp_path)
    (tmp_path / "classes.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"classes\.json.*JSON"):
        load_platonic_encoder(tmp_path)
    (tmp_path / "classes.json").write_text(json.dumps({"concept_names": ["a"]}))
    with pytest.raises(ValueError, match=r"classes\.json"):
        load_text_encoder(f"platonic:{tmp_path}")
    with pytest.raises(ValueError, match="format"):
        write_platonic(tmp_path / "x", 10, format="csv")


def test_text_encoder_specs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown text encoder 'clip:ViT'"):
        load_text_encoder("clip:ViT")
    with pytest.raises(ValueError, match="unknown text encoder"):
        load_text_encoder("platonic:")
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match="pip install sentence-transformers"):
        load_text_encoder("sentence-transformers:all-MiniLM-L6-v2")

    loaded = []

    class FakeModel:  # stands in for the real package: records what would be loaded, no network
        def __init__(self, name, device=None):
            loaded.append(name)

        def get_sentence_embedding_dimension(self):
            return 3

        def encode(self, prompts, convert_to_numpy=True, **options):
            return np.ones((len(prompts), 3), dtype=np.float64)

    fake = types.SimpleNamespace(SentenceTransformer=FakeModel)
    monkeypatch.setitem(sys.modules, "sentence_transformers", fake)
    encode = load_text_encoder(f"sentence-transformers:{tmp_path}")
    out = encode(["a", "b"])
    assert out.shape == (2, 3) and out.dtype == np.float32
    load_text_encoder("sentence-transformers:sentence-transformers/all-MiniLM-L6-v2")
    assert loaded == [str(tmp_path), "sentence-transformers/all-MiniLM-L6-v2"]
    with pytest.raises(FileNotFoundError, match="./no-such-model"):
        load_text_encoder("sentence-transformers:./no-such-model")
    assert len(loaded) == 2
