"""The ``torch`` backend: chunked (online) primitives in plain torch, for any device.

K is visited in blocks of rows, each block recomputed from the features (``x[rows] @ yᵀ``)
or copied from a stored K into a workspace allocated once per call, and every step on it is
in place. Column reductions are merged across blocks with ``logaddexp``. Memory is
O(block + (n+m)·d) in the forward *and* backward passes, and no allocation churns per block
(fresh blocks cost page faults on CPU and fragmented glibc's heap). A batch of problems is
visited the same way, each block holding those rows of every problem (batched matmuls).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Affinity, Backend, block_rows, row_blocks


def workspace(K: Affinity) -> Tensor:
    """Room for one block of :func:`~sotalign.kernels.base.block_rows` rows of every problem
    of K (flat, so that each block is a contiguous view); each primitive holds at most two."""
    return torch.empty((K.batch or 1) * block_rows(K) * K.shape[1], dtype=K.dtype, device=K.device)


def scaled_block(
    K: Affinity,
    start: int,
    stop: int,
    eps: float,
    work: Tensor,
    row_bias: Tensor | None = None,
    col_bias: Tensor | None = None,
) -> Tensor:
    """(K_ij + row_bias_i + col_bias_j) / ε for rows start:stop of every problem, written into
    ``work``: shape (stop − start, m), or (B, stop − start, m) for a batch."""
    shape = (stop - start, K.shape[1]) if K.batch is None else (K.batch, stop - start, K.shape[1])
    block = work[: math.prod(shape)].view(shape)
    if K.is_dense:
        block.copy_(K.dense[..., start:stop, :])
    else:
        torch.matmul(K.x[..., start:stop, :], K.y.mT, out=block)
    if row_bias is not None:
        block.add_(row_bias[..., start:stop, None])
    if col_bias is not None:
        block.add_(col_bias[..., None, :])
    return block.div_(eps)


def lse_in_place(block: Tensor, dim: int) -> Tensor:
    """log Σ exp(block) along ``dim``, max-shifted; overwrites ``block``. A slice of only −inf
    (zero weights) gives −inf: its shift is 0, not −inf (which would give −inf + inf = NaN)."""
    top = block.amax(dim=dim, keepdim=True)
    top.masked_fill_(top == -torch.inf, 0.0)
    return block.sub_(top).exp_().sum(dim=dim).log_().add_(top.squeeze(dim))


class TorchChunkedBackend(Backend):
    name = "torch"

    def lse_rows(self, K, bias, eps):
        work = workspace(K)
        return torch.cat(
            [lse_in_place(scaled_block(K, i, j, eps, work, col_bias=bias), dim=-1) for i, j in row_blocks(K)],
            dim=-1,
        )

    def lse_cols(self, K, bias, eps):
        work = workspace(K)
        total = None
        for i, j in row_blocks(K):
            block = lse_in_place(scaled_block(K, i, j, eps, work, row_bias=bias), dim=-2)
            total = block if total is None else torch.logaddexp(total, block)
        return total

    def klot_value(self, K, f, g, eps, K_t, f_t, g_t, eps_t):
        work, work_t = workspace(K), workspace(K)
        total = torch.zeros((), dtype=torch.float64, device=K.device)
        for i, j in row_blocks(K):
            log_p = scaled_block(K, i, j, eps, work, f, g)
            log_p_teacher = scaled_block(K_t, i, j, eps_t, work_t, f_t, g_t)
            log_ratio = log_p.sub_(log_p_teacher).neg_()  # log P* − log P
            plan_teacher = log_p_teacher.exp_()
            # entries where P* = 0 (zero weights) add nothing, not 0 · (log P* − log P) = NaN
            terms = log_ratio.mul_(plan_teacher).masked_fill_(plan_teacher == 0, 0.0)
            total += terms.sum(dtype=torch.float64)
        return total.to(K.dtype)

    def _plan_difference(self, K, f, g, eps, K_t, f_t, g_t, eps_t, i, j, work, work_t):
        """G[i:j] = (P − P*)[i:j] / ε, in ``work``."""
        plan = scaled_block(K, i, j, eps, work, f, g).exp_()
        plan_teacher = scaled_block(K_t, i, j, eps_t, work_t, f_t, g_t).exp_()
        return plan.sub_(plan_teacher).div_(eps)

    def klot_grad_features(self, K, f, g, eps, K_t, f_t, g_t, eps_t):
        work, work_t = workspace(K), workspace(K)
        grad_x = torch.empty_like(K.x)
        grad_y = torch.zeros_like(K.y)
        for i, j in row_blocks(K):
            G = self._plan_difference(K, f, g, eps, K_t, f_t, g_t, eps_t, i, j, work, work_t)
            torch.mm(G, K.y, out=grad_x[i:j])
            grad_y.addmm_(G.T, K.x[i:j])
        return grad_x, grad_y

    def klot_grad_dense(self, K, f, g, eps, K_t, f_t, g_t, eps_t):
        work, work_t = workspace(K), workspace(K)
        G = torch.empty(K.shape, dtype=K.dtype, device=K.device)
        for i, j in row_blocks(K):
            G[i:j] = self._plan_difference(K, f, g, eps, K_t, f_t, g_t, eps_t, i, j, work, work_t)
        return G
