"""Data layer: lazy embedding stores, splits and resumable samplers, the platonic toy, frozen encoders.

The offline datasets (`sotalign.data.datasets`), the cached embedder (`sotalign.data.embed`) and
the real tasks (`sotalign.data.tasks`) are imported on demand."""

from .encoders import load_image_encoder, load_text_encoder
from .splits import BatchSampler, Split, make_split
from .stores import (EmbeddingStore, HDF5Store, NpyStore, SafetensorsStore, ShardedStore, check_aligned,
                     open_store, save_store)
from .synthetic import PlatonicData, PlatonicGenerator, load_platonic_encoder, make_platonic, write_platonic

__all__ = ["BatchSampler", "EmbeddingStore", "HDF5Store", "NpyStore", "PlatonicData", "PlatonicGenerator",
           "SafetensorsStore", "ShardedStore", "Split", "check_aligned", "load_platonic_encoder",
           "load_image_encoder", "load_text_encoder", "make_platonic", "make_split", "open_store", "save_store", "write_platonic"]
