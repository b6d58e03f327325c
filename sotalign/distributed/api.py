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
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels import Affinity, Backend
from ..ot import validation as check
from ..ot.dispatch import choose_route
from ..ot.options import SolverOptions
from .comm import Carry, Comm, circulate
from .solver import Shards, marginal_error, operator, solve


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
    """What the ranks agreed on: the group, shard sizes, the backend and path of this rank."""

    comm: Comm
    backend: Backend
    dense: bool
    row_sizes: tuple[int, ...]
    col_sizes: tuple[int, ...]


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


def _validated(affinity, eps, solver: dict, **tensors):
    """The checks of the single-process front (the tensors here, the solver options by
    :class:`~sotalign.ot.options.SolverOptions`); returns the options as the solvers take them."""
    device = check.check_structure(**tensors)
    check.check_finite(**tensors)
    check.check_affinity(affinity)
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
    options = dataclasses.asdict(SolverOptions(**solver))
    del options["cuda_graph"]  # single-process only
    return {"eps": check.check_positive("eps", eps), **options}


def _agree(comm: Comm, what: str, tensors: dict, validate) -> tuple[dict, tuple, tuple]:
    """Validate here, then check once across ranks; returns (options, row sizes, column sizes)."""
    try:
        options = validate()
        x, y = tensors["x"], tensors["y"]
        dims = {f"d_{name}": t.shape[1] for name, t in tensors.items() if isinstance(t, Tensor)}
        shared = {
            "function": what,
            **options,
            "affinity": tensors["affinity"],
            "backend": tensors["backend"],
            "path": tensors["path"],
            "precision": tensors["precision"],
            **dims,
            "dtype": str(check.compute_dtype(*(t for t in tensors.values() if isinstance(t, Tensor)))),
            "device": x.device.type,
        }
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


def _prepare(affinity: str, dtype, *tensors: Tensor) -> list[Tensor]:
    tensors = [t.to(dtype) for t in tensors]
    if affinity == "cosine":
        tensors = [check.unit_rows(t) for t in tensors]
    return [t.contiguous() for t in tensors]


def sinkhorn(
    x: Tensor,
    y: Tensor,
    eps: float = 0.05,
    n_iters: int = 100,
    group=None,
    *,
    tol: float | None = None,
    affinity: str = "cosine",
    backend: str = "auto",
    path: str = "auto",
    check_every: int = 10,
    symmetric: bool = True,
    memory_budget: float | None = None,
    eps_scaling: float | None = None,
    precision: str = "auto",
) -> DistributedSinkhornResult:
    """Entropic OT between the rows of X = [x_0; x_1; …] and Y = [y_0; y_1; …] (concatenated
    over the ranks of ``group``); returns this rank's f (its rows) and g (its columns).

    The same maths and options as :func:`sotalign.sinkhorn` (uniform marginals; ``tol`` is
    decided on the global marginal error, so every rank stops at the same iteration).
    ``path="online"`` passes the shards around the ring every half-step (O((n+m)·d) sent per
    iteration, O(shard) memory); ``path="dense"`` stores this rank's block row of K once
    (n_r×m) and exchanges only O(n+m) numbers per iteration. Collective: every rank calls it."""
    comm = Comm(group)
    tensors = {"x": x, "y": y, "affinity": affinity, "backend": backend, "path": path, "precision": precision}
    solver = dict(
        n_iters=n_iters,
        tol=tol,
        check_every=check_every,
        symmetric=symmetric,
        eps_scaling=eps_scaling,
        backend=backend,
        path=path,
        precision=precision,
        memory_budget=memory_budget,
    )
    options, row_sizes, col_sizes = _agree(
        comm,
        "sinkhorn",
        tensors,
        lambda: _validated(affinity, eps, solver, x=x, y=y),
    )
    dtype = check.compute_dtype(x, y)
    x, y = _prepare(affinity, dtype, x.detach(), y.detach())
    chosen, dense = _route(
        comm,
        backend,
        path,
        x.device,
        row_sizes,
        col_sizes,
        x.shape[1],
        dtype,
        1,
        options["memory_budget"],
        precision,
    )
    K = Shards(comm, x, y, row_sizes, col_sizes)
    eps = options["eps"]
    with torch.no_grad():
        op = operator(chosen, K, dense)
        f, g, done = solve(
            op,
            eps,
            options["n_iters"],
            tol=options["tol"],
            check_every=options["check_every"],
            symmetric=options["symmetric"],
            eps_scaling=options["eps_scaling"],
        )
        error = marginal_error(op, f, g, eps)
    return DistributedSinkhornResult(
        f, op.own_columns(g), eps, done, error, chosen.name, op.path, K.n, K.m, K.row_offset, K.col_offset
    )


