"""The benchmark's task splits (`sotalign.align.tasks.split`) on a synthetic `Embedded` whose
every row carries its emoji index, so membership can be read back from the tensors."""

import pytest
import torch

from sotalign.align.tasks import N_TEST, N_VAL, TASKS, Embedded, split

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


def test_unknown_task_and_too_many_pairs_are_refused():
    data = _embedded()
    with pytest.raises(ValueError, match="unknown task 'emoji'"):
        split(data, "emoji", 100, seed=0)
    with pytest.raises(ValueError, match="only 600 emoji outside validation and test"):
        split(data, "emoji-in", 601, seed=0)
