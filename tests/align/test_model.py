"""`sotalign.load`: round trips of trained runs, the maths of the embeddings, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAINING, toy_spec
from safetensors.torch import load_file

import sotalign
from sotalign.align import AlignmentData, TrainConfig, fit
from sotalign.data import load_platonic_encoder, write_platonic
from sotalign.rundir import RunDirError

SMALL = dict(
    TINY_TRAINING,
    out_dim=12,
    paired_batch_size=48,
    unpaired_batch_size=64,
    n_iters=10,
    steps=8,
    eval_every=4,
    checkpoint_every=4,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    write_platonic(root / "data", 600, image_dim=20, text_dim=16, latent_dim=6, n_concepts=5, seed=1)
    data = AlignmentData.from_spec(toy_spec(root / "data", n_pairs=48, n_val=100))
    models = {
        m: fit(TrainConfig(method=m, **SMALL), data, root / m, progress=False) for m in ("sail", "cca+none")
    }
    return root, data, models


def test_load_reproduces_the_trained_embeddings(runs):
    root, data, models = runs
    x, y = data.val_images.all(), data.val_texts.all()
    loaded = sotalign.load(root / "sail")
    assert loaded.method == "sail"
    assert torch.equal(loaded.embed_images(x), models["sail"].embed_images(x))
    assert torch.equal(loaded.embed_texts(y), models["sail"].embed_texts(y))
    # Oracle: f̂(x) = (x Wᵀ + b) / ‖x Wᵀ + b‖ from the stored tensors.
    tensors = load_file(root / "sail" / "heads.safetensors")
    expected = F.normalize(x @ tensors["image.weight"].T + tensors["image.bias"], dim=1)
    torch.testing.assert_close(loaded.embed_images(x), expected, rtol=1e-5, atol=1e-6)
    similarity = loaded.similarity(x[:7], y[:9])
    assert similarity.shape == (7, 9)
    torch.testing.assert_close(similarity, expected[:7] @ loaded.embed_texts(y[:9]).T)
    assert loaded.embed_images(x.numpy()).norm(dim=1).sub(1).abs().max() < 1e-5


def test_teacher_only_model_is_the_normalised_teacher_map(runs):
    root, data, _ = runs
    model = sotalign.load(root / "cca+none")
    assert model.heads is None
    tensors = load_file(root / "cca+none" / "teacher" / "teacher.safetensors")
    y = data.val_texts.all().double()
    expected = F.normalize((y - tensors["text_mean"]) @ tensors["text_map"].T, dim=1).float()
    torch.testing.assert_close(model.embed_texts(y.float()), expected, rtol=1e-4, atol=1e-5)


def test_zero_shot_classifier_matches_mean_of_embedded_prompts(runs):
    root, _, _ = runs
    model = sotalign.load(root / "sail")
    names = json.loads((root / "data" / "classes.json").read_text())["concept_names"]
    templates = ["a photo of a {}.", "an image of a {}."]
    weights = model.zero_shot_classifier(names, templates, f"platonic:{root / 'data'}")
    assert weights.shape == (len(names), 12)
    encoder = load_platonic_encoder(root / "data")
    prompts = np.asarray(encoder([t.format(n) for n in names for t in templates]), dtype=np.float32)
    per_prompt = model.embed_texts(prompts).reshape(len(names), len(templates), -1)
    torch.testing.assert_close(weights, F.normalize(per_prompt.mean(1), dim=1), rtol=1e-5, atol=1e-6)


def test_missing_and_corrupt_run_directories_name_the_file(runs, tmp_path):
    root, _, _ = runs
    with pytest.raises(RunDirError, match="no such run directory"):
        sotalign.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match=r"empty/config\.json: no such file"):
        sotalign.load(tmp_path / "empty")

    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "heads.json", "metrics.json"):
        (broken / name).write_text((root / "sail" / name).read_text())
    (broken / "heads.safetensors").write_bytes(b"\x00not safetensors at all")
    with pytest.raises(RunDirError, match=r"broken/heads\.safetensors: not a valid safetensors file"):
        sotalign.load(broken)

    (broken / "heads.safetensors").write_bytes((root / "sail" / "heads.safetensors").read_bytes())
    meta = json.loads((broken / "heads.json").read_text())
    (broken / "heads.json").write_text(json.dumps({**meta, "out_dim": 5}))
    with pytest.raises(RunDirError, match=r"heads\.safetensors: does not match .*heads\.json"):
        sotalign.load(broken)
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(RunDirError, match=r"broken/config\.json: not valid JSON"):
        sotalign.load(broken)
