"""Choosing a backend, a path (dense or online) and a dot precision for a problem.

The rule behind ``backend="auto"``, ``path="auto"``, ``precision="auto"``, from the device,
n, m, d, the dtype and the free memory; :func:`plan_route` shows the choice for given shapes
without running anything, and every choice carries a one-line ``reason``:

* **path**: *dense* (K computed once, then read once per half-step) when all the n×m
  matrices of the call fit the dense budget *and* the feature dimension d is at least the
  device's crossover ``DENSE_MIN_DIM``, the d from which reading a stored K is faster than
  recomputing it. Otherwise *online* (K recomputed tile by tile, O((n+m)·d) memory). A K
  given densely is always read densely. A Sinkhorn solve stores one matrix, a KLOT step three
  (K and K*, and G = (P − P*)/ε in the backward); on CPU a solve adds one (the cpu backend's
  exp K, ``SOLVE_EXTRA_MATRICES``).
* **budget**: ``memory_budget`` when given; otherwise on CUDA ``FREE_MEMORY_FRACTION`` of
  what the device can still hand out (``torch.cuda.mem_get_info``'s free memory plus what
  torch has cached but not allocated), on CPU ``DEFAULT_MEMORY_BUDGET``. If the dense
  allocation fails anyway (``torch.cuda.OutOfMemoryError``), a route chosen automatically
  falls back to the online path instead of failing the call (:meth:`Route.prepare`).
* **backend on CPU**: the C++ ``cpu`` backend when its extension is built, otherwise
  ``torch`` with one warning.
* **backend on CUDA**: ``triton`` when it imports; else, on the online path with
  n·m ≥ ``KEOPS_MIN_ENTRIES``, ``keops`` when it runs; else the chunked ``torch`` backend.
  (KeOps fuses each reduction into one kernel but pays a fixed overhead per call, so it only
  pays off for large problems; it never stores K, so it is not used for the dense path.)
* other devices: ``torch``. ``reference`` is the dense oracle and is only used when asked for.
* **precision** ``"auto"``: on ``triton`` with CUDA float32 features on the online path, the
  fp32-accurate tensor-core flag ``ONLINE_PRECISION`` (``"fp16x3"`` or ``"tf32x3"``);
  ``"fp32"`` everywhere else (the dense path reads K, which is built by an fp32 matmul).
  Any explicit flag is passed to the backend; only ``triton`` accepts anything but "fp32".

The crossovers and the online precision are data, read at import from ``dispatch.json``
beside this module, each with its provenance: "measured" with the results file it comes
from, or "estimate" with the measurements it was derived from. On CPU the crossover was
measured (benchmarks/results/cpu-amd-epyc-2core-crossover.md); on CUDA it is estimated
from the H200 baseline (benchmarks/results/nvidia-h200-baseline-2026-11-26.md: the stored K
won at d = 256 and 512) until ``make gpu-check`` measures it and writes a measured file.
``KEOPS_MIN_ENTRIES`` is an estimate, not a measurement.

``triton`` needs CUDA tensors unless Triton's interpreter is on (``TRITON_INTERPRET=1``);
``cpu`` needs CPU tensors.
"""

from __future__ import annotations

import json
import threading
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..kernels import PRECISIONS as BACKEND_PRECISIONS
from ..kernels import (
    Affinity,
    Backend,
    available_backends,
    backend_error,
    cpu_extension_error,
    load_backend,
)
from .validation import check_positive

#: The tuned constants of ``auto`` and where each comes from (see the module docstring).
TUNING_FILE = Path(__file__).with_name("dispatch.json")
TUNING: dict = json.loads(TUNING_FILE.read_text())
#: Memory budget of the dense path on CPU, and wherever no free memory can be read (bytes).
DEFAULT_MEMORY_BUDGET = 2**30
#: Stored n×m matrices a solve adds to those of the call, per device kind: on CPU the cpu
#: backend keeps exp K beside K while it solves (its scaling-domain half-steps).
SOLVE_EXTRA_MATRICES = {"cpu": 1, "cuda": 0}
#: Smallest feature dimension for which the dense path is faster, per device kind.
DENSE_MIN_DIM = {kind: int(entry["value"]) for kind, entry in TUNING["dense_min_dim"].items()}
#: The fp32-accurate tensor-core flag of ``precision="auto"`` on the online CUDA path.
ONLINE_PRECISION = str(TUNING["online_precision"]["cuda"]["value"])
#: Share of the memory the CUDA device can still hand out that the dense path may fill (the
#: rest stays for the caller's activations and the backends' workspaces).
FREE_MEMORY_FRACTION = 0.5
#: Smallest n·m for which ``auto`` takes KeOps over chunked torch on CUDA (estimate).
KEOPS_MIN_ENTRIES = 4096 * 4096
PATHS = ("auto", "dense", "online")
PRECISIONS = ("auto", *BACKEND_PRECISIONS)

