r"""The Sinkhorn half-step: a streaming log-sum-exp over the columns of each row.

    out_i = LSE_{j ∈ split} [(K_ij + bias_j) / ε]

computed in base 2 (``exp2`` is the hardware instruction): with s = log2(e)/ε,
t_ij = K_ij · s + bias_j · s (the bias tile is scaled once per column tile) and

    LSE_j (K_ij + bias_j)/ε = ln 2 · log2 Σ_j 2^{t_ij}.

A program owns BLOCK_M rows and walks its columns in tiles of BLOCK_N, keeping for each row
a running maximum m and a running sum ℓ of 2^{t − m} in registers (the online LSE of
FlashAttention). For a new tile T with row maxima μ:

    m' = max(m, μ),      ℓ' = ℓ · 2^{m − m'} + Σ_{j ∈ T} 2^{t_ij − m'},

and at the end LSE = ln 2 · (m + log2 ℓ). K never leaves registers.

**Epilogue** (``EPILOGUE``): with one split the kernel writes the new potential itself,
out_i = ε (log w_i − LSE_i) (w the marginal), so a half-step is one launch; with several
splits each program writes the LSE of its own columns and :func:`update_kernel` combines
them (log-sum-exp over the splits; an empty split wrote −inf, the identity) and applies the
epilogue: two launches.

Two kernels: ``lse_kernel`` recomputes K from features (for d_ceil·element size up to
``RESIDENT_ROW_BYTES`` the row block of x is loaded once and stays in registers across the
column loop, whose next tile is prefetched: ``tl.range(num_stages=STAGES)``); and
``lse_dense_kernel`` streams a stored K with pipelined loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import ONLINE_KEY, affinity_tile, dense_configs, online_configs, split_columns


@triton.jit
def lse_step(t, running_max, running_sum):
    """The online LSE update by one tile t (−inf where masked out), in base 2. Every tile has
    a valid column, so the new maximum is finite and 2^{−inf − m'} = 0 handles the first."""
    new_max = tl.maximum(running_max, tl.max(t, axis=1))
    running_sum = running_sum * tl.exp2(running_max - new_max) + tl.sum(tl.exp2(t - new_max[:, None]), axis=1)
    return new_max, running_sum


@triton.jit
def lse_store(
    running_max, running_sum, log_w_ptr, consts_ptr, out_ptr, n_rows, rows, row_mask, EPILOGUE: tl.constexpr
):
    """Write the LSE of this split, or with EPILOGUE the potential ε (log w − LSE).

    ℓ ≥ 1 once a column was seen (its maximum contributes 2^0); an empty split keeps
    m = −inf and ℓ = 0, and the clamp makes its LSE −inf without evaluating log2(0)."""
    lse = (running_max + tl.log2(tl.maximum(running_sum, 1.0))) * tl.load(consts_ptr + 1)
    if EPILOGUE:
        log_w = tl.load(log_w_ptr + rows, mask=row_mask, other=0.0)
        tl.store(out_ptr + rows, tl.load(consts_ptr + 2) * (log_w - lse), mask=row_mask)
    else:
        tl.store(out_ptr + tl.program_id(1) * n_rows + rows, lse, mask=row_mask)


@triton.autotune(configs=online_configs(), key=ONLINE_KEY + ["RESIDENT", "EPILOGUE"], cache_results=True)
@triton.jit
def lse_kernel(
    x_ptr,
    y_ptr,
    d,
    stride_x,
    stride_y,
    k_scale,
    bias_ptr,
    log_w_ptr,
    consts_ptr,
    out_ptr,
    n_rows,
    n_cols,
    ROWS_BUCKET,
    COLS_BUCKET,
    D_CEIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    RESIDENT: tl.constexpr,
    EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
):
    """out = LSE over this split's columns of (K_ij + bias_j)/ε, or the potential (EPILOGUE),
    for K = k_scale · x yᵀ.

    ``consts_ptr`` holds [log2(e)/ε, ln 2, ε] in the potentials' dtype (a Python float
    argument would be passed as fp32, too coarse for fp64).
    """
    acc_dtype = bias_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    col_start, col_stop = split_columns(n_cols, BLOCK_N)
    scale = tl.load(consts_ptr)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=acc_dtype)
    running_sum = tl.zeros((BLOCK_M,), dtype=acc_dtype)

    if RESIDENT:
        # The whole row block of x, loaded once (D_CEIL is a power of two here).
        ks = tl.arange(0, D_CEIL)
        k_mask = ks < d
        xa = tl.load(
            x_ptr + rows[:, None] * stride_x + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        for col in tl.range(col_start, col_stop, BLOCK_N, num_stages=STAGES):
            cols = col + tl.arange(0, BLOCK_N)
            col_mask = cols < col_stop
            yb = tl.load(
                y_ptr + cols[None, :] * stride_y + ks[:, None],
                mask=k_mask[:, None] & col_mask[None, :],
                other=0.0,
            )
            K = tl.dot(xa, yb, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
            b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0) * scale
            t = tl.where(col_mask[None, :], K * (k_scale * scale) + b[None, :], float("-inf"))
            running_max, running_sum = lse_step(t, running_max, running_sum)
    else:
        for col in range(col_start, col_stop, BLOCK_N):
            cols = col + tl.arange(0, BLOCK_N)
            col_mask = cols < col_stop
            K = affinity_tile(
                x_ptr,
                y_ptr,
                x_ptr,
                d,
                stride_x,
                stride_y,
                0,
                0,
                k_scale,
                rows,
                cols,
                row_mask,
                col_mask,
                acc_dtype,
                False,
                D_CEIL,
                DOT_PRECISION,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
            )
            b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0) * scale
            t = tl.where(col_mask[None, :], K * scale + b[None, :], float("-inf"))
            running_max, running_sum = lse_step(t, running_max, running_sum)

    lse_store(running_max, running_sum, log_w_ptr, consts_ptr, out_ptr, n_rows, rows, row_mask, EPILOGUE)


