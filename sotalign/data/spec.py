"""Where a run's embeddings come from (:class:`DataSpec`), and the one definition of the
data roles: each of ``ROLES`` (paired, unpaired, validation, test) has one store, view or
batch per modality (images, texts), in fields named ``<role>_<modality>``.

:func:`role_fields` adds those fields to a dataclass (``DataSpec``, ``AlignmentData``, the
trainer's ``Batch``) and the CLI derives its store options from :func:`role_names`, so a
role or a modality is added in one place. ``ConfigError`` and the field checks are shared
with :class:`sotalign.align.config.TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

#: Roles of a run's rows: pairs, unpaired pools, validation (model selection) and test pairs.
ROLES = ("paired", "unpaired", "val", "test")
MODALITIES = ("images", "texts")
#: The roles whose images and texts correspond row by row.
ALIGNED_ROLES = ("paired", "val", "test")


def role_names(roles: tuple[str, ...] = ROLES) -> tuple[str, ...]:
    """``<role>_<modality>`` for each role, then each modality: paired_images, paired_texts, ..."""
    return tuple(f"{role}_{modality}" for role in roles for modality in MODALITIES)


def role_fields(annotation: str, roles: tuple[str, ...] = ROLES, required: tuple[str, ...] = ()):
    """Class decorator, under ``@dataclass``: one field per :func:`role_names` ``(roles)``
    of type ``annotation``, placed first; roles in ``required`` have no default, the
    others default to None (their annotation gains ``| None``)."""

    def add(cls):
        own = dict(cls.__dict__.get("__annotations__", {}))
        fields = {}
        for role in roles:
            for name in role_names((role,)):
                fields[name] = annotation if role in required else f"{annotation} | None"
                if role not in required:
                    setattr(cls, name, None)
        cls.__annotations__ = {**fields, **own}
        return cls

    return add


class ConfigError(ValueError):
    """A bad option value, an unknown option or an unreadable configuration file."""


def _check_type(owner: str, name: str, value: Any, kind: str) -> None:
    """`kind` is the annotation text of the field: int, float, str, bool, dict, optional forms."""
    if value is None:
        if "None" in kind:
            return
        raise ConfigError(f"{owner}.{name} must be set (got None)")
    base = kind.replace(" | None", "")
    valid = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "bool": isinstance(value, bool),
        "dict[str, Any]": isinstance(value, dict),
    }[base]
    if not valid:
        raise ConfigError(f"{owner}.{name} must be {base} (got {value!r})")


def check_fields(instance) -> None:
    owner = type(instance).__name__
    for f in dataclasses.fields(instance):
        _check_type(owner, f.name, getattr(instance, f.name), str(f.type))


def _finite(owner: str, name: str, value) -> None:
    if value is not None and not math.isfinite(value):
        raise ConfigError(f"{owner}.{name} must be a finite number (got {value})")


def positive(owner: str, **values) -> None:
    for name, value in values.items():
        _finite(owner, name, value)
        if value is not None and value <= 0:
            raise ConfigError(f"{owner}.{name} must be > 0 (got {value})")


def non_negative(owner: str, **values) -> None:
    for name, value in values.items():
        _finite(owner, name, value)
        if value is not None and value < 0:
            raise ConfigError(f"{owner}.{name} must be >= 0 (got {value})")


@dataclass(frozen=True)
@role_fields("str")
class DataSpec:
    """Where the embeddings come from: one aligned dataset split into roles, or explicit stores.

    Aligned dataset: `images`/`texts` hold the same items row by row; `make_split` draws
    `n_pairs` pairs, `n_val + n_test` held-out pairs (the first `n_val` validate, the rest
    test) and unpaired images and texts from disjoint rows (`n_unpaired` each, or all that
    remain; `disjoint_unpaired`: images and texts from two disjoint halves of the rows left, so
    no unpaired image has its caption among the unpaired texts); `n_val` and `n_test` left out
    are sized from the data (:func:`held_out_size`). Explicit: one store per role and modality
    (:func:`role_fields`): `paired_*` (required), `unpaired_*`, `val_*`, `test_*`; with
    `n_pairs`, the paired stores are a pool from which `n_pairs` pairs are drawn by `split_seed`.
    The sizes of an aligned split (`n_val`, `n_test`, `n_unpaired`, `disjoint_unpaired`) have
    no meaning for explicit stores and are refused with them.
    Paths are embedding stores (.npy, .safetensors, .h5, a directory or shards); `key`
    names the array inside .safetensors/.h5 files.
    """

    images: str | None = None
    texts: str | None = None
    n_pairs: int | None = None
    n_val: int | None = None
    n_test: int | None = None
    n_unpaired: int | None = None
    disjoint_unpaired: bool = False
    split_seed: int = 0
    key: str | None = None

    def __post_init__(self):
        check_fields(self)
        owner = "DataSpec"
        positive(owner, n_pairs=self.n_pairs, n_unpaired=self.n_unpaired)
        non_negative(owner, n_val=self.n_val, n_test=self.n_test, split_seed=self.split_seed)
        explicit = [name for name in role_names() if getattr(self, name) is not None]
        if self.aligned:
            if self.images is None or self.texts is None:
                raise ConfigError("data: give both images and texts for an aligned dataset")
            if explicit:
                raise ConfigError(
                    f"data: give either images/texts or explicit stores, not both ({explicit[0]})"
                )
            if self.n_pairs is None:
                raise ConfigError("data: n_pairs is required with images/texts (how many pairs to keep)")
        else:
            if self.paired_images is None or self.paired_texts is None:
                raise ConfigError("data: give images and texts, or paired_images and paired_texts")
            sizes = {
                "n_val (--val)": self.n_val,
                "n_test (--test)": self.n_test,
                "n_unpaired (--unpaired)": self.n_unpaired,
            }
            given = [name for name, value in sizes.items() if value is not None]
            if self.disjoint_unpaired:
                given.append("disjoint_unpaired")
            if given:
                raise ConfigError(
                    f"data: {', '.join(given)} size an aligned dataset (images/texts); with explicit "
                    "stores every row of each store is used: give val_*/test_*/unpaired_* stores instead"
                )
            for role in ROLES[1:]:
                if (getattr(self, f"{role}_images") is None) != (getattr(self, f"{role}_texts") is None):
                    present = f"{role}_images" if getattr(self, f"{role}_images") else f"{role}_texts"
                    raise ConfigError(f"data: {present} is given without its other modality")

    @property
    def aligned(self) -> bool:
        return self.images is not None or self.texts is not None

    def store_paths(self) -> dict[str, str]:
        """The store of each field that names one (``images``, ``paired_texts``...)."""
        names = ("images", "texts", *role_names())
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def resolved(self) -> DataSpec:
        """The same spec with absolute store paths (what a run directory records, so that it
        reads the same files from any working directory)."""
        absolute = {
            name: os.path.abspath(os.path.expanduser(path)) for name, path in self.store_paths().items()
        }
        return dataclasses.replace(self, **absolute)


#: Held-out pairs per role (validation, test) when not given: a tenth of the rows, at most this.
MAX_HELD_OUT = 1000


def held_out_size(n_total: int) -> int:
    """Validation (and test) pairs of an aligned dataset of ``n_total`` rows when not given:
    a tenth of the rows, at least 1 and at most :data:`MAX_HELD_OUT`."""
    return max(1, min(MAX_HELD_OUT, n_total // 10))