_warned_missing_extension = False
_recorded = threading.local()

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "DENSE_MIN_DIM",
    "FREE_MEMORY_FRACTION",
    "KEOPS_MIN_ENTRIES",
    "ONLINE_PRECISION",
    "PATHS",
    "PRECISIONS",
    "Route",
    "available_backends",
    "choose_route",
    "cuda_available_bytes",
    "dense_budget",
    "plan_route",
]


@dataclass(frozen=True)
class Route:
    """The backend, path and dot precision one call runs on, and why.

    ``fallback`` is the online route to take if the dense allocation fails (set when the
    dense path was chosen automatically).
    """

    backend: Backend
    dense: bool
    reason: str = ""
    fallback: Route | None = None

    @property
    def name(self) -> str:
        """The backend's name."""
        return self.backend.name

    @property
    def path(self) -> str:
        return "dense" if self.dense else "online"

    @property
    def precision(self) -> str:
        """The dot-product precision of the backend ("fp32" for backends without a flag)."""
        return getattr(self.backend, "precision", "fp32")

    def __repr__(self) -> str:
        return (
            f"Route(backend={self.name!r}, path={self.path!r}, precision={self.precision!r}, "
            f"reason={self.reason!r})"
        )

    def prepare(self, *affinities: Affinity) -> tuple[Route, list[Affinity]]:
        """The affinities in the form this route reads them, and the route actually taken:
        the online fallback when storing them runs out of CUDA memory."""
        if not self.dense:
            return self, list(affinities)
        try:
            return self, [K.materialize() for K in affinities]
        except torch.cuda.OutOfMemoryError as error:
            if self.fallback is None:
                raise
            return self.fell_back(error), list(affinities)

    def fell_back(self, error: BaseException) -> Route:
        """The online fallback, its reason saying why."""
        if self.fallback is None:
            raise ValueError("this route has no online fallback") from error
        message = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        return replace(
            self.fallback,
            reason=f"{self.reason}; but storing it ran out of CUDA "
            f"memory ({message}), so it fell back to online",
        )


def record_route(route: Route) -> None:
    """Remember the route this thread's last KLOT call took (read by ``klot(return_route=True)``)."""
    _recorded.route = route


def recorded_route() -> Route | None:
    return getattr(_recorded, "route", None)


def _cpu_backend() -> tuple[str, str]:
    global _warned_missing_extension
    error = cpu_extension_error()
    if error is None:
        return "cpu", "the C++ extension is built"
    if not _warned_missing_extension:
        warnings.warn(
            f"sotalign: the C++ extension sotalign._C is not available ({error}); "
            "backend='auto' falls back to the slower 'torch' backend on CPU. "
            "Reinstall sotalign with a C++ compiler (g++ with OpenMP) to enable backend='cpu'.",
            RuntimeWarning,
            stacklevel=5,
        )
        _warned_missing_extension = True
    return "torch", "the C++ extension is not built"


def _cuda_backend(dense: bool, n: int, m: int) -> tuple[str, str]:
    error = backend_error("triton")
    if error is None:
        return "triton", "triton runs on CUDA"
    if not dense and n * m >= KEOPS_MIN_ENTRIES and backend_error("keops") is None:
        return "keops", f"triton cannot run ({error}); keops for n·m ≥ {KEOPS_MIN_ENTRIES}"
    return "torch", f"triton cannot run ({error})"


def cuda_available_bytes(device: torch.device) -> int:
    """What the CUDA device can still hand out to torch: its free memory plus the memory
    torch's allocator has reserved but not allocated."""
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def dense_budget(device: torch.device, memory_budget: float | None = None) -> tuple[float, str]:
    """(bytes the dense path may spend on stored n×m matrices on ``device``, where from)."""
    if memory_budget is not None:
        return check_positive("memory_budget", memory_budget), "memory_budget"
    if device.type == "cuda":
        return FREE_MEMORY_FRACTION * cuda_available_bytes(
            device
        ), f"{FREE_MEMORY_FRACTION:g} × free CUDA memory"
    return float(DEFAULT_MEMORY_BUDGET), "default CPU budget"


def _gib(size: float) -> str:
    return f"{size / 2**30:.3g} GiB"


