"""Heads that start as the stage-1 teacher (the real-data SOTAlign method).

Oracles: the teacher's own affinity K* = cos(teacher_img(X), teacher_txt(Y)) and its retrieval
scores, computed through `Teacher.transform_*`, independently of the heads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_TRAINING, planted_pairs, toy_spec

from sotalign.align import AlignmentData, TrainConfig, fit
from sotalign.align.config import ConfigError
from sotalign.align.heads import AlignmentHeads
from sotalign.align.teachers import make_teacher
from sotalign.data import write_platonic


def _pairs(n=60, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    """12-d images and 9-d texts, off-centre, with a planted linear relation."""
    A, B = planted_pairs(n, d_x=12, d_y=9, noise=0.3, seed=seed, offset=1.0)
    return torch.from_numpy(A), torch.from_numpy(B)


@pytest.mark.parametrize("out_dim", [9, 32])
def test_heads_started_from_cca_reproduce_the_teacher_affinity(out_dim):
    A, B = _pairs()
    teacher = make_teacher("cca").fit(A, B)
    heads = AlignmentHeads(12, 9, out_dim).double()
    heads.init_from_teacher(teacher)
    X, Y = _pairs(20, seed=1)
    K = heads.embed_images(X) @ heads.embed_texts(Y).T
    Zx, Zy = teacher.transform_images(X).double(), teacher.transform_texts(Y).double()
    K_star = torch.nn.functional.normalize(Zx, dim=1) @ torch.nn.functional.normalize(Zy, dim=1).T
    torch.testing.assert_close(K, K_star, atol=1e-5, rtol=1e-5)


def test_fewer_head_dimensions_keep_the_leading_components():
    A, B = _pairs()
    teacher = make_teacher("cca").fit(A, B)
    heads = AlignmentHeads(12, 9, 3).double()
    heads.init_from_teacher(teacher)
    X = _pairs(5, seed=2)[0]
    expected = torch.nn.functional.normalize(teacher.transform_images(X).double()[:, :3], dim=1)
    torch.testing.assert_close(heads.embed_images(X), expected, atol=1e-5, rtol=1e-5)


def test_bad_teacher_init_requests_fail_clearly():
    A, B = _pairs()
    with pytest.raises(ValueError, match="linear heads"):
        AlignmentHeads(12, 9, 8, kind="mlp").init_from_teacher(make_teacher("cca").fit(A, B))
    with pytest.raises(ValueError, match="normalises its inputs"):
        AlignmentHeads(12, 9, 8).init_from_teacher(make_teacher("procrustes").fit(A, B))
    with pytest.raises(ConfigError, match="head_init must be one of auto, random, teacher"):
        TrainConfig(head_init="zeros")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    write_platonic(root, 1400, image_dim=32, text_dim=24, latent_dim=8, n_concepts=10, seed=3)
    return toy_spec(root, n_pairs=60, n_val=300, n_test=300, n_unpaired=500)


def test_teacher_started_run_is_never_worse_than_its_teacher_on_validation(toy, tmp_path):
    data = AlignmentData.from_spec(toy)
    settings = dict(
        TINY_TRAINING,
        steps=20,
        out_dim=64,
        paired_batch_size=60,
        unpaired_batch_size=128,
        checkpoint_every=20,
    )
    fit(TrainConfig(method="cca+none", **settings), data, tmp_path / "teacher", progress=False)
    teacher_val = json.loads((tmp_path / "teacher" / "metrics.json").read_text())["val"]["mean_R@1"]
    # A learning rate so large that training only hurts: the selection must fall back to step 0.
    config = TrainConfig(**dict(settings, method="sotalign", head_init="teacher", lr=0.5, alpha=1.0))
    fit(config, data, tmp_path / "run", progress=False)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val"]["mean_R@1"] >= teacher_val - 1e-9
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    if max(r["val"]["mean_R@1"] for r in log if "val" in r) < teacher_val:
        assert metrics["best_step"] == 0
    assert np.isclose(
        metrics["val"]["mean_R@1"], max([teacher_val] + [r["val"]["mean_R@1"] for r in log if "val" in r])
    )


def test_head_init_teacher_needs_a_teacher(toy, tmp_path):
    data = AlignmentData.from_spec(toy)
    with pytest.raises(ConfigError, match="needs a method with a stage-1 teacher"):
        fit(
            TrainConfig(method="sail", head_init="teacher", steps=2, out_dim=8, device="cpu"),
            data,
            tmp_path / "run",
            progress=False,
        )
