"""The ``cpu`` backend: the C++ kernels of ``sotalign._C`` (pybind11 + OpenMP, csrc/).

Every primitive is one streaming pass over K, in the log domain and max-shifted:

* ``lse_rows(K, b, ε)[i] = LSE_j (K_ij + b_j)/ε`` and
  ``lse_cols(K, a, ε)[j] = LSE_i (K_ij + a_i)/ε`` are computed in base 2 on ``t = K·s + b·s``
  (s = log2(e)/ε, one FMA per entry) with a vectorised exp2, keeping a running maximum and a
  rescaled sum per output.
* A feature affinity K = x yᵀ is recomputed tile by tile by a register-blocked GEMM and never
  stored (the backend is *online*); a stored K is read once per half-step.
* Within a solve on a stored K (:meth:`CpuBackend.solving`), the half-steps run in the scaling
  domain: E = 2^(K·s − max K·s) is formed once per ε (one n×m buffer more for the solve), and
  each half-step is a matrix-vector product with w = 2^(b·s − max b·s), one multiply-add per
  entry instead of an exp2 (csrc/scaled.hpp). It is exact up to rounding while every sum is
  far above the underflow threshold; when one is not, the kernel says so and that half-step,
  and the rest of the solve at that ε, run in the log domain.
* A batch of problems is one call and one OpenMP region, parallel over (problem, block of rows).
* ``row_update`` and ``column_update`` are fused: the kernel writes τ ε (log a − LSE) itself.
* ``klot_value`` forms each term P*_ij (log P*_ij − log P_ij) and sums it in float64;
  ``klot_grad_features`` forms G = (P − P*)/ε one tile at a time and returns (G y, Gᵀ x).

Tensors are passed to C++ without copies and the thread count follows
``torch.get_num_threads()``. The half-steps, called hundreds of times per solve, pass the
tensors' data addresses after checking them here: converting a tensor to a numpy array costs
more than a whole half-step of a small problem.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from .base import Affinity, Backend

try:
    from sotalign import _C
except ImportError as error:  # extension not built: the backend reports itself unavailable
    _C = None
    AVAILABLE: bool = False
    IMPORT_ERROR: str | None = str(error)
else:
    AVAILABLE = True
    IMPORT_ERROR = None

#: The C++ half-steps for each dtype (submodules of the extension).
_HALF_STEPS = {} if _C is None else {torch.float32: _C.float32, torch.float64: _C.float64}


def _array(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor (a copy only if it needs a cast or compaction)."""
    CpuBackend().check_device(t.device)
    return t.detach().to(dtype).contiguous().numpy()