@triton.autotune(
    configs=dense_configs(), key=["ROWS_BUCKET", "COLS_BUCKET", "ROW_MAJOR", "EPILOGUE"], cache_results=True
)
@triton.jit
def lse_dense_kernel(
    k_ptr,
    stride_r,
    stride_c,
    bias_ptr,
    log_w_ptr,
    consts_ptr,
    out_ptr,
    n_rows,
    n_cols,
    ROWS_BUCKET,
    COLS_BUCKET,
    ROW_MAJOR,
    EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    """``lse_kernel`` for a stored K: the loads of the next STAGES − 1 column tiles are in
    flight while this tile's exponentials run. ``ROW_MAJOR`` (1 for the row half-step, 0
    for the column half-step on the transposed strides) only keys the autotuner: the two
    access patterns tune differently."""
    acc_dtype = bias_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    col_start, col_stop = split_columns(n_cols, BLOCK_N)
    scale = tl.load(consts_ptr)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=acc_dtype)
    running_sum = tl.zeros((BLOCK_M,), dtype=acc_dtype)
    row_offsets = rows.to(tl.int64)[:, None] * stride_r
    for col in tl.range(col_start, col_stop, BLOCK_N, num_stages=STAGES):
        cols = col + tl.arange(0, BLOCK_N)
        col_mask = cols < col_stop
        K = tl.load(
            k_ptr + row_offsets + cols.to(tl.int64)[None, :] * stride_c,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0) * scale
        t = tl.where(col_mask[None, :], K * scale + b[None, :], float("-inf"))
        running_max, running_sum = lse_step(t, running_max, running_sum)
    lse_store(running_max, running_sum, log_w_ptr, consts_ptr, out_ptr, n_rows, rows, row_mask, EPILOGUE)


@triton.jit
def update_kernel(partials_ptr, splits, log_w_ptr, consts_ptr, out_ptr, n_rows, BLOCK: tl.constexpr):
    """out_i = ε (log w_i − LSE_s partials[s, i]): the second launch of a split half-step."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    acc_dtype = log_w_ptr.dtype.element_ty
    running_max = tl.full((BLOCK,), float("-inf"), dtype=acc_dtype)
    for split in range(0, splits):
        running_max = tl.maximum(
            running_max, tl.load(partials_ptr + split * n_rows + rows, mask=row_mask, other=0.0)
        )
    total = tl.zeros((BLOCK,), dtype=acc_dtype)
    for split in range(0, splits):
        part = tl.load(partials_ptr + split * n_rows + rows, mask=row_mask, other=0.0)
        total += tl.exp(part - running_max)
    lse = running_max + tl.log(total)
    log_w = tl.load(log_w_ptr + rows, mask=row_mask, other=0.0)
    tl.store(out_ptr + rows, tl.load(consts_ptr + 2) * (log_w - lse), mask=row_mask)
