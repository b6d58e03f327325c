"""The ``torch`` backend: chunked (online) primitives in plain torch, for any device.

K is visited in blocks of rows, each block recomputed from the features (``x[rows] @ yᵀ``)
or sliced from a stored K. Column reductions are merged across blocks with ``logaddexp``,
so memory is O(block·m + (n+m)·d) in the forward *and* backward passes.
"""

from __future__ import annotations

import torch

from .base import Affinity, Backend

#: Size of one block of K (a few temporaries of this size exist per block). Above glibc's
#: 32 MiB ceiling for its dynamic mmap threshold, so each block is unmapped when freed;
#: smaller blocks were served from the heap and left it fragmented (1.4 GB resident
#: after one half-step at n = 24000).
BLOCK_BYTES = 64 * 2**20


def row_blocks(K: Affinity):
    """(start, stop) ranges of rows whose K block stays under ``BLOCK_BYTES``."""
    n, m = K.shape
    step = max(1, BLOCK_BYTES // (m * K.dtype.itemsize))
    for start in range(0, n, step):
        yield start, min(start + step, n)


def log_plan_rows(K: Affinity, f, g, eps, start, stop):
    """log P[start:stop] = (f_i + g_j + K_ij) / ε for one block of rows."""
    return (K.rows(start, stop) + f[start:stop, None] + g[None, :]) / eps


class TorchChunkedBackend(Backend):
    name = "torch"

    def lse_rows(self, K, bias, eps):
        return torch.cat([torch.logsumexp((K.rows(i, j) + bias[None, :]) / eps, dim=1)
                          for i, j in row_blocks(K)])

    def lse_cols(self, K, bias, eps):
        total = None
        for i, j in row_blocks(K):
            block = torch.logsumexp((K.rows(i, j) + bias[i:j, None]) / eps, dim=0)
            total = block if total is None else torch.logaddexp(total, block)
        return total

    def klot_value(self, K, f, g, eps, K_t, f_t, g_t, eps_t):
        total = torch.zeros((), dtype=torch.float64, device=K.device)
        for i, j in row_blocks(K):
            log_p_teacher = log_plan_rows(K_t, f_t, g_t, eps_t, i, j)
            log_p_student = log_plan_rows(K, f, g, eps, i, j)
            total += (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dtype=torch.float64)
        return total.to(K.dtype)

    def _plan_difference_rows(self, K, f, g, eps, K_t, f_t, g_t, eps_t, i, j):
        """G[i:j] = (P − P*)[i:j] / ε."""
        return (log_plan_rows(K, f, g, eps, i, j).exp()
                - log_plan_rows(K_t, f_t, g_t, eps_t, i, j).exp()) / eps

    def klot_grad_features(self, K, f, g, eps, K_t, f_t, g_t, eps_t):
        grad_x = torch.empty_like(K.x)
        grad_y = torch.zeros_like(K.y)
        for i, j in row_blocks(K):
            G = self._plan_difference_rows(K, f, g, eps, K_t, f_t, g_t, eps_t, i, j)
            grad_x[i:j] = G @ K.y
            grad_y += G.T @ K.x[i:j]
        return grad_x, grad_y

    def klot_grad_dense(self, K, f, g, eps, K_t, f_t, g_t, eps_t):
        G = torch.empty(K.shape, dtype=K.dtype, device=K.device)
        for i, j in row_blocks(K):
            G[i:j] = self._plan_difference_rows(K, f, g, eps, K_t, f_t, g_t, eps_t, i, j)
        return G
