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
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import Affinity, Backend, load_backend
from . import validation as check
from .dispatch import Route, choose_route
from .options import SolverOptions


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
    #: Dot-product precision of the backend (``apply`` and ``apply_t`` reuse it).
    precision: str = "fp32"
    #: The route taken (backend, path, precision) and the one-line reason for it.
    route: Route | None = None

    def plan(self) -> Tensor:
        """The dense n×m plan P (allocates n×m; meant for small problems and tests)."""
        K = self.affinity.materialize().dense
        return ((self.f[:, None] + self.g[None, :] + K) / self.eps).exp()

    def apply(self, V: Tensor) -> Tensor:
        """P V for an (m, k) tensor V, streamed by the backend's ``plan_matmul``: no n×m
        buffer on an online backend, whatever path the solve took."""
        self._check_operand("V", V, self.g.shape[0])
        with torch.no_grad():
            return self._kernel().plan_matmul(self.affinity, self.f, self.g, self.eps, V)

    def apply_t(self, U: Tensor) -> Tensor:
        """Pᵀ U for an (n, k) tensor U, streamed by the backend's ``plan_t_matmul``."""
        self._check_operand("U", U, self.f.shape[0])
        with torch.no_grad():
            return self._kernel().plan_t_matmul(self.affinity, self.f, self.g, self.eps, U)

    def _check_operand(self, name: str, t: Tensor, rows: int) -> None:
        check.check_matrix(name, t)
        if t.shape[0] != rows:
            raise ValueError(f"{name} must have shape ({rows}, k), got {tuple(t.shape)}")
        check.check_same_device(**{name: t, "the plan": self.f})
        check.check_finite(**{name: t})

    def _kernel(self) -> Backend:
        return load_backend(self.backend, self.precision)


def row_update(backend: Backend, K: Affinity, g: Tensor, eps: float, log_a: Tensor) -> Tensor:
    """f = ε log a − ε LSE_j[(K + g)/ε]: makes the row marginal exact."""
    return backend.row_update(K, g, eps, log_a)


def column_update(backend: Backend, K: Affinity, f: Tensor, eps: float, log_b: Tensor) -> Tensor:
    """g = ε log b − ε LSE_i[(K + f)/ε]: makes the column marginal exact."""
    return backend.column_update(K, f, eps, log_b)


def row_error(f: Tensor, f_next: Tensor, eps: float, log_a: Tensor) -> Tensor:
    """‖P1 − a‖₁ of the plan (f, g, ε), on device, read off the next row update f_next from g:
    the row sums of P are ``a_i · exp((f_i − f_next_i)/ε)``."""
    a = log_a.exp()
    return (a * torch.exp((f - f_next) / eps) - a).abs().sum()


def affinity_spread(K: Affinity) -> float:
    """An upper bound on max K − min K, the ε at which the plan is near the product of the
    marginals: from the stored K, or 2·max‖x_i‖·max‖y_j‖ for K = x yᵀ (Cauchy–Schwarz; 2
    for cosine), in O((n+m)·d)."""
    if K.is_dense:
        return float(K.dense.max() - K.dense.min())
    return 2.0 * float(K.x.norm(dim=1).max() * K.y.norm(dim=1).max())


def affinity_bound(K: Affinity) -> float:
    """An upper bound on max |K_ij|, computed in float64 so that it cannot overflow itself:
    from the stored K, or max‖x_i‖·max‖y_j‖ for K = x yᵀ (Cauchy–Schwarz)."""
    if K.is_dense:
        return float(K.dense.abs().max())
    return float(K.x.double().norm(dim=1).max()) * float(K.y.double().norm(dim=1).max())


def check_scale(K: Affinity, eps: float, name: str) -> None:
    """Refuse an affinity whose K/ε would overflow its dtype (see :func:`check_affinity_scale`)."""
    check.check_affinity_scale(name, affinity_bound(K), eps, K.dtype)


