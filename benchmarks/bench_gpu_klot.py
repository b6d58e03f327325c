"""GPU KLOT step: forward + backward of the unpaired SOTAlign loss, sotalign against the paper.

One step = ``loss = klot(x, y, x_teacher, y_teacher); loss.backward()`` from raw fp32 features
on the GPU (n = m rows; student d, teacher d*), student ε = 0.05, teacher ε* = 0.01,
``n_iters`` = 100 iterations for each of the two Sinkhorn solves (100 + 100).

``test_klot_step`` (run_gpu.sh's ``klot`` suite): n ∈ {4096, 16384, 32768} with
(d, d*) ∈ {(256, 128), (1024, 512)}; n = 32768 is the headline (the batch of the authors'
code). Providers:

* ``sotalign-auto``: ``backend="auto"``, ``path="auto"`` (what users get; the report holds it
  to the roofline of the path it picked);
* ``sotalign-triton-online[-tf32x3|-fp16x3|-tf32|-fp16]``, ``sotalign-triton-dense``: the Triton backend on
  one path and dot precision; ``sotalign-keops`` (online) and ``sotalign-torch`` (portable);
* ``paper-dense``: the SOTAlign authors' step (:func:`sotalign.ot.paper.paper_klot_features`:
  two dense solves, stored plans, surrogate gradient through autograd);
  ``paper-dense-compiled``: the same step with each solve's loop body compiled by
  ``torch.compile`` (``paper_klot_features(..., compiled=True)``).

``test_klot_scale`` (the ``scale`` suite): n = m = 262144, d = 512, d* = 256, online only
(a stored K would take 256 GiB): the Triton online path with fp16 dots at 100 + 100 and tf32
at 10 + 10, then ``sotalign-auto`` at its default precision with 10 + 10 iterations (an fp32
step of 100 + 100 would take minutes). Each records its time and peak memory.

Skips (with the reason) follow bench_gpu_sinkhorn.py: estimated memory over 60 % of the
GPU's, or a predicted call time over budget (4 s; 30 s for ``sotalign-auto``, whose rows the
targets are checked on; 120 s in the scale run). Without CUDA: smoke runs only, tiny shapes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import roofline
import torch
from bench_gpu_sinkhorn import (
    _cuda_only,
    _device_gpu_key,
    features_bytes,
    require_backend,
    resolved_precision,
    sotalign_options,
)
from bench_klot import step

import sotalign
from sotalign.ot.paper import paper_klot_features

SMOKE = os.environ.get("SOTALIGN_BENCH_SMOKE") == "1"
EPS, EPS_TEACHER = 0.05, 0.01
N_ITERS = 5 if SMOKE else 100
#: (n = m, d, d*): the headline shapes first, so a spent time budget drops the others.
SHAPES = [(32768, 256, 128), (32768, 1024, 512)] + [
    (n, d, d_t) for n in (4096, 16384) for d, d_t in ((256, 128), (1024, 512))
]
SMOKE_SHAPES = [(64, 16, 8)]
SCALE_SHAPE = (128, 16, 8) if SMOKE else (262144, 512, 256)
#: Per-call budget of the scale cases (seconds): a step at n = 262144 takes tens of seconds.
SCALE_MAX_CALL_SECONDS = 120.0


# --------------------------------------------------------------------------- providers


def sotalign_klot(backend: str, path: str, **options) -> Callable:
    """A maker of ``loss_fn(x, y, x_t, y_t, n_iters)`` running sotalign.klot with options."""

    def make(device):
        if backend != "auto":
            require_backend(backend, device)
        kwargs = sotalign_options(sotalign.klot, {"path": path, **options})

        def loss_fn(x, y, x_t, y_t, n_iters):
            return sotalign.klot(
                x, y, x_t, y_t, eps=EPS, eps_teacher=EPS_TEACHER, n_iters=n_iters, backend=backend, **kwargs
            )

        return loss_fn

    return make


def paper_step(device):
    def loss_fn(x, y, x_t, y_t, n_iters):
        return paper_klot_features(x, y, x_t, y_t, eps=EPS, eps_teacher=EPS_TEACHER, n_iters=n_iters)

    return loss_fn


def compiled_paper_step(device):
    """The paper's step with its Sinkhorn solves swapped for the compiled-loop version."""
    _cuda_only("torch.compile is timed on CUDA only (on CPU it would compile C++ for minutes)")(device)

    def loss_fn(x, y, x_t, y_t, n_iters):
        return paper_klot_features(
            x, y, x_t, y_t, eps=EPS, eps_teacher=EPS_TEACHER, n_iters=n_iters, compiled=True
        )

    return loss_fn


