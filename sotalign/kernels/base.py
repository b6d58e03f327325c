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

  and the half-steps themselves, ``row_update`` (f = ε log a − ε LSE_j[(K + g)/ε]) and
  ``column_update``, which default to these and which a backend may fuse into one pass.
* ``klot_value(K, f, g, ε, K*, f*, g*, ε*) = Σ_ij P*_ij (log P*_ij − log P_ij)``
  accumulated in float64 (the terms cancel heavily at small ε).
* ``klot_grad_features(K=xyᵀ, f, g, ε, K*, f*, g*, ε*) = (G y, Gᵀ x)`` with
  ``G = (P − P*) / ε``, the exact KLOT gradient wrt K (SOTAlign, Thm. 5.1) pulled
  back to the student features. Never forms G whole on an online backend.

and ``klot_grad_dense(...) = G`` for a stored student K (the n×m input makes an n×m
gradient unavoidable there).

Three plan products apply P without storing it (attention's ``P·V``):

* ``plan_matmul(K, f, g, ε, V) = P V``            (V: m×k → n×k)
* ``plan_t_matmul(K, f, g, ε, U) = Pᵀ U``         (U: n×k → m×k)
* ``plan_inner(K, f, g, ε, K2) = Σ_ij P_ij K2_ij`` (K2 another n×m affinity), summed in float64.

:class:`Backend` implements them generically over blocks of rows ``K.rows(start, stop)``
(O(block) memory); backends with fused kernels override them.

Inputs are float32 or float64 and contiguous; outputs have the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Size of one block of rows of K (or of P) that a blocked primitive holds at a time.
BLOCK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Affinity:
    """An n×m affinity matrix, stored (``dense``) or given by features (``x @ y.T``).

    Exactly one form is set, the other fields are None. They are typed as tensors: every
    primitive reads the form it was given (``is_dense``), which a type checker cannot follow.
    """

    x: Tensor = None  # type: ignore[assignment]
    y: Tensor = None  # type: ignore[assignment]
    dense: Tensor = None  # type: ignore[assignment]

    @staticmethod
    def from_features(x: Tensor, y: Tensor) -> Affinity:
        return Affinity(x=x.contiguous(), y=y.contiguous())

    @staticmethod
    def from_dense(K: Tensor) -> Affinity:
        return Affinity(dense=K.contiguous())

    @property
    def is_dense(self) -> bool:
        return self.dense is not None

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return (self.dense.shape[0], self.dense.shape[1])
        return (self.x.shape[0], self.y.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.dense.dtype if self.dense is not None else self.x.dtype

    @property
    def device(self) -> torch.device:
        return self.dense.device if self.dense is not None else self.x.device

    def materialize(self) -> Affinity:
        """The dense form: K = x yᵀ computed once by the BLAS matmul, in full fp32."""
        if self.dense is not None:
            return self
        return Affinity.from_dense(fp32_matmul(self.x, self.y.T))

    def rows(self, start: int, stop: int) -> Tensor:
        """The dense block K[start:stop, :] (for chunked backends)."""
        if self.dense is not None:
            return self.dense[start:stop]
        return self.x[start:stop] @ self.y.T


def fp32_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b at full fp32 accuracy even when the caller allowed TF32 matmuls
    (``torch.set_float32_matmul_precision("high")``, common in training scripts): a stored K
    is read at ε = 0.01, where TF32's 10-bit operands would change the plan by ~1e-3."""
    previous = torch.get_float32_matmul_precision()
    if previous == "highest" or a.dtype != torch.float32:
        return a @ b
    torch.set_float32_matmul_precision("highest")
    try:
        return a @ b
    finally:
        torch.set_float32_matmul_precision(previous)


class Backend:
    """Base class of the kernel backends; see the module docstring for the maths."""

    name: str = "base"
    #: True when no primitive creates an n×m buffer for a feature affinity.
    online: bool = True

    def lse_rows(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        raise NotImplementedError

    def lse_cols(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        raise NotImplementedError

    def row_update(self, K: Affinity, g: Tensor, eps: float, log_a: Tensor) -> Tensor:
        """The Sinkhorn row half-step f = ε log a − ε LSE_j[(K + g)/ε] (backends may fuse it)."""
        return eps * (log_a - self.lse_rows(K, g, eps))

    def column_update(self, K: Affinity, f: Tensor, eps: float, log_b: Tensor) -> Tensor:
        """The column half-step g = ε log b − ε LSE_i[(K + f)/ε]."""
        return eps * (log_b - self.lse_cols(K, f, eps))

    def klot_value(
        self,
        K: Affinity,
        f: Tensor,
        g: Tensor,
        eps: float,
        K_t: Affinity,
        f_t: Tensor,
        g_t: Tensor,
        eps_t: float,
    ) -> Tensor:
        raise NotImplementedError

    def klot_grad_features(
        self,
        K: Affinity,
        f: Tensor,
        g: Tensor,
        eps: float,
        K_t: Affinity,
        f_t: Tensor,
        g_t: Tensor,
        eps_t: float,
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def klot_grad_dense(
        self,
        K: Affinity,
        f: Tensor,
        g: Tensor,
        eps: float,
        K_t: Affinity,
        f_t: Tensor,
        g_t: Tensor,
        eps_t: float,
    ) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ plan products

    def plan_matmul(self, K: Affinity, f: Tensor, g: Tensor, eps: float, V: Tensor) -> Tensor:
        """P V with P_ij = exp((f_i + g_j + K_ij)/ε), one block of rows of P at a time."""
        check_plan_factor("V", V, K.shape[1], K)
        out = torch.empty(K.shape[0], V.shape[1], dtype=K.dtype, device=K.device)
        for start, stop in row_blocks(K):
            out[start:stop] = plan_block(K, f, g, eps, start, stop) @ V
        return out

    def plan_t_matmul(self, K: Affinity, f: Tensor, g: Tensor, eps: float, U: Tensor) -> Tensor:
        """Pᵀ U, accumulated over blocks of rows of P."""
        check_plan_factor("U", U, K.shape[0], K)
        out = torch.zeros(K.shape[1], U.shape[1], dtype=K.dtype, device=K.device)
        for start, stop in row_blocks(K):
            out.addmm_(plan_block(K, f, g, eps, start, stop).T, U[start:stop])
        return out

    def plan_inner(self, K: Affinity, f: Tensor, g: Tensor, eps: float, K2: Affinity) -> Tensor:
        """Σ_ij P_ij K2_ij, each block summed in float64; returned in K's dtype."""
        check_plan_affinity(K, K2)
        total = torch.zeros((), dtype=torch.float64, device=K.device)
        for start, stop in row_blocks(K):
            block = plan_block(K, f, g, eps, start, stop).mul_(K2.rows(start, stop))
            total += block.sum(dtype=torch.float64)
        return total.to(K.dtype)


def block_rows(K: Affinity) -> int:
    """Rows per block: as many as fit in ``BLOCK_BYTES`` (at least one, at most n)."""
    n, m = K.shape
    return min(n, max(1, BLOCK_BYTES // (m * K.dtype.itemsize)))


def row_blocks(K: Affinity):
    """(start, stop) ranges of :func:`block_rows` rows covering K's rows."""
    step = block_rows(K)
    for start in range(0, K.shape[0], step):
        yield start, min(start + step, K.shape[0])


def plan_block(K: Affinity, f: Tensor, g: Tensor, eps: float, start: int, stop: int) -> Tensor:
    """P[start:stop] = exp((f_i + g_j + K_ij)/ε) for those rows (a new block: a stored K's
    rows are views, so the first step must not be in place)."""
    block = (K.rows(start, stop) + f[start:stop, None]).add_(g[None, :])
    return block.div_(eps).exp_()


def check_plan_factor(name: str, V: Tensor, rows: int, K: Affinity) -> None:
    """The right-hand factor of a plan product: a (rows × k) tensor like K."""
    if not isinstance(V, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(V).__name__}")
    if V.dim() != 2 or V.shape[0] != rows:
        raise ValueError(
            f"{name} must have shape ({rows}, k) for an affinity of shape {K.shape}, got {tuple(V.shape)}"
        )
    if V.dtype != K.dtype or V.device != K.device:
        raise ValueError(
            f"{name} must match the affinity's dtype and device ({K.dtype} on "
            f"{K.device}), got {V.dtype} on {V.device}"
        )


def check_plan_affinity(K: Affinity, K2: Affinity) -> None:
    """The second affinity of ``plan_inner``: same shape, dtype and device as K."""
    if not isinstance(K2, Affinity):
        raise TypeError(f"K2 must be an Affinity, got {type(K2).__name__}")
    if K2.shape != K.shape or K2.dtype != K.dtype or K2.device != K.device:
        raise ValueError(
            f"K2 must match K (shape {K.shape}, {K.dtype} on {K.device}), got shape "
            f"{K2.shape}, {K2.dtype} on {K2.device}"
        )
