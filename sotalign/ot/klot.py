r"""KLOT, the unpaired loss of SOTAlign (paper Eq. 12), with its exact gradient.

For a student affinity K (ε, default 0.05) and a teacher affinity K* (ε*, default 0.01),

    KLOT(K ‖ K*) = KL(P* ‖ P),     P = OT_ε(K),  P* = OT_ε*(K*),

    ∂KLOT / ∂K = (P − P*) / ε      (Theorem 5.1 / C.4: no backpropagation through Sinkhorn).

Forward runs both Sinkhorn solves without autograd, then one streaming pass for the value
``Σ P*_ij (log P*_ij − log P_ij)``. Backward, for K = x̂ ŷᵀ, forms G = (P − P*)/ε tile by tile
and returns ``G ŷ`` and ``Gᵀ x̂`` scaled by the incoming gradient; the chain rule through the
cosine normalisation is left to autograd. Only features and potentials are saved, so on an
online path nothing n×m exists between forward and backward. The teacher is a constant.

Every cost of :mod:`sotalign.ot.problem` works: K = −C up to a constant and row and column
biases, none of which changes a plan. For the squared-Euclidean cost the solves read
K_work = (2x)yᵀ and the biases fold into the potentials; the backward needs the row and column
sums of G too (∂K_ij/∂x_i = 2(y_j − x_i)), which the same streaming pass returns when a ones
column is appended to the features that G multiplies (and a zeros column to the other side,
so that K does not change).

Weights ``a``, ``b`` (zeros allowed) are the marginals of both plans.

Both passes are ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` traces a
model that uses KLOT without graph breaks: ``sotalign::klot_features`` returns the value, the
four potentials (f, g, f*, g*) and the two plans' marginal errors, and
``sotalign::klot_features_backward`` returns ``grad_output · (∂/∂x, ∂/∂y)``;
``sotalign::klot_dense`` / ``klot_dense_backward`` do the same for given affinities (gradient
``grad_output · G``). The :class:`SolverOptions` cross the op boundary as one string
(:meth:`SolverOptions.encode`); the backend and path are chosen inside the ops (the backward
chooses the backend again from the same arguments), and the input values are checked for
NaN/Inf there too, so the Python front reads no tensor value.

**Convergence.** Each forward measures both plans' row-marginal error for free (from the
update the symmetric step makes anyway) and warns, like ``sinkhorn``, when one is above
``NOT_CONVERGED`` of the mass, naming the plan and the likely cause. On CUDA the error is
copied to the host without waiting, and looked at by the next call once it has arrived, so a
training step never waits for it. :func:`klot_marginal_errors` returns the last forward's
errors (a device tensor) for a trainer to log at its own cadence.
"""

import math
import threading
import warnings

import torch
from torch import Tensor, nn

from ..kernels import Affinity
from ..kernels.base import fp32_matmul
from . import problem as ot_problem
from . import validation
from .dispatch import Route, choose_route, record_route, recorded_route
from .options import DEFAULT_EPS, DEFAULT_EPS_TEACHER, SolverOptions
from .problem import Marginal, Problem
from .sinkhorn import NOT_CONVERGED, _cost, check_scale, convergence_warning, solve


def _marginals(cost: str, x: Tensor, y: Tensor, a: Tensor, b: Tensor) -> tuple[Marginal, Marginal]:
    u, v = ot_problem.offsets(cost, x, y)
    return Marginal(a, math.inf, u), Marginal(b, math.inf, v)


def _solve_both(route: Route, student: Problem, teacher: Problem, eps, eps_teacher, options: SolverOptions):
    """Student and teacher potentials (f, g, f*, g*) on this route, and their row errors."""
    s = solve(student, eps, options)
    t = solve(teacher, eps_teacher, options)
    errors = torch.stack([s.row_error, t.row_error]) / student.rows.weights.sum()
    return s.f, s.g, t.f, t.g, errors


