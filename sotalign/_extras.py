"""Optional dependencies: ``pip install sotalign`` needs only torch and numpy (the kernels and
the OT front); the trainer, CLI and evaluation need the ``train`` extra."""

from __future__ import annotations

from importlib.util import find_spec

#: The import names the ``train`` extra provides (pyproject.toml lists the distributions).
TRAIN_MODULES = ("rich", "typer", "lion_pytorch", "safetensors", "ot")


def require(extra: str, modules: tuple[str, ...], what: str) -> None:
    """Raise ImportError naming ``extra`` when one of ``modules`` is not installed."""
    missing = [name for name in modules if find_spec(name) is None]
    if missing:
        raise ImportError(
            f"{what} needs {', '.join(missing)} from the {extra!r} extra: pip install 'sotalign[{extra}]'"
        )
