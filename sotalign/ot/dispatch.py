"""Choosing a backend and a path (dense or online) for a problem.

The rule behind ``backend="auto"``, ``path="auto"``, from the device, n, m, d, the dtype
and the free memory:

* **path**: *dense* (K computed once, then read once per half-step) when all the n×m
  matrices of the call fit the dense budget *and* the feature dimension d is at least the
  device's crossover ``DENSE_MIN_DIM``, the d above which reading a stored K is cheaper than
  recomputing it from the features. Otherwise *online* (K recomputed tile by tile,
  O((n+m)·d) memory). A K given densely is always read densely. The dense budget is
  ``memory_budget`` on CPU and ``min(memory_budget, FREE_MEMORY_FRACTION × free)`` on CUDA,
  with ``free`` from ``torch.cuda.mem_get_info`` (the rest stays for the caller's
  activations and the backends' workspaces).
* **backend on CPU**: the C++ ``cpu`` backend when its extension is built, otherwise
  ``torch`` with one warning.
* **backend on CUDA**: ``triton`` when it imports; else, on the online path with
  n·m ≥ ``KEOPS_MIN_ENTRIES``, ``keops`` when it imports and compiles; else the chunked
  ``torch`` backend. (KeOps fuses each reduction into one kernel but pays a fixed overhead per
  call, so it only pays off for large problems; it never stores K, so it is not used for the
  dense path.)
* other devices: ``torch``. ``reference`` is the dense oracle and is only used when asked for.

The crossovers: on CPU (``benchmarks/bench_crossover.py``) recomputing costs 2d flops per
entry against 4 bytes of memory traffic for reading, and both paths pay the same
exponentials. ``DENSE_MIN_DIM["cpu"]`` is the measured crossover of
benchmarks/results/*-crossover.md (below it the online path is about as fast, and chosen
for its memory). On CUDA, 660 is the H100 *roofline estimate* of DESIGN.md §3 (a dense fp32 K read
twice per iteration against recomputing it on tensor cores), pending a GPU measurement;
``KEOPS_MIN_ENTRIES`` is likewise an estimate, not a measurement.

``precision`` ("fp32", "tf32x3", "tf32", "fp16") is passed to the backend; only ``triton`` accepts
anything but "fp32". ``triton`` needs CUDA tensors unless Triton's interpreter is on
(``TRITON_INTERPRET=1``); ``cpu`` needs CPU tensors.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..kernels import (
    Affinity,
    Backend,
    available_backends,
    backend_error,
    cpu_extension_error,
    load_backend,
    triton_interpreter,
)
from .validation import check_positive

#: Default memory budget for stored n×m matrices on the dense path (bytes).
DEFAULT_MEMORY_BUDGET = 2**30
#: Smallest feature dimension for which the dense path is faster: measured on CPU, the H100
#: roofline estimate on CUDA (see above).
DENSE_MIN_DIM = {"cpu": 16, "cuda": 660}
#: Share of the free CUDA memory the dense path may fill.
FREE_MEMORY_FRACTION = 0.5
#: Smallest n·m for which ``auto`` takes KeOps over chunked torch on CUDA (estimate).
KEOPS_MIN_ENTRIES = 4096 * 4096
PATHS = ("auto", "dense", "online")

_warned_missing_extension = False

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "DENSE_MIN_DIM",
    "FREE_MEMORY_FRACTION",
    "KEOPS_MIN_ENTRIES",
    "PATHS",
    "Route",
    "available_backends",
    "choose_route",
    "dense_budget",
]


@dataclass(frozen=True)
class Route:
    """The backend and path one call runs on."""

    backend: Backend
    dense: bool

    @property
    def path(self) -> str:
        return "dense" if self.dense else "online"

    def prepare(self, K: Affinity) -> Affinity:
        """The affinity in the form this route reads it."""
        return K.materialize() if self.dense else K


def _cpu_backend() -> str:
    global _warned_missing_extension
    error = cpu_extension_error()
    if error is None:
        return "cpu"
    if not _warned_missing_extension:
        warnings.warn(
            f"sotalign: the C++ extension sotalign._C is not available ({error}); "
            "backend='auto' falls back to the slower 'torch' backend on CPU. "
            "Reinstall sotalign with a C++ compiler (g++ with OpenMP) to enable backend='cpu'.",
            RuntimeWarning,
            stacklevel=4,
        )
        _warned_missing_extension = True
    return "torch"


def _cuda_backend(dense: bool, n: int, m: int) -> str:
    if backend_error("triton") is None:
        return "triton"
    if not dense and n * m >= KEOPS_MIN_ENTRIES and backend_error("keops") is None:
        return "keops"
    return "torch"


def dense_budget(device: torch.device, memory_budget: float) -> float:
    """Bytes the dense path may spend on stored n×m matrices on ``device``."""
    if device.type != "cuda":
        return memory_budget
    free, _ = torch.cuda.mem_get_info(device)
    return min(memory_budget, FREE_MEMORY_FRACTION * free)


def _check_device(name: str, device: torch.device) -> None:
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on CPU tensors, got tensors on {device}")
    if name == "triton" and device.type != "cuda" and not triton_interpreter():
        raise ValueError(
            f"backend 'triton' needs CUDA tensors, got tensors on {device} "
            "(set TRITON_INTERPRET=1 to run its kernels on CPU in the interpreter)"
        )


def choose_route(
    backend: str,
    path: str,
    device: torch.device,
    n: int,
    m: int,
    feature_dim: int | None,
    dtype: torch.dtype,
    n_matrices: int,
    memory_budget: float,
    precision: str = "fp32",
) -> Route:
    """Pick the backend and path; ``feature_dim`` is None when K is given densely."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if not isinstance(precision, str):
        raise TypeError(f"precision must be a string, got {type(precision).__name__}")
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    memory_budget = check_positive("memory_budget", memory_budget)

    if feature_dim is None:
        dense = True
    elif path != "auto":
        dense = path == "dense"
    else:
        kind = "cuda" if device.type == "cuda" else "cpu"
        fits = n * m * dtype.itemsize * n_matrices <= dense_budget(device, memory_budget)
        dense = fits and feature_dim >= DENSE_MIN_DIM[kind]

    if backend != "auto":
        name = backend
    elif device.type == "cpu":
        name = _cpu_backend()
    elif device.type == "cuda":
        name = _cuda_backend(dense, n, m)
    else:
        name = "torch"
    chosen = load_backend(name, precision)
    _check_device(name, device)
    return Route(chosen, dense)
