"""The ``keops`` backend against the float64 reference backend, primitive by primitive and
end to end, on rectangular shapes, in float64 (1e-10) and float32 (2e-3).

KeOps compiles one kernel per formula, variable dimension and dtype (seconds each on CPU,
cached afterwards), so every test uses the same dimensions: d = 7 (student), 4 (teacher),
k = 3 (plan products).
"""

from __future__ import annotations

import pytest
import torch

import sotalign
from sotalign.kernels import Affinity, load_backend
from sotalign.kernels.keops import keops_error

from conftest import features, klot_problem, relative_error

# Probed once, on CPU (these tests use CPU tensors), in a subprocess with a timeout (see
# sotalign.kernels.keops.keops_error).
_ERROR = keops_error("cpu")
if _ERROR is not None:
    pytest.skip(f"KeOps cannot run here: {_ERROR}", allow_module_level=True)

D, D_TEACHER, K_COLUMNS = 7, 4, 3
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-3}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
SHAPES = pytest.mark.parametrize("n,m", [(37, 101), (64, 9)])


def unit(t):
    return torch.nn.functional.normalize(t, dim=1)


def state(n, m, dtype):
    """Features, teacher features and their fp64 reference potentials (50 iterations)."""
    x, y, x_teacher, y_teacher = [unit(t) for t in klot_problem(n, m, D, D_TEACHER, seed=n + m)]
    student = sotalign.sinkhorn(x, y, eps=0.05, n_iters=50, affinity="dot", backend="reference")
    teacher = sotalign.sinkhorn(x_teacher, y_teacher, eps=0.01, n_iters=50, affinity="dot",
                                backend="reference")
    tensors = [x, y, student.f, student.g, x_teacher, y_teacher, teacher.f, teacher.g]
    return [t.to(dtype) for t in tensors], tensors


@DTYPES
@SHAPES
def test_primitives_match_reference(n, m, dtype):
    (x, y, f, g, x_t, y_t, f_t, g_t), wide = state(n, m, dtype)
    x64, y64, f64, g64, x_t64, y_t64, f_t64, g_t64 = wide
    keops, reference = load_backend("keops"), load_backend("reference")
    K, K_t = Affinity.from_features(x, y), Affinity.from_features(x_t, y_t)
    K64, K_t64 = Affinity.from_features(x64, y64), Affinity.from_features(x_t64, y_t64)
    tolerance = TOLERANCE[dtype]

    for eps in (0.5, 0.01):
        # LSE values are O(1/ε): compare them in units of their scale
        rows = keops.lse_rows(K, g, eps)
        expected = reference.lse_rows(K64, g64, eps)
        assert rows.dtype == dtype and rows.shape == (n,)
        assert float((rows.double() - expected).abs().max() * eps) < tolerance
        cols = keops.lse_cols(K, f, eps)
        expected = reference.lse_cols(K64, f64, eps)
        assert cols.shape == (m,)
        assert float((cols.double() - expected).abs().max() * eps) < tolerance

    value = keops.klot_value(K, f, g, 0.05, K_t, f_t, g_t, 0.01)
    expected = reference.klot_value(K64, f64, g64, 0.05, K_t64, f_t64, g_t64, 0.01)
    assert value.dtype == dtype
    assert relative_error(value, expected) < tolerance

    grads = keops.klot_grad_features(K, f, g, 0.05, K_t, f_t, g_t, 0.01)
    expected = reference.klot_grad_features(K64, f64, g64, 0.05, K_t64, f_t64, g_t64, 0.01)
    for grad, grad_expected in zip(grads, expected):
        assert grad.dtype == dtype and grad.shape == grad_expected.shape
        assert relative_error(grad, grad_expected) < tolerance

    generator = torch.Generator().manual_seed(5)
    V = torch.randn(m, K_COLUMNS, generator=generator, dtype=torch.float64)
    U = torch.randn(n, K_COLUMNS, generator=generator, dtype=torch.float64)
    product = keops.plan_matmul(K, f, g, 0.05, V.to(dtype))
    assert relative_error(product, reference.plan_matmul(K64, f64, g64, 0.05, V)) < tolerance
    product = keops.plan_t_matmul(K, f, g, 0.05, U.to(dtype))
    assert relative_error(product, reference.plan_t_matmul(K64, f64, g64, 0.05, U)) < tolerance
    inner = keops.plan_inner(K, f, g, 0.05, K_t)
    assert relative_error(inner, reference.plan_inner(K64, f64, g64, 0.05, K_t64)) < tolerance


@DTYPES
@pytest.mark.parametrize("path", ["online", "dense"])
def test_sinkhorn_matches_reference(path, dtype):
    """The dense path hands a stored K to the keops backend, which delegates to chunked torch."""
    x, y = features(37, 101, D, seed=3)
    expected = sotalign.sinkhorn(x, y, eps=0.05, backend="reference")
    result = sotalign.sinkhorn(x.to(dtype), y.to(dtype), eps=0.05, backend="keops", path=path)
    assert (result.backend, result.path) == ("keops", path)
    assert relative_error(result.plan(), expected.plan()) < TOLERANCE[dtype]
    assert abs(result.marginal_error - expected.marginal_error) < 10 * TOLERANCE[dtype]
    V = torch.randn(101, K_COLUMNS, dtype=torch.float64)
    assert relative_error(result.apply(V.to(dtype)), expected.plan() @ V) < TOLERANCE[dtype]


@DTYPES
def test_klot_matches_reference(dtype):
    problem = klot_problem(37, 64, D, D_TEACHER, seed=4)
    options = dict(eps=0.05, eps_teacher=0.01, n_iters=60)

    def run(tensors, backend):
        x, y, x_teacher, y_teacher = tensors
        x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
        loss = sotalign.klot(x, y, x_teacher, y_teacher, backend=backend, **options)
        return (loss.detach(), *torch.autograd.grad(loss, (x, y)))

    expected = run(problem, "reference")
    result = run([t.to(dtype) for t in problem], "keops")
    for value, reference in zip(result, expected):
        assert value.dtype == dtype
        assert relative_error(value, reference) < TOLERANCE[dtype]


def test_dense_affinities_fall_back_to_chunked_torch():
    x, y, x_teacher, y_teacher = klot_problem(20, 30, D, D_TEACHER, seed=6)
    K, K_teacher = unit(x) @ unit(y).T, unit(x_teacher) @ unit(y_teacher).T

    def run(backend):
        K_in = K.clone().requires_grad_()
        loss = sotalign.klot_dense(K_in, K_teacher, backend=backend, n_iters=50)
        return loss.detach(), torch.autograd.grad(loss, K_in)[0]

    for value, expected in zip(run("keops"), run("reference")):
        assert relative_error(value, expected) < 1e-10
    result = sotalign.sinkhorn_dense(K, eps=0.05, backend="keops")
    expected = sotalign.sinkhorn_dense(K, eps=0.05, backend="reference")
    assert result.backend == "keops"
    assert relative_error(result.plan(), expected.plan()) < 1e-10


def test_keops_rejects_other_devices():
    keops = load_backend("keops")
    x = torch.empty(3, D, device="meta")
    with pytest.raises(ValueError, match="'keops' backend runs on CPU or CUDA tensors"):
        keops.lse_rows(Affinity.from_features(x, x), torch.empty(3, device="meta"), 0.1)
