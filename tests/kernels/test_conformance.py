"""Conformance: every backend that runs here, primitive by primitive, against the reference.

One fixture, ``backend``, yields each available backend (reference, torch, cpu, triton under
the interpreter, keops); every primitive of :mod:`sotalign.kernels.base` runs on both paths
(K given by features, K stored) in float64 and float32. The oracle is the float64
``reference`` evaluated on exactly the inputs the backend saw (float32 inputs are widened, not
regenerated), so only the backend's own arithmetic is measured: 1e-10 in float64, 1e-4 in
float32, relative to the size of the result. Shapes are not multiples of any backend's tiles.

Per-backend files keep only what is specific to their backend (threads, device checks,
fallbacks, kernel options).
"""

from __future__ import annotations

import math

import pytest
import torch

from sotalign.kernels import BACKEND_NAMES, Affinity, backend_error, base, load_backend

REFERENCE = load_backend("reference")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
#: (n, m): a single entry, then rows and columns off every backend's tile sizes.
SHAPES = [(1, 1), (37, 101), (130, 66), (23, 300)]
SHAPE_IDS = ["1x1", "37x101", "130x66", "23x300"]
#: Feature dimensions of the student and the teacher: fixed, because KeOps compiles one kernel
#: per formula, dimension and dtype (register-width padding of d is tested in test_cpu_kernels).
D, D_TEACHER = 7, 4
#: Triton's interpreter and KeOps' compilation are slow: `make test-fast` leaves them out.
SLOW_BACKENDS = ("triton", "keops")

pytestmark = pytest.mark.usefixtures("one_torch_thread", "small_blocks")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of at most 7 rows in the blocked primitives, so every shape crosses block borders."""
    monkeypatch.setattr(base, "BLOCK_BYTES", 7 * 300 * 8)


@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=[pytest.mark.slow] * (name in SLOW_BACKENDS)) for name in BACKEND_NAMES],
)
def backend(request):
    error = backend_error(request.param)
    if error is not None:
        pytest.skip(f"{request.param}: {error}")
    return load_backend(request.param)


@pytest.fixture(params=[torch.float64, torch.float32], ids=["fp64", "fp32"])
def dtype(request):
    return request.param


@pytest.fixture(params=["online", "dense"])
def path(request):
    return request.param


def unit_features(
    n: int, m: int, d: int, seed: int, normalised: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian rows, L2-normalised (cosine affinities) or raw (|K| up to a few times d)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = torch.randn(m, d, generator=generator, dtype=torch.float64)
    if not normalised:
        return x, y
    return torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(y, dim=1)


def affinity(x: torch.Tensor, y: torch.Tensor, path: str) -> Affinity:
    return Affinity.from_features(x, y) if path == "online" else Affinity.from_dense(x @ y.T)


def widened(K: Affinity) -> Affinity:
    """The same affinity in float64: exactly the rounded inputs the backend saw."""
    if K.is_dense:
        return Affinity.from_dense(K.dense.double())
    return Affinity.from_features(K.x.double(), K.y.double())


def potentials(K: Affinity, eps: float, iterations: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Realistic potentials (far from zero): log-domain Sinkhorn iterations of the reference."""
    n, m = K.shape
    f, g = torch.zeros(n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    for _ in range(iterations):
        f = -eps * math.log(n) - eps * REFERENCE.lse_rows(K, g, eps)
        g = -eps * math.log(m) - eps * REFERENCE.lse_cols(K, f, eps)
    return f, g


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale=None) -> None:
    """|actual − expected| ≤ tolerance · scale, scale = max(1, max |expected|) by default."""
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert bool(torch.isfinite(actual).all())
    if scale is None:
        scale = max(1.0, float(expected.abs().max()))
    error = float((actual.double() - expected).abs().max())
    assert error <= TOLERANCE[dtype] * scale, f"max error {error:.3e} > {TOLERANCE[dtype]:.0e} × {scale:.3e}"


class Problem:
    """Student (ε = 0.05) and teacher (ε* = 0.01) affinities on one path, with potentials."""

    def __init__(self, shape, path: str, dtype: torch.dtype, teacher_path: str | None = None):
        n, m = shape
        x, y = unit_features(n, m, D, seed=n + m)
        x_t, y_t = unit_features(n, m, D_TEACHER, seed=n * m + 1)
        self.K = affinity(x.to(dtype), y.to(dtype), path)
        self.K_t = affinity(x_t.to(dtype), y_t.to(dtype), teacher_path or path)
        self.K64, self.K_t64 = widened(self.K), widened(self.K_t)
        self.features = Affinity.from_features(x.to(dtype), y.to(dtype))
        self.eps, self.eps_t = 0.05, 0.01
        self.f64, self.g64 = potentials(self.K64, self.eps)
        self.f_t64, self.g_t64 = potentials(self.K_t64, self.eps_t)
        self.f, self.g, self.f_t, self.g_t = (
            t.to(dtype) for t in (self.f64, self.g64, self.f_t64, self.g_t64)
        )

    def student(self):
        return self.f, self.g, self.eps

    def teacher(self):
        return self.f_t, self.g_t, self.eps_t


