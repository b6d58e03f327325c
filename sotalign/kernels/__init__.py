"""Kernel backends behind one primitive interface (see :mod:`sotalign.kernels.base`).

``load_backend(name)`` returns a backend instance or raises ``ValueError`` naming why it
cannot run here. Only :mod:`sotalign.ot` chooses backends; nothing else imports them.
"""

from __future__ import annotations

from .base import Affinity, Backend

BACKEND_NAMES = ("reference", "torch", "cpu")


def cpu_extension_error() -> str | None:
    """Why the C++ extension cannot be used, or None when it can."""
    from . import cpu

    return None if cpu.AVAILABLE else cpu.IMPORT_ERROR


def load_backend(name: str) -> Backend:
    if name == "reference":
        from .reference import ReferenceBackend

        return ReferenceBackend()
    if name == "torch":
        from .torch_chunked import TorchChunkedBackend

        return TorchChunkedBackend()
    if name == "cpu":
        error = cpu_extension_error()
        if error is not None:
            raise ValueError(f"backend 'cpu' is not available: the C++ extension sotalign._C "
                             f"did not load ({error})")
        from .cpu import CpuBackend

        return CpuBackend()
    raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {BACKEND_NAMES}")


__all__ = ["Affinity", "Backend", "BACKEND_NAMES", "load_backend", "cpu_extension_error"]
