"""Choosing a backend and a path (dense or online) for a problem.

The rule behind ``backend="auto"``, ``path="auto"``:

* backend: on CPU the C++ ``cpu`` backend when its extension is built (otherwise ``torch``,
  with one warning); on other devices the chunked ``torch`` backend. ``reference`` is the
  dense oracle and is only used when asked for.
* path: **dense** (K computed once by BLAS, then read once per half-step) when all the n×m
  matrices of the call fit ``memory_budget`` *and* the feature dimension d is at least the
  device's crossover, the d above which reading a stored K is cheaper than recomputing it
  from the features. Otherwise **online** (K recomputed tile by tile, O((n+m)·d) memory).

  The crossovers are measured with ``benchmarks/bench_crossover.py``. On CPU recomputing
  costs 2d flops per entry against 4 bytes of memory traffic for reading, and both paths pay
  the same exponentials. On the 2-core Zen 5 machine of benchmarks/results/ (n = m = 2048)
  the online path stays within ~20 % of the dense one up to d = 8, and the stored K wins
  clearly from d = 16 on (×1.4 at 16, ×2.4 at 64, ×4.9 at 256), so below 16 the online path
  is chosen for its memory. On an H100 the roofline in DESIGN.md puts the crossover near
  d = 660.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..kernels import BACKEND_NAMES, Affinity, Backend, cpu_extension_error, load_backend
from .validation import check_positive

#: Default memory budget for stored n×m matrices on the dense path (bytes).
DEFAULT_MEMORY_BUDGET = 2**30
#: Smallest feature dimension for which the dense path is faster (measured, see above).
DENSE_MIN_DIM = {"cpu": 16, "cuda": 660}
PATHS = ("auto", "dense", "online")

_warned_missing_extension = False


def available_backends() -> list[str]:
    """The backends that run on this machine, e.g. ``["reference", "torch", "cpu"]``."""
    return [name for name in BACKEND_NAMES if name != "cpu" or cpu_extension_error() is None]


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


def _auto_backend(device: torch.device) -> str:
    global _warned_missing_extension
    if device.type != "cpu":
        return "torch"
    error = cpu_extension_error()
    if error is None:
        return "cpu"
    if not _warned_missing_extension:
        warnings.warn(
            f"sotalign: the C++ extension sotalign._C is not available ({error}); "
            "backend='auto' falls back to the slower 'torch' backend on CPU. "
            "Reinstall sotalign with a C++ compiler (g++ with OpenMP) to enable backend='cpu'.",
            RuntimeWarning, stacklevel=3)
        _warned_missing_extension = True
    return "torch"


def choose_route(backend: str, path: str, device: torch.device, n: int, m: int,
                 feature_dim: int | None, dtype: torch.dtype, n_matrices: int,
                 memory_budget: float) -> Route:
    """Pick the backend and path; ``feature_dim`` is None when K is given densely."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; expected one of {PATHS}")
    memory_budget = check_positive("memory_budget", memory_budget)
    name = _auto_backend(device) if backend == "auto" else backend
    chosen = load_backend(name)
    if name == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' runs on CPU tensors, got tensors on {device}")

    if feature_dim is None:
        return Route(chosen, dense=True)
    if path != "auto":
        return Route(chosen, dense=path == "dense")
    fits = n * m * dtype.itemsize * n_matrices <= memory_budget
    crossover = DENSE_MIN_DIM["cpu" if device.type == "cpu" else "cuda"]
    return Route(chosen, dense=fits and feature_dim >= crossover)
