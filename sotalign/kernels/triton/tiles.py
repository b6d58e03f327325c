"""Building blocks shared by the kernels: one tile of K, a program's column range, configs.

An affinity operand is passed to a kernel as ``(x, y, k, d, stride_x, stride_y, stride_r,
stride_c, k_scale)`` plus two compile-time constants, ``DENSE`` and ``D_CEIL``:

* features (``DENSE=False``): K_ij = k_scale · Σ_t x_it y_jt, x (rows × d) and y (cols × d)
  row-major, in fp32/fp64 or, for the fp16 precisions, already rounded to fp16 on the host
  (once per solve; ``k_scale`` undoes the power-of-two scaling of fp16x3, else it is 1).
  ``D_CEIL`` is d rounded up to a multiple of ``D_QUANTUM``: the d loop has a trip count
  known at compile time (pipelined without a runtime bound), at the price of one compiled
  variant per 64 features;
* stored (``DENSE=True``): K_ij = k[i·stride_r + j·stride_c]. Swapping the two strides reads
  Kᵀ from the same row-major buffer, which is how column reductions run as row reductions.

Autotuning is keyed on sizes bucketed to the next power of two (``*_BUCKET`` arguments),
so a batch size that changes every step reuses the tuned config instead of retuning, and
the tuned configs are cached on disk by Triton (``cache_results=True``: the next process
reads them instead of benchmarking again).

``tl.dot`` is always given ``out_dtype`` = the accumulator's dtype: triton 3.6 defaults it
to fp32 and then rejects an fp64 accumulator (3.9 infers it).
"""

from __future__ import annotations

import os

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
#: Feature rows of at most this many bytes (d_ceil × element size) stay resident in
#: registers across the column loop of the half-step (e.g. d ≤ 128 in fp32, ≤ 256 in fp16;
#: tensor-core dots only).
RESIDENT_ROW_BYTES = 512


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
def affinity_tile(
    x_ptr,
    y_ptr,
    k_ptr,
    d,
    stride_x,
    stride_y,
    stride_r,
    stride_c,
    k_scale,
    rows,
    cols,
    row_mask,
    col_mask,
    acc_dtype: tl.constexpr,
    DENSE: tl.constexpr,
    D_CEIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The tile K[rows, cols] in ``acc_dtype``; entries outside the masks are 0.

    Features: Σ over d in chunks of BLOCK_D on the tensor cores (masked loads pad the last
    chunk with zeros, so d need not be a multiple of BLOCK_D), accumulated in ``acc_dtype``
    (fp32, or fp64 for fp64 inputs), then scaled by ``k_scale``.
    """
    if DENSE:
        # int64 offsets: a stored 65536 × 65536 K has more than 2^31 entries.
        offsets = rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c
        tile = tl.load(k_ptr + offsets, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
    else:
        tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
        for start in range(0, D_CEIL, BLOCK_D):
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
            tile = tl.dot(a, b, tile, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        tile = tile * k_scale
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
