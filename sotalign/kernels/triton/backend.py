r"""``TritonBackend``: the host side of the Triton kernels (checks, scaling, launch grids).

Launch grids (BLOCK_* come from the autotuned config):

* half-steps, weighted sums: ``(cdiv(rows, BLOCK_M), splits)``, one program per block of
  rows and column split;
* plan products: ``(cdiv(rows, BLOCK_M), splits, cdiv(k, BLOCK_K))``;
* the dense gradient G: ``(cdiv(n, BLOCK_M), cdiv(m, BLOCK_N))``, one program per tile.

Column reductions run the row kernels on the transposed operand (features x ↔ y swapped, or
the strides of a stored K swapped), and Gᵀ x is the G y kernel on the transposed problem.

**Split reduction** (flash-decoding). A half-step has only cdiv(n, BLOCK_M) row blocks;
when that is below the number of SMs (n small, m large) most of the GPU would idle, so the
columns are shared out over ``splits`` programs per row block, each writing a partial
result (an LSE, a partial sum, a partial product) that the host combines (``logsumexp`` or
``sum`` over the splits). With r = cdiv(n, 64) row blocks at the smallest BLOCK_M:

    splits = 1                                  if r ≥ #SMs,
             min(cdiv(2·#SMs, r), m // 512)     otherwise (≥ 1),

i.e. about two programs per SM, each still reducing at least 512 columns. The SM count is
``torch.cuda.get_device_properties(device).multi_processor_count``; off GPU (the
interpreter) the default is 1, and ``TritonBackend(splits=k)`` forces k (tests use it).

**Precision** (``precision=``, float32 inputs; float64 inputs always use fp64 dots): the
flag sets how the affinity tiles x yᵀ are computed, the bulk of the work:
``"fp32"`` exact fp32 FMA dots (``input_precision="ieee"``), ``"tf32x3"`` three tensor-core
tf32 dots per product (each operand split as hi + lo, hi·hi + hi·lo + lo·hi: close to fp32
accuracy at tensor-core speed), ``"tf32"`` tensor-core tf32 dots (operands keep 10 mantissa
bits), ``"fp16"`` operands rounded to fp16, products
accumulated in fp32. Potentials, biases, exponents and accumulators are fp32 in every mode
(never bf16: DESIGN.md §3), and the products with the plan (P V, G y) always use exact fp32
dots: they are a small part of a step, and P's tiny entries would underflow in fp16.
``benchmarks/precision_error.py`` measures the error of each flag against float64; the
measured errors are in benchmarks/results/*-precision.md.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ..base import Affinity, Backend, check_plan_affinity, check_plan_factor
from .lse import lse_kernel
from .plan import plan_difference_kernel, plan_product_kernel, plan_sum_kernel
from .tiles import INTERPRETING, tile_configs

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
PRECISIONS = ("fp32", "tf32x3", "tf32", "fp16")
#: The fewest columns one split of a reduction should cover (see the module docstring).
MIN_SPLIT_COLUMNS = 512
#: Row-block size that the split heuristic assumes (the smallest BLOCK_M of the configs).
SPLIT_BLOCK_M = min(config.kwargs["BLOCK_M"] for config in tile_configs())


@dataclass(frozen=True)
class Operand:
    """An affinity as a kernel reads it: ``args`` = (x, y, k, d, stride_x, stride_y,
    stride_r, stride_c), ``rows × cols``; see :mod:`.tiles`."""

    args: tuple
    dense: bool
    rows: int
    cols: int
    d: int


def operand(K: Affinity, transpose: bool = False) -> Operand:
    """K (or Kᵀ) as kernel arguments; unused pointers are filled with a tensor of K's dtype."""
    if K.is_dense:
        dense = K.dense
        stride_r, stride_c = dense.stride()
        rows, cols = dense.shape
        if transpose:
            stride_r, stride_c, rows, cols = stride_c, stride_r, cols, rows
        return Operand((dense, dense, dense, 0, 0, 0, stride_r, stride_c), True, rows, cols, 0)
    x, y = (K.y, K.x) if transpose else (K.x, K.y)
    x, y = x.contiguous(), y.contiguous()
    d = x.shape[1]
    return Operand((x, y, x, d, x.stride(0), y.stride(0), 0, 0), False, x.shape[0], y.shape[0], d)


def bucket(size: int) -> int:
    """The autotuning key of a size: its next power of two."""
    return triton.next_power_of_2(max(int(size), 1))


