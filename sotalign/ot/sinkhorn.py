r"""Entropic optimal transport in the log domain: the one Sinkhorn loop, and ``sinkhorn``.

For a cost C (:mod:`sotalign.ot.problem`: squared Euclidean, cosine or dot), weights a, b and
ε > 0, ``sinkhorn`` solves

    OT_ε(a, b) = min_P ⟨P, C⟩ + ε KL(P ‖ a⊗b) + ρ_a KL(P1 ‖ a) + ρ_b KL(Pᵀ1 ‖ b)

(ρ = ``reg_m``; None: both marginals exact). Sinkhorn alternates the two half-steps, each
making one marginal exact (or, relaxed, its τ-scaled version, τ = ρ/(ρ + ε)):

    f_i = τ_a ε (log a_i − LSE_j [(K_ij + g_j) / ε]),      g_j = τ_b ε (log b_j − LSE_i [(K_ij + f_i) / ε]),

log P_ij = (f_i + g_j + K_ij) / ε, K the affinity the kernels read. Defaults follow the SOTAlign
paper and its authors' code: 100 iterations from g = 0, then one *symmetric* step that averages
the potentials with one more update of each, so both marginals are approximately (not
exactly) satisfied.

:func:`solve` is the only loop: ``sinkhorn``, ``klot``, ``sinkhorn_divergence`` and the
distributed solver all run it, on any :class:`~sotalign.ot.problem.Problem` (any operator
with ``lse_rows``/``lse_cols``), eagerly or replayed from CUDA graphs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import Affinity, Backend, load_backend
from . import problem as ot_problem
from . import validation
from .dispatch import Route, choose_route
from .options import DEFAULT_EPS, SolverOptions
from .problem import Marginal, Problem


@dataclass(frozen=True)
class SinkhornResult:
    """An entropic OT plan, by its potentials: ``log P_ij = (f_i + g_j + K_ij) / eps`` with K the
    affinity −C + c₀ of the cost (cos for "cosine", x·y for "dot", −‖x_i − y_j‖² for
    "sqeuclidean"). A batch of B problems has a leading batch dimension on f, g and value."""

    f: Tensor
    g: Tensor
    eps: float
    n_iters: int
    #: max(‖P1 − a‖₁, ‖Pᵀ1 − b‖₁) of the returned potentials (worst problem of a batch); for a
    #: relaxed marginal, the distance to the marginal its update makes exact.
    marginal_error: float
    #: OT_ε(a, b) read off the potentials (per problem): the primal objective at the optimum.
    value: Tensor
    route: Route
    #: The affinity the kernels read and their potentials (f − u, g − v: :mod:`sotalign.ot.problem`).
    affinity: Affinity
    kernel_f: Tensor
    kernel_g: Tensor

    @property
    def backend(self) -> str:
        return self.route.name

    @property
    def path(self) -> str:
        return self.route.path

    @property
    def precision(self) -> str:
        """Dot-product precision of the backend (``apply`` and ``apply_t`` reuse it)."""
        return self.route.precision

    def plan(self) -> Tensor:
        """The dense n×m plan P ((B, n, m) for a batch; allocates it: small problems, tests)."""
        K = self.affinity.materialize().dense
        return ((self.kernel_f[..., :, None] + self.kernel_g[..., None, :] + K) / self.eps).exp()

    def apply(self, V: Tensor) -> Tensor:
        """P V for an (m, k) tensor V ((B, m, k) for a batch), streamed by the backend's
        ``plan_matmul``: no n×m buffer on an online backend, whatever path the solve took."""
        self._check_operand("V", V, self.kernel_g)
        with torch.no_grad():
            return self._kernel().plan_matmul(self.affinity, self.kernel_f, self.kernel_g, self.eps, V)

    def apply_t(self, U: Tensor) -> Tensor:
        """Pᵀ U for an (n, k) tensor U ((B, n, k) for a batch), streamed by ``plan_t_matmul``."""
        self._check_operand("U", U, self.kernel_f)
        with torch.no_grad():
            return self._kernel().plan_t_matmul(self.affinity, self.kernel_f, self.kernel_g, self.eps, U)

    def _check_operand(self, name: str, t: Tensor, potential: Tensor) -> None:
        validation.check_features(name, t, batched=potential.dim() == 2)
        if t.shape[:-1] != potential.shape:
            expected = ", ".join(map(str, potential.shape))
            raise ValueError(f"{name} must have shape ({expected}, k), got {tuple(t.shape)}")
        validation.check_same_device(**{name: t, "the plan": potential})
        validation.check_finite(**{name: t})

    def _kernel(self) -> Backend:
        return load_backend(self.backend, self.precision)


# ---------------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Solution:
    """What :func:`solve` returns: the potentials, the iterations done, and the row error of the
    state before the symmetric step (per problem, free: read off the update the step makes)."""

    f: Tensor
    g: Tensor
    done: int
    row_error: Tensor


@dataclass
class LoopState:
    """Where the loop stands: the potentials, and the iterations done. ``f`` is None before
    the first row update; ``f_next`` is the row update from ``g`` when the loop stopped on
    the tolerance (the symmetric step reuses it); ``row_error`` is the last one measured."""

    f: Tensor | None
    g: Tensor
    done: int = 0
    f_next: Tensor | None = None
    row_error: Tensor | None = None


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


def use_cuda_graph(options: SolverOptions, device: torch.device) -> bool:
    """``cuda_graph=None`` (the default) means: on CUDA, when at least two chunks of
    ``check_every`` iterations can be replayed (launch overhead dominates the small solves of
    training; a capture costs about one chunk)."""
    if options.cuda_graph is not None:
        return options.cuda_graph
    return device.type == "cuda" and options.n_iters >= 2 * options.check_every


def solve(
    problem: Problem,
    eps: float,
    options: SolverOptions,
    *,
    g_init: Tensor | None = None,
    eps_start: float | None = None,
    spread: float | None = None,
) -> Solution:
    """Run the Sinkhorn loop on ``problem``.

    With ``options.tol``, every ``check_every`` iterations the row-marginal error of the
    current (f, g) is read off the next row update for free (:meth:`Problem.row_error`;
    columns are exact after each column update), computed on the device; the host
    synchronises only there, and the loop stops once every problem is below tol.

    ε-scaling (``eps_scaling`` in (0, 1)) anneals: iteration k runs at ε_k = max(ε, ε₀·factor^k),
    from ``eps_start`` = ε₀ (by default ``spread``, an upper bound on max K − min K where the
    plan is close to a·bᵀ, computed from K when not given) down to ε, then stays there. The
    potentials carry across levels; every iteration counts in ``n_iters``; the tolerance is
    checked only at the target ε.

    With CUDA graphs (:func:`use_cuda_graph`) the iterations at the target ε run in chunks of
    ``check_every`` replayed from one captured graph, with the same result as the eager loop.

    The symmetric step of the paper averages (f, g) with (f', g') where f' is the row update
    from g and g' the column update from f. Since g was itself just computed from f, g' = g,
    so only f moves: f ← (f + f') / 2.
    """
    with problem.backend.solving(problem.K):  # a backend's state for this solve (cpu: exp K)
        if g_init is None:  # zero, and −inf where a column has no weight (padding)
            g_init = torch.where(problem.cols.weights > 0, 0.0, -torch.inf).to(problem.cols.weights.dtype)
        state = LoopState(f=None, g=g_init)
        if options.eps_scaling is not None and eps_start is None:
            eps_start = affinity_spread(problem.K) if spread is None else spread
        schedule = eps_schedule(eps, options.n_iters, options.eps_scaling, eps_start)
        annealed = next((k for k, level in enumerate(schedule) if level == eps), options.n_iters)
        for level in schedule[:annealed]:
            _iterate(problem, state, level)
        if use_cuda_graph(options, state.g.device):
            _run_graphed(problem, state, eps, options)
        else:
            _run(problem, state, eps, options, options.n_iters)
        assert state.f is not None  # n_iters ≥ 1, and the loop stops only after an update
        f = state.f
        f_next = state.f_next if state.f_next is not None else problem.row_update(state.g, eps)
        row_error = problem.row_error(f, f_next, eps)
        if options.symmetric:
            f = 0.5 * (f + f_next)
        return Solution(f, state.g, state.done, row_error)


def _iterate(problem: Problem, state: LoopState, eps: float, f_next: Tensor | None = None) -> None:
    """One iteration: the row update (unless given), then the column update."""
    state.f = problem.row_update(state.g, eps) if f_next is None else f_next
    state.g = problem.column_update(state.f, eps)
    state.done += 1


def _run(problem: Problem, state: LoopState, eps: float, options: SolverOptions, until: int) -> None:
    """Eager iterations at the target ε until ``until`` are done or the tolerance is met."""
    tol = options.tol
    while state.done < until:
        f_next = problem.row_update(state.g, eps)
        if tol is not None and state.f is not None and state.done % options.check_every == 0:
            state.row_error = problem.row_error(state.f, f_next, eps)
            if float(state.row_error.max()) < tol:
                state.f_next = f_next
                return
        _iterate(problem, state, eps, f_next)


def _run_graphed(problem: Problem, state: LoopState, eps: float, options: SolverOptions) -> None:
    """The loop at the target ε in chunks of ``check_every`` iterations replayed from one CUDA
    graph. Chunks start where the eager loop checks the tolerance (multiples of
    ``check_every``; iterations before the first run eagerly): the check runs inside the
    graph, is read once per chunk, and when it passes, the state the chunk started from is
    restored. Iterations left over (fewer than a chunk) run eagerly too."""
    every, n_iters = options.check_every, options.n_iters
    _run(problem, state, eps, options, min(n_iters, -(-state.done // every) * every))
    chunks = (n_iters - state.done) // every
    if state.f_next is not None or chunks == 0:
        if state.f_next is None:
            _run(problem, state, eps, options, n_iters)
        return
    # Static buffers: the graph reads f, g and writes them back, and keeps for the check the
    # state a chunk started from, the row update from it, and that state's row error.
    f = torch.zeros_like(problem.rows.weights) if state.f is None else state.f.clone()
    g = state.g.clone()
    f_start, g_start, f_first = torch.empty_like(f), torch.empty_like(g), torch.empty_like(f)
    error = torch.zeros_like(problem.row_error(f, f, eps))
    tol = options.tol

    def chunk() -> None:
        f_next = problem.row_update(g, eps)
        if tol is not None:
            error.copy_(problem.row_error(f, f_next, eps))
            f_start.copy_(f)
            g_start.copy_(g)
            f_first.copy_(f_next)
        running = LoopState(f=f, g=g)
        _iterate(problem, running, eps, f_next)
        for _ in range(every - 1):
            _iterate(problem, running, eps)
        f.copy_(running.f)  # type: ignore[arg-type]  # set by _iterate
        g.copy_(running.g)

    graph = None
    for _ in range(chunks):
        if graph is None:
            try:
                graph = _capture(chunk)
            except RuntimeError as failure:  # e.g. a backend that synchronises: capture is illegal
                warnings.warn(
                    f"sinkhorn: capturing the loop into a CUDA graph failed ({str(failure)[:200]}); "
                    "running it eagerly (pass cuda_graph=False to skip the attempt)",
                    RuntimeWarning,
                    stacklevel=4,
                )
                _run(problem, state, eps, options, n_iters)  # state is still the chunk's start
                return
        else:
            graph.replay()
        # no check before the very first iteration: there is no f yet
        if tol is not None and state.done > 0 and float(error.max()) < tol:
            state.f, state.g, state.f_next, state.row_error = f_start, g_start, f_first, error
            return
        state.done += every
    state.f, state.g = f, g
    _run(problem, state, eps, options, n_iters)


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


def _capture(body) -> _Graph:
    return _Graph(body)


# ------------------------------------------------------------------------- scale and checks


def affinity_spread(K: Affinity) -> float:
    """An upper bound on max K − min K, the ε at which the plan is near the product of the
    marginals: from the stored K, or 2·max‖x_i‖·max‖y_j‖ for K = x yᵀ (Cauchy–Schwarz; 2
    for cosine), in O((n+m)·d)."""
    if K.is_dense:
        return float(K.dense.max() - K.dense.min())
    return 2.0 * float(K.x.norm(dim=-1).max() * K.y.norm(dim=-1).max())


def affinity_bound(K: Affinity) -> float:
    """An upper bound on max |K_ij|, computed in float64 so that it cannot overflow itself:
    from the stored K, or max‖x_i‖·max‖y_j‖ for K = x yᵀ (Cauchy–Schwarz)."""
    if K.is_dense:
        return float(K.dense.abs().max())
    return float(K.x.double().norm(dim=-1).max()) * float(K.y.double().norm(dim=-1).max())


def check_scale(K: Affinity, eps: float, name: str) -> None:
    """Refuse an affinity whose K/ε would overflow its dtype (see :func:`check_affinity_scale`)."""
    validation.check_affinity_scale(name, affinity_bound(K), eps, K.dtype)


#: Marginal error, as a share of the total mass, above which a returned solve is flagged.
NOT_CONVERGED = 1e-2


def convergence_warning(
    what: str, error: float, mass: float, eps: float, K: Affinity, options: SolverOptions
) -> str | None:
    """The warning for a plan whose marginals are far from the target (None when it is fine),
    naming the likely cause: an ε that the dtype cannot resolve (potentials carry
    ~ulp(|K|) of absolute error, and the plan sees it divided by ε), or an iteration budget
    too small for ε or its schedule."""
    if not error > NOT_CONVERGED * mass:  # NaN is not converged either
        return None
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
    return f"{what} did not converge: marginal error {error:.3g} of a mass {mass:.3g}; {cause}"


# -------------------------------------------------------------------------------- the front


def _warm_start(warm_start, shape: tuple[int, ...], dtype, device) -> tuple[Tensor | None, float | None]:
    """The g of a previous result or of an (f, g) pair (f is recomputed from it first), in the
    units of the affinity (as results report it), and the ε of that result when known
    (ε-scaling starts no higher than it). −inf marks columns of weight zero."""
    if warm_start is None:
        return None, None
    result = isinstance(warm_start, SinkhornResult)
    g = warm_start.g if result else warm_start[1]
    if not isinstance(g, Tensor) or tuple(g.shape) != shape:
        raise ValueError(
            f"warm_start must be a SinkhornResult or an (f, g) pair with g of shape {shape}, "
            f"got {tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}"
        )
    if bool(torch.isnan(g).any()) or bool((g == torch.inf).any()):
        raise ValueError("warm_start potentials contain NaN or +Inf")
    return g.to(dtype=dtype, device=device), (warm_start.eps if result else None)


def _solve_problem(
    route: Route,
    K: Affinity,
    rows: Marginal,
    cols: Marginal,
    eps: float,
    options: SolverOptions,
    affinity_constant: float = 0.0,
    warm_start=None,
    problem_type: type[Problem] = Problem,
) -> SinkhornResult:
    """One solve on a chosen route, with its value, its error and its warning."""
    g_warm, warm_eps = _warm_start(warm_start, tuple(cols.weights.shape), K.dtype, K.device)
    half = affinity_constant / 2
    # the loop's potentials are the kernels': the cost's column bias is folded out of them
    g_init = None if g_warm is None else g_warm - (cols.offset - half)
    with torch.no_grad():
        route, (K_read,) = route.prepare(K)
        problem = problem_type(route.backend, K_read, rows, cols)
        spread = affinity_spread(K_read) if options.eps_scaling is not None else None
        eps_start = None if warm_eps is None or spread is None else min(spread, warm_eps)
        state = solve(problem, eps, options, g_init=g_init, eps_start=eps_start, spread=spread)
        f, g = state.f, state.g
        validation.check_finite_result(
            "sinkhorn", f"eps = {eps:g} in {K.dtype}", f=f[f > -torch.inf], g=g[g > -torch.inf]
        )
        errors, plan_mass = problem.marginal_error(f, g, eps)
        value = problem.dual_value(f, g, eps, plan_mass)
    error = float(errors.max())
    message = convergence_warning("sinkhorn", error, float(plan_mass.max()), eps, K, options)
    if message is not None:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    return SinkhornResult(
        f=f + (rows.offset - half),
        g=g + (cols.offset - half),
        eps=eps,
        n_iters=state.done,
        marginal_error=error,
        value=value,
        route=route,
        affinity=K,
        kernel_f=f,
        kernel_g=g,
    )


def sinkhorn(
    x: Tensor,
    y: Tensor,
    eps: float = DEFAULT_EPS,
    *,
    cost: str | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    reg_m=None,
    warm_start=None,
    options: SolverOptions | None = None,
    affinity: str | None = None,
    **solver_options,
) -> SinkhornResult:
    """Entropic OT plan between the rows of ``x`` (n×d) and of ``y`` (m×d), or between the
    rows of each of B pairs of point clouds x (B, n, d), y (B, m, d) in one solve.

    Potentials are not differentiable (:func:`sotalign.sinkhorn_divergence` and
    :func:`sotalign.klot` are the differentiable losses).

    Args:
        eps: entropic regularisation ε > 0, in the units of the cost.
        cost: ``"cosine"`` (default; C = 1 − cos), ``"sqeuclidean"`` (C = ‖x − y‖², POT's
            convention, no ½) or ``"dot"`` (C = −xᵀy). ``affinity=`` is its deprecated alias.
        a, b: non-negative weights ((n,), (m,), or (B, n), (B, m) for a batch; default
            uniform). Balanced problems normalise each to mass one. A weight of zero gives its
            row or column zero plan mass (and a potential of −inf): zeros pad a batch of
            problems of unequal sizes.
        reg_m: None (balanced), ρ, or (ρ_a, ρ_b): the KL penalty on each marginal (POT's
            name); ``float("inf")`` keeps that marginal exact (semi-relaxed).
        warm_start: a previous :class:`SinkhornResult` or ``(f, g)`` to start from.
        options / solver_options: the :class:`~sotalign.ot.options.SolverOptions`, as one object
            or as keywords (``n_iters``, ``tol``, ``check_every``, ``symmetric``,
            ``eps_scaling``, ``cuda_graph``, ``backend``, ``path``, ``precision``,
            ``memory_budget``); each is documented there.
    """
    cost = _cost(cost, affinity)
    options = SolverOptions.resolve(options, **solver_options)
    validation.check_point_clouds(x=x, y=y)
    dtype = validation.compute_dtype(x, y)
    x, y = ot_problem.cost_features(cost, x.detach().to(dtype), y.detach().to(dtype))
    eps = validation.check_positive("eps", eps)
    rows, cols = marginals(*ot_problem.offsets(cost, x, y), a, b, reg_m)
    K = ot_problem.work_affinity(cost, x, y)
    route = _features_route(K, x.shape[-1], options)
    check_scale(K, eps, "x, y")
    validation.check_cuda_graph(options.cuda_graph, K.device)
    return _solve_problem(route, K, rows, cols, eps, options, ot_problem.AFFINITY_CONSTANT[cost], warm_start)


def _cost(cost: str | None, affinity: str | None) -> str:
    """``cost``, or the deprecated ``affinity`` spelling of it (one release)."""
    if affinity is not None:
        if cost is not None:
            raise TypeError("give cost= only (affinity= is its deprecated alias)")
        warnings.warn("affinity= is deprecated; use cost= (same values)", DeprecationWarning, stacklevel=3)
        cost = affinity
    return ot_problem.check_cost("cosine" if cost is None else cost)


def marginals(u: Tensor, v: Tensor, a, b, reg_m) -> tuple[Marginal, Marginal]:
    """The two :class:`Marginal` of a problem whose row and column offsets are u, v (their
    shapes are those of the weights: (n,), (m,), or with the batch dimension first)."""
    reach_a, reach_b = ot_problem.check_reg_m(reg_m)
    balanced = reach_a == reach_b == float("inf")
    weights_a = ot_problem.normalised_weights("a", a, tuple(u.shape), balanced, u)
    weights_b = ot_problem.normalised_weights("b", b, tuple(v.shape), balanced, v)
    return Marginal(weights_a, reach_a, u), Marginal(weights_b, reach_b, v)


def _features_route(K: Affinity, feature_dim: int, options: SolverOptions) -> Route:
    """The route of one solve on features (the rows of every problem of a batch count)."""
    n, m = K.shape
    return choose_route(
        options.backend,
        options.path,
        K.device,
        n * (K.batch or 1),
        m,
        feature_dim,
        K.dtype,
        1,
        options.memory_budget,
        options.precision,
    )


def sinkhorn_dense(
    K: Tensor,
    eps: float = DEFAULT_EPS,
    *,
    a: Tensor | None = None,
    b: Tensor | None = None,
    reg_m=None,
    warm_start=None,
    options: SolverOptions | None = None,
    **solver_options,
) -> SinkhornResult:
    """Entropic OT plan for a given affinity ``K`` (n×m, or (B, n, m) for a batch; cost −K);
    see :func:`sinkhorn` for the other arguments."""
    options = SolverOptions.resolve(options, **solver_options)
    validation.check_point_clouds(K=K)
    K = K.detach().to(validation.compute_dtype(K))
    eps = validation.check_positive("eps", eps)
    rows, cols = marginals(K.new_zeros(K.shape[:-1]), K.new_zeros((*K.shape[:-2], K.shape[-1])), a, b, reg_m)
    n, m = K.shape[-2:]
    route = choose_route(
        options.backend,
        options.path,
        K.device,
        n,
        m,
        None,
        K.dtype,
        1,
        options.memory_budget,
        options.precision,
    )
    affinity = Affinity.from_dense(K)
    check_scale(affinity, eps, "K")
    validation.check_cuda_graph(options.cuda_graph, K.device)
    return _solve_problem(route, affinity, rows, cols, eps, options, warm_start=warm_start)
