"""The benchmark's task splits (`sotalign.align.tasks.split`, `fashion_split`) on synthetic
features whose every row carries its index, so membership can be read back from the tensors,
and the zero-shot scoring of `run_zero_shot`."""

import pytest
import torch

from sotalign.align.tasks import (
    FASHION_TEMPLATES,
    FASHION_VAL,
    N_TEST,
    N_VAL,
    TASKS,
    Embedded,
    FashionEmbedded,
    fashion_prompts,
    fashion_split,
    run_zero_shot,
    split,
)
from sotalign.align.teachers import CCATeacher

N_EMOJI = 1300


def _embedded() -> Embedded:
    index = torch.arange(N_EMOJI, dtype=torch.float32)[:, None]
    return Embedded(
        emoji_images=index.repeat(1, 3),
        emoji_texts=-index.repeat(1, 2),  # text of emoji i is −i: pairs are readable
        emoji_names=[f"emoji {i}" for i in range(N_EMOJI)],
        clipart_images=torch.full((7, 3), -1.0),
        clipart_texts=torch.full((7, 2), 1.0),
        wordnet_texts=torch.full((5, 2), 2.0),
    )


def _ids(images=None, texts=None) -> list[int]:
    return [int(v) for v in (images[:, 0] if images is not None else -texts[:, 0])]


@pytest.mark.parametrize("task", TASKS)
def test_every_task_keeps_validation_and_test_fixed_and_out_of_training(task):
    data = _embedded()
    first, second = split(data, task, 100, seed=0), split(data, task, 100, seed=1)
    assert torch.equal(first.val_images, second.val_images)
    assert torch.equal(first.test_texts, second.test_texts)
    assert not torch.equal(first.paired_images, second.paired_images)  # pairs redrawn per seed
    held_out = set(_ids(first.val_images)) | set(_ids(first.test_images))
    assert len(first.val_images) == N_VAL and len(first.test_images) == N_TEST
    assert _ids(first.paired_images) == _ids(texts=first.paired_texts)  # rows stay paired
    training = set(_ids(first.paired_images))
    if task != "emoji-out":
        training |= set(_ids(first.unpaired_images)) | set(_ids(texts=first.unpaired_texts))
    assert not training & held_out


def test_emoji_in_unpaired_images_and_texts_come_from_disjoint_emoji():
    parts = split(_embedded(), "emoji-in", 100, seed=0)
    images, texts = set(_ids(parts.unpaired_images)), set(_ids(texts=parts.unpaired_texts))
    assert not images & texts and len(images) == len(texts) == (N_EMOJI - N_VAL - N_TEST - 100) // 2


def test_emoji_hidden_pools_hold_the_same_emoji_with_the_pairing_withheld():
    parts = split(_embedded(), "emoji-hidden", 100, seed=0)
    images, texts = _ids(parts.unpaired_images), _ids(texts=parts.unpaired_texts)
    assert sorted(images) == sorted(texts) and len(images) == N_EMOJI - N_VAL - N_TEST - 100
    assert sum(i == t for i, t in zip(images, texts, strict=True)) < 10  # shuffled apart, not row-aligned


def test_emoji_out_pools_are_the_clipart_and_wordnet_rows():
    data = _embedded()
    parts = split(data, "emoji-out", 100, seed=0)
    assert torch.equal(parts.unpaired_images, data.clipart_images)
    assert torch.equal(parts.unpaired_texts, torch.cat([data.clipart_texts, data.wordnet_texts]))


def test_emoji_out_without_its_pools_is_refused():
    data = _embedded()
    data.clipart_images, data.clipart_texts, data.wordnet_texts = (
        t[:0] for t in (data.clipart_images, data.clipart_texts, data.wordnet_texts)
    )
    with pytest.raises(ValueError, match="emoji-out needs the OpenClipArt and WordNet pools"):
        split(data, "emoji-out", 100, seed=0)
    assert (
        len(split(data, "emoji-hidden", 100, seed=0).unpaired_images) > 0
    )  # the other tasks do not need them


