"""Offline image–text datasets from Debian packages (no download at run time).

- `emoji_pairs()`: every fully-qualified emoji without skin-tone variants that the Noto Color
  Emoji font (Debian `fonts-noto-color-emoji`) can draw, rendered with Pillow, and its English
  name from the PyPI `emoji` package ("dog face"): about 1,900 real (image, caption) pairs.
- `openclipart()`: the OpenClipArt drawings (Debian `openclipart-png` + `openclipart-svg`) with
  the title, description and keywords of each SVG's `<cc:Work>` metadata and its top-level
  category (22); drawings over 20 Mpx are skipped (one is 16000×14464 and trips Pillow's
  decompression-bomb guard).
- `fashion_mnist()`: Debian `dataset-fashion-mnist`, 60,000 + 10,000 28×28 images, 10 named classes.
- `wordnet_glosses()`: the WordNet 3.0 synsets (Debian `wordnet-base`) with lemmas and gloss,
  unpaired text.

Each item's image is produced on demand by `ImageSource.load(i)` (an RGB PIL image), so the
embedding pipeline (`sotalign.data.embed`) can stream it through loader workers. A missing
Debian package raises `MissingAsset` with the command that installs it; `ensure_packages`
runs that command when it is root (``python -m sotalign.data.datasets --install``).
"""

from __future__ import annotations

import gzip
import hashlib
import html
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
OPENCLIPART = Path("/usr/share/openclipart")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
WORDNET = Path("/usr/share/wordnet")

