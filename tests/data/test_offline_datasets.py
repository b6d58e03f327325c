"""Offline datasets: parsers on hand-written inputs, and the real Debian files when installed
(skipped with the install command otherwise; CI installs them through `make data`)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from sotalign.data import datasets as D


def _skip_unless(name):
    return pytest.mark.skipif(
        not D.available(name),
        reason=f"needs Debian {', '.join(D.PACKAGES[name])} ({D.install_command(name)})",
    )


SVG = """<?xml version="1.0"?>
<svg><metadata><rdf:RDF>
  <cc:Work rdf:about="">
    <dc:title>Red &amp; white
       lighthouse</dc:title>
    <dc:description>A lighthouse on a rock</dc:description>
    <dc:subject><rdf:Bag><rdf:li>unsorted</rdf:li><rdf:li>sea</rdf:li><rdf:li>building</rdf:li></rdf:Bag></dc:subject>
    <dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
    <dc:creator><cc:Agent><dc:title>Some Author</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata></svg>"""


def test_svg_metadata_parser():
    assert D.parse_svg_metadata(SVG) == (
        "Red & white lighthouse",
        "A lighthouse on a rock",
        ("sea", "building"),
    )
    # Without a work title the author's (agent) title must not leak in.
    no_title = SVG.replace("<dc:title>Red &amp; white\n       lighthouse</dc:title>", "")
    assert D.parse_svg_metadata(no_title)[0] == ""
    assert D.parse_svg_metadata("<svg/>") == ("", "", ())
    item = D.ClipArt("/x/animals/big_cat_01.png", "", "", ("cat", "tiger"), "animals")
    assert D.clipart_caption(item) == "cat, tiger"
    assert D.clipart_caption(D.ClipArt("/x/animals/big_cat_01.png", "", "", (), "animals")) == "big cat"


def test_wordnet_line_parser():
    line = (
        "02084071 05 n 03 dog 0 domestic_dog 0 Canis_familiaris 0 023 @ 02083346 n 0000 | "
        'a member of the genus Canis; "the dog barked all night"'
    )
    synset = D.parse_wordnet_line(line, "noun")
    assert synset.lemmas == ("dog", "domestic dog", "Canis familiaris")
    assert synset.text.startswith("dog: a member of the genus Canis")
    assert D.parse_wordnet_line("  1 This software and database is being provided", "noun") is None
    words = " ".join(f"word{k}(a) 0" for k in range(11))  # w_cnt is hexadecimal: 0b = 11
    adjective = D.parse_wordnet_line(f"00001740 00 a 0b {words} 000 | having the means", "adj")
    assert adjective.lemmas == tuple(f"word{k}" for k in range(11)) and adjective.gloss == "having the means"


def test_idx_reader(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 8, 3]) + b"".join(int(s).to_bytes(4, "big") for s in images.shape)
    with gzip.open(tmp_path / "x.gz", "wb") as f:
        f.write(header + images.tobytes())
    np.testing.assert_array_equal(D.read_idx(tmp_path / "x.gz"), images)
    (tmp_path / "bad").write_bytes(header + images.tobytes()[:-1])
    with pytest.raises(ValueError, match="holds 23 values"):
        D.read_idx(tmp_path / "bad")
    (tmp_path / "float").write_bytes(bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0" * 4)
    with pytest.raises(ValueError, match="unsigned-byte IDX"):
        D.read_idx(tmp_path / "float")


def test_missing_assets_say_how_to_install(tmp_path, monkeypatch, capsys):
    with pytest.raises(D.MissingAsset, match="apt-get install -y wordnet-base"):
        D.wordnet_glosses(root=tmp_path)
    with pytest.raises(D.MissingAsset, match="dataset-fashion-mnist"):
        D.fashion_mnist(root=tmp_path)
    calls = []
    monkeypatch.setattr(D, "missing_packages", lambda datasets=None: ["wordnet-base"])
    monkeypatch.setattr(D.os, "geteuid", lambda: 1000)
    assert D.ensure_packages(run=lambda *a, **k: calls.append(a)) == ["wordnet-base"]
    assert not calls and "apt-get install -y --no-install-recommends wordnet-base" in capsys.readouterr().err
    monkeypatch.setattr(D.os, "geteuid", lambda: 0)
    monkeypatch.setattr(D.shutil, "which", lambda name: "/usr/bin/apt-get")
    D.ensure_packages(run=lambda command, **k: calls.append(command))
    assert calls[0][:2] == ["apt-get", "update"] and calls[1][:2] == ["apt-get", "install"]
    assert "wordnet-base" in calls[1]
    monkeypatch.setattr(D, "missing_packages", lambda datasets=None: [])
    calls.clear()
    assert D.ensure_packages(run=lambda command, **k: calls.append(command)) == [] and not calls


@_skip_unless("emoji")
def test_emoji_pairs_render_real_glyphs():
    pytest.importorskip("emoji")
    data = D.emoji_pairs()
    assert 1500 < len(data) < 2500
    assert "dog face" in data.captions and not any("skin tone" in c for c in data.captions)
    image = np.asarray(data.images.load(data.captions.index("dog face")))
    assert image.shape == (160, 160, 3)
    assert (image < 250).any(axis=2).mean() > 0.2  # a drawn glyph, not a blank canvas
    assert len(set(data.captions)) > 0.95 * len(data)


@_skip_unless("openclipart")
def test_openclipart_items():
    items = D.openclipart()
    assert len(items) > 5000
    categories = {it.category for it in items}
    assert len(categories) == 22 and {"animals", "food", "transportation"} <= categories
    assert sum(bool(it.title) for it in items) > 0.95 * len(items)
    pairs = D.openclipart_pairs(items[:50])
    image = pairs.images.load(0)
    assert image.mode == "RGB" and image.width * image.height <= D.MAX_PIXELS
    assert pairs.classes[pairs.labels[0]] == items[0].category


@_skip_unless("fashion-mnist")
def test_fashion_mnist_test_split():
    data = D.fashion_mnist("test")
    assert len(data) == 10_000 and np.bincount(data.labels).tolist() == [1000] * 10
    assert data.images.load(0).size == (28, 28)
    assert data.captions[0] == f"a photo of a {D.FASHION_MNIST_CLASSES[data.labels[0]]}"


@_skip_unless("wordnet")
def test_wordnet_glosses():
    nouns = D.wordnet_glosses(("noun",))
    assert len(nouns) == 82_115
    dog = next(s for s in nouns if s.offset == "02084071")
    assert "dog" in dog.lemmas and "Canis" in dog.gloss
    tabby = next(s for s in nouns if s.offset == "02123045")  # the ImageNet wnid n02123045
    assert "cat" in tabby.gloss