@pytest.mark.parametrize("normalised", [True, False], ids=["cosine", "raw"])
@pytest.mark.parametrize("eps", [0.5, 0.05, 0.005])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_lse_rows_and_cols(backend, path, dtype, shape, eps, normalised):
    n, m = shape
    x, y = unit_features(n, m, D, seed=n + 2 * m, normalised=normalised)
    K = affinity(x.to(dtype), y.to(dtype), path)
    f, g = potentials(widened(K), eps, iterations=5)
    # LSE values are O(1/ε): compare them in units of their scale
    rows = backend.lse_rows(K, g.to(dtype), eps)
    expected = REFERENCE.lse_rows(widened(K), g.to(dtype).double(), eps)
    assert_close(rows, expected, dtype, scale=max(1.0, float(expected.abs().max())))
    cols = backend.lse_cols(K, f.to(dtype), eps)
    expected = REFERENCE.lse_cols(widened(K), f.to(dtype).double(), eps)
    assert_close(cols, expected, dtype, scale=max(1.0, float(expected.abs().max())))


@pytest.mark.parametrize("teacher", ["same", "other"], ids=["teacher-same-path", "teacher-other-path"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_klot_value_and_gradients(backend, path, dtype, shape, teacher):
    other = {"online": "dense", "dense": "online"}[path]
    p = Problem(shape, path, dtype, teacher_path=other if teacher == "other" else path)
    value = backend.klot_value(p.K, *p.student(), p.K_t, *p.teacher())
    expected = REFERENCE.klot_value(p.K64, p.f64, p.g64, p.eps, p.K_t64, p.f_t64, p.g_t64, p.eps_t)
    assert_close(value, expected, dtype)

    # the student is always given by features (what autograd saves); the teacher on this path
    grads = backend.klot_grad_features(p.features, *p.student(), p.K_t, *p.teacher())
    expected = REFERENCE.klot_grad_features(
        widened(p.features), p.f64, p.g64, p.eps, p.K_t64, p.f_t64, p.g_t64, p.eps_t
    )
    for grad, grad_expected in zip(grads, expected, strict=True):
        assert_close(grad, grad_expected, dtype)

    dense = Affinity.from_dense(p.features.materialize().dense)
    G = backend.klot_grad_dense(dense, *p.student(), p.K_t, *p.teacher())
    expected = REFERENCE.klot_grad_dense(
        widened(dense), p.f64, p.g64, p.eps, p.K_t64, p.f_t64, p.g_t64, p.eps_t
    )
    assert_close(G, expected, dtype)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_plan_products(backend, path, dtype, shape):
    p = Problem(shape, path, dtype)
    n, m = p.K.shape
    generator = torch.Generator().manual_seed(5)
    V = torch.randn(m, 3, generator=generator, dtype=torch.float64).to(dtype)
    U = torch.randn(n, 3, generator=generator, dtype=torch.float64).to(dtype)
    f, g, eps = p.student()
    stored = p.K.dense.clone() if p.K.is_dense else None
    assert_close(
        backend.plan_matmul(p.K, f, g, eps, V),
        REFERENCE.plan_matmul(p.K64, p.f64, p.g64, eps, V.double()),
        dtype,
    )
    assert_close(
        backend.plan_t_matmul(p.K, f, g, eps, U),
        REFERENCE.plan_t_matmul(p.K64, p.f64, p.g64, eps, U.double()),
        dtype,
    )
    assert_close(
        backend.plan_inner(p.K, f, g, eps, p.K_t),
        REFERENCE.plan_inner(p.K64, p.f64, p.g64, eps, p.K_t64),
        dtype,
    )
    if stored is not None:
        assert torch.equal(p.K.dense, stored), "a plan product modified the stored K"


# --------------------------------------------------------------- batches and zero weights


def padded_batch(dtype, path: str):
    """Three problems of unequal sizes padded to one (B, n, m) batch: padding rows and
    columns get −inf biases (weight zero). Returns the batch and the problems alone."""
    sizes = [(13, 17), (5, 9), (11, 4)]
    n, m = max(s[0] for s in sizes), max(s[1] for s in sizes)
    x, y = torch.zeros(3, n, D, dtype=torch.float64), torch.zeros(3, m, D, dtype=torch.float64)
    row_bias = torch.full((3, n), -math.inf, dtype=torch.float64)
    col_bias = torch.full((3, m), -math.inf, dtype=torch.float64)
    alone = []
    for k, (n_k, m_k) in enumerate(sizes):
        x_k, y_k = unit_features(n_k, m_k, D, seed=31 + k)
        x[k, :n_k], y[k, :m_k] = x_k, y_k
        generator = torch.Generator().manual_seed(k)
        row_bias[k, :n_k] = 0.1 * torch.randn(n_k, generator=generator, dtype=torch.float64)
        col_bias[k, :m_k] = 0.1 * torch.randn(m_k, generator=generator, dtype=torch.float64)
        alone.append((n_k, m_k, affinity(x_k, y_k, path)))
    batch = (
        affinity(x.to(dtype), y.to(dtype), path)
        if path == "online"
        else Affinity.from_dense((x @ y.mT).to(dtype))
    )
    return batch, row_bias.to(dtype), col_bias.to(dtype), alone


@pytest.mark.parametrize("eps", [0.5, 0.05])
def test_batched_half_steps_equal_each_problem_alone(backend, path, dtype, eps):
    K, row_bias, col_bias, alone = padded_batch(dtype, path)
    rows = backend.lse_rows(K, col_bias, eps)
    cols = backend.lse_cols(K, row_bias, eps)
    tau = 0.7
    f = backend.row_update(K, col_bias, eps, row_bias, tau)
    assert rows.shape == row_bias.shape and cols.shape == col_bias.shape and f.shape == row_bias.shape
    for k, (n_k, m_k, K_k) in enumerate(alone):
        expected_rows = REFERENCE.lse_rows(K_k, col_bias[k, :m_k].double(), eps)
        assert_close(rows[k, :n_k], expected_rows, dtype, scale=max(1.0, float(expected_rows.abs().max())))
        expected_cols = REFERENCE.lse_cols(K_k, row_bias[k, :n_k].double(), eps)
        assert_close(cols[k, :m_k], expected_cols, dtype, scale=max(1.0, float(expected_cols.abs().max())))
        expected_f = tau * eps * (row_bias[k, :n_k].double() - expected_rows)
        assert_close(f[k, :n_k], expected_f, dtype, scale=max(1.0, float(expected_f.abs().max())))
    # padding rows see real columns (a finite LSE), padding columns see real rows
    assert bool(torch.isfinite(rows).all()) and bool(torch.isfinite(cols).all())
    assert bool((f[row_bias == -math.inf] == -math.inf).all())


def test_an_lse_over_only_zero_weights_is_minus_inf_not_nan(backend, path, dtype):
    x, y = unit_features(6, 9, D, seed=3)
    K = affinity(x.to(dtype), y.to(dtype), path)
    assert bool((backend.lse_rows(K, torch.full((9,), -math.inf, dtype=dtype), 0.05) == -math.inf).all())
    assert bool((backend.lse_cols(K, torch.full((6,), -math.inf, dtype=dtype), 0.05) == -math.inf).all())


def test_batched_plan_products_equal_each_problem_alone(backend, path, dtype):
    K, f, g, alone = padded_batch(dtype, path)
    generator = torch.Generator().manual_seed(9)
    V = torch.randn(*g.shape, 2, generator=generator, dtype=torch.float64).to(dtype)
    U = torch.randn(*f.shape, 2, generator=generator, dtype=torch.float64).to(dtype)
    products = backend.plan_matmul(K, f, g, 0.5, V), backend.plan_t_matmul(K, f, g, 0.5, U)
    inner = backend.plan_inner(K, f, g, 0.5, K)
    assert inner.shape == (3,)
    for k, (n_k, m_k, K_k) in enumerate(alone):
        f_k, g_k = f[k, :n_k].double(), g[k, :m_k].double()
        assert_close(
            products[0][k, :n_k], REFERENCE.plan_matmul(K_k, f_k, g_k, 0.5, V[k, :m_k].double()), dtype
        )
        assert_close(
            products[1][k, :m_k], REFERENCE.plan_t_matmul(K_k, f_k, g_k, 0.5, U[k, :n_k].double()), dtype
        )
        assert_close(inner[k], REFERENCE.plan_inner(K_k, f_k, g_k, 0.5, K_k), dtype)
