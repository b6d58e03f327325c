"""Peak-memory measurement for the demo, the benchmarks and the memory tests.

On CPU the kernel tracks the process's peak resident set (``VmHWM``); writing ``5`` to
``/proc/self/clear_refs`` resets it, so the peak of one block of code is exact, not sampled.
Freed heap that glibc still holds is returned first (``malloc_trim``), so memory left over
by earlier work is neither counted nor silently reused. On CUDA, torch's allocator
statistics play the same role.
"""

from __future__ import annotations

import ctypes
import gc
from contextlib import contextmanager

import torch


def release_free_heap() -> None:
    """Collect garbage and return glibc's free heap pages to the OS (no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field")


class PeakMemory:
    """Bytes by which a block's peak memory exceeded the memory in use when it started."""

    def __init__(self) -> None:
        self.bytes: int | None = None

    @property
    def mib(self) -> float:
        return self.bytes / 2**20


@contextmanager
def peak_memory(device: torch.device | str = "cpu"):
    """``with peak_memory() as peak: ...`` then ``peak.bytes`` (RSS on CPU, allocator on CUDA)."""
    device = torch.device(device)
    peak = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        yield peak
        torch.cuda.synchronize(device)
        peak.bytes = torch.cuda.max_memory_allocated(device) - start
        return
    release_free_heap()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    start = _status_kib("VmRSS")
    yield peak
    peak.bytes = max(0, _status_kib("VmHWM") - start) * 1024
