"""Run directories a user can trust: the data a run reads is pinned by absolute path
and fingerprint, an incomplete run is never scored as finished, nothing is left behind by a run
that fails before its first step, Ctrl-C checkpoints, and bad store values fail up front."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import TINY_TRAINING, toy_spec
from safetensors.torch import load_file
from typer.testing import CliRunner

import sotalign
from sotalign.align import (
    AlignmentData,
    DataSpec,
    TrainConfig,
    TrainingInterrupted,
    fit,
    open_run_data,
    repoint,
)
from sotalign.cli import app
from sotalign.data import save_store, write_platonic
from sotalign.rundir import RunDirBusy, RunDirError

TINY = dict(
    TINY_TRAINING,
    out_dim=8,
    paired_batch_size=32,
    unpaired_batch_size=48,
    n_iters=10,
    eval_every=4,
    checkpoint_every=4,
)
pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


@pytest.fixture
def platonic(tmp_path):
    directory = tmp_path / "data"
    write_platonic(directory, 300, image_dim=12, text_dim=10, latent_dim=4, n_concepts=4, seed=1)
    return directory


def heads_of(run) -> dict:
    return load_file(run / "heads.safetensors")


def test_run_reads_the_same_files_from_any_directory(platonic, tmp_path, monkeypatch):
    monkeypatch.chdir(platonic.parent)
    run = tmp_path / "run"
    fit(
        TrainConfig(method="sail", steps=4, **TINY),
        AlignmentData.from_spec(toy_spec(platonic.relative_to(tmp_path))),
        run,
        progress=False,
    )
    config, data = open_run_data(run)
    assert os.path.isabs(data.spec.images) and os.path.isabs(data.spec.texts)
    # Another directory holding a same-named, different dataset changes nothing.
    elsewhere = tmp_path / "elsewhere"
    write_platonic(elsewhere / "data", 300, image_dim=12, text_dim=10, latent_dim=4, n_concepts=4, seed=9)
    monkeypatch.chdir(elsewhere)
    _, again = open_run_data(run)
    assert again.spec.images == data.spec.images
    assert torch.equal(again.test_images.all(), data.test_images.all())


def test_a_changed_store_is_refused_and_a_moved_one_can_be_repointed(platonic, tmp_path):
    run = tmp_path / "run"
    fit(
        TrainConfig(method="sail", steps=4, **TINY),
        AlignmentData.from_spec(toy_spec(platonic)),
        run,
        progress=False,
    )
    before = runner.invoke(app, ["eval", str(run)])
    assert before.exit_code == 0, before.output

    moved = tmp_path / "moved"
    shutil.move(platonic, moved)
    with pytest.raises(RunDirError, match=r"cannot open the run's data .*sotalign repoint"):
        open_run_data(run)
    assert sorted(repoint(run, str(platonic), str(moved))) == ["images", "texts"]
    assert runner.invoke(app, ["eval", str(run)]).output == before.output

    images = np.load(moved / "images.npy")
    images[0] += 1.0
    np.save(moved / "images.npy", images)
    with pytest.raises(RunDirError, match=r"images\.npy: the images store differs .*sample_sha256"):
        open_run_data(run)
    result = runner.invoke(app, ["eval", str(run)])
    assert result.exit_code == 1 and "differs from the one" in result.output
    with pytest.raises(ValueError, match="fingerprint differs"):
        repoint(run, str(moved), str(moved))


def test_resume_refuses_changed_data(platonic, tmp_path):
    run = tmp_path / "run"
    config = TrainConfig(method="sail", steps=8, **TINY)
    with pytest.raises(RuntimeError, match="stop"):
        fit(config, AlignmentData.from_spec(toy_spec(platonic)), run, progress=False, on_step=_stop_at(4))
    texts = np.load(platonic / "texts.npy")
    np.save(platonic / "texts.npy", texts[::-1].copy())
    with pytest.raises(RunDirError, match="texts store differs"):
        fit(config, AlignmentData.from_spec(toy_spec(platonic)), run, resume=True, progress=False)


def _stop_at(step):
    def on_step(done):
        if done == step:
            raise RuntimeError("stop")

    return on_step


def test_an_incomplete_run_is_not_scored_as_finished(platonic, tmp_path):
    run = tmp_path / "run"
    config = TrainConfig(method="sotalign", steps=12, **TINY)
    with pytest.raises(RuntimeError, match="stop"):
        fit(config, AlignmentData.from_spec(toy_spec(platonic)), run, progress=False, on_step=_stop_at(9))
    with pytest.raises(RunDirError, match="not complete .*checkpoint=True"):
        sotalign.load(run)
    model = sotalign.load(run, checkpoint=True)
    assert model.method == "sotalign (checkpoint: step 8 of 12)"
    # The checkpoint's heads, not the teacher: they map features like the saved state does.
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    x = torch.randn(5, 12)
    expected = torch.nn.functional.normalize(
        x @ state["heads"]["image.weight"].T + state["heads"]["image.bias"], dim=1
    )
    torch.testing.assert_close(model.embed_images(x), expected)
    refused = runner.invoke(app, ["eval", str(run)])
    assert refused.exit_code == 1 and "not complete" in refused.output
    scored = runner.invoke(app, ["eval", str(run), "--checkpoint"])
    assert scored.exit_code == 0 and "checkpoint: step 8 of 12" in scored.output


def test_a_run_that_fails_before_its_first_step_leaves_nothing(platonic, tmp_path, monkeypatch):
    from sotalign.align import trainer

    def broken_stage1(*args):
        raise RuntimeError("teacher exploded")

    run = tmp_path / "run"
    monkeypatch.setattr(trainer, "_stage1", broken_stage1)
    with pytest.raises(RuntimeError, match="teacher exploded"):
        fit(
            TrainConfig(method="sotalign", steps=4, **TINY),
            AlignmentData.from_spec(toy_spec(platonic)),
            run,
            progress=False,
        )
    assert not run.exists()


def test_a_run_killed_before_its_first_step_restarts_in_place(platonic, tmp_path):
    run = tmp_path / "run"
    data = AlignmentData.from_spec(toy_spec(platonic))
    fit(TrainConfig(method="sail", steps=4, **TINY), data, run, progress=False)
    # What a SIGKILL during stage 1 leaves: a configuration (and maybe a teacher), no step.
    for name in ("metrics.json", "log.jsonl", "heads.safetensors", "heads.json"):
        (run / name).unlink()
    shutil.rmtree(run / "checkpoints")
    fit(
        TrainConfig(method="sail", steps=4, lr=5e-3, **{k: v for k, v in TINY.items() if k != "lr"}),
        data,
        run,
        progress=False,
    )
    assert sotalign.load(run).method == "sail"
    with pytest.raises(ValueError, match="already holds a run"):
        fit(TrainConfig(method="sail", steps=4, **TINY), data, run, progress=False)


TRAIN_UNTIL_KILLED = """
import sys, time
from pathlib import Path
from sotalign.align import AlignmentData, DataSpec, TrainConfig, fit
data_dir, run = Path(sys.argv[1]), Path(sys.argv[2])
spec = DataSpec(images=str(data_dir / "images.npy"), texts=str(data_dir / "texts.npy"), n_pairs=40)

