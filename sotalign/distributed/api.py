r"""``sotalign.distributed.sinkhorn`` and ``klot``: the single-process front on sharded inputs.

Every rank passes its own rows (``x``, ``x_teacher``) and columns (``y``, ``y_teacher``); the
problem is the one on their concatenation over the ranks of ``group``, in rank order.
Each call starts with one agreement round: every rank's shard sizes, dtype, device type,
feature dimensions and options are all-gathered (after a monitored barrier that names the ranks
missing at the timeout); a rank whose inputs failed validation, or whose options differ from
rank 0's, makes *every* rank raise the same error naming it.

KLOT's gradient (SOTAlign Thm. 5.1) is G = (P − P*)/ε on the global K; backward returns to
rank r, for its rows, Σ_s G_rs y_s, and for its columns, Σ_s G_srᵀ x_s: the column shards pass
around the ring again, each rank applying its block of G to them and adding its part of the
column gradient to an accumulator that travels with the shard and comes home at the end. Each
rank's backward is scaled by its own incoming gradient; backward is collective (every rank
must backpropagate through the value, as DDP does).

**DDP.** Each rank's backward yields the gradient of the global value wrt its own shards, so
the parameter gradient of the global value is the *sum* over ranks of the per-rank parameter
gradients. DDP *averages* them, so a training loss multiplies the global KLOT by the world size
(see :func:`ddp_scale`); a per-rank loss (a local KLOT or a mean over the rank's own batch)
needs no factor. When the loss also has parameters that every rank uses in full (SigLIP's
learned scale), put the factor on the gradient of the rank's own embeddings instead, as
``sotalign fit`` does (:mod:`sotalign.align.ddp`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels import Affinity, Backend
from ..ot import problem as ot_problem
from ..ot import validation
from ..ot.dispatch import choose_route
from ..ot.klot import feature_gradients, gradient_features, watch_convergence
from ..ot.options import DEFAULT_EPS, DEFAULT_EPS_TEACHER, SolverOptions
from ..ot.problem import Marginal
from ..ot.sinkhorn import _cost, solve
from .comm import Carry, Comm, circulate
from .solver import RingOperator, Shards, shard_operator


@dataclass(frozen=True)
class DistributedSinkhornResult:
    """This rank's potentials of the global plan ``log P_ij = (f_i + g_j + K_ij) / eps``:
    ``f`` for global rows ``row_offset …`` and ``g`` for global columns ``col_offset …``."""

    f: Tensor
    g: Tensor
    eps: float
    n_iters: int
    #: max(‖P1 − a‖₁, ‖Pᵀ1 − b‖₁) of the global plan, the same on every rank.
    marginal_error: float
    backend: str
    path: str
    n: int
    m: int
    row_offset: int
    col_offset: int


@dataclass(frozen=True)
class _Setup:
    """What the ranks agreed on: the layout (the group and every rank's shard sizes, with this
    rank's cost features), the backend and the path of this rank."""

    layout: Shards
    backend: Backend
    dense: bool


def ddp_scale(group=None) -> int:
    """The factor a global-batch loss takes under DDP's gradient averaging: the world size."""
    return Comm(group).world


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, comm: Comm, sizes: tuple[int, ...]):
        ctx.rows = slice(sum(sizes[: comm.rank]), sum(sizes[: comm.rank + 1]))
        return comm.all_gather(t.contiguous(), list(sizes))

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rows], None, None


def all_gather_rows(t: Tensor, group=None) -> Tensor:
    """The rows of ``t`` of every rank, concatenated in rank order (shards may differ in size).

    Differentiable, with the convention of :func:`klot`: backward returns this rank's rows of
    the incoming gradient, no communication. A loss computed identically on every rank from
    gathered rows thus gives each rank the gradient of that loss wrt its own rows, and the
    parameter gradient of the loss is the sum over ranks (under DDP, scale by :func:`ddp_scale`).
    """
    comm = Comm(group)
    return _GatherRows.apply(t, comm, tuple(comm.sizes(t.shape[0], t.device)))


