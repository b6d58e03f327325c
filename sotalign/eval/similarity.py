"""Representational similarity of two feature sets over the same n samples (no alignment needed)."""

from __future__ import annotations

import numbers

import torch

from ..ot.validation import as_matrix
from .retrieval import check_chunk, cosine_rows


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> None:
    if len(a) != len(b):
        raise ValueError(f"a has {len(a)} rows but b has {len(b)}; both must describe the same samples")


def _knn(x: torch.Tensor, k: int, chunk_size: int) -> torch.Tensor:
    """Indices of each row's k nearest rows by cosine similarity, excluding the row itself."""
    x = cosine_rows("features", x)
    out = []
    for start in range(0, len(x), chunk_size):
        scores = x[start : start + chunk_size] @ x.T
        rows = torch.arange(len(scores), device=x.device)
        scores[rows, rows + start] = -torch.inf
        out.append(scores.topk(k, dim=1).indices)
    return torch.cat(out)


def mutual_knn(a, b, k: int = 10, *, chunk_size: int = 4096) -> float:
    """Mutual k-NN alignment (Huh et al. 2024): mean_i |N_a(i) ∩ N_b(i)| / k.

    N_a(i) = the k rows of `a` with the highest cosine similarity to row i, row i excluded
    (likewise N_b in `b`). 1 means identical neighbourhoods; independent random features give
    about k/(n−1). Ties between equal similarities are broken by `torch.topk`.
    """
    a, b = as_matrix("a", a), as_matrix("b", b)
    _same_rows(a, b)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k < len(a):
        raise ValueError(f"k must be an integer in [1, n−1] = [1, {len(a) - 1}], got {k!r}")
    chunk_size = check_chunk(chunk_size)
    na, nb = _knn(a, k, chunk_size), _knn(b.to(a.device), k, chunk_size)
    # |N_a ∩ N_b| per row: neighbour lists have no repeats, so count the equal pairs
    overlap = (na[:, :, None] == nb[:, None, :]).sum(dim=(1, 2))
    return float(overlap.double().mean() / k)


def linear_cka(a, b) -> float:
    """Linear CKA (Kornblith et al. 2019) of features a (n × p) and b (n × q), in float64.

    With column-centred A, B:  CKA = ‖BᵀA‖²_F / (‖AᵀA‖_F · ‖BᵀB‖_F),
    i.e. HSIC(K, L) / √(HSIC(K, K) · HSIC(L, L)) for the linear kernels K = AAᵀ, L = BBᵀ.
    In [0, 1]; invariant to orthogonal transforms and isotropic scaling of either set.
    """
    a, b = as_matrix("a", a).double(), as_matrix("b", b).double()
    _same_rows(a, b)
    b = b.to(a.device)
    a = a - a.mean(dim=0)
    b = b - b.mean(dim=0)
    for name, x in (("a", a), ("b", b)):
        if not bool((x != 0).any()):
            raise ValueError(f"{name} has no variance across rows; CKA is undefined")
    cross = torch.linalg.matrix_norm(b.T @ a) ** 2
    return float(cross / (torch.linalg.matrix_norm(a.T @ a) * torch.linalg.matrix_norm(b.T @ b)))
