"""Building blocks shared by the kernels: the operands, the constants, one tile of K, a
program's rows and columns, configs.

**Operands.** An affinity reaches a kernel as one tuple argument (Triton passes a named
tuple's fields and keeps their names), plus the compile-time ``DENSE`` and ``D_CEIL``:

* :class:`Features` (``DENSE=False``): K_ij = k_scale · Σ_t x_it y_jt, x (rows × d) and y
  (cols × d) row-major, in fp32/fp64 or, for the fp16 precisions, already rounded to fp16 on
  the host (once per solve; ``k_scale`` undoes the power-of-two scaling, else it is 1).
  ``D_CEIL`` is d rounded up to a multiple of ``D_QUANTUM``: the d loop has a trip count
  known at compile time (pipelined without a runtime bound), at the price of one compiled
  variant per 64 features;
* :class:`Stored` (``DENSE=True``): K_ij = k[i·row_stride + j·col_stride]. Swapping the two
  strides reads Kᵀ from the same row-major buffer, which is how column reductions run as
  row reductions.

**Batches.** Every tensor may carry a leading batch dimension (B problems); the batch
strides say how far apart two problems are (0 for one problem). Axis 0 of every grid
enumerates (problem, block of rows) pairs, problems outer (:func:`program_rows`), so a batch
is one launch; the vectors of a batch (biases, potentials, weights) are contiguous (B, len).
Offsets are int64 throughout: rows × row stride passes 2^31 at n·d ≥ 2^31 (e.g. n = 700k at
fp16x3, d = 1024), and a batch multiplies that.

**Constants.** Scalars that must keep the inputs' precision (a Python float argument is
passed as fp32, too coarse for fp64) travel in one small tensor whose slots are the fields
of :class:`Constants`, the one definition of the layout; kernels read a slot by its name
(``tl.load(consts_ptr + RATE)``).

Autotuning is keyed on sizes bucketed to the next power of two (``*_BUCKET`` arguments),
so a batch size that changes every step reuses the tuned config instead of retuning, and
the tuned configs are cached on disk by Triton (``cache_results=True``: the next process
reads them instead of benchmarking again).

``tl.dot`` is always given ``out_dtype`` = the accumulator's dtype: triton 3.6 defaults it
to fp32 and then rejects an fp64 accumulator (3.9 infers it).
"""

from __future__ import annotations

import math
import os
from typing import Any, NamedTuple

import triton
import triton.language as tl

#: Read when this module is imported, the same moment ``triton.jit`` reads it.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
#: ``SOTALIGN_TRITON_CONFIGS=first`` keeps only the first config of each kernel (no autotuning:
#: quick GPU test runs, where tuning every new shape would dominate).
FIRST_CONFIG_ONLY = os.environ.get("SOTALIGN_TRITON_CONFIGS") == "first"


def _tuned(configs: list[triton.Config]) -> list[triton.Config]:
    return configs[:1] if FIRST_CONFIG_ONLY else configs


#: Keys of the autotuner: bucketed sizes plus every flag that changes the compiled code
#: (Triton adds the dtypes of the tensor arguments).
ONLINE_KEY = ["ROWS_BUCKET", "COLS_BUCKET", "D_CEIL", "DOT_PRECISION"]
TILE_KEY = ONLINE_KEY + ["DENSE"]
#: d is rounded up to a multiple of this for the compile-time d loop (the largest BLOCK_D).
D_QUANTUM = 64
#: Feature rows of at most this many bytes stay resident in registers across the column loop
#: of the half-step (e.g. d ≤ 128 in fp32 or fp16x3, whose resident row is its hi and lo
#: parts, ≤ 256 in fp16; tensor-core dots only).
RESIDENT_ROW_BYTES = 512


class Features(NamedTuple):
    """A feature affinity K = k_scale · x yᵀ as a kernel argument (strides in elements)."""

    x: Any
    y: Any
    d: int
    x_batch_stride: int
    y_batch_stride: int
    x_row_stride: int
    y_row_stride: int
    k_scale: float


class Stored(NamedTuple):
    """A stored affinity K as a kernel argument (strides in elements)."""

    k: Any
    batch_stride: int
    row_stride: int
    col_stride: int


class TileIndex(NamedTuple):
    """Where a tile of K lies: its rows and columns and their masks (built in the kernels)."""

    rows: Any
    cols: Any
    row_mask: Any
    col_mask: Any


