"""GPU Sinkhorn iteration time: sotalign's kernels against every peer, side by side in one run.

The problem (every provider, the same seeded fp32 features on the GPU): cosine affinity K
between n = m rows of d features, cost −K, ε = 0.05, uniform marginals of mass one,
``n_iters`` fixed iterations from the raw features — each provider normalises the rows and
builds or streams K inside the timed call. ``n_iters`` is 100 up to n = 32768, then 20 at
n = 65536 and 5 at n = 262144 to keep the suite inside its GPU budget; the report divides by
it (per-iteration time = call time / n_iters, so the fixed per-call work — normalising, the
dense K build, the final symmetric step and sotalign's marginal-error pass — is included).

Providers (``PROVIDERS``; ``precision`` is the precision of the dot products behind K):

* ``sotalign-triton-online[-tf32x3|-fp16x3|-tf32|-fp16|-graph]``, ``sotalign-triton-dense``: sotalign's
  Triton backend on one path (``-graph``: ``cuda_graph=True``, at n = 4096 only, where launch
  overhead matters); ``sotalign-keops``: its KeOps backend (online); ``sotalign-torch``: the
  portable chunked torch backend (up to n = 32768). ``backend="auto"`` is timed in the KLOT
  suite (here it would repeat one of the Triton rows).
* ``paper-dense``: the SOTAlign authors' dense loop (:func:`sotalign.ot.paper.paper_sinkhorn`);
  ``paper-dense-compiled``: the same loop with its iteration compiled by ``torch.compile``
  (``paper_sinkhorn(..., compiled=True)``; compiling the 100-times unrolled loop would take minutes).
* ``pot-sinkhorn_log``: POT ``ot.bregman.sinkhorn_log`` on torch tensors, ``stopThr=0`` (it
  also forms the dense plan every 10 iterations to check the marginals, as shipped).
* ``geomloss-keops``: GeomLoss ``SamplesLoss(backend="online")`` (KeOps, fp32 CUDA cores).
  It always anneals ε (ε-scaling with ~n_iters steps ending at ε), so it does not solve the
  same fixed-ε problem: it is timed for its per-step cost only.
* ``flashsinkhorn[-tf32]``: FlashSinkhorn ``SamplesLoss(backend="alternating",
  half_cost=True, use_epsilon_scaling=False, eps=ε, n_iters)``: on unit rows
  ½‖x − y‖² = 1 − x·y, so its plan for that cost is the plan for cost −K (checked in
  :func:`test_peers_solve_the_same_problem`). ``allow_tf32`` False (fp32) or True (tf32).

A case is skipped, with the reason, when its estimated peak memory is over 60 % of the GPU's
memory or its predicted call time (roofline bound × the provider's assumed slowdown) is
over the per-call budget (conftest's ``gpu_case_gate``). Without CUDA the suite runs only
under ``SOTALIGN_BENCH_SMOKE=1``, on tiny shapes, to check the harness.
"""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import roofline
import torch

import sotalign
from sotalign.ot.paper import paper_sinkhorn

SMOKE = os.environ.get("SOTALIGN_BENCH_SMOKE") == "1"
EPS = 0.05
GIB = 2**30
SMOKE_SHAPES = [(32, 16), (64, 16)]
HEADLINE = (16384, 512)
#: Iterations of the (untimed) check that the providers solve the same problem.
PARITY_ITERS = 100
#: (n = m, d); the headline shape first, so a spent time budget drops the others.
SHAPES = [HEADLINE] + [
    (n, d) for n in (4096, 16384, 32768, 65536, 262144) for d in (64, 512, 1024) if (n, d) != HEADLINE
]


def iterations_for(n: int, smoke: bool) -> int:
    """Fixed iterations per call: 100 up to n = 32768, fewer beyond (budget); 10 in smoke runs."""
    if smoke:
        return 10
    return 100 if n <= 32768 else 20 if n <= 65536 else 5