def eps_schedule(eps: float, n_iters: int, eps_scaling: float | None, eps_start: float | None) -> list[float]:
    """The ε of each iteration: ``max(ε, ε₀·factor^k)`` from ε₀ = ``eps_start``, then ε."""
    if eps_scaling is None or eps_start is None or eps_start <= eps:
        return [eps] * n_iters
    levels: list[float] = []
    level = eps_start
    while level > eps and len(levels) < n_iters:
        levels.append(level)
        level *= eps_scaling
    return levels + [eps] * (n_iters - len(levels))


def solve(
    backend: Backend,
    K: Affinity,
    eps: float,
    n_iters: int,
    log_a: Tensor,
    log_b: Tensor,
    *,
    tol: float | None = None,
    check_every: int = 10,
    symmetric: bool = True,
    g_init: Tensor | None = None,
    eps_scaling: float | None = None,
    eps_start: float | None = None,
    cuda_graph: bool = False,
) -> tuple[Tensor, Tensor, int]:
    """Run the Sinkhorn loop; returns ``(f, g, iterations done)``.

    With ``tol``, every ``check_every`` iterations the row-marginal error of the current
    (f, g) is read off the next row update for free (:func:`row_error`; columns are exact
    after each column update), computed on the device, and the host synchronises on it only
    there; the loop stops once it is below tol.

    ε-scaling (``eps_scaling`` = a factor in (0, 1)) anneals: iteration k runs at
    ε_k = max(ε, ε₀·factor^k), from ``eps_start`` = ε₀ (by default the spread of K, where the
    plan is close to a·bᵀ and one update nearly solves it) down to the target ε, then stays at
    ε. The potentials carry across levels (they are in the units of K, so a solution at ε_k
    is a warm start at ε_{k+1}); every iteration counts in ``n_iters``, and the tolerance
    is checked only at the target ε.

    ``cuda_graph`` captures ``check_every`` iterations at the target ε once into a CUDA graph
    (static buffers for f and g) and replays it; the result is the same as the eager loop.

    The symmetric step of the paper averages (f, g) with (f', g') where f' is the row update
    from g and g' the column update from f. Since g was itself just computed from f, g' = g,
    so only f moves: f ← (f + f') / 2.
    """
    g = torch.zeros_like(log_b) if g_init is None else g_init
    if eps_scaling is not None and eps_start is None:
        eps_start = affinity_spread(K)
    schedule = eps_schedule(eps, n_iters, eps_scaling, eps_start)
    if cuda_graph:
        # the annealing levels run eagerly (ε changes each time), then graphs at the target ε
        annealed = next((k for k, level in enumerate(schedule) if level == eps), n_iters)
        f, g, _, done = _eager_loop(
            backend, K, schedule[:annealed], log_a, log_b, None, check_every, None, g, 0, eps
        )
        f, g, f_next, done = _graphed_loop(
            backend, K, eps, n_iters, log_a, log_b, tol, check_every, f, g, done
        )
    else:
        f, g, f_next, done = _eager_loop(
            backend, K, schedule, log_a, log_b, tol, check_every, None, g, 0, eps
        )
    if symmetric:
        if f_next is None:
            f_next = row_update(backend, K, g, eps, log_a)
        f = 0.5 * (f + f_next)
    return f, g, done


def _eager_loop(backend, K, schedule, log_a, log_b, tol, check_every, f, g, start, eps):
    """Iterations ``start … len(schedule)−1``; returns (f, g, pending row update, done).

    ``f_next`` is returned when the loop stopped on the tolerance: the row update from the
    final g, which the symmetric step reuses."""
    for it in range(start, len(schedule)):
        level = schedule[it]
        f_next = row_update(backend, K, g, level, log_a)
        if (
            tol is not None
            and f is not None
            and it % check_every == 0
            and level == eps
            and float(row_error(f, f_next, eps, log_a)) < tol
        ):
            return f, g, f_next, it
        f = f_next
        g = column_update(backend, K, f, level, log_b)
    return f, g, None, len(schedule)


class _Graph:
    """A callable captured into a CUDA graph: ``replay()`` re-runs its kernels."""

    def __init__(self, body):
        # Warm-up on a side stream (lazy initialisation, Triton compilation, cuBLAS
        # workspaces) as CUDA graph capture requires; its work is real and counts.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            body()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            body()

    def replay(self) -> None:
        self.graph.replay()