#: Debian packages of each dataset (the PyPI `emoji` package comes with the `encoders` extra).
PACKAGES = {
    "emoji": ("fonts-noto-color-emoji",),
    "openclipart": ("openclipart-png", "openclipart-svg"),
    "fashion-mnist": ("dataset-fashion-mnist",),
    "wordnet": ("wordnet-base",),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
#: The Noto font is a CBDT bitmap font with a single size; glyphs are drawn at it and resized.
EMOJI_FONT_SIZE = 109
MAX_PIXELS = 20_000_000


class MissingAsset(FileNotFoundError):
    """A dataset's files are absent; the message says which package provides them."""


def install_command(dataset: str) -> str:
    return "apt-get update && apt-get install -y " + " ".join(PACKAGES[dataset])


def _require(path: Path, dataset: str) -> Path:
    if not path.exists():
        raise MissingAsset(
            f"{path}: not found; the {dataset} dataset needs Debian "
            f"{', '.join(PACKAGES[dataset])} (as root: {install_command(dataset)})"
        )
    return path


def available(dataset: str) -> bool:
    """Whether the files of `dataset` (a key of PACKAGES) are installed."""
    paths = {
        "emoji": [EMOJI_FONT],
        "openclipart": [OPENCLIPART / "png", OPENCLIPART / "svg"],
        "fashion-mnist": [FASHION_MNIST / "t10k-labels-idx1-ubyte.gz"],
        "wordnet": [WORDNET / "data.noun"],
    }
    if dataset not in paths:
        raise KeyError(f"unknown dataset {dataset!r}; expected one of {', '.join(PACKAGES)}")
    return all(p.exists() for p in paths[dataset])


def missing_packages(datasets=tuple(PACKAGES)) -> list[str]:
    """Debian packages of `datasets` whose files are absent."""
    return [pkg for name in datasets if not available(name) for pkg in PACKAGES[name]]


def ensure_packages(datasets=tuple(PACKAGES), *, run=subprocess.run) -> list[str]:
    """Install the missing Debian packages of `datasets` when root; otherwise print the command.

    Returns the packages that were missing (empty when everything is installed: no apt call).
    """
    missing = missing_packages(datasets)
    if not missing:
        return []
    command = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(
            "sotalign datasets need Debian packages; run as root:\n  apt-get update && " + " ".join(command),
            file=sys.stderr,
        )
        return missing
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-qq"], check=True, env=env)
    run([*command, "-qq"], check=True, env=env)
    return missing


# ----------------------------------------------------------------------------- image sources


@dataclass(frozen=True)
class ImageSource:
    """Images addressed by index: `load(i)` returns an RGB PIL image.

    `kind` with `items` defines how: "emoji" (items are characters, rendered), "files"
    (image paths; alpha composited on white), "array" (`pixels[i]`, uint8 H×W or H×W×3).
    `key` identifies the content for caches (it changes when the items change).
    """

    kind: str
    items: tuple = ()
    pixels: np.ndarray | None = field(default=None, repr=False)
    key: str = ""

    def __post_init__(self):
        if self.kind not in ("emoji", "files", "array"):
            raise ValueError(f"unknown image source kind {self.kind!r}")
        if not self.key:
            digest = hashlib.sha256(self.kind.encode())
            if self.pixels is not None:
                digest.update(np.ascontiguousarray(self.pixels).tobytes())
            for item in self.items:
                digest.update(str(item).encode() + b"\0")
                if self.kind == "files":  # a file edited in place gets a new key
                    stat = os.stat(item)
                    digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            object.__setattr__(self, "key", digest.hexdigest()[:16])

    def __len__(self) -> int:
        return len(self.pixels) if self.kind == "array" else len(self.items)

    def load(self, i: int):
        from PIL import Image

        if self.kind == "emoji":
            return render_emoji(self.items[i])
        if self.kind == "array":
            image = Image.fromarray(np.asarray(self.pixels[i], dtype=np.uint8))
            return image.convert("RGB")
        return load_image_file(self.items[i])


def load_image_file(path):
    """An image file as RGB; transparent pixels are composited on white (clip art has alpha)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.width * image.height > MAX_PIXELS:
            raise ValueError(f"{path}: {image.width}×{image.height} exceeds {MAX_PIXELS // 1_000_000} Mpx")
        if image.mode in ("RGBA", "LA", "P"):
            rgba = image.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, rgba).convert("RGB")
        return image.convert("RGB")


_FONT = None


def render_emoji(character: str, size: int = 160):
    """One emoji drawn centred on a white `size`×`size` canvas with the Noto Color Emoji font."""
    from PIL import Image, ImageDraw, ImageFont

    global _FONT
    if _FONT is None:
        _FONT = ImageFont.truetype(str(_require(EMOJI_FONT, "emoji")), EMOJI_FONT_SIZE)
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text(
        (size // 2, size // 2), character, font=_FONT, embedded_color=True, anchor="mm"
    )
    return image


# ----------------------------------------------------------------------------- datasets


@dataclass(frozen=True)
class PairedDataset:
    """Images with one caption each (row i ↔ caption i), optional class labels."""

    name: str
    images: ImageSource
    captions: tuple[str, ...]
    labels: np.ndarray | None = None
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.captions)


def emoji_pairs() -> PairedDataset:
    """The emoji the Noto font draws (fully qualified, no skin tones) and their English names."""
    try:
        import emoji
    except ImportError:
        raise ImportError(
            "the emoji dataset needs the emoji package: pip install 'sotalign[encoders]'"
        ) from None
    from PIL import Image

    _require(EMOJI_FONT, "emoji")
    characters, names = [], []
    for character, data in emoji.EMOJI_DATA.items():
        name = data["en"].strip(":").replace("_", " ")
        if data.get("status") != emoji.STATUS["fully_qualified"] or "skin tone" in name:
            continue
        # A glyph missing from the font draws nothing: skip blank canvases.
        if Image.eval(render_emoji(character).convert("L"), lambda p: 255 - p).getbbox() is None:
            continue
        characters.append(character)
        names.append(name)
    return PairedDataset("emoji", ImageSource("emoji", tuple(characters)), tuple(names))


@dataclass(frozen=True)
class ClipArt:
    """One OpenClipArt drawing: its PNG, the SVG metadata and its top-level category."""

    png: str
    title: str
    description: str
    keywords: tuple[str, ...]
    category: str


_WORK = re.compile(r"<cc:Work\b.*?</cc:Work>", re.S)
_AGENTS = re.compile(r"<dc:(publisher|creator|rights|contributor)\b.*?</dc:\1>", re.S)
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.S)
_DESCRIPTION = re.compile(r"<dc:description>(.*?)</dc:description>", re.S)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.S)


def _text(match) -> str:
    return " ".join(html.unescape(match.group(1)).split()) if match else ""


def parse_svg_metadata(text: str) -> tuple[str, str, tuple[str, ...]]:
    """(title, description, keywords) of an OpenClipArt SVG's `<cc:Work>` block ("unsorted" dropped)."""
    work = _WORK.search(text)
    if work is None:
        return "", "", ()
    block = _AGENTS.sub("", work.group(0))  # agents have their own dc:title (the author's name)
    subject = _SUBJECT.search(block)
    keywords = (
        tuple(
            k
            for k in (" ".join(html.unescape(li).split()) for li in _LI.findall(subject.group(1)))
            if k and k != "unsorted"
        )
        if subject
        else ()
    )
    return _text(_TITLE.search(block)), _text(_DESCRIPTION.search(block)), keywords


def openclipart(root: Path = OPENCLIPART, *, max_pixels: int = MAX_PIXELS) -> list[ClipArt]:
    """Every drawing with a PNG, an SVG and at most `max_pixels`, sorted by path."""
    from PIL import Image

    png_root, svg_root = _require(root / "png", "openclipart"), _require(root / "svg", "openclipart")
    items = []
    for png in sorted(png_root.rglob("*.png")):
        relative = png.relative_to(png_root)
        svg = svg_root / relative.with_suffix(".svg")
        if not svg.exists():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(png) as image:  # reads the header only
                    if image.width * image.height > max_pixels:
                        continue
        except Image.DecompressionBombError:  # Pillow refuses headers over ~179 Mpx outright
            continue
        with open(svg, encoding="utf-8", errors="replace") as f:
            head = f.read(1 << 16)  # the metadata precedes the drawing
        title, description, keywords = parse_svg_metadata(head)
        items.append(ClipArt(str(png), title, description, keywords, relative.parts[0]))
    return items


def clipart_caption(item: ClipArt) -> str:
    """The title, else the keywords, else the file name in words."""
    if item.title:
        return item.title
    if item.keywords:
        return ", ".join(item.keywords)
    return re.sub(r"[_\d]+", " ", Path(item.png).stem).strip()


def openclipart_pairs(items: list[ClipArt] | None = None) -> PairedDataset:
    """OpenClipArt as (drawing, caption) pairs labelled with the 22 top-level categories."""
    items = openclipart() if items is None else items
    classes = tuple(sorted({it.category for it in items}))
    labels = np.array([classes.index(it.category) for it in items], dtype=np.int64)
    return PairedDataset(
        "openclipart",
        ImageSource("files", tuple(it.png for it in items)),
        tuple(clipart_caption(it) for it in items),
        labels,
        classes,
    )


def read_idx(path) -> np.ndarray:
    """An IDX file (gzipped or not): magic 0x0000 08 <ndim>, big-endian int32 sizes, uint8 data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but holds {body.size} values")
    return body.reshape(shape)


def fashion_mnist(split: str = "test", root: Path = FASHION_MNIST) -> PairedDataset:
    """Fashion-MNIST `split` ("train": 60,000, "test": 10,000), captioned "a photo of a <class>"."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images = read_idx(_require(root / f"{prefix}-images-idx3-ubyte.gz", "fashion-mnist"))
    labels = read_idx(_require(root / f"{prefix}-labels-idx1-ubyte.gz", "fashion-mnist")).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    captions = tuple(f"a photo of a {FASHION_MNIST_CLASSES[k]}" for k in labels)
    return PairedDataset(
        f"fashion-mnist-{split}",
        ImageSource("array", pixels=images, key=f"fashion-mnist-{split}"),
        captions,
        labels,
        FASHION_MNIST_CLASSES,
    )


@dataclass(frozen=True)
class Synset:
    offset: str
    pos: str
    lemmas: tuple[str, ...]
    gloss: str

    @property
    def text(self) -> str:
        """ "lemma: gloss" (the first lemma, underscores as spaces)."""
        return f"{self.lemmas[0]}: {self.gloss}"


def parse_wordnet_line(line: str, pos: str) -> Synset | None:
    """One `data.<pos>` line: offset lex_filenum ss_type w_cnt (word lex_id)… … | gloss.

    License lines (starting with spaces) give None. w_cnt is two hexadecimal digits.
    """
    if not line or line[0] == " ":
        return None
    fields, _, gloss = line.partition(" | ")
    parts = fields.split()
    count = int(parts[3], 16)
    lemmas = tuple(re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in parts[4 : 4 + 2 * count : 2])
    return Synset(parts[0], pos, lemmas, gloss.strip())


def wordnet_glosses(
    pos: tuple[str, ...] = ("noun", "verb", "adj", "adv"), root: Path = WORDNET
) -> list[Synset]:
    """The synsets of the WordNet 3.0 data files of `pos`, in file order."""
    synsets = []
    for part in pos:
        path = _require(root / f"data.{part}", "wordnet")
        with open(path, encoding="utf-8", errors="replace") as f:
            synsets.extend(
                s for s in (parse_wordnet_line(line.rstrip("\n"), part) for line in f) if s is not None
            )
    return synsets


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Install (when root) or list the Debian data packages.")
    parser.add_argument("--install", action="store_true", help="apt-get install what is missing (root only)")
    args = parser.parse_args(argv)
    if args.install:
        ensure_packages()
        return 0
    for name in PACKAGES:
        print(f"{name:14s} {'installed' if available(name) else 'missing: ' + install_command(name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