def _features(K: Affinity, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    return _array(K.x, dtype), _array(K.y, dtype)


def _threads() -> int:
    return torch.get_num_threads()


def _operand(name: str, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``t`` as a contiguous CPU tensor of ``dtype`` (cast or compacted only if needed), after
    checking its shape: the C++ half-steps read it through its data address."""
    if isinstance(t, Tensor) and t.is_cpu and t.shape == shape:  # the fast path of every call
        if t.dtype != dtype:
            t = t.to(dtype)
        return t if t.is_contiguous() else t.contiguous()
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    CpuBackend().check_device(t.device)
    raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


class _Exponentiated:
    """E = 2^(K·s − shift) of one stored K (s = log2(e)/ε, shift = max K·s per problem) at the
    latest ε of a solve, and whether the scaled half-steps can still be trusted at that ε."""

    def __init__(self, K: Affinity):
        self.K = K
        self.eps: float | None = None
        self.trusted = False
        self.E = torch.empty_like(K.dense)
        self.shift = K.dense.new_empty(K.batch or 1)

    def at(self, eps: float) -> bool:
        """Form E at ``eps`` (unless it is the latest ε); True when it may be used."""
        if eps != self.eps:
            n, m = self.K.shape
            kernels = _HALF_STEPS[self.K.dtype]
            kernels.exponentiate(
                self.K.dense.data_ptr(),
                self.K.batch or 1,
                n,
                m,
                float(eps),
                self.E.data_ptr(),
                self.shift.data_ptr(),
                torch.get_num_threads(),
            )
            self.eps, self.trusted = eps, True
        return self.trusted


def _half_step(
    K: Affinity,
    bias: Tensor,
    eps: float,
    rows: bool,
    log_w: Tensor | None,
    coef: float,
    scaled: _Exponentiated | None = None,
) -> Tensor:
    """LSE over j (``rows``) or over i of (K + bias)/ε for every problem of K, or
    coef · (log_w − LSE) when log weights are given: one C++ call for the whole batch, from
    ``scaled`` (E of this K) while it can be trusted, else in the log domain."""
    dtype, batch = K.dtype, K.batch
    kernels = _HALF_STEPS.get(dtype)
    if kernels is None:
        raise ValueError(f"the 'cpu' backend computes in float32 or float64, got {dtype}")
    n, m = K.shape
    lead = () if batch is None else (batch,)
    size, other = (n, m) if rows else (m, n)
    bias = _operand("bias", bias, (*lead, other), dtype)
    log_w = None if log_w is None else _operand("log weights", log_w, (*lead, size), dtype)
    out = torch.empty((*lead, size), dtype=dtype)
    tail = (
        bias.data_ptr(),
        float(eps),
        0 if log_w is None else log_w.data_ptr(),
        float(coef),
        out.data_ptr(),
        torch.get_num_threads(),
    )
    if scaled is not None and scaled.at(eps):
        step = kernels.scaled_rows if rows else kernels.scaled_cols
        if step(scaled.E.data_ptr(), scaled.shift.data_ptr(), batch or 1, n, m, *tail):
            return out
        scaled.trusted = False  # a sum fell near the underflow threshold: the log domain decides
    if K.is_dense:
        dense = _operand("K", K.dense, (*lead, n, m), dtype)
        step = kernels.lse_rows_dense if rows else kernels.lse_cols_dense
        step(dense.data_ptr(), batch or 1, n, m, *tail)
    else:
        d = K.x.shape[-1]
        x = _operand("x", K.x, (*lead, n, d), dtype)
        y = _operand("y", K.y, (*lead, m, d), dtype)
        step = kernels.lse_rows_online if rows else kernels.lse_cols_online
        step(x.data_ptr(), y.data_ptr(), batch or 1, n, m, d, *tail)
    return out


class CpuBackend(Backend):
    name = "cpu"
    online = True
    device_types = ("cpu",)

    def __init__(self) -> None:
        #: E of the stored K of each solve in progress, by id(K).
        self._exponentiated: dict[int, _Exponentiated] = {}

    @contextlib.contextmanager
    def solving(self, K: Affinity) -> Iterator[None]:
        """Half-steps on a stored float K run in the scaling domain during the solve (see the
        module docstring); E is freed when it ends."""
        usable = K.is_dense and K.dtype in _HALF_STEPS and K.dense.is_cpu and K.dense.is_contiguous()
        if not usable or id(K) in self._exponentiated:
            yield
            return
        self._exponentiated[id(K)] = _Exponentiated(K)
        try:
            yield
        finally:
            del self._exponentiated[id(K)]

    def _step(
        self, K: Affinity, bias: Tensor, eps: float, rows: bool, log_w: Tensor | None, coef: float
    ) -> Tensor:
        # the entry holds K, so no other object can have its id during the solve
        return _half_step(K, bias, eps, rows, log_w, coef, self._exponentiated.get(id(K)))

    def lse_rows(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        """out_i = LSE_j (K_ij + bias_j) / ε (per problem of a batch)."""
        return self._step(K, bias, eps, rows=True, log_w=None, coef=0.0)

    def lse_cols(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        """out_j = LSE_i (K_ij + bias_i) / ε (per problem of a batch)."""
        return self._step(K, bias, eps, rows=False, log_w=None, coef=0.0)

    def row_update(self, K: Affinity, g: Tensor, eps: float, log_a: Tensor, scale: float = 1.0) -> Tensor:
        """f = τ ε (log a − LSE_j[(K + g)/ε]), fused into the kernel."""
        return self._step(K, g, eps, rows=True, log_w=log_a, coef=scale * eps)

    def column_update(self, K: Affinity, f: Tensor, eps: float, log_b: Tensor, scale: float = 1.0) -> Tensor:
        """g = τ ε (log b − LSE_i[(K + f)/ε]), fused into the kernel."""
        return self._step(K, f, eps, rows=False, log_w=log_b, coef=scale * eps)

    def klot_value(self, K, f, g, eps, K_t, f_t, g_t, eps_t) -> Tensor:
        """Σ_ij P*_ij (log P*_ij − log P_ij), each term formed and summed in float64, with
        log P_ij = (f_i + g_j + K_ij)/ε and log P*_ij = (f*_i + g*_j + K*_ij)/ε*."""
        dtype = K.dtype
        student = [_array(f, dtype), _array(g, dtype), float(eps)]
        teacher = [_array(f_t, dtype), _array(g_t, dtype), float(eps_t), _threads()]
        if K.is_dense:
            # K is stored already, so storing K* as well costs no more than the input.
            K_dense = _array(K_t.materialize().dense, dtype)
            value = _C.klot_value_dense(_array(K.dense, dtype), *student, K_dense, *teacher)
        elif K_t.is_dense:
            value = _C.klot_value_online_dense_teacher(
                *_features(K, dtype), *student, _array(K_t.dense, dtype), *teacher
            )
        else:
            value = _C.klot_value_online(*_features(K, dtype), *student, *_features(K_t, dtype), *teacher)
        return torch.tensor(value, dtype=dtype)

    def klot_grad_features(self, K, f, g, eps, K_t, f_t, g_t, eps_t) -> tuple[Tensor, Tensor]:
        """(G y, Gᵀ x) for the student K = x yᵀ, with G = (P − P*)/ε formed one tile at a
        time; the teacher K* may be stored or given by its own features (any d)."""
        if K.x is None:
            raise ValueError("klot_grad_features needs the student affinity as features (x, y)")
        dtype = K.dtype
        student = [*_features(K, dtype), _array(f, dtype), _array(g, dtype), float(eps)]
        teacher = [_array(f_t, dtype), _array(g_t, dtype), float(eps_t), _threads()]
        if K_t.is_dense:
            K_dense = _array(K_t.dense, dtype)
            gy, gtx = _C.klot_grad_online_dense_teacher(*student, K_dense, *teacher)
        else:
            gy, gtx = _C.klot_grad_online(*student, *_features(K_t, dtype), *teacher)
        return torch.from_numpy(gy), torch.from_numpy(gtx)

    def klot_grad_dense(self, K, f, g, eps, K_t, f_t, g_t, eps_t) -> Tensor:
        """G = (P − P*)/ε as an n×m tensor (both affinities are materialised)."""
        dtype = K.dtype
        G = _C.klot_grad_dense(
            _array(K.materialize().dense, dtype),
            _array(f, dtype),
            _array(g, dtype),
            float(eps),
            _array(K_t.materialize().dense, dtype),
            _array(f_t, dtype),
            _array(g_t, dtype),
            float(eps_t),
            _threads(),
        )
        return torch.from_numpy(G)
