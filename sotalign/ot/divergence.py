r"""The differentiable OT value OT_ε(a, b) and the debiased Sinkhorn divergence.

    S_ε(a, b) = OT_ε(a, b) − ½ OT_ε(a, a) − ½ OT_ε(b, b) + ε/2 (m(a) − m(b))²

(Feydy et al. 2019; the mass term is Séjourné et al. 2019's, zero for balanced problems of
mass one). OT_ε is read off the Sinkhorn potentials (:mod:`sotalign.ot.problem`), and its
gradient comes from the envelope theorem, without differentiating through the loop: at the
optimal potentials f̂, ĝ of the dual value D,

    ∂OT_ε/∂x_i = Σ_j P_ij ∂C_ij/∂x_i,
    ∂OT_ε/∂a_i = φ_a(f̂_i) − ε (Σ_j b_j e^{(f̂_i + ĝ_j − C_ij)/ε} − m(b)),

(φ as in :mod:`sotalign.ot.problem`; for a balanced problem the second reads f̂_i + const.)
With ∂C_ij/∂x_i = 2(x_i − y_j) (sqeuclidean) or −y_j (dot, and cosine on unit rows, the
normalisation's chain rule left to autograd), the x-gradient is 2(P1 ∘ x − P y) or −P y: one
streaming plan product with [y, 1] (never n×m on an online path). f̂_i comes from one more
row pass (its c-transform), so it is defined for rows of weight zero too.

``sotalign::ot_value`` and its backward are ``torch.library`` custom ops with fake kernels, so
``torch.compile(fullgraph=True)`` traces :func:`sinkhorn_divergence` (three ops) without a
graph break. Batches of problems (x (B, n, d)) are one solve per term and give one value per
problem.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import problem as ot_problem
from . import validation
from .klot import no_double_backward, nothing_to_save
from .options import DEFAULT_EPS, SolverOptions
from .problem import Problem, SelfProblem
from .sinkhorn import _cost, _features_route, _solve_problem, check_scale, marginals


def _problem_parts(x: Tensor, y: Tensor, a: Tensor, b: Tensor, cost: str, reach_a: float, reach_b: float):
    rows, cols = marginals(*ot_problem.offsets(cost, x, y), a, b, (reach_a, reach_b))
    return ot_problem.work_affinity(cost, x, y), rows, cols


@torch.library.custom_op("sotalign::ot_value", mutates_args=())
def ot_value_op(
    x: Tensor,
    y: Tensor,
    a: Tensor,
    b: Tensor,
    eps: float,
    cost: str,
    reach_a: float,
    reach_b: float,
    options: str,
    self_transport: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(OT_ε, f', g'): the value (per problem) and the kernel potentials, for cost features x, y
    and weights a, b (already normalised for a balanced problem); ``self_transport``: x is y
    and a is b (:class:`~sotalign.ot.problem.SelfProblem`)."""
    solver = SolverOptions.decode(options)
    validation.check_finite(x=x, y=y)
    validation.check_weight_values("a", a)
    validation.check_weight_values("b", b)
    K, rows, cols = _problem_parts(x, y, a, b, cost, reach_a, reach_b)
    check_scale(K, eps, "x, y")
    route = _features_route(K, x.shape[-1], solver)
    kind = SelfProblem if self_transport else Problem
    result = _solve_problem(route, K, rows, cols, eps, solver, problem_type=kind)
    return result.value, result.kernel_f, result.kernel_g


@ot_value_op.register_fake
def _(x, y, a, b, *scalars):
    return x.new_empty(x.shape[:-2]), x.new_empty(x.shape[:-1]), y.new_empty(y.shape[:-1])


