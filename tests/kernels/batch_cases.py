"""Batches and zero weights: the checks every backend's own test file runs on that backend,
by subclassing :class:`BatchChecks` (this module is not collected itself).

The oracle is the float64 ``reference`` backend on each problem *alone*: a batch pads uneven
problems to a common (n, m) with zero weights (−inf log weights, zero feature rows), and the
batched half-steps must give each problem's own potentials on its real rows and columns, and
−inf on the padding. Float32 inputs are widened, not regenerated, for the oracle.
"""

from __future__ import annotations

import math

import pytest
import torch

from sotalign.kernels import Affinity, Backend, load_backend

REFERENCE = load_backend("reference")
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
#: Real (n, m) of the problems of one batch: one larger than a cpu tile (24 rows × 256
#: columns), one small, one single entry.
SIZES = [(30, 270), (7, 41), (1, 1)]
#: Feature dimensions of the student and the teacher (fixed: KeOps compiles one kernel per
#: dimension; the same as in the conformance suite).
D, D_TEACHER = 7, 4


def padded_batch(sizes, d: int, dtype: torch.dtype, seed: int = 0):
    """Features x (B, n, d), y (B, m, d) and uniform log weights (B, n), (B, m) of problems of
    the given real sizes, padded with zero rows and −inf log weights."""
    generator = torch.Generator().manual_seed(seed)
    n, m = max(s[0] for s in sizes), max(s[1] for s in sizes)
    x = torch.zeros(len(sizes), n, d, dtype=torch.float64)
    y = torch.zeros(len(sizes), m, d, dtype=torch.float64)
    log_a = torch.full((len(sizes), n), -math.inf, dtype=torch.float64)
    log_b = torch.full((len(sizes), m), -math.inf, dtype=torch.float64)
    for p, (rows, cols) in enumerate(sizes):
        x[p, :rows] = torch.nn.functional.normalize(
            torch.randn(rows, d, generator=generator, dtype=torch.float64), dim=1
        )
        y[p, :cols] = torch.nn.functional.normalize(
            torch.randn(cols, d, generator=generator, dtype=torch.float64), dim=1
        )
        log_a[p, :rows] = -math.log(rows)
        log_b[p, :cols] = -math.log(cols)
    return x.to(dtype), y.to(dtype), log_a.to(dtype), log_b.to(dtype)


def affinity(x: torch.Tensor, y: torch.Tensor, path: str) -> Affinity:
    return Affinity.from_features(x, y) if path == "online" else Affinity.from_dense(x @ y.mT)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Equal −inf entries, and finite entries within the tolerance relative to their size."""
    assert actual.dtype == dtype and actual.shape == expected.shape
    assert not actual.isnan().any(), "NaN in the result"
    infinite = expected == -math.inf
    assert torch.equal(actual == -math.inf, infinite), "−inf entries differ"
    if (~infinite).any():
        error = float((actual.double() - expected)[~infinite].abs().max())
        scale = max(1.0, float(expected[~infinite].abs().max()))
        assert error <= TOLERANCE[dtype] * scale, (
            f"max error {error:.3e} > {TOLERANCE[dtype]:.0e} × {scale:.3e}"
        )


def iterate(
    backend, K: Affinity, log_a: torch.Tensor, log_b: torch.Tensor, scale: float, steps: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, g) after ``steps`` scaled Sinkhorn iterations (row then column update, τ = ``scale``,
    ε = 0.05) from g = 0 on the real columns and −inf on the padding (which must not count)."""
    f, g = log_a, torch.zeros_like(log_b).masked_fill_(log_b == -math.inf, -math.inf)
    for _ in range(steps):
        f = backend.row_update(K, g, 0.05, log_a, scale)
        g = backend.column_update(K, f, 0.05, log_b, scale)
    return f, g


