"""Zero-shot cross-modal retrieval: Recall@k between aligned image and text embeddings."""

from __future__ import annotations

import numbers

import torch

from ..ot.validation import as_matrix, compute_dtype, unit_rows


def cosine_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    """The unit rows of ``x`` (:func:`~sotalign.ot.validation.unit_rows`); an all-zero row has
    no direction, so it is an error here rather than a zero row."""
    zero = ~(x != 0).any(dim=1)
    if bool(zero.any()):
        raise ValueError(
            f"{name} has an all-zero row ({int(torch.nonzero(zero)[0, 0])}); cosine similarity is undefined"
        )
    return unit_rows(x)


def check_ks(ks) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one k")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"every k in ks must be a positive integer, got {k!r}")
    return tuple(int(k) for k in ks)


def check_chunk(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    return int(chunk_size)


def pessimistic_ranks(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based rank of each row's target column: #{strictly higher} + #{other columns tying it}.

    Every tie is counted against the target, so a collapsed model (all scores equal) ranks
    last and earns nothing; the result does not depend on the order of the candidates.
    """
    true = scores.gather(1, target[:, None])
    higher = (scores > true).sum(dim=1)
    ties = (scores == true).sum(dim=1) - 1
    return higher + ties


def _percent(hits: torch.Tensor) -> float:
    return 100.0 * float(hits.double().mean())


def _ranks(queries: torch.Tensor, keys: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Rank of key i among all keys for query i, in chunks of query rows (chunk × n at a time)."""
    ranks = []
    for start in range(0, len(queries), chunk_size):
        scores = queries[start : start + chunk_size] @ keys.T
        target = torch.arange(start, start + len(scores), device=scores.device)
        ranks.append(pessimistic_ranks(scores, target))
    return torch.cat(ranks)


def retrieval_metrics(image_emb, text_emb, ks=(1, 5, 10), *, chunk_size: int = 4096) -> dict[str, float]:
    """Recall@k (percent) for image→text and text→image retrieval.

    Row i of `image_emb` pairs with row i of `text_emb`; s_ij = cos(image_i, text_j) (rows are
    L2-normalised inside). For image query i the rank of its text is

        r_i = #{j : s_ij > s_ii} + #{j ≠ i : s_ij = s_ii}     (0-based; every tie counts against it),

    i2t_R@k = 100 · mean_i [r_i < k], and t2i_R@k likewise on the columns. `mean_R@1` is the
    mean of i2t_R@1 and t2i_R@1 (the paper's MeanR@1). Similarities are formed for
    `chunk_size` query rows at a time, so memory is chunk_size × n, never n × n.
    Accepts numpy arrays or torch tensors (float64 is computed in float64, else float32).
    """
    images = as_matrix("image_emb", image_emb)
    texts = as_matrix("text_emb", text_emb)
    if images.shape != texts.shape:
        raise ValueError(
            f"image_emb {tuple(images.shape)} and text_emb {tuple(texts.shape)} must have the "
            "same shape (row i of each is a pair, in one shared space)"
        )
    if images.device != texts.device:
        raise ValueError(f"image_emb is on {images.device} but text_emb is on {texts.device}")
    ks = check_ks(ks)
    chunk_size = check_chunk(chunk_size)
    dtype = compute_dtype(images, texts)
    images = cosine_rows("image_emb", images.to(dtype))
    texts = cosine_rows("text_emb", texts.to(dtype))
    out: dict[str, float] = {}
    top1 = []
    for name, queries, keys in (("i2t", images, texts), ("t2i", texts, images)):
        ranks = _ranks(queries, keys, chunk_size)
        for k in ks:
            out[f"{name}_R@{k}"] = _percent(ranks < k)
        top1.append(_percent(ranks == 0))
    out["mean_R@1"] = 0.5 * (top1[0] + top1[1])
    return out