@dataclass(frozen=True)
class Provider:
    """One timed KLOT configuration; see bench_gpu_sinkhorn.Provider for the fields.

    ``memory(n, d, d*)`` estimates the peak bytes beyond the inputs.
    """

    name: str
    make: Callable
    path: str
    precision: str
    slowdown: float
    memory: Callable[[int, int, int], float]
    #: Per-call time budget when not the default (sotalign-auto is what the targets are on).
    max_call_seconds: float | None = None


def online_memory(n: int, d: int, d_t: int) -> float:
    """Normalised copies of the four inputs, the two gradients, and workspace."""
    return features_bytes(n, 2 * d + d_t, 3)


def dense_memory(matrices: float) -> Callable[[int, int, int], float]:
    return lambda n, d, d_t: matrices * n * n * 4 + online_memory(n, d, d_t)


PROVIDERS = [
    Provider(
        "sotalign-auto",
        sotalign_klot("auto", "auto"),
        "auto",
        "default",
        2.0,
        lambda n, d, d_t: (3 * n * n * 4 if auto_dense(n, d, d_t) else 0) + online_memory(n, d, d_t),
        max_call_seconds=30.0,
    ),
    Provider(
        "sotalign-triton-online",
        sotalign_klot("triton", "online", precision="fp32"),
        "online",
        "fp32",
        2.0,
        online_memory,
    ),
    Provider(
        "sotalign-triton-online-tf32x3",
        sotalign_klot("triton", "online", precision="tf32x3"),
        "online",
        "tf32x3",
        1.5,
        online_memory,
    ),
    Provider(
        "sotalign-triton-online-fp16x3",
        sotalign_klot("triton", "online", precision="fp16x3"),
        "online",
        "fp16x3",
        1.5,
        online_memory,
    ),
    Provider(
        "sotalign-triton-online-tf32",
        sotalign_klot("triton", "online", precision="tf32"),
        "online",
        "tf32",
        1.5,
        online_memory,
    ),
    Provider(
        "sotalign-triton-online-fp16",
        sotalign_klot("triton", "online", precision="fp16"),
        "online",
        "fp16",
        1.5,
        online_memory,
    ),
    Provider(
        "sotalign-triton-dense",
        sotalign_klot("triton", "dense", precision="fp32"),
        "dense",
        "fp32",
        1.5,
        dense_memory(2),
    ),
    Provider("sotalign-keops", sotalign_klot("keops", "online"), "online", "fp32", 5.0, online_memory),
    Provider(
        "sotalign-torch",
        sotalign_klot("torch", "auto"),
        "auto",
        "default",
        3.0,
        lambda n, d, d_t: (
            2 * min(n * n * 4, sotalign.DEFAULT_MEMORY_BUDGET) + online_memory(n, d, d_t) + 2**30
        ),
    ),
    Provider("paper-dense", paper_step, "dense", "fp32", 4.0, dense_memory(9)),
    Provider("paper-dense-compiled", compiled_paper_step, "dense", "fp32", 1.5, dense_memory(9)),
]
PROVIDER = {p.name: p for p in PROVIDERS}
#: (provider, n_iters) of the scale run.
SCALE_CASES = [
    ("sotalign-triton-online-fp16", N_ITERS),
    ("sotalign-triton-online-tf32", 5 if SMOKE else 10),
    ("sotalign-auto", 5 if SMOKE else 10),
]


def predicted_seconds(provider: Provider, n: int, d: int, d_t: int, n_iters: int, gpu: str) -> float:
    """Roofline bound of one step × the assumed slowdown; for ``auto`` the faster path among
    those it may pick (dense only when K and K* fit sotalign's default memory budget)."""
    path, precision = provider.path, provider.precision
    if path == "auto":
        route = auto_route(n, d, d_t)
        path, precision = route.path, route.precision
    precision = "fp32" if precision == "default" else precision
    return provider.slowdown * roofline.klot_step_bound(n, n, d, d_t, path, gpu, precision, n_iters)


def auto_route(n: int, d: int, d_t: int):
    """The route ``auto`` takes for this step here (free memory read now)."""
    return sotalign.plan_route(n, n, d, teacher_dim=d_t)


