"""Deprecated: ``AlignedModel`` and ``load`` live in :mod:`sotalign.align.model`; use
``sotalign.load`` / ``sotalign.AlignedModel`` (or that module). Removed in sotalign 0.3."""

import warnings

from .align.model import AlignedModel, load
from .rundir import RunDirError

warnings.warn(
    "sotalign.model is deprecated; use sotalign.load / sotalign.AlignedModel "
    "(defined in sotalign.align.model)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["AlignedModel", "RunDirError", "load"]