def wait_at_step_4(done):
    if done == 4:  # after its checkpoint
        (run.parent / "training").touch()
        time.sleep(300)  # until the test kills this process

config = TrainConfig(method="sail", steps=8, **{tiny})
fit(config, AlignmentData.from_spec(spec), run, progress=False, on_step=wait_at_step_4)
"""


def test_a_run_directory_has_one_writer_and_a_killed_writer_leaves_no_lock(platonic, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = TRAIN_UNTIL_KILLED.format(tiny=TINY)
    first = subprocess.Popen([sys.executable, "-c", script, str(platonic), str(run)], env=env)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "training").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first fit ended before it could be raced"
        busy = f"{run} is in use by process {first.pid}"
        # a second `fit --resume`, in a second real process, is refused at once
        second = subprocess.run(
            [sys.executable, "-m", "sotalign.cli", "fit", str(run), "--resume", "--quiet"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1 and busy in second.stderr, second.stderr
        # and so is a fresh `fit` of the same directory, and `repoint`
        fresh = runner.invoke(
            app,
            [
                "fit",
                str(run),
                "--images",
                str(platonic / "images.npy"),
                "--texts",
                str(platonic / "texts.npy"),
                "--pairs",
                "40",
                "--quiet",
            ],
        )
        assert fresh.exit_code == 1 and busy in fresh.output.replace("\n", ""), fresh.output
        with pytest.raises(RunDirBusy, match=f"in use by process {first.pid}"):
            repoint(run, str(platonic), str(platonic))
        # readers need no lock
        assert sotalign.load(run, checkpoint=True).method.startswith("sail")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the kernel released the killed process's lock: the run resumes and logs every step once
    fit(
        TrainConfig(method="sail", steps=8, **TINY),
        AlignmentData.from_spec(toy_spec(platonic)),
        run,
        resume=True,
        progress=False,
    )
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


@pytest.fixture
def sigint_handler():
    """SIGINT as an interactive Python has it (a background shell may start pytest with it
    ignored), restored afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_checkpoints_and_resume_is_exact(platonic, tmp_path, sigint_handler):
    data = AlignmentData.from_spec(toy_spec(platonic))
    config = TrainConfig(method="sotalign", steps=10, **TINY)
    fit(config, data, tmp_path / "straight", progress=False)

    def press_ctrl_c(done):
        if done == 6:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match=r"interrupted at step 6 of 10"):
        fit(config, data, run, progress=False, on_step=press_ctrl_c)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 6
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    fit(config, data, run, resume=True, progress=False)
    for name, tensor in heads_of(tmp_path / "straight").items():
        assert torch.equal(tensor, heads_of(run)[name]), name


