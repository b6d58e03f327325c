"""Views of a run's data: :class:`Rows` (some rows of a store) and :class:`AlignmentData`
(the rows of every role and modality, opened lazily from a :class:`~sotalign.data.spec.DataSpec`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .spec import ALIGNED_ROLES, ROLES, DataSpec, held_out_size, role_fields, role_names
from .splits import make_split
from .stores import EmbeddingStore, check_aligned, open_store

#: Rows read at once when a whole view is needed (NNCLR neighbours, stage 1, evaluation).
READ_ROWS = 65536


@dataclass(frozen=True)
class Rows:
    """Some rows of an embedding store: row p of this view is `store` row `indices[p]`."""

    store: EmbeddingStore
    indices: np.ndarray

    @classmethod
    def whole(cls, store: EmbeddingStore) -> Rows:
        return cls(store, np.arange(len(store), dtype=np.int64))

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def dim(self) -> int:
        return self.store.dim

    def get(self, positions) -> torch.Tensor:
        """The rows at ``positions``, checked as they are read: a NaN or Inf is a ValueError
        naming the file and the row (so a run needs no scan of the whole store first)."""
        return self.store.finite_rows(self.indices[np.asarray(positions)])

    def all(self) -> torch.Tensor:
        return torch.cat(
            [self.get(np.arange(s, min(s + READ_ROWS, len(self)))) for s in range(0, len(self), READ_ROWS)]
        )


@dataclass(frozen=True)
@role_fields("Rows", required=("paired",))
class AlignmentData:
    """Paired, unpaired, validation and test rows of a run (one :class:`Rows` per role and
    modality, :func:`~sotalign.data.spec.role_fields`), and the spec they came from."""

    spec: DataSpec | None = None

    def __post_init__(self):
        for modality, dim in (("images", self.paired_images.dim), ("texts", self.paired_texts.dim)):
            for role in ROLES[1:]:
                rows = getattr(self, f"{role}_{modality}")
                if rows is not None and rows.dim != dim:
                    raise ValueError(
                        f"{rows.store.path}: {role} {modality} have dimension {rows.dim}, "
                        f"but the paired {modality} ({getattr(self, f'paired_{modality}').store.path}) "
                        f"have {dim}"
                    )
        for role in ALIGNED_ROLES:
            images, texts = getattr(self, f"{role}_images"), getattr(self, f"{role}_texts")
            if images is not None and len(images) != len(texts):
                raise ValueError(
                    f"{role} stores are not aligned: {images.store.path} gives {len(images)} rows, "
                    f"{texts.store.path} gives {len(texts)}"
                )
        if len(self.paired_images) < 2:
            raise ValueError(
                f"{self.paired_images.store.path}: need at least 2 pairs, got {len(self.paired_images)}"
            )

    @property
    def image_dim(self) -> int:
        return self.paired_images.dim

    @property
    def text_dim(self) -> int:
        return self.paired_texts.dim

    def views(self) -> dict[str, Rows]:
        """The views that are present, by field name (``paired_images``...)."""
        return {name: getattr(self, name) for name in role_names() if getattr(self, name) is not None}

    def sizes(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.views().items()}

    @classmethod
    def from_spec(cls, spec: DataSpec) -> AlignmentData:
        """Open the stores of `spec` (lazily) and split an aligned dataset into its roles."""
        if not spec.aligned:
            stores = {name: getattr(spec, name) for name in role_names()}
            views = {
                name: Rows.whole(open_store(path, key=spec.key)) for name, path in stores.items() if path
            }
            if spec.n_pairs is not None:  # the paired stores are a pool: draw n_pairs of them
                pool_images, pool_texts = views["paired_images"], views["paired_texts"]
                check_aligned(pool_images.store, pool_texts.store)
                if spec.n_pairs > len(pool_images):
                    raise ValueError(
                        f"{spec.paired_images}: --pairs {spec.n_pairs} requested "
                        f"from a pool of {len(pool_images)}"
                    )
                drawn = np.sort(
                    np.random.default_rng([spec.split_seed, 2]).permutation(len(pool_images))[: spec.n_pairs]
                )
                views["paired_images"] = Rows(pool_images.store, drawn)
                views["paired_texts"] = Rows(pool_texts.store, drawn)
            return cls(**views, spec=spec)
        images, texts = open_store(spec.images, key=spec.key), open_store(spec.texts, key=spec.key)
        check_aligned(images, texts)
        n_total = len(images)
        n_val = held_out_size(n_total) if spec.n_val is None else spec.n_val
        n_test = held_out_size(n_total) if spec.n_test is None else spec.n_test
        if spec.n_pairs + n_val + n_test > n_total:
            given = {"--pairs": spec.n_pairs, "--val": n_val, "--test": n_test}
            raise ValueError(
                f"{images.path}: {' + '.join(f'{flag} {value}' for flag, value in given.items())} = "
                f"{spec.n_pairs + n_val + n_test} rows, but the store has {n_total}; lower "
                + " or ".join(flag for flag, value in given.items() if value)
            )
        split = make_split(
            n_total,
            spec.n_pairs,
            n_val + n_test,
            n_unpaired=spec.n_unpaired,
            seed=spec.split_seed,
            disjoint_unpaired=spec.disjoint_unpaired,
        )
        # make_split returns sorted rows; shuffle before cutting validation from test so that
        # neither is biased towards one end of the store.
        order = np.random.default_rng([spec.split_seed, 4]).permutation(split.val)
        val, test = np.sort(order[:n_val]), np.sort(order[n_val:])

        def rows(store, indices):
            return Rows(store, indices) if len(indices) else None

        return cls(
            paired_images=Rows(images, split.paired),
            paired_texts=Rows(texts, split.paired),
            unpaired_images=rows(images, split.unpaired_images),
            unpaired_texts=rows(texts, split.unpaired_texts),
            val_images=rows(images, val),
            val_texts=rows(texts, val),
            test_images=rows(images, test),
            test_texts=rows(texts, test),
            spec=spec,
        )
