r"""KLOT, the unpaired loss of SOTAlign (paper Eq. 12), with its exact gradient.

For a student affinity K (ε, default 0.05) and a teacher affinity K* (ε*, default 0.01),

    KLOT(K ‖ K*) = KL(P* ‖ P),     P = OT_ε(K),  P* = OT_ε*(K*),

    ∂KLOT / ∂K = (P − P*) / ε      (Theorem 5.1 / C.4: no backpropagation through Sinkhorn).

Forward runs both Sinkhorn solves without autograd, then one streaming pass for the value
``Σ P*_ij (log P*_ij − log P_ij)``. Backward, for K = x̂ ŷᵀ, forms G = (P − P*)/ε tile by tile
and returns ``G ŷ`` and ``Gᵀ x̂`` scaled by the incoming gradient; the chain rule through the
cosine normalisation is left to autograd. Only features and potentials are saved, so on an
online path nothing n×m exists between forward and backward. The teacher is a constant.

Both passes are ``torch.library`` custom ops, so ``torch.compile(fullgraph=True)`` traces a
model that uses KLOT without graph breaks: ``sotalign::klot_features`` returns the value and
the four potentials (f, g, f*, g*) and ``sotalign::klot_features_backward`` returns
``grad_output · (G ŷ, Gᵀ x̂)``; ``sotalign::klot_dense`` / ``klot_dense_backward`` do the same
for given affinities (gradient ``grad_output · G``). The :class:`SolverOptions` cross the op
boundary as plain int/float/str/bool arguments (its fields, in order); the backend and path
are chosen inside the ops (the backward chooses the backend again from the same arguments),
and the input values are checked for NaN/Inf there too, so the Python front reads no tensor
value.
"""

import torch
from torch import Tensor, nn

from ..kernels import Affinity
from ..kernels.base import fp32_matmul
from . import validation as check
from .dispatch import Route, choose_route, record_route, recorded_route
from .options import N_OPTIONS, SolverOptions
from .sinkhorn import check_scale, solve, uniform_log_weights


def _solve_both(
    route: Route, K: Affinity, K_teacher: Affinity, eps: float, eps_teacher: float, options: SolverOptions
):
    """Student and teacher potentials (f, g, f*, g*) on this route."""
    n, m = K.shape
    log_a = uniform_log_weights(n, K.dtype, K.device)
    log_b = uniform_log_weights(m, K.dtype, K.device)
    f, g, _ = solve(route.backend, K, eps, options.n_iters, log_a, log_b, **options.loop())
    f_t, g_t, _ = solve(
        route.backend, K_teacher, eps_teacher, options.n_iters, log_a, log_b, **options.loop()
    )
    return f, g, f_t, g_t


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


def _stored_feature_grads(
    backend, K: Affinity, f, g, eps, K_teacher: Affinity, f_t, g_t, eps_t
) -> tuple[Tensor, Tensor]:
    """(G y, Gᵀ x) on the dense path: K and K* stored once, G = (P − P*)/ε in one pass
    reading both, then two matrix products (cuBLAS on CUDA, at fp32 accuracy)."""
    K_stored, K_teacher_stored = K.materialize(), K_teacher.materialize()
    G = backend.klot_grad_dense(K_stored, f, g, eps, K_teacher_stored, f_t, g_t, eps_t)
    del K_stored, K_teacher_stored
    return fp32_matmul(G, K.y), fp32_matmul(G.T, K.x)


# The ops take SolverOptions flattened into its fields, in order (SolverOptions.op_args).


