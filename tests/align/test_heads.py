"""Alignment heads: structure, unit-norm embeddings, config round trip, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sotalign.align.heads import AlignmentHeads, make_head


def test_linear_head_is_one_affine_layer():
    head = make_head(7, 5)
    assert isinstance(head, nn.Linear) and head.weight.shape == (5, 7) and head.bias is not None
    assert make_head(3).out_features == 1024  # the paper's d


def test_mlp_head_computes_linear_gelu_linear():
    head = make_head(6, 4, kind="mlp")
    first, act, second = head
    assert first.weight.shape == (6, 6) and second.weight.shape == (4, 6)  # hidden = max(6, 4)
    assert make_head(3, 8, kind="mlp", hidden_dim=5)[0].out_features == 5
    x = torch.randn(9, 6)
    h = x @ first.weight.T + first.bias
    gelu = 0.5 * h * (1 + torch.erf(h / 2**0.5))  # exact GELU, written out
    torch.testing.assert_close(head(x), gelu @ second.weight.T + second.bias)


def test_make_head_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown head kind"):
        make_head(4, 4, kind="transformer")
    with pytest.raises(ValueError, match="in_dim"):
        make_head(0, 4)
    with pytest.raises(TypeError, match="out_dim"):
        make_head(4, 2.5)
    with pytest.raises(ValueError, match="hidden_dim"):
        make_head(4, 4, kind="linear", hidden_dim=8)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_alignment_heads_embed_unit_vectors_and_rebuild_from_config(kind):
    torch.manual_seed(0)
    heads = AlignmentHeads(image_dim=10, text_dim=6, out_dim=8, kind=kind)
    x, y = torch.randn(5, 10), torch.randn(7, 6)
    ex, ey = heads.embed_images(x), heads.embed_texts(y)
    assert ex.shape == (5, 8) and ey.shape == (7, 8)
    torch.testing.assert_close(ex.norm(dim=1), torch.ones(5))
    raw = heads.image(x)
    torch.testing.assert_close(ex, raw / raw.norm(dim=1, keepdim=True))
    config = heads.config()
    assert config == {"image_dim": 10, "text_dim": 6, "out_dim": 8, "kind": kind, "hidden_dim": None}
    rebuilt = AlignmentHeads(**config)
    rebuilt.load_state_dict(heads.state_dict())
    torch.testing.assert_close(rebuilt.embed_texts(y), ey)
    (ex.sum() + ey.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in heads.parameters())


def test_alignment_heads_reject_wrong_shapes():
    heads = AlignmentHeads(4, 3, out_dim=2)
    with pytest.raises(ValueError, match=r"images must have shape \(n, 4\)"):
        heads.embed_images(torch.randn(2, 3))
    with pytest.raises(ValueError, match="texts"):
        heads.embed_texts(torch.randn(3))
    with pytest.raises(TypeError, match="texts must be a torch.Tensor"):
        heads.embed_texts([[1.0, 2.0, 3.0]])
