"""sotalign.rundir: the one atomic write (durable, unique temporary names, cleaned up on failure,
the user's umask, a clear disk-full error), checkpoints, and the append-only log."""

from __future__ import annotations

import errno
import json
import os
import stat

import numpy as np
import pytest
import torch

from sotalign import rundir
from sotalign.data import save_store
from sotalign.rundir import RunDirError


def listing(directory) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.fixture
def umask():
    """Set a umask for one test (the process umask is global)."""
    previous = os.umask(0o022)
    os.umask(previous)

    def set_umask(value):
        os.umask(value)

    yield set_umask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_files_are_created_with_the_users_umask(tmp_path, umask, mask):
    umask(mask)
    rundir.atomic_write(tmp_path / "a.bin", b"data")
    rundir.save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"x": torch.ones(2)})
    rundir.append_line(tmp_path / "log.jsonl", {"step": 1})
    save_store(tmp_path / "e.npy", np.ones((2, 3), np.float32))
    for name in ("a.bin", "checkpoints/last.pt", "log.jsonl", "e.npy"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~mask, name


def test_the_file_and_its_directory_are_synced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(source, target):
        events.append(("replace", os.path.basename(source).startswith(".a.bin.")))
        real_replace(source, target)

    monkeypatch.setattr(rundir.os, "fsync", fsync)
    monkeypatch.setattr(rundir.os, "replace", replace)
    rundir.atomic_write(tmp_path / "a.bin", b"data")
    assert events == [("fsync", False), ("replace", True), ("fsync", True)]
    assert (tmp_path / "a.bin").read_bytes() == b"data"


def test_temporary_names_are_unique_and_keep_the_suffix(tmp_path):
    with (
        rundir.atomic_output(tmp_path / "e.npy") as first,
        rundir.atomic_output(tmp_path / "e.npy") as second,
    ):
        assert first != second and first.parent == tmp_path
        assert first.suffix == ".npy" and first.name.startswith(".e.npy.")
        np.save(first, np.zeros(1))
        np.save(second, np.ones(1))
    assert np.load(tmp_path / "e.npy")[0] == 0.0  # the writer that finishes last wins, whole
    assert listing(tmp_path) == ["e.npy"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    rundir.atomic_write(tmp_path / "a.json", b"old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with rundir.atomic_output(tmp_path / "a.json") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert (tmp_path / "a.json").read_bytes() == b"old"
    assert listing(tmp_path) == ["a.json"]


def test_a_full_disk_says_so_names_the_file_and_cleans_up(tmp_path, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    rundir.save_checkpoint(tmp_path / "last.pt", {"step": 1})
    monkeypatch.setattr(rundir.os, "fsync", no_space)
    target = tmp_path / "last.pt"
    with pytest.raises(OSError, match=rf"no space left on /\S* while writing {target}") as caught:
        rundir.save_checkpoint(target, {"step": 2})
    assert caught.value.errno == errno.ENOSPC
    assert listing(tmp_path) == ["last.pt"]
    assert rundir.load_checkpoint(target, torch.device("cpu"))["step"] == 1


def test_a_library_wrapping_a_full_disk_is_reported_the_same_way(tmp_path):
    with pytest.raises(OSError, match=r"no space left on .* while writing .*labels\.npy"):
        with rundir.atomic_output(tmp_path / "labels.npy"):
            raise RuntimeError("write failed: No space left on device (os error 28)")
    assert listing(tmp_path) == []


def test_json_and_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(RunDirError, match=r"missing\.json: no such file"):
        rundir.read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(RunDirError, match=r"bad\.json: not valid JSON"):
        rundir.read_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(RunDirError, match=r"list\.json: expected a JSON object"):
        rundir.read_json(tmp_path / "list.json")
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunDirError, match=r"last\.pt: cannot read the checkpoint"):
        rundir.load_checkpoint(tmp_path / "last.pt", torch.device("cpu"))


def test_log_lines_are_appended_whole(tmp_path, monkeypatch):
    log = tmp_path / "log.jsonl"
    rundir.append_line(log, {"step": 1})
    real_write = os.write

    def short_write(fd, data):
        return real_write(fd, data[:5])  # the disk fills up in the middle of the line

    monkeypatch.setattr(rundir.os, "write", short_write)
    with pytest.raises(OSError, match=r"no space left on .* while writing .*log\.jsonl"):
        rundir.append_line(log, {"step": 2, "loss": 0.5})
    monkeypatch.undo()
    assert log.read_text() == '{"step": 1}\n'


def test_read_log_keeps_the_checkpointed_steps_and_drops_a_torn_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    for step in (1, 2, 3):
        rundir.append_line(log, {"step": step})
    assert [r["step"] for r in rundir.read_log(log, 2)] == [1, 2]
    with log.open("a") as file:
        file.write('{"step": 4, "lo')  # power lost mid-line
    with pytest.warns(RuntimeWarning, match=r"log\.jsonl: dropped a torn last line"):
        assert [r["step"] for r in rundir.read_log(log, 9)] == [1, 2, 3]
    assert rundir.read_log(tmp_path / "absent.jsonl", 3) == []


def test_read_log_refuses_a_corrupt_line_in_the_middle(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.raises(RunDirError, match=r"log\.jsonl: line 2 is not a log record"):
        rundir.read_log(log, 3)
    log.write_text(json.dumps({"no_step": 1}) + "\n" + json.dumps({"step": 2}) + "\n")
    with pytest.raises(RunDirError, match=r"log\.jsonl: line 1"):
        rundir.read_log(log, 3)


def test_a_run_directory_is_held_by_one_writer_at_a_time(tmp_path):
    run = tmp_path / "new" / "run"
    with rundir.hold_run_dir(run):
        assert (run / rundir.LOCK_FILE).read_text() == f"{os.getpid()}\n"
        # flock belongs to the open file, so a second holder in this process is refused too
        with pytest.raises(rundir.RunDirBusy, match=rf"run is in use by process {os.getpid()}"):
            with rundir.hold_run_dir(run):
                pass
    with rundir.hold_run_dir(run):  # released on exit
        pass
