"""The ``reference`` backend: every primitive written straight from the maths, densely.

This is the oracle the other backends are tested against (in float64). It stores K, P and
P* whole, so it is O(n·m) in memory and never chosen by ``backend="auto"``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Affinity, Backend, check_plan_affinity, check_plan_factor


def log_plan(K: Affinity, f: Tensor, g: Tensor, eps: float) -> Tensor:
    """log P_ij = (f_i + g_j + K_ij) / ε (for every problem of a batch)."""
    return (f[..., :, None] + g[..., None, :] + K.materialize().dense) / eps


class ReferenceBackend(Backend):
    name = "reference"
    online = False

    def lse_rows(self, K, bias, eps):
        return torch.logsumexp((K.materialize().dense + bias[..., None, :]) / eps, dim=-1)

    def lse_cols(self, K, bias, eps):
        return torch.logsumexp((K.materialize().dense + bias[..., :, None]) / eps, dim=-2)

    def klot_value(self, K, f, g, eps, K_t, f_t, g_t, eps_t):
        log_p_teacher = log_plan(K_t, f_t, g_t, eps_t).double()
        log_p_student = log_plan(K, f, g, eps).double()
        # entries where P* = 0 (zero weights) add nothing, not 0 · (−inf − −inf)
        terms = log_p_teacher.exp() * (log_p_teacher - log_p_student)
        return torch.where(log_p_teacher > -torch.inf, terms, 0.0).sum().to(K.dtype)

    def klot_grad_dense(self, K, f, g, eps, K_t, f_t, g_t, eps_t):
        return (log_plan(K, f, g, eps).exp() - log_plan(K_t, f_t, g_t, eps_t).exp()) / eps

    def klot_grad_features(self, K, f, g, eps, K_t, f_t, g_t, eps_t):
        G = self.klot_grad_dense(K, f, g, eps, K_t, f_t, g_t, eps_t)
        return G @ K.y, G.mT @ K.x

    def plan_matmul(self, K, f, g, eps, V):
        check_plan_factor("V", V, K.shape[1], K)
        return log_plan(K, f, g, eps).exp() @ V

    def plan_t_matmul(self, K, f, g, eps, U):
        check_plan_factor("U", U, K.shape[0], K)
        return log_plan(K, f, g, eps).exp().mT @ U

    def plan_inner(self, K, f, g, eps, K2):
        check_plan_affinity(K, K2)
        plan = log_plan(K, f, g, eps).double().exp()
        return (plan * K2.materialize().dense.double()).sum(dim=(-2, -1)).to(K.dtype)
