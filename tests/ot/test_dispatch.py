"""The ``auto`` rule across devices (with faked CUDA memory and backend availability), the
backend registry, precision flags and device checks."""

from __future__ import annotations

import types

import pytest
import torch

import sotalign
import sotalign.kernels as kernels
from sotalign.kernels import keops as keops_module
from sotalign.ot import dispatch

CUDA = torch.device("cuda")
GIB = 2**30


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device with ``free`` bytes and the given backends importable; backends are
    stand-ins that only carry their name and precision (no kernel runs)."""

    def configure(free: int = 80 * GIB, available=("triton", "keops")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))
        monkeypatch.setattr(
            dispatch, "backend_error", lambda name: None if name in available else "simulated: missing"
        )
        monkeypatch.setattr(
            dispatch,
            "load_backend",
            lambda name, precision="fp32": types.SimpleNamespace(name=name, precision=precision),
        )

    return configure


def route(
    n,
    m,
    d,
    device=CUDA,
    n_matrices=2,
    budget=dispatch.DEFAULT_MEMORY_BUDGET,
    backend="auto",
    path="auto",
    dtype=torch.float32,
    precision="fp32",
):
    chosen = dispatch.choose_route(backend, path, device, n, m, d, dtype, n_matrices, budget, precision)
    return chosen.backend.name, chosen.path


def test_cuda_prefers_triton_on_both_paths(fake_cuda):
    fake_cuda()
    assert route(4096, 4096, 1024) == ("triton", "dense")  # 2 × 64 MiB fit, d ≥ 660
    assert route(4096, 4096, 512) == ("triton", "online")  # d below the roofline crossover
    assert route(30000, 30000, 1024) == ("triton", "online")  # 2 × 3.4 GiB exceed 1 GiB
    assert route(100, 100, None) == ("triton", "dense")  # a given K is read densely


def test_cuda_without_triton_takes_keops_for_large_online_problems(fake_cuda):
    fake_cuda(available=("keops",))
    big = dispatch.KEOPS_MIN_ENTRIES
    assert route(big // 1024, 1024, 64) == ("keops", "online")
    assert route(big // 1024 - 1, 1024, 64) == ("torch", "online")
    # a dense route never goes to KeOps: it cannot read a stored K
    assert route(4096, 4096, 1024) == ("torch", "dense")
    fake_cuda(available=())
    assert route(big // 1024, 1024, 64) == ("torch", "online")


def test_cuda_dense_path_is_bounded_by_free_memory(fake_cuda):
    need = 2 * 4096 * 4096 * 4  # two fp32 matrices: 128 MiB
    fake_cuda(free=int(need / dispatch.FREE_MEMORY_FRACTION))
    assert route(4096, 4096, 1024, budget=64 * GIB)[1] == "dense"
    fake_cuda(free=int(need / dispatch.FREE_MEMORY_FRACTION) - 8)
    assert route(4096, 4096, 1024, budget=64 * GIB)[1] == "online"
    # and by the budget when memory is plentiful
    fake_cuda(free=80 * GIB)
    assert route(4096, 4096, 1024, budget=need - 1)[1] == "online"
    assert route(4096, 4096, 1024, budget=need)[1] == "dense"
    assert route(4096, 4096, 1024, budget=need, dtype=torch.float64)[1] == "online"


def test_cuda_crossover_is_the_roofline_estimate(fake_cuda):
    fake_cuda()
    crossover = dispatch.DENSE_MIN_DIM["cuda"]
    assert crossover == 660
    assert route(1024, 1024, crossover)[1] == "dense"
    assert route(1024, 1024, crossover - 1)[1] == "online"


def test_cpu_rule_is_unchanged(monkeypatch):
    monkeypatch.setattr(
        torch.cuda, "mem_get_info", lambda device=None: pytest.fail("read CUDA memory on CPU")
    )
    cpu = torch.device("cpu")
    expected = "cpu" if "cpu" in sotalign.available_backends() else "torch"
    assert route(2048, 2048, 16, device=cpu) == (expected, "dense")
    assert route(2048, 2048, 15, device=cpu) == (expected, "online")
    assert route(24000, 24000, 64, device=cpu) == (expected, "online")


def test_explicit_choices_are_kept(fake_cuda):
    fake_cuda()
    assert route(4096, 4096, 1024, backend="torch", path="online") == ("torch", "online")
    assert route(64, 64, 4, backend="keops", path="dense") == ("keops", "dense")


def test_precision_reaches_the_backend(fake_cuda):
    fake_cuda()
    chosen = dispatch.choose_route("auto", "auto", CUDA, 64, 64, 8, torch.float32, 1, GIB, "tf32")
    assert (chosen.backend.name, chosen.backend.precision) == ("triton", "tf32")


@pytest.mark.parametrize("name", ["reference", "torch", "cpu", "keops"])
@pytest.mark.parametrize("precision", ["tf32", "fp16"])
def test_only_triton_takes_a_lower_precision(name, precision):
    with pytest.raises(ValueError, match=f"precision={precision!r} is only supported by the 'triton'"):
        kernels.load_backend(name, precision)


def test_precision_flag_on_the_front():
    x, y = torch.randn(5, 3), torch.randn(6, 3)
    with pytest.raises(ValueError, match="precision='tf32' is only supported"):
        sotalign.sinkhorn(x, y, precision="tf32")
    with pytest.raises(ValueError, match="unknown precision 'bf16'"):
        sotalign.klot(x, y, x, y, backend="torch", precision="bf16")
    with pytest.raises(TypeError, match="precision must be a string"):
        sotalign.klot(x, y, x, y, precision=32)
    assert sotalign.sinkhorn(x, y, precision="fp32").f.shape == (5,)


def test_triton_needs_cuda_tensors_unless_interpreted(monkeypatch):
    monkeypatch.setattr(
        dispatch, "load_backend", lambda name, precision="fp32": types.SimpleNamespace(name=name)
    )
    monkeypatch.setattr(dispatch, "triton_interpreter", lambda: False)
    with pytest.raises(ValueError, match="backend 'triton' needs CUDA tensors, got tensors on cpu"):
        dispatch.choose_route("triton", "auto", torch.device("cpu"), 8, 8, 4, torch.float32, 1, GIB)
    monkeypatch.setattr(dispatch, "triton_interpreter", lambda: True)
    chosen = dispatch.choose_route("triton", "auto", torch.device("cpu"), 8, 8, 4, torch.float32, 1, GIB)
    assert chosen.backend.name == "triton"


def test_cpu_backend_needs_cpu_tensors(fake_cuda):
    fake_cuda()
    with pytest.raises(ValueError, match="backend 'cpu' runs on CPU tensors"):
        dispatch.choose_route("cpu", "auto", CUDA, 8, 8, 4, torch.float32, 1, GIB)


def test_available_backends_lists_what_runs_here():
    from sotalign.kernels import triton as triton_package

    names = sotalign.available_backends()
    assert names == [name for name in kernels.BACKEND_NAMES if name in names]
    assert ("triton" in names) == bool(
        triton_package.AVAILABLE and (torch.cuda.is_available() or triton_package.INTERPRETER)
    )
    assert ("keops" in names) == (keops_module.keops_error() is None)
    assert ("cpu" in names) == (kernels.cpu_extension_error() is None)


def test_unavailable_backends_say_why(monkeypatch):
    monkeypatch.setattr(keops_module, "keops_error", lambda: "simulated: no compiler")
    with pytest.raises(ValueError, match="backend 'keops' is not available: simulated: no compiler"):
        kernels.load_backend("keops")
    monkeypatch.setattr(kernels, "triton_error", lambda: "simulated: no triton")
    with pytest.raises(ValueError, match="backend 'triton' is not available: simulated: no triton"):
        sotalign.sinkhorn(torch.randn(4, 3), torch.randn(5, 3), backend="triton")


def test_keops_probe_reports_failures(monkeypatch):
    """The probe's own failure paths: a formula that does not run, and a timeout."""
    monkeypatch.setattr(keops_module, "_PROBE", "raise RuntimeError('simulated compiler failure')")
    assert "simulated compiler failure" in keops_module.keops_error.__wrapped__()
    monkeypatch.setattr(keops_module, "_PROBE", "import time; time.sleep(30)")
    monkeypatch.setattr(keops_module, "PROBE_TIMEOUT_S", 0.5)
    assert "took more than 0.5 s" in keops_module.keops_error.__wrapped__()