def check_padded_batch(backend, path: str, dtype: torch.dtype, scale: float = 0.7) -> None:
    """Scaled Sinkhorn iterations on a padded batch, and on each problem alone, equal the
    reference's on each problem alone; the padding stays at −inf."""
    x, y, log_a, log_b = padded_batch(SIZES, D, dtype)
    f, g = iterate(backend, affinity(x, y, path), log_a, log_b, scale)
    for p, (rows, cols) in enumerate(SIZES):
        x_alone, y_alone, log_a_alone, log_b_alone = (
            x[p, :rows],
            y[p, :cols],
            log_a[p, :rows],
            log_b[p, :cols],
        )
        expected = iterate(
            REFERENCE,
            affinity(x_alone.double(), y_alone.double(), path),
            log_a_alone.double(),
            log_b_alone.double(),
            scale,
        )
        alone = iterate(backend, affinity(x_alone, y_alone, path), log_a_alone, log_b_alone, scale)
        for batched, single, reference in zip((f[p, :rows], g[p, :cols]), alone, expected, strict=True):
            assert_close(batched, reference, dtype)
            assert_close(single, reference, dtype)
        assert (f[p, rows:] == -math.inf).all() and (g[p, cols:] == -math.inf).all()


def check_neg_inf_biases(backend, path: str, dtype: torch.dtype, batched: bool) -> None:
    """LSEs over biases that are −inf in part (first entries: before any finite term, across
    tile borders) or in whole (a problem with no finite term: −inf, not NaN), against the
    reference, for one problem or a batch of three."""
    eps = 0.05
    x, y, _, _ = padded_batch([(30, 270)] * 3, D, dtype, seed=1)
    generator = torch.Generator().manual_seed(2)
    bias_cols = torch.randn(3, 270, generator=generator, dtype=torch.float64).to(dtype)
    bias_rows = torch.randn(3, 30, generator=generator, dtype=torch.float64).to(dtype)
    bias_cols[0, :260], bias_rows[0, :25] = -math.inf, -math.inf  # finite terms only at the end
    bias_cols[1], bias_rows[1] = -math.inf, -math.inf  # no finite term at all
    cases = (
        [(x, y, bias_cols, bias_rows)]
        if batched
        else [(x[p], y[p], bias_cols[p], bias_rows[p]) for p in (0, 1)]
    )
    for x_case, y_case, cols, rows in cases:
        K, K64 = affinity(x_case, y_case, path), affinity(x_case.double(), y_case.double(), path)
        assert_close(backend.lse_rows(K, cols, eps), REFERENCE.lse_rows(K64, cols.double(), eps), dtype)
        assert_close(backend.lse_cols(K, rows, eps), REFERENCE.lse_cols(K64, rows.double(), eps), dtype)


def check_klot_zero_weights(backend, path: str, dtype: torch.dtype) -> None:
    """Rows and columns of weight zero (−inf potentials in both plans) add 0 to the KLOT value
    and its gradients, not NaN. The teacher is on ``path``; the gradient wrt features takes the
    student as features, the dense one as a stored K."""
    eps, eps_t = 0.05, 0.01
    x, y, log_a, log_b = padded_batch([(30, 270), (20, 200)], D, dtype, seed=3)
    x_t, y_t, _, _ = padded_batch([(30, 270), (20, 200)], D_TEACHER, dtype, seed=4)
    x, y, x_t, y_t, log_a, log_b = x[1], y[1], x_t[1], y_t[1], log_a[1].double(), log_b[1].double()
    K, K_t = affinity(x, y, path), affinity(x_t, y_t, path)
    K64, K_t64 = affinity(x.double(), y.double(), path), affinity(x_t.double(), y_t.double(), path)
    potentials = [iterate(REFERENCE, K64, log_a, log_b, 1.0, steps=20)]
    potentials.append(iterate(REFERENCE, K_t64, log_a, log_b, 1.0, steps=20))
    student, teacher = [(f, g, level) for (f, g), level in zip(potentials, (eps, eps_t), strict=True)]
    student_in, teacher_in = [(f.to(dtype), g.to(dtype), level) for f, g, level in (student, teacher)]

    expected = REFERENCE.klot_value(K64, *student, K_t64, *teacher)
    assert torch.isfinite(expected)
    assert_close(backend.klot_value(K, *student_in, K_t, *teacher_in).reshape(1), expected.reshape(1), dtype)
    features, features64 = affinity(x, y, "online"), affinity(x.double(), y.double(), "online")
    grads = backend.klot_grad_features(features, *student_in, K_t, *teacher_in)
    expected = REFERENCE.klot_grad_features(features64, *student, K_t64, *teacher)
    for grad, grad_expected in zip(grads, expected, strict=True):
        assert_close(grad, grad_expected, dtype)
    dense, dense64 = affinity(x, y, "dense"), affinity(x.double(), y.double(), "dense")
    G = backend.klot_grad_dense(dense, *student_in, K_t, *teacher_in)
    assert_close(G, REFERENCE.klot_grad_dense(dense64, *student, K_t64, *teacher), dtype)


