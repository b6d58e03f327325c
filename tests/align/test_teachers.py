"""Stage-1 teachers against independent oracles: QR-based CCA (Björck–Golub), a generalised
eigenproblem, scipy's orthogonal Procrustes, numpy covariances, planted maps."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import planted_pairs

from sotalign.align.teachers import (
    TEACHER_NAMES,
    CCATeacher,
    ContrastiveTeacher,
    CovarianceAccumulator,
    ProcrustesTeacher,
    Teacher,
    make_teacher,
)


def centred(X):
    return X - X.mean(0)


def cosine_top1(za: torch.Tensor, zb: torch.Tensor) -> float:
    za = torch.nn.functional.normalize(za, dim=1)
    zb = torch.nn.functional.normalize(zb, dim=1)
    return float(((za @ zb.T).argmax(1) == torch.arange(za.shape[0])).double().mean())


# --------------------------------------------------------------------------- CCA


def test_cca_correlations_match_qr_svd_without_regulariser():
    A, B = planted_pairs(noise=0.5)
    teacher = CCATeacher(reg=0.0).fit(A, B)
    # Björck–Golub: canonical correlations are the singular values of Q_aᵀ Q_b.
    Qa, _ = np.linalg.qr(centred(A))
    Qb, _ = np.linalg.qr(centred(B))
    expected = np.linalg.svd(Qa.T @ Qb, compute_uv=False)[: teacher.out_dim]
    rho = teacher.correlations.numpy()
    np.testing.assert_allclose(rho, expected, rtol=1e-9, atol=1e-10)
    assert np.all(np.diff(rho) <= 1e-12), "correlations must be non-increasing"


def test_cca_regularised_correlations_match_generalised_eigenproblem():
    A, B = planted_pairs(noise=1.0, seed=3)
    lam = 0.1
    teacher = CCATeacher(reg=lam).fit(A, B)
    n = A.shape[0]
    Ac, Bc = centred(A), centred(B)
    Cxx, Cyy, Cxy = Ac.T @ Ac / n, Bc.T @ Bc / n, Ac.T @ Bc / n
    # ρ² are the eigenvalues of (Cxx+λI)^{-1} Cxy (Cyy+λI)^{-1} Cyx.
    Mx = np.linalg.solve(Cxx + lam * np.eye(A.shape[1]), Cxy)
    My = np.linalg.solve(Cyy + lam * np.eye(B.shape[1]), Cxy.T)
    eig = np.sort(np.linalg.eigvals(Mx @ My).real)[::-1][: teacher.out_dim]
    np.testing.assert_allclose(teacher.correlations.numpy() ** 2, eig, rtol=1e-8, atol=1e-10)


def test_cca_features_whitened_up_to_the_regulariser():
    A, B = planted_pairs(n=500, d_x=6, d_y=9, noise=0.3, seed=1)
    n = A.shape[0]
    for lam in (0.0, 0.1):
        teacher = CCATeacher(reg=lam).fit(A, B)
        assert teacher.out_dim == 6
        Zx = teacher.transform_images(torch.from_numpy(A)).double().numpy()
        Zy = teacher.transform_texts(torch.from_numpy(B)).double().numpy()
        rho = teacher.correlations.numpy()
        # Cross-covariance of the teacher features is diag(ρ) exactly.
        np.testing.assert_allclose(Zx.T @ Zy / n, np.diag(rho), atol=2e-5)
        # Own covariance: eigenvalues c/(c+λ) over the eigenvalues c of C_xx (I when λ = 0).
        c = np.linalg.eigvalsh(centred(A).T @ centred(A) / n)
        np.testing.assert_allclose(
            np.sort(np.linalg.eigvalsh(Zx.T @ Zx / n)), np.sort(c / (c + lam)), rtol=1e-4, atol=1e-5
        )
        if lam == 0.0:
            np.testing.assert_allclose(Zx.T @ Zx / n, np.eye(6), atol=1e-4)


def test_cca_recovers_planted_map_on_held_out_pairs():
    A, B = planted_pairs(n=600, noise=0.05, seed=2)
    teacher = CCATeacher().fit(A[:400], B[:400])
    za = teacher.transform_images(A[400:])
    zb = teacher.transform_texts(B[400:])
    assert za.dtype == torch.float32 and za.shape == (200, teacher.out_dim)
    assert cosine_top1(za, zb) > 0.95


def test_cca_default_out_dim_and_explicit_out_dim():
    A, B = planted_pairs(n=5, d_x=10, d_y=7)
    assert CCATeacher().fit(A, B).out_dim == 5  # min(d_x, d_y, n_p)
    assert CCATeacher(out_dim=3).fit(A, B).out_dim == 3
    with pytest.raises(ValueError, match="out_dim"):
        CCATeacher(out_dim=8).fit(A, B)
    with pytest.raises(ValueError, match="singular"):
        CCATeacher(reg=0.0).fit(A, B)


# --------------------------------------------------------------------------- streaming


def test_fit_stream_equals_fit_and_numpy_covariance():
    A, B = planted_pairs(n=333, seed=4, offset=1e4)  # large means: the merge must stay stable
    for cls in (CCATeacher, ProcrustesTeacher):
        whole = cls().fit(A, B)
        cuts = [0, 1, 50, 51, 200, 333]
        streamed = cls().fit_stream(
            (A[a:b], torch.from_numpy(B[a:b])) for a, b in zip(cuts[:-1], cuts[1:], strict=True)
        )
        for name in ("image_mean", "text_mean", "image_map", "text_map"):
            np.testing.assert_allclose(
                getattr(streamed, name).numpy(),
                getattr(whole, name).numpy(),
                rtol=1e-7,
                atol=1e-9,
                err_msg=f"{cls.__name__}.{name}",
            )
    acc = CovarianceAccumulator()
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        acc.update(torch.from_numpy(A[a:b]), torch.from_numpy(B[a:b]))
    np.testing.assert_allclose(
        acc.covariance("xy").numpy(), np.cov(A.T, B.T, bias=True)[:10, 10:], rtol=1e-9, atol=1e-6
    )
    np.testing.assert_allclose(acc.covariance("xx").numpy(), np.cov(A.T, bias=True), rtol=1e-9, atol=1e-6)


def test_fit_stream_rejects_bad_batches():
    A, B = planted_pairs(n=20)
    with pytest.raises(ValueError, match="no pairs"):
        CCATeacher().fit_stream([])
    with pytest.raises(TypeError, match="batch 0"):
        CCATeacher().fit_stream([A])
    with pytest.raises(ValueError, match="differ"):
        CCATeacher().fit_stream([(A, B), (A[:, :3], B)])


# --------------------------------------------------------------------------- Procrustes


def test_procrustes_recovers_planted_rotation_like_scipy():
    rng = np.random.default_rng(5)
    R, _ = np.linalg.qr(rng.standard_normal((6, 6)))
    A = rng.standard_normal((300, 6)) + 0.5
    B = A @ R + 1e-3 * rng.standard_normal((300, 6))
    teacher = ProcrustesTeacher().fit(A, B)
    W = teacher.image_map.numpy()
    np.testing.assert_allclose(W @ W.T, np.eye(6), atol=1e-12)
    np.testing.assert_allclose(teacher.text_map.numpy() @ teacher.text_map.numpy().T, np.eye(6), atol=1e-12)
    # scipy on the same preprocessing (rows normalised, then centred).
    An = centred(A / np.linalg.norm(A, axis=1, keepdims=True))
    Bn = centred(B / np.linalg.norm(B, axis=1, keepdims=True))
    R_scipy, _ = scipy.linalg.orthogonal_procrustes(An, Bn)
    np.testing.assert_allclose(teacher.image_to_text().numpy(), R_scipy, atol=1e-10)
    np.testing.assert_allclose(teacher.image_to_text().numpy(), R, atol=1e-2)
    assert cosine_top1(teacher.transform_images(A), teacher.transform_texts(B)) == 1.0


def test_procrustes_rectangular_is_semi_orthogonal_and_optimal():
    A, B = planted_pairs(n=200, d_x=9, d_y=5, noise=0.5, seed=6)
    teacher = ProcrustesTeacher(out_dim=4).fit(A, B)
    Wx, Wy = teacher.image_map.numpy(), teacher.text_map.numpy()
    assert Wx.shape == (4, 9) and Wy.shape == (4, 5)
    np.testing.assert_allclose(Wx @ Wx.T, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(Wy @ Wy.T, np.eye(4), atol=1e-12)
    An = centred(A / np.linalg.norm(A, axis=1, keepdims=True))
    Bn = centred(B / np.linalg.norm(B, axis=1, keepdims=True))
    value = np.sum((An @ Wx.T) * (Bn @ Wy.T))
    # Optimum of max ⟨A Pᵀ, B Qᵀ⟩ over semi-orthogonal P, Q: the top-4 singular values of AᵀB.
    np.testing.assert_allclose(value, np.linalg.svd(An.T @ Bn, compute_uv=False)[:4].sum(), rtol=1e-10)
    rng = np.random.default_rng(0)
    for _ in range(5):
        P = np.linalg.qr(rng.standard_normal((9, 4)))[0].T
        Q = np.linalg.qr(rng.standard_normal((5, 4)))[0].T
        assert np.sum((An @ P.T) * (Bn @ Q.T)) <= value + 1e-12


# --------------------------------------------------------------------------- contrastive


def test_contrastive_teacher_learns_and_is_deterministic(one_torch_thread):
    A, B = planted_pairs(n=160, d_x=8, d_y=6, noise=0.05, seed=7)
    A, B = torch.from_numpy(A).float(), torch.from_numpy(B).float()
    siglip = ContrastiveTeacher(out_dim=6, steps=300, lr=5e-2).fit(A, B)
    assert siglip.loss_history[-1] < 0.1 * siglip.loss_history[0]
    assert cosine_top1(siglip.transform_images(A), siglip.transform_texts(B)) > 0.9
    options = dict(out_dim=6, steps=100, lr=5e-2, loss="infonce")
    first = ContrastiveTeacher(**options).fit(A, B)
    again = ContrastiveTeacher(**options).fit(A, B)
    other = ContrastiveTeacher(**options, seed=1).fit(A, B)
    assert torch.equal(first.image_map, again.image_map) and torch.equal(first.text_map, again.text_map)
    assert not torch.equal(first.image_map, other.image_map)
    assert cosine_top1(first.transform_images(A), first.transform_texts(B)) > 0.9


@pytest.mark.parametrize("options", [dict(optimizer="lion", lr=1e-3), dict(loss="infonce", batch_size=32)])
def test_contrastive_variants_reduce_loss(options, one_torch_thread):
    A, B = planted_pairs(n=96, d_x=8, d_y=6, seed=8)
    teacher = ContrastiveTeacher(out_dim=6, steps=60, **options).fit(A, B)
    history = teacher.loss_history
    assert len(history) == 60 and all(np.isfinite(history))
    assert np.mean(history[-10:]) < np.mean(history[:10])


# --------------------------------------------------------------------------- persistence


def fitted_teachers():
    A, B = planted_pairs(n=64, d_x=8, d_y=6, seed=9)
    return (
        A,
        B,
        [
            CCATeacher(out_dim=5).fit(A, B),
            ProcrustesTeacher().fit(A, B),
            ContrastiveTeacher(out_dim=4, steps=5).fit(A, B),
        ],
    )


def test_save_load_round_trip(tmp_path):
    A, B, teachers = fitted_teachers()
    for teacher in teachers:
        directory = tmp_path / teacher.name
        teacher.save(directory)
        assert sorted(p.name for p in directory.iterdir()) == ["teacher.json", "teacher.safetensors"]
        loaded = Teacher.load(directory)
        assert type(loaded) is type(teacher) and loaded.options() == teacher.options()
        assert (loaded.image_dim, loaded.text_dim, loaded.out_dim) == (8, 6, teacher.out_dim)
        assert torch.equal(loaded.transform_images(A), teacher.transform_images(A))
        assert torch.equal(loaded.transform_texts(B), teacher.transform_texts(B))
    assert torch.equal(Teacher.load(tmp_path / "cca").correlations, teachers[0].correlations)


def _corrupt(directory, file, mutate):
    path = directory / file
    path.write_bytes(mutate(path.read_bytes()))


def test_load_errors_name_the_file(tmp_path):
    _, _, teachers = fitted_teachers()
    cases = {
        "not json": ("teacher.json", lambda b: b[:10], "teacher.json"),
        "truncated tensors": ("teacher.safetensors", lambda b: b[:-7], "teacher.safetensors"),
        "flipped byte": (
            "teacher.safetensors",
            lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:],
            "teacher.safetensors",
        ),
    }
    for label, (file, mutate, named) in cases.items():
        directory = tmp_path / label
        teachers[0].save(directory)
        _corrupt(directory, file, mutate)
        with pytest.raises(ValueError, match=named):
            Teacher.load(directory)

    def edit_json(directory, **changes):
        meta = json.loads((directory / "teacher.json").read_text())
        meta.update(changes)
        (directory / "teacher.json").write_text(json.dumps(meta))

    for label, changes, message in [
        ("version", {"format_version": 99}, "format version"),
        ("name", {"name": "pca"}, "unknown teacher name"),
        ("dims", {"image_dim": 3}, "shape"),
        ("options", {"options": {"reg": -1.0}}, "invalid options"),
    ]:
        directory = tmp_path / label
        teachers[0].save(directory)
        edit_json(directory, **changes)
        with pytest.raises(ValueError, match=message) as error:
            Teacher.load(directory)
        assert "teacher." in str(error.value)

    # A valid checksum over bytes that are not safetensors.
    directory = tmp_path / "garbage"
    teachers[0].save(directory)
    (directory / "teacher.safetensors").write_bytes(b"\x00" * 64)
    edit_json(directory, sha256=hashlib.sha256(b"\x00" * 64).hexdigest())
    with pytest.raises(ValueError, match="teacher.safetensors.*not a valid safetensors"):
        Teacher.load(directory)

    with pytest.raises(FileNotFoundError, match="teacher.json"):
        Teacher.load(tmp_path / "missing")
    directory = tmp_path / "no-tensors"
    teachers[0].save(directory)
    (directory / "teacher.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="teacher.safetensors"):
        Teacher.load(directory)


# --------------------------------------------------------------------------- input checks


def test_bad_input_is_rejected_clearly():
    A, B = planted_pairs(n=20)
    bad = A.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="images contains NaN"):
        CCATeacher().fit(bad, B)
    with pytest.raises(ValueError, match="same number of rows"):
        ProcrustesTeacher().fit(A, B[:-1])
    with pytest.raises(TypeError, match="images must be"):
        CCATeacher().fit(A.tolist(), B)
    with pytest.raises(ValueError, match="2-D"):
        CCATeacher().fit(A[0], B)
    with pytest.raises(RuntimeError, match="not fitted"):
        CCATeacher().transform_images(A)
    teacher = CCATeacher().fit(A, B)
    with pytest.raises(ValueError, match="10 features"):
        teacher.transform_images(B)
    with pytest.raises(ValueError, match="unknown teacher"):
        make_teacher("pca")
    with pytest.raises(ValueError, match="reg"):
        CCATeacher(reg=-0.1)
    with pytest.raises(TypeError, match="reg"):
        CCATeacher(reg="0.1")
    with pytest.raises(ValueError, match="unknown loss"):
        ContrastiveTeacher(loss="hinge")
    assert TEACHER_NAMES == ("cca", "procrustes", "contrastive")
    assert isinstance(make_teacher("procrustes", out_dim=3), ProcrustesTeacher)