@torch.library.custom_op("sotalign::klot_features", mutates_args=())
def klot_features_op(
    x: Tensor,
    y: Tensor,
    x_teacher: Tensor,
    y_teacher: Tensor,
    eps: float,
    eps_teacher: float,
    n_iters: int,
    tol: float | None,
    check_every: int,
    symmetric: bool,
    eps_scaling: float | None,
    cuda_graph: bool,
    backend: str,
    path: str,
    precision: str,
    memory_budget: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(KLOT, f, g, f*, g*) for K = x yᵀ and K* = x* y*ᵀ (rows already normalised for cosine)."""
    options = SolverOptions(
        n_iters, tol, check_every, symmetric, eps_scaling, cuda_graph, backend, path, precision, memory_budget
    )
    check.check_finite(x=x, y=y, x_teacher=x_teacher, y_teacher=y_teacher)
    K, K_teacher = Affinity.from_features(x, y), Affinity.from_features(x_teacher, y_teacher)
    check_scale(K, eps, "x, y")
    check_scale(K_teacher, eps_teacher, "x_teacher, y_teacher")
    route, (K, K_teacher) = _features_route(x, y, x_teacher, options).prepare(K, K_teacher)
    record_route(route)
    f, g, f_t, g_t = _solve_both(route, K, K_teacher, eps, eps_teacher, options)
    value = route.backend.klot_value(K, f, g, eps, K_teacher, f_t, g_t, eps_teacher)
    _check_value(value, f=f, g=g, f_teacher=f_t, g_teacher=g_t)
    return value, f, g, f_t, g_t


def _check_value(value: Tensor, **potentials: Tensor) -> None:
    check.check_finite_result("klot", "eps too small for the dtype?", **potentials, value=value)


@klot_features_op.register_fake
def _(x, y, x_teacher, y_teacher, *options):
    n, m = x.shape[0], y.shape[0]
    return x.new_empty(()), x.new_empty(n), x.new_empty(m), x.new_empty(n), x.new_empty(m)


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
    n_iters: int,
    tol: float | None,
    check_every: int,
    symmetric: bool,
    eps_scaling: float | None,
    cuda_graph: bool,
    backend: str,
    path: str,
    precision: str,
    memory_budget: float | None,
) -> tuple[Tensor, Tensor]:
    """grad_output · (G y, Gᵀ x) with G = (P − P*)/ε: from stored K, K* and G on the dense
    path (online if they do not fit after all), streamed otherwise (never n×m)."""
    options = SolverOptions(
        n_iters, tol, check_every, symmetric, eps_scaling, cuda_graph, backend, path, precision, memory_budget
    )
    route = _features_route(x, y, x_teacher, options)
    K, K_teacher = Affinity.from_features(x, y), Affinity.from_features(x_teacher, y_teacher)
    args = (f, g, eps, K_teacher, f_teacher, g_teacher, eps_teacher)
    if route.dense:
        try:
            grad_x, grad_y = _stored_feature_grads(route.backend, K, *args)
            return grad_output * grad_x, grad_output * grad_y
        except torch.cuda.OutOfMemoryError as error:
            if route.fallback is None:
                raise
            route = route.fell_back(error)
    grad_x, grad_y = route.backend.klot_grad_features(K, *args)
    return grad_output * grad_x, grad_output * grad_y


@klot_features_backward_op.register_fake
def _(grad_output, x, y, *rest):
    return torch.empty_like(x), torch.empty_like(y)


def _features_setup(ctx, inputs, output):
    x, y, x_teacher, y_teacher, *scalars = inputs
    ctx.save_for_backward(x, y, x_teacher, y_teacher, *output[1:])
    ctx.scalars = scalars  # eps, eps_teacher, then the options


def _features_backward(ctx, grad_value, *unused_potential_grads):
    grad_x, grad_y = klot_features_backward_op(grad_value, *ctx.saved_tensors, *ctx.scalars)
    return (grad_x, grad_y) + (None,) * (4 + N_OPTIONS)


klot_features_op.register_autograd(_features_backward, setup_context=_features_setup)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "sotalign.klot has no second derivative: its gradient (P − P*)/ε comes from the Sinkhorn "
        "solution, which is not differentiated (double backward, e.g. a gradient penalty, is not supported)"
    )


def _nothing_to_save(ctx, inputs, output) -> None:
    pass


klot_features_backward_op.register_autograd(_no_double_backward, setup_context=_nothing_to_save)


@torch.library.custom_op("sotalign::klot_dense", mutates_args=())
def klot_dense_op(
    K: Tensor,
    K_teacher: Tensor,
    eps: float,
    eps_teacher: float,
    n_iters: int,
    tol: float | None,
    check_every: int,
    symmetric: bool,
    eps_scaling: float | None,
    cuda_graph: bool,
    backend: str,
    path: str,
    precision: str,
    memory_budget: float | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(KLOT, f, g, f*, g*) for given n×m affinities K and K*."""
    options = SolverOptions(
        n_iters, tol, check_every, symmetric, eps_scaling, cuda_graph, backend, path, precision, memory_budget
    )
    check.check_finite(K=K, K_teacher=K_teacher)
    route = _route(K, None, K.shape[1], options)
    record_route(route)
    K_aff, K_teacher_aff = Affinity.from_dense(K), Affinity.from_dense(K_teacher)
    check_scale(K_aff, eps, "K")
    check_scale(K_teacher_aff, eps_teacher, "K_teacher")
    f, g, f_t, g_t = _solve_both(route, K_aff, K_teacher_aff, eps, eps_teacher, options)
    value = route.backend.klot_value(K_aff, f, g, eps, K_teacher_aff, f_t, g_t, eps_teacher)
    _check_value(value, f=f, g=g, f_teacher=f_t, g_teacher=g_t)
    return value, f, g, f_t, g_t


@klot_dense_op.register_fake
def _(K, K_teacher, *options):
    n, m = K.shape
    return K.new_empty(()), K.new_empty(n), K.new_empty(m), K.new_empty(n), K.new_empty(m)


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
    n_iters: int,
    tol: float | None,
    check_every: int,
    symmetric: bool,
    eps_scaling: float | None,
    cuda_graph: bool,
    backend: str,
    path: str,
    precision: str,
    memory_budget: float | None,
) -> Tensor:
    """grad_output · G with G = (P − P*)/ε (n×m, like the input K)."""
    options = SolverOptions(
        n_iters, tol, check_every, symmetric, eps_scaling, cuda_graph, backend, path, precision, memory_budget
    )
    route = _route(K, None, K.shape[1], options)
    G = route.backend.klot_grad_dense(
        Affinity.from_dense(K), f, g, eps, Affinity.from_dense(K_teacher), f_teacher, g_teacher, eps_teacher
    )
    return grad_output * G


