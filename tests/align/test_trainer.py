"""The trainer: learning on the platonic toy, bitwise resume, data wiring and clear errors."""

from __future__ import annotations

import json
import math
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_TRAINING, toy_spec
from safetensors.torch import load_file

from sotalign.align import AlignmentData, AlignmentHeads, DataSpec, TrainConfig, fit
from sotalign.align.config import ConfigError
from sotalign.align.trainer import BatchSource, cosine_schedule
from sotalign.data import save_store, write_platonic

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def platonic(tmp_path_factory):
    directory = tmp_path_factory.mktemp("platonic")
    write_platonic(directory, 1400, image_dim=24, text_dim=20, latent_dim=8, n_concepts=10, seed=3)
    return directory


@pytest.fixture(scope="module")
def data(platonic):
    return AlignmentData.from_spec(toy_spec(platonic, n_pairs=64, n_val=200, n_test=300, split_seed=0))


def test_split_roles_are_disjoint_and_sized(data):
    assert data.sizes() == {
        "paired_images": 64,
        "paired_texts": 64,
        "unpaired_images": 836,
        "unpaired_texts": 836,
        "val_images": 200,
        "val_texts": 200,
        "test_images": 300,
        "test_texts": 300,
    }
    held_out = set(data.val_images.indices) | set(data.test_images.indices)
    assert not set(data.val_images.indices) & set(data.test_images.indices)
    for rows in (data.paired_images, data.unpaired_images, data.unpaired_texts):
        assert not set(rows.indices) & held_out
    assert np.array_equal(data.paired_images.indices, data.paired_texts.indices)


def retrieval_r1(img: torch.Tensor, txt: torch.Tensor) -> float:
    """Mean of image→text and text→image R@1 (%), by argmax, as an independent oracle."""
    s = F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T
    target = torch.arange(len(s))
    return 50.0 * (
        float((s.argmax(1) == target).float().mean()) + float((s.argmax(0) == target).float().mean())
    )


def test_teacher_alone_beats_chance(data, tmp_path):
    fit(TrainConfig(method="cca+none", **TINY_TRAINING), data, tmp_path / "cca", progress=False)
    metrics = json.loads((tmp_path / "cca" / "metrics.json").read_text())
    chance = 100.0 / 300
    assert metrics["test"]["mean_R@1"] > 10 * chance
    assert not (tmp_path / "cca" / "heads.safetensors").exists()


def test_sotalign_heads_improve_on_their_initial_state(data, tmp_path):
    config = TrainConfig(method="sotalign", steps=30, seed=1, head_init="random", **TINY_TRAINING)
    torch.manual_seed(config.seed)  # the trainer initialises the heads right after this seed
    initial = AlignmentHeads(data.image_dim, data.text_dim, config.out_dim)
    test_images, test_texts = data.test_images.all(), data.test_texts.all()
    with torch.no_grad():
        before = retrieval_r1(initial.image(test_images), initial.text(test_texts))
    model = fit(config, data, tmp_path / "run", progress=False)
    after = retrieval_r1(model.embed_images(test_images), model.embed_texts(test_texts))
    assert after > before + 5
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert {"siglip", "klot", "loss", "lr"} <= set(log[0]) and "val" in log[9]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    best = max((r for r in log if "val" in r), key=lambda r: r["val"]["mean_R@1"])
    assert metrics["best_step"] == best["step"] and metrics["val"] == best["val"]


class Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["sotalign", "nnclr"])
def test_resume_after_a_kill_gives_bitwise_identical_weights(data, tmp_path, method):
    config = TrainConfig(method=method, steps=24, **{**TINY_TRAINING, "checkpoint_every": 8, "eval_every": 6})
    fit(config, data, tmp_path / "whole", progress=False)

    def kill_at_13(step):
        if step == 13:  # after the checkpoint of step 8: steps 9–13 are lost and redone
            raise Killed

    with pytest.raises(Killed):
        fit(config, data, tmp_path / "resumed", progress=False, on_step=kill_at_13)
    fit(config, data, tmp_path / "resumed", resume=True, progress=False)

    whole, resumed = (load_file(tmp_path / d / "heads.safetensors") for d in ("whole", "resumed"))
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert (tmp_path / "whole" / "log.jsonl").read_text() == (tmp_path / "resumed" / "log.jsonl").read_text()
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["step"] == 24


