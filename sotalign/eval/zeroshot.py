"""Zero-shot classification: class weights from prompt templates, top-k accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..ot.validation import as_matrix, compute_dtype
from .retrieval import check_chunk, check_ks, cosine_rows, pessimistic_ranks


def _device_of(module) -> torch.device | None:
    if isinstance(module, torch.nn.Module):
        for tensor in module.parameters():
            return tensor.device
    return None


def zero_shot_weights(
    class_names: Sequence[str],
    templates: Sequence[str],
    text_encoder: Callable[[list[str]], np.ndarray],
    embed_texts: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """C × D class weights: w_c = normalise( mean_t normalise( g(E(template_t(name_c))) ) ).

    E = `text_encoder` (list of prompts → N × d_text array), g = `embed_texts` (tensor → tensor,
    e.g. the aligned model's text head; None = identity). A template is formatted with
    `template.format(name)`, so "a photo of a {}." and "a photo of a {name}." both work.
    Prompts are encoded in one call, class-major (class 0's templates first).
    """
    names, templates = list(class_names), list(templates)
    if not names:
        raise ValueError("class_names is empty")
    if not templates:
        raise ValueError("templates is empty")
    for t in templates:
        try:
            ok = isinstance(t, str) and t.format("\0", name="\0") != t
        except (KeyError, IndexError):
            ok = False
        if not ok:
            raise ValueError(
                f"template {t!r} needs a '{{}}' or '{{name}}' placeholder for the class name "
                "(and no other fields)"
            )
    prompts = [t.format(name, name=name) for name in names for t in templates]
    encoded = text_encoder(prompts)
    features = as_matrix(
        "text_encoder output", encoded if isinstance(encoded, torch.Tensor) else np.asarray(encoded)
    )
    if len(features) != len(prompts):
        raise ValueError(f"text_encoder returned {len(features)} rows for {len(prompts)} prompts")
    if embed_texts is not None:
        device = _device_of(embed_texts)
        with torch.no_grad():
            features = embed_texts(features if device is None else features.to(device))
        features = as_matrix("embed_texts output", features)
    per_prompt = cosine_rows("embedded prompts", features).reshape(len(names), len(templates), -1)
    return cosine_rows("class weights (mean over templates)", per_prompt.mean(dim=1))


def zero_shot_accuracy(
    image_emb, labels, class_weights, ks=(1, 5), *, chunk_size: int = 4096
) -> dict[str, float]:
    """Top-k accuracy (percent) of classifying images by cosine similarity to the class weights.

    s_ic = cos(image_i, w_c); the rank of the true class y_i is
    #{c : s_ic > s_iy} + #{c ≠ y : s_ic = s_iy} (every tie counts against it), and
    top{k} = 100 · mean_i [rank_i < k]. Keys "top1", "top5", … for each k in `ks`.
    """
    images = as_matrix("image_emb", image_emb)
    weights = as_matrix("class_weights", class_weights)
    if images.shape[1] != weights.shape[1]:
        raise ValueError(f"image_emb has dim {images.shape[1]} but class_weights has dim {weights.shape[1]}")
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if labels.dim() != 1 or len(labels) != len(images):
        raise ValueError(
            f"labels must be 1-D with one entry per image ({len(images)}), got shape {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class ids, got {labels.dtype}")
    n_classes = len(weights)
    if bool(((labels < 0) | (labels >= n_classes)).any()):
        raise ValueError(
            f"labels must lie in [0, {n_classes}) (one row of class_weights per class), "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )
    ks = check_ks(ks)
    chunk_size = check_chunk(chunk_size)
    dtype = compute_dtype(images, weights)
    images = cosine_rows("image_emb", images.to(dtype))
    weights = cosine_rows("class_weights", weights.to(dtype).to(images.device))
    labels = labels.long().to(images.device)
    ranks = torch.cat(
        [
            pessimistic_ranks(images[s : s + chunk_size] @ weights.T, labels[s : s + chunk_size])
            for s in range(0, len(images), chunk_size)
        ]
    )
    return {f"top{k}": 100.0 * float((ranks < k).double().mean()) for k in ks}