def _choose_path(path, device, n, m, feature_dim, dtype, n_matrices, memory_budget) -> tuple[bool, str]:
    if feature_dim is None:
        return True, "K is given as a stored matrix"
    if path != "auto":
        return path == "dense", f"path={path!r} was asked for"
    kind = "cuda" if device.type == "cuda" else "cpu"
    extra = SOLVE_EXTRA_MATRICES[kind]
    need = n * m * dtype.itemsize * (n_matrices + extra)
    budget, source = dense_budget(device, memory_budget)
    crossover = DENSE_MIN_DIM[kind]
    provenance = TUNING["dense_min_dim"][kind]["provenance"]
    stored = (
        f"{n_matrices} stored {n}×{m} {'matrix' if n_matrices == 1 else 'matrices'}"
        f"{' and the exp K of a cpu solve' if extra else ''} ({_gib(need)})"
    )
    if need > budget:
        return False, f"{stored} exceed the dense budget ({_gib(budget)}, {source})"
    if feature_dim < crossover:
        return False, f"d = {feature_dim} is below the {kind} crossover d = {crossover} ({provenance})"
    return True, (
        f"{stored} fit the dense budget ({_gib(budget)}, {source}) and "
        f"d = {feature_dim} ≥ the {kind} crossover d = {crossover} ({provenance})"
    )


def _resolve_precision(
    precision: str, name: str, device: torch.device, dense: bool, dtype: torch.dtype
) -> tuple[str, str]:
    if precision != "auto":
        return precision, f"precision={precision!r} was asked for"
    if name == "triton" and device.type == "cuda" and not dense and dtype == torch.float32:
        provenance = TUNING["online_precision"]["cuda"]["provenance"]
        return ONLINE_PRECISION, f"{ONLINE_PRECISION}, the fp32-accurate tensor-core default ({provenance})"
    return "fp32", "fp32"


def choose_route(
    backend: str,
    path: str,
    device: torch.device,
    n: int,
    m: int,
    feature_dim: int | None,
    dtype: torch.dtype,
    n_matrices: int,
    memory_budget: float | None = None,
    precision: str = "auto",
) -> Route:
    """Pick the backend, path and precision; ``feature_dim`` is None when K is given densely."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if not isinstance(precision, str):
        raise TypeError(f"precision must be a string, got {type(precision).__name__}")
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if memory_budget is not None:
        memory_budget = check_positive("memory_budget", memory_budget)

    dense, path_reason = _choose_path(path, device, n, m, feature_dim, dtype, n_matrices, memory_budget)
    route = _route(backend, device, n, m, dense, dtype, precision, path_reason)
    if dense and path == "auto" and feature_dim is not None:
        online = _route(backend, device, n, m, False, dtype, precision, "online fallback")
        route = replace(route, fallback=online)
    return route


def _route(backend, device, n, m, dense, dtype, precision, path_reason) -> Route:
    if backend != "auto":
        name, backend_reason = backend, f"backend={backend!r} was asked for"
    elif device.type == "cpu":
        name, backend_reason = _cpu_backend()
    elif device.type == "cuda":
        name, backend_reason = _cuda_backend(dense, n, m)
    else:
        name, backend_reason = "torch", f"the portable backend on {device.type}"
    resolved, precision_reason = _resolve_precision(precision, name, device, dense, dtype)
    chosen = load_backend(name, resolved)
    chosen.check_device(device)
    reason = (
        f"{'dense' if dense else 'online'}: {path_reason}; {name}: {backend_reason}; "
        f"precision {precision_reason}"
    )
    return Route(chosen, dense, reason)


def plan_route(
    n: int,
    m: int,
    d: int | None = None,
    *,
    teacher_dim: int | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    backend: str = "auto",
    path: str = "auto",
    precision: str = "auto",
    memory_budget: float | None = None,
) -> Route:
    """The route ``sinkhorn`` (or, with ``teacher_dim``, ``klot``) would take for n×m
    features of dimension ``d`` (None: a K given as a stored matrix) on ``device`` (default:
    CUDA when available), without running anything. ``route.reason`` says why; the free
    CUDA memory is read now, so the answer can change as memory fills.

    >>> plan_route(4096, 4096, 512, device="cpu").path
    'dense'
    """
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    for name, value in (
        (("n", n), ("m", m))
        + ((("d", d),) if d is not None else ())
        + ((("teacher_dim", teacher_dim),) if teacher_dim is not None else ())
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    feature_dim = None if d is None else (d if teacher_dim is None else min(d, teacher_dim))
    n_matrices = 1 if teacher_dim is None else 3
    return choose_route(backend, path, device, n, m, feature_dim, dtype, n_matrices, memory_budget, precision)