class Constants(NamedTuple):
    """The slots of the constants tensor every kernel reads (``consts_ptr``), in order."""

    #: log2(e)/ε: the plan in base 2 is 2^{(K + f + g)·rate}.
    rate: float
    #: log2(e)/ε* of the second plan (the teacher's).
    rate_t: float
    ln2: float
    #: τ·ε: a half-step writes the potential τ ε (log w − LSE).
    potential: float
    #: 1/ε: the KLOT gradient G = (P − P*)/ε.
    inv_eps: float
    #: u and w of the weighted sum Σ P (u·A + w·B + r + c).
    u: float
    w: float


def kernel_constants(
    eps: float, eps_t: float = 1.0, tau: float = 1.0, u: float = 0.0, w: float = 0.0
) -> Constants:
    """The constants of a pass with the plan at ε (and a second one at ε*)."""
    log2e = 1.0 / math.log(2.0)
    return Constants(log2e / eps, log2e / eps_t, math.log(2.0), tau * eps, 1.0 / eps, u, w)


RATE = tl.constexpr(Constants._fields.index("rate"))
RATE_T = tl.constexpr(Constants._fields.index("rate_t"))
LN2 = tl.constexpr(Constants._fields.index("ln2"))
POTENTIAL = tl.constexpr(Constants._fields.index("potential"))
INV_EPS = tl.constexpr(Constants._fields.index("inv_eps"))
U = tl.constexpr(Constants._fields.index("u"))
W = tl.constexpr(Constants._fields.index("w"))


def online_configs() -> list[triton.Config]:
    """Tiles of the online half-step and the weighted sums (K recomputed from features).

    ``STAGES`` is the software-pipelining depth of the column loop (``tl.range``): the loads
    and dots of the next column tile are issued while the exponentials of this one run.
    Under the interpreter one small config (tuning there only costs time); the tiles are
    ≥ 16 wide as ``tl.dot`` requires, and small enough that the tests cross tile borders.
    """
    if INTERPRETING:
        return [
            triton.Config(
                {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 16, "STAGES": 1}, num_warps=4, num_stages=1
            )
        ]
    return _tuned(
        [
            triton.Config(
                {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 32, "STAGES": 2}, num_warps=8, num_stages=3
            ),
            triton.Config(
                {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32, "STAGES": 2}, num_warps=8, num_stages=3
            ),
            triton.Config(
                {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 32, "STAGES": 3}, num_warps=4, num_stages=3
            ),
            triton.Config(
                {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64, "STAGES": 3}, num_warps=4, num_stages=3
            ),
        ]
    )


def dense_configs() -> list[triton.Config]:
    """Tiles of the dense half-step, which only streams K: narrow row blocks (more programs,
    so the split heuristic rarely has to share columns) and wide column tiles for long
    vector loads, pipelined 3–4 deep (a loop without ``tl.dot`` is pipelined only through
    ``tl.range(..., num_stages=...)``)."""
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "STAGES": 1}, num_warps=4, num_stages=1)]
    # ~140 registers each on sm_90 (32 entries of K per thread, plus 64-bit addresses):
    # 4-warp programs with 64 entries per thread took ~245 (sm90-kernel-resources.md).
    return _tuned(
        [
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 128, "STAGES": 3}, num_warps=8, num_stages=1),
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "STAGES": 3}, num_warps=4, num_stages=1),
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 256, "STAGES": 3}, num_warps=8, num_stages=1),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "STAGES": 4}, num_warps=16, num_stages=1),
        ]
    )


def product_configs() -> list[triton.Config]:
    """Tiles of the plan products. The output block is as wide as the output
    (``BLOCK_K`` = its next power of two up to 256, set by a heuristic), so the W tiles
    are formed once, not once per output slice."""
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 16}, num_warps=4, num_stages=1)]
    return _tuned(
        [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_D": 32}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_D": 32}, num_warps=4, num_stages=3),
        ]
    )


#: The widest output block of a plan product; wider outputs take several programs.
MAX_BLOCK_K = 256


def product_block_k(args: dict) -> int:
    """BLOCK_K of a plan product: the output width's next power of two, 16 to 256."""
    return min(MAX_BLOCK_K, max(16, triton.next_power_of_2(args["n_out"])))


