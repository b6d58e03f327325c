"""Run directories, and the one way sotalign writes a file.

A run directory, written by :func:`sotalign.align.fit` and read by :func:`sotalign.load`::

    config.json          the TrainConfig and DataSpec of the run (store paths absolute)
    data.json            path and fingerprint of each store (sotalign.align.run_inputs)
    teacher/             stage 1: teacher.json + teacher.safetensors
    heads.safetensors    stage 2 heads (absent for the teacher-only ``<teacher>+none`` methods)
    heads.json           their configuration
    metrics.json         validation and test scores of the selected model; written last,
                         so a run is complete exactly when it exists
    log.jsonl            one JSON record per finished step
    checkpoints/last.pt  everything ``resume=True`` needs
    .lock                held (``flock``) by the one process writing the run: :func:`hold_run_dir`

Every file sotalign writes goes through :func:`atomic_output`: the data goes to a temporary
file with a unique name next to the target, is flushed to disk (``fsync``), then renamed over
the target, and the directory is synced, so a reader sees the old file or the new one, never
a part, even after a crash or power loss. The temporary file is removed when writing fails;
files are created with the user's umask (not mkstemp's 0600), so others on a shared machine
can read a run. A full disk is reported as "no space left on <mount point> while writing
<file>". The log is the one file that grows: :func:`append_line` appends whole lines only.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import os
import secrets
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

CONFIG_FILE = "config.json"
DATA_FILE = "data.json"
METRICS_FILE = "metrics.json"
LOG_FILE = "log.jsonl"
CHECKPOINT = Path("checkpoints") / "last.pt"
HEADS_FILE = "heads.safetensors"
HEADS_CONFIG = "heads.json"
TEACHER_DIR = "teacher"
LOCK_FILE = ".lock"

#: errno values that mean the file system is full (for the user).
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class RunDirError(ValueError):
    """A run directory is missing, incomplete or corrupt (the message names the file)."""


class RunDirBusy(RunDirError):
    """Another process is writing the run directory (the message names it and its PID)."""


def _open_locked(lock_path: Path) -> int | None:
    """A descriptor of ``lock_path`` holding its exclusive ``flock``, or None when another
    process holds it. The lock must be on the file the path names now: a holder that removed
    it (a run that failed before its first step) leaves a lock on a deleted file behind."""
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the file was replaced or removed while we waited: lock the new one


@contextmanager
def hold_run_dir(run_dir) -> Iterator[Path]:
    """``with hold_run_dir(run_dir):`` write the run directory (created if missing), alone.

    The lock is an exclusive ``flock`` on ``run_dir/.lock``, which holds the holder's PID. The
    kernel releases it when the process ends however it ends, so a killed run never leaves a
    stale lock; a second writer is refused at once with :class:`RunDirBusy`. Readers
    (evaluation, :func:`sotalign.load`) never take it: every file is replaced atomically.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_FILE
    fd = _open_locked(lock_path)
    if fd is None:
        holder = lock_path.read_text().strip() if lock_path.exists() else ""
        raise RunDirBusy(
            f"{run_dir} is in use by "
            + (f"process {holder}" if holder else "another process")
            + f" (it holds {lock_path}); wait for it to finish or stop it"
        )
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield run_dir
    finally:
        with suppress(OSError):  # the lock file may be gone (a run that removed its directory)
            os.ftruncate(fd, 0)
        os.close(fd)


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def _is_disk_full(error: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also when a library wraps it (h5py, safetensors, torch)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(error) or "os error 28" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _disk_full(path: Path) -> OSError:
    return OSError(errno.ENOSPC, f"no space left on {_mount_point(path.parent)} while writing {path}")


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_output(path) -> Iterator[Path]:
    """``with atomic_output(path) as tmp:`` write ``tmp`` (any way: a library may open it by
    name); on success it replaces ``path`` durably, on failure it is removed.

    The temporary name keeps ``path``'s suffix (``np.save`` appends ``.npy`` otherwise) and is
    unique per call, so concurrent writers never share one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode & ~umask
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if _is_disk_full(error):
            raise _disk_full(path) from error
        raise


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (see :func:`atomic_output`)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as file:
        file.write(data)


def write_json(path, value) -> None:
    atomic_write(path, (json.dumps(value, indent=2) + "\n").encode())


def read_json(path) -> dict:
    """A JSON object from ``path``; a missing or unparsable file is a :class:`RunDirError`."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunDirError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def save_checkpoint(path, state: dict) -> None:
    """``torch.save`` of ``state``, serialised in memory first so that a full disk is an
    ``OSError`` naming the file, not a torch stream error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, buffer.getvalue())


def load_checkpoint(path, device: torch.device) -> dict:
    """The state saved by :func:`save_checkpoint` (tensors only: ``weights_only=True``)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises many types for a corrupt file; all mean the same
        first = str(error).splitlines()[0] if str(error) else ""
        raise RunDirError(f"{path}: cannot read the checkpoint ({type(error).__name__}: {first})") from None


def append_line(path, record: dict, *, durable: bool = False) -> None:
    """Append ``record`` as one JSON line, whole or not at all: one ``write`` of the full line
    in append mode; a partial write is cut back off. ``durable`` also flushes the file to disk
    (the trainer does it before each checkpoint, so the log holds every checkpointed step)."""
    path = Path(path)
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, "short write")
            if durable:
                os.fsync(fd)
        except BaseException as error:
            os.ftruncate(fd, start)
            if _is_disk_full(error):
                raise _disk_full(path) from error
            raise
    finally:
        os.close(fd)


def read_log(path, last_step: int) -> list[dict]:
    """The records of ``log.jsonl`` up to ``last_step`` (those a resumed run keeps).

    A torn last line (a crash or a full disk while appending) is dropped with a warning; any
    other unreadable line is a :class:`RunDirError` naming the file and the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    torn = lines.pop()  # after the last newline: empty unless the last line is torn
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
            step = record["step"]
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as error:
            if number == len(lines) and not torn:
                torn = line
                break
            raise RunDirError(f"{path}: line {number} is not a log record ({error})") from None
        if step <= last_step:
            records.append(record)
    if torn:
        warnings.warn(f"{path}: dropped a torn last line ({len(torn)} bytes)", RuntimeWarning, stacklevel=2)
    return records


def rewrite_log(path, records: list[dict]) -> None:
    """Replace ``log.jsonl`` by ``records`` (the steps a resumed run keeps)."""
    atomic_write(path, "".join(json.dumps(record) + "\n" for record in records).encode())
