"""data/spec.py: DataSpec validation and the one definition of the role × modality fields."""

from __future__ import annotations

import dataclasses

import pytest

from sotalign.align.methods import Batch
from sotalign.data import AlignmentData, DataSpec
from sotalign.data.spec import MODALITIES, ROLES, ConfigError, role_fields, role_names


def test_role_names_are_every_role_with_every_modality():
    assert role_names() == tuple(f"{role}_{modality}" for role in ROLES for modality in MODALITIES)
    assert role_names(("val",)) == ("val_images", "val_texts")


def test_every_class_with_role_fields_takes_them_from_the_one_definition():
    spec_fields = [f.name for f in dataclasses.fields(DataSpec)]
    assert set(role_names()) <= set(spec_fields)
    assert [f.name for f in dataclasses.fields(AlignmentData)][:8] == list(role_names())
    assert [f.name for f in dataclasses.fields(Batch)][:4] == list(role_names(("paired", "unpaired")))


def test_role_fields_required_and_optional():
    @dataclasses.dataclass(frozen=True)
    @role_fields("int", roles=("paired", "val"), required=("paired",))
    class Example:
        extra: int = 0

    example = Example(paired_images=1, paired_texts=2)
    assert (example.val_images, example.val_texts, example.extra) == (None, None, 0)
    with pytest.raises(TypeError):
        Example(paired_images=1)
    assert {f.name: f.type for f in dataclasses.fields(Example)}["val_texts"] == "int | None"


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(images="a.npy"), "both images and texts"),
        (dict(images="a.npy", texts="b.npy"), "n_pairs is required"),
        (dict(images="a.npy", texts="b.npy", n_pairs=3, val_texts="c.npy"), "not both .*val_texts"),
        (dict(paired_images="a.npy"), "paired_images and paired_texts"),
        (
            dict(paired_images="a.npy", paired_texts="b.npy", test_texts="c.npy"),
            "test_texts is given without",
        ),
        (dict(images="a.npy", texts="b.npy", n_pairs=0), "n_pairs must be > 0"),
        (dict(images="a.npy", texts="b.npy", n_pairs=3, n_val=-1), "n_val must be >= 0"),
        (dict(paired_images=3, paired_texts="b.npy"), "DataSpec.paired_images must be str"),
    ],
)
def test_bad_specs_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        DataSpec(**options)


def test_explicit_and_aligned_specs():
    assert DataSpec(images="a.npy", texts="b.npy", n_pairs=3).aligned
    spec = DataSpec(paired_images="a.npy", paired_texts="b.npy", unpaired_images="c", unpaired_texts="d")
    assert not spec.aligned and spec.val_images is None