@torch.library.custom_op("sotalign::ot_value_backward", mutates_args=())
def ot_value_backward_op(
    grad_output: Tensor,
    x: Tensor,
    y: Tensor,
    a: Tensor,
    b: Tensor,
    f: Tensor,
    g: Tensor,
    eps: float,
    cost: str,
    reach_a: float,
    reach_b: float,
    options: str,
    self_transport: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """grad_output · (∂/∂x, ∂/∂y, ∂/∂a, ∂/∂b) of OT_ε at the kernel potentials f, g."""
    solver = SolverOptions.decode(options)
    K, rows, cols = _problem_parts(x, y, a, b, cost, reach_a, reach_b)
    route, (K_read,) = _features_route(K, x.shape[-1], solver).prepare(K)
    problem = Problem(route.backend, K_read, rows, cols)
    backend = route.backend
    with torch.no_grad():
        # P [y, 1] = [P y, P1] and Pᵀ [x, 1] = [Pᵀ x, Pᵀ1], streamed
        plan_y = backend.plan_matmul(K_read, f, g, eps, torch.cat([y, y.new_ones(*y.shape[:-1], 1)], -1))
        plan_x = backend.plan_t_matmul(K_read, f, g, eps, torch.cat([x, x.new_ones(*x.shape[:-1], 1)], -1))
        grad_x = _cost_gradient(cost, x, plan_y)
        grad_y = _cost_gradient(cost, y, plan_x)
        grad_a = _weight_gradient(problem.rows, problem.cols, backend.lse_rows(K_read, g, eps), eps)
        grad_b = _weight_gradient(problem.cols, problem.rows, backend.lse_cols(K_read, f, eps), eps)
    scale = grad_output[..., None]
    return scale[..., None] * grad_x, scale[..., None] * grad_y, scale * grad_a, scale * grad_b


def _cost_gradient(cost: str, x: Tensor, plan_other: Tensor) -> Tensor:
    """Σ_j P_ij ∂C_ij/∂x_i from [P y, P1] (or the transposed products for the columns)."""
    product, mass = plan_other[..., :-1], plan_other[..., -1:]
    if cost == "sqeuclidean":
        return 2 * (mass * x - product)
    return -product


def _weight_gradient(side, other, lse: Tensor, eps: float) -> Tensor:
    """∂D/∂w_i = φ(ŵ_i) − ε (Σ_j w'_j e^{(ŵ_i + ŵ'_j − C_ij)/ε} − m(w')), with ŵ_i the
    c-transform τ(u_i − ε LSE_j[(K + g')/ε]) of the other side's potential."""
    hat = side.scale(eps) * (side.offset - eps * lse)
    ratio = torch.exp((hat - side.offset) / eps + lse)
    return side.phi(hat) - eps * (ratio - other.weights.sum(-1, keepdim=True))


@ot_value_backward_op.register_fake
def _(grad_output, x, y, a, b, *rest):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(a), torch.empty_like(b)


def _setup(ctx, inputs, output):
    x, y, a, b, *scalars = inputs
    ctx.save_for_backward(x, y, a, b, output[1], output[2])
    ctx.scalars = scalars


def _backward(ctx, grad_value, *unused):
    grads = ot_value_backward_op(grad_value, *ctx.saved_tensors, *ctx.scalars)
    return (*grads, None, None, None, None, None, None)


ot_value_op.register_autograd(_backward, setup_context=_setup)
ot_value_backward_op.register_autograd(no_double_backward, setup_context=nothing_to_save)


def _weights(name: str, w: Tensor | None, features: Tensor, balanced: bool) -> Tensor:
    """Differentiable weights: uniform, or (balanced) divided by their total; their values are
    checked inside the op (the front reads no tensor value, so it traces)."""
    shape = tuple(features.shape[:-1])
    if w is None:
        return features.new_full(shape, 1.0 / shape[-1]).detach()
    validation.check_weight_structure(name, w, shape, features.device)
    w = w.to(features.dtype)
    return w / w.sum(-1, keepdim=True) if balanced else w


def sinkhorn_divergence(
    x: Tensor,
    y: Tensor,
    eps: float = DEFAULT_EPS,
    *,
    cost: str = "sqeuclidean",
    a: Tensor | None = None,
    b: Tensor | None = None,
    reg_m=None,
    debias: bool = True,
    options: SolverOptions | None = None,
    **solver_options,
) -> Tensor:
    """The debiased Sinkhorn divergence S_ε(a, b) between the point clouds x (n×d) and y (m×d)
    with weights a, b, or one per problem for batches x (B, n, d), y (B, m, d) (returns (B,)).

    ``debias=False`` returns OT_ε(a, b) itself. Differentiable in x, y, a and b by the envelope
    theorem (no unrolling; streamed on the online path). ``cost``, ``a``, ``b``, ``reg_m`` and
    the solver options are those of :func:`sotalign.sinkhorn` (the default cost here is
    "sqeuclidean", the point-cloud convention; note POT's C = ‖x − y‖², GeomLoss's ½‖x − y‖²).
    Safe under ``torch.compile(fullgraph=True)``.
    """
    cost = _cost(cost, None)
    options = SolverOptions.resolve(options, **solver_options)
    if not isinstance(debias, bool):
        raise TypeError(f"debias must be a bool, got {type(debias).__name__}")
    validation.check_point_clouds(x=x, y=y, values=False)
    eps = validation.check_positive("eps", eps)
    validation.check_cuda_graph(options.cuda_graph, x.device)
    reach_a, reach_b = ot_problem.check_reg_m(reg_m)
    balanced = math.isinf(reach_a) and math.isinf(reach_b)
    dtype = validation.compute_dtype(x, y)
    x, y = ot_problem.cost_features(cost, x.to(dtype), y.to(dtype))
    a, b = _weights("a", a, x, balanced), _weights("b", b, y, balanced)
    encoded = options.encode()

    def ot(
        p: Tensor, q: Tensor, wp: Tensor, wq: Tensor, reach_p: float, reach_q: float, itself: bool
    ) -> Tensor:
        return ot_value_op(
            p.contiguous(), q.contiguous(), wp, wq, eps, cost, reach_p, reach_q, encoded, itself
        )[0]

    value = ot(x, y, a, b, reach_a, reach_b, False)
    if not debias:
        return value
    value = (
        value - 0.5 * ot(x, x, a, a, reach_a, reach_a, True) - 0.5 * ot(y, y, b, b, reach_b, reach_b, True)
    )
    if not balanced:
        value = value + 0.5 * eps * (a.sum(-1) - b.sum(-1)) ** 2
    return value


class SinkhornLoss(nn.Module):
    """``SinkhornLoss(eps, cost=..., reg_m=..., debias=True, **solver_options)(x, y, a=None, b=None)``:
    :func:`sinkhorn_divergence` as an ``nn.Module`` (arguments validated at construction)."""

    def __init__(
        self,
        eps: float = DEFAULT_EPS,
        *,
        cost: str = "sqeuclidean",
        reg_m=None,
        debias: bool = True,
        options: SolverOptions | None = None,
        **solver_options,
    ):
        super().__init__()
        self.eps = validation.check_positive("eps", eps)
        self.cost = _cost(cost, None)
        ot_problem.check_reg_m(reg_m)
        self.reg_m = reg_m
        if not isinstance(debias, bool):
            raise TypeError(f"debias must be a bool, got {type(debias).__name__}")
        self.debias = debias
        self.options = SolverOptions.resolve(options, **solver_options)

    def forward(self, x: Tensor, y: Tensor, a: Tensor | None = None, b: Tensor | None = None) -> Tensor:
        return sinkhorn_divergence(
            x,
            y,
            self.eps,
            cost=self.cost,
            a=a,
            b=b,
            reg_m=self.reg_m,
            debias=self.debias,
            options=self.options,
        )

    def extra_repr(self) -> str:
        return f"eps={self.eps}, cost={self.cost!r}, reg_m={self.reg_m!r}, debias={self.debias}"
