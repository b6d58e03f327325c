"""Losses and divergences against plain re-derivations (explicit loops, numpy, dense centring
matrices), limits stated in the paper, and finite differences (gradcheck in float64)."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from conftest import features

import sotalign
from sotalign.align.losses import (
    DIVERGENCES,
    InfoNCELoss,
    SigLIPLoss,
    cka_divergence,
    divergence,
    generalized_infonce_divergence,
    infonce_loss,
    klot_divergence,
    nnclr_positives,
    s_clip_loss,
    s_clip_targets,
    sample_neighbors,
    siglip_loss,
    structure_regularizer,
)


def cos_np(X, Y):
    X = X / np.linalg.norm(X, axis=1, keepdims=True)
    Y = Y / np.linalg.norm(Y, axis=1, keepdims=True)
    return X @ Y.T


# --------------------------------------------------------------------------- SigLIP


def siglip_loop(img, txt, t, b, extra_texts=(), extra_images=()):
    img, txt = img.tolist(), txt.tolist()

    def dot(u, v):
        return sum(a * c for a, c in zip(u, v, strict=True))

    def softplus(z):  # −log σ(z)
        return math.log1p(math.exp(-abs(z))) + max(-z, 0.0)

    total = 0.0
    for i, u in enumerate(img):
        for j, v in enumerate(txt):
            z = 1.0 if i == j else -1.0
            total += softplus(z * (t * dot(u, v) + b))
        for v in extra_texts:
            total += softplus(-(t * dot(u, v.tolist()) + b))
    for u in extra_images:
        for v in txt:
            total += softplus(-(t * dot(u.tolist(), v) + b))
    return total / len(img)


def test_siglip_matches_loops_with_and_without_extra_negatives():
    img, txt = features(5, 5, 4, seed=0, unit=True)
    ext, exi = features(3, 2, 4, seed=2, unit=True)
    assert siglip_loss(img, txt, 20.0, -10.0).item() == pytest.approx(
        siglip_loop(img, txt, 20.0, -10.0), rel=1e-12
    )
    value = siglip_loss(img, txt, 7.0, -2.0, extra_texts=ext, extra_images=exi).item()
    assert value == pytest.approx(siglip_loop(img, txt, 7.0, -2.0, ext, exi), rel=1e-12)
    only_texts = siglip_loss(img, txt, 7.0, -2.0, extra_texts=ext).item()
    assert only_texts == pytest.approx(siglip_loop(img, txt, 7.0, -2.0, ext), rel=1e-12)


def test_siglip_module_learns_scale_and_bias_from_paper_init():
    crit = SigLIPLoss().double()
    assert crit.scale.item() == pytest.approx(20.0) and crit.bias.item() == pytest.approx(-10.0)
    img, txt = features(4, 4, 3, seed=4, unit=True)
    img.requires_grad_()
    extra_texts = features(2, 2, 3, seed=6, unit=True)[0]
    loss = crit(img, txt, extra_texts=extra_texts)
    t, b = crit.scale.item(), crit.bias.item()  # float32-initialised parameters
    assert loss.item() == pytest.approx(siglip_loop(img.detach(), txt, t, b, extra_texts), rel=1e-12)
    loss.backward()
    for p in (crit.log_scale, crit.bias, img):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# --------------------------------------------------------------------------- InfoNCE


def infonce_loop(img, txt, tau):
    S = (img @ txt.T).tolist()
    n = len(S)
    rows = sum(-(S[i][i] / tau - math.log(sum(math.exp(S[i][j] / tau) for j in range(n)))) for i in range(n))
    cols = sum(-(S[i][i] / tau - math.log(sum(math.exp(S[j][i] / tau) for j in range(n)))) for i in range(n))
    return (rows + cols) / (2 * n)


def test_infonce_matches_loops_and_module_uses_clip_temperature():
    img, txt = features(6, 6, 5, seed=7, unit=True)
    assert infonce_loss(img, txt, 0.07).item() == pytest.approx(infonce_loop(img, txt, 0.07), rel=1e-12)
    crit = InfoNCELoss().double()
    assert crit.temperature.item() == pytest.approx(0.07)
    tau = crit.temperature.item()  # float32-initialised parameter
    assert crit(img, txt).item() == pytest.approx(infonce_loop(img, txt, tau), rel=1e-12)
    with torch.no_grad():
        crit.log_scale.fill_(math.log(1000.0))
    assert crit.temperature.item() == pytest.approx(0.01)  # 1/τ clamped at 100


# --------------------------------------------------------------------------- CKA


def cka_dense_reference(x, y, xt, yt):
    """Eq. 9 literally, with explicit centring matrices H_n (left) and H_m (right)."""
    K, Ks = cos_np(x, y), cos_np(xt, yt)
    n, m = K.shape
    Hn, Hm = np.eye(n) - np.ones((n, n)) / n, np.eye(m) - np.ones((m, m)) / m

    def inner(P, Q):
        return float(np.sum(P * Q))

    return inner(K @ Hm, Hn @ Ks) / math.sqrt(inner(K @ Hm, Hn @ K) * inner(Ks @ Hm, Hn @ Ks))


def test_cka_matches_dense_centring_formula_on_rectangular_affinities():
    x, y = features(7, 4, 5, seed=9, unit=True)
    xt, yt = features(7, 4, 3, seed=11, unit=True)
    expected = 1.0 - cka_dense_reference(x.numpy(), y.numpy(), xt.numpy(), yt.numpy())
    assert cka_divergence(x, y, xt, yt).item() == pytest.approx(expected, rel=1e-10)
    # Unnormalised inputs: K is a cosine affinity, so the row norms do not matter.
    assert cka_divergence(3 * x, y, xt * 0.5, yt).item() == pytest.approx(expected, rel=1e-10)


def test_cka_is_zero_for_the_same_affinity_and_invariant_to_affine_teacher():
    x, y = features(8, 9, 6, seed=13, unit=True)
    assert cka_divergence(x, y, x, y).item() == pytest.approx(0.0, abs=1e-12)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    assert cka_divergence(x, y, x @ Q, y @ Q).item() == pytest.approx(0.0, abs=1e-12)  # same K*
    xt, yt = features(8, 9, 4, seed=15, unit=True)
    base = cka_divergence(x, y, xt, yt).item()
    # Appending a constant coordinate maps K* to cos²θ·K* + sin²θ: a positive scale plus a
    # constant, which CKA's centring and normalisation remove.
    theta = 0.7

    def aug(z):
        return torch.cat([math.cos(theta) * z, math.sin(theta) * torch.ones(len(z), 1, dtype=z.dtype)], 1)

    assert cka_divergence(x, y, aug(xt), aug(yt)).item() == pytest.approx(base, rel=1e-10)
    assert 0.0 < base <= 2.0


def test_cka_gradcheck():
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    xt, yt = torch.randn(5, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: cka_divergence(a, b, xt, yt), (x, y))


# --------------------------------------------------------------------------- generalised InfoNCE


def gen_infonce_reference(x, y, xt, yt, eps_t, tau):
    K, Ks = cos_np(x, y), cos_np(xt, yt)
    total = 0.0
    for i in range(K.shape[0]):
        p = np.exp((Ks[i] - Ks[i].max()) / eps_t)
        p /= p.sum()
        q = np.exp((K[i] - K[i].max()) / tau)
        q /= q.sum()
        total += sum(pj * math.log(pj / qj) for pj, qj in zip(p, q, strict=True) if pj > 0)
    return total / K.shape[0]


def test_generalized_infonce_matches_row_kl_reference():
    x, y = features(6, 7, 5, seed=17, unit=True)
    xt, yt = features(6, 7, 3, seed=19, unit=True)
    args = [a.numpy() for a in (x, y, xt, yt)]
    value = generalized_infonce_divergence(x, y, xt, yt, eps_teacher=0.1, temperature=0.2).item()
    assert value == pytest.approx(gen_infonce_reference(*args, 0.1, 0.2), rel=1e-10)
    sym = generalized_infonce_divergence(
        x, y, xt, yt, eps_teacher=0.1, temperature=0.2, symmetric=True
    ).item()
    cols = gen_infonce_reference(args[1], args[0], args[3], args[2], 0.1, 0.2)
    assert sym == pytest.approx(0.5 * (gen_infonce_reference(*args, 0.1, 0.2) + cols), rel=1e-10)
    assert value >= 0


def test_generalized_infonce_reduces_to_infonce_for_identity_teacher():
    n, tau = 6, 0.05
    x, y = features(n, n, 8, seed=21, unit=True)
    eye = torch.eye(n, dtype=torch.float64)  # cos(e_i, e_j) = δ_ij: K* = I
    value = generalized_infonce_divergence(x, y, eye, eye, eps_teacher=1e-3, temperature=tau).item()
    S = (x @ y.T).tolist()
    one_way = -sum(S[i][i] / tau - math.log(sum(math.exp(s / tau) for s in S[i])) for i in range(n)) / n
    assert value == pytest.approx(one_way, rel=1e-9)


def test_generalized_infonce_gradcheck():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    xt, yt = torch.randn(4, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    fn = functools.partial(
        generalized_infonce_divergence,
        teacher_img=xt,
        teacher_txt=yt,
        eps_teacher=0.1,
        temperature=0.3,
        symmetric=True,
    )
    assert torch.autograd.gradcheck(fn, (x, y))


# --------------------------------------------------------------------------- KLOT and dispatch


def test_klot_divergence_is_sotalign_klot():
    x, y = features(9, 11, 5, seed=23, unit=True)
    x.requires_grad_()
    xt, yt = features(9, 11, 3, seed=25, unit=True)
    value = klot_divergence(x, y, xt, yt, backend="reference")
    value.backward()
    x2 = x.detach().clone().requires_grad_()
    expected = sotalign.klot(x2, y, xt, yt, eps=0.05, eps_teacher=0.01, n_iters=100, backend="reference")
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), rel=1e-12) and value.item() >= 0
    torch.testing.assert_close(x.grad, x2.grad)
    same = klot_divergence(x.detach(), y, x.detach(), y, eps=0.05, eps_teacher=0.05, backend="reference")
    assert same.item() == pytest.approx(0.0, abs=1e-9)


def test_divergence_dispatch():
    x, y = features(5, 6, 4, seed=27, unit=True)
    xt, yt = features(5, 6, 3, seed=29, unit=True)
    assert DIVERGENCES == ("none", "cka", "infonce", "klot")
    assert divergence("none", x, y, xt, yt).item() == 0.0
    assert divergence("cka", x, y, xt, yt).item() == cka_divergence(x, y, xt, yt).item()
    assert (
        divergence("infonce", x, y, xt, yt, temperature=0.1).item()
        == generalized_infonce_divergence(x, y, xt, yt, temperature=0.1).item()
    )
    assert (
        divergence("klot", x, y, xt, yt, n_iters=20, backend="reference").item()
        == klot_divergence(x, y, xt, yt, n_iters=20, backend="reference").item()
    )
    with pytest.raises(ValueError, match="unknown divergence 'mmd'"):
        divergence("mmd", x, y, xt, yt)


def test_divergences_reject_bad_input():
    x, y = features(5, 6, 4, seed=31, unit=True)
    xt, yt = features(5, 6, 3, seed=33, unit=True)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="img contains NaN"):
        cka_divergence(bad, y, xt, yt)
    with pytest.raises(ValueError, match="txt and teacher_txt must have the same number of rows"):
        generalized_infonce_divergence(x, y, xt, yt[:-1])
    with pytest.raises(ValueError, match="feature dimension"):
        cka_divergence(x, y[:, :3], xt, yt)
    with pytest.raises(TypeError, match="img must be a torch.Tensor"):
        divergence("none", x.numpy(), y, xt, yt)
    with pytest.raises(ValueError, match="temperature"):
        generalized_infonce_divergence(x, y, xt, yt, temperature=0.0)
    with pytest.raises(ValueError, match="same number of rows"):
        siglip_loss(x, y, 1.0, 0.0)


# --------------------------------------------------------------------------- STRUCTURE


def structure_reference(raw, emb, levels, tau):
    def transition(Z):
        Z = Z / np.linalg.norm(Z, axis=1, keepdims=True)
        Z = Z - Z.mean(0)
        S = np.exp((Z @ Z.T) / tau)
        return S / S.sum(1, keepdims=True)

    P1, Q1 = transition(raw), transition(emb)
    total = 0.0
    for level in range(1, levels + 1):
        P, Q = np.linalg.matrix_power(P1, level), np.linalg.matrix_power(Q1, level)
        js = 0.0
        for p, q in zip(P, Q, strict=True):
            m = (p + q) / 2
            js += 0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m))
        total += js / len(P)
    return total / levels


def test_structure_matches_reference_and_vanishes_for_the_same_structure():
    g = torch.Generator().manual_seed(35)
    raw = torch.randn(8, 6, generator=g, dtype=torch.float64)
    emb = torch.randn(8, 4, generator=g, dtype=torch.float64)
    for levels in (1, 3):
        value = structure_regularizer(raw, emb, levels=levels, temperature=0.5).item()
        assert value == pytest.approx(structure_reference(raw.numpy(), emb.numpy(), levels, 0.5), rel=1e-9)
        assert value > 0
    assert structure_regularizer(raw, raw).item() == pytest.approx(0.0, abs=1e-12)
    assert structure_regularizer(raw, 3.0 * raw, levels=2).item() == pytest.approx(0.0, abs=1e-12)


def test_structure_gradcheck_and_raw_is_constant():
    raw = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    emb = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda e: structure_regularizer(raw, e, levels=2, temperature=0.5), (emb,)
    )
    structure_regularizer(raw, emb).backward()
    assert raw.grad is None and torch.isfinite(emb.grad).all()


# --------------------------------------------------------------------------- S-CLIP


def sinkhorn_numpy(K, eps, iters=2000):
    """Plain log-domain Sinkhorn with uniform marginals of mass one, run to convergence."""
    n, m = K.shape
    f, g = np.zeros(n), np.zeros(m)

    def lse(Z, axis):
        return Z.max(axis) + np.log(np.exp(Z - Z.max(axis, keepdims=True)).sum(axis))

    for _ in range(iters):
        f = -eps * math.log(n) - eps * lse((K + g[None, :]) / eps, 1)
        g = -eps * math.log(m) - eps * lse((K + f[:, None]) / eps, 0)
    return np.exp((f[:, None] + g[None, :] + K) / eps)


def test_s_clip_targets_are_the_row_normalised_ot_plan():
    u, p = features(6, 4, 5, seed=36, unit=True)
    targets = s_clip_targets(u, p, eps=0.1, n_iters=500, backend="reference")
    torch.testing.assert_close(targets.sum(1), torch.ones(6, dtype=torch.float64))
    plan = sinkhorn_numpy(cos_np(u.numpy(), p.numpy()), 0.1)
    np.testing.assert_allclose(targets.numpy(), plan / plan.sum(1, keepdims=True), atol=1e-8)
    hard = s_clip_targets(u, p, eps=0.1, hard=True)
    assert torch.equal(hard.argmax(1), targets.argmax(1)) and torch.equal(
        hard.sum(1), torch.ones(6, dtype=torch.float64)
    )


def test_s_clip_loss_is_cross_entropy_to_fixed_targets():
    u, p = features(6, 4, 5, seed=38, unit=True)
    u.requires_grad_()
    t = features(4, 4, 5, seed=40, unit=True)[0]
    loss = s_clip_loss(u, p, t, eps=0.1, scale=10.0, n_iters=500, backend="reference")
    loss.backward()
    T = torch.from_numpy(sinkhorn_numpy(cos_np(u.detach().numpy(), p.numpy()), 0.1))
    T = T / T.sum(1, keepdim=True)
    u2 = u.detach().clone().requires_grad_()
    logits = (10.0 * (u2 @ t.T)).tolist()
    expected = (
        sum(
            -sum(
                T[i, j].item() * (logits[i][j] - math.log(sum(math.exp(v) for v in logits[i])))
                for j in range(4)
            )
            for i in range(6)
        )
        / 6
    )
    assert loss.item() == pytest.approx(expected, rel=1e-7)
    (-(T * torch.log_softmax(10.0 * (u2 @ t.T), 1)).sum(1).mean()).backward()
    torch.testing.assert_close(u.grad, u2.grad, rtol=1e-6, atol=1e-8)  # targets carry no gradient
    # Pseudo-labels from a separate (unimodal) space.
    raw_u, raw_p = features(6, 4, 7, seed=41, unit=True)
    loss_raw = s_clip_loss(u.detach(), p, t, eps=0.1, unpaired_img_raw=raw_u, paired_img_raw=raw_p)
    assert torch.isfinite(loss_raw)
    with pytest.raises(ValueError, match="both"):
        s_clip_loss(u.detach(), p, t, unpaired_img_raw=raw_u)


# --------------------------------------------------------------------------- NNCLR


def test_nnclr_positives_match_brute_force_with_chunking():
    q, pool = features(23, 37, 6, seed=43, unit=True)
    q = 5.0 * q
    order = np.argsort(-cos_np(q.numpy(), pool.numpy()), axis=1, kind="stable")
    for k in (1, 4):
        for chunk in (5, 4096):
            idx = nnclr_positives(q, pool, k=k, chunk_size=chunk)
            assert idx.shape == (23, k) and idx.dtype == torch.long
            np.testing.assert_array_equal(idx.numpy(), order[:, :k])
    idx = nnclr_positives(q, pool, k=4)
    picked = sample_neighbors(idx, torch.Generator().manual_seed(0))
    assert picked.shape == (23,) and all(int(p) in row.tolist() for p, row in zip(picked, idx, strict=True))
    with pytest.raises(ValueError, match="exceeds the pool size"):
        nnclr_positives(q, pool[:3], k=4)
