r"""Entropic optimal transport between the rows and columns of an affinity K, in the log domain.

With cost −K, marginals a (n) and b (m) of equal mass, and ε > 0,

    P = argmin_{P ∈ Π(a, b)}  −⟨P, K⟩ + ε ⟨P, log P⟩,      log P_ij = (f_i + g_j + K_ij) / ε.

Sinkhorn alternates the two half-steps, each making one marginal exact:

    f_i = ε log a_i − ε LSE_j [(K_ij + g_j) / ε],      g_j = ε log b_j − ε LSE_i [(K_ij + f_i) / ε].

Defaults follow the SOTAlign paper and its authors' code: uniform marginals of mass one,
100 iterations from g = 0, then one *symmetric* step that averages the potentials with one
more update of each, so both marginals are approximately (not exactly) satisfied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import Affinity, Backend
from . import validation as check
from .dispatch import DEFAULT_MEMORY_BUDGET, choose_route


@dataclass(frozen=True)
class SinkhornResult:
    """Potentials of an entropic OT plan: ``log P_ij = (f_i + g_j + K_ij) / eps``."""

    f: Tensor
    g: Tensor
    eps: float
    n_iters: int
    #: max(‖P1 − a‖₁, ‖Pᵀ1 − b‖₁) of the returned potentials.
    marginal_error: float
    backend: str
    path: str
    affinity: Affinity

    def plan(self) -> Tensor:
        """The dense n×m plan P (allocates n×m; meant for small problems and tests)."""
        K = self.affinity.materialize().dense
        return ((self.f[:, None] + self.g[None, :] + K) / self.eps).exp()


def row_update(backend: Backend, K: Affinity, g: Tensor, eps: float, log_a: Tensor) -> Tensor:
    """f = ε log a − ε LSE_j[(K + g)/ε]: makes the row marginal exact."""
    return eps * (log_a - backend.lse_rows(K, g, eps))


def column_update(backend: Backend, K: Affinity, f: Tensor, eps: float, log_b: Tensor) -> Tensor:
    """g = ε log b − ε LSE_i[(K + f)/ε]: makes the column marginal exact."""
    return eps * (log_b - backend.lse_cols(K, f, eps))


def solve(backend: Backend, K: Affinity, eps: float, n_iters: int, log_a: Tensor, log_b: Tensor,
          *, tol: float | None = None, check_every: int = 10, symmetric: bool = True,
          g_init: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
    """Run the Sinkhorn loop; returns ``(f, g, iterations done)``.

    With ``tol``, every ``check_every`` iterations the row-marginal error of the current
    (f, g) is read off the next row update for free: the row sums of P are
    ``a_i · exp((f_i − f_next_i) / ε)``, and the loop stops once their L1 error is below tol
    (columns are exact after each column update).

    The symmetric step of the paper averages (f, g) with (f', g') where f' is the row update
    from g and g' the column update from f. Since g was itself just computed from f, g' = g,
    so only f moves: f ← (f + f') / 2.
    """
    g = torch.zeros_like(log_b) if g_init is None else g_init
    f = None
    f_next = None
    done = 0
    for it in range(n_iters):
        f_next = row_update(backend, K, g, eps, log_a)
        if tol is not None and f is not None and it % check_every == 0:
            row_sums = log_a.exp() * torch.exp((f - f_next) / eps)
            if float((row_sums - log_a.exp()).abs().sum()) < tol:
                break
        f = f_next
        g = column_update(backend, K, f, eps, log_b)
        f_next = None
        done += 1
    if symmetric:
        if f_next is None:
            f_next = row_update(backend, K, g, eps, log_a)
        f = 0.5 * (f + f_next)
    return f, g, done


def marginal_error(backend: Backend, K: Affinity, f: Tensor, g: Tensor, eps: float,
                   log_a: Tensor, log_b: Tensor) -> float:
    """max(‖P1 − a‖₁, ‖Pᵀ1 − b‖₁), from one row and one column LSE pass."""
    rows = torch.exp(f / eps + backend.lse_rows(K, g, eps))
    cols = torch.exp(g / eps + backend.lse_cols(K, f, eps))
    return max(float((rows - log_a.exp()).abs().sum()), float((cols - log_b.exp()).abs().sum()))


def uniform_log_weights(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((size,), -math.log(size), dtype=dtype, device=device)


def _log_weights(a, b, n, m, dtype, device) -> tuple[Tensor, Tensor]:
    log_a = (uniform_log_weights(n, dtype, device) if a is None
             else check.check_weights("a", a, n, dtype, device).log())
    log_b = (uniform_log_weights(m, dtype, device) if b is None
             else check.check_weights("b", b, m, dtype, device).log())
    mass_a, mass_b = float(log_a.exp().sum()), float(log_b.exp().sum())
    if abs(mass_a - mass_b) > 1e-6 * max(mass_a, mass_b):
        raise ValueError(f"a and b must have the same total mass, got {mass_a:.8g} and {mass_b:.8g}")
    return log_a, log_b


def _warm_start(warm_start, m: int, dtype, device) -> Tensor | None:
    """The g of a previous result or of an (f, g) pair; f is recomputed from it first."""
    if warm_start is None:
        return None
    g = warm_start.g if isinstance(warm_start, SinkhornResult) else warm_start[1]
    if not isinstance(g, Tensor) or g.shape != (m,):
        raise ValueError(f"warm_start must be a SinkhornResult or an (f, g) pair with g of shape ({m},)")
    if not bool(torch.isfinite(g).all()):
        raise ValueError("warm_start potentials contain NaN or Inf")
    return g.to(dtype=dtype, device=device)


def _sinkhorn(K: Affinity, feature_dim, eps, n_iters, tol, backend, path, a, b, symmetric,
              warm_start, check_every, memory_budget) -> SinkhornResult:
    eps = check.check_positive("eps", eps)
    n_iters = check.check_count("n_iters", n_iters)
    check_every = check.check_count("check_every", check_every)
    if tol is not None:
        tol = check.check_positive("tol", tol)
    n, m = K.shape
    route = choose_route(backend, path, K.device, n, m, feature_dim, K.dtype, 1, memory_budget)
    log_a, log_b = _log_weights(a, b, n, m, K.dtype, K.device)
    g_init = _warm_start(warm_start, m, K.dtype, K.device)
    with torch.no_grad():
        K_read = route.prepare(K)
        f, g, done = solve(route.backend, K_read, eps, n_iters, log_a, log_b, tol=tol,
                           check_every=check_every, symmetric=symmetric, g_init=g_init)
        error = marginal_error(route.backend, K_read, f, g, eps, log_a, log_b)
    return SinkhornResult(f, g, eps, done, error, route.backend.name, route.path, K)


def sinkhorn(x: Tensor, y: Tensor, eps: float = 0.05, n_iters: int = 100, tol: float | None = None,
             affinity: str = "cosine", backend: str = "auto", *, path: str = "auto",
             a: Tensor | None = None, b: Tensor | None = None, symmetric: bool = True,
             warm_start=None, check_every: int = 10,
             memory_budget: float = DEFAULT_MEMORY_BUDGET) -> SinkhornResult:
    """Entropic OT plan between the rows of ``x`` (n×d) and of ``y`` (m×d).

    ``affinity="cosine"`` uses K = x̂ ŷᵀ with L2-normalised rows; ``"dot"`` uses K = x yᵀ.
    Potentials are not differentiable (use :func:`sotalign.klot` for gradients).

    Args:
        eps: entropic regularisation ε > 0, in the units of K.
        n_iters: maximum number of alternating iterations (≥ 1).
        tol: stop early once the L1 marginal error is below ``tol`` (checked every
            ``check_every`` iterations at no extra pass).
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"cpu"``.
        path: ``"auto"``, ``"dense"`` (K stored once) or ``"online"`` (K recomputed).
        a, b: positive marginal weights of equal mass (default uniform, mass one).
        symmetric: apply the paper's final averaged half-step.
        warm_start: a previous :class:`SinkhornResult` or ``(f, g)`` to start from.
        memory_budget: bytes that ``path="auto"`` may spend on a stored K.
    """
    check.check_matrices(x=x, y=y)
    check.check_affinity(affinity)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature dimension, got {x.shape[1]} and {y.shape[1]}")
    dtype = check.compute_dtype(x, y)
    x, y = x.detach().to(dtype), y.detach().to(dtype)
    if affinity == "cosine":
        x, y = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)
    return _sinkhorn(Affinity.from_features(x, y), x.shape[1], eps, n_iters, tol, backend, path,
                     a, b, symmetric, warm_start, check_every, memory_budget)


def sinkhorn_dense(K: Tensor, eps: float = 0.05, n_iters: int = 100, tol: float | None = None,
                   backend: str = "auto", *, a: Tensor | None = None, b: Tensor | None = None,
                   symmetric: bool = True, warm_start=None, check_every: int = 10) -> SinkhornResult:
    """Entropic OT plan for a given n×m affinity ``K`` (cost −K); see :func:`sinkhorn`."""
    check.check_matrices(K=K)
    K = K.detach().to(check.compute_dtype(K))
    return _sinkhorn(Affinity.from_dense(K), None, eps, n_iters, tol, backend, "auto", a, b,
                     symmetric, warm_start, check_every, DEFAULT_MEMORY_BUDGET)
