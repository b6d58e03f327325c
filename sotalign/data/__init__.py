"""Data layer: lazy embedding stores, splits and resumable samplers, the data of a run (spec and
views), the platonic toy, frozen encoders.

The offline datasets (`sotalign.data.datasets`), the cached embedder (`sotalign.data.embed`) and
the real benchmark tasks (`sotalign.align.tasks`) are imported on demand."""

from .encoders import load_image_encoder, load_text_encoder
from .spec import MODALITIES, ROLES, ConfigError, DataSpec, role_names
from .splits import BatchSampler, Split, make_split
from .stores import (
    EmbeddingStore,
    HDF5Store,
    NpyStore,
    SafetensorsStore,
    ShardedStore,
    check_aligned,
    open_store,
    save_store,
)
from .synthetic import PlatonicData, PlatonicGenerator, load_platonic_encoder, make_platonic, write_platonic
from .views import AlignmentData, Rows

__all__ = [
    "MODALITIES",
    "ROLES",
    "AlignmentData",
    "BatchSampler",
    "ConfigError",
    "DataSpec",
    "EmbeddingStore",
    "HDF5Store",
    "NpyStore",
    "PlatonicData",
    "PlatonicGenerator",
    "Rows",
    "SafetensorsStore",
    "ShardedStore",
    "Split",
    "check_aligned",
    "load_image_encoder",
    "load_platonic_encoder",
    "load_text_encoder",
    "make_platonic",
    "make_split",
    "open_store",
    "role_names",
    "save_store",
    "write_platonic",
]