# --------------------------------------------------------------------------- peers


def unit(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(t, dim=1)


def pot_sinkhorn_log(x, y, eps: float, n_iters: int):
    """POT's log-domain Sinkhorn on cost −K, all ``n_iters`` iterations; returns the plan."""
    ot = pytest.importorskip("ot")
    M = -(unit(x) @ unit(y).T)
    n, m = M.shape
    a = torch.full((n,), 1.0 / n, dtype=M.dtype, device=M.device)
    b = torch.full((m,), 1.0 / m, dtype=M.dtype, device=M.device)
    return ot.bregman.sinkhorn_log(a, b, M, eps, numItermax=n_iters, stopThr=0, warn=False)


def flash_solver(eps: float, n_iters: int, tf32: bool):
    """FlashSinkhorn's fixed-ε alternating solver with the half squared-Euclidean cost.

    Returns potentials in GeomLoss' convention: P_ij = a_i b_j exp((f_i + g_j − C_ij)/ε).
    """
    flash = pytest.importorskip("flash_sinkhorn")
    return flash.SamplesLoss(
        "sinkhorn",
        backend="alternating",
        half_cost=True,
        eps=eps,
        n_iters=n_iters,
        use_epsilon_scaling=False,
        debias=False,
        potentials=True,
        allow_tf32=tf32,
    )


def flash_plan(solver, x, y, eps: float):
    """The dense plan of FlashSinkhorn's potentials (small problems)."""
    x, y = unit(x), unit(y)
    f, g = solver(x, y)
    n, m = x.shape[0], y.shape[0]
    return torch.exp((f[:, None] + g[None, :] - (1 - x @ y.T)) / eps) / (n * m)


def geomloss_solver(eps: float, n_iters: int):
    """GeomLoss/KeOps online, ε-scaling schedule of ~n_iters steps (see bench_sinkhorn.py)."""
    from bench_sinkhorn import geomloss_solver as cpu_suite_solver

    return cpu_suite_solver(eps, n_iters)


# --------------------------------------------------------------------------- providers


def require_backend(name: str, device: torch.device) -> None:
    """Skip unless sotalign's backend ``name`` runs here (with its reason).

    KeOps is timed on CUDA only: on CPU its first use compiles C++ for minutes.
    """
    from sotalign.kernels import backend_error

    if name == "keops" and device.type != "cuda":
        pytest.skip("sotalign backend 'keops' is timed on CUDA only")
    error = backend_error(name)
    if error is not None:
        pytest.skip(f"sotalign backend {name!r} is not available: {error}")


def resolved_precision(precision: str, fn) -> str:
    """``precision``, with ``"default"`` replaced by the default of ``fn``'s ``precision``
    keyword (fp32 when it has none: sotalign then computes K in fp32)."""
    if precision != "default":
        return precision
    parameter = inspect.signature(fn).parameters.get("precision")
    return "fp32" if parameter is None or parameter.default is None else str(parameter.default)


def sotalign_options(fn, options: dict) -> dict:
    """``options``, or a skip naming those this sotalign does not accept yet."""
    parameters = inspect.signature(fn).parameters
    missing = [key for key in options if key not in parameters]
    if missing:
        pytest.skip(f"sotalign.{fn.__name__} has no option {', '.join(missing)}")
    return options


def sotalign_runner(backend: str, path: str, **options) -> Callable:
    """A runner ``(x, y, n_iters) -> SinkhornResult`` of sotalign.sinkhorn with these options."""

    def make(device):
        if backend != "auto":
            require_backend(backend, device)
        if options.get("cuda_graph") and device.type != "cuda":
            pytest.skip("cuda_graph=True needs CUDA")
        kwargs = sotalign_options(sotalign.sinkhorn, {"path": path, **options})
        return lambda x, y, n_iters: sotalign.sinkhorn(x, y, EPS, n_iters, backend=backend, **kwargs)

    return make


def _finite_potentials(result) -> None:
    assert torch.isfinite(result.f).all() and torch.isfinite(result.g).all()


def _cuda_only(reason: str):
    """A device check that skips with ``reason`` off CUDA."""

    def check(device):
        if device.type != "cuda":
            pytest.skip(reason)

    return check


def paper_runner(device):
    return lambda x, y, n_iters: paper_sinkhorn(unit(x) @ unit(y).T, EPS, n_iters)


def compiled_runner(device):
    _cuda_only("torch.compile is timed on CUDA only (on CPU it would compile C++ for minutes)")(device)
    return lambda x, y, n_iters: paper_sinkhorn(unit(x) @ unit(y).T, EPS, n_iters, compiled=True)


def pot_runner(device):
    pytest.importorskip("ot")
    return lambda x, y, n_iters: pot_sinkhorn_log(x, y, EPS, n_iters)


def geomloss_runner(device):
    _cuda_only("GeomLoss/KeOps is timed on CUDA only here (bench_sinkhorn.py times it on CPU)")(device)
    probe = torch.rand(8, 3, device=device)
    try:  # KeOps compiles its CUDA code on first use, which fails on some set-ups
        geomloss_solver(EPS, 2)(probe, probe)
    except Exception as error:
        pytest.skip(f"GeomLoss/KeOps does not run here ({type(error).__name__}: {error})")
    solvers = {}

    def run(x, y, n_iters):
        if n_iters not in solvers:
            solvers[n_iters] = geomloss_solver(EPS, n_iters)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return solvers[n_iters](unit(x), unit(y))

    return run


def flash_runner(tf32: bool):
    def make(device):
        _cuda_only("FlashSinkhorn runs on CUDA only")(device)
        pytest.importorskip("flash_sinkhorn")
        return lambda x, y, n_iters: flash_solver(EPS, n_iters, tf32)(unit(x), unit(y))

    return make


def _finite_pair(result) -> None:
    assert all(torch.isfinite(t).all() for t in result)


def _finite_tensor(result) -> None:
    tensor = result[0] if isinstance(result, tuple) else result
    assert torch.isfinite(tensor).all()


def features_bytes(n: int, d: int, copies: int = 4) -> float:
    """``copies`` n×d fp32 arrays (normalised features and their like) plus 64 MiB slack."""
    return copies * n * d * 4 + 64 * 2**20


@dataclass(frozen=True)
class Provider:
    """One timed configuration and what the budget rules need to know about it.

    ``path``/``precision`` name the roofline the provider is held to (``auto``: the route
    sotalign reports); ``slowdown`` is its assumed call time over that bound, used only to
    skip cases predicted to be over budget; ``memory(n, d)`` estimates its peak allocation
    beyond the inputs (bytes); ``max_n`` leaves out shapes it is not meant for.
    """

    name: str
    make: Callable
    check: Callable
    path: str
    precision: str
    slowdown: float
    memory: Callable[[int, int], float]
    max_n: int | None = None
    notes: dict = field(default_factory=dict)


def _dense_memory(matrices: float) -> Callable[[int, int], float]:
    return lambda n, d: matrices * n * n * 4 + features_bytes(n, d)


PROVIDERS = [
    Provider(
        "sotalign-triton-online",
        sotalign_runner("triton", "online", precision="fp32"),
        _finite_potentials,
        "online",
        "fp32",
        2.0,
        lambda n, d: features_bytes(n, d, 6),
    ),
    Provider(
        "sotalign-triton-online-tf32x3",
        sotalign_runner("triton", "online", precision="tf32x3"),
        _finite_potentials,
        "online",
        "tf32x3",
        1.5,
        lambda n, d: features_bytes(n, d, 6),
    ),
    Provider(
        "sotalign-triton-online-fp16x3",
        sotalign_runner("triton", "online", precision="fp16x3"),
        _finite_potentials,
        "online",
        "fp16x3",
        1.5,
        lambda n, d: features_bytes(n, d, 9),
    ),
    Provider(
        "sotalign-triton-online-tf32",
        sotalign_runner("triton", "online", precision="tf32"),
        _finite_potentials,
        "online",
        "tf32",
        1.5,
        lambda n, d: features_bytes(n, d, 6),
    ),
    Provider(
        "sotalign-triton-online-fp16",
        sotalign_runner("triton", "online", precision="fp16"),
        _finite_potentials,
        "online",
        "fp16",
        1.5,
        lambda n, d: features_bytes(n, d, 6),
    ),
    Provider(
        "sotalign-triton-online-graph",
        sotalign_runner("triton", "online", precision="fp32", cuda_graph=True),
        _finite_potentials,
        "online",
        "fp32",
        2.0,
        lambda n, d: features_bytes(n, d, 6),
        max_n=4096,
        notes={"cuda_graph": True},
    ),
    Provider(
        "sotalign-triton-dense",
        sotalign_runner("triton", "dense", precision="fp32"),
        _finite_potentials,
        "dense",
        "fp32",
        1.5,
        _dense_memory(2),
    ),
    Provider(
        "sotalign-keops",
        sotalign_runner("keops", "online"),
        _finite_potentials,
        "online",
        "fp32",
        5.0,
        lambda n, d: features_bytes(n, d, 6),
    ),
    Provider(
        "sotalign-torch",
        sotalign_runner("torch", "auto"),
        _finite_potentials,
        "auto",
        "default",
        3.0,
        lambda n, d: min(n * n * 4, GIB) + features_bytes(n, d) + 512 * 2**20,
        max_n=32768,
    ),
    Provider("paper-dense", paper_runner, _finite_tensor, "dense", "fp32", 4.0, _dense_memory(5)),
    Provider("paper-dense-compiled", compiled_runner, _finite_tensor, "dense", "fp32", 1.5, _dense_memory(3)),
    Provider("pot-sinkhorn_log", pot_runner, _finite_tensor, "dense", "fp32", 5.0, _dense_memory(7)),
    Provider(
        "geomloss-keops",
        geomloss_runner,
        _finite_pair,
        "online",
        "fp32",
        5.0,
        lambda n, d: features_bytes(n, d),
        notes={"note": "eps-scaling schedule, not fixed eps"},
    ),
    Provider(
        "flashsinkhorn",
        flash_runner(tf32=False),
        _finite_pair,
        "online",
        "fp32",
        2.0,
        lambda n, d: features_bytes(n, d, 6),
    ),
    Provider(
        "flashsinkhorn-tf32",
        flash_runner(tf32=True),
        _finite_pair,
        "online",
        "tf32",
        1.5,
        lambda n, d: features_bytes(n, d, 6),
    ),
]


def predicted_seconds(provider: Provider, n: int, d: int, n_iters: int, gpu: str) -> float:
    """Roofline bound of one call on the provider's path (the faster one for ``auto``) × slowdown."""
    paths = ("online", "dense") if provider.path == "auto" else (provider.path,)
    precision = "fp32" if provider.precision == "default" else provider.precision
    bound = min(n_iters * roofline.sinkhorn_iteration_bound(n, n, d, path, gpu, precision) for path in paths)
    return provider.slowdown * bound


def cases(smoke: bool) -> list:
    shapes = SMOKE_SHAPES if smoke else SHAPES
    return [
        pytest.param(shape, provider, id=f"n{shape[0]}-d{shape[1]}-{provider.name}")
        for shape in shapes
        for provider in PROVIDERS
        if smoke or provider.max_n is None or shape[0] <= provider.max_n
    ]


def _device_gpu_key(device: torch.device) -> str:
    """The roofline table's GPU (an H100 SXM stands in on unknown devices and on CPU)."""
    if device.type == "cuda":
        return roofline.gpu_key(torch.cuda.get_device_name(device)) or "h100-sxm"
    return "h100-sxm"


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("shape, provider", cases(SMOKE))
def test_sinkhorn(benchmark, gpu_bench, gpu_gate, gpu_device, device_problem, shape, provider):
    """``n_iters`` Sinkhorn iterations of one provider at one shape (see the module doc)."""
    n, d = shape
    n_iters = iterations_for(n, SMOKE)
    gpu = _device_gpu_key(gpu_device)
    precision = resolved_precision(provider.precision, sotalign.sinkhorn)
    gpu_gate(
        memory_bytes=provider.memory(n, d), predicted_seconds=predicted_seconds(provider, n, d, n_iters, gpu)
    )
    run = provider.make(gpu_device)
    data = device_problem(n, d)
    gpu_bench(
        benchmark,
        lambda: run(data.x, data.y, n_iters),
        check=provider.check,
        suite="gpu-sinkhorn",
        provider=provider.name,
        group=f"gpu-sinkhorn n={n} d={d}",
        backend=provider.name.split("-")[0],
        n=n,
        m=n,
        d=d,
        eps=EPS,
        n_iters=n_iters,
        dtype="float32",
        roofline_path=provider.path,
        precision=precision,
        input_mib=round(2 * n * d * 4 / 2**20, 2),
        **provider.notes,
    )


def test_roofline_reproduces_design():
    """Not timed: roofline.py gives docs/design.md's 0.72 ms (dense) and 0.56 ms (online fp16)."""
    n, d = HEADLINE
    dense = roofline.sinkhorn_iteration_bound(n, n, d, "dense", "h100-sxm")
    online = roofline.sinkhorn_iteration_bound(n, n, d, "online", "h100-sxm", "fp16")
    assert round(dense * 1e3, 2) == 0.72 and round(online * 1e3, 2) == 0.56
    assert roofline.best_iteration_bound(n, n, d) == online
    # a KLOT step with d = d* = 512 is bound near 0.11 s
    assert 0.11 <= roofline.klot_step_bound(n, n, d, d, "online", precision="fp16") <= 0.115
    assert roofline.gpu_key("NVIDIA H100 80GB HBM3") == "h100-sxm"
    assert roofline.gpu_key("NVIDIA H100 PCIe") == "h100-pcie"
    assert roofline.gpu_key("NVIDIA H200") == "h200"
    assert roofline.gpu_key("NVIDIA A100-SXM4-80GB") is None


def test_peers_solve_the_same_problem(device_problem, gpu_device):
    """Not timed: the fixed-ε providers' plans agree with sotalign's on a small instance."""
    data = device_problem(128, 16)
    ours = sotalign.sinkhorn(data.x, data.y, EPS, PARITY_ITERS, backend="reference").plan()
    plans = {"paper-dense": paper_sinkhorn(unit(data.x) @ unit(data.y).T, EPS, PARITY_ITERS)[0].exp()}
    try:
        plans["pot-sinkhorn_log"] = pot_sinkhorn_log(data.x, data.y, EPS, PARITY_ITERS)
    except pytest.skip.Exception:
        pass
    for name, backend in (
        ("sotalign-triton", "triton"),
        ("sotalign-torch", "torch"),
        ("sotalign-keops", "keops"),
    ):
        try:
            require_backend(backend, gpu_device)
        except pytest.skip.Exception:
            continue
        plans[name] = sotalign.sinkhorn(data.x, data.y, EPS, PARITY_ITERS, backend=backend).plan()
    if gpu_device.type == "cuda":
        try:
            solver = flash_solver(EPS, PARITY_ITERS, tf32=False)
            plans["flashsinkhorn"] = flash_plan(solver, data.x, data.y, EPS)
        except pytest.skip.Exception:
            pass
    for name, plan in plans.items():
        error = float((plan - ours).abs().sum())  # L1 distance between plans of mass one
        assert error < 1e-3, f"{name} solves a different problem (L1 plan distance {error:.3g})"
