"""How a solve runs: one validated, immutable :class:`SolverOptions` for every entry point.

``sinkhorn``, ``sinkhorn_dense``, ``klot``, ``klot_dense`` and ``KLOTLoss`` build one from
their keyword arguments, so each option is checked in one place, before any work (and, for
``KLOTLoss``, at construction). The custom ops of :mod:`sotalign.ot.klot` take the options as
plain arguments (:meth:`SolverOptions.op_args`) and rebuild the object inside.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..kernels import BACKEND_NAMES
from . import validation as check
from .dispatch import PATHS, PRECISIONS


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")
    return value


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class SolverOptions:
    """Options of a Sinkhorn solve (KLOT runs two solves with the same options).

    Attributes:
        n_iters: maximum number of alternating iterations (≥ 1), ε-scaling ones included.
        tol: stop early once the L1 marginal error is below ``tol`` (checked every
            ``check_every`` iterations, on the device), or None for exactly ``n_iters``.
        check_every: iterations between two tolerance checks (≥ 1).
        symmetric: end with the paper's averaged half-step.
        eps_scaling: None, or a factor in (0, 1) by which ε is annealed per iteration.
        cuda_graph: replay ``check_every`` iterations at a time from one CUDA graph.
        backend: ``"auto"`` or one of :data:`sotalign.kernels.BACKEND_NAMES`.
        path: ``"auto"``, ``"dense"`` (K stored once) or ``"online"`` (K recomputed).
        precision: the dot-product precision flag, one of :data:`sotalign.ot.dispatch.PRECISIONS`
            (``"auto"``: fp32 accuracy, on tensor cores where that pays; see the dispatch module).
        memory_budget: bytes that ``path="auto"`` may spend on stored n×m matrices, or None for
            the device's default (:func:`sotalign.ot.dispatch.dense_budget`).

    ``backend``, ``path`` and ``precision`` are checked for their spelling here; whether the
    backend runs here, on these tensors, with this precision, is the route's decision
    (:func:`sotalign.ot.dispatch.choose_route`).
    """

    n_iters: int = 100
    tol: float | None = None
    check_every: int = 10
    symmetric: bool = True
    eps_scaling: float | None = None
    cuda_graph: bool = False
    backend: str = "auto"
    path: str = "auto"
    precision: str = "auto"
    memory_budget: float | None = None

    def __post_init__(self) -> None:
        checked: dict[str, Any] = {
            "n_iters": check.check_count("n_iters", self.n_iters),
            "tol": None if self.tol is None else check.check_positive("tol", self.tol),
            "check_every": check.check_count("check_every", self.check_every),
            "symmetric": _flag("symmetric", self.symmetric),
            "eps_scaling": check.check_eps_scaling(self.eps_scaling),
            "cuda_graph": _flag("cuda_graph", self.cuda_graph),
            "backend": _choice("backend", self.backend, ("auto", *BACKEND_NAMES)),
            "path": _choice("path", self.path, PATHS),
            "precision": _choice("precision", self.precision, PRECISIONS),
            "memory_budget": None
            if self.memory_budget is None
            else check.check_positive("memory_budget", self.memory_budget),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def loop(self) -> dict[str, Any]:
        """The keyword options of :func:`sotalign.ot.sinkhorn.solve`."""
        return {
            "tol": self.tol,
            "check_every": self.check_every,
            "symmetric": self.symmetric,
            "eps_scaling": self.eps_scaling,
            "cuda_graph": self.cuda_graph,
        }

    def op_args(self) -> tuple:
        """The fields in order, as plain values (what a custom op accepts)."""
        return tuple(getattr(self, field.name) for field in dataclasses.fields(self))


#: Number of :class:`SolverOptions` fields, i.e. of the plain arguments they become in an op.
N_OPTIONS = len(dataclasses.fields(SolverOptions))