def _route(K: Tensor, feature_dim: int | None, n_columns: int, options: SolverOptions) -> Route:
    """The route of both solves: ``K`` is the student's stored affinity or its row features.
    On the dense path of features three n×m matrices are stored: K and K* (forward) and G
    (backward)."""
    return choose_route(
        options.backend,
        options.path,
        K.device,
        K.shape[0],
        n_columns,
        feature_dim,
        K.dtype,
        2 if feature_dim is None else 3,
        options.memory_budget,
        options.precision,
    )


def _features_route(x: Tensor, y: Tensor, x_teacher: Tensor, options: SolverOptions) -> Route:
    return _route(x, min(x.shape[1], x_teacher.shape[1]), y.shape[0], options)


def _stored_feature_grads(backend, K: Affinity, f, g, eps, K_teacher: Affinity, f_t, g_t, eps_t):
    """(G y, Gᵀ x) on the dense path: K and K* stored once, G = (P − P*)/ε in one pass
    reading both, then two matrix products (cuBLAS on CUDA, at fp32 accuracy)."""
    K_stored, K_teacher_stored = K.materialize(), K_teacher.materialize()
    G = backend.klot_grad_dense(K_stored, f, g, eps, K_teacher_stored, f_t, g_t, eps_t)
    del K_stored, K_teacher_stored
    return fp32_matmul(G, K.y), fp32_matmul(G.T, K.x)


