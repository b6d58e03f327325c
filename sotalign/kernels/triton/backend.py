r"""``TritonBackend``: the host side of the Triton kernels (checks, scaling, launch grids).

Launch grids (BLOCK_* come from the autotuned config):

* half-steps, weighted sums: ``(B·cdiv(rows, BLOCK_M), splits)``, one program per problem,
  block of rows and column split (B = 1 without a batch): a batch is one launch;
* plan products: ``(B·cdiv(rows, BLOCK_M), splits, cdiv(k, BLOCK_K))``;
* the dense gradient G (one problem): ``(cdiv(n, BLOCK_M), cdiv(m, BLOCK_N))``, one program
  per tile.

Column reductions run the row kernels on the transposed operand (features x ↔ y swapped, or
the strides of a stored K swapped), and Gᵀ x is the G y kernel on the transposed problem.

**Split reduction** (flash-decoding). A half-step has only cdiv(n, BLOCK_M) row blocks;
when that is below the number of SMs (n small, m large) most of the GPU would idle, so the
columns are shared out over ``splits`` programs per row block, each writing a partial
result (an LSE, a partial sum, a partial product) that is combined afterwards (the update
kernel, or a ``sum`` over the splits). With r = cdiv(n, BLOCK_M) row blocks at the smallest
BLOCK_M of the kernel's configs (64 online, 16 for the dense half-step), times B:

    splits = 1                                  if r ≥ #SMs,
             min(cdiv(2·#SMs, r), m // 512)     otherwise (≥ 1),

i.e. about two programs per SM, each still reducing at least 512 columns. The SM count is
``torch.cuda.get_device_properties(device).multi_processor_count``; off GPU (the
interpreter) the default is 1, and ``TritonBackend(splits=k)`` forces k (tests use it).

**Launches**: a Sinkhorn half-step (``row_update`` / ``column_update``) is one launch whose
epilogue writes the new potential τ ε (log w − LSE) (τ = ``scale``), or two with a split
reduction (the partial LSEs, then :func:`.lse.update_kernel`, which applies τ too); the bias
is scaled inside the kernel and the kernel constants are cached device tensors, so nothing
else runs on the device.

**Batches**: features x (B, n, d), y (B, m, d) or a stored K (B, n, m), with vectors
(B, n) / (B, m) and plan factors (B, ·, k); every tensor is made contiguous (a no-op for
``Affinity``'s own). The KLOT primitives take one problem.

**Precision** (``precision=``, float32 inputs; float64 inputs always use fp64 dots): the
flag sets how the affinity tiles x yᵀ are computed, the bulk of the work:

* ``"fp32"``: exact fp32 FMA dots on CUDA cores (``input_precision="ieee"``);
* ``"tf32x3"``: three tensor-core tf32 dots per product (each operand split as hi + lo,
  hi·hi + hi·lo + lo·hi): fp32 accuracy at tensor-core speed;
* ``"fp16x3"``: the same split done once per solve on the host in fp16: each operand is
  scaled by a power of two 2^s (so its largest entry is in [2^14, 2^15) and the low parts
  stay normal fp16 numbers), split as hi = fp16(x·2^s), lo = fp16(x·2^s − hi), and the
  plain fp16 kernel runs on 3·d columns, [x_lo, x_hi, x_hi]·[y_hi, y_lo, y_hi]ᵀ (the
  small cross terms first), with 2^{−s_x−s_y} folded into the tile (``k_scale``): fp32
  accuracy for the same reason as tf32x3, at fp16 tensor-core speed. The half-step keeps
  the rows' two distinct parts (lo, hi) resident for d ≤ 128;
* ``"tf32"``: tensor-core tf32 dots (operands keep 10 mantissa bits);
* ``"fp16"``: operands rounded to fp16 (scaled like fp16x3, hi part only) once per solve,
  products accumulated in fp32.

The host-side fp16 operands are cached per input tensor (its identity and version), so a
solve rounds x and y once, not once per tile or per half-step. Potentials, biases,
exponents and accumulators are fp32 in every mode (never bf16: docs/design.md §3). The products
with the plan (P V, G y) run on the tensor cores in tf32x3 for the fp32-accurate flags and
tf32 for tf32/fp16, never in fp16 (P's tiny entries would underflow).
``benchmarks/precision_error.py`` measures the error of each flag against float64
(benchmarks/results/cpu-amd-epyc-2core-precision.md: emulated on CPU and cross-checked
with these kernels in the interpreter; the GPU run will replace them with measurements).
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ..base import PRECISIONS, Affinity, Backend, check_plan_affinity, check_plan_factor
from .lse import lse_dense_kernel, lse_kernel, update_kernel
from .plan import Plan, plan_difference_kernel, plan_product_kernel, plan_sum_kernel
from .tiles import (
    D_QUANTUM,
    INTERPRETING,
    RESIDENT_ROW_BYTES,
    Constants,
    Features,
    Stored,
    dense_configs,
    kernel_constants,
    online_configs,
)

LOG2E = 1.0 / math.log(2.0)
#: Flags whose operands are rounded to fp16 on the host.
FP16_PRECISIONS = ("fp16", "fp16x3")
#: Tensor-core precision of the plan products (P V, G y) for each flag.
PRODUCT_PRECISION = {"fp32": "ieee", "tf32x3": "tf32x3", "fp16x3": "tf32x3", "tf32": "tf32", "fp16": "tf32"}
#: The fewest columns one split of a reduction should cover (see the module docstring).
MIN_SPLIT_COLUMNS = 512
#: Row-block sizes that the split heuristic assumes (the smallest BLOCK_M of the configs of
#: the online and of the dense kernels).
SPLIT_BLOCK_M = {
    False: min(config.kwargs["BLOCK_M"] for config in online_configs()),
    True: min(config.kwargs["BLOCK_M"] for config in dense_configs()),
}
#: Exponent of the power-of-two scale of fp16 operands: the largest entry lands in
#: [2^(FP16_TOP − 1), 2^FP16_TOP), below fp16's maximum 65504 ≈ 2^16.
FP16_TOP = 15
#: Elements per program of the split-combining update kernel.
UPDATE_BLOCK = 1024


@dataclass(frozen=True)
class Operand:
    """An affinity as a kernel reads it: ``args`` (:class:`.tiles.Features` or
    :class:`.tiles.Stored`), ``rows × cols`` per problem, ``batch`` problems (None: no batch
    dimension), the compile-time d ``d_ceil``; ``fp16x3`` when the features are fp16x3
    splits, x's lo part being its part ``x_lo_part`` (0: [lo, hi, hi], 1: [hi, lo, hi])."""

    args: Features | Stored
    rows: int
    cols: int
    batch: int | None
    d_ceil: int = D_QUANTUM
    fp16x3: bool = False
    x_lo_part: int = 0

    @property
    def dense(self) -> bool:
        return isinstance(self.args, Stored)

    @property
    def problems(self) -> int:
        return self.batch or 1

    @property
    def vector_shape(self) -> tuple[int, ...]:
        """The leading dimensions of a per-row output: (B,) for a batch, () for one problem."""
        return () if self.batch is None else (self.batch,)

    def resident(self, dot_precision: str) -> int:
        """The width of the rows of x that the half-step keeps in registers (:mod:`.lse`),
        or 0 to stream them: tensor-core dots only (the CUDA-core fp32 dot spills with it:
        benchmarks/results/sm90-kernel-resources.md), rows padded to a power of two of at
        most ``RESIDENT_ROW_BYTES`` (an fp16x3 row: its lo and hi parts)."""
        if self.dense or dot_precision == "ieee":
            return 0
        assert isinstance(self.args, Features)
        parts = 2 if self.fp16x3 else 1
        width = max(16, triton.next_power_of_2(self.args.d // 3 if self.fp16x3 else self.args.d))
        return width if parts * width * self.args.x.element_size() <= RESIDENT_ROW_BYTES else 0


def fp16_split(t: Tensor, parts: int, role: str = "x") -> tuple[Tensor, float]:
    """(t·2^s split into fp16 parts, 2^−s): ``parts`` = 1 gives [hi]; 3 gives [lo, hi, hi]
    for the ``role`` "x" operand and [hi, lo, hi] for "y" (along the last dimension), so that

        [x_lo, x_hi, x_hi]·[y_hi, y_lo, y_hi]ᵀ = x_lo y_hiᵀ + x_hi y_loᵀ + x_hi y_hiᵀ,

    the two small cross terms first: the fp32 accumulator of the d loop sums them before it
    holds the large hi·hi part (the lo·lo term, 2^−22 of the product, is dropped).

    s puts the largest |t| in [2^14, 2^15): the split is exact up to fp16's rounding of lo,
    about 2^−22 of the largest entry, and lo stays a normal fp16 number for every entry
    above 2^−22 of the largest. Reads max |t| once (a host synchronisation, once per solve).
    """
    with torch.no_grad():
        t = t.detach().float()
        largest = float(t.abs().max())
        exponent = math.frexp(largest)[1] if largest > 0 else 0  # largest < 2^exponent
        shift = max(-120, min(120, FP16_TOP - exponent))
        scaled = t * 2.0**shift
        hi = scaled.half()
        if parts == 1:
            split = hi
        else:
            lo = (scaled - hi.float()).half()
            split = torch.cat((lo, hi, hi) if role == "x" else (hi, lo, hi), dim=-1)
    return split.contiguous(), 2.0**-shift


#: Host-prepared fp16 operands: (id(tensor), kind) -> (weak reference, version, split, scale).
_PREPARED: dict[tuple[int, str], tuple] = {}


def prepared(t: Tensor, precision: str, role: str) -> tuple[Tensor, float]:
    """The operand of a feature tensor for ``precision`` (its fp16 split and scale), made
    once per tensor and version and reused while the tensor lives; ``role`` is "x" or
    "y" (which side of the fp16x3 pattern). fp32/tf32 operands are the tensor itself."""
    if precision not in FP16_PRECISIONS or t.dtype == torch.float64:
        return t, 1.0
    kind = precision if precision == "fp16" else f"{precision}-{role}"
    entry = _PREPARED.get((id(t), kind))
    if entry is not None and entry[0]() is t and entry[1] == t._version:
        return entry[2], entry[3]
    for key in [key for key, value in _PREPARED.items() if value[0]() is None]:
        del _PREPARED[key]
    split, scale = fp16_split(t, 1 if precision == "fp16" else 3, role)
    _PREPARED[(id(t), kind)] = (weakref.ref(t), t._version, split, scale)
    return split, scale


def d_ceil(d: int) -> int:
    """d rounded up to a multiple of ``D_QUANTUM`` (the kernels' compile-time d)."""
    return max(D_QUANTUM, -(-d // D_QUANTUM) * D_QUANTUM)


def operand(K: Affinity, transpose: bool = False, precision: str = "fp32") -> Operand:
    """K (or Kᵀ) as a kernel argument."""
    rows, cols = K.shape
    batch_stride = lambda t: t.stride(0) if K.batch is not None else 0  # noqa: E731
    if K.is_dense:
        stride_r, stride_c = K.dense.stride()[-2:]
        if transpose:
            stride_r, stride_c, rows, cols = stride_c, stride_r, cols, rows
        return Operand(Stored(K.dense, batch_stride(K.dense), stride_r, stride_c), rows, cols, K.batch)
    (x, scale_x), (y, scale_y) = prepared(K.x, precision, "x"), prepared(K.y, precision, "y")
    if transpose:
        x, y, rows, cols = y, x, cols, rows
    d = x.shape[-1]
    args = Features(x, y, d, batch_stride(x), batch_stride(y), x.stride(-2), y.stride(-2), scale_x * scale_y)
    fp16x3 = precision == "fp16x3" and K.dtype == torch.float32
    return Operand(args, rows, cols, K.batch, d_ceil(d), fp16x3, int(transpose))


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


def constants(values: Constants, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The :class:`.tiles.Constants` of a kernel, in the input dtype;
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
        precision: ``"fp32"`` (default), ``"tf32x3"``, ``"fp16x3"``, ``"tf32"`` or
            ``"fp16"``: how float32 affinity tiles x yᵀ are multiplied.
        splits: force this many column splits per reduction (default: the heuristic).
    """

    name = "triton"
    online = True
    # CUDA, or any device while Triton's interpreter runs the kernels
    device_types = None if INTERPRETING else ("cuda",)
    device_hint = " (set TRITON_INTERPRET=1 before importing it to run on CPU)"

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

    def _operand(self, K: Affinity, transpose: bool = False) -> Operand:
        return operand(K, transpose, self.precision)

    def _dot_precision(self, dtype: torch.dtype) -> str:
        """``input_precision`` of the affinity dots (fp16 operands ignore it)."""
        if dtype == torch.float64 or self.precision == "fp32":
            return "ieee"
        return self.precision if self.precision in ("tf32", "tf32x3") else "tf32"

    def _split_count(self, op: Operand, device: torch.device) -> int:
        if self.splits is not None:
            return self.splits
        if device.type != "cuda":
            return 1
        sms = sm_count(device.index if device.index is not None else torch.cuda.current_device())
        row_blocks = op.problems * triton.cdiv(op.rows, SPLIT_BLOCK_M[op.dense])
        if row_blocks >= sms:
            return 1
        return max(1, min(triton.cdiv(2 * sms, row_blocks), op.cols // MIN_SPLIT_COLUMNS))

    def _check(self, K: Affinity) -> None:
        if not isinstance(K, Affinity):
            raise TypeError(f"expected an Affinity, got {type(K).__name__}")
        if K.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the 'triton' backend computes in float32 or float64, got {K.dtype}")
        self.check_device(K.device)
        tensors = [K.dense] if K.is_dense else [K.x, K.y]
        if any(t.dim() not in (2, 3) for t in tensors):
            raise ValueError(
                "an affinity is 2-D per problem, with an optional leading batch dimension; got "
                f"shapes {[tuple(t.shape) for t in tensors]}"
            )
        if not K.is_dense and (K.x.shape[-1] != K.y.shape[-1] or K.x.shape[:-2] != K.y.shape[:-2]):
            raise ValueError(
                "x and y must have the same feature dimension and batch size, got shapes "
                f"{tuple(K.x.shape)} and {tuple(K.y.shape)}"
            )

    @staticmethod
    def _vector(name: str, v: Tensor, size: int, K: Affinity) -> Tensor:
        """A per-row or per-column vector of K: (size,), or (B, size) for a batch of B."""
        expected = (size,) if K.batch is None else (K.batch, size)
        if not isinstance(v, Tensor) or tuple(v.shape) != expected:
            raise ValueError(
                f"{name} must be a tensor of shape {expected}, got "
                f"{tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}"
            )
        if v.dtype != K.dtype or v.device != K.device:
            raise ValueError(f"{name} must be {K.dtype} on {K.device}, got {v.dtype} on {v.device}")
        return v.contiguous()

    def _potentials(
        self, K: Affinity, f: Tensor, g: Tensor, eps: float, suffix: str = ""
    ) -> tuple[Tensor, Tensor]:
        """f and g checked and scaled by log2(e)/ε: the row and column vectors of a :class:`.plan.Plan`."""
        n, m = K.shape
        rate = LOG2E / eps
        return self._vector("f" + suffix, f, n, K) * rate, self._vector("g" + suffix, g, m, K) * rate

    def _plan(self, K: Affinity, a: Tensor, b: Tensor, transpose: bool = False) -> tuple[Plan, Operand]:
        """The plan of K with the scaled potentials a, b, or of Kᵀ (then b is its row vector)."""
        op = self._operand(K, transpose)
        return Plan(op.args, *((b, a) if transpose else (a, b))), op

    def _pair(self, K: Affinity, K_t: Affinity) -> None:
        """Checks of a (student, teacher) pair: one problem each, same shape, dtype and device."""
        self._check(K)
        self._check(K_t)
        if K.batch is not None or K_t.batch is not None:
            raise ValueError("the KLOT primitives take one problem (2-D tensors, no batch dimension)")
        if K.shape != K_t.shape or K.dtype != K_t.dtype or K.device != K_t.device:
            raise ValueError(
                f"student and teacher affinities must match: shape {K.shape} vs "
                f"{K_t.shape}, {K.dtype} vs {K_t.dtype}, {K.device} vs {K_t.device}"
            )

    # ------------------------------------------------------------------ half-steps

    def _half_step(
        self, K: Affinity, bias: Tensor, eps: float, transpose: bool, log_w: Tensor | None, scale: float = 1.0
    ) -> Tensor:
        """LSE_j (K_ij + bias_j)/ε over the rows of K (or Kᵀ), for every problem of a batch;
        with ``log_w`` the potential τ ε (log w − LSE) instead, τ = ``scale``."""
        self._check(K)
        op = self._operand(K, transpose)
        bias = self._vector("bias", bias, op.cols, K)
        if log_w is not None:
            log_w = self._vector("log_w", log_w, op.rows, K)
        dtype, device = K.dtype, K.device
        splits = self._split_count(op, device)
        epilogue = log_w is not None and splits == 1
        consts = constants(kernel_constants(eps, tau=scale), dtype, device)
        out = torch.empty(
            (*op.vector_shape, op.rows) if epilogue else (splits, *op.vector_shape, op.rows),
            dtype=dtype,
            device=device,
        )
        log_w_arg = bias if log_w is None else log_w
        grid = lambda meta: (op.problems * triton.cdiv(op.rows, meta["BLOCK_M"]), splits)  # noqa: E731
        sizes = (op.rows, op.cols, bucket(op.problems * op.rows), bucket(op.cols))
        with on_device(device):
            if isinstance(op.args, Stored):
                row_major = int(op.args.col_stride == 1)
                lse_dense_kernel[grid](
                    op.args, bias, log_w_arg, consts, out, *sizes, row_major, EPILOGUE=epilogue
                )
            else:
                dot_precision = self._dot_precision(dtype)
                resident = op.resident(dot_precision)
                lse_kernel[grid](
                    op.args,
                    bias,
                    log_w_arg,
                    consts,
                    out,
                    *sizes,
                    D_CEIL=op.d_ceil,
                    DOT_PRECISION=dot_precision,
                    RESIDENT=resident,
                    # only the resident rows read the split's parts one by one
                    FP16X3=op.fp16x3 and resident > 0,
                    X_LO_PART=op.x_lo_part if op.fp16x3 and resident > 0 else 0,
                    EPILOGUE=epilogue,
                )
            if epilogue:
                return out
            if log_w is None:
                return out[0] if splits == 1 else torch.logsumexp(out, dim=0)
            potential = torch.empty((*op.vector_shape, op.rows), dtype=dtype, device=device)
            entries = op.problems * op.rows
            update_kernel[(triton.cdiv(entries, UPDATE_BLOCK),)](
                out, splits, log_w, consts, potential, entries, BLOCK=UPDATE_BLOCK
            )
        return potential

    def lse_rows(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        """out_i = LSE_j (K_ij + bias_j)/ε."""
        return self._half_step(K, bias, eps, False, None)

    def lse_cols(self, K: Affinity, bias: Tensor, eps: float) -> Tensor:
        """out_j = LSE_i (K_ij + bias_i)/ε: the row kernel on Kᵀ."""
        return self._half_step(K, bias, eps, True, None)

    def row_update(self, K: Affinity, g: Tensor, eps: float, log_a: Tensor, scale: float = 1.0) -> Tensor:
        """f = τ ε (log a − LSE_j[(K + g)/ε]), the LSE kernel with its epilogue."""
        return self._half_step(K, g, eps, False, log_a, scale)

    def column_update(self, K: Affinity, f: Tensor, eps: float, log_b: Tensor, scale: float = 1.0) -> Tensor:
        """g = τ ε (log b − LSE_i[(K + f)/ε]), the row kernel on Kᵀ with its epilogue."""
        return self._half_step(K, f, eps, True, log_b, scale)

    # ------------------------------------------------------------------ plan products

    def _product(
        self,
        student: Plan,
        op: Operand,
        V: Tensor,
        consts: Constants,
        teacher: tuple[Plan, Operand] | None = None,
    ) -> Tensor:
        """Σ_j W_ij V_j for every problem: W = P, the plan ``student`` (with ``op``'s shape),
        or with ``teacher`` = (plan, operand) W = (P − P*)/ε; rates and 1/ε in ``consts``."""
        V = V.contiguous()
        dtype, device = V.dtype, V.device
        teacher_plan, op_t = (student, op) if teacher is None else teacher
        n_out = V.shape[-1]
        splits = self._split_count(op, device)
        out = torch.empty(splits, *op.vector_shape, op.rows, n_out, dtype=dtype, device=device)
        grid = lambda meta: (  # noqa: E731
            op.problems * triton.cdiv(op.rows, meta["BLOCK_M"]),
            splits,
            triton.cdiv(n_out, meta["BLOCK_K"]),
        )
        product_precision = "ieee" if dtype == torch.float64 else PRODUCT_PRECISION[self.precision]
        with on_device(device):
            plan_product_kernel[grid](
                student,
                teacher_plan,
                V,
                out,
                constants(consts, dtype, device),
                op.rows,
                op.cols,
                n_out,
                bucket(op.problems * op.rows),
                bucket(op.cols),
                bucket(n_out),
                DENSE=op.dense,
                D_CEIL=op.d_ceil,
                DENSE_T=op_t.dense,
                D_CEIL_T=op_t.d_ceil,
                HAS_TEACHER=teacher is not None,
                DOT_PRECISION=self._dot_precision(dtype),
                PRODUCT_PRECISION=product_precision,
            )
        return out[0] if splits == 1 else out.sum(dim=0)

    def plan_matmul(self, K: Affinity, f: Tensor, g: Tensor, eps: float, V: Tensor) -> Tensor:
        """P V with P_ij = exp((f_i + g_j + K_ij)/ε), never storing P."""
        self._check(K)
        check_plan_factor("V", V, K.shape[1], K)
        return self._product(*self._plan(K, *self._potentials(K, f, g, eps)), V, kernel_constants(eps))

    def plan_t_matmul(self, K: Affinity, f: Tensor, g: Tensor, eps: float, U: Tensor) -> Tensor:
        """Pᵀ U: the product kernel on Kᵀ with the potentials' roles swapped."""
        self._check(K)
        check_plan_factor("U", U, K.shape[0], K)
        plan = self._plan(K, *self._potentials(K, f, g, eps), transpose=True)
        return self._product(*plan, U, kernel_constants(eps))

    def _plan_sum(
        self, A: Affinity, a: Tensor, b: Tensor, B: Affinity, r: Tensor, c: Tensor, consts: Constants
    ) -> Tensor:
        """Σ_ij 2^{A_ij·rate + a_i + b_j} (u·A_ij + w·B_ij + r_i + c_j) per problem, summed in
        float64 (rate, u and w in ``consts``)."""
        op, op_b = self._operand(A), self._operand(B)
        splits = self._split_count(op, A.device)
        # One partial per row and split: its shape does not depend on the tuned BLOCK_M.
        partials = torch.empty(splits, *op.vector_shape, op.rows, dtype=A.dtype, device=A.device)
        grid = lambda meta: (op.problems * triton.cdiv(op.rows, meta["BLOCK_M"]), splits)  # noqa: E731
        with on_device(A.device):
            plan_sum_kernel[grid](
                Plan(op.args, a, b),
                Plan(op_b.args, r, c),
                constants(consts, A.dtype, A.device),
                partials,
                op.rows,
                op.cols,
                bucket(op.problems * op.rows),
                bucket(op.cols),
                DENSE=op.dense,
                D_CEIL=op.d_ceil,
                DENSE_B=op_b.dense,
                D_CEIL_B=op_b.d_ceil,
                DOT_PRECISION=self._dot_precision(A.dtype),
            )
        return partials.sum(dim=(0, -1), dtype=torch.float64)

    def plan_inner(self, K: Affinity, f: Tensor, g: Tensor, eps: float, K2: Affinity) -> Tensor:
        """Σ_ij P_ij K2_ij per problem, per-row partials summed in float64; in K's dtype."""
        self._check(K)
        check_plan_affinity(K, K2)
        self._check(K2)
        a, b = self._potentials(K, f, g, eps)
        zeros_r, zeros_c = torch.zeros_like(a), torch.zeros_like(b)
        return self._plan_sum(K, a, b, K2, zeros_r, zeros_c, kernel_constants(eps, w=1.0)).to(K.dtype)

    # ------------------------------------------------------------------ KLOT

    def klot_value(self, K, f, g, eps, K_t, f_t, g_t, eps_t) -> Tensor:
        """Σ_ij P*_ij (log P*_ij − log P_ij): the weighted-sum kernel with P* as weights and
        the per-entry difference K*_ij/ε* − K_ij/ε + (f*_i/ε* − f_i/ε) + (g*_j/ε* − g_j/ε)."""
        self._pair(K, K_t)
        a_t, b_t = self._potentials(K, f_t, g_t, eps_t, "_t")
        f, g = self._vector("f", f, K.shape[0], K), self._vector("g", g, K.shape[1], K)
        r, c = f_t / eps_t - f / eps, g_t / eps_t - g / eps
        value = self._plan_sum(K_t, a_t, b_t, K, r, c, kernel_constants(eps_t, u=1.0 / eps_t, w=-1.0 / eps))
        return value.to(K.dtype)

    def klot_grad_features(self, K, f, g, eps, K_t, f_t, g_t, eps_t) -> tuple[Tensor, Tensor]:
        """(G y, Gᵀ x), G = (P − P*)/ε formed tile by tile from both affinities: the product
        kernel over row blocks, then over column blocks (transposed operands)."""
        self._pair(K, K_t)
        if K.is_dense:
            raise ValueError("klot_grad_features needs the student affinity as features (x, y)")
        a, b = self._potentials(K, f, g, eps)
        a_t, b_t = self._potentials(K, f_t, g_t, eps_t, "_t")
        consts = kernel_constants(eps, eps_t)
        grad_x, grad_y = (
            self._product(
                *self._plan(K, a, b, transpose), features, consts, self._plan(K_t, a_t, b_t, transpose)
            )
            for transpose, features in ((False, K.y), (True, K.x))
        )
        return grad_x, grad_y

    def klot_grad_dense(self, K, f, g, eps, K_t, f_t, g_t, eps_t) -> Tensor:
        """G = (P − P*)/ε written as an n×m tensor, one tile per program."""
        self._pair(K, K_t)
        (student, op), (teacher, op_t) = (
            self._plan(K, *self._potentials(K, f, g, eps)),
            self._plan(K_t, *self._potentials(K, f_t, g_t, eps_t, "_t")),
        )
        n, m = K.shape
        G = torch.empty(n, m, dtype=K.dtype, device=K.device)
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(m, meta["BLOCK_N"]))  # noqa: E731
        with on_device(K.device):
            plan_difference_kernel[grid](
                student,
                teacher,
                constants(kernel_constants(eps, eps_t), K.dtype, K.device),
                G,
                n,
                m,
                bucket(n),
                bucket(m),
                DENSE=op.dense,
                D_CEIL=op.d_ceil,
                DENSE_T=op_t.dense,
                D_CEIL_T=op_t.d_ceil,
                DOT_PRECISION=self._dot_precision(K.dtype),
            )
        return G
