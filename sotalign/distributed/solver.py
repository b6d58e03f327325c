r"""Sinkhorn over rows and columns sharded across ranks.

Rank r holds rows x_r (n_r×d) and columns y_r (m_r×d); the problem is the one on the
concatenations X = [x_0; x_1; …] (n = Σ n_r) and Y = [y_0; …] (m = Σ m_r), uniform marginals
a = 1/n, b = 1/m, affinity K = X Yᵀ. Rank r owns the potentials of its rows f_r and of its
columns g_r. The half-steps of :mod:`sotalign.ot.sinkhorn` need, for rank r,

    LSE_j [(K_ij + g_j)/ε]  over all columns j    (its rows i),
    LSE_i [(K_ij + f_i)/ε]  over all rows i       (its columns j),

i.e. blocks K_rs = x_r y_sᵀ for every s. Two ways to get them, both built on the same backend
primitives (``lse_rows`` / ``lse_cols`` of one block, :mod:`sotalign.kernels.base`):

* **ring** (``path="online"``): the column shards (y_s, g_s) pass once around the ring for a row
  half-step, rank r merging ``lse_rows(x_r y_sᵀ, g_s)`` into its running LSE (``logaddexp`` of
  the per-shard (max, Σexp) partials); the row shards (x_s, f_s) do the same for a column
  half-step. Every rank holds its own shard and two in transit; the transfer of the next
  shard overlaps the compute on the current one. Per iteration every rank sends
  (n − n_next + m − m_next)·(d + 1) numbers: O((n + m)·d), all ranks together
  (W − 1)·(n + m)·(d + 1).
* **block row** (``path="dense"``): the column shards pass around once per solve so that rank
  r stores its block row K_r = x_r Yᵀ (n_r×m, the dense path's memory divided by W). A column
  half-step all-reduces the per-rank column partials (max, then Σexp: 2·m numbers), after
  which every rank holds the whole LSE, so g is kept whole on every rank (m numbers) and a row
  half-step needs no communication. Per iteration O(m) — nothing of size d.

``path="auto"`` takes the block row when the dense path of :func:`sotalign.ot.dispatch.choose_route`
would store K for an n_max×m problem on every rank, else the ring.

Either operator is a :class:`~sotalign.kernels.base.Backend` over the sharded K, so the solve is
the one loop of :func:`sotalign.ot.sinkhorn.solve` on :meth:`~RingOperator.problem`, whose
stopping test sums the row error over the ranks (every rank stops at the same iteration).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import Affinity, Backend
from ..ot.problem import Marginal, Problem
from .comm import Comm, circulate


@dataclass(frozen=True)
class Shards:
    """This rank's rows ``x`` and columns ``y`` of a global K = X Yᵀ, and every rank's sizes."""

    comm: Comm
    x: Tensor
    y: Tensor
    row_sizes: tuple[int, ...]
    col_sizes: tuple[int, ...]

    @property
    def n(self) -> int:
        return sum(self.row_sizes)

    @property
    def m(self) -> int:
        return sum(self.col_sizes)

    @property
    def row_offset(self) -> int:
        return sum(self.row_sizes[: self.comm.rank])

    @property
    def col_offset(self) -> int:
        return sum(self.col_sizes[: self.comm.rank])


class RingOperator(Backend):
    """The global half-step reductions of a sharded K, by passing shards around the ring: a
    :class:`~sotalign.kernels.base.Backend` whose ``row_update``/``column_update`` (the base
    class's) run on these global reductions."""

    path = "online"
    #: g holds this rank's columns only.
    whole_columns = False

    def __init__(self, backend: Backend, K: Shards):
        self.backend, self.K = backend, K

    def own_columns(self, g: Tensor) -> Tensor:
        return g

    def problem(self, rows: Marginal, cols: Marginal) -> Problem:
        """The global problem on this K: ``rows`` holds this rank's rows, ``cols`` its columns
        (all of them when ``whole_columns``)."""
        return Problem(self, self.K, rows, cols, self.K.comm.all_reduce, self.own_columns)  # type: ignore[arg-type]

    def lse_rows(self, K: Shards, g: Tensor, eps: float) -> Tensor:
        total = None
        for _, (y, g_s) in circulate(K.comm, (K.y, g), K.col_sizes):
            part = self.backend.lse_rows(Affinity.from_features(K.x, y), g_s, eps)
            total = part if total is None else torch.logaddexp(total, part)
        return total

    def lse_cols(self, K: Shards, f: Tensor, eps: float) -> Tensor:
        total = None
        for _, (x, f_s) in circulate(K.comm, (K.x, f), K.row_sizes):
            part = self.backend.lse_cols(Affinity.from_features(x, K.y), f_s, eps)
            total = part if total is None else torch.logaddexp(total, part)
        return total

    def spread(self) -> float:
        """2·max‖x_i‖·max‖y_j‖ over all ranks (:func:`sotalign.ot.sinkhorn.affinity_spread`)."""
        norms = torch.stack([self.K.x.norm(dim=1).max(), self.K.y.norm(dim=1).max()])
        norms = self.K.comm.all_reduce(norms, torch.distributed.ReduceOp.MAX)
        return 2.0 * float(norms[0] * norms[1])

    def klot_value(self, f, g, eps, teacher: RingOperator, f_t, g_t, eps_t) -> Tensor:
        """Σ_ij P*_ij (log P*_ij − log P_ij) over the whole K, in float64, on every rank."""
        K, K_t = self.K, teacher.K
        total = torch.zeros((), dtype=torch.float64, device=K.x.device)
        for _, (y, y_t, g_s, g_t_s) in circulate(K.comm, (K.y, K_t.y, g, g_t), K.col_sizes):
            total += self.backend.klot_value(
                Affinity.from_features(K.x, y),
                f,
                g_s,
                eps,
                Affinity.from_features(K_t.x, y_t),
                f_t,
                g_t_s,
                eps_t,
            ).double()
        return K.comm.all_reduce(total)


class BlockRowOperator(RingOperator):
    """The same reductions from this rank's stored block row K_r = x_r Yᵀ (n_r×m)."""

    path = "dense"
    #: g holds every column (the same on every rank).
    whole_columns = True

    def __init__(self, backend: Backend, K: Shards):
        self.backend, self.K = backend, K
        row = K.x.new_empty((K.x.shape[0], K.m))
        for owner, (y,) in circulate(K.comm, (K.y,), K.col_sizes):
            start = sum(K.col_sizes[:owner])
            row[:, start : start + y.shape[0]] = Affinity.from_features(K.x, y).materialize().dense
        self.row = Affinity.from_dense(row)

    def own_columns(self, g: Tensor) -> Tensor:
        return g[self.K.col_offset : self.K.col_offset + self.K.y.shape[0]]

    def lse_rows(self, K: Shards, g: Tensor, eps: float) -> Tensor:
        return self.backend.lse_rows(self.row, g, eps)

    def lse_cols(self, K: Shards, f: Tensor, eps: float) -> Tensor:
        return K.comm.logsumexp(self.backend.lse_cols(self.row, f, eps))

    def spread(self) -> float:
        """max K − min K over the whole K."""
        ends = torch.stack([self.row.dense.max(), -self.row.dense.min()])
        ends = self.K.comm.all_reduce(ends, torch.distributed.ReduceOp.MAX)
        return float(ends[0] + ends[1])

    def klot_value(self, f, g, eps, teacher: BlockRowOperator, f_t, g_t, eps_t) -> Tensor:
        local = self.backend.klot_value(self.row, f, g, eps, teacher.row, f_t, g_t, eps_t)
        return self.K.comm.all_reduce(local.double())


def shard_operator(backend: Backend, K: Shards, dense: bool) -> RingOperator:
    return BlockRowOperator(backend, K) if dense else RingOperator(backend, K)
