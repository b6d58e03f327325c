"""The front of sotalign: Sinkhorn, KLOT and the Sinkhorn divergence, input checks, backend choice."""

from ..kernels import BACKEND_NAMES
from .dispatch import DEFAULT_MEMORY_BUDGET, Route, available_backends, plan_route
from .divergence import SinkhornLoss, sinkhorn_divergence
from .klot import NOT_CONVERGED, KLOTLoss, klot, klot_dense, klot_marginal_errors
from .options import SolverOptions
from .problem import COSTS
from .sinkhorn import SinkhornResult, sinkhorn, sinkhorn_dense

__all__ = [
    "BACKEND_NAMES",
    "COSTS",
    "DEFAULT_MEMORY_BUDGET",
    "KLOTLoss",
    "NOT_CONVERGED",
    "Route",
    "SinkhornLoss",
    "SinkhornResult",
    "SolverOptions",
    "available_backends",
    "klot",
    "klot_dense",
    "klot_marginal_errors",
    "plan_route",
    "sinkhorn",
    "sinkhorn_dense",
    "sinkhorn_divergence",
]