def test_a_slow_loader_reads_ahead_and_the_run_stays_resume_exact(data, tmp_path, monkeypatch):
    from sotalign.align import trainer

    config = TrainConfig(
        method="sotalign", steps=12, **{**TINY_TRAINING, "checkpoint_every": 4, "eval_every": 6}
    )
    monkeypatch.setattr(trainer, "PREFETCH_ABOVE_LOAD_SHARE", 1.0)  # never read ahead
    fit(config, data, tmp_path / "in_step", progress=False)
    timing = json.loads((tmp_path / "in_step" / "metrics.json").read_text())["timing"]
    assert timing["prefetch"] is False and timing["steps_timed"] == 11
    assert sum(timing["shares"].values()) == pytest.approx(1.0, abs=1e-3)
    assert timing["shares"]["klot_forward"] > 0 and timing["shares"]["klot_backward"] > 0
    assert timing["unpaired_rows_per_second"] == pytest.approx(
        2 * TINY_TRAINING["unpaired_batch_size"] / timing["seconds_per_step"], rel=1e-3
    )

    monkeypatch.undo()
    read = BatchSource.read

    def slow_read(self, step):
        time.sleep(0.05)  # a slow disk: far more than 10 % of these tiny steps
        return read(self, step)

    monkeypatch.setattr(BatchSource, "read", slow_read)

    def kill_at_7(step):
        if step == 7:  # with step 8 being read ahead
            raise Killed

    with pytest.raises(Killed):
        fit(config, data, tmp_path / "ahead", progress=False, on_step=kill_at_7)
    fit(config, data, tmp_path / "ahead", resume=True, progress=False)
    timing = json.loads((tmp_path / "ahead" / "metrics.json").read_text())["timing"]
    assert timing["prefetch"] is True
    in_step, ahead = (load_file(tmp_path / d / "heads.safetensors") for d in ("in_step", "ahead"))
    for name in in_step:
        assert torch.equal(in_step[name], ahead[name]), name
    assert (tmp_path / "in_step" / "log.jsonl").read_text() == (tmp_path / "ahead" / "log.jsonl").read_text()


def test_klot_marginal_errors_are_logged_and_a_lasting_miss_warns_once(data, tmp_path, monkeypatch):
    import sotalign.ot

    def plan_errors(schedule):
        """Stands for sotalign.ot.klot_marginal_errors: call i (one per step) returns schedule(i)."""
        calls = []

        def errors():
            calls.append(None)
            return torch.tensor(schedule(len(calls)), dtype=torch.float32)

        return errors

    monkeypatch.setattr(sotalign.ot, "NOT_CONVERGED", 1e-2, raising=False)
    # steps 1-4 converge, then the student plan misses its marginals from step 5 on
    schedule = lambda i: [0.25 if i >= 5 else 1e-3, 2e-3]  # noqa: E731
    monkeypatch.setattr(sotalign.ot, "klot_marginal_errors", plan_errors(schedule), raising=False)
    config = TrainConfig(method="sotalign", steps=20, **TINY_TRAINING)
    with pytest.warns(RuntimeWarning, match=r"KLOT did not converge in the 10 steps up to step 14") as caught:
        fit(config, data, tmp_path / "missed", progress=False)
    assert len([w for w in caught if "KLOT did not converge" in str(w.message)]) == 1
    log = [json.loads(line) for line in (tmp_path / "missed" / "log.jsonl").read_text().splitlines()]
    expected = [torch.tensor(schedule(i), dtype=torch.float32).double().tolist() for i in range(1, 21)]
    assert [
        [r["klot_marginal_error"]["student"], r["klot_marginal_error"]["teacher"]] for r in log
    ] == expected

    # misses that do not last (every other step) say nothing; recipes without KLOT log none
    schedule = lambda i: [0.25 if i % 2 else 1e-3, 2e-3]  # noqa: E731
    monkeypatch.setattr(sotalign.ot, "klot_marginal_errors", plan_errors(schedule), raising=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="KLOT did not converge")
        fit(config, data, tmp_path / "passing", progress=False)
        fit(TrainConfig(method="sail", steps=3, **TINY_TRAINING), data, tmp_path / "sail", progress=False)
    assert "klot_marginal_error" not in (tmp_path / "sail" / "log.jsonl").read_text()


def test_an_unconverged_klot_warns_once_per_run_and_a_converged_one_not_at_all(data, tmp_path):
    import sotalign.ot

    starved = TrainConfig(method="sotalign", steps=12, **{**TINY_TRAINING, "n_iters": 1, "eps_teacher": 0.01})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(starved, data, tmp_path / "starved", progress=False)
    klot_warnings = [str(w.message) for w in caught if "converge" in str(w.message)]
    assert (
        len(klot_warnings) == 1 and "KLOT did not converge in the 10 steps up to step 10" in klot_warnings[0]
    )
    log = [json.loads(line) for line in (tmp_path / "starved" / "log.jsonl").read_text().splitlines()]
    assert all(max(r["klot_marginal_error"].values()) > sotalign.ot.NOT_CONVERGED for r in log)

    converged = TrainConfig(method="sotalign", steps=12, **{**TINY_TRAINING, "n_iters": 300})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*converge")
        fit(converged, data, tmp_path / "converged", progress=False)
    log = [json.loads(line) for line in (tmp_path / "converged" / "log.jsonl").read_text().splitlines()]
    assert all(max(r["klot_marginal_error"].values()) < sotalign.ot.NOT_CONVERGED for r in log)


