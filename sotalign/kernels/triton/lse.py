r"""The Sinkhorn half-step: a streaming log-sum-exp over the columns of each row.

    out_i = LSE_{j ∈ split} [(K_ij + bias_j) / ε]

computed in base 2 (``exp2`` is the hardware instruction): with s = log2(e)/ε and the bias
pre-scaled on the host, b_j = bias_j · s, one FMA gives t_ij = K_ij · s + b_j and

    LSE_j (K_ij + bias_j)/ε = ln 2 · log2 Σ_j 2^{t_ij}.

A program owns BLOCK_M rows and walks its columns in tiles of BLOCK_N, keeping for each row
a running maximum m and a running sum ℓ of 2^{t − m} in registers (the online LSE of
FlashAttention). For a new tile T with row maxima μ:

    m' = max(m, μ),      ℓ' = ℓ · 2^{m − m'} + Σ_{j ∈ T} 2^{t_ij − m'},

and at the end LSE = ln 2 · (m + log2 ℓ). K never leaves registers. With several column
splits each program writes the LSE of its own columns and the host combines them with a
log-sum-exp over the splits (an empty split writes −inf, the identity).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import TILE_KEY, affinity_tile, split_columns, tile_configs


@triton.autotune(configs=tile_configs(), key=TILE_KEY)
@triton.jit
def lse_kernel(
    x_ptr,
    y_ptr,
    k_ptr,
    d,
    stride_x,
    stride_y,
    stride_r,
    stride_c,
    bias_ptr,
    consts_ptr,
    out_ptr,
    n_rows,
    n_cols,
    ROWS_BUCKET,
    COLS_BUCKET,
    D_BUCKET,
    DENSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CAST_FP16: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[split, i] = LSE over this split's columns of (K_ij + bias_j)/ε.

    ``bias_ptr`` holds bias_j · log2(e)/ε; ``consts_ptr`` holds [log2(e)/ε, ln 2] in the
    input dtype (a Python float argument would be passed as fp32, too coarse for fp64).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    col_start, col_stop = split_columns(n_cols, BLOCK_N)
    scale = tl.load(consts_ptr)
    ln2 = tl.load(consts_ptr + 1)

    dtype = bias_ptr.dtype.element_ty
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype)
    running_sum = tl.zeros((BLOCK_M,), dtype)
    for col in range(col_start, col_stop, BLOCK_N):
        cols = col + tl.arange(0, BLOCK_N)
        col_mask = cols < col_stop
        K = affinity_tile(
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
            DENSE,
            DOT_PRECISION,
            CAST_FP16,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
        )
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0)
        t = tl.where(col_mask[None, :], K * scale + b[None, :], float("-inf"))
        # Every tile has a valid column, so new_max is finite and 2^{−inf − new_max} = 0
        # handles the first tile.
        new_max = tl.maximum(running_max, tl.max(t, axis=1))
        running_sum = running_sum * tl.exp2(running_max - new_max) + tl.sum(
            tl.exp2(t - new_max[:, None]), axis=1
        )
        running_max = new_max

    # ℓ ≥ 1 once a column was seen (its maximum contributes 2^0); an empty split keeps
    # m = −inf and ℓ = 0, and the clamp makes its LSE −inf without evaluating log2(0).
    lse = (running_max + tl.log2(tl.maximum(running_sum, 1.0))) * ln2
    tl.store(out_ptr + tl.program_id(1) * n_rows + rows, lse, mask=row_mask)
