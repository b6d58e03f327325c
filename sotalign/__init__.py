"""sotalign: fast, memory-lean kernels for SOTAlign's optimal-transport loss (KLOT).

Example::

    import sotalign
    r = sotalign.sinkhorn(x, y, eps=0.05)             # potentials r.f, r.g and value r.value
    s = sotalign.sinkhorn_divergence(x, y, eps=0.1)    # debiased S_ε, squared-Euclidean cost
    loss = sotalign.klot(x, y, x_teacher, y_teacher)  # KL(P* ‖ P), exact gradient (P − P*)/ε
    model = sotalign.load("runs/sotalign")            # a trained alignment (sotalign fit)

``import sotalign`` loads the OT front and the kernels only (torch and numpy). The trainer's
names (``fit``, ``compare``, ``load``, ``AlignedModel``, ``TrainConfig``...) are imported on
first use and need the ``train`` extra: ``pip install 'sotalign[train]'``.
"""

from importlib import import_module

from . import _openmp  # noqa: F401  (first: before anything loads torch)
from .ot import (
    COSTS,
    DEFAULT_MEMORY_BUDGET,
    KLOTLoss,
    Route,
    SinkhornLoss,
    SinkhornResult,
    SolverOptions,
    available_backends,
    klot,
    klot_dense,
    plan_route,
    sinkhorn,
    sinkhorn_dense,
    sinkhorn_divergence,
)

__version__ = "0.1.0"

#: Names loaded on first access, and the module that defines each.
_LAZY = {
    "AlignedModel": "sotalign.align",
    "AlignmentData": "sotalign.data",
    "DataSpec": "sotalign.data",
    "TrainConfig": "sotalign.align",
    "compare": "sotalign.align",
    "fit": "sotalign.align",
    "load": "sotalign.align",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sotalign' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "COSTS",
    "DEFAULT_MEMORY_BUDGET",
    "AlignedModel",
    "AlignmentData",
    "DataSpec",
    "KLOTLoss",
    "Route",
    "SinkhornLoss",
    "SinkhornResult",
    "SolverOptions",
    "TrainConfig",
    "available_backends",
    "compare",
    "fit",
    "klot",
    "klot_dense",
    "load",
    "plan_route",
    "sinkhorn",
    "sinkhorn_dense",
    "sinkhorn_divergence",
]