def test_resume_drops_a_torn_log_line_and_matches_an_uninterrupted_run(data, tmp_path):
    config = TrainConfig(method="sail", steps=12, **{**TINY_TRAINING, "checkpoint_every": 4, "eval_every": 6})
    fit(config, data, tmp_path / "whole", progress=False)

    def kill_at_6(step):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        fit(config, data, tmp_path / "resumed", progress=False, on_step=kill_at_6)
    log = tmp_path / "resumed" / "log.jsonl"
    with log.open("a") as file:
        file.write('{"step": 7, "lr"')  # a crash in the middle of appending step 7
    with pytest.warns(RuntimeWarning, match=r"log\.jsonl: dropped a torn last line"):
        fit(config, data, tmp_path / "resumed", resume=True, progress=False)
    assert log.read_text() == (tmp_path / "whole" / "log.jsonl").read_text()


def test_batches_are_independent_deterministic_and_nnclr_neighbours_are_nearest(data):
    config = TrainConfig(method="nnclr", **TINY_TRAINING)
    a = BatchSource(config.training_method(), config, data, None, torch.device("cpu"))
    b = BatchSource(config.training_method(), config, data, None, torch.device("cpu"))
    first, again = a.batch(5), b.batch(5)
    for name in ("paired_images", "unpaired_images", "unpaired_texts", "neighbour_texts"):
        assert torch.equal(getattr(first, name), getattr(again, name))
    # images and texts of the unpaired pools come from different streams (rows not matched)
    image_rows = data.unpaired_images.indices[a.images.batch(5)]
    text_rows = data.unpaired_texts.indices[a.texts.batch(5)]
    assert np.mean(image_rows == text_rows) < 0.1
    # brute-force nearest paired image of each unpaired image, by cosine similarity
    sims = F.normalize(data.unpaired_images.all(), dim=1) @ F.normalize(data.paired_images.all(), dim=1).T
    assert torch.equal(a.image_neighbours[:, 0], sims.argmax(1))
    positions = a.images.batch(5)
    expected = data.paired_texts.get(sims.argmax(1)[torch.from_numpy(positions)].numpy())
    assert torch.equal(first.neighbour_texts, expected)


def test_cosine_schedule_closed_form():
    factor = cosine_schedule(warmup_steps=5, steps=25)
    assert [factor(t) for t in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    for t in range(5, 25):
        assert factor(t) == pytest.approx(0.5 * (1 + math.cos(math.pi * (t - 5) / 20)))


def test_bad_stores_and_run_directories_give_clear_errors(platonic, data, tmp_path):
    images = str(platonic / "images.npy")
    save_store(tmp_path / "narrow.npy", np.zeros((50, 7), np.float32))
    spec = DataSpec(
        paired_images=images,
        paired_texts=str(platonic / "texts.npy"),
        unpaired_images=str(tmp_path / "narrow.npy"),
        unpaired_texts=str(platonic / "texts.npy"),
    )
    with pytest.raises(ValueError, match=r"narrow\.npy: unpaired images have dimension 7.*have 24"):
        AlignmentData.from_spec(spec)
    with pytest.raises(FileNotFoundError, match=r"missing\.npy"):
        AlignmentData.from_spec(DataSpec(images=str(tmp_path / "missing.npy"), texts=images, n_pairs=5))
    with pytest.raises(ConfigError, match="unpaired_images is given without"):
        DataSpec(paired_images=images, paired_texts=images, unpaired_images=images)
    pairs_only = AlignmentData(data.paired_images, data.paired_texts)
    with pytest.raises(ValueError, match="method 'sotalign' needs unpaired images and texts"):
        fit(TrainConfig(**TINY_TRAINING), pairs_only, tmp_path / "x", progress=False)

    config = TrainConfig(method="cca+none", **TINY_TRAINING)
    fit(config, data, tmp_path / "done", progress=False)
    with pytest.raises(ValueError, match="already holds a run"):
        fit(config, data, tmp_path / "done", progress=False)
    with pytest.raises(ConfigError, match="changed: lr"):
        fit(
            TrainConfig(method="cca+none", **{**TINY_TRAINING, "lr": 1e-3}),
            data,
            tmp_path / "done",
            resume=True,
            progress=False,
        )
