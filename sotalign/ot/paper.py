"""The SOTAlign authors' dense algorithm, as published with the paper (``src/klot.py``).

Kept as an independent oracle and as the baseline the benchmarks measure against. It works
on log-kernel units (u = f/ε, v = g/ε), stores every n×m intermediate, and gets the
Theorem-5.1 gradient through the surrogate ``Σ (P − P*).detach() ∘ K / ε``. sotalign's own
solver must reproduce its values and gradients; nothing else in the library calls it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _iteration(log_kernel: Tensor, v: Tensor, log_a: float, log_b: float) -> tuple[Tensor, Tensor]:
    """One alternating iteration of the authors' loop."""
    u = log_a - torch.logsumexp(log_kernel + v[None, :], dim=1)
    v = log_b - torch.logsumexp(log_kernel + u[:, None], dim=0)
    return u, v


_compiled_iteration = None


def _compiled_step():
    """The loop body under ``torch.compile``, compiled once (the benchmarks' compiled peer)."""
    global _compiled_iteration
    if _compiled_iteration is None:
        _compiled_iteration = torch.compile(_iteration)
    return _compiled_iteration


def paper_sinkhorn(
    K: Tensor, eps: float, n_iters: int = 100, symmetric: bool = True, *, compiled: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense log-domain Sinkhorn on ``K / eps`` with uniform marginals of mass one.

    Returns ``(log P, u, v)`` where ``log P_ij = K_ij/eps + u_i + v_j``. ``compiled=True``
    runs the loop body through ``torch.compile`` (Inductor fuses each ``logsumexp(K/ε + v)``
    into one pass over the stored matrix: what a compiler can do for the dense algorithm).
    """
    step = _compiled_step() if compiled else _iteration
    log_kernel = K / eps
    n, m = K.shape
    log_a, log_b = -math.log(n), -math.log(m)
    u = torch.zeros(n, dtype=K.dtype, device=K.device)
    v = torch.zeros(m, dtype=K.dtype, device=K.device)
    for _ in range(n_iters):
        u, v = step(log_kernel, v, log_a, log_b)
    if symmetric:
        u_extra = log_a - torch.logsumexp(log_kernel + v[None, :], dim=1)
        v_extra = log_b - torch.logsumexp(log_kernel + u[:, None], dim=0)
        u, v = 0.5 * (u + u_extra), 0.5 * (v + v_extra)
    log_plan = log_kernel + u[:, None] + v[None, :]
    return log_plan, u, v


def paper_klot(
    K: Tensor,
    K_teacher: Tensor,
    eps: float = 0.05,
    eps_teacher: float = 0.01,
    n_iters: int = 100,
    *,
    compiled: bool = False,
) -> Tensor:
    """KL(P* ‖ P) with the surrogate-gradient trick of the authors' code."""
    with torch.no_grad():
        log_plan, _, _ = paper_sinkhorn(K, eps, n_iters, compiled=compiled)
        log_plan_teacher, _, _ = paper_sinkhorn(K_teacher, eps_teacher, n_iters, compiled=compiled)
        plan, plan_teacher = log_plan.exp(), log_plan_teacher.exp()
    surrogate = ((plan - plan_teacher).detach() * K).sum() / eps
    value = (plan_teacher * (log_plan_teacher - log_plan)).sum()
    return (value - surrogate).detach() + surrogate


def paper_klot_features(
    x: Tensor, y: Tensor, x_teacher: Tensor, y_teacher: Tensor, *args, **kwargs
) -> Tensor:
    """The paper's step on features: K = cos(x, y), K* = cos(x*, y*), then :func:`paper_klot`
    (the other arguments are its)."""

    def cosine(a: Tensor, b: Tensor) -> Tensor:
        return torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T

    return paper_klot(cosine(x, y), cosine(x_teacher, y_teacher), *args, **kwargs)