def _graphed_loop(backend, K, eps, n_iters, log_a, log_b, tol, check_every, f, g, start):
    """The eager loop at the target ε, in chunks of ``check_every`` iterations replayed from
    one CUDA graph. Each chunk starts at a multiple of ``check_every`` (iterations up to the
    first one run eagerly), where the eager loop checks the tolerance: the check is computed
    inside the graph and read once per chunk, and when it passes, the state the chunk started
    from is returned. Iterations left over (fewer than a chunk) run eagerly too."""
    schedule = [eps] * n_iters
    aligned = min(n_iters, -(-start // check_every) * check_every)
    f, g, f_next, it = _eager_loop(
        backend, K, schedule[:aligned], log_a, log_b, tol, check_every, f, g, start, eps
    )
    chunks = (n_iters - it) // check_every
    if f_next is not None or chunks == 0:
        if f_next is not None:
            return f, g, f_next, it
        return _eager_loop(backend, K, schedule, log_a, log_b, tol, check_every, f, g, it, eps)
    # Static buffers: the graph reads f, g and writes the next f, g, plus, for the check,
    # the state it started from, the row update from it, and that state's row error.
    f_buf = torch.zeros_like(log_a) if f is None else f.clone()
    g_buf = g.clone()
    f_prev, g_prev, f_first = torch.empty_like(f_buf), torch.empty_like(g_buf), torch.empty_like(f_buf)
    error = torch.zeros((), dtype=log_a.dtype, device=log_a.device)

    def chunk():
        f_new = row_update(backend, K, g_buf, eps, log_a)
        if tol is not None:
            error.copy_(row_error(f_buf, f_new, eps, log_a))
            f_prev.copy_(f_buf)
            g_prev.copy_(g_buf)
            f_first.copy_(f_new)
        g_new = column_update(backend, K, f_new, eps, log_b)
        for _ in range(check_every - 1):
            f_new = row_update(backend, K, g_new, eps, log_a)
            g_new = column_update(backend, K, f_new, eps, log_b)
        f_buf.copy_(f_new)
        g_buf.copy_(g_new)

    graph = None
    for _ in range(chunks):
        if graph is None:
            graph = _capture(chunk)
        else:
            graph.replay()
        # no check before the very first iteration: there is no f yet
        if tol is not None and it > 0 and float(error) < tol:
            return f_prev, g_prev, f_first, it
        it += check_every
    return _eager_loop(backend, K, schedule, log_a, log_b, tol, check_every, f_buf, g_buf, it, eps)


def _capture(body) -> _Graph:
    return _Graph(body)


def marginal_error(
    backend: Backend, K: Affinity, f: Tensor, g: Tensor, eps: float, log_a: Tensor, log_b: Tensor
) -> float:
    """max(‖P1 − a‖₁, ‖Pᵀ1 − b‖₁), from one row and one column LSE pass."""
    rows = torch.exp(f / eps + backend.lse_rows(K, g, eps))
    cols = torch.exp(g / eps + backend.lse_cols(K, f, eps))
    return max(float((rows - log_a.exp()).abs().sum()), float((cols - log_b.exp()).abs().sum()))


def uniform_log_weights(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.full((size,), -math.log(size), dtype=dtype, device=device)


def _log_weights(a, b, n, m, dtype, device) -> tuple[Tensor, Tensor]:
    log_a = (
        uniform_log_weights(n, dtype, device)
        if a is None
        else check.check_weights("a", a, n, dtype, device).log()
    )
    log_b = (
        uniform_log_weights(m, dtype, device)
        if b is None
        else check.check_weights("b", b, m, dtype, device).log()
    )
    mass_a, mass_b = float(log_a.exp().sum()), float(log_b.exp().sum())
    if abs(mass_a - mass_b) > 1e-6 * max(mass_a, mass_b):
        raise ValueError(f"a and b must have the same total mass, got {mass_a:.8g} and {mass_b:.8g}")
    return log_a, log_b


def _warm_start(warm_start, m: int, dtype, device) -> tuple[Tensor | None, float | None]:
    """The g of a previous result or of an (f, g) pair (f is recomputed from it first), and
    the ε of that result when known (ε-scaling starts no higher than it)."""
    if warm_start is None:
        return None, None
    result = isinstance(warm_start, SinkhornResult)
    g = warm_start.g if result else warm_start[1]
    if not isinstance(g, Tensor) or g.shape != (m,):
        raise ValueError(f"warm_start must be a SinkhornResult or an (f, g) pair with g of shape ({m},)")
    if not bool(torch.isfinite(g).all()):
        raise ValueError("warm_start potentials contain NaN or Inf")
    return g.to(dtype=dtype, device=device), (warm_start.eps if result else None)


#: Marginal error, as a share of the total mass, above which a returned solve is flagged.
NOT_CONVERGED = 1e-2


def _warn_if_not_converged(
    error: float, mass: float, eps: float, K: Affinity, options: SolverOptions
) -> None:
    """One warning for a plan whose marginals are far from the target, naming the likely cause:
    an ε that the dtype cannot resolve (potentials carry ~ulp(|K|) of absolute error, and the
    plan sees it divided by ε), or an iteration budget too small for ε or its schedule."""
    if error <= NOT_CONVERGED * mass:
        return
    resolution = torch.finfo(K.dtype).eps * max(affinity_spread(K), 1.0)
    if eps < 100 * resolution:
        cause = (
            f"eps = {eps:g} is too small for {K.dtype}, which resolves the potentials only to about "
            f"{resolution:.1g}: use float64 or a larger eps"
        )
    else:
        schedule = f" with eps_scaling = {options.eps_scaling}" if options.eps_scaling is not None else ""
        cause = (
            f"n_iters = {options.n_iters}{schedule} is too few for eps = {eps:g}: raise n_iters "
            "(with tol to stop early)" + (" or lower eps_scaling" if schedule else "")
        )
    warnings.warn(
        f"sinkhorn did not converge: marginal error {error:.3g} of a mass {mass:.3g}; {cause}",
        RuntimeWarning,
        stacklevel=3,
    )


def _sinkhorn(
    K: Affinity, feature_dim: int | None, eps, options: SolverOptions, a, b, warm_start
) -> SinkhornResult:
    eps = check.check_positive("eps", eps)
    check.check_cuda_graph(options.cuda_graph, K.device)
    n, m = K.shape
    route = choose_route(
        options.backend,
        options.path,
        K.device,
        n,
        m,
        feature_dim,
        K.dtype,
        1,
        options.memory_budget,
        options.precision,
    )
    check_scale(K, eps, "K" if feature_dim is None else "x, y")
    log_a, log_b = _log_weights(a, b, n, m, K.dtype, K.device)
    g_init, warm_eps = _warm_start(warm_start, m, K.dtype, K.device)
    with torch.no_grad():
        route, (K_read,) = route.prepare(K)
        eps_start = None
        if options.eps_scaling is not None and warm_eps is not None:
            eps_start = min(affinity_spread(K_read), warm_eps)
        f, g, done = solve(
            route.backend,
            K_read,
            eps,
            options.n_iters,
            log_a,
            log_b,
            g_init=g_init,
            eps_start=eps_start,
            **options.loop(),
        )
        check.check_finite_result("sinkhorn", f"eps = {eps:g} in {K.dtype}", f=f, g=g)
        error = marginal_error(route.backend, K_read, f, g, eps, log_a, log_b)
    _warn_if_not_converged(error, float(log_a.exp().sum()), eps, K, options)
    return SinkhornResult(f, g, eps, done, error, route.name, route.path, K, route.precision, route)


def sinkhorn(
    x: Tensor,
    y: Tensor,
    eps: float = 0.05,
    n_iters: int = 100,
    tol: float | None = None,
    affinity: str = "cosine",
    backend: str = "auto",
    *,
    path: str = "auto",
    a: Tensor | None = None,
    b: Tensor | None = None,
    symmetric: bool = True,
    warm_start=None,
    check_every: int = 10,
    memory_budget: float | None = None,
    eps_scaling: float | None = None,
    cuda_graph: bool = False,
    precision: str = "auto",
) -> SinkhornResult:
    """Entropic OT plan between the rows of ``x`` (n×d) and of ``y`` (m×d).

    ``affinity="cosine"`` uses K = x̂ ŷᵀ with L2-normalised rows; ``"dot"`` uses K = x yᵀ.
    Potentials are not differentiable (use :func:`sotalign.klot` for gradients).

    The solver options are those of :class:`~sotalign.ot.options.SolverOptions`, validated
    there before any work.

    Args:
        eps: entropic regularisation ε > 0, in the units of K.
        n_iters: maximum number of alternating iterations (≥ 1), ε-scaling ones included.
        tol: stop early once the L1 marginal error is below ``tol`` (computed on the device
            every ``check_every`` iterations at no extra pass; the host waits only then).
        backend: ``"auto"``, ``"reference"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"keops"``.
        path: ``"auto"``, ``"dense"`` (K stored once) or ``"online"`` (K recomputed).
        a, b: positive marginal weights of equal mass (default uniform, mass one).
        symmetric: apply the paper's final averaged half-step.
        warm_start: a previous :class:`SinkhornResult` or ``(f, g)`` to start from.
        memory_budget: bytes that ``path="auto"`` may spend on a stored K (default: half
            of the free CUDA memory on CUDA, 1 GiB on CPU; see :mod:`sotalign.ot.dispatch`).
        eps_scaling: a factor in (0, 1): anneal ε from the spread of K (or from the ε of a
            warm-start result, if lower) by this factor per iteration down to ``eps``.
        cuda_graph: replay ``check_every`` iterations at a time from one captured CUDA graph
            (CUDA tensors only; same result as the eager loop, less launch overhead).
        precision: dot-product precision: ``"auto"`` (fp32 accuracy: the fp32-accurate
            tensor-core flag on the online CUDA path, else ``"fp32"``), ``"fp32"``, or on
            ``triton`` only ``"tf32x3"``/``"fp16x3"`` (fp32-accurate) and ``"tf32"``/``"fp16"``
            (errors in benchmarks/results/*-precision.md). ``result.route`` says what ran.
    """
    check.check_matrices(x=x, y=y)
    check.check_affinity(affinity)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature dimension, got {x.shape[1]} and {y.shape[1]}")
    dtype = check.compute_dtype(x, y)
    x, y = x.detach().to(dtype), y.detach().to(dtype)
    if affinity == "cosine":
        x, y = check.unit_rows(x), check.unit_rows(y)
    options = SolverOptions(
        n_iters=n_iters,
        tol=tol,
        check_every=check_every,
        symmetric=symmetric,
        eps_scaling=eps_scaling,
        cuda_graph=cuda_graph,
        backend=backend,
        path=path,
        precision=precision,
        memory_budget=memory_budget,
    )
    return _sinkhorn(Affinity.from_features(x, y), x.shape[1], eps, options, a, b, warm_start)


def sinkhorn_dense(
    K: Tensor,
    eps: float = 0.05,
    n_iters: int = 100,
    tol: float | None = None,
    backend: str = "auto",
    *,
    a: Tensor | None = None,
    b: Tensor | None = None,
    symmetric: bool = True,
    warm_start=None,
    check_every: int = 10,
    eps_scaling: float | None = None,
    cuda_graph: bool = False,
    precision: str = "auto",
) -> SinkhornResult:
    """Entropic OT plan for a given n×m affinity ``K`` (cost −K); see :func:`sinkhorn`."""
    check.check_matrices(K=K)
    K = K.detach().to(check.compute_dtype(K))
    options = SolverOptions(
        n_iters=n_iters,
        tol=tol,
        check_every=check_every,
        symmetric=symmetric,
        eps_scaling=eps_scaling,
        cuda_graph=cuda_graph,
        backend=backend,
        precision=precision,
    )
    return _sinkhorn(Affinity.from_dense(K), None, eps, options, a, b, warm_start)
