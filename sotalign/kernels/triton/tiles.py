"""Building blocks shared by the kernels: one tile of K, a program's column range, configs.

An affinity operand is passed to a kernel as ``(x, y, k, d, stride_x, stride_y, stride_r,
stride_c)`` plus a ``DENSE`` flag:

* features (``DENSE=False``): K_ij = Σ_t x_it y_jt, x (rows × d) and y (cols × d) row-major;
* stored (``DENSE=True``): K_ij = k[i·stride_r + j·stride_c]. Swapping the two strides reads
  Kᵀ from the same row-major buffer, which is how column reductions run as row reductions.

Autotuning is keyed on sizes bucketed to the next power of two (``*_BUCKET`` arguments),
so a batch size that changes every step reuses the tuned config instead of retuning.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

#: Read when this module is imported, the same moment ``triton.jit`` reads it.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

#: Keys of the autotuner: bucketed sizes plus every flag that changes the compiled code.
TILE_KEY = ["ROWS_BUCKET", "COLS_BUCKET", "D_BUCKET", "DENSE", "DOT_PRECISION", "CAST_FP16"]


def tile_configs() -> list[triton.Config]:
    """Tiles for the kernels that reduce a (BLOCK_M × BLOCK_N) tile of K.

    Under the interpreter one small config (tuning there only costs time); the tiles are
    ≥ 16 wide as ``tl.dot`` requires, and small enough that the tests cross tile borders.
    """
    if INTERPRETING:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_D": 32}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_D": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 64}, num_warps=4, num_stages=3),
    ]


def product_configs() -> list[triton.Config]:
    """Tiles for the plan products, which also hold a (BLOCK_M × BLOCK_K) output block."""
    if INTERPRETING:
        return [
            triton.Config(
                {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_D": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1
            )
        ]
    return [
        triton.Config(
            {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "BLOCK_K": 64}, num_warps=4, num_stages=3
        ),
        triton.Config(
            {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_D": 32, "BLOCK_K": 128}, num_warps=8, num_stages=2
        ),
        triton.Config(
            {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": 32, "BLOCK_K": 64}, num_warps=8, num_stages=2
        ),
    ]


@triton.jit
def affinity_tile(
    x_ptr,
    y_ptr,
    k_ptr,
    d,
    stride_x,
    stride_y,
    stride_r,
    stride_c,
    rows,
    cols,
    row_mask,
    col_mask,
    DENSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CAST_FP16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The tile K[rows, cols], in the input dtype; entries outside the masks are 0.

    Features: Σ over d in chunks of BLOCK_D on the tensor cores (masked loads pad the last
    chunk with zeros, so d need not be a power of two). With CAST_FP16 the chunks are
    rounded to fp16 for the dot; the products accumulate in fp32 either way.
    """
    if DENSE:
        # int64 offsets: a stored 65536 × 65536 K has more than 2^31 entries.
        offsets = rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c
        tile = tl.load(k_ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    else:
        tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=x_ptr.dtype.element_ty)
        for start in range(0, d, BLOCK_D):
            ks = start + tl.arange(0, BLOCK_D)
            k_mask = ks < d
            a = tl.load(
                x_ptr + rows[:, None] * stride_x + ks[None, :],
                mask=row_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            b = tl.load(
                y_ptr + cols[None, :] * stride_y + ks[:, None],
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            if CAST_FP16:
                a = a.to(tl.float16)
                b = b.to(tl.float16)
            tile = tl.dot(a, b, tile, input_precision=DOT_PRECISION)
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
