"""The ``auto`` rule across devices (with faked CUDA memory and backend availability), the
backend registry, precision flags and device checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sotalign
import sotalign.kernels as kernels
from sotalign.kernels import Affinity, Backend
from sotalign.kernels import keops as keops_module
from sotalign.kernels.cpu import CpuBackend
from sotalign.ot import dispatch

CUDA = torch.device("cuda")
GIB = 2**30


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA device with ``free`` bytes free and ``reserved − allocated`` cached by torch,
    and the given backends importable; backends are stand-ins that only carry their name and
    precision (no kernel runs)."""

    def configure(free: int = 80 * GIB, reserved: int = 0, allocated: int = 0, available=("triton", "keops")):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GIB))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)
        monkeypatch.setattr(
            dispatch, "backend_error", lambda name: None if name in available else "simulated: missing"
        )
        monkeypatch.setattr(dispatch, "load_backend", stand_in_backend)

    return configure


def stand_in_backend(name: str, precision: str = "fp32") -> Backend:
    """A backend that only names itself (and, for "cpu", checks its device like the real one)."""
    backend = Backend()
    backend.name, backend.precision = name, precision  # type: ignore[attr-defined]
    backend.device_types = CpuBackend.device_types if name == "cpu" else None
    return backend


def route(
    n,
    m,
    d,
    device=CUDA,
    n_matrices=2,
    budget=None,
    backend="auto",
    path="auto",
    dtype=torch.float32,
    precision="auto",
):
    chosen = dispatch.choose_route(backend, path, device, n, m, d, dtype, n_matrices, budget, precision)
    return chosen.backend.name, chosen.path


def test_cuda_takes_the_dense_path_whenever_it_fits(fake_cuda):
    fake_cuda()
    crossover = dispatch.DENSE_MIN_DIM["cuda"]
    assert route(4096, 4096, 1024) == ("triton", "dense")
    assert route(4096, 4096, 512) == ("triton", "dense")  # the headline Sinkhorn's d
    assert route(32768, 32768, 128, n_matrices=3) == ("triton", "dense")  # KLOT, 12 GiB of 40
    assert route(4096, 4096, crossover) == ("triton", "dense")
    assert route(4096, 4096, crossover - 1) == ("triton", "online")
    assert route(131072, 131072, 512) == ("triton", "online")  # 64 GiB exceed half of 80 GiB
    assert route(100, 100, None) == ("triton", "dense")  # a given K is read densely


def test_cuda_crossover_is_data_with_provenance():
    """The crossover and the online precision come from ot/dispatch.json, each with where it
    comes from; an estimate must agree with the H200 baseline in which the stored K won at
    d = 256 (KLOT) and d = 512 (Sinkhorn)."""
    root = Path(__file__).resolve().parents[2]
    tuning = json.loads((root / "sotalign" / "ot" / "dispatch.json").read_text())
    for entry in (*tuning["dense_min_dim"].values(), tuning["online_precision"]["cuda"]):
        assert entry["provenance"] in ("measured", "estimate")
        assert (root / entry["source"]).is_file(), entry["source"]
    assert dispatch.DENSE_MIN_DIM == {kind: e["value"] for kind, e in tuning["dense_min_dim"].items()}
    assert dispatch.DENSE_MIN_DIM["cuda"] <= 256
    assert dispatch.ONLINE_PRECISION == tuning["online_precision"]["cuda"]["value"]
    assert dispatch.ONLINE_PRECISION in ("tf32x3", "fp16x3")