def test_unknown_task_and_too_many_pairs_are_refused():
    data = _embedded()
    with pytest.raises(ValueError, match="unknown task 'emoji'"):
        split(data, "emoji", 100, seed=0)
    with pytest.raises(ValueError, match="only 600 emoji outside validation and test"):
        split(data, "emoji-in", 601, seed=0)


# ----------------------------------------------------------------------------- fashion-zeroshot

N_TRAIN, N_TEST_IMAGES, N_GLOSSES = FASHION_VAL + 300, 200, 20
CLASSES = tuple(f"class {c}" for c in range(10))


def _fashion(seed: int = 0) -> FashionEmbedded:
    """Train rows carry their index in column 0 (membership readable); prompts and images of a
    class share a direction, so zero-shot accuracy is well above chance."""
    g = torch.Generator().manual_seed(seed)
    train_labels = torch.arange(N_TRAIN) % 10
    test_labels = torch.randint(0, 10, (N_TEST_IMAGES,), generator=g)
    centres = torch.randn(10, 5, generator=g)

    def images(labels):
        return centres[labels] + 0.5 * torch.randn(len(labels), 5, generator=g)

    train = images(train_labels)
    train[:, 0] = torch.arange(N_TRAIN, dtype=torch.float32)
    return FashionEmbedded(
        emoji_images=torch.randn(N_EMOJI, 5, generator=g),
        emoji_texts=torch.randn(N_EMOJI, 4, generator=g),
        train_images=train,
        train_labels=train_labels,
        test_images=images(test_labels),
        test_labels=test_labels,
        gloss_texts=torch.randn(N_GLOSSES, 4, generator=g),
        prompt_texts=torch.randn(10 * len(FASHION_TEMPLATES), 4, generator=g),
        classes=CLASSES,
    )


def test_fashion_split_keeps_validation_fixed_and_out_of_the_pool():
    data = _fashion()
    first, second = fashion_split(data, 100, seed=0), fashion_split(data, 100, seed=1)
    assert torch.equal(first.val_images, second.val_images) and torch.equal(
        first.test_images, data.test_images
    )
    assert not torch.equal(first.paired_images, second.paired_images)  # pairs redrawn per seed
    val, pool = set(first.val_images[:, 0].tolist()), set(first.unpaired_images[:, 0].tolist())
    assert len(val) == FASHION_VAL and not val & pool and len(val | pool) == N_TRAIN  # the whole rest
    assert torch.equal(first.val_labels, data.train_labels[first.val_images[:, 0].long()])
    assert torch.equal(first.unpaired_texts, torch.cat([data.gloss_texts, data.prompt_texts]))


def test_fashion_prompts_are_class_major():
    prompts = fashion_prompts(("cat", "dog"), ("a {}.", "the {}!"))
    assert prompts == ["a cat.", "the cat!", "a dog.", "the dog!"]


def test_zero_shot_score_of_the_teacher_matches_its_cca_maps():
    """The CCA teacher alone, scored through `run_zero_shot`, against an independent zero-shot
    classifier built from `CCATeacher` by hand (mean of normalised prompts per class, argmax)."""
    data = _fashion()
    result = run_zero_shot(data, 200, seed=0, method="cca+none", steps=1)
    parts = fashion_split(data, 200, seed=0)
    teacher = CCATeacher().fit(parts.paired_images, parts.paired_texts)
    prompts = torch.nn.functional.normalize(teacher.transform_texts(data.prompt_texts).double(), dim=1)
    weights = torch.nn.functional.normalize(prompts.reshape(10, len(FASHION_TEMPLATES), -1).mean(1), dim=1)
    for images, labels, key in (
        (parts.val_images, parts.val_labels, "val"),
        (data.test_images, data.test_labels, "test"),
    ):
        predicted = (teacher.transform_images(images).double() @ weights.T).argmax(1)
        assert result[key] == pytest.approx(100.0 * float((predicted == labels).double().mean()))
