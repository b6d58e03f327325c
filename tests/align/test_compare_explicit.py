"""`sotalign compare` on explicit stores: pairs redrawn per seed from a pool, or fixed by
--split-seed; disjoint unpaired pools; and `sotalign embed` on a CSV of images and captions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sotalign.align import AlignmentData, DataSpec
from sotalign.cli import app
from sotalign.data import write_platonic

runner = CliRunner()


@pytest.fixture(scope="module")
def pools(tmp_path_factory):
    root = tmp_path_factory.mktemp("pools")
    toy = write_platonic(root / "all", 900, image_dim=16, text_dim=12, latent_dim=4, n_concepts=6, seed=5)
    parts = {
        "paired": slice(0, 300),
        "unpaired": slice(300, 700),
        "val": slice(700, 800),
        "test": slice(800, 900),
    }
    for role, rows in parts.items():
        np.save(root / f"{role}_images.npy", toy.images[rows])
        np.save(root / f"{role}_texts.npy", toy.texts[rows])
    return root


def _explicit(root, **extra):
    return {
        f"{r}_{m}": str(root / f"{r}_{m}.npy")
        for r in ("paired", "unpaired", "val", "test")
        for m in ("images", "texts")
    } | extra


def test_a_pool_of_explicit_pairs_is_subsampled_by_the_split_seed(pools):
    a = AlignmentData.from_spec(DataSpec(**_explicit(pools), n_pairs=40, split_seed=0))
    b = AlignmentData.from_spec(DataSpec(**_explicit(pools), n_pairs=40, split_seed=1))
    again = AlignmentData.from_spec(DataSpec(**_explicit(pools), n_pairs=40, split_seed=0))
    assert len(a.paired_images) == 40 and len(set(a.paired_images.indices)) == 40
    np.testing.assert_array_equal(a.paired_images.indices, a.paired_texts.indices)  # still pairs
    np.testing.assert_array_equal(a.paired_images.indices, again.paired_images.indices)
    assert set(a.paired_images.indices) != set(b.paired_images.indices)
    assert len(a.unpaired_images) == 400  # the other roles are untouched
    with pytest.raises(ValueError, match="--pairs 400 requested from a pool of 300"):
        AlignmentData.from_spec(DataSpec(**_explicit(pools), n_pairs=400))


def test_disjoint_unpaired_halves(pools):
    spec = DataSpec(
        images=str(pools / "all" / "images.npy"),
        texts=str(pools / "all" / "texts.npy"),
        n_pairs=50,
        n_val=100,
        disjoint_unpaired=True,
    )
    data = AlignmentData.from_spec(spec)
    assert not set(data.unpaired_images.indices) & set(data.unpaired_texts.indices)
    assert abs(len(data.unpaired_images) - len(data.unpaired_texts)) <= 1


def test_compare_cli_with_explicit_stores(pools, tmp_path):
    args = [
        "compare",
        str(tmp_path / "cmp"),
        "--methods",
        "cca+none,sail",
        "--seeds",
        "0,1",
        "--pairs",
        "30",
        "--steps",
        "4",
        "--out-dim",
        "8",
        "--batch-unpaired",
        "32",
        "--eval-every",
        "2",
        "--checkpoint-every",
        "4",
        "--head",
        "linear",
        "--weight-decay",
        "0.001",
        "--device",
        "cpu",
        "--quiet",
    ]
    for role in ("paired", "unpaired", "val", "test"):
        for m in ("images", "texts"):
            args += [f"--{role}-{m}", str(pools / f"{role}_{m}.npy")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert out["config"]["weight_decay"] == 0.001 and out["config"]["data"]["n_pairs"] == 30
    teacher0 = json.loads((tmp_path / "cmp" / "cca+none" / "seed0" / "config.json").read_text())
    teacher1 = json.loads((tmp_path / "cmp" / "cca+none" / "seed1" / "config.json").read_text())
    assert teacher0["data"]["split_seed"] == 0 and teacher1["data"]["split_seed"] == 1  # pairs redrawn

    fixed = runner.invoke(app, ["compare", str(tmp_path / "fixed")] + args[2:] + ["--split-seed", "7"])
    assert fixed.exit_code == 0, fixed.output
    for seed in (0, 1):
        config = json.loads((tmp_path / "fixed" / "sail" / f"seed{seed}" / "config.json").read_text())
        assert config["data"]["split_seed"] == 7 and config["seed"] == seed

    bad = runner.invoke(
        app, ["compare", str(tmp_path / "bad"), "--paired-images", str(pools / "paired_images.npy")]
    )
    assert bad.exit_code == 1 and "paired_texts" in bad.output


def test_embed_cli_on_a_csv(tmp_path, monkeypatch):
    Image = pytest.importorskip("PIL.Image")
    import sotalign.data.encoders as encoders

    for k in range(3):
        Image.fromarray(np.full((10, 10, 3), 40 * k, np.uint8)).save(tmp_path / f"{k}.png")
    (tmp_path / "pairs.csv").write_text("image,caption\n0.png,black\n1.png,dark grey\n2.png,grey\n")

    class Mean(encoders.ImageEncoder):  # stand-ins: no weights needed to test the command
        name, dim, config = "mean", 1, {"encoder": "mean"}
        device = None

        def preprocess(self, image):
            return np.asarray(image, np.float32).transpose(2, 0, 1).copy()

        def forward(self, batch):
            return batch.reshape(len(batch), -1).mean(1, keepdim=True).numpy()

    class Words(encoders.TextEncoder):
        name, dim, config = "words", 1, {"encoder": "words"}

        def encode(self, texts):
            return np.array([[len(t.split())] for t in texts], np.float32)

    monkeypatch.setattr(encoders, "load_image_encoder", lambda spec, device=None, **o: Mean())
    monkeypatch.setattr(encoders, "load_text_encoder", lambda spec, device=None: Words())
    result = runner.invoke(
        app,
        [
            "embed",
            str(tmp_path / "out"),
            "--input",
            str(tmp_path / "pairs.csv"),
            "--workers",
            "0",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    np.testing.assert_allclose(np.load(tmp_path / "out" / "images.npy")[:, 0], [0, 40, 80])
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "texts.npy")[:, 0], [1, 2, 1])
    assert (tmp_path / "out" / "captions.txt").read_text().splitlines() == ["black", "dark grey", "grey"]
    missing = runner.invoke(app, ["embed", str(tmp_path / "o2"), "--input", str(tmp_path / "nope.csv")])
    assert missing.exit_code == 1 and "no such file" in missing.output
