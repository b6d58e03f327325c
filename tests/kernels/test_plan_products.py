"""The plan products of the Backend interface (P V, Pᵀ U, Σ P∘K2) on the CPU backends.

The ``reference`` oracle is checked against identities that use other primitives (the
marginals of P from ``lse_rows``/``lse_cols``, and the transport cost as an explicit double
sum), and the generic blocked versions of :class:`~sotalign.kernels.base.Backend` (used by
``torch`` and ``cpu``) against the reference in float64 and float32, across block borders.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import features, relative_error

import sotalign
from sotalign.kernels import base, load_backend
from sotalign.kernels.base import Affinity
from sotalign.kernels.reference import ReferenceBackend

REFERENCE = ReferenceBackend()
BACKENDS = [name for name in ("torch", "cpu") if name in sotalign.available_backends()]
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-5}


def plan_problem(n, m, d, dtype=torch.float64, seed=0):
    x, y = features(n, m, d, seed=seed, unit=True)
    generator = torch.Generator().manual_seed(seed + 1)
    # potentials of the size Sinkhorn produces (the products never assume a solved plan)
    f = -0.6 - 0.05 * torch.rand(n, generator=generator, dtype=torch.float64)
    g = -0.4 - 0.05 * torch.rand(m, generator=generator, dtype=torch.float64)
    return [t.to(dtype) for t in (x, y, f, g)]


def test_reference_products_match_marginals_and_explicit_sums():
    x, y, f, g = plan_problem(13, 9, 4)
    K = Affinity.from_features(x, y)
    eps = 0.1
    # P 1 and Pᵀ 1 are the marginals exp(f/ε + LSE_j (K + g)/ε), exp(g/ε + LSE_i (K + f)/ε)
    rows = torch.exp(f / eps + REFERENCE.lse_rows(K, g, eps))
    cols = torch.exp(g / eps + REFERENCE.lse_cols(K, f, eps))
    assert (
        relative_error(REFERENCE.plan_matmul(K, f, g, eps, torch.ones(9, 1, dtype=torch.float64))[:, 0], rows)
        < 1e-13
    )
    assert (
        relative_error(
            REFERENCE.plan_t_matmul(K, f, g, eps, torch.ones(13, 1, dtype=torch.float64))[:, 0], cols
        )
        < 1e-13
    )
    # Σ_ij P_ij K2_ij written out entry by entry
    K2 = Affinity.from_features(x.flip(1)[:, :2], y[:, 1:3])
    expected = 0.0
    for i in range(13):
        for j in range(9):
            k = float(x[i] @ y[j])
            expected += math.exp((float(f[i]) + float(g[j]) + k) / eps) * float(K2.x[i] @ K2.y[j])
    assert abs(float(REFERENCE.plan_inner(K, f, g, eps, K2)) - expected) < 1e-12 * abs(expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("dense", [False, True], ids=["online", "dense"])
@pytest.mark.parametrize("name", BACKENDS)
def test_generic_products_match_reference(name, dense, dtype, monkeypatch):
    # blocks of 7 rows of P: several blocks and a ragged last one
    monkeypatch.setattr(base, "BLOCK_BYTES", 7 * 23 * dtype.itemsize)
    x, y, f, g = plan_problem(40, 23, 6, seed=2)
    K64 = Affinity.from_features(x, y)
    K2_64 = Affinity.from_features(x.flip(1)[:, :3], y[:, 2:5])
    V, U = torch.randn(23, 5, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64)
    eps = 0.05
    expected = (
        REFERENCE.plan_matmul(K64, f, g, eps, V),
        REFERENCE.plan_t_matmul(K64, f, g, eps, U),
        REFERENCE.plan_inner(K64, f, g, eps, K2_64),
    )

    K = Affinity.from_features(x.to(dtype), y.to(dtype))
    K2 = Affinity.from_features(K2_64.x.to(dtype), K2_64.y.to(dtype))
    if dense:
        K, K2 = K.materialize(), K2.materialize()
    stored = K.dense.clone() if dense else None
    backend = load_backend(name)
    f, g = f.to(dtype), g.to(dtype)
    result = (
        backend.plan_matmul(K, f, g, eps, V.to(dtype)),
        backend.plan_t_matmul(K, f, g, eps, U.to(dtype)),
        backend.plan_inner(K, f, g, eps, K2),
    )
    for value, reference in zip(result, expected, strict=True):
        assert value.dtype == dtype
        assert relative_error(value, reference) < TOLERANCE[dtype]
    if dense:
        assert torch.equal(K.dense, stored), "a plan product modified the stored K"


@pytest.mark.parametrize("name", ["reference", *BACKENDS])
def test_products_reject_bad_operands(name):
    backend = load_backend(name)
    x, y, f, g = plan_problem(5, 4, 3)
    K = Affinity.from_features(x, y)
    with pytest.raises(ValueError, match="V must have shape"):
        backend.plan_matmul(K, f, g, 0.1, torch.ones(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="U must have shape"):
        backend.plan_t_matmul(K, f, g, 0.1, torch.ones(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="dtype"):
        backend.plan_matmul(K, f, g, 0.1, torch.ones(4, 2, dtype=torch.float32))
    with pytest.raises(TypeError, match="V must be a torch.Tensor"):
        backend.plan_matmul(K, f, g, 0.1, [[1.0]])
    with pytest.raises(ValueError, match="K2 must match"):
        backend.plan_inner(K, f, g, 0.1, Affinity.from_features(y, x))
    with pytest.raises(TypeError, match="K2 must be an Affinity"):
        backend.plan_inner(K, f, g, 0.1, x @ y.T)
