"""How a solve runs: one validated, immutable :class:`SolverOptions` for every entry point.

Every public function (``sinkhorn``, ``sinkhorn_dense``, ``klot``, ``klot_dense``,
``sinkhorn_divergence``, the losses, ``sotalign.distributed``) takes the solver options as
keywords, or as one ``options=SolverOptions(...)``, and turns them into a ``SolverOptions``
with :meth:`SolverOptions.resolve`: each option is checked in one place, before any work
(and, for the ``nn.Module`` losses, at construction). The custom ops take the options as one
string (:meth:`SolverOptions.encode`) and rebuild the object with :meth:`SolverOptions.decode`.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass
from typing import Any

from ..kernels import BACKEND_NAMES
from . import validation
from .dispatch import PATHS, PRECISIONS

#: The student's and the teacher's ε when none is given (SOTAlign's defaults).
DEFAULT_EPS = 0.05
DEFAULT_EPS_TEACHER = 0.01


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
        cuda_graph: replay ``check_every`` iterations at a time from one CUDA graph; None (the
            default) does so on CUDA when ``n_iters ≥ 2·check_every`` (small solves are
            launch-bound), True insists (CUDA tensors only), False never.
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
    cuda_graph: bool | None = None
    backend: str = "auto"
    path: str = "auto"
    precision: str = "auto"
    memory_budget: float | None = None

    def __post_init__(self) -> None:
        checked: dict[str, Any] = {
            "n_iters": validation.check_count("n_iters", self.n_iters),
            "tol": None if self.tol is None else validation.check_positive("tol", self.tol),
            "check_every": validation.check_count("check_every", self.check_every),
            "symmetric": _flag("symmetric", self.symmetric),
            "eps_scaling": validation.check_eps_scaling(self.eps_scaling),
            "cuda_graph": None if self.cuda_graph is None else _flag("cuda_graph", self.cuda_graph),
            "backend": _choice("backend", self.backend, ("auto", *BACKEND_NAMES)),
            "path": _choice("path", self.path, PATHS),
            "precision": _choice("precision", self.precision, PRECISIONS),
            "memory_budget": None
            if self.memory_budget is None
            else validation.check_positive("memory_budget", self.memory_budget),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def resolve(cls, options: SolverOptions | None = None, **keywords: Any) -> SolverOptions:
        """The options of a call: ``options`` (default: all defaults) with ``keywords`` on top.
        An unknown keyword is a ``TypeError`` naming it and the known ones."""
        if options is not None and not isinstance(options, SolverOptions):
            raise TypeError(f"options must be a SolverOptions, got {type(options).__name__}")
        unknown = sorted(set(keywords) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown solver option(s) {unknown}; the options are {OPTION_NAMES}")
        return dataclasses.replace(options or cls(), **keywords)

    def encode(self) -> str:
        """The options as one string, the form in which they cross a custom op's boundary
        (plain string formatting of plain values, which ``torch.compile`` folds to a constant)."""
        return ";".join(f"{name}={getattr(self, name)!r}" for name in OPTION_NAMES)

    @classmethod
    def decode(cls, encoded: str) -> SolverOptions:
        fields = (item.split("=", 1) for item in encoded.split(";"))
        return cls(**{name: ast.literal_eval(value) for name, value in fields})


#: The option names, in field order.
OPTION_NAMES = tuple(field.name for field in dataclasses.fields(SolverOptions))
