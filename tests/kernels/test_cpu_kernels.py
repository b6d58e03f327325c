"""What is specific to the C++ ``cpu`` backend: its tiling, its fast exp2, its batches and
−inf handling, its thread splits and its input checks.

Every backend is checked primitive by primitive on both paths in ``test_conformance.py``, with
one feature dimension; here the comparisons with the dense ``reference`` run on the shapes that
stress this backend's recomputed tiles: feature dimensions below, at and above the register
width (padding of d), more than one tile of 24 rows × 256 columns, and the 6-row
micro-kernel's ragged edge, plus its tolerance model in float32 (the error grows with
(|f| + |g| + |K|)/ε). float64 runs must agree to ~1e-10 relative; float32 runs are compared
with a float64 reference evaluated on the same (float32-rounded) inputs, so only the kernels'
own arithmetic is measured.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from batch_cases import BatchChecks
from conftest import features

cpu = pytest.importorskip("sotalign.kernels.cpu")
if not cpu.AVAILABLE:
    pytest.skip(f"sotalign._C not built: {cpu.IMPORT_ERROR}", allow_module_level=True)

from sotalign.kernels.base import Affinity  # noqa: E402
from sotalign.kernels.cpu import _C, CpuBackend  # noqa: E402
from sotalign.kernels.reference import ReferenceBackend  # noqa: E402

CPU = CpuBackend()
REF = ReferenceBackend()

SHAPES = [(1, 50, 3), (300, 7, 33), (50, 600, 70)]
EPSILONS = [0.5, 0.05, 0.005]
KINDS = ["dense", "features"]


def affinity(x, y, kind, dtype):
    x, y = x.to(dtype), y.to(dtype)
    return Affinity.from_features(x, y) if kind == "features" else Affinity.from_dense(x @ y.mT)


def as_float64(K: Affinity) -> Affinity:
    """The same affinity in float64 (exactly the rounded inputs the kernel saw)."""
    if K.is_dense:
        return Affinity.from_dense(K.dense.double())
    return Affinity.from_features(K.x.double(), K.y.double())


def sinkhorn_potentials(K: Affinity, eps: float, iterations: int = 30):
    """Realistic potentials: a few log-domain Sinkhorn iterations of the reference (float64)."""
    n, m = K.shape
    f = torch.zeros(n, dtype=torch.float64)
    g = torch.zeros(m, dtype=torch.float64)
    for _ in range(iterations):
        f = -eps * math.log(n) - eps * REF.lse_rows(K, g, eps)
        g = -eps * math.log(m) - eps * REF.lse_cols(K, f, eps)
    return f, g


def assert_close_scaled(actual, expected, rtol, scale=None):
    """|actual − expected| ≤ rtol · scale (scale: max(1, max |expected|) by default)."""
    assert actual.dtype == expected.dtype or expected.dtype == torch.float64
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all()
    if scale is None:
        scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    error = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert error <= rtol * scale, f"max error {error:.3e} > {rtol:.1e} × scale {scale:.3e}"


TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalised", [True, False])
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_lse_rows_and_cols(n, m, d, eps, normalised, dtype):
    x, y = features(n, m, d, seed=n * 1000 + m + d, unit=normalised)
    K = affinity(x, y, "features", dtype)
    gen = torch.Generator().manual_seed(7)
    bias_cols = (torch.randn(m, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
    bias_rows = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.3).to(dtype)

    rows, cols = CPU.lse_rows(K, bias_cols, eps), CPU.lse_cols(K, bias_rows, eps)
    assert rows.dtype == dtype and cols.dtype == dtype
    K64 = as_float64(K)
    assert_close_scaled(rows, REF.lse_rows(K64, bias_cols.double(), eps), TOL[dtype])
    assert_close_scaled(cols, REF.lse_cols(K64, bias_rows.double(), eps), TOL[dtype])


def klot_inputs(n, m, d, kind, teacher_kind, eps, dtype, normalised=True):
    """Student and teacher affinities (teacher with its own d) and their Sinkhorn potentials."""
    x, y = features(n, m, d, seed=n + 3 * m + 7 * d, unit=normalised)
    xt, yt = features(n, m, d + 4, seed=n + 5 * m + 11 * d, unit=normalised)
    K, K_t = affinity(x, y, kind, dtype), affinity(xt, yt, teacher_kind, dtype)
    eps_t = eps / 2
    f, g = sinkhorn_potentials(as_float64(K).materialize(), eps)
    f_t, g_t = sinkhorn_potentials(as_float64(K_t).materialize(), eps_t)
    pots = [p.to(dtype) for p in (f, g, f_t, g_t)]
    return K, K_t, pots, eps_t


def log_plan64(K, f, g, eps):
    """(f_i + g_j + K_ij)/ε in float64, and its rounding scale (|f_i| + |g_j| + |K_ij|)/ε."""
    f, g, K = f.double(), g.double(), as_float64(K).materialize().dense
    return ((f[:, None] + g[None, :] + K) / eps, (f.abs()[:, None] + g.abs()[None, :] + K.abs()) / eps)


def plans_and_tolerance(K, K_t, pots, eps, eps_t, dtype):
    """P + P* (the scale G = (P − P*)/ε is measured against, as G may cancel to ~0) and the
    tolerance: 1e-10 in float64; in float32 the log-plan arguments carry a rounding error
    relative to their magnitude, so the tolerance grows with max (|f| + |g| + |K|)/ε."""
    f, g, f_t, g_t = pots
    (log_p, size), (log_pt, size_t) = log_plan64(K, f, g, eps), log_plan64(K_t, f_t, g_t, eps_t)
    p_sum = log_p.exp() + log_pt.exp()
    if dtype == torch.float64:
        return p_sum, 1e-10
    return p_sum, 1e-6 * (1.0 + max(size.max().item(), size_t.max().item()))


# (student, teacher); at least one recomputed, the stored pair is covered by the conformance suite
KLOT_CASES = [
    ("features", "features"),
    ("features", "dense"),
    ("dense", "features"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("kind,teacher_kind", KLOT_CASES)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_klot_value(n, m, d, kind, teacher_kind, eps, dtype):
    K, K_t, (f, g, f_t, g_t), eps_t = klot_inputs(n, m, d, kind, teacher_kind, eps, dtype)
    value = CPU.klot_value(K, f, g, eps, K_t, f_t, g_t, eps_t)
    assert value.dtype == dtype and value.dim() == 0

    expected = REF.klot_value(
        as_float64(K), f.double(), g.double(), eps, as_float64(K_t), f_t.double(), g_t.double(), eps_t
    )
    # Scale: Σ P* ((|f*| + |g*| + |K*|)/ε* + (|f| + |g| + |K|)/ε), what rounding the log-plans
    # (and, in float32, K itself) is relative to; the terms cancel, the scale does not.
    (_, size), (log_pt, size_t) = log_plan64(K, f, g, eps), log_plan64(K_t, f_t, g_t, eps_t)
    scale = (log_pt.exp() * (size + size_t)).sum().item()
    tol = {torch.float64: 1e-13, torch.float32: 1e-6}[dtype]
    assert_close_scaled(value.reshape(1), expected.reshape(1), tol, scale=scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalised", [True, False])
@pytest.mark.parametrize("eps", EPSILONS)
@pytest.mark.parametrize("teacher_kind", KINDS)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_klot_grad_features(n, m, d, teacher_kind, eps, normalised, dtype):
    K, K_t, pots, eps_t = klot_inputs(n, m, d, "features", teacher_kind, eps, dtype, normalised)
    f, g, f_t, g_t = pots
    gy, gtx = CPU.klot_grad_features(K, f, g, eps, K_t, f_t, g_t, eps_t)
    assert gy.dtype == dtype and gtx.dtype == dtype
    K64 = as_float64(K)
    exp_gy, exp_gtx = REF.klot_grad_features(
        K64, f.double(), g.double(), eps, as_float64(K_t), f_t.double(), g_t.double(), eps_t
    )
    # The products cancel (P − P*): errors are measured against (P + P*)/ε |y| and its transpose.
    p_sum, tol = plans_and_tolerance(K, K_t, pots, eps, eps_t, dtype)
    assert_close_scaled(gy, exp_gy, tol, scale=(p_sum @ K64.y.abs()).max().item() / eps)
    assert_close_scaled(gtx, exp_gtx, tol, scale=(p_sum.T @ K64.x.abs()).max().item() / eps)


def test_klot_grad_features_needs_student_features():
    K, K_t, (f, g, f_t, g_t), eps_t = klot_inputs(5, 6, 3, "dense", "dense", 0.05, torch.float64)
    with pytest.raises(ValueError):
        CPU.klot_grad_features(K, f, g, 0.05, K_t, f_t, g_t, eps_t)


@pytest.mark.parametrize("kind", KINDS)
def test_results_do_not_depend_on_thread_count(kind):
    """Large enough (≥ 2^16 entries per thread) that the kernels really split the work."""
    n, m = 601, 517
    K, K_t, (f, g, f_t, g_t), eps_t = klot_inputs(n, m, 40, kind, "features", 0.05, torch.float64)
    bias_rows = torch.randn(n, dtype=torch.float64) * 0.3
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out = [
                CPU.lse_rows(K, g, 0.05),
                CPU.lse_cols(K, bias_rows, 0.05),
                CPU.klot_value(K, f, g, 0.05, K_t, f_t, g_t, eps_t).reshape(1),
            ]
            if kind == "features":
                out += CPU.klot_grad_features(K, f, g, 0.05, K_t, f_t, g_t, eps_t)
            results.append(out)
    finally:
        torch.set_num_threads(previous)
    for out in results[1:]:
        for actual, expected in zip(out, results[0], strict=True):
            scale = expected.abs().max().item() + 1e-300
            assert_close_scaled(actual, expected, 1e-12, scale=scale)


def test_lse_no_overflow_at_small_eps_and_large_affinity():
    """|K| up to 1e3 at ε = 1e-3: arguments ~1e6 must stay finite after the max shift."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        K = torch.rand(40, 70, generator=gen, dtype=torch.float64) * 2e3 - 1e3
        K = Affinity.from_dense(K.to(dtype))
        bias = torch.zeros(70, dtype=dtype)
        out = CPU.lse_rows(K, bias, 1e-3)
        assert torch.isfinite(out).all()
        assert_close_scaled(out, REF.lse_rows(as_float64(K), bias.double(), 1e-3), TOL[dtype])
        out = CPU.lse_cols(K, torch.zeros(40, dtype=dtype), 1e-3)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fast_exp2_matches_numpy(dtype):
    info = np.finfo(dtype)
    x = np.concatenate(
        [
            np.linspace(-2000.0, 200.0, 400_001),
            np.linspace(-1.0, 1.0, 100_001),
            np.random.default_rng(0).uniform(-130.0, 130.0, 100_000),
            [-np.inf, -1e30, -1e6, 0.0, -0.5, 0.5],
        ]
    ).astype(dtype)
    out = _C.fast_exp2(x, 2)
    assert out.dtype == dtype
    assert np.isfinite(out).all() and (out >= 0).all()
    exact = np.exp2(x.astype(np.longdouble))
    normal = (exact >= 2 * info.tiny) & (exact <= info.max / 2)
    ulps = np.abs(out[normal] - exact[normal]) / (exact[normal] * info.eps)
    assert ulps.max() <= 2.0, f"max error {ulps.max():.2f} ulp"
    # Below the normal range the result underflows to 0 (or a value no larger than ~2^emin).
    tiny = exact < 2 * info.tiny
    assert (out[tiny] <= 4 * info.tiny).all()
    assert out[x == -np.inf].item() == 0.0
    # Above the range it saturates at a finite value instead of returning inf or garbage.
    huge = x >= info.maxexp
    assert (out[huge] >= info.max / 4).all()