def _validated(
    eps, cost, affinity, options, solver_options: dict, **tensors
) -> tuple[float, str, SolverOptions]:
    """The checks of the single-process front (the solver options by
    :class:`~sotalign.ot.options.SolverOptions`); returns ε, the cost and the loop's options."""
    if "reg_m" in solver_options:
        raise ValueError(
            "reg_m (unbalanced marginals) is not supported by sotalign.distributed; use sotalign.sinkhorn"
        )
    cost = _cost(cost, affinity)
    options = SolverOptions.resolve(options, **solver_options)
    device = validation.check_structure(**tensors)
    validation.check_finite(**tensors)
    for first, second in (("x", "y"), ("x_teacher", "y_teacher")):
        if first in tensors and tensors[first].shape[1] != tensors[second].shape[1]:
            raise ValueError(
                f"{first} and {second} must have the same feature dimension, got "
                f"{tensors[first].shape[1]} and {tensors[second].shape[1]}"
            )
    if "x_teacher" in tensors and (
        tensors["x_teacher"].shape[0] != tensors["x"].shape[0]
        or tensors["y_teacher"].shape[0] != tensors["y"].shape[0]
    ):
        raise ValueError(
            "teacher rows must match the student rows: x has "
            f"{tensors['x'].shape[0]} and x_teacher {tensors['x_teacher'].shape[0]}; "
            f"y has {tensors['y'].shape[0]} and y_teacher {tensors['y_teacher'].shape[0]}"
        )
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        raise ValueError(
            f"tensors are on {device} but the current CUDA device is "
            f"{torch.cuda.current_device()} (call torch.cuda.set_device(local_rank))"
        )
    if options.cuda_graph:
        raise ValueError("cuda_graph=True is not supported by sotalign.distributed (each step communicates)")
    return validation.check_positive("eps", eps), cost, dataclasses.replace(options, cuda_graph=False)


def _agree(comm: Comm, what: str, tensors: dict, validate) -> tuple[dict, tuple, tuple]:
    """Validate here, then check once across ranks; returns (options, row sizes, column sizes)."""
    try:
        options = validate()
        x, y = tensors["x"], tensors["y"]
        dims = {
            f"d_{name}": t.shape[1] for name, t in tensors.items() if isinstance(t, Tensor) and t.dim() == 2
        }
        shared = {
            "function": what,
            **options,
            "weights": [name for name in ("a", "b") if tensors.get(name) is not None],
            **dims,
            "dtype": str(validation.compute_dtype(*(t for t in tensors.values() if isinstance(t, Tensor)))),
            "device": x.device.type,
        }
        for name, rows in (("a", x.shape[0]), ("b", y.shape[0])):
            if tensors.get(name) is not None:
                validation.check_weights(name, tensors[name], (rows,), x.dtype, x.device)
        mine = {"error": None, "rows": x.shape[0], "cols": y.shape[0], "options": shared}
    except (TypeError, ValueError) as error:
        mine = {"error": f"{type(error).__name__}: {error}"}
        options = None
    everyone = comm.agree(what, mine)
    failed = [(r, fp["error"]) for r, fp in enumerate(everyone) if fp["error"]]
    if failed:
        raise ValueError(
            f"sotalign.distributed.{what}: invalid input on "
            + "; ".join(f"rank {r}: {message}" for r, message in failed)
        )
    reference = everyone[0]["options"]
    differences = []
    for r, fp in enumerate(everyone[1:], start=1):
        for key in sorted(set(reference) | set(fp["options"])):
            if fp["options"].get(key) != reference.get(key):
                differences.append(
                    f"rank {r} has {key}={fp['options'].get(key)!r} where rank 0 has {reference.get(key)!r}"
                )
    if differences:
        raise ValueError(f"sotalign.distributed.{what}: the ranks disagree: " + "; ".join(differences))
    return options, tuple(fp["rows"] for fp in everyone), tuple(fp["cols"] for fp in everyone)


def _route(
    comm: Comm,
    backend: str,
    path: str,
    device,
    row_sizes,
    col_sizes,
    d,
    dtype,
    n_matrices: int,
    memory_budget: float,
    precision: str,
) -> tuple[Backend, bool]:
    """This rank's backend, and the path every rank takes (dense only if dense on every rank:
    ``auto`` looks at free memory on CUDA, which differs from rank to rank)."""
    route = choose_route(
        backend, path, device, max(row_sizes), sum(col_sizes), d, dtype, n_matrices, memory_budget, precision
    )
    dense = route.dense
    if path == "auto" and comm.world > 1:
        flag = torch.tensor([int(dense)], device=device)
        dense = bool(comm.all_reduce(flag, dist.ReduceOp.MIN).item())
    return route.backend, dense


