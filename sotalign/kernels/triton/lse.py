r"""The Sinkhorn half-step: a streaming log-sum-exp over the columns of each row.

    out_i = LSE_{j ∈ split} [(K_ij + bias_j) / ε]

computed in base 2 (``exp2`` is the hardware instruction): with s = log2(e)/ε,
t_ij = K_ij · s + bias_j · s (the bias tile is scaled once per column tile) and

    LSE_j (K_ij + bias_j)/ε = ln 2 · log2 Σ_j 2^{t_ij}.

A program owns BLOCK_M rows of one problem and walks its columns in tiles of BLOCK_N,
keeping for each row a running maximum m and a running sum ℓ of 2^{t − m} in registers (the
online LSE of FlashAttention). For a new tile T with row maxima μ:

    m' = max(m, μ),      ℓ' = ℓ · 2^{m − m'} + Σ_{j ∈ T} 2^{t_ij − m'},

and at the end LSE = ln 2 · (m + log2 ℓ). K never leaves registers. Biases may be −inf (zero
weights, padding): while every entry of a row so far is −inf, m' is −inf and the shift is 0
instead, so the row's LSE is −inf, never NaN.

**Epilogue** (``EPILOGUE``): with one split the kernel writes the new potential itself,
out_i = τ ε (log w_i − LSE_i) (w the marginal, τ the half-step's scale), so a half-step is
one launch; with several splits each program writes the LSE of its own columns and
:func:`update_kernel` combines them (log-sum-exp over the splits; an empty split wrote −inf,
the identity) and applies the epilogue: two launches.

Two kernels: ``lse_kernel`` recomputes K from features, and ``lse_dense_kernel`` streams a
stored K with pipelined loads. ``lse_kernel`` keeps the row block of x in registers across
the column loop (``RESIDENT``, its width; the next column tile is prefetched:
``tl.range(num_stages=STAGES)``) when the rows fit ``RESIDENT_ROW_BYTES``, else it streams x
in chunks of BLOCK_D for every column tile. An fp16x3 operand (``FP16X3``) is resident as
its two distinct parts, lo and hi (its third part repeats hi): K = x_lo·y_hiᵀ + x_hi·y_loᵀ
+ x_hi·y_hiᵀ, three dots per tile on registers loaded once.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import (
    LN2,
    ONLINE_KEY,
    POTENTIAL,
    RATE,
    TileIndex,
    affinity_tile,
    dense_configs,
    feature_block,
    for_problem,
    online_configs,
    partial_offsets,
    program_rows,
    split_columns,
)


@triton.jit
def for_problem_vectors(bias_ptr, log_w_ptr, problem, n_rows, n_cols):
    """The column biases and row log-weights of one problem of a batch (contiguous (B, len))."""
    p = problem.to(tl.int64)
    return bias_ptr + p * n_cols, log_w_ptr + p * n_rows


@triton.jit
def lse_start(BLOCK_M: tl.constexpr, acc_dtype: tl.constexpr):
    """The running maximum and sum of an online LSE before any column: −inf and 0."""
    return tl.full((BLOCK_M,), float("-inf"), dtype=acc_dtype), tl.zeros((BLOCK_M,), dtype=acc_dtype)


@triton.jit
def lse_step(K, k_rate, bias_ptr, cols, col_mask, rate, running):
    """The online LSE (running maximum, running sum) updated by the tile t = K·k_rate +
    bias·rate (−inf outside col_mask), in base 2. The shift is the new maximum, or 0 where
    that is −inf (every entry of the row so far −inf), so that 2^{−inf − shift} = 0 rather
    than NaN."""
    running_max, running_sum = running
    b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0) * rate
    t = tl.where(col_mask[None, :], K * k_rate + b[None, :], float("-inf"))
    new_max = tl.maximum(running_max, tl.max(t, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    running_sum = running_sum * tl.exp2(running_max - shift) + tl.sum(tl.exp2(t - shift[:, None]), axis=1)
    return new_max, running_sum


@triton.jit
def lse_store(
    running,
    log_w_ptr,
    consts_ptr,
    out_ptr,
    problem,
    n_rows,
    rows,
    row_mask,
    EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """Write the LSE of this split, or with EPILOGUE the potential τ ε (log w − LSE).

    ℓ ≥ 1 once a finite entry was seen (its maximum contributes 2^0); a row with none (an
    empty split, or only −inf entries) keeps m = −inf and ℓ = 0, and the clamp makes its LSE
    −inf without evaluating log2(0)."""
    running_max, running_sum = running
    lse = (running_max + tl.log2(tl.maximum(running_sum, 1.0))) * tl.load(consts_ptr + LN2)
    # with EPILOGUE there is one split, and these are the offsets of a (problems, n_rows) output
    offsets = partial_offsets(problem, rows, n_rows, BLOCK_M)
    if EPILOGUE:
        log_w = tl.load(log_w_ptr + rows, mask=row_mask, other=0.0)
        tl.store(out_ptr + offsets, tl.load(consts_ptr + POTENTIAL) * (log_w - lse), mask=row_mask)
    else:
        tl.store(out_ptr + offsets, lse, mask=row_mask)


@triton.jit
def split_part(
    ptr, row_stride, index, index_mask, which, part, WIDTH: tl.constexpr, TRANSPOSED: tl.constexpr
):
    """Part ``which`` (0 or 1) of the rows ``index`` of an fp16x3 split, ``part`` features
    wide, padded to WIDTH (:func:`.tiles.feature_block`)."""
    return feature_block(
        ptr, row_stride, index, index_mask, which * part, which * part + part, WIDTH, TRANSPOSED
    )


@triton.jit
def resident_tile(
    x_lo,
    x_hi,
    K,
    cols,
    col_mask,
    acc_dtype,
    FP16X3: tl.constexpr,
    X_LO_PART: tl.constexpr,
    RESIDENT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """x yᵀ on the columns ``cols`` against the resident rows (x_lo = x_hi = the whole rows,
    or the lo and hi parts of an fp16x3 split; y's lo part is the other of its first two)."""
    if FP16X3:
        part = K.d // 3
        y_hi = split_part(K.y, K.y_row_stride, cols, col_mask, X_LO_PART, part, RESIDENT, True)
        y_lo = split_part(K.y, K.y_row_stride, cols, col_mask, 1 - X_LO_PART, part, RESIDENT, True)
        # the two small cross terms first, as in the split's column order
        tile = tl.dot(x_lo, y_hi, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        tile = tl.dot(x_hi, y_lo, tile, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        tile = tl.dot(x_hi, y_hi, tile, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
    else:
        y = feature_block(K.y, K.y_row_stride, cols, col_mask, 0, K.d, RESIDENT, True)
        tile = tl.dot(x_lo, y, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
    return tile


@triton.autotune(
    configs=online_configs(),
    key=ONLINE_KEY + ["RESIDENT", "FP16X3", "X_LO_PART", "EPILOGUE"],
    cache_results=True,
)
@triton.jit
def lse_kernel(
    K,
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
    FP16X3: tl.constexpr,
    X_LO_PART: tl.constexpr,
    EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
):
    """out = LSE over this split's columns of (K_ij + bias_j)/ε, or the potential (EPILOGUE),
    for the :class:`.tiles.Features` K. ``RESIDENT``: 0 (stream x), or the power-of-two width
    of the resident rows (of each of the lo and hi parts with ``FP16X3``, x's lo part being
    its part ``X_LO_PART``: 0 for [lo, hi, hi], 1 for [hi, lo, hi])."""
    acc_dtype = bias_ptr.dtype.element_ty
    problem, rows, row_mask = program_rows(n_rows, BLOCK_M)
    K = for_problem(K, problem, False)
    bias_ptr, log_w_ptr = for_problem_vectors(bias_ptr, log_w_ptr, problem, n_rows, n_cols)
    col_start, col_stop = split_columns(n_cols, BLOCK_N)
    rate = tl.load(consts_ptr + RATE)
    running = lse_start(BLOCK_M, acc_dtype)

    if RESIDENT > 0:
        # The row block of x, loaded once.
        if FP16X3:
            part = K.d // 3
            x_lo = split_part(K.x, K.x_row_stride, rows, row_mask, X_LO_PART, part, RESIDENT, False)
            x_hi = split_part(K.x, K.x_row_stride, rows, row_mask, 1 - X_LO_PART, part, RESIDENT, False)
        else:
            x_lo = feature_block(K.x, K.x_row_stride, rows, row_mask, 0, K.d, RESIDENT, False)
            x_hi = x_lo
        k_rate = K.k_scale * rate
        for col in tl.range(col_start, col_stop, BLOCK_N, num_stages=STAGES):
            cols = col + tl.arange(0, BLOCK_N)
            col_mask = cols < col_stop
            tile = resident_tile(
                x_lo, x_hi, K, cols, col_mask, acc_dtype, FP16X3, X_LO_PART, RESIDENT, DOT_PRECISION
            )
            running = lse_step(tile, k_rate, bias_ptr, cols, col_mask, rate, running)
    else:
        for col in range(col_start, col_stop, BLOCK_N):
            cols = col + tl.arange(0, BLOCK_N)
            col_mask = cols < col_stop
            at = TileIndex(rows, cols, row_mask, col_mask)
            tile = affinity_tile(K, at, acc_dtype, False, D_CEIL, DOT_PRECISION, BLOCK_D)
            running = lse_step(tile, rate, bias_ptr, cols, col_mask, rate, running)

    lse_store(running, log_w_ptr, consts_ptr, out_ptr, problem, n_rows, rows, row_mask, EPILOGUE, BLOCK_M)


@triton.autotune(
    configs=dense_configs(), key=["ROWS_BUCKET", "COLS_BUCKET", "ROW_MAJOR", "EPILOGUE"], cache_results=True
)
@triton.jit
def lse_dense_kernel(
    K,
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
    """``lse_kernel`` for the :class:`.tiles.Stored` K: the loads of the next STAGES − 1
    column tiles are in flight while this tile's exponentials run. ``ROW_MAJOR`` (1 for the
    row half-step, 0 for the column half-step on the transposed strides) only keys the
    autotuner: the two access patterns tune differently."""
    acc_dtype = bias_ptr.dtype.element_ty
    problem, rows, row_mask = program_rows(n_rows, BLOCK_M)
    K = for_problem(K, problem, True)
    bias_ptr, log_w_ptr = for_problem_vectors(bias_ptr, log_w_ptr, problem, n_rows, n_cols)
    col_start, col_stop = split_columns(n_cols, BLOCK_N)
    rate = tl.load(consts_ptr + RATE)
    running = lse_start(BLOCK_M, acc_dtype)
    for col in tl.range(col_start, col_stop, BLOCK_N, num_stages=STAGES):
        cols = col + tl.arange(0, BLOCK_N)
        col_mask = cols < col_stop
        tile = affinity_tile(K, TileIndex(rows, cols, row_mask, col_mask), acc_dtype, True, 0, "ieee", 0)
        running = lse_step(tile, rate, bias_ptr, cols, col_mask, rate, running)
    lse_store(running, log_w_ptr, consts_ptr, out_ptr, problem, n_rows, rows, row_mask, EPILOGUE, BLOCK_M)


@triton.jit
def update_kernel(partials_ptr, splits, log_w_ptr, consts_ptr, out_ptr, n_rows, BLOCK: tl.constexpr):
    """out_i = τ ε (log w_i − LSE_s partials[s, i]): the second launch of a split half-step
    (rows of every problem of a batch one after the other: n_rows = B·n)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    row_mask = rows < n_rows
    acc_dtype = log_w_ptr.dtype.element_ty
    running_max = tl.full((BLOCK,), float("-inf"), dtype=acc_dtype)
    split_ptr = partials_ptr  # moved on by whole splits: 64-bit pointer arithmetic
    for _ in range(0, splits):
        running_max = tl.maximum(running_max, tl.load(split_ptr + rows, mask=row_mask, other=0.0))
        split_ptr += n_rows
    # a row whose every split is −inf has LSE −inf: shift by 0, not by −inf
    shift = tl.where(running_max == float("-inf"), 0.0, running_max)
    total = tl.zeros((BLOCK,), dtype=acc_dtype)
    split_ptr = partials_ptr
    for _ in range(0, splits):
        total += tl.exp(tl.load(split_ptr + rows, mask=row_mask, other=0.0) - shift)
        split_ptr += n_rows
    lse = shift + tl.log(total)
    log_w = tl.load(log_w_ptr + rows, mask=row_mask, other=0.0)
    tl.store(out_ptr + rows, tl.load(consts_ptr + POTENTIAL) * (log_w - lse), mask=row_mask)
