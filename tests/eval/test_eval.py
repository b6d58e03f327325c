"""Evaluation metrics against brute-force numpy, hand-computed ties and closed forms."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from sotalign.data import make_platonic, open_store, save_store
from sotalign.eval import (
    linear_cka,
    mutual_knn,
    retrieval_metrics,
    selection_distance,
    ssw_distance,
    zero_shot_accuracy,
    zero_shot_weights,
)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ranks_numpy(scores, target):
    """Pessimistic 0-based rank, one row at a time: strictly higher + other ties."""
    out = []
    for row, t in zip(scores, target, strict=True):
        out.append(sum(1 for j, s in enumerate(row) if s > row[t] or (s == row[t] and j != t)))
    return np.array(out)


def _retrieval_numpy(images, texts, ks):
    s = _unit(images) @ _unit(texts).T
    n = len(s)
    i2t, t2i = _ranks_numpy(s, np.arange(n)), _ranks_numpy(s.T, np.arange(n))
    out = {f"i2t_R@{k}": 100 * np.mean(i2t < k) for k in ks}
    out.update({f"t2i_R@{k}": 100 * np.mean(t2i < k) for k in ks})
    out["mean_R@1"] = 50 * (np.mean(i2t < 1) + np.mean(t2i < 1))
    return out


# --- retrieval ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
def test_retrieval_matches_brute_force(dtype, chunk_size):
    rng = np.random.default_rng(0)
    images = rng.standard_normal((53, 16)).astype(dtype)
    texts = (images + 1.2 * rng.standard_normal((53, 16))).astype(dtype)
    got = retrieval_metrics(images, texts, ks=(1, 3, 10), chunk_size=chunk_size)
    want = _retrieval_numpy(images.astype(np.float64), texts.astype(np.float64), (1, 3, 10))
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert 0 < got["i2t_R@1"] < 100  # a non-trivial case
    torch_got = retrieval_metrics(torch.from_numpy(images), torch.from_numpy(texts), ks=(1, 3, 10))
    assert torch_got == got


def test_retrieval_of_float32_rows_whose_squared_norm_overflows():
    rng = np.random.default_rng(2)
    images = rng.standard_normal((30, 8))
    texts = images + rng.standard_normal((30, 8))
    want = _retrieval_numpy(images, texts, (1, 5))
    huge = retrieval_metrics((images * 1e20).astype(np.float32), (texts * 1e25).astype(np.float32), ks=(1, 5))
    assert huge == pytest.approx(want)
    assert 0 < want["mean_R@1"] < 100  # a non-trivial case


def test_retrieval_hand_made_ties():
    s2 = np.sqrt(0.5)
    images = np.array([[1.0, 0.0], [0.0, 1.0], [s2, s2]])
    texts = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])  # t0, t1 identical after normalisation
    # S = [[1, 1, 0], [0, 0, 1], [.707, .707, .707]]; i2t ranks (1, 2, 2), t2i ranks (0, 2, 1)
    got = retrieval_metrics(images, texts, ks=(1, 2, 3))
    assert got["i2t_R@1"] == 0 and got["i2t_R@2"] == pytest.approx(100 / 3) and got["i2t_R@3"] == 100
    assert got["t2i_R@1"] == pytest.approx(100 / 3) and got["t2i_R@2"] == pytest.approx(200 / 3)
    assert got["mean_R@1"] == pytest.approx(50 / 3)
    collapsed = retrieval_metrics(np.ones((5, 3)), np.ones((5, 3)), ks=(1, 4, 5))
    assert collapsed["mean_R@1"] == 0 and collapsed["i2t_R@4"] == 0 and collapsed["t2i_R@5"] == 100


def test_retrieval_is_invariant_to_pair_order():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 8))
    y = x + rng.standard_normal((40, 8))
    perm = rng.permutation(40)
    assert retrieval_metrics(x, y) == retrieval_metrics(x[perm], y[perm])


def test_retrieval_errors():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="same shape"):
        retrieval_metrics(x, np.ones((5, 3)))
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="text_emb contains NaN"):
        retrieval_metrics(x, bad)
    with pytest.raises(ValueError, match="image_emb has an all-zero row"):
        retrieval_metrics(np.zeros((4, 3)), x)
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.ones(4), np.ones(4))
    with pytest.raises(TypeError, match="floating"):
        retrieval_metrics(np.ones((4, 3), dtype=int), x)
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(x, x, ks=(0,))


# --- zero-shot ---------------------------------------------------------------------------------


def test_zero_shot_weights_formula():
    rng = np.random.default_rng(2)
    table = {}
    seen = []

    def encoder(prompts):
        seen.extend(prompts)
        return np.stack([table.setdefault(p, rng.standard_normal(6)) for p in prompts])

    head = torch.nn.Linear(6, 4, bias=False).double()
    names, templates = ["cat", "dog", "eel"], ["a photo of a {}.", "art of the {name}"]
    w = zero_shot_weights(names, templates, encoder, head)
    assert seen == [
        "a photo of a cat.",
        "art of the cat",
        "a photo of a dog.",
        "art of the dog",
        "a photo of a eel.",
        "art of the eel",
    ]
    mat = head.weight.detach().numpy()
    for c, name in enumerate(names):
        per = _unit(np.stack([table[t.format(name, name=name)] for t in templates]) @ mat.T)
        want = per.mean(0) / np.linalg.norm(per.mean(0))
        np.testing.assert_allclose(w[c].numpy(), want, atol=1e-12)
    assert zero_shot_weights(names, templates, encoder, None).shape == (3, 6)
    for bad in ("a photo", "a {kind} of {}"):
        with pytest.raises(ValueError, match="placeholder"):
            zero_shot_weights(names, [bad], encoder, None)
    with pytest.raises(ValueError, match="rows for 2 prompts"):
        zero_shot_weights(["cat"], templates, lambda p: np.ones((3, 6)), None)


def test_zero_shot_accuracy_brute_force_and_ties():
    rng = np.random.default_rng(3)
    images, weights = rng.standard_normal((200, 5)), rng.standard_normal((9, 5))
    labels = rng.integers(9, size=200)
    ranks = _ranks_numpy(_unit(images) @ _unit(weights).T, labels)
    got = zero_shot_accuracy(images, labels, weights, ks=(1, 3, 9), chunk_size=17)
    assert got == {
        "top1": pytest.approx(100 * np.mean(ranks < 1)),
        "top3": pytest.approx(100 * np.mean(ranks < 3)),
        "top9": 100.0,
    }
    # two identical class weights tie: an image of either class ranks second, never first
    tied = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = zero_shot_accuracy(np.array([[1.0, 0.1], [1.0, 0.1], [0.1, 1.0]]), [0, 1, 2], tied, ks=(1, 2))
    assert got["top1"] == pytest.approx(100 / 3) and got["top2"] == 100
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        zero_shot_accuracy(np.ones((2, 2)), [0, 3], tied)
    with pytest.raises(ValueError, match="one entry per image"):
        zero_shot_accuracy(np.ones((2, 2)), [0], tied)
    with pytest.raises(ValueError, match="dim"):
        zero_shot_accuracy(np.ones((2, 3)), [0, 1], tied)


def test_zero_shot_on_the_platonic_toy():
    d = make_platonic(600, n_concepts=8, seed=1)
    w = zero_shot_weights(d.concept_names, ["a photo of a {}.", "a drawing of a {}."], d.encode_text, None)
    acc = zero_shot_accuracy(torch.from_numpy(d.texts), torch.from_numpy(d.labels), w)
    assert acc["top1"] > 90 and acc["top5"] >= acc["top1"]
    shuffled = zero_shot_accuracy(d.texts, np.random.default_rng(0).permutation(d.labels), w)
    assert shuffled["top1"] < 30


# --- representational similarity -----------------------------------------------------------------


def _mutual_knn_numpy(a, b, k):
    def knn(x):
        s = _unit(x) @ _unit(x).T
        np.fill_diagonal(s, -np.inf)
        return [set(np.argsort(-row)[:k]) for row in s]

    return np.mean([len(p & q) / k for p, q in zip(knn(a), knn(b), strict=True)])


def test_mutual_knn_brute_force_and_invariances():
    rng = np.random.default_rng(4)
    a = rng.standard_normal((120, 10))
    b = a @ rng.standard_normal((10, 7)) + 0.8 * rng.standard_normal((120, 7))
    want = _mutual_knn_numpy(a, b, 5)
    assert 0.05 < want < 0.95
    assert mutual_knn(a, b, k=5, chunk_size=13) == pytest.approx(want, abs=1e-12)
    q = np.linalg.qr(rng.standard_normal((10, 10)))[0]
    assert mutual_knn(3.0 * a @ q, b, k=5) == pytest.approx(want, abs=1e-12)
    assert mutual_knn(a, a, k=5) == 1.0
    assert mutual_knn(a, rng.standard_normal((120, 7)), k=5) < 0.15  # chance ≈ k/(n−1) ≈ 0.04
    with pytest.raises(ValueError, match="k must be"):
        mutual_knn(a, b, k=120)
    with pytest.raises(ValueError, match="same samples"):
        mutual_knn(a, b[:-1])


def _cka_numpy(a, b):
    n = len(a)
    h = np.eye(n) - 1.0 / n
    ka, kb = a @ a.T, b @ b.T

    def hsic(x, y):
        return np.trace(x @ h @ y @ h)

    return hsic(ka, kb) / np.sqrt(hsic(ka, ka) * hsic(kb, kb))


def test_linear_cka_brute_force_and_invariances():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((80, 6)) + 2.0
    b = np.tanh(a @ rng.standard_normal((6, 9))) + 0.3 * rng.standard_normal((80, 9))
    want = _cka_numpy(a, b)
    assert 0.1 < want < 0.99
    assert linear_cka(a, b) == pytest.approx(want, rel=1e-10)
    assert linear_cka(torch.from_numpy(a).float(), b) == pytest.approx(want, rel=1e-5)
    q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    assert linear_cka(5.0 * a @ q, b) == pytest.approx(want, rel=1e-10)
    assert linear_cka(a, a) == pytest.approx(1.0, rel=1e-12)
    # not invariant to anisotropic scaling (so the invariance checks above can fail)
    assert abs(linear_cka(a * np.arange(1, 7), b) - want) > 1e-3
    with pytest.raises(ValueError, match="no variance"):
        linear_cka(np.ones((5, 2)), rng.standard_normal((5, 2)))


# --- spherical sliced Wasserstein -----------------------------------------------------------------


def test_ssw_zero_symmetric_and_normalised_inside():
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((120, 8)), rng.standard_normal((90, 8)) + 0.5
    assert ssw_distance(x, x, n_projections=64) == pytest.approx(0.0, abs=1e-12)
    assert ssw_distance(x, 4.0 * x, n_projections=64) == pytest.approx(0.0, abs=1e-12)
    xy = ssw_distance(x, y, n_projections=64, seed=3)
    assert xy > 0.01
    assert xy == pytest.approx(ssw_distance(y, x, n_projections=64, seed=3), rel=1e-9)
    assert xy == ssw_distance(x, y, n_projections=64, seed=3)


def test_ssw_grows_with_a_shift_on_the_sphere():
    rng = np.random.default_rng(7)
    x = _unit(rng.standard_normal((150, 6)))
    direction = np.zeros(6)
    direction[0] = 1.0
    values = [ssw_distance(x, x + t * direction) for t in (0.0, 0.25, 0.5, 1.0, 3.0)]
    assert values[0] == pytest.approx(0.0, abs=1e-12)
    assert all(a < b for a, b in itertools.pairwise(values)), values


def test_ssw_of_two_point_masses_matches_a_monte_carlo_oracle():
    """Diracs at p and q: SSW₂² = E_U[ circle distance (in turns) between P^U(p) and P^U(q) ]²."""
    rng = np.random.default_rng(8)
    p, q = _unit(rng.standard_normal((2, 5)))
    frames = np.linalg.qr(rng.standard_normal((20000, 5, 2)))[0]
    ap, aq = (np.arctan2(*(frames.transpose(0, 2, 1) @ v).T[::-1]) for v in (p, q))
    turns = np.abs((ap - aq + np.pi) % (2 * np.pi) - np.pi) / (2 * np.pi)
    want = np.sqrt(np.mean(turns**2))
    got = ssw_distance(np.tile(p, (3, 1)), np.tile(q, (4, 1)), n_projections=4000)
    assert got == pytest.approx(want, rel=0.03)


def test_ssw_errors():
    x = np.ones((4, 5))
    with pytest.raises(ValueError, match="dim"):
        ssw_distance(x, np.ones((4, 6)))
    with pytest.raises(ValueError, match="all-zero row"):
        ssw_distance(x, np.zeros((4, 5)))
    with pytest.raises(ValueError, match="n_projections"):
        ssw_distance(x, x, n_projections=0)


def test_selection_distance(tmp_path):
    rng = np.random.default_rng(9)
    pi, pt = rng.standard_normal((100, 8)), rng.standard_normal((100, 6))
    near_i, near_t = rng.standard_normal((300, 8)), rng.standard_normal((300, 6))
    far_i, far_t = near_i + 1.5, near_t - 1.5
    near = selection_distance(pi, pt, near_i, near_t, max_rows=150)
    far = selection_distance(pi, pt, far_i, far_t, max_rows=150)
    assert set(near) == {"images", "texts", "mean", "total"}
    assert near["mean"] == pytest.approx((near["images"] + near["texts"]) / 2)
    assert near["total"] == pytest.approx(near["images"] + near["texts"])
    assert far["images"] > 3 * near["images"] and far["texts"] > 3 * near["texts"]
    assert selection_distance(pi, pt, near_i, near_t, max_rows=150) == near  # deterministic
    # a store is subsampled to the same rows as the array it holds
    save_store(tmp_path / "u.npy", near_i.astype(np.float32))
    from_store = selection_distance(pi, pt, open_store(tmp_path / "u.npy"), near_t, max_rows=150)
    from_array = selection_distance(pi, pt, near_i.astype(np.float32), near_t, max_rows=150)
    assert from_store["images"] == pytest.approx(from_array["images"], rel=1e-12)
    with pytest.raises(ValueError, match="max_rows"):
        selection_distance(pi, pt, near_i, near_t, max_rows=0)