@triton.jit
def program_rows(n_rows, BLOCK_M: tl.constexpr):
    """(problem, rows, row_mask) of this program: axis 0 of the grid enumerates the pairs
    (problem, block of BLOCK_M rows), problems outer."""
    blocks = (n_rows + BLOCK_M - 1) // BLOCK_M
    problem = tl.program_id(0) // blocks
    rows = (tl.program_id(0) % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    return problem, rows, rows < n_rows


@triton.jit
def partial_offsets(problem, rows, n_rows, BLOCK_M: tl.constexpr):
    """Offsets of this program's rows in a (splits, problems, n_rows) buffer of per-split
    partial results (axis 1 of the grid is the split)."""
    problems = tl.num_programs(0) // ((n_rows + BLOCK_M - 1) // BLOCK_M)
    return (tl.program_id(1) * problems + problem).to(tl.int64) * n_rows + rows


@triton.jit
def for_problem(K, problem, DENSE: tl.constexpr):
    """The operand of one problem of a batch: its pointers moved to that problem."""
    p = problem.to(tl.int64)
    if DENSE:
        K = Stored(K.k + p * K.batch_stride, K.batch_stride, K.row_stride, K.col_stride)
    else:
        K = Features(
            K.x + p * K.x_batch_stride,
            K.y + p * K.y_batch_stride,
            K.d,
            K.x_batch_stride,
            K.y_batch_stride,
            K.x_row_stride,
            K.y_row_stride,
            K.k_scale,
        )
    return K


@triton.jit
def feature_block(
    ptr, row_stride, index, index_mask, first, stop, WIDTH: tl.constexpr, TRANSPOSED: tl.constexpr
):
    """Features [first, first + WIDTH) of the rows ``index`` of a row-major matrix, zero at and
    beyond ``stop`` and outside ``index_mask``: (rows × WIDTH), or its transpose."""
    ks = first + tl.arange(0, WIDTH)
    k_mask = ks < stop
    if TRANSPOSED:
        block = tl.load(
            ptr + index.to(tl.int64)[None, :] * row_stride + ks[:, None],
            mask=k_mask[:, None] & index_mask[None, :],
            other=0.0,
        )
    else:
        block = tl.load(
            ptr + index.to(tl.int64)[:, None] * row_stride + ks[None, :],
            mask=index_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
    return block


@triton.jit
def affinity_tile(
    K,
    at,
    acc_dtype: tl.constexpr,
    DENSE: tl.constexpr,
    D_CEIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The tile of K at the :class:`TileIndex` ``at`` in ``acc_dtype`` (K already moved to its
    problem: :func:`for_problem`); entries outside the masks are 0.

    Features: Σ over d in chunks of BLOCK_D on the tensor cores (masked loads pad the last
    chunk with zeros, so d need not be a multiple of BLOCK_D), accumulated in ``acc_dtype``
    (fp32, or fp64 for fp64 inputs), then scaled by ``k_scale``.
    """
    if DENSE:
        offsets = at.rows.to(tl.int64)[:, None] * K.row_stride + at.cols.to(tl.int64)[None, :] * K.col_stride
        tile = tl.load(K.k + offsets, mask=at.row_mask[:, None] & at.col_mask[None, :], other=0.0)
    else:
        tile = tl.zeros((at.rows.shape[0], at.cols.shape[0]), dtype=acc_dtype)
        for start in range(0, D_CEIL, BLOCK_D):
            a = feature_block(K.x, K.x_row_stride, at.rows, at.row_mask, start, K.d, BLOCK_D, False)
            b = feature_block(K.y, K.y_row_stride, at.cols, at.col_mask, start, K.d, BLOCK_D, True)
            tile = tl.dot(a, b, tile, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        tile = tile * K.k_scale
    return tile


@triton.jit
def split_columns(n_cols, BLOCK_N: tl.constexpr):
    """[start, stop) of the columns this program reduces: whole BLOCK_N tiles shared out
    evenly over the ``tl.num_programs(1)`` splits (flash-decoding); one split = all columns.
    A trailing split may be empty, and then contributes the identity of its reduction."""
    # Plain integer ceil-divisions: under the interpreter, tl.cdiv (a @triton.jit helper of
    # triton.language) fails when triton was imported before TRITON_INTERPRET was set.
    tiles = (n_cols + BLOCK_N - 1) // BLOCK_N
    splits = tl.num_programs(1)
    per_split = (tiles + splits - 1) // splits
    start = tl.program_id(1) * per_split * BLOCK_N
    stop = tl.minimum(start + per_split * BLOCK_N, n_cols)
    return start, stop