class TestBatches(BatchChecks):
    backend = CPU


@pytest.mark.parametrize("kind", KINDS)
def test_batched_results_do_not_depend_on_thread_count(kind):
    """8 problems of 150 × 180: enough entries (≥ 2^16 per thread) for three threads."""
    B, n, m = 8, 150, 180
    x, y = features(B * n, B * m, 20, seed=5, unit=True)
    K = affinity(x.reshape(B, n, 20), y.reshape(B, m, 20), kind, torch.float64)
    gen = torch.Generator().manual_seed(6)
    bias_cols = torch.randn(B, m, generator=gen, dtype=torch.float64)
    bias_rows = torch.randn(B, n, generator=gen, dtype=torch.float64)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append((CPU.lse_rows(K, bias_cols, 0.05), CPU.lse_cols(K, bias_rows, 0.05)))
    finally:
        torch.set_num_threads(previous)
    for out in results[1:]:
        for actual, expected in zip(out, results[0], strict=True):
            assert_close_scaled(actual, expected, 1e-12, scale=expected.abs().max().item())


def test_half_step_input_errors():
    """The C++ half-steps read raw data addresses, so every operand is checked before the call."""
    x, y = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(2, 6, 3, dtype=torch.float64)
    K = Affinity.from_features(x, y)
    with pytest.raises(ValueError, match=r"bias must have shape \(2, 6\)"):
        CPU.lse_rows(K, torch.zeros(6, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match=r"log weights must have shape \(2, 6\)"):
        CPU.column_update(
            K, torch.zeros(2, 5, dtype=torch.float64), 0.1, torch.zeros(2, 5, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match=r"y must have shape \(2, 6, 3\)"):
        CPU.lse_rows(Affinity.from_features(x, y[:, :, :2]), torch.zeros(2, 6, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match=r"y must have shape"):
        CPU.lse_rows(Affinity.from_features(x, y[0]), torch.zeros(2, 6, dtype=torch.float64), 0.1)
    with pytest.raises(TypeError, match="bias must be a torch.Tensor"):
        CPU.lse_rows(K, np.zeros((2, 6)), 0.1)
    with pytest.raises(ValueError, match="float32 or float64"):
        CPU.lse_rows(Affinity.from_features(x.half(), y.half()), torch.zeros(2, 6), 0.1)
    meta = torch.empty(2, 6, device="meta")
    with pytest.raises(ValueError, match="needs CPU tensors"):
        CPU.lse_rows(Affinity.from_features(x.float(), y.float()), meta, 0.1)
    # a bias of another dtype or layout is converted, not rejected
    bias = torch.randn(6, 2).T
    expected = REF.lse_rows(K, bias.double(), 0.1)
    assert_close_scaled(CPU.lse_rows(K, bias, 0.1), expected, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [None, 3])
@pytest.mark.parametrize("eps", EPSILONS)
def test_scaled_half_steps_inside_a_solve(eps, batch, dtype):
    """Inside ``solving(K)`` the half-steps of a stored K run from E = exp K (scaling domain)
    while their sums stay far from underflow and fall back to the log domain otherwise: either
    way they match the reference, including −inf biases (padding) and a problem whose biases
    are all −inf. At ε = 0.5 the scaled path must be the one used; at ε = 0.005 in float32
    (K spans ~2900 in log2 units) it must have fallen back."""
    lead = () if batch is None else (batch,)
    gen = torch.Generator().manual_seed(11)
    n, m = 40, 70
    K = Affinity.from_dense((torch.randn(*lead, n, m, generator=gen, dtype=torch.float64) * 3).to(dtype))
    bias_cols = (torch.randn(*lead, m, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
    bias_rows = (torch.randn(*lead, n, generator=gen, dtype=torch.float64) * 0.3).to(dtype)
    bias_cols[..., :5] = -math.inf
    if batch is not None:
        bias_rows[1] = -math.inf
    log_w = torch.randn(*lead, n, generator=gen, dtype=torch.float64).to(dtype)
    K64 = as_float64(K)
    with CPU.solving(K):
        rows, cols = CPU.lse_rows(K, bias_cols, eps), CPU.lse_cols(K, bias_rows, eps)
        update = CPU.row_update(K, bias_cols, eps, log_w, 0.8)
        scaled = CPU._exponentiated[id(K)]
        used = scaled.trusted
    assert id(K) not in CPU._exponentiated  # E is freed with the solve
    if eps == 0.5:
        assert used
    if eps == 0.005 and dtype == torch.float32:
        assert not used
    expected_cols = REF.lse_cols(K64, bias_rows.double(), eps)
    if batch is not None:
        assert (cols[1] == -math.inf).all() and (expected_cols[1] == -math.inf).all()
        cols, expected_cols = cols[[0, 2]], expected_cols[[0, 2]]
    assert_close_scaled(rows, REF.lse_rows(K64, bias_cols.double(), eps), TOL[dtype])
    assert_close_scaled(cols, expected_cols, TOL[dtype])
    expected_update = 0.8 * eps * (log_w.double() - REF.lse_rows(K64, bias_cols.double(), eps))
    assert_close_scaled(update, expected_update, TOL[dtype])


def test_solves_on_a_stored_affinity_use_the_scaled_half_steps(monkeypatch):
    """A cpu solve on a stored K runs its iterations from E (counted here), and its result
    matches the reference backend's solve."""
    import sotalign

    calls = {"scaled": 0}
    kernels = cpu._HALF_STEPS[torch.float64]

    class Counting:
        def __getattr__(self, name):
            attribute = getattr(kernels, name)
            if not name.startswith("scaled_"):
                return attribute

            def counted(*args):
                calls["scaled"] += 1
                return attribute(*args)

            return counted

    monkeypatch.setitem(cpu._HALF_STEPS, torch.float64, Counting())
    x, y = features(60, 50, 8, seed=3, unit=True)
    K = (x @ y.T).double()
    ours = sotalign.sinkhorn_dense(K, 0.05, backend="cpu", n_iters=200, tol=None)
    reference = sotalign.sinkhorn_dense(K, 0.05, backend="reference", n_iters=200, tol=None)
    assert calls["scaled"] >= 400
    assert_close_scaled(ours.f, reference.f, 1e-10)
    assert_close_scaled(ours.g, reference.g, 1e-10)
