"""Spherical sliced Wasserstein distances for choosing unpaired data (paper §7, Eq. 14).

SSW₂(μ, ν) = ( ∫ W₂²(P^U_# μ, P^U_# ν) dσ(U) )^{1/2}   (Bonet et al. 2023, POT's
`ot.sliced_wasserstein_sphere`): both sets are projected onto random great circles
P^U(x) = Uᵀx / ‖Uᵀx‖ (U a random d × 2 orthonormal frame) and the 1-D Wasserstein distances on
the circle are averaged over `n_projections` frames (a Monte-Carlo estimate, exact in
expectation; identical sets give exactly 0 with any frames). Circle distances are in turns
(POT's convention: the circle has length 1), so SSW₂ ∈ [0, 1/2].
"""

from __future__ import annotations

import numbers

import numpy as np
import torch

from ..data.stores import EmbeddingStore
from ..ot.validation import as_matrix, check_count
from .retrieval import cosine_rows


def _unit_rows(name: str, x):
    """float64 unit rows: a numpy array on CPU (POT's numpy backend is the faster one there), a
    torch tensor on an accelerator (POT then runs there with its torch backend)."""
    unit = cosine_rows(name, as_matrix(name, x).double())
    return unit.cpu().numpy() if unit.device.type == "cpu" else unit


def ssw_distance(x, y, *, n_projections: int = 256, seed: int = 0) -> float:
    """SSW₂ between the L2-normalised rows of x (n × d) and y (m × d), with seeded projections.

    Cost: POT's circle solver is a binary search over O(n_projections · (n + m)) sorted values;
    on 2 CPU cores 5,000 rows a side with 256 projections take tens of seconds, so subsample
    large pools (`selection_distance` does) or pass CUDA tensors.
    """
    n_projections = check_count("n_projections", n_projections)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    xs, ys = _unit_rows("x", x), _unit_rows("y", y)
    if type(xs) is not type(ys) or (isinstance(xs, torch.Tensor) and xs.device != ys.device):
        raise ValueError("x and y must be on the same device")
    if xs.shape[1] != ys.shape[1]:
        raise ValueError(
            f"x has dim {xs.shape[1]} but y has dim {ys.shape[1]}; SSW compares sets in one space"
        )
    if xs.shape[1] < 3:
        raise ValueError(f"SSW needs dim >= 3 (projections onto a 2-D plane), got {xs.shape[1]}")
    import ot

    return float(ot.sliced_wasserstein_sphere(xs, ys, n_projections=n_projections, p=2, seed=int(seed)))


def _subsample(name: str, x, max_rows: int, seed: int, stream: int) -> torch.Tensor:
    """At most max_rows rows of x, chosen without replacement by a seeded generator (all if fewer).

    An `EmbeddingStore` reads only the chosen rows.
    """
    n = len(x)
    if n == 0:
        raise ValueError(f"{name} is empty")
    keep = None
    if n > max_rows:
        keep = np.sort(np.random.default_rng([seed, stream]).choice(n, size=max_rows, replace=False))
    if isinstance(x, EmbeddingStore):
        return x.rows(np.arange(n) if keep is None else keep)
    x = as_matrix(name, x)
    return x if keep is None else x[torch.from_numpy(keep).to(x.device)]


def selection_distance(
    paired_images,
    paired_texts,
    unpaired_images,
    unpaired_texts,
    *,
    n_projections: int = 256,
    seed: int = 0,
    max_rows: int = 5000,
) -> dict[str, float]:
    """How far the unpaired pools lie from the paired data, per modality (smaller = closer).

    images = SSW₂(unpaired_images, paired_images), texts = SSW₂(unpaired_texts, paired_texts),
    mean = (images + texts)/2, total = images + texts (the paper's d(D, D_p), Eq. 14). Each
    set (array, tensor or EmbeddingStore) is subsampled to at most `max_rows` rows with a
    generator seeded by (seed, set), so the result is deterministic.
    """
    max_rows = check_count("max_rows", max_rows)
    sets = [
        _subsample(name, x, max_rows, seed, i)
        for i, (name, x) in enumerate(
            (
                ("paired_images", paired_images),
                ("paired_texts", paired_texts),
                ("unpaired_images", unpaired_images),
                ("unpaired_texts", unpaired_texts),
            )
        )
    ]
    images = ssw_distance(sets[2], sets[0], n_projections=n_projections, seed=seed)
    texts = ssw_distance(sets[3], sets[1], n_projections=n_projections, seed=seed)
    return {"images": images, "texts": texts, "mean": 0.5 * (images + texts), "total": images + texts}