def test_an_ignored_sigint_stays_ignored(platonic, tmp_path):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    seen = []
    try:

        def press_ctrl_c(done):
            seen.append(signal.getsignal(signal.SIGINT))
            if done == 2:
                os.kill(os.getpid(), signal.SIGINT)

        config = TrainConfig(method="sail", steps=4, **TINY)
        fit(
            config,
            AlignmentData.from_spec(toy_spec(platonic)),
            tmp_path / "run",
            progress=False,
            on_step=press_ctrl_c,
        )
        assert seen and all(h is signal.SIG_IGN for h in seen)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sotalign.load(tmp_path / "run").method == "sail"  # ran to the end


def test_bad_store_values_are_caught_in_the_batch_that_reads_them(platonic, tmp_path, monkeypatch):
    from sotalign.align.trainer import BatchSource
    from sotalign.data import scan

    monkeypatch.setattr(scan, "SCANS", tmp_path / "scans")
    config = TrainConfig(method="sotalign", steps=6, **TINY)
    spec = toy_spec(platonic)
    # the row that the third step's unpaired image batch reads
    data = AlignmentData.from_spec(spec)
    batches = BatchSource(config.training_method(), config, data, None, torch.device("cpu"))
    row = int(data.unpaired_images.indices[batches.images.batch(2)[5]])
    images = np.load(platonic / "images.npy")
    images[row, 3] = np.nan
    bad = tmp_path / "bad.npy"
    save_store(bad, images)
    bad_spec = DataSpec(images=str(bad), texts=str(platonic / "texts.npy"), n_pairs=40)
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"bad\.npy: row {row} contains NaN or Inf"):
        fit(config, AlignmentData.from_spec(bad_spec), run, progress=False)
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2]

    # `check-store` scans the whole store once; fit then refuses it before writing anything
    scanned = runner.invoke(app, ["check-store", str(bad)])
    assert scanned.exit_code == 1 and f"row {row} contains NaN or Inf (scanned in" in scanned.output
    again = runner.invoke(app, ["check-store", str(bad)])
    assert again.exit_code == 1 and "as an earlier scan found" in again.output
    with pytest.raises(
        ValueError, match=rf"bad\.npy: row {row} contains NaN or Inf \(found by sotalign check-store\)"
    ):
        fit(config, AlignmentData.from_spec(bad_spec), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    # a repaired store is a different store: scanned again, and accepted
    save_store(bad, np.load(platonic / "images.npy"))
    repaired = runner.invoke(app, ["check-store", str(bad)])
    assert repaired.exit_code == 0 and "300 rows × 12, all finite (scanned in" in repaired.output
    fit(config, AlignmentData.from_spec(bad_spec), tmp_path / "refused", progress=False)


def test_small_data_gets_held_out_splits_sized_from_it(tmp_path):
    write_platonic(tmp_path, 200, image_dim=6, text_dim=5, latent_dim=3, n_concepts=3, seed=0)
    data = AlignmentData.from_spec(toy_spec(tmp_path, n_pairs=50))
    assert data.sizes()["val_images"] == 20 and data.sizes()["test_images"] == 20
    with pytest.raises(
        ValueError,
        match=r"images\.npy: --pairs 190 \+ --val 20 \+ --test 20 = 230 rows, but the store has 200; "
        r"lower --pairs or --val or --test",
    ):
        AlignmentData.from_spec(toy_spec(tmp_path, n_pairs=190))


def test_cli_says_why_there_are_no_retrieval_numbers(platonic, tmp_path):
    result = runner.invoke(
        app,
        [
            "fit",
            str(tmp_path / "run"),
            "--paired-images",
            str(platonic / "images.npy"),
            "--paired-texts",
            str(platonic / "texts.npy"),
            "--method",
            "cca+none",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "no retrieval numbers: the run has no validation or test pairs" in " ".join(result.output.split())
