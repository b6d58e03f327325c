"""Kernel backends behind one primitive interface (see :mod:`sotalign.kernels.base`).

``load_backend(name, precision)`` returns a backend instance or raises ``ValueError`` naming
why it cannot run here. Only :mod:`sotalign.ot` chooses backends; nothing else imports them.

What counts as *available* (``available_backends()``):

* ``reference`` and ``torch``: always.
* ``cpu``: when the C++ extension ``sotalign._C`` was built.
* ``triton``: when ``triton`` imports *and* it can run: on a CUDA device, or on CPU tensors
  under Triton's interpreter (``TRITON_INTERPRET=1``, slow, for tests).
* ``keops``: when ``pykeops`` imports and compiles a trivial formula (probed once per
  process, on CUDA when torch sees a GPU, else on CPU, in a subprocess with a timeout; see
  :func:`sotalign.kernels.keops.keops_error`).
"""

from __future__ import annotations

from .base import PRECISIONS, Affinity, Backend

BACKEND_NAMES = ("reference", "torch", "cpu", "triton", "keops")


def cpu_extension_error() -> str | None:
    """Why the C++ extension cannot be used, or None when it can."""
    from . import cpu

    return None if cpu.AVAILABLE else cpu.IMPORT_ERROR


def triton_error() -> str | None:
    """Why the Triton backend cannot run here (no triton, or neither CUDA nor the interpreter)."""
    from . import triton as triton_backend

    return None if triton_backend.AVAILABLE else triton_backend.IMPORT_ERROR


def triton_interpreter() -> bool:
    """True when Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    from . import triton as triton_backend

    return bool(triton_backend.AVAILABLE and triton_backend.INTERPRETER)


def keops_error() -> str | None:
    """Why the KeOps backend cannot run here (import or compile failure), or None."""
    from .keops import keops_error as probe

    return probe()


def backend_error(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None when it can."""
    if name == "cpu":
        error = cpu_extension_error()
        return None if error is None else f"the C++ extension sotalign._C did not load ({error})"
    if name == "triton":
        return triton_error()
    if name == "keops":
        return keops_error()
    return None


def available_backends() -> list[str]:
    """The backends that run on this machine, in the order of ``BACKEND_NAMES``."""
    return [name for name in BACKEND_NAMES if backend_error(name) is None]


def load_backend(name: str, precision: str = "fp32") -> Backend:
    """An instance of backend ``name``; ``precision`` is the dot-product precision flag."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {BACKEND_NAMES}")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    if precision != "fp32" and name != "triton":
        raise ValueError(
            f"precision={precision!r} is only supported by the 'triton' backend; "
            f"backend {name!r} computes dot products in fp32 (use precision='fp32')"
        )
    error = backend_error(name)
    if error is not None:
        raise ValueError(f"backend {name!r} is not available: {error}")
    if name == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend()
    if name == "torch":
        from .torch_chunked import TorchChunkedBackend

        return TorchChunkedBackend()
    if name == "cpu":
        from .cpu import CpuBackend

        return CpuBackend()
    if name == "triton":
        from .triton import TritonBackend

        return TritonBackend(precision=precision)
    from .keops import KeOpsBackend

    return KeOpsBackend()


__all__ = [
    "Affinity",
    "Backend",
    "BACKEND_NAMES",
    "PRECISIONS",
    "available_backends",
    "backend_error",
    "cpu_extension_error",
    "keops_error",
    "load_backend",
    "triton_error",
    "triton_interpreter",
]