def auto_dense(n: int, d: int, d_t: int) -> bool:
    return auto_route(n, d, d_t).dense


# --------------------------------------------------------------------------- tests


def _run(
    benchmark,
    gpu_bench,
    gpu_gate,
    gpu_device,
    device_problem,
    provider: Provider,
    shape,
    n_iters: int,
    suite: str,
    max_call_seconds: float | None = None,
    rounds=None,
):
    n, d, d_t = shape
    gpu = _device_gpu_key(gpu_device)
    gpu_gate(
        memory_bytes=provider.memory(n, d, d_t),
        predicted_seconds=predicted_seconds(provider, n, d, d_t, n_iters, gpu),
        max_call_seconds=max_call_seconds or provider.max_call_seconds,
    )
    loss_fn = provider.make(gpu_device)
    data = device_problem(n, d, d_t)
    x = data.x.clone().requires_grad_()
    y = data.y.clone().requires_grad_()

    def check(value):
        assert torch.isfinite(value) and torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()

    gpu_bench(
        benchmark,
        lambda: step(lambda *a: loss_fn(*a, n_iters), x, y, data.x_teacher, data.y_teacher),
        check=check,
        suite=suite,
        provider=provider.name,
        rounds=rounds,
        backend=provider.name.split("-")[0],
        group=f"{suite} n={n} d={d} teacher={d_t}",
        n=n,
        m=n,
        d=d,
        d_teacher=d_t,
        eps=EPS,
        eps_teacher=EPS_TEACHER,
        n_iters=n_iters,
        dtype="float32",
        roofline_path=provider.path,
        precision=resolved_precision(provider.precision, sotalign.klot),
        input_mib=round(2 * n * (d + d_t) * 4 / 2**20, 2),
    )


@pytest.mark.parametrize(
    "shape, provider",
    [
        pytest.param(shape, provider, id=f"n{shape[0]}-d{shape[1]}-t{shape[2]}-{provider.name}")
        for shape in (SMOKE_SHAPES if SMOKE else SHAPES)
        for provider in PROVIDERS
    ],
)
def test_klot_step(benchmark, gpu_bench, gpu_gate, gpu_device, device_problem, shape, provider):
    """One KLOT step (100 + 100 iterations, forward + backward) of one provider."""
    _run(benchmark, gpu_bench, gpu_gate, gpu_device, device_problem, provider, shape, N_ITERS, "gpu-klot")


@pytest.mark.parametrize(
    "name, n_iters", [pytest.param(name, it, id=f"{name}-{it}it") for name, it in SCALE_CASES]
)
def test_klot_scale(benchmark, gpu_bench, gpu_gate, gpu_device, device_problem, name, n_iters):
    """The n = m = 262144, d = 512 step (one warm-up and two timed rounds): time and memory."""
    _run(
        benchmark,
        gpu_bench,
        gpu_gate,
        gpu_device,
        device_problem,
        PROVIDER[name],
        SCALE_SHAPE,
        n_iters,
        "gpu-scale",
        max_call_seconds=SCALE_MAX_CALL_SECONDS,
        rounds=2,
    )


def test_backends_match_paper(device_problem, gpu_device):
    """Not timed: every sotalign backend's loss and gradients equal the paper's (small n)."""
    data = device_problem(64, 16, 8)
    x = data.x.clone().requires_grad_()
    y = data.y.clone().requires_grad_()
    args = (x, y, data.x_teacher, data.y_teacher)
    value = step(lambda *a: paper_klot_features(*a, eps=EPS, eps_teacher=EPS_TEACHER, n_iters=20), *args)
    expected = value, x.grad.clone(), y.grad.clone()
    for backend in ("triton", "keops", "torch"):
        try:
            require_backend(backend, gpu_device)
        except pytest.skip.Exception:
            continue
        for path in ("online", "dense"):
            loss_fn = functools.partial(
                sotalign.klot, eps=EPS, eps_teacher=EPS_TEACHER, n_iters=20, backend=backend, path=path
            )
            got = step(loss_fn, *args)
            torch.testing.assert_close(got, expected[0], rtol=1e-3, atol=1e-4)
            for mine, paper in zip((x.grad, y.grad), expected[1:], strict=True):
                torch.testing.assert_close(mine, paper, rtol=1e-2, atol=1e-3 * float(paper.abs().max()))