@klot_dense_backward_op.register_fake
def _(grad_output, K, *rest):
    return torch.empty_like(K)


def _dense_setup(ctx, inputs, output):
    K, K_teacher, *scalars = inputs
    ctx.save_for_backward(K, K_teacher, *output[1:])
    ctx.scalars = scalars


def _dense_backward(ctx, grad_value, *unused_potential_grads):
    grad_K = klot_dense_backward_op(grad_value, *ctx.saved_tensors, *ctx.scalars)
    return (grad_K,) + (None,) * (3 + N_OPTIONS)


klot_dense_op.register_autograd(_dense_backward, setup_context=_dense_setup)
klot_dense_backward_op.register_autograd(_no_double_backward, setup_context=_nothing_to_save)


def klot(
    x: Tensor,
    y: Tensor,
    x_teacher: Tensor,
    y_teacher: Tensor,
    eps: float = 0.05,
    eps_teacher: float = 0.01,
    n_iters: int = 100,
    affinity: str = "cosine",
    backend: str = "auto",
    *,
    path: str = "auto",
    tol: float | None = None,
    check_every: int = 10,
    symmetric: bool = True,
    memory_budget: float | None = None,
    eps_scaling: float | None = None,
    cuda_graph: bool = False,
    precision: str = "auto",
    return_route: bool = False,
):
    """KLOT(K ‖ K*) with K = aff(x, y) (student) and K* = aff(x_teacher, y_teacher) (teacher).

    ``x`` (n×d) and ``y`` (m×d) are the student's image and text features; the teacher's
    features ``x_teacher`` (n×d*) and ``y_teacher`` (m×d*) describe the same rows and
    columns in the teacher's space. Returns a scalar tensor, differentiable wrt x and y with
    the exact gradient of Theorem 5.1. Both solves use the same options (``tol``,
    ``eps_scaling``, ``cuda_graph``, ``precision``...: :class:`~sotalign.ot.options.SolverOptions`);
    see :func:`sotalign.sinkhorn`. Safe under ``torch.compile(fullgraph=True)``.

    With ``return_route=True`` returns ``(value, route)``: the :class:`~sotalign.ot.Route`
    (backend, path, precision, reason) the forward took, the online fallback included
    (None under ``torch.compile``, which traces the call instead of running it).
    """
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
    return _with_route(_klot(x, y, x_teacher, y_teacher, eps, eps_teacher, affinity, options), return_route)


def _with_route(value: Tensor, return_route: bool):
    if not return_route:
        return value
    return value, (None if torch.compiler.is_compiling() else recorded_route())


