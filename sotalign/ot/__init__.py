"""The front of sotalign: Sinkhorn and KLOT, input checks, and backend choice."""

from ..kernels import BACKEND_NAMES
from .dispatch import DEFAULT_MEMORY_BUDGET, Route, available_backends, plan_route
from .klot import KLOTLoss, klot, klot_dense
from .options import SolverOptions
from .sinkhorn import SinkhornResult, sinkhorn, sinkhorn_dense

__all__ = [
    "BACKEND_NAMES",
    "DEFAULT_MEMORY_BUDGET",
    "KLOTLoss",
    "Route",
    "SinkhornResult",
    "SolverOptions",
    "available_backends",
    "klot",
    "klot_dense",
    "plan_route",
    "sinkhorn",
    "sinkhorn_dense",
]
