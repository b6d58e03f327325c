"""Methods: the registry, and every method's loss terms against independent formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import features

from sotalign.align import METHODS, AlignmentHeads, Batch, get_method, loss_terms
from sotalign.align.config import ConfigError, TrainConfig

IMAGE_DIM, TEXT_DIM, TEACHER_DIM, OUT_DIM = 12, 10, 6, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")


#: Rows and dimension of each part of the test batch: 7 pairs, 9 unpaired images and 11
#: unpaired texts, with their teacher features and NNCLR positives.
BATCH_SHAPES = dict(
    paired_images=(7, IMAGE_DIM),
    paired_texts=(7, TEXT_DIM),
    unpaired_images=(9, IMAGE_DIM),
    unpaired_texts=(11, TEXT_DIM),
    teacher_images=(9, TEACHER_DIM),
    teacher_texts=(11, TEACHER_DIM),
    neighbour_texts=(9, TEXT_DIM),
    neighbour_images=(11, IMAGE_DIM),
)


def make_batch(requires_grad: bool = False) -> Batch:
    """Raw features of every part of a batch (``BATCH_SHAPES``), each from its own seed."""
    parts = {}
    for seed, (name, (n, d)) in enumerate(BATCH_SHAPES.items()):
        parts[name] = features(n, 1, d, seed=seed)[0].requires_grad_(requires_grad)
    return Batch(**parts)


def heads_for_test() -> AlignmentHeads:
    torch.manual_seed(0)
    return AlignmentHeads(IMAGE_DIM, TEXT_DIM, OUT_DIM).double()


def siglip_oracle(img, txt, scale, bias):
    """−(1/n) Σ_ij log σ(z_ij (t K_ij + b)), z = +1 on the diagonal, written out loop by loop."""
    img, txt = img.detach().numpy(), txt.detach().numpy()
    total = 0.0
    for i in range(len(img)):
        for j in range(len(txt)):
            z = 1.0 if i == j else -1.0
            total -= math.log(1.0 / (1.0 + math.exp(-z * (scale * img[i] @ txt[j] + bias))))
    return total / len(img)


def test_registry_has_every_method_and_the_table1_grid():
    expected = {"sotalign", "sail", "sail-semi", "structure", "nnclr", "s-clip"}
    expected |= {
        f"{t}+{d}" for t in ("procrustes", "cca", "contrastive") for d in ("none", "cka", "infonce", "klot")
    }
    assert set(METHODS) == expected
    assert get_method("sotalign").teacher == "cca" and get_method("sotalign").divergence == "klot"
    assert not get_method("contrastive+none").trains_heads and get_method("cca+klot").trains_heads
    assert get_method("sail").needs == frozenset() and "unpaired" in get_method("sail-semi").needs


def test_unknown_method_and_option_errors_name_them():
    with pytest.raises(KeyError, match="unknown method 'sotalgn'.*sail-semi"):
        get_method("sotalgn")
    with pytest.raises(TypeError, match="no option.*'bogus'|bogus"):
        get_method("structure", bogus=1)
    assert get_method("structure", weight=3.0).weight == 3.0
    with pytest.raises(ConfigError, match="unknown method"):
        TrainConfig(method="nope")


@pytest.mark.parametrize("name", [n for n, r in METHODS.items() if r.trains_heads])
def test_every_method_gives_finite_terms_and_gradients_only_where_expected(name):
    method = get_method(name)
    batch = make_batch(requires_grad=True)
    heads, losses = heads_for_test(), method.loss_modules().double()
    terms = loss_terms(
        method, batch, heads, losses, eps=0.1, eps_teacher=0.05, n_iters=50, backend="reference"
    )
    assert set(terms) == set(method.weights(1e-4))
    total = sum(method.weights(1e-4)[k] * v for k, v in terms.items())
    assert all(torch.isfinite(v) for v in terms.values())
    total.backward()
    for module in (heads.image, heads.text):
        assert torch.isfinite(module.weight.grad).all() and module.weight.grad.abs().sum() > 0
    # The teacher is a constant: nothing flows back to its features.
    for t in (batch.teacher_images, batch.teacher_texts):
        assert t.grad is None or t.grad.abs().sum() == 0
    # Unpaired rows influence the loss only for methods that use them.
    touched = batch.unpaired_images.grad is not None and batch.unpaired_images.grad.abs().sum() > 0
    assert touched == ("unpaired" in method.needs)


def test_sail_terms_match_the_siglip_formula():
    batch, heads = make_batch(), heads_for_test()
    method = get_method("sail")
    losses = method.loss_modules().double()
    value = loss_terms(method, batch, heads, losses)["siglip"].detach()
    img, txt = heads.embed_images(batch.paired_images), heads.embed_texts(batch.paired_texts)
    # the learned scale and bias start at 20 and −10 (stored as log-scale, float32 rounding)
    scale, bias = float(losses["siglip"].scale.detach()), float(losses["siglip"].bias.detach())
    assert scale == pytest.approx(20.0, rel=1e-6) and bias == -10.0
    assert float(value) == pytest.approx(siglip_oracle(img, txt, scale, bias), rel=1e-10)

    # semi-supervised SAIL: every unpaired row is an extra negative for every paired row
    semi = get_method("sail-semi")
    value = loss_terms(semi, batch, heads, semi.loss_modules().double())["siglip"].detach()
    u_img, u_txt = heads.embed_images(batch.unpaired_images), heads.embed_texts(batch.unpaired_texts)
    extra = -(
        F.logsigmoid(-(scale * img @ u_txt.T + bias)).sum()
        + F.logsigmoid(-(scale * u_img @ txt.T + bias)).sum()
    )
    expected = siglip_oracle(img, txt, scale, bias) + float(extra.detach()) / len(img)
    assert float(value) == pytest.approx(expected, rel=1e-10)


def log_sinkhorn_plan(K: np.ndarray, eps: float, iters: int = 5000) -> np.ndarray:
    """Entropic OT plan with uniform marginals (mass 1), cost −K, plain log-domain Sinkhorn."""
    n, m = K.shape
    f, g = np.zeros(n), np.zeros(m)

    def lse(a, axis):
        top = a.max(axis=axis, keepdims=True)
        return (top + np.log(np.exp(a - top).sum(axis=axis, keepdims=True))).squeeze(axis)

    for _ in range(iters):
        f = -eps * math.log(n) - eps * lse((K + g[None]) / eps, 1)
        g = -eps * math.log(m) - eps * lse((K + f[:, None]) / eps, 0)
    return np.exp((f[:, None] + g[None] + K) / eps)


def test_sotalign_klot_term_is_kl_of_the_teacher_plan_to_the_student_plan():
    batch, heads = make_batch(), heads_for_test()
    method = get_method("sotalign")
    terms = loss_terms(
        method,
        batch,
        heads,
        method.loss_modules().double(),
        eps=0.1,
        eps_teacher=0.05,
        n_iters=3000,
        backend="reference",
    )

    def cosine(a, b):
        a, b = F.normalize(a.detach(), dim=1), F.normalize(b.detach(), dim=1)
        return (a @ b.T).numpy()

    student = log_sinkhorn_plan(
        cosine(heads.embed_images(batch.unpaired_images), heads.embed_texts(batch.unpaired_texts)), 0.1
    )
    teacher = log_sinkhorn_plan(cosine(batch.teacher_images, batch.teacher_texts), 0.05)
    expected = float((teacher * (np.log(teacher) - np.log(student))).sum())
    assert float(terms["klot"].detach()) == pytest.approx(expected, rel=1e-6)
    assert method.weights(1e-3) == {"siglip": 1.0, "klot": 1e-3}


def test_teacher_only_method_refuses_to_train():
    with pytest.raises(ValueError, match="trains no heads"):
        method = get_method("cca+none")
        loss_terms(method, make_batch(), heads_for_test(), method.loss_modules().double())
