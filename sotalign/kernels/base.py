"""The primitive interface every backend implements.

An :class:`Affinity` describes an n×m matrix K without necessarily storing it:

* ``Affinity.from_features(x, y)``: K = x yᵀ, recomputed tile by tile (the *online* form).
  Cosine affinities are passed with rows already L2-normalised.
* ``Affinity.from_dense(K)``: K is stored (the *dense* form).

With potentials f (n,), g (m,) in the units of K, the entropic plan is

    P_ij = exp((f_i + g_j + K_ij) / ε).

A backend provides four streaming primitives over such a K:

* ``lse_rows(K, bias, ε)[i] = LSE_j [(K_ij + bias_j) / ε]``      (the f half-step)
* ``lse_cols(K, bias, ε)[j] = LSE_i [(K_ij + bias_i) / ε]``      (the g half-step)
* ``klot_value(K, f, g, ε, K*, f*, g*, ε*) = Σ_ij P*_ij (log P*_ij − log P_ij)``
  accumulated in float64 (the terms cancel heavily at small ε).
* ``klot_grad_features(K=xyᵀ, f, g, ε, K*, f*, g*, ε*) = (G y, Gᵀ x)`` with
  ``G = (P − P*) / ε``, the exact KLOT gradient wrt K (SOTAlign, Thm. 5.1) pulled
  back to the student features. Never forms G whole on an online backend.

and ``klot_grad_dense(...) = G`` for a stored student K (the n×m input makes an n×m
gradient unavoidable there).

Inputs are float32 or float64 and contiguous; outputs have the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Affinity:
    """An n×m affinity matrix, stored (``dense``) or given by features (``x @ y.T``)."""

    x: Tensor | None = None
    y: Tensor | None = None
    dense: Tensor | None = None

    @staticmethod
    def from_features(x: Tensor, y: Tensor) -> "Affinity":
        return Affinity(x=x.contiguous(), y=y.contiguous())

    @staticmethod
    def from_dense(K: Tensor) -> "Affinity":
        return Affinity(dense=K.contiguous())

    @property
    def is_dense(self) -> bool:
        return self.dense is not None

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        return (self.x.shape[0], self.y.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.dense.dtype if self.dense is not None else self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.dense.device if self.dense is not None else self.x.device

    def materialize(self) -> "Affinity":
        """The dense form: K = x yᵀ computed once by the BLAS matmul."""
        if self.dense is not None:
            return self
        return Affinity.from_dense(self.x @ self.y.T)

    def rows(self, start: int, stop: int) -> Tensor:
        """The dense block K[start:stop, :] (for chunked backends)."""
        if self.dense is not None:
            return self.dense[start:stop]
        return self.x[start:stop] @ self.y.T


class Backend:
    """Base class of the kernel backends; see the module docstring for the maths."""

    name: str = "base"
    #: True when no primitive creates an n×m buffer for a feature affinity.
    online: bool = True

    def lse_rows(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        raise NotImplementedError

    def lse_cols(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        raise NotImplementedError

    def klot_value(self, K: Affinity, f: Tensor, g: Tensor, eps: float,
                   K_t: Affinity, f_t: Tensor, g_t: Tensor, eps_t: float) -> Tensor:
        raise NotImplementedError

    def klot_grad_features(self, K: Affinity, f: Tensor, g: Tensor, eps: float,
                           K_t: Affinity, f_t: Tensor, g_t: Tensor, eps_t: float
                           ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def klot_grad_dense(self, K: Affinity, f: Tensor, g: Tensor, eps: float,
                        K_t: Affinity, f_t: Tensor, g_t: Tensor, eps_t: float) -> Tensor:
        raise NotImplementedError
