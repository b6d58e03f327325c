r"""KLOT, the unpaired loss of SOTAlign (paper Eq. 12), with its exact gradient.

For a student affinity K (ε, default 0.05) and a teacher affinity K* (ε*, default 0.01),

    KLOT(K ‖ K*) = KL(P* ‖ P),     P = OT_ε(K),  P* = OT_ε*(K*),

    ∂KLOT / ∂K = (P − P*) / ε      (Theorem 5.1 / C.4: no backpropagation through Sinkhorn).

Forward runs both Sinkhorn solves without autograd, then one streaming pass for the value
``Σ P*_ij (log P*_ij − log P_ij)``. Backward, for K = x̂ ŷᵀ, forms G = (P − P*)/ε tile by tile
and returns ``G ŷ`` and ``Gᵀ x̂`` scaled by the incoming gradient; the chain rule through the
cosine normalisation is left to autograd. Only features and potentials are saved, so on an
online path nothing n×m exists between forward and backward. The teacher is a constant.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..kernels import Affinity
from . import validation as check
from .dispatch import DEFAULT_MEMORY_BUDGET, Route, choose_route
from .sinkhorn import solve, uniform_log_weights


@dataclass(frozen=True)
class KLOTConfig:
    """Everything the autograd functions need besides tensors."""

    route: Route
    eps: float
    eps_teacher: float
    n_iters: int
    tol: float | None
    check_every: int
    symmetric: bool

    def solve_both(self, K: Affinity, K_teacher: Affinity):
        """Student and teacher potentials (f, g, f*, g*) on this route."""
        n, m = K.shape
        log_a = uniform_log_weights(n, K.dtype, K.device)
        log_b = uniform_log_weights(m, K.dtype, K.device)
        options = dict(tol=self.tol, check_every=self.check_every, symmetric=self.symmetric)
        backend = self.route.backend
        f, g, _ = solve(backend, K, self.eps, self.n_iters, log_a, log_b, **options)
        f_t, g_t, _ = solve(backend, K_teacher, self.eps_teacher, self.n_iters, log_a, log_b, **options)
        return f, g, f_t, g_t


class KLOTFeaturesFunction(torch.autograd.Function):
    """KLOT for K = x yᵀ, K* = x* y*ᵀ (rows already normalised for cosine)."""

    @staticmethod
    def forward(ctx, x, y, x_teacher, y_teacher, config: KLOTConfig):
        K = config.route.prepare(Affinity.from_features(x, y))
        K_teacher = config.route.prepare(Affinity.from_features(x_teacher, y_teacher))
        f, g, f_t, g_t = config.solve_both(K, K_teacher)
        value = config.route.backend.klot_value(K, f, g, config.eps, K_teacher, f_t, g_t,
                                                config.eps_teacher)
        ctx.save_for_backward(x, y, x_teacher, y_teacher, f, g, f_t, g_t)
        ctx.config = config
        return value

    @staticmethod
    def backward(ctx, grad_output):
        x, y, x_teacher, y_teacher, f, g, f_t, g_t = ctx.saved_tensors
        config = ctx.config
        grad_x, grad_y = config.route.backend.klot_grad_features(
            Affinity.from_features(x, y), f, g, config.eps,
            Affinity.from_features(x_teacher, y_teacher), f_t, g_t, config.eps_teacher)
        return grad_output * grad_x, grad_output * grad_y, None, None, None


class KLOTDenseFunction(torch.autograd.Function):
    """KLOT for given n×m affinities K and K*."""

    @staticmethod
    def forward(ctx, K, K_teacher, config: KLOTConfig):
        K_aff, K_teacher_aff = Affinity.from_dense(K), Affinity.from_dense(K_teacher)
        f, g, f_t, g_t = config.solve_both(K_aff, K_teacher_aff)
        value = config.route.backend.klot_value(K_aff, f, g, config.eps, K_teacher_aff, f_t, g_t,
                                                config.eps_teacher)
        ctx.save_for_backward(K, K_teacher, f, g, f_t, g_t)
        ctx.config = config
        return value

    @staticmethod
    def backward(ctx, grad_output):
        K, K_teacher, f, g, f_t, g_t = ctx.saved_tensors
        config = ctx.config
        G = config.route.backend.klot_grad_dense(
            Affinity.from_dense(K), f, g, config.eps,
            Affinity.from_dense(K_teacher), f_t, g_t, config.eps_teacher)
        return grad_output * G, None, None


def _config(backend, path, device, n, m, feature_dim, dtype, memory_budget, eps, eps_teacher,
            n_iters, tol, check_every, symmetric) -> KLOTConfig:
    eps = check.check_positive("eps", eps)
    eps_teacher = check.check_positive("eps_teacher", eps_teacher)
    n_iters = check.check_count("n_iters", n_iters)
    check_every = check.check_count("check_every", check_every)
    if tol is not None:
        tol = check.check_positive("tol", tol)
    route = choose_route(backend, path, device, n, m, feature_dim, dtype, 2, memory_budget)
    return KLOTConfig(route, eps, eps_teacher, n_iters, tol, check_every, bool(symmetric))


def klot(x: Tensor, y: Tensor, x_teacher: Tensor, y_teacher: Tensor, eps: float = 0.05,
         eps_teacher: float = 0.01, n_iters: int = 100, affinity: str = "cosine",
         backend: str = "auto", *, path: str = "auto", tol: float | None = None,
         check_every: int = 10, symmetric: bool = True,
         memory_budget: float = DEFAULT_MEMORY_BUDGET) -> Tensor:
    """KLOT(K ‖ K*) with K = aff(x, y) (student) and K* = aff(x_teacher, y_teacher) (teacher).

    ``x`` (n×d) and ``y`` (m×d) are the student's image and text features; the teacher's
    features ``x_teacher`` (n×d*) and ``y_teacher`` (m×d*) describe the same rows and
    columns in the teacher's space. Returns a scalar tensor, differentiable wrt x and y with
    the exact gradient of Theorem 5.1. See :func:`sotalign.sinkhorn` for the options.
    """
    device = check.check_matrices(x=x, y=y, x_teacher=x_teacher, y_teacher=y_teacher)
    check.check_affinity(affinity)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same feature dimension, got {x.shape[1]} and {y.shape[1]}")
    if x_teacher.shape[1] != y_teacher.shape[1]:
        raise ValueError("x_teacher and y_teacher must have the same feature dimension, "
                         f"got {x_teacher.shape[1]} and {y_teacher.shape[1]}")
    if x_teacher.shape[0] != x.shape[0] or y_teacher.shape[0] != y.shape[0]:
        raise ValueError("teacher rows must match the student rows: x has "
                         f"{x.shape[0]} and x_teacher {x_teacher.shape[0]}; "
                         f"y has {y.shape[0]} and y_teacher {y_teacher.shape[0]}")
    dtype = check.compute_dtype(x, y, x_teacher, y_teacher)
    x, y = x.to(dtype), y.to(dtype)
    x_teacher, y_teacher = x_teacher.detach().to(dtype), y_teacher.detach().to(dtype)
    if affinity == "cosine":
        normalize = torch.nn.functional.normalize
        x, y = normalize(x, dim=1), normalize(y, dim=1)
        x_teacher, y_teacher = normalize(x_teacher, dim=1), normalize(y_teacher, dim=1)
    config = _config(backend, path, device, x.shape[0], y.shape[0],
                     min(x.shape[1], x_teacher.shape[1]), dtype, memory_budget, eps, eps_teacher,
                     n_iters, tol, check_every, symmetric)
    return KLOTFeaturesFunction.apply(x.contiguous(), y.contiguous(), x_teacher.contiguous(),
                                      y_teacher.contiguous(), config)


def klot_dense(K: Tensor, K_teacher: Tensor, eps: float = 0.05, eps_teacher: float = 0.01,
               n_iters: int = 100, backend: str = "auto", *, tol: float | None = None,
               check_every: int = 10, symmetric: bool = True) -> Tensor:
    """KLOT(K ‖ K*) for given n×m affinities; differentiable wrt K (gradient (P − P*)/ε)."""
    device = check.check_matrices(K=K, K_teacher=K_teacher)
    if K.shape != K_teacher.shape:
        raise ValueError(f"K and K_teacher must have the same shape, got {tuple(K.shape)} "
                         f"and {tuple(K_teacher.shape)}")
    dtype = check.compute_dtype(K, K_teacher)
    config = _config(backend, "auto", device, K.shape[0], K.shape[1], None, dtype,
                     DEFAULT_MEMORY_BUDGET, eps, eps_teacher, n_iters, tol, check_every, symmetric)
    return KLOTDenseFunction.apply(K.to(dtype).contiguous(),
                                   K_teacher.detach().to(dtype).contiguous(), config)


class KLOTLoss(nn.Module):
    """``KLOTLoss(eps, eps_teacher, n_iters, ...)(x, y, x_teacher, y_teacher)``: see :func:`klot`."""

    def __init__(self, eps: float = 0.05, eps_teacher: float = 0.01, n_iters: int = 100,
                 affinity: str = "cosine", backend: str = "auto", **options):
        super().__init__()
        check.check_positive("eps", eps)
        check.check_positive("eps_teacher", eps_teacher)
        check.check_count("n_iters", n_iters)
        check.check_affinity(affinity)
        self.eps, self.eps_teacher, self.n_iters = eps, eps_teacher, n_iters
        self.affinity, self.backend, self.options = affinity, backend, options

    def forward(self, x: Tensor, y: Tensor, x_teacher: Tensor, y_teacher: Tensor) -> Tensor:
        return klot(x, y, x_teacher, y_teacher, self.eps, self.eps_teacher, self.n_iters,
                    self.affinity, self.backend, **self.options)

    def extra_repr(self) -> str:
        return (f"eps={self.eps}, eps_teacher={self.eps_teacher}, n_iters={self.n_iters}, "
                f"affinity={self.affinity!r}, backend={self.backend!r}")