def _marginals(
    comm: Comm, op: RingOperator, cost: str, x: Tensor, y: Tensor, a, b
) -> tuple[Marginal, Marginal]:
    """This rank's row marginal and its (or, for the block row, every) column marginal: weights
    uniform or given per shard, scaled to a global mass of one."""
    u, v = ot_problem.offsets(cost, x, y)
    w_a = x.new_ones(x.shape[0]) if a is None else a.to(x.dtype)
    w_b = y.new_ones(y.shape[0]) if b is None else b.to(y.dtype)
    if op.whole_columns:
        w_b = comm.all_gather(w_b.contiguous(), list(op.K.col_sizes))
        v = comm.all_gather(v.contiguous(), list(op.K.col_sizes))
    mass_a = comm.all_reduce(w_a.sum().reshape(1))
    mass_b = w_b.sum().reshape(1) if op.whole_columns else comm.all_reduce(w_b.sum().reshape(1))
    return Marginal(w_a / mass_a, math.inf, u), Marginal(w_b / mass_b, math.inf, v)


def _problem(setup: _Setup, cost: str, x: Tensor, y: Tensor, a, b):
    work = ot_problem.work_affinity(cost, x, y)
    op = shard_operator(setup.backend, dataclasses.replace(setup.layout, x=work.x, y=work.y), setup.dense)
    return op, op.problem(*_marginals(setup.layout.comm, op, cost, x, y, a, b))


def sinkhorn(
    x: Tensor,
    y: Tensor,
    eps: float = DEFAULT_EPS,
    group=None,
    *,
    cost: str | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    options: SolverOptions | None = None,
    affinity: str | None = None,
    **solver_options,
) -> DistributedSinkhornResult:
    """Entropic OT between the rows of X = [x_0; x_1; …] and Y = [y_0; y_1; …] (concatenated
    over the ranks of ``group``); returns this rank's f (its rows) and g (its columns).

    The same maths and options as :func:`sotalign.sinkhorn` (``cost``; ``a``, ``b`` this rank's
    shards of the weights, scaled to a global mass of one; ``tol`` is decided on the global
    marginal error, so every rank stops at the same iteration). Unbalanced marginals
    (``reg_m``) and batches are not supported here. ``path="online"`` passes the shards around
    the ring every half-step (O((n+m)·d) sent per iteration, O(shard) memory);
    ``path="dense"`` stores this rank's block row of K once (n_r×m) and exchanges only O(n+m)
    numbers per iteration. Collective: every rank calls it."""
    comm = Comm(group)
    checks = (eps, cost, affinity, options, solver_options)
    tensors = {"x": x, "y": y, "a": a, "b": b}
    _, row_sizes, col_sizes = _agree(
        comm, "sinkhorn", tensors, lambda: _shared(*_validated(*checks, x=x, y=y))
    )
    eps, cost, options = _validated(*checks, x=x, y=y)
    dtype = validation.compute_dtype(x, y)
    x, y = ot_problem.cost_features(cost, x.detach().to(dtype), y.detach().to(dtype))
    setup = _setup(comm, options, x, y, row_sizes, col_sizes, x.shape[1], dtype, 1)
    with torch.no_grad():
        op, problem = _problem(setup, cost, x.contiguous(), y.contiguous(), a, b)
        state = solve(problem, eps, options, spread=op.spread())
        errors, _ = problem.marginal_error(state.f, state.g, eps)
    half = ot_problem.AFFINITY_CONSTANT[cost] / 2
    f = state.f + problem.rows.offset - half
    g = op.own_columns(state.g + problem.cols.offset - half)
    K = op.K
    return DistributedSinkhornResult(
        f,
        g,
        eps,
        state.done,
        float(errors),
        setup.backend.name,
        op.path,
        K.n,
        K.m,
        K.row_offset,
        K.col_offset,
    )


def _shared(eps: float, cost: str, options: SolverOptions) -> dict:
    """What the ranks must agree on."""
    return {"eps": eps, "cost": cost, **dataclasses.asdict(options)}


def _setup(
    comm: Comm, options: SolverOptions, x: Tensor, y: Tensor, row_sizes, col_sizes, d, dtype, n_matrices
) -> _Setup:
    backend, dense = _route(
        comm,
        options.backend,
        options.path,
        x.device,
        row_sizes,
        col_sizes,
        d,
        dtype,
        n_matrices,
        options.memory_budget,
        options.precision,
    )
    return _Setup(Shards(comm, x, y, row_sizes, col_sizes), backend, dense)


