r"""Streaming products with the entropic plan, and the fused KLOT value and gradient.

With s = log2(e)/ε and the potentials pre-scaled on the host (a_i = f_i·s, b_j = g_j·s),
an entry of the plan is one FMA and one exp2:

    P_ij = exp((f_i + g_j + K_ij)/ε) = 2^{K_ij·s + a_i + b_j}.

Three kernels, each walking the columns of a block of rows like :mod:`.lse`:

* ``plan_product_kernel``: out = W V with W = P, or W = G = (P − P*)/ε when a teacher is
  given (the KLOT backward: G y over row blocks, and Gᵀ x as the same kernel on the
  transposed operands, so no atomics). The W tile is formed in registers and fed to
  ``tl.dot`` against a (BLOCK_N × BLOCK_K) tile of V on the tensor cores, accumulating in
  fp32 (fp64 inputs: fp64), with ``PRODUCT_PRECISION`` "tf32x3" for the fp32-accurate
  precisions, "tf32" for tf32/fp16 and "ieee" for fp32/fp64 (never fp16 operands: P's tiny
  entries would underflow). The output block is the whole output width up to 256
  (``BLOCK_K``), so each W tile is formed once; wider outputs take several programs.
* ``plan_sum_kernel``: Σ_ij P_ij (u·A_ij + w·B_ij + r_i + c_j) with P formed from A. The
  KLOT value is A = K*, B = K, u = 1/ε*, w = −1/ε, r_i = f*_i/ε* − f_i/ε,
  c_j = g*_j/ε* − g_j/ε, i.e. Σ P*_ij (log P*_ij − log P_ij) with the difference of logs
  formed per entry before it is weighted (the potentials' parts are subtracted once, on
  the host, instead of cancelling inside every term); ``plan_inner`` is A = K, B = K2,
  u = r = c = 0, w = 1. Programs write per-row partial sums (fp32 for fp32 inputs); the
  host adds them in float64.
* ``plan_difference_kernel``: G = (P − P*)/ε written out, for a stored student K.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tiles import TILE_KEY, affinity_tile, online_configs, product_block_k, product_configs, split_columns


@triton.jit
def plan_tile(
    x_ptr,
    y_ptr,
    k_ptr,
    d,
    stride_x,
    stride_y,
    stride_r,
    stride_c,
    k_scale,
    a_ptr,
    b_ptr,
    scale,
    rows,
    cols,
    row_mask,
    col_mask,
    DENSE: tl.constexpr,
    D_CEIL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """(P tile, K tile) with P_ij = 2^{K_ij·scale + a_i + b_j}, in the potentials' dtype."""
    K = affinity_tile(
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
        a_ptr.dtype.element_ty,
        DENSE,
        D_CEIL,
        DOT_PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
    )
    a = tl.load(a_ptr + rows, mask=row_mask, other=0.0)
    b = tl.load(b_ptr + cols, mask=col_mask, other=0.0)
    return tl.exp2(K * scale + a[:, None] + b[None, :]), K