def _klot(x, y, x_teacher, y_teacher, eps, eps_teacher, affinity, options: SolverOptions) -> Tensor:
    """:func:`klot` with its solver options given as one object."""
    device = check.check_structure(x=x, y=y, x_teacher=x_teacher, y_teacher=y_teacher)
    check.check_affinity(affinity)
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
    eps = check.check_positive("eps", eps)
    eps_teacher = check.check_positive("eps_teacher", eps_teacher)
    check.check_cuda_graph(options.cuda_graph, device)
    dtype = check.compute_dtype(x, y, x_teacher, y_teacher)
    x, y = x.to(dtype), y.to(dtype)
    x_teacher, y_teacher = x_teacher.detach().to(dtype), y_teacher.detach().to(dtype)
    if affinity == "cosine":
        x, y = check.unit_rows(x), check.unit_rows(y)
        x_teacher, y_teacher = check.unit_rows(x_teacher), check.unit_rows(y_teacher)
    value, *_ = klot_features_op(
        x.contiguous(),
        y.contiguous(),
        x_teacher.contiguous(),
        y_teacher.contiguous(),
        eps,
        eps_teacher,
        *options.op_args(),
    )
    return value


def klot_dense(
    K: Tensor,
    K_teacher: Tensor,
    eps: float = 0.05,
    eps_teacher: float = 0.01,
    n_iters: int = 100,
    backend: str = "auto",
    *,
    tol: float | None = None,
    check_every: int = 10,
    symmetric: bool = True,
    eps_scaling: float | None = None,
    cuda_graph: bool = False,
    precision: str = "auto",
    return_route: bool = False,
):
    """KLOT(K ‖ K*) for given n×m affinities; differentiable wrt K (gradient (P − P*)/ε).
    ``return_route`` as in :func:`klot`."""
    device = check.check_structure(K=K, K_teacher=K_teacher)
    if K.shape != K_teacher.shape:
        raise ValueError(
            f"K and K_teacher must have the same shape, got {tuple(K.shape)} and {tuple(K_teacher.shape)}"
        )
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
    eps = check.check_positive("eps", eps)
    eps_teacher = check.check_positive("eps_teacher", eps_teacher)
    check.check_cuda_graph(options.cuda_graph, device)
    dtype = check.compute_dtype(K, K_teacher)
    value, *_ = klot_dense_op(
        K.to(dtype).contiguous(),
        K_teacher.detach().to(dtype).contiguous(),
        eps,
        eps_teacher,
        *options.op_args(),
    )
    return _with_route(value, return_route)


class KLOTLoss(nn.Module):
    """``KLOTLoss(eps, eps_teacher, n_iters, ...)(x, y, x_teacher, y_teacher)``: see :func:`klot`.

    Keyword ``options`` are the fields of :class:`~sotalign.ot.options.SolverOptions` (``path``,
    ``tol``, ``check_every``, ``symmetric``, ``memory_budget``, ``eps_scaling``, ``cuda_graph``,
    ``precision``); every argument is validated here, at construction. ``last_route`` is the
    route (backend, path, precision, reason) of the last forward (None before the first, and
    under ``torch.compile``).
    """

    def __init__(
        self,
        eps: float = 0.05,
        eps_teacher: float = 0.01,
        n_iters: int = 100,
        affinity: str = "cosine",
        backend: str = "auto",
        **options,
    ):
        super().__init__()
        self.eps = check.check_positive("eps", eps)
        self.eps_teacher = check.check_positive("eps_teacher", eps_teacher)
        self.affinity = check.check_affinity(affinity)
        self.options = SolverOptions(n_iters=n_iters, backend=backend, **options)
        self.last_route: Route | None = None

    @property
    def n_iters(self) -> int:
        return self.options.n_iters

    @property
    def backend(self) -> str:
        return self.options.backend

    def forward(self, x: Tensor, y: Tensor, x_teacher: Tensor, y_teacher: Tensor) -> Tensor:
        value = _klot(x, y, x_teacher, y_teacher, self.eps, self.eps_teacher, self.affinity, self.options)
        if not torch.compiler.is_compiling():
            self.last_route = recorded_route()
        return value

    def extra_repr(self) -> str:
        return (
            f"eps={self.eps}, eps_teacher={self.eps_teacher}, n_iters={self.n_iters}, "
            f"affinity={self.affinity!r}, backend={self.backend!r}"
        )
