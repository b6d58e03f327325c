"""Shared helpers: the routes under test and seeded random problems."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter. Triton picks interpreted or
# compiled helpers when it is first imported, so this must precede any import of it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sotalign  # noqa: E402

#: (backend, path) pairs; "reference" is dense by construction.
ALL_ROUTES = [
    ("reference", "auto"),
    ("torch", "dense"),
    ("torch", "online"),
    ("cpu", "dense"),
    ("cpu", "online"),
]
ROUTES = [route for route in ALL_ROUTES if route[0] in sotalign.available_backends()]
#: The routes that must agree with the reference (everything but the reference itself).
FAST_ROUTES = [route for route in ROUTES if route[0] != "reference"]


#: Modules that run every test in Triton's interpreter or through KeOps' compiler: slow as a
#: whole, so `make test-fast` (``-m "not slow"``) leaves them to `make test`.
SLOW_MODULES = ("test_triton_kernels.py", "test_keops.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors: one torch thread is faster than two, and far faster on a
    machine shared with other jobs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def route_id(route) -> str:
    return "-".join(route)


def features(
    n: int, m: int, d: int, dtype=torch.float64, seed: int = 0, *, unit: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two clouds of n and m rows in d dimensions with shared structure (so plans are far from
    uniform) and some noise: the tests' one random feature generator. ``unit=True`` scales
    every row to unit L2 norm (the input of a cosine affinity)."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(5, d, generator=generator, dtype=torch.float64)
    x = centers[torch.randint(0, 5, (n,), generator=generator)] + 0.7 * torch.randn(
        n, d, generator=generator, dtype=torch.float64
    )
    y = centers[torch.randint(0, 5, (m,), generator=generator)] + 0.7 * torch.randn(
        m, d, generator=generator, dtype=torch.float64
    )
    if unit:
        x, y = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)
    return x.to(dtype), y.to(dtype)


def planted_pairs(n=400, d_x=10, d_y=7, noise=0.05, seed=0, offset=0.0) -> tuple[np.ndarray, np.ndarray]:
    """Paired features for fitting a teacher: B = A M + noise, with an anisotropic A (so
    whitening matters), both shifted by ``offset`` (so centring matters)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, d_x)) * np.linspace(0.3, 3.0, d_x) + offset
    M = rng.standard_normal((d_x, d_y))
    B = A @ M + noise * rng.standard_normal((n, d_y)) + 2 * offset
    return A, B


def klot_problem(n: int, m: int, d: int, d_teacher: int, dtype=torch.float64, seed: int = 0):
    x, y = features(n, m, d, dtype, seed)
    x_teacher, y_teacher = features(n, m, d_teacher, dtype, seed + 1)
    # teacher features correlated with the student's rows, as a real teacher would be
    x_teacher = x_teacher + x[:, :d_teacher] if d_teacher <= d else x_teacher
    y_teacher = y_teacher + y[:, :d_teacher] if d_teacher <= d else y_teacher
    return x, y, x_teacher, y_teacher


#: Training settings small enough for a test run on CPU (the paper's defaults are for 10k
#: pairs and 1024-d encoders); a module overrides what it needs: dict(TINY_TRAINING, ...).
TINY_TRAINING = dict(
    out_dim=16,
    lr=1e-2,
    paired_batch_size=64,
    unpaired_batch_size=96,
    n_iters=20,
    eps_teacher=0.05,
    alpha=1e-2,
    eval_every=10,
    checkpoint_every=10,
    device="cpu",
)


def toy_spec(directory, n_pairs: int = 40, **split):
    """The DataSpec of the platonic toy that ``write_platonic`` wrote to ``directory``."""
    from sotalign.data import DataSpec

    return DataSpec(
        images=str(directory / "images.npy"), texts=str(directory / "texts.npy"), n_pairs=n_pairs, **split
    )


def toy_flags(directory, pairs: int, val: int, *more: str) -> list[str]:
    """The data flags of ``sotalign fit`` and ``compare`` for the platonic toy in ``directory``."""
    images, texts = directory / "images.npy", directory / "texts.npy"
    return ["--images", str(images), "--texts", str(texts), "--pairs", str(pairs), "--val", str(val), *more]


def relative_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    """‖value − expected‖ / ‖expected‖ in float64."""
    expected = expected.double()
    return float((value.double() - expected).norm() / expected.norm().clamp_min(1e-300))


@pytest.fixture(params=FAST_ROUTES, ids=route_id)
def fast_route(request):
    return request.param


@pytest.fixture(params=ROUTES, ids=route_id)
def any_route(request):
    return request.param
