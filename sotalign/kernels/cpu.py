"""The ``cpu`` backend: the C++ kernels of ``sotalign._C`` (pybind11 + OpenMP, csrc/).

Every primitive is one streaming pass over K, in the log domain and max-shifted:

* ``lse_rows(K, b, ε)[i] = LSE_j (K_ij + b_j)/ε`` and
  ``lse_cols(K, a, ε)[j] = LSE_i (K_ij + a_i)/ε`` are computed in base 2 on ``t = K·s + b·s``
  (s = log2(e)/ε, one FMA per entry) with a vectorised exp2, keeping a running maximum and a
  rescaled sum per output.
* A feature affinity K = x yᵀ is recomputed tile by tile by a register-blocked GEMM and never
  stored (the backend is *online*); a stored K is read once per half-step.
* ``klot_value`` forms each term P*_ij (log P*_ij − log P_ij) and sums it in float64;
  ``klot_grad_features`` forms G = (P − P*)/ε one tile at a time and returns (G y, Gᵀ x).

Tensors are passed to C++ without copies (``.numpy()`` of contiguous CPU tensors) and the
thread count follows ``torch.get_num_threads()``.
"""

from __future__ import annotations

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


def _array(t: Tensor, dtype: torch.dtype) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor (a copy only if it needs a cast or compaction)."""
    if t.device.type != "cpu":
        raise ValueError(f"the 'cpu' backend needs CPU tensors, got one on {t.device}")
    return t.detach().to(dtype).contiguous().numpy()


def _features(K: Affinity, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    return _array(K.x, dtype), _array(K.y, dtype)


def _threads() -> int:
    return torch.get_num_threads()


class CpuBackend(Backend):
    name = "cpu"
    online = True

    def lse_rows(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        """out_i = LSE_j (K_ij + bias_j) / ε."""
        b = _array(bias, K.dtype)
        if K.is_dense:
            out = _C.lse_rows_dense(_array(K.dense, K.dtype), b, float(eps), _threads())
        else:
            out = _C.lse_rows_online(*_features(K, K.dtype), b, float(eps), _threads())
        return torch.from_numpy(out)

    def lse_cols(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        """out_j = LSE_i (K_ij + bias_i) / ε."""
        a = _array(bias, K.dtype)
        if K.is_dense:
            out = _C.lse_cols_dense(_array(K.dense, K.dtype), a, float(eps), _threads())
        else:
            out = _C.lse_cols_online(*_features(K, K.dtype), a, float(eps), _threads())
        return torch.from_numpy(out)

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