def check_plan_products_batch(backend, path: str, dtype: torch.dtype) -> None:
    """P V, Pᵀ U and Σ P K2 on a padded batch with −inf potentials on the padding equal the
    reference's on each problem alone (zero rows and columns of P there)."""
    x, y, log_a, log_b = padded_batch(SIZES, D, dtype, seed=5)
    K, K2 = affinity(x, y, path), affinity(y[:, :1].expand(x.shape).contiguous(), y, path)
    f, g = iterate(REFERENCE, affinity(x.double(), y.double(), path), log_a.double(), log_b.double(), 1.0)
    generator = torch.Generator().manual_seed(6)
    V = torch.randn(*y.shape[:2], 3, generator=generator, dtype=torch.float64)
    U = torch.randn(*x.shape[:2], 3, generator=generator, dtype=torch.float64)
    f, g, V, U = (t.to(dtype) for t in (f, g, V, U))
    PV, PtU = backend.plan_matmul(K, f, g, 0.05, V), backend.plan_t_matmul(K, f, g, 0.05, U)
    inner = backend.plan_inner(K, f, g, 0.05, K2)
    for p, (rows, cols) in enumerate(SIZES):
        alone = affinity(x[p, :rows].double(), y[p, :cols].double(), path)
        alone2 = affinity(y[p, :1].expand(rows, D).double(), y[p, :cols].double(), path)
        f_p, g_p = f[p, :rows].double(), g[p, :cols].double()
        assert_close(PV[p, :rows], REFERENCE.plan_matmul(alone, f_p, g_p, 0.05, V[p, :cols].double()), dtype)
        assert_close(
            PtU[p, :cols], REFERENCE.plan_t_matmul(alone, f_p, g_p, 0.05, U[p, :rows].double()), dtype
        )
        assert_close(
            inner[p].reshape(1), REFERENCE.plan_inner(alone, f_p, g_p, 0.05, alone2).reshape(1), dtype
        )
        assert (PV[p, rows:] == 0).all() and (PtU[p, cols:] == 0).all()


class BatchChecks:
    """The checks above as tests, on both paths in float64 and float32. A subclass sets
    ``backend`` (and ``paths``, the paths it computes itself)."""

    backend: Backend
    paths: tuple[str, ...] = ("online", "dense")

    @pytest.fixture(params=["online", "dense"])
    def path(self, request):
        if request.param not in self.paths:
            pytest.skip(f"the {self.backend.name} backend hands the {request.param} path to another one")
        return request.param

    @pytest.fixture(params=[torch.float64, torch.float32], ids=["fp64", "fp32"])
    def dtype(self, request):
        return request.param

    def test_padded_batch_equals_each_problem_alone(self, path, dtype):
        check_padded_batch(self.backend, path, dtype)

    @pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])
    def test_neg_inf_biases(self, path, dtype, batched):
        check_neg_inf_biases(self.backend, path, dtype, batched)

    def test_klot_zero_weights(self, path, dtype):
        check_klot_zero_weights(self.backend, path, dtype)

    def test_plan_products_batch(self, path, dtype):
        check_plan_products_batch(self.backend, path, dtype)