def filled(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a tensor, written by fills on the device: ``torch.tensor(values,
    device="cuda")`` copies from pageable host memory and synchronises the host."""
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, value in enumerate(values):
        out[i].fill_(value)
    return out


cached_constants = functools.lru_cache(maxsize=256)(filled)


def constants(values: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Scalars for a kernel, in the input dtype (a Python float argument would be fp32);
    cached, since a Sinkhorn loop passes the same ε hundreds of times, and made without a
    host sync, since ε-scaling passes a new ε every iteration."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # A fill captured into a CUDA graph runs only at replay: cached, its tensor would
        # hold garbage for later eager calls. The graph gets its own.
        return filled(values, dtype, device)
    return cached_constants(values, dtype, device)


def on_device(device: torch.device):
    """Triton launches on the current CUDA device, not on its arguments' (``JITFunction.run``
    takes ``driver.active.get_current_device()``): make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=16)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


class TritonBackend(Backend):
    """The Backend primitives as fused Triton kernels; see the module docstring.

    Args:
        precision: ``"fp32"`` (default), ``"tf32x3"``, ``"tf32"`` or ``"fp16"``: how float32
            affinity tiles x yᵀ are multiplied.
        splits: force this many column splits per reduction (default: the heuristic).
    """

    name = "triton"
    online = True

    def __init__(self, precision: str = "fp32", splits: int | None = None):
        if not isinstance(precision, str) or precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
        if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
            raise ValueError(f"splits must be None or an integer ≥ 1, got {splits!r}")
        self.precision = precision
        self.splits = splits

    def __repr__(self) -> str:
        return f"TritonBackend(precision={self.precision!r}, splits={self.splits!r})"

    # ------------------------------------------------------------------ helpers

    def _dot_flags(self, dtype: torch.dtype) -> dict:
        """The constexpr flags of the affinity dots for inputs of this dtype."""
        if dtype == torch.float64 or self.precision == "fp32":
            return dict(DOT_PRECISION="ieee", CAST_FP16=False)
        if self.precision in ("tf32", "tf32x3"):
            return dict(DOT_PRECISION=self.precision, CAST_FP16=False)
        # fp16 operands: input_precision only concerns fp32 operands; keep Triton's default.
        return dict(DOT_PRECISION="tf32", CAST_FP16=True)

    def _split_count(self, rows: int, cols: int, device: torch.device) -> int:
        if self.splits is not None:
            return self.splits
        if device.type != "cuda":
            return 1
        sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
        row_blocks = triton.cdiv(rows, SPLIT_BLOCK_M)
        if row_blocks >= sms:
            return 1
        return max(1, min(triton.cdiv(2 * sms, row_blocks), cols // MIN_SPLIT_COLUMNS))

    @staticmethod
    def _check(K: Affinity) -> None:
        if not isinstance(K, Affinity):
            raise TypeError(f"expected an Affinity, got {type(K).__name__}")
        if K.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the 'triton' backend computes in float32 or float64, got {K.dtype}")
        if not INTERPRETING and K.device.type != "cuda":
            raise ValueError(
                f"the 'triton' backend needs CUDA tensors, got tensors on {K.device} "
                "(set TRITON_INTERPRET=1 before importing it to run on CPU)"
            )
        if not K.is_dense and K.x.shape[1] != K.y.shape[1]:
            raise ValueError(
                f"x and y must have the same feature dimension, got {K.x.shape[1]} and {K.y.shape[1]}"
            )

    @staticmethod
    def _vector(name: str, v: Tensor, size: int, K: Affinity) -> Tensor:
        if not isinstance(v, Tensor) or v.shape != (size,):
            raise ValueError(
                f"{name} must be a tensor of shape ({size},), got "
                f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
            )
        if v.dtype != K.dtype or v.device != K.device:
            raise ValueError(f"{name} must be {K.dtype} on {K.device}, got {v.dtype} on {v.device}")
        return v.contiguous()

    def _pair(self, K: Affinity, K_t: Affinity) -> None:
        """Checks of a (student, teacher) pair: same shape, dtype and device."""
        self._check(K)
        self._check(K_t)
        if K.shape != K_t.shape or K.dtype != K_t.dtype or K.device != K_t.device:
            raise ValueError(
                f"student and teacher affinities must match: shape {K.shape} vs "
                f"{K_t.shape}, {K.dtype} vs {K_t.dtype}, {K.device} vs {K_t.device}"
            )

    # ------------------------------------------------------------------ half-steps

    def _lse(self, K: Affinity, bias: Tensor, eps: float, transpose: bool) -> Tensor:
        self._check(K)
        op = operand(K, transpose)
        bias = self._vector("bias", bias, op.cols, K)
        scale = LOG2E / eps
        splits = self._split_count(op.rows, op.cols, K.device)
        out = torch.empty(splits, op.rows, dtype=K.dtype, device=K.device)
        grid = lambda meta: (triton.cdiv(op.rows, meta["BLOCK_M"]), splits)  # noqa: E731
        with on_device(K.device):
            lse_kernel[grid](
                *op.args,
                bias * scale,
                constants((scale, LN2), K.dtype, K.device),
                out,
                op.rows,
                op.cols,
                bucket(op.rows),
                bucket(op.cols),
                bucket(op.d),
                DENSE=op.dense,
                **self._dot_flags(K.dtype),
            )
        return out[0] if splits == 1 else torch.logsumexp(out, dim=0)

    def lse_rows(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        """out_i = LSE_j (K_ij + bias_j)/ε."""
        return self._lse(K, bias, eps, transpose=False)

    def lse_cols(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        """out_j = LSE_i (K_ij + bias_i)/ε: the row kernel on Kᵀ."""
        return self._lse(K, bias, eps, transpose=True)

    # ------------------------------------------------------------------ plan products

    def _product(
        self, op: Operand, a: Tensor, b: Tensor, scale: float, V: Tensor, teacher: tuple | None = None
    ) -> Tensor:
        """Σ_j W_ij V_j: with W = 2^{K·scale + a_i + b_j}, or with ``teacher`` =
        (operand, a*, b*, scale*, 1/ε) W = (that − 2^{K*·scale* + a*_i + b*_j})/ε."""
        V = V.contiguous()
        dtype, device = V.dtype, V.device
        if teacher is None:
            op_t, a_t, b_t, consts = op, a, b, (scale, scale, 1.0)
        else:
            op_t, a_t, b_t, scale_t, inv_eps = teacher
            consts = (scale, scale_t, inv_eps)
        n_out = V.shape[1]
        splits = self._split_count(op.rows, op.cols, device)
        out = torch.empty(splits, op.rows, n_out, dtype=dtype, device=device)
        grid = lambda meta: (  # noqa: E731
            triton.cdiv(op.rows, meta["BLOCK_M"]),
            splits,
            triton.cdiv(n_out, meta["BLOCK_K"]),
        )
        with on_device(device):
            plan_product_kernel[grid](
                *op.args,
                a,
                b,
                *op_t.args,
                a_t,
                b_t,
                V,
                V.stride(0),
                out,
                constants(consts, dtype, device),
                op.rows,
                op.cols,
                n_out,
                bucket(op.rows),
                bucket(op.cols),
                bucket(max(op.d, op_t.d)),
                bucket(n_out),
                DENSE=op.dense,
                DENSE_T=op_t.dense,
                HAS_TEACHER=teacher is not None,
                PRODUCT_PRECISION="ieee",
                **self._dot_flags(dtype),
            )
        return out[0] if splits == 1 else out.sum(dim=0)

    def plan_matmul(self, K: Affinity, f: Tensor, g: Tensor, eps: float, V: Tensor) -> Tensor:
        """P V with P_ij = exp((f_i + g_j + K_ij)/ε), never storing P."""
        self._check(K)
        check_plan_factor("V", V, K.shape[1], K)
        f, g = self._vector("f", f, K.shape[0], K), self._vector("g", g, K.shape[1], K)
        scale = LOG2E / eps
        return self._product(operand(K), f * scale, g * scale, scale, V)

    def plan_t_matmul(self, K: Affinity, f: Tensor, g: Tensor, eps: float, U: Tensor) -> Tensor:
        """Pᵀ U: the product kernel on Kᵀ with the potentials' roles swapped."""
        self._check(K)
        check_plan_factor("U", U, K.shape[0], K)
        f, g = self._vector("f", f, K.shape[0], K), self._vector("g", g, K.shape[1], K)
        scale = LOG2E / eps
        return self._product(operand(K, transpose=True), g * scale, f * scale, scale, U)

    def _plan_sum(
        self,
        A: Affinity,
        a: Tensor,
        b: Tensor,
        scale: float,
        B: Affinity,
        r: Tensor,
        c: Tensor,
        u: float,
        w: float,
    ) -> Tensor:
        """Σ_ij 2^{A_ij·scale + a_i + b_j} (u·A_ij + w·B_ij + r_i + c_j), summed in float64."""
        op, op_b = operand(A), operand(B)
        splits = self._split_count(op.rows, op.cols, A.device)
        # One partial per row and split: its shape does not depend on the tuned BLOCK_M.
        partials = torch.empty(splits, op.rows, dtype=A.dtype, device=A.device)
        grid = lambda meta: (triton.cdiv(op.rows, meta["BLOCK_M"]), splits)  # noqa: E731
        with on_device(A.device):
            plan_sum_kernel[grid](
                *op.args,
                a,
                b,
                *op_b.args,
                r,
                c,
                constants((scale, u, w), A.dtype, A.device),
                partials,
                op.rows,
                op.cols,
                bucket(op.rows),
                bucket(op.cols),
                bucket(max(op.d, op_b.d)),
                DENSE=op.dense,
                DENSE_B=op_b.dense,
                **self._dot_flags(A.dtype),
            )
        return partials.sum(dtype=torch.float64)

    def plan_inner(self, K: Affinity, f: Tensor, g: Tensor, eps: float, K2: Affinity) -> Tensor:
        """Σ_ij P_ij K2_ij, per-row partials summed in float64; returned in K's dtype."""
        self._check(K)
        check_plan_affinity(K, K2)
        self._check(K2)
        f, g = self._vector("f", f, K.shape[0], K), self._vector("g", g, K.shape[1], K)
        scale = LOG2E / eps
        zeros_r, zeros_c = f.new_zeros(K.shape[0]), g.new_zeros(K.shape[1])
        return self._plan_sum(K, f * scale, g * scale, scale, K2, zeros_r, zeros_c, 0.0, 1.0).to(K.dtype)

    # ------------------------------------------------------------------ KLOT

    def klot_value(self, K, f, g, eps, K_t, f_t, g_t, eps_t) -> Tensor:
        """Σ_ij P*_ij (log P*_ij − log P_ij): the weighted-sum kernel with P* as weights and
        the per-entry difference K*_ij/ε* − K_ij/ε + (f*_i/ε* − f_i/ε) + (g*_j/ε* − g_j/ε)."""
        self._pair(K, K_t)
        n, m = K.shape
        f, g = self._vector("f", f, n, K), self._vector("g", g, m, K)
        f_t, g_t = self._vector("f_t", f_t, n, K), self._vector("g_t", g_t, m, K)
        scale_t = LOG2E / eps_t
        value = self._plan_sum(
            K_t,
            f_t * scale_t,
            g_t * scale_t,
            scale_t,
            K,
            f_t / eps_t - f / eps,
            g_t / eps_t - g / eps,
            1.0 / eps_t,
            -1.0 / eps,
        )
        return value.to(K.dtype)

    def klot_grad_features(self, K, f, g, eps, K_t, f_t, g_t, eps_t) -> tuple[Tensor, Tensor]:
        """(G y, Gᵀ x), G = (P − P*)/ε formed tile by tile from both affinities: the product
        kernel over row blocks, then over column blocks (transposed operands)."""
        self._pair(K, K_t)
        if K.is_dense:
            raise ValueError("klot_grad_features needs the student affinity as features (x, y)")
        n, m = K.shape
        f, g = self._vector("f", f, n, K), self._vector("g", g, m, K)
        f_t, g_t = self._vector("f_t", f_t, n, K), self._vector("g_t", g_t, m, K)
        scale, scale_t = LOG2E / eps, LOG2E / eps_t
        a, b, a_t, b_t = f * scale, g * scale, f_t * scale_t, g_t * scale_t
        grad_x = self._product(
            operand(K), a, b, scale, K.y, teacher=(operand(K_t), a_t, b_t, scale_t, 1.0 / eps)
        )
        grad_y = self._product(
            operand(K, transpose=True),
            b,
            a,
            scale,
            K.x,
            teacher=(operand(K_t, transpose=True), b_t, a_t, scale_t, 1.0 / eps),
        )
        return grad_x, grad_y

    def klot_grad_dense(self, K, f, g, eps, K_t, f_t, g_t, eps_t) -> Tensor:
        """G = (P − P*)/ε written as an n×m tensor, one tile per program."""
        self._pair(K, K_t)
        n, m = K.shape
        f, g = self._vector("f", f, n, K), self._vector("g", g, m, K)
        f_t, g_t = self._vector("f_t", f_t, n, K), self._vector("g_t", g_t, m, K)
        scale, scale_t = LOG2E / eps, LOG2E / eps_t
        op, op_t = operand(K), operand(K_t)
        G = torch.empty(n, m, dtype=K.dtype, device=K.device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(m, meta["BLOCK_N"]))  # noqa: E731
        with on_device(K.device):
            plan_difference_kernel[grid](
                *op.args,
                f * scale,
                g * scale,
                *op_t.args,
                f_t * scale_t,
                g_t * scale_t,
                constants((scale, scale_t, 1.0 / eps), K.dtype, K.device),
                G,
                n,
                m,
                bucket(n),
                bucket(m),
                bucket(max(op.d, op_t.d)),
                DENSE=op.dense,
                DENSE_T=op_t.dense,
                **self._dot_flags(K.dtype),
            )
        return G