@triton.autotune(
    configs=product_configs(),
    key=TILE_KEY + ["D_CEIL_T", "OUT_BUCKET", "DENSE_T", "HAS_TEACHER", "PRODUCT_PRECISION"],
    cache_results=True,
)
@triton.heuristics({"BLOCK_K": product_block_k})
@triton.jit
def plan_product_kernel(
    x_ptr,
    y_ptr,
    k_ptr,
    d,
    stride_x,
    stride_y,
    stride_r,
    stride_c,
    k_scale,
    a_ptr,
    b_ptr,
    xt_ptr,
    yt_ptr,
    kt_ptr,
    d_t,
    stride_xt,
    stride_yt,
    stride_rt,
    stride_ct,
    k_scale_t,
    at_ptr,
    bt_ptr,
    v_ptr,
    stride_v,
    out_ptr,
    consts_ptr,
    n_rows,
    n_cols,
    n_out,
    ROWS_BUCKET,
    COLS_BUCKET,
    OUT_BUCKET,
    DENSE: tl.constexpr,
    D_CEIL: tl.constexpr,
    DENSE_T: tl.constexpr,
    D_CEIL_T: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PRODUCT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[split, i, k] = Σ_{j ∈ split} W_ij V_jk, W = P or (P − P*)/ε.

    ``consts_ptr`` holds [log2(e)/ε, log2(e)/ε*, 1/ε]; the teacher arguments are read only
    when HAS_TEACHER.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    outs = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    out_mask = outs < n_out
    col_start, col_stop = split_columns(n_cols, BLOCK_N)
    scale = tl.load(consts_ptr)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=a_ptr.dtype.element_ty)
    for col in range(col_start, col_stop, BLOCK_N):
        cols = col + tl.arange(0, BLOCK_N)
        col_mask = cols < col_stop
        W, _ = plan_tile(
            x_ptr,
            y_ptr,
            k_ptr,
            d,
            stride_x,
            stride_y,
            stride_r,
            stride_c,
            k_scale,
            a_ptr,
            b_ptr,
            scale,
            rows,
            cols,
            row_mask,
            col_mask,
            DENSE,
            D_CEIL,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
        )
        if HAS_TEACHER:
            W_t, _ = plan_tile(
                xt_ptr,
                yt_ptr,
                kt_ptr,
                d_t,
                stride_xt,
                stride_yt,
                stride_rt,
                stride_ct,
                k_scale_t,
                at_ptr,
                bt_ptr,
                tl.load(consts_ptr + 1),
                rows,
                cols,
                row_mask,
                col_mask,
                DENSE_T,
                D_CEIL_T,
                DOT_PRECISION,
                BLOCK_M,
                BLOCK_N,
                BLOCK_D,
            )
            W = (W - W_t) * tl.load(consts_ptr + 2)
        W = tl.where(col_mask[None, :], W, 0.0)
        V = tl.load(
            v_ptr + cols[:, None] * stride_v + outs[None, :],
            mask=col_mask[:, None] & out_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(W, V, acc, input_precision=PRODUCT_PRECISION, out_dtype=acc.dtype)

    offsets = (tl.program_id(1).to(tl.int64) * n_rows + rows[:, None]) * n_out + outs[None, :]
    tl.store(out_ptr + offsets, acc, mask=row_mask[:, None] & out_mask[None, :])


@triton.autotune(configs=online_configs(), key=TILE_KEY + ["DENSE_B", "D_CEIL_B"], cache_results=True)
@triton.jit
def plan_sum_kernel(
    x_ptr,
    y_ptr,
    k_ptr,
    d,
    stride_x,
    stride_y,
    stride_r,
    stride_c,
    k_scale,
    a_ptr,
    b_ptr,
    xb_ptr,
    yb_ptr,
    kb_ptr,
    d_b,
    stride_xb,
    stride_yb,
    stride_rb,
    stride_cb,
    k_scale_b,
    r_ptr,
    c_ptr,
    consts_ptr,
    out_ptr,
    n_rows,
    n_cols,
    ROWS_BUCKET,
    COLS_BUCKET,
    DENSE: tl.constexpr,
    D_CEIL: tl.constexpr,
    DENSE_B: tl.constexpr,
    D_CEIL_B: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
):
    """out[split, i] = Σ_{j ∈ split} P_ij (u·A_ij + w·B_ij + r_i + c_j), P from A;
    ``consts_ptr`` holds [log2(e)/ε_A, u, w]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    col_start, col_stop = split_columns(n_cols, BLOCK_N)
    scale = tl.load(consts_ptr)
    u = tl.load(consts_ptr + 1)
    w = tl.load(consts_ptr + 2)
    r = tl.load(r_ptr + rows, mask=row_mask, other=0.0)

    # Per-row sums: a (BLOCK_M × BLOCK_N) accumulator beside the P, A and B tiles about
    # doubles the registers that spill on sm_90 (ptxas -v on the compiled kernels).
    acc = tl.zeros((BLOCK_M,), dtype=a_ptr.dtype.element_ty)
    for col in range(col_start, col_stop, BLOCK_N):
        cols = col + tl.arange(0, BLOCK_N)
        col_mask = cols < col_stop
        P, A = plan_tile(
            x_ptr,
            y_ptr,
            k_ptr,
            d,
            stride_x,
            stride_y,
            stride_r,
            stride_c,
            k_scale,
            a_ptr,
            b_ptr,
            scale,
            rows,
            cols,
            row_mask,
            col_mask,
            DENSE,
            D_CEIL,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
        )
        B = affinity_tile(
            xb_ptr,
            yb_ptr,
            kb_ptr,
            d_b,
            stride_xb,
            stride_yb,
            stride_rb,
            stride_cb,
            k_scale_b,
            rows,
            cols,
            row_mask,
            col_mask,
            a_ptr.dtype.element_ty,
            DENSE_B,
            D_CEIL_B,
            DOT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_D,
        )
        c = tl.load(c_ptr + cols, mask=col_mask, other=0.0)
        term = P * ((u * A + w * B) + (r[:, None] + c[None, :]))
        acc += tl.sum(tl.where(row_mask[:, None] & col_mask[None, :], term, 0.0), axis=1)

    tl.store(out_ptr + tl.program_id(1) * n_rows + rows, acc, mask=row_mask)


@triton.autotune(configs=online_configs(), key=TILE_KEY + ["DENSE_T", "D_CEIL_T"], cache_results=True)
@triton.jit
def plan_difference_kernel(
    x_ptr,
    y_ptr,
    k_ptr,
    d,
    stride_x,
    stride_y,
    stride_r,
    stride_c,
    k_scale,
    a_ptr,
    b_ptr,
    xt_ptr,
    yt_ptr,
    kt_ptr,
    d_t,
    stride_xt,
    stride_yt,
    stride_rt,
    stride_ct,
    k_scale_t,
    at_ptr,
    bt_ptr,
    consts_ptr,
    out_ptr,
    n_rows,
    n_cols,
    ROWS_BUCKET,
    COLS_BUCKET,
    DENSE: tl.constexpr,
    D_CEIL: tl.constexpr,
    DENSE_T: tl.constexpr,
    D_CEIL_T: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    STAGES: tl.constexpr,
):
    """out[tile] = (P − P*)/ε on the (program 0, program 1) tile; consts as in the product.
    ``out`` may be the student's stored K itself: each program reads its tiles before it
    writes the same offsets."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    P, _ = plan_tile(
        x_ptr,
        y_ptr,
        k_ptr,
        d,
        stride_x,
        stride_y,
        stride_r,
        stride_c,
        k_scale,
        a_ptr,
        b_ptr,
        tl.load(consts_ptr),
        rows,
        cols,
        row_mask,
        col_mask,
        DENSE,
        D_CEIL,
        DOT_PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
    )
    P_t, _ = plan_tile(
        xt_ptr,
        yt_ptr,
        kt_ptr,
        d_t,
        stride_xt,
        stride_yt,
        stride_rt,
        stride_ct,
        k_scale_t,
        at_ptr,
        bt_ptr,
        tl.load(consts_ptr + 1),
        rows,
        cols,
        row_mask,
        col_mask,
        DENSE_T,
        D_CEIL_T,
        DOT_PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_D,
    )
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(
        out_ptr + offsets, (P - P_t) * tl.load(consts_ptr + 2), mask=row_mask[:, None] & col_mask[None, :]
    )