def gradient_features(cost: str, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Features of the student's K_work whose products with G give what the cost's chain rule
    needs: (G y, Gᵀ x), and for "sqeuclidean" also G1 and Gᵀ1 (see the module docstring)."""
    if cost != "sqeuclidean":
        return x, y
    zeros_x, ones_x = x.new_zeros(x.shape[0], 1), x.new_ones(x.shape[0], 1)
    zeros_y, ones_y = y.new_zeros(y.shape[0], 1), y.new_ones(y.shape[0], 1)
    return torch.cat([2 * x, zeros_x, ones_x], dim=1), torch.cat([y, ones_y, zeros_y], dim=1)


def feature_gradients(cost: str, x: Tensor, y: Tensor, G_y: Tensor, G_t_x: Tensor) -> tuple[Tensor, Tensor]:
    """∂L/∂x, ∂L/∂y from the products of G with :func:`gradient_features`."""
    if cost != "sqeuclidean":
        return G_y, G_t_x
    d = x.shape[1]
    row_sums, col_sums = G_y[:, d : d + 1], G_t_x[:, d + 1 : d + 2]
    return 2 * (G_y[:, :d] - x * row_sums), G_t_x[:, :d] - 2 * y * col_sums


@torch.library.custom_op("sotalign::klot_features", mutates_args=())
def klot_features_op(
    x: Tensor,
    y: Tensor,
    x_teacher: Tensor,
    y_teacher: Tensor,
    a: Tensor,
    b: Tensor,
    eps: float,
    eps_teacher: float,
    cost: str,
    options: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(KLOT, f, g, f*, g*, marginal errors) for the cost features x, y (student) and
    x*, y* (teacher), marginals a, b."""
    solver = SolverOptions.decode(options)
    validation.check_finite(x=x, y=y, x_teacher=x_teacher, y_teacher=y_teacher)
    K = ot_problem.work_affinity(cost, x, y)
    K_teacher = ot_problem.work_affinity(cost, x_teacher, y_teacher)
    check_scale(K, eps, "x, y")
    check_scale(K_teacher, eps_teacher, "x_teacher, y_teacher")
    route, (K, K_teacher) = _features_route(x, y, x_teacher, solver).prepare(K, K_teacher)
    record_route(route)
    student = Problem(route.backend, K, *_marginals(cost, x, y, a, b))
    teacher = Problem(route.backend, K_teacher, *_marginals(cost, x_teacher, y_teacher, a, b))
    f, g, f_t, g_t, errors = _solve_both(route, student, teacher, eps, eps_teacher, solver)
    value = route.backend.klot_value(K, f, g, eps, K_teacher, f_t, g_t, eps_teacher)
    _check_value(value, f=f, g=g, f_teacher=f_t, g_teacher=g_t)
    watch_convergence(errors, (eps, eps_teacher), (K, K_teacher), solver)
    return value, f, g, f_t, g_t, errors


def _check_value(value: Tensor, **potentials: Tensor) -> None:
    finite = {name: t[t > -torch.inf] for name, t in potentials.items()}  # −inf: zero weights
    validation.check_finite_result("klot", "eps too small for the dtype?", **finite, value=value)


@klot_features_op.register_fake
def _(x, y, x_teacher, y_teacher, a, b, *scalars):
    n, m = x.shape[0], y.shape[0]
    return x.new_empty(()), x.new_empty(n), x.new_empty(m), x.new_empty(n), x.new_empty(m), x.new_empty(2)


@torch.library.custom_op("sotalign::klot_features_backward", mutates_args=())
def klot_features_backward_op(
    grad_output: Tensor,
    x: Tensor,
    y: Tensor,
    x_teacher: Tensor,
    y_teacher: Tensor,
    f: Tensor,
    g: Tensor,
    f_teacher: Tensor,
    g_teacher: Tensor,
    eps: float,
    eps_teacher: float,
    cost: str,
    options: str,
) -> tuple[Tensor, Tensor]:
    """grad_output · (∂KLOT/∂x, ∂KLOT/∂y) from G = (P − P*)/ε: from stored K, K* and G on the
    dense path (online if they do not fit after all), streamed otherwise (never n×m)."""
    route = _features_route(x, y, x_teacher, SolverOptions.decode(options))
    K = Affinity.from_features(*gradient_features(cost, x, y))
    K_teacher = ot_problem.work_affinity(cost, x_teacher, y_teacher)
    args = (f, g, eps, K_teacher, f_teacher, g_teacher, eps_teacher)
    if route.dense:
        try:
            grads = _stored_feature_grads(route.backend, K, *args)
            return tuple(grad_output * t for t in feature_gradients(cost, x, y, *grads))  # type: ignore[return-value]
        except torch.cuda.OutOfMemoryError as error:
            if route.fallback is None:
                raise
            route = route.fell_back(error)
    grads = route.backend.klot_grad_features(K, *args)
    return tuple(grad_output * t for t in feature_gradients(cost, x, y, *grads))  # type: ignore[return-value]


@klot_features_backward_op.register_fake
def _(grad_output, x, y, *rest):
    return torch.empty_like(x), torch.empty_like(y)


def _features_setup(ctx, inputs, output):
    x, y, x_teacher, y_teacher, a, b, eps, eps_teacher, cost, options = inputs
    ctx.save_for_backward(x, y, x_teacher, y_teacher, *output[1:5])
    ctx.scalars = (eps, eps_teacher, cost, options)


def _features_backward(ctx, grad_value, *unused):
    grad_x, grad_y = klot_features_backward_op(grad_value, *ctx.saved_tensors, *ctx.scalars)
    return grad_x, grad_y, None, None, None, None, None, None, None, None


klot_features_op.register_autograd(_features_backward, setup_context=_features_setup)


def no_double_backward(ctx, *grads):
    raise RuntimeError(
        "sotalign's OT losses have no second derivative: their gradients come from the Sinkhorn "
        "solution, which is not differentiated (double backward, e.g. a gradient penalty, is not supported)"
    )


def nothing_to_save(ctx, inputs, output) -> None:
    pass


klot_features_backward_op.register_autograd(no_double_backward, setup_context=nothing_to_save)


@torch.library.custom_op("sotalign::klot_dense", mutates_args=())
def klot_dense_op(
    K: Tensor, K_teacher: Tensor, a: Tensor, b: Tensor, eps: float, eps_teacher: float, options: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(KLOT, f, g, f*, g*, marginal errors) for given n×m affinities K and K*."""
    solver = SolverOptions.decode(options)
    validation.check_finite(K=K, K_teacher=K_teacher)
    route = _route(K, None, K.shape[1], solver)
    record_route(route)
    K_aff, K_teacher_aff = Affinity.from_dense(K), Affinity.from_dense(K_teacher)
    check_scale(K_aff, eps, "K")
    check_scale(K_teacher_aff, eps_teacher, "K_teacher")
    rows, cols = Marginal(a, math.inf, torch.zeros_like(a)), Marginal(b, math.inf, torch.zeros_like(b))
    student, teacher = (
        Problem(route.backend, K_aff, rows, cols),
        Problem(route.backend, K_teacher_aff, rows, cols),
    )
    f, g, f_t, g_t, errors = _solve_both(route, student, teacher, eps, eps_teacher, solver)
    value = route.backend.klot_value(K_aff, f, g, eps, K_teacher_aff, f_t, g_t, eps_teacher)
    _check_value(value, f=f, g=g, f_teacher=f_t, g_teacher=g_t)
    watch_convergence(errors, (eps, eps_teacher), (K_aff, K_teacher_aff), solver)
    return value, f, g, f_t, g_t, errors


@klot_dense_op.register_fake
def _(K, K_teacher, *rest):
    n, m = K.shape
    return K.new_empty(()), K.new_empty(n), K.new_empty(m), K.new_empty(n), K.new_empty(m), K.new_empty(2)


@torch.library.custom_op("sotalign::klot_dense_backward", mutates_args=())
def klot_dense_backward_op(
    grad_output: Tensor,
    K: Tensor,
    K_teacher: Tensor,
    f: Tensor,
    g: Tensor,
    f_teacher: Tensor,
    g_teacher: Tensor,
    eps: float,
    eps_teacher: float,
    options: str,
) -> Tensor:
    """grad_output · G with G = (P − P*)/ε (n×m, like the input K)."""
    route = _route(K, None, K.shape[1], SolverOptions.decode(options))
    G = route.backend.klot_grad_dense(
        Affinity.from_dense(K), f, g, eps, Affinity.from_dense(K_teacher), f_teacher, g_teacher, eps_teacher
    )
    return grad_output * G


@klot_dense_backward_op.register_fake
def _(grad_output, K, *rest):
    return torch.empty_like(K)


def _dense_setup(ctx, inputs, output):
    K, K_teacher, a, b, eps, eps_teacher, options = inputs
    ctx.save_for_backward(K, K_teacher, *output[1:5])
    ctx.scalars = (eps, eps_teacher, options)


def _dense_backward(ctx, grad_value, *unused):
    grad_K = klot_dense_backward_op(grad_value, *ctx.saved_tensors, *ctx.scalars)
    return grad_K, None, None, None, None, None, None


klot_dense_op.register_autograd(_dense_backward, setup_context=_dense_setup)
klot_dense_backward_op.register_autograd(no_double_backward, setup_context=nothing_to_save)


# ------------------------------------------------------------------------------ convergence

_last = threading.local()


def klot_marginal_errors() -> Tensor | None:
    """[student, teacher] row-marginal errors (L1, as a share of the plans' mass) of this
    thread's last KLOT forward, as a device tensor (reading it waits for the device: do it at
    a logging cadence), or None before the first."""
    return getattr(_last, "errors", None)


def watch_convergence(errors: Tensor, eps: tuple[float, float], affinities, options: SolverOptions) -> None:
    """Record the errors and warn about a plan that did not converge: at once on CPU; on CUDA
    once a non-blocking copy of them has arrived (looked at by a later call)."""
    _last.errors = errors
    pending = getattr(_last, "pending", None)
    if pending is not None and pending[1].query():
        _last.pending = None
        _warn_not_converged(*pending[0])
    if errors.device.type != "cuda":
        _warn_not_converged(errors, eps, affinities, options)
    elif getattr(_last, "pending", None) is None:
        host = errors.to("cpu", non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record()
        _last.pending = ((host, eps, affinities, options), arrived)


def _warn_not_converged(errors: Tensor, eps, affinities, options: SolverOptions) -> None:
    for what, error, level, K in zip(
        ("klot's student plan", "klot's teacher plan"), errors.tolist(), eps, affinities, strict=True
    ):
        message = convergence_warning(what, error, 1.0, level, K, options)
        if message is not None:
            warnings.warn(message, RuntimeWarning, stacklevel=5)


# ----------------------------------------------------------------------------------- fronts


def klot(
    x: Tensor,
    y: Tensor,
    x_teacher: Tensor,
    y_teacher: Tensor,
    eps: float = DEFAULT_EPS,
    eps_teacher: float = DEFAULT_EPS_TEACHER,
    *,
    cost: str | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    return_route: bool = False,
    options: SolverOptions | None = None,
    affinity: str | None = None,
    **solver_options,
):
    """KLOT(K ‖ K*) with K = −C(x, y) (student) and K* = −C(x_teacher, y_teacher) (teacher).

    ``x`` (n×d) and ``y`` (m×d) are the student's image and text features; the teacher's
    features ``x_teacher`` (n×d*) and ``y_teacher`` (m×d*) describe the same rows and
    columns in the teacher's space. Returns a scalar tensor, differentiable wrt x and y with
    the exact gradient of Theorem 5.1. ``cost`` is "cosine" (default), "sqeuclidean" or
    "dot" (see :func:`sotalign.sinkhorn`; ``affinity=`` is its deprecated alias); ``a``, ``b``
    are the weights of both plans' marginals (default uniform; normalised to mass one; zeros
    allowed). Both solves use the same solver options (``options=`` or keywords:
    :class:`~sotalign.ot.options.SolverOptions`). Safe under ``torch.compile(fullgraph=True)``.

    With ``return_route=True`` returns ``(value, route)``: the :class:`~sotalign.ot.Route`
    (backend, path, precision, reason) the forward took, the online fallback included
    (None under ``torch.compile``, which traces the call instead of running it).
    """
    cost = _cost(cost, affinity)
    options = SolverOptions.resolve(options, **solver_options)
    return _with_route(_klot(x, y, x_teacher, y_teacher, eps, eps_teacher, cost, a, b, options), return_route)


def _with_route(value: Tensor, return_route: bool):
    if not return_route:
        return value
    return value, (None if torch.compiler.is_compiling() else recorded_route())


def _plan_weights(a, b, n: int, m: int, like: Tensor) -> tuple[Tensor, Tensor]:
    return (
        ot_problem.normalised_weights("a", a, (n,), True, like),
        ot_problem.normalised_weights("b", b, (m,), True, like),
    )


def _klot(x, y, x_teacher, y_teacher, eps, eps_teacher, cost: str, a, b, options: SolverOptions) -> Tensor:
    """:func:`klot` with its cost checked and its solver options given as one object."""
    device = validation.check_structure(x=x, y=y, x_teacher=x_teacher, y_teacher=y_teacher)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature dimension, got {x.shape[1]} and {y.shape[1]}")
    if x_teacher.shape[1] != y_teacher.shape[1]:
        raise ValueError(
            "x_teacher and y_teacher must have the same feature dimension, "
            f"got {x_teacher.shape[1]} and {y_teacher.shape[1]}"
        )
    if x_teacher.shape[0] != x.shape[0] or y_teacher.shape[0] != y.shape[0]:
        raise ValueError(
            "teacher rows must match the student rows: x has "
            f"{x.shape[0]} and x_teacher {x_teacher.shape[0]}; "
            f"y has {y.shape[0]} and y_teacher {y_teacher.shape[0]}"
        )
    eps = validation.check_positive("eps", eps)
    eps_teacher = validation.check_positive("eps_teacher", eps_teacher)
    validation.check_cuda_graph(options.cuda_graph, device)
    dtype = validation.compute_dtype(x, y, x_teacher, y_teacher)
    x, y = ot_problem.cost_features(cost, x.to(dtype), y.to(dtype))
    x_teacher, y_teacher = ot_problem.cost_features(
        cost, x_teacher.detach().to(dtype), y_teacher.detach().to(dtype)
    )
    a, b = _plan_weights(a, b, x.shape[0], y.shape[0], x.detach())
    value, *_ = klot_features_op(
        x.contiguous(),
        y.contiguous(),
        x_teacher.contiguous(),
        y_teacher.contiguous(),
        a,
        b,
        eps,
        eps_teacher,
        cost,
        options.encode(),
    )
    return value


def klot_dense(
    K: Tensor,
    K_teacher: Tensor,
    eps: float = DEFAULT_EPS,
    eps_teacher: float = DEFAULT_EPS_TEACHER,
    *,
    a: Tensor | None = None,
    b: Tensor | None = None,
    return_route: bool = False,
    options: SolverOptions | None = None,
    **solver_options,
):
    """KLOT(K ‖ K*) for given n×m affinities; differentiable wrt K (gradient (P − P*)/ε).
    ``a``, ``b`` and ``return_route`` as in :func:`klot`."""
    device = validation.check_structure(K=K, K_teacher=K_teacher)
    if K.shape != K_teacher.shape:
        raise ValueError(
            f"K and K_teacher must have the same shape, got {tuple(K.shape)} and {tuple(K_teacher.shape)}"
        )
    options = SolverOptions.resolve(options, **solver_options)
    eps = validation.check_positive("eps", eps)
    eps_teacher = validation.check_positive("eps_teacher", eps_teacher)
    validation.check_cuda_graph(options.cuda_graph, device)
    dtype = validation.compute_dtype(K, K_teacher)
    a, b = _plan_weights(a, b, K.shape[0], K.shape[1], K.detach().to(dtype))
    value, *_ = klot_dense_op(
        K.to(dtype).contiguous(),
        K_teacher.detach().to(dtype).contiguous(),
        a,
        b,
        eps,
        eps_teacher,
        options.encode(),
    )
    return _with_route(value, return_route)


class KLOTLoss(nn.Module):
    """``KLOTLoss(eps, eps_teacher, cost=..., **solver_options)(x, y, x_teacher, y_teacher, a=None, b=None)``:
    see :func:`klot`. Every argument is validated here, at construction. ``last_route`` is the
    route (backend, path, precision, reason) of the last forward (None before the first, and
    under ``torch.compile``).
    """

    def __init__(
        self,
        eps: float = DEFAULT_EPS,
        eps_teacher: float = DEFAULT_EPS_TEACHER,
        *,
        cost: str | None = None,
        options: SolverOptions | None = None,
        affinity: str | None = None,
        **solver_options,
    ):
        super().__init__()
        self.eps = validation.check_positive("eps", eps)
        self.eps_teacher = validation.check_positive("eps_teacher", eps_teacher)
        self.cost = _cost(cost, affinity)
        self.options = SolverOptions.resolve(options, **solver_options)
        self.last_route: Route | None = None

    def forward(self, x: Tensor, y: Tensor, x_teacher: Tensor, y_teacher: Tensor, a=None, b=None) -> Tensor:
        value = _klot(x, y, x_teacher, y_teacher, self.eps, self.eps_teacher, self.cost, a, b, self.options)
        if not torch.compiler.is_compiling():
            self.last_route = recorded_route()
        return value

    def extra_repr(self) -> str:
        return (
            f"eps={self.eps}, eps_teacher={self.eps_teacher}, cost={self.cost!r}, "
            f"n_iters={self.options.n_iters}, backend={self.options.backend!r}"
        )


__all__ = ["KLOTLoss", "NOT_CONVERGED", "klot", "klot_dense", "klot_marginal_errors"]
