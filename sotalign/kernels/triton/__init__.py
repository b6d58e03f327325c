"""The ``triton`` backend: fused GPU kernels for log-domain Sinkhorn and KLOT.

Every primitive of :mod:`sotalign.kernels.base` is one streaming pass in which a program
owns a block of rows and walks the columns tile by tile (FlashAttention's schedule):

* ``lse_rows`` / ``lse_cols``: the online log-sum-exp of (K_ij + bias)/ε (:mod:`.lse`);
* ``plan_matmul`` / ``plan_t_matmul`` and the KLOT backward ``(G y, Gᵀ x)`` with
  G = (P − P*)/ε, and ``plan_inner`` / ``klot_value`` as weighted sums over P (:mod:`.plan`).

A feature affinity K = x yᵀ is recomputed per tile with ``tl.dot`` and never stored; a
stored K is read once per pass. The same kernels run on CPU under ``TRITON_INTERPRET=1``
(that is how the CPU tests check them). Triton reads that variable when a kernel is
decorated, its own ``triton.language`` helpers included, so it must be set before triton is
first imported: this package only looks triton up, and imports it and defines the kernels
on first use of ``TritonBackend``.

``AVAILABLE`` says whether the backend can run here (triton imports, and there is a CUDA
device or the interpreter is on); ``IMPORT_ERROR`` says why not.
"""

from __future__ import annotations

import importlib.util
import os

#: True when Triton runs its kernels in the Python interpreter (``TRITON_INTERPRET=1``).
INTERPRETER: bool = os.environ.get("TRITON_INTERPRET") == "1"

if importlib.util.find_spec("triton") is None:
    AVAILABLE: bool = False
    IMPORT_ERROR: str | None = "triton is not installed"
else:
    # Not imported here: triton.language decorates its own helpers (tl.zeros, tl.sum, ...)
    # for the interpreter or the compiler when it is first imported, so asking whether the
    # backend is available must not fix that choice before a test sets TRITON_INTERPRET.
    import torch

    if INTERPRETER or torch.cuda.is_available():
        AVAILABLE, IMPORT_ERROR = True, None
    else:
        AVAILABLE = False
        IMPORT_ERROR = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"


def __getattr__(name: str):
    # Imported on first use so that TRITON_INTERPRET is read when the kernels are defined.
    if name == "TritonBackend":
        from .backend import TritonBackend

        return TritonBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AVAILABLE", "IMPORT_ERROR", "INTERPRETER", "TritonBackend"]
