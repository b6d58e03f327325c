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

  and the half-steps themselves, ``row_update`` (f = τ ε (log a − LSE_j[(K + g)/ε])) and
  ``column_update``, which default to these and which a backend may fuse into one pass.
  τ (``scale``) is 1 for an exact marginal and ρ/(ρ + ε) for a KL-relaxed one (unbalanced OT).
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

**Batches.** Every primitive but the KLOT ones also takes a batch of B independent problems:
features x (B, n, d) and y (B, m, d), or a stored K (B, n, m); biases, potentials and log
weights then carry the batch dimension first ((B, n) or (B, m)), as do the outputs ((B, n),
(B, m), (B, n, k) for plan products, (B,) for ``plan_inner``). ``K.batch`` is B, or None for
a single problem (2-D tensors, no batch dimension anywhere).

**Zero weights.** A bias or a log weight may be −inf (a row or column of weight zero, e.g.
padding a small problem in a batch). Such entries contribute exp(−inf) = 0: an LSE over only
−inf terms is −inf (never NaN), and a potential of −inf gives its row or column zero plan mass.

Inputs are float32 or float64 and contiguous; outputs have the input dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

#: Dot-product precisions; anything but fp32 is a Triton-only flag (docs/design.md §3).
PRECISIONS = ("fp32", "tf32x3", "fp16x3", "tf32", "fp16")
#: Size of one block of rows of K (or of P) that a blocked primitive holds at a time.
BLOCK_BYTES = 32 * 2**20


