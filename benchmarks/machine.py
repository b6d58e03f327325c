"""The machine name that starts every results file: ``cpu-amd-epyc-2core`` (CPU model and
core count) or the GPU's name, ``nvidia-h100-80gb-hbm3``.

    python -m benchmarks.machine     # prints this machine's name
"""

from __future__ import annotations

import os
import re


def slug(text: str) -> str:
    """Lower-case words joined by dashes."""
    return "-".join(re.findall(r"[a-z0-9]+", text.lower()))


def local_machine() -> dict:
    """The CPU model (from /proc/cpuinfo) and the core count."""
    model = "unknown-cpu"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu_model": model, "cores": os.cpu_count()}


def machine_slug(machine: dict) -> str:
    """``nvidia-h200`` from a recorded GPU name, else ``cpu-amd-epyc-2core`` from the CPU
    model name and the core count."""
    if machine.get("gpu_name"):
        return slug(machine["gpu_name"])
    model = re.sub(r"\((r|tm)\)|cpu|processor|\d+-core", " ", machine["cpu_model"].lower())
    return slug(f"cpu {re.sub(r'@.*', '', model)} {machine['cores']}core")


def this_machine() -> dict:
    """:func:`local_machine`, with ``gpu_name`` when torch sees a CUDA device."""
    import torch

    machine = local_machine()
    if torch.cuda.is_available():
        machine["gpu_name"] = torch.cuda.get_device_name()
    return machine


if __name__ == "__main__":
    print(machine_slug(this_machine()))