class _GlobalKLOT(torch.autograd.Function):
    """The global KLOT value (forward) and this rank's share of its gradient (backward)."""

    @staticmethod
    def forward(
        ctx, x, y, x_teacher, y_teacher, a, b, setup: _Setup, cost: str, eps: tuple, options: SolverOptions
    ):
        eps_student, eps_teacher = eps
        op, student = _problem(setup, cost, x, y, a, b)
        op_t, teacher = _problem(setup, cost, x_teacher, y_teacher, a, b)
        s = solve(student, eps_student, options, spread=op.spread() if options.eps_scaling else None)
        t = solve(teacher, eps_teacher, options, spread=op_t.spread() if options.eps_scaling else None)
        value = op.klot_value(s.f, s.g, eps_student, op_t, t.f, t.g, eps_teacher)
        errors = torch.stack([s.row_error, t.row_error])
        shards = (Affinity.from_features(op.K.x, op.K.y), Affinity.from_features(op_t.K.x, op_t.K.y))
        watch_convergence(errors, eps, shards, options)
        g, g_t = op.own_columns(s.g), op_t.own_columns(t.g)
        ctx.save_for_backward(x, y, x_teacher, y_teacher, s.f, g, t.f, g_t)
        ctx.setup, ctx.cost, ctx.eps = setup, cost, eps
        return value.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_value):
        x, y, x_t, y_t, f, g, f_t, g_t = ctx.saved_tensors
        setup, (eps, eps_t) = ctx.setup, ctx.eps
        x_grad, y_grad = gradient_features(ctx.cost, x, y)
        teacher = ot_problem.work_affinity(ctx.cost, x_t, y_t)
        rows = None
        layout = setup.layout
        carry = Carry(layout.comm, list(layout.col_sizes))
        for _, (y_s, y_t_s, g_s, g_t_s) in circulate(
            layout.comm, (y_grad, teacher.y, g, g_t), layout.col_sizes
        ):
            gx, gy = setup.backend.klot_grad_features(
                Affinity.from_features(x_grad, y_s),
                f,
                g_s,
                eps,
                Affinity.from_features(teacher.x, y_t_s),
                f_t,
                g_t_s,
                eps_t,
            )
            rows = gx if rows is None else rows + gx
            carry.add(gy)
        grad_x, grad_y = feature_gradients(ctx.cost, x, y, rows, carry.result())
        return grad_value * grad_x, grad_value * grad_y, None, None, None, None, None, None, None, None


def klot(
    x: Tensor,
    y: Tensor,
    x_teacher: Tensor,
    y_teacher: Tensor,
    eps: float = DEFAULT_EPS,
    eps_teacher: float = DEFAULT_EPS_TEACHER,
    group=None,
    *,
    cost: str | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    options: SolverOptions | None = None,
    affinity: str | None = None,
    **solver_options,
) -> Tensor:
    """The global KLOT(K ‖ K*) of :func:`sotalign.klot` over the concatenation of every rank's
    rows (``x``, ``x_teacher``) and columns (``y``, ``y_teacher``), the same value on every rank;
    ``a``, ``b`` are this rank's shards of the weights (scaled to a global mass of one).

    Differentiable wrt ``x`` and ``y``: backward gives this rank the exact gradient of the
    global value wrt its own shards (scaled by its incoming gradient). Under DDP multiply the
    loss by :func:`ddp_scale` (the world size): DDP averages the per-rank gradients, and the
    gradient of the global value is their sum. Warns, like :func:`sotalign.klot`, when a plan
    did not converge. Collective, forward and backward."""
    comm = Comm(group)
    checks = (eps, cost, affinity, options, solver_options)
    tensors = {"x": x, "y": y, "x_teacher": x_teacher, "y_teacher": y_teacher, "a": a, "b": b}

    def validate():
        checked = _validated(*checks, x=x, y=y, x_teacher=x_teacher, y_teacher=y_teacher)
        return {**_shared(*checked), "eps_teacher": validation.check_positive("eps_teacher", eps_teacher)}

    agreed, row_sizes, col_sizes = _agree(comm, "klot", tensors, validate)
    eps, cost, options = _validated(*checks, x=x, y=y)
    dtype = validation.compute_dtype(x, y, x_teacher, y_teacher)
    x, y = (t.contiguous() for t in ot_problem.cost_features(cost, x.to(dtype), y.to(dtype)))
    x_teacher, y_teacher = (
        t.contiguous()
        for t in ot_problem.cost_features(cost, x_teacher.detach().to(dtype), y_teacher.detach().to(dtype))
    )
    setup = _setup(comm, options, x, y, row_sizes, col_sizes, min(x.shape[1], x_teacher.shape[1]), dtype, 2)
    eps_pair = (eps, agreed["eps_teacher"])
    return _GlobalKLOT.apply(x, y, x_teacher, y_teacher, a, b, setup, cost, eps_pair, options)