@dataclass(frozen=True)
class Affinity:
    """An n×m affinity matrix, stored (``dense``) or given by features (``x @ y.T``), or a
    batch of B of them (a leading batch dimension on every tensor).

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
        """(n, m): the shape of one problem's K."""
        if self.dense is not None:
            return (self.dense.shape[-2], self.dense.shape[-1])
        return (self.x.shape[-2], self.y.shape[-2])

    @property
    def batch(self) -> int | None:
        """The number of problems B, or None for one problem given without a batch dimension."""
        t = self.dense if self.dense is not None else self.x
        return t.shape[0] if t.dim() == 3 else None

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
        return Affinity.from_dense(fp32_matmul(self.x, self.y.mT))

    def rows(self, start: int, stop: int) -> Tensor:
        """The dense block K[..., start:stop, :] (for chunked backends)."""
        if self.dense is not None:
            return self.dense[..., start:stop, :]
        return self.x[..., start:stop, :] @ self.y.mT


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
    #: The device types the backend computes on (None: any torch device).
    device_types: tuple[str, ...] | None = None
    #: What to do about tensors on another device, appended to the error.
    device_hint: str = ""

    def check_device(self, device: torch.device) -> None:
        """The one check that this backend runs on ``device`` (a ``ValueError`` naming both)."""
        if self.device_types is not None and device.type not in self.device_types:
            kinds = " or ".join(kind.upper() for kind in self.device_types)
            raise ValueError(
                f"the {self.name!r} backend needs {kinds} tensors, got tensors on {device}{self.device_hint}"
            )

    def solving(self, K: Affinity) -> contextlib.AbstractContextManager:
        """The context of one Sinkhorn solve on K, in which a backend may keep state across
        its half-steps (the cpu backend: exp K of a stored K). None by default."""
        return contextlib.nullcontext()

    def lse_rows(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        raise NotImplementedError

    def lse_cols(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        raise NotImplementedError

    def row_update(self, K: Affinity, g: Tensor, eps: float, log_a: Tensor, scale: float = 1.0) -> Tensor:
        """The Sinkhorn row half-step f = τ ε (log a − LSE_j[(K + g)/ε]), τ = ``scale``
        (backends may fuse it)."""
        return (scale * eps) * (log_a - self.lse_rows(K, g, eps))

    def column_update(self, K: Affinity, f: Tensor, eps: float, log_b: Tensor, scale: float = 1.0) -> Tensor:
        """The column half-step g = τ ε (log b − LSE_i[(K + f)/ε])."""
        return (scale * eps) * (log_b - self.lse_cols(K, f, eps))

    # The KLOT primitives take the student (K, f, g, ε) and the teacher (K_t, f_t, g_t, ε_t).

    def klot_value(self, K: Affinity, f, g, eps: float, K_t: Affinity, f_t, g_t, eps_t: float) -> Tensor:
        raise NotImplementedError

    def klot_grad_features(
        self, K: Affinity, f, g, eps, K_t: Affinity, f_t, g_t, eps_t
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def klot_grad_dense(self, K: Affinity, f, g, eps: float, K_t: Affinity, f_t, g_t, eps_t: float) -> Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ plan products

    def plan_matmul(self, K: Affinity, f: Tensor, g: Tensor, eps: float, V: Tensor) -> Tensor:
        """P V with P_ij = exp((f_i + g_j + K_ij)/ε), one block of rows of P at a time."""
        check_plan_factor("V", V, K.shape[1], K)
        out = V.new_empty((*V.shape[:-2], K.shape[0], V.shape[-1]))
        for start, stop in row_blocks(K):
            out[..., start:stop, :] = plan_block(K, f, g, eps, start, stop) @ V
        return out

    def plan_t_matmul(self, K: Affinity, f: Tensor, g: Tensor, eps: float, U: Tensor) -> Tensor:
        """Pᵀ U, accumulated over blocks of rows of P."""
        check_plan_factor("U", U, K.shape[0], K)
        out = U.new_zeros((*U.shape[:-2], K.shape[1], U.shape[-1]))
        for start, stop in row_blocks(K):
            out += plan_block(K, f, g, eps, start, stop).mT @ U[..., start:stop, :]
        return out

    def plan_inner(self, K: Affinity, f: Tensor, g: Tensor, eps: float, K2: Affinity) -> Tensor:
        """Σ_ij P_ij K2_ij, each block summed in float64; returned in K's dtype."""
        check_plan_affinity(K, K2)
        total = torch.zeros(() if K.batch is None else (K.batch,), dtype=torch.float64, device=K.device)
        for start, stop in row_blocks(K):
            block = plan_block(K, f, g, eps, start, stop).mul_(K2.rows(start, stop))
            total += block.sum(dim=(-2, -1), dtype=torch.float64)
        return total.to(K.dtype)


def block_rows(K: Affinity) -> int:
    """Rows per block: as many as fit in ``BLOCK_BYTES`` for all the problems of a batch
    (at least one, at most n)."""
    n, m = K.shape
    return min(n, max(1, BLOCK_BYTES // ((K.batch or 1) * m * K.dtype.itemsize)))


def row_blocks(K: Affinity):
    """(start, stop) ranges of :func:`block_rows` rows covering K's rows."""
    step = block_rows(K)
    for start in range(0, K.shape[0], step):
        yield start, min(start + step, K.shape[0])


def plan_block(K: Affinity, f: Tensor, g: Tensor, eps: float, start: int, stop: int) -> Tensor:
    """P[..., start:stop, :] = exp((f_i + g_j + K_ij)/ε) for those rows (a new block: a stored
    K's rows are views, so the first step must not be in place)."""
    block = (K.rows(start, stop) + f[..., start:stop, None]).add_(g[..., None, :])
    return block.div_(eps).exp_()


def check_plan_factor(name: str, V: Tensor, rows: int, K: Affinity) -> None:
    """The right-hand factor of a plan product: a (rows × k) tensor like K ((B, rows, k) for a
    batch of B problems)."""
    if not isinstance(V, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(V).__name__}")
    expected = (rows,) if K.batch is None else (K.batch, rows)
    if V.dim() != len(expected) + 1 or tuple(V.shape[:-1]) != expected:
        raise ValueError(
            f"{name} must have shape ({', '.join(map(str, expected))}, k) for an affinity of "
            f"shape {K.shape}{'' if K.batch is None else f' in a batch of {K.batch}'}, got {tuple(V.shape)}"
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
    if K2.shape != K.shape or K2.batch != K.batch or K2.dtype != K.dtype or K2.device != K.device:
        raise ValueError(
            f"K2 must match K (shape {K.shape}, {K.dtype} on {K.device}), got shape "
            f"{K2.shape}, {K2.dtype} on {K2.device}"
        )