def test_cuda_without_triton_takes_keops_for_large_online_problems(fake_cuda):
    fake_cuda(available=("keops",))
    big = dispatch.KEOPS_MIN_ENTRIES
    assert route(big // 1024, 1024, 8) == ("keops", "online")
    assert route(big // 1024 - 1, 1024, 8) == ("torch", "online")
    # a dense route never goes to KeOps: it cannot read a stored K
    assert route(4096, 4096, 1024) == ("torch", "dense")
    fake_cuda(available=())
    assert route(big // 1024, 1024, 8) == ("torch", "online")


def test_cuda_budget_is_half_of_free_plus_cached_memory(fake_cuda):
    need = 2 * 4096 * 4096 * 4  # two fp32 matrices: 128 MiB
    share = dispatch.FREE_MEMORY_FRACTION
    fake_cuda(free=int(need / share))
    assert route(4096, 4096, 1024)[1] == "dense"
    fake_cuda(free=int(need / share) - 8)
    assert route(4096, 4096, 1024)[1] == "online"
    # memory torch has cached but not handed out counts as free
    fake_cuda(free=int(need / share) - 8, reserved=GIB, allocated=GIB - 8)
    assert route(4096, 4096, 1024)[1] == "dense"
    fake_cuda(free=int(need / share) - 8, reserved=GIB, allocated=GIB)
    assert route(4096, 4096, 1024)[1] == "online"
    # an explicit memory_budget overrides the free memory, both ways
    fake_cuda(free=80 * GIB)
    assert route(4096, 4096, 1024, budget=need - 1)[1] == "online"
    assert route(4096, 4096, 1024, budget=need)[1] == "dense"
    assert route(4096, 4096, 1024, budget=need, dtype=torch.float64)[1] == "online"
    fake_cuda(free=GIB)
    assert route(16384, 16384, 1024, budget=64 * GIB)[1] == "dense"


def test_auto_precision_is_fp32_accurate(fake_cuda):
    fake_cuda()

    def precision(*args, **kwargs):
        chosen = dispatch.choose_route(*args, **kwargs)
        return chosen.backend.name, chosen.path, chosen.backend.precision

    online = ("auto", "online", CUDA, 4096, 4096, 512, torch.float32, 1)
    assert precision(*online) == ("triton", "online", dispatch.ONLINE_PRECISION)
    assert precision(*online[:6], torch.float64, 1) == ("triton", "online", "fp32")
    assert precision("auto", "dense", CUDA, 4096, 4096, 512, torch.float32, 1) == ("triton", "dense", "fp32")
    assert precision(*online, None, "tf32") == ("triton", "online", "tf32")
    assert precision("torch", *online[1:]) == ("torch", "online", "fp32")
    assert precision("auto", "auto", torch.device("cpu"), 64, 64, 8, torch.float32, 1)[2] == "fp32"
    # the online fallback of an automatic dense route gets the online default
    chosen = dispatch.choose_route("auto", "auto", CUDA, 4096, 4096, 512, torch.float32, 1)
    assert chosen.dense and chosen.fallback.backend.precision == dispatch.ONLINE_PRECISION
    assert dispatch.choose_route("auto", "dense", CUDA, 64, 64, 8, torch.float32, 1).fallback is None


def test_route_reason_names_the_deciding_facts(fake_cuda):
    fake_cuda(free=10 * GIB)
    chosen = dispatch.choose_route("auto", "auto", CUDA, 32768, 32768, 128, torch.float32, 3)
    assert chosen.path == "online"
    assert "3 stored 32768×32768 matrices (12 GiB) exceed the dense budget (5 GiB" in chosen.reason
    assert "triton runs on CUDA" in chosen.reason and dispatch.ONLINE_PRECISION in chosen.reason
    assert "\n" not in chosen.reason
    assert repr(chosen).startswith("Route(backend='triton', path='online', precision=")


def test_plan_route_without_running(fake_cuda, monkeypatch):
    fake_cuda(free=40 * GIB)
    klot_route = sotalign.plan_route(32768, 32768, 256, teacher_dim=128, device="cuda")
    assert isinstance(klot_route, sotalign.Route)
    assert (klot_route.name, klot_route.path, klot_route.precision) == ("triton", "dense", "fp32")
    assert "3 stored" in klot_route.reason  # K, K* and the backward's G
    sinkhorn_route = sotalign.plan_route(16384, 16384, 512, device="cuda")
    assert "1 stored 16384×16384 matrix" in sinkhorn_route.reason
    assert sotalign.plan_route(16384, 16384, 512, device="cuda", memory_budget=GIB // 2).path == "online"
    with pytest.raises(ValueError, match="n must be a positive integer"):
        sotalign.plan_route(0, 5, 3)
    with pytest.raises(ValueError, match="dtype"):
        sotalign.plan_route(5, 5, 3, dtype=torch.float16)


def _out_of_memory(self):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB (simulated)")


def test_route_falls_back_to_online_when_storing_fails(fake_cuda, monkeypatch):
    fake_cuda()
    chosen = dispatch.choose_route("auto", "auto", CUDA, 4096, 4096, 512, torch.float32, 1)
    assert chosen.dense
    monkeypatch.setattr(Affinity, "materialize", _out_of_memory)
    K = Affinity.from_features(torch.zeros(3, 2), torch.zeros(4, 2))
    taken, (prepared,) = chosen.prepare(K)
    assert taken.path == "online" and prepared is K
    assert "ran out of CUDA memory (CUDA out of memory. Tried to allocate 12.00 GiB" in taken.reason
    explicit = dispatch.choose_route("auto", "dense", CUDA, 4096, 4096, 512, torch.float32, 1)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        explicit.prepare(K)


def test_sinkhorn_and_klot_fall_back_end_to_end(monkeypatch):
    """A dense allocation that fails (faked on CPU) runs the step online instead, with the
    same result, forward and backward."""
    x, y = torch.randn(30, 20, dtype=torch.float64), torch.randn(25, 20, dtype=torch.float64)
    x_t, y_t = torch.randn(30, 18, dtype=torch.float64), torch.randn(25, 18, dtype=torch.float64)
    expected = sotalign.sinkhorn(x, y, n_iters=20)
    assert expected.path == "dense"

    def step():
        xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
        loss = sotalign.KLOTLoss(n_iters=20)
        value = loss(xs, ys, x_t, y_t)
        return loss.last_route, value.detach(), *torch.autograd.grad(value, (xs, ys))

    dense = step()
    assert dense[0].path == "dense"
    monkeypatch.setattr(Affinity, "materialize", _out_of_memory)
    result = sotalign.sinkhorn(x, y, n_iters=20)
    assert result.path == "online" and "fell back to online" in result.route.reason
    torch.testing.assert_close(result.f, expected.f)
    online = step()
    assert online[0].path == "online" and "fell back" in online[0].reason
    for value, reference in zip(online[1:], dense[1:], strict=True):
        torch.testing.assert_close(value, reference)


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


def test_the_route_checks_the_backends_device(monkeypatch):
    """Each backend states its devices once (``Backend.device_types``); the route asks it."""
    from sotalign.kernels import Backend

    class CudaOnly(Backend):
        name = "triton"
        device_types = ("cuda",)
        device_hint = " (a hint)"

    monkeypatch.setattr(dispatch, "load_backend", lambda name, precision="fp32": CudaOnly())
    with pytest.raises(
        ValueError, match=r"the 'triton' backend needs CUDA tensors, got tensors on cpu \(a hint\)"
    ):
        dispatch.choose_route("triton", "auto", torch.device("cpu"), 8, 8, 4, torch.float32, 1, GIB)
    monkeypatch.setattr(CudaOnly, "device_types", None)
    chosen = dispatch.choose_route("triton", "auto", torch.device("cpu"), 8, 8, 4, torch.float32, 1, GIB)
    assert chosen.backend.name == "triton"


def test_cpu_backend_needs_cpu_tensors(fake_cuda):
    fake_cuda()
    with pytest.raises(ValueError, match="the 'cpu' backend needs CPU tensors"):
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
    """The probe's own failure paths, in one line: a formula that does not run (the error
    line, not trailing noise), no nvcc for CUDA, and a timeout."""
    monkeypatch.setattr(
        keops_module,
        "_PROBE",
        "import sys; print('[KeOps] warning', file=sys.stderr); "
        "raise RuntimeError('simulated compiler failure on ' + sys.argv[1])",
    )
    reason = keops_module._probe.__wrapped__("cpu")
    assert "simulated compiler failure on cpu" in reason and "\n" not in reason
    monkeypatch.setattr(keops_module.shutil, "which", lambda name: None)
    reason = keops_module._probe.__wrapped__("cuda")
    assert "on cuda" in reason and "no nvcc on PATH" in reason
    monkeypatch.setattr(keops_module, "_PROBE", "import time; time.sleep(30)")
    monkeypatch.setattr(keops_module, "PROBE_TIMEOUT_S", 0.5)
    assert "took more than 0.5 s" in keops_module._probe.__wrapped__("cpu")


def test_keops_is_probed_on_the_device_auto_uses_it_on(monkeypatch):
    probed = []
    monkeypatch.setattr(keops_module, "_probe", lambda device: probed.append(device))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    keops_module.keops_error()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    keops_module.keops_error()
    assert probed == ["cuda", "cpu"]
