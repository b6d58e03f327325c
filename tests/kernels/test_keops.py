"""The ``keops`` backend end to end (Sinkhorn and KLOT through the public API, both paths)
against the float64 reference, in float64 (1e-10) and float32 (2e-3), its fallbacks, and its
batches and −inf potentials (the shared checks of ``batch_cases``, on features: a stored K
goes to the chunked torch backend, tested on its own); its primitives are checked one by one
in ``test_conformance.py``.

KeOps compiles one kernel per formula, variable dimension and dtype (seconds each on CPU,
cached afterwards), so every test uses the same dimensions: d = 7 (student), 4 (teacher),
k = 3 (plan products).
"""

from __future__ import annotations

import pytest
import torch
from batch_cases import BatchChecks
from conftest import features, klot_problem, relative_error

import sotalign
from sotalign.kernels import Affinity, load_backend
from sotalign.kernels.keops import keops_error

# Probed once, on CPU (these tests use CPU tensors), in a subprocess with a timeout (see
# sotalign.kernels.keops.keops_error).
_ERROR = keops_error("cpu")
if _ERROR is not None:
    pytest.skip(f"KeOps cannot run here: {_ERROR}", allow_module_level=True)

D, D_TEACHER, K_COLUMNS = 7, 4, 3
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-3}
DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])


def unit(t):
    return torch.nn.functional.normalize(t, dim=1)


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
    for value, reference in zip(result, expected, strict=True):
        assert value.dtype == dtype
        assert relative_error(value, reference) < TOLERANCE[dtype]


def test_dense_affinities_fall_back_to_chunked_torch():
    x, y, x_teacher, y_teacher = klot_problem(20, 30, D, D_TEACHER, seed=6)
    K, K_teacher = unit(x) @ unit(y).T, unit(x_teacher) @ unit(y_teacher).T

    def run(backend):
        K_in = K.clone().requires_grad_()
        loss = sotalign.klot_dense(K_in, K_teacher, backend=backend, n_iters=50)
        return loss.detach(), torch.autograd.grad(loss, K_in)[0]

    for value, expected in zip(run("keops"), run("reference"), strict=True):
        assert relative_error(value, expected) < 1e-10
    result = sotalign.sinkhorn_dense(K, eps=0.05, backend="keops")
    expected = sotalign.sinkhorn_dense(K, eps=0.05, backend="reference")
    assert result.backend == "keops"
    assert relative_error(result.plan(), expected.plan()) < 1e-10


def test_keops_rejects_other_devices():
    keops = load_backend("keops")
    x = torch.empty(3, D, device="meta")
    with pytest.raises(ValueError, match="the 'keops' backend needs CPU or CUDA tensors"):
        keops.lse_rows(Affinity.from_features(x, x), torch.empty(3, device="meta"), 0.1)


class TestBatches(BatchChecks):
    backend = load_backend("keops")
    paths = ("online",)
