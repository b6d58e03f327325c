"""Frozen text encoders named by a spec string: prompts (list[str]) → array (N × d_text).

- `"platonic:<dir>"`: the toy's text map, rebuilt from `<dir>/classes.json` (`write_platonic`).
- `"sentence-transformers:<name-or-path>"`: a sentence-transformers model (`pip install
  sentence-transformers`). An existing local directory is loaded from disk; any other name is
  a hub model id, downloaded only because the user named it. A name that looks like a local
  path (starts with `/`, `./`, `../` or `~`) but does not exist is an error, never a download.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from .synthetic import load_platonic_encoder

SCHEMES = ("platonic", "sentence-transformers")


def load_text_encoder(spec: str) -> Callable[[list[str]], np.ndarray]:
    """The text encoder named by `spec` (see the module docstring)."""
    if not isinstance(spec, str):
        raise TypeError(f"text encoder spec must be a str, got {type(spec).__name__}")
    scheme, sep, target = spec.partition(":")
    if not sep or scheme not in SCHEMES or not target:
        raise ValueError(
            f"unknown text encoder {spec!r}; expected one of " + ", ".join(f"'{s}:<...>'" for s in SCHEMES)
        )
    if scheme == "platonic":
        return load_platonic_encoder(target)
    return _sentence_transformer(target)


def _sentence_transformer(name: str) -> Callable[[list[str]], np.ndarray]:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError(
            f"text encoder 'sentence-transformers:{name}' needs the sentence-transformers "
            "package: pip install sentence-transformers"
        ) from None
    expanded = os.path.expanduser(name)
    if name.startswith(("/", "./", "../", "~")) and not os.path.exists(expanded):
        raise FileNotFoundError(f"{name}: no such sentence-transformers model directory")
    model = SentenceTransformer(expanded if os.path.exists(expanded) else name)

    def encode(prompts: list[str]) -> np.ndarray:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not a single string")
        return np.asarray(model.encode(list(prompts), convert_to_numpy=True), dtype=np.float32)

    return encode