class _GlobalKLOT(torch.autograd.Function):
    """The global KLOT value (forward) and this rank's share of its gradient (backward)."""

    @staticmethod
    def forward(ctx, x, y, x_teacher, y_teacher, setup: _Setup, options: dict):
        comm = setup.comm
        K = Shards(comm, x, y, setup.row_sizes, setup.col_sizes)
        K_t = Shards(comm, x_teacher, y_teacher, setup.row_sizes, setup.col_sizes)
        eps, eps_t = options["eps"], options["eps_teacher"]
        loop = {key: options[key] for key in ("tol", "check_every", "symmetric", "eps_scaling")}
        op, op_t = operator(setup.backend, K, setup.dense), operator(setup.backend, K_t, setup.dense)
        f, g, _ = solve(op, eps, options["n_iters"], **loop)
        f_t, g_t, _ = solve(op_t, eps_t, options["n_iters"], **loop)
        value = op.klot_value(f, g, eps, op_t, f_t, g_t, eps_t)
        g, g_t = op.own_columns(g), op_t.own_columns(g_t)
        ctx.save_for_backward(x, y, x_teacher, y_teacher, f, g, f_t, g_t)
        ctx.setup, ctx.eps = setup, (eps, eps_t)
        return value.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_value):
        x, y, x_t, y_t, f, g, f_t, g_t = ctx.saved_tensors
        setup, (eps, eps_t) = ctx.setup, ctx.eps
        grad_x = torch.zeros_like(x)
        carry = Carry(setup.comm, list(setup.col_sizes))
        for _, (y_s, y_t_s, g_s, g_t_s) in circulate(setup.comm, (y, y_t, g, g_t), setup.col_sizes):
            gx, gy = setup.backend.klot_grad_features(
                Affinity.from_features(x, y_s),
                f,
                g_s,
                eps,
                Affinity.from_features(x_t, y_t_s),
                f_t,
                g_t_s,
                eps_t,
            )
            grad_x += gx
            carry.add(gy)
        return grad_value * grad_x, grad_value * carry.result(), None, None, None, None


def klot(
    x: Tensor,
    y: Tensor,
    x_teacher: Tensor,
    y_teacher: Tensor,
    eps: float = 0.05,
    eps_teacher: float = 0.01,
    n_iters: int = 100,
    group=None,
    *,
    affinity: str = "cosine",
    backend: str = "auto",
    path: str = "auto",
    tol: float | None = None,
    check_every: int = 10,
    symmetric: bool = True,
    memory_budget: float | None = None,
    eps_scaling: float | None = None,
    precision: str = "auto",
) -> Tensor:
    """The global KLOT(K ‖ K*) of :func:`sotalign.klot` over the concatenation of every rank's
    rows (``x``, ``x_teacher``) and columns (``y``, ``y_teacher``), the same value on every rank.

    Differentiable wrt ``x`` and ``y``: backward gives this rank the exact gradient of the
    global value wrt its own shards (scaled by its incoming gradient). Under DDP multiply the
    loss by :func:`ddp_scale` (the world size): DDP averages the per-rank gradients, and the
    gradient of the global value is their sum. Collective, forward and backward."""
    comm = Comm(group)
    tensors = {
        "x": x,
        "y": y,
        "x_teacher": x_teacher,
        "y_teacher": y_teacher,
        "affinity": affinity,
        "backend": backend,
        "path": path,
        "precision": precision,
    }

    solver = dict(
        n_iters=n_iters,
        tol=tol,
        check_every=check_every,
        symmetric=symmetric,
        eps_scaling=eps_scaling,
        backend=backend,
        path=path,
        precision=precision,
        memory_budget=memory_budget,
    )

    def validate():
        options = _validated(affinity, eps, solver, x=x, y=y, x_teacher=x_teacher, y_teacher=y_teacher)
        return {**options, "eps_teacher": check.check_positive("eps_teacher", eps_teacher)}

    options, row_sizes, col_sizes = _agree(comm, "klot", tensors, validate)
    dtype = check.compute_dtype(x, y, x_teacher, y_teacher)
    x, y = _prepare(affinity, dtype, x, y)
    x_teacher, y_teacher = _prepare(affinity, dtype, x_teacher.detach(), y_teacher.detach())
    chosen, dense = _route(
        comm,
        backend,
        path,
        x.device,
        row_sizes,
        col_sizes,
        min(x.shape[1], x_teacher.shape[1]),
        dtype,
        2,
        options["memory_budget"],
        precision,
    )
    setup = _Setup(comm, chosen, dense, row_sizes, col_sizes)
    return _GlobalKLOT.apply(x, y, x_teacher, y_teacher, setup, options)
