r"""Streaming products with the entropic plan, and the fused KLOT value and gradient.

With s = log2(e)/ε and the potentials pre-scaled on the host (a_i = f_i·s, b_j = g_j·s),
an entry of the plan is one FMA and one exp2:

    P_ij = exp((f_i + g_j + K_ij)/ε) = 2^{K_ij·s + a_i + b_j}.

A plan reaches a kernel as one :class:`Plan` argument: the affinity (:mod:`.tiles`) and its
two pre-scaled potentials; a batch of problems is one launch like in :mod:`.lse`, and a
potential of −inf gives its row or column exactly zero plan mass.

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
  u = r = c = 0, w = 1. Entries with P = 0 add nothing, even where their difference of logs
  is not finite (zero weights). Programs write per-row partial sums (fp32 for fp32 inputs);
  the host adds them in float64.
* ``plan_difference_kernel``: G = (P − P*)/ε written out, for a stored student K.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import triton
import triton.language as tl

from .tiles import (
    INV_EPS,
    RATE,
    RATE_T,
    TILE_KEY,
    TileIndex,
    U,
    W,
    affinity_tile,
    for_problem,
    online_configs,
    partial_offsets,
    product_block_k,
    product_configs,
    program_rows,
    split_columns,
)


class Plan(NamedTuple):
    """An affinity (:class:`.tiles.Features` or :class:`.tiles.Stored`) with a row vector a
    and a column vector b: for a plan, the potentials scaled by log2(e)/ε."""

    K: Any
    a: Any
    b: Any


@triton.jit
def plan_for_problem(S, problem, n_rows, n_cols, DENSE: tl.constexpr):
    """The plan of one problem of a batch (its vectors are contiguous (B, len))."""
    p = problem.to(tl.int64)
    return Plan(for_problem(S.K, problem, DENSE), S.a + p * n_rows, S.b + p * n_cols)


@triton.jit
def plan_tile(
    S, rate, at, DENSE: tl.constexpr, D_CEIL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr
):
    """(P tile, K tile) at ``at`` with P_ij = 2^{K_ij·rate + a_i + b_j}, in the potentials' dtype."""
    K = affinity_tile(S.K, at, S.a.dtype.element_ty, DENSE, D_CEIL, DOT_PRECISION, BLOCK_D)
    a = tl.load(S.a + at.rows, mask=at.row_mask, other=0.0)
    b = tl.load(S.b + at.cols, mask=at.col_mask, other=0.0)
    return tl.exp2(K * rate + a[:, None] + b[None, :]), K


@triton.jit
def weight_tile(
    S,
    T,
    consts_ptr,
    at,
    DENSE: tl.constexpr,
    D_CEIL: tl.constexpr,
    DENSE_T: tl.constexpr,
    D_CEIL_T: tl.constexpr,
    HAS_TEACHER: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The tile of P (student S), or with HAS_TEACHER of G = (P − P*)/ε (teacher T)."""
    weights, _ = plan_tile(S, tl.load(consts_ptr + RATE), at, DENSE, D_CEIL, DOT_PRECISION, BLOCK_D)
    if HAS_TEACHER:
        teacher, _ = plan_tile(T, tl.load(consts_ptr + RATE_T), at, DENSE_T, D_CEIL_T, DOT_PRECISION, BLOCK_D)
        weights = (weights - teacher) * tl.load(consts_ptr + INV_EPS)
    return weights


@triton.autotune(
    configs=product_configs(),
    key=TILE_KEY + ["D_CEIL_T", "OUT_BUCKET", "DENSE_T", "HAS_TEACHER", "PRODUCT_PRECISION"],
    cache_results=True,
)
@triton.heuristics({"BLOCK_K": product_block_k})
@triton.jit
def plan_product_kernel(
    S,
    T,
    v_ptr,
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
    """out[split, problem, i, k] = Σ_{j ∈ split} W_ij V_jk, W = P or (P − P*)/ε
    (:func:`weight_tile`; T is read only when HAS_TEACHER), V contiguous (B, n_cols, n_out)."""
    problem, rows, row_mask = program_rows(n_rows, BLOCK_M)
    S = plan_for_problem(S, problem, n_rows, n_cols, DENSE)
    T = plan_for_problem(T, problem, n_rows, n_cols, DENSE_T)
    v_ptr += problem.to(tl.int64) * n_cols * n_out
    outs = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    out_mask = outs < n_out
    col_start, col_stop = split_columns(n_cols, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=S.a.dtype.element_ty)
    for col in range(col_start, col_stop, BLOCK_N):
        cols = col + tl.arange(0, BLOCK_N)
        col_mask = cols < col_stop
        at = TileIndex(rows, cols, row_mask, col_mask)
        weights = weight_tile(
            S, T, consts_ptr, at, DENSE, D_CEIL, DENSE_T, D_CEIL_T, HAS_TEACHER, DOT_PRECISION, BLOCK_D
        )
        weights = tl.where(col_mask[None, :], weights, 0.0)
        V = tl.load(
            v_ptr + cols.to(tl.int64)[:, None] * n_out + outs[None, :],
            mask=col_mask[:, None] & out_mask[None, :],
            other=0.0,
        )
        acc = tl.dot(weights, V, acc, input_precision=PRODUCT_PRECISION, out_dtype=acc.dtype)

    offsets = partial_offsets(problem, rows, n_rows, BLOCK_M)[:, None] * n_out + outs[None, :]
    tl.store(out_ptr + offsets, acc, mask=row_mask[:, None] & out_mask[None, :])


@triton.autotune(configs=online_configs(), key=TILE_KEY + ["DENSE_B", "D_CEIL_B"], cache_results=True)
@triton.jit
def plan_sum_kernel(
    A,
    B,
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
    """out[split, problem, i] = Σ_{j ∈ split} P_ij (u·A_ij + w·B_ij + r_i + c_j), P the plan
    A, with r and c the vectors of B."""
    problem, rows, row_mask = program_rows(n_rows, BLOCK_M)
    A = plan_for_problem(A, problem, n_rows, n_cols, DENSE)
    B = plan_for_problem(B, problem, n_rows, n_cols, DENSE_B)
    col_start, col_stop = split_columns(n_cols, BLOCK_N)
    rate = tl.load(consts_ptr + RATE)
    u = tl.load(consts_ptr + U)
    w = tl.load(consts_ptr + W)
    r = tl.load(B.a + rows, mask=row_mask, other=0.0)

    # Per-row sums: a (BLOCK_M × BLOCK_N) accumulator beside the P, A and B tiles about
    # doubles the registers that spill on sm_90 (ptxas -v on the compiled kernels).
    acc = tl.zeros((BLOCK_M,), dtype=A.a.dtype.element_ty)
    for col in range(col_start, col_stop, BLOCK_N):
        cols = col + tl.arange(0, BLOCK_N)
        col_mask = cols < col_stop
        at = TileIndex(rows, cols, row_mask, col_mask)
        P, K_a = plan_tile(A, rate, at, DENSE, D_CEIL, DOT_PRECISION, BLOCK_D)
        K_b = affinity_tile(B.K, at, A.a.dtype.element_ty, DENSE_B, D_CEIL_B, DOT_PRECISION, BLOCK_D)
        c = tl.load(B.b + cols, mask=col_mask, other=0.0)
        term = P * ((u * K_a + w * K_b) + (r[:, None] + c[None, :]))
        # zero plan mass adds nothing, even where the logs are infinite (zero weights)
        keep = row_mask[:, None] & col_mask[None, :] & (P > 0.0)
        acc += tl.sum(tl.where(keep, term, 0.0), axis=1)

    tl.store(out_ptr + partial_offsets(problem, rows, n_rows, BLOCK_M), acc, mask=row_mask)


@triton.autotune(configs=online_configs(), key=TILE_KEY + ["DENSE_T", "D_CEIL_T"], cache_results=True)
@triton.jit
def plan_difference_kernel(
    S,
    T,
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
    """out[tile] = (P − P*)/ε on the (program 0, program 1) tile of one problem.
    ``out`` may be the student's stored K itself: each program reads its tiles before it
    writes the same offsets."""
    _, rows, row_mask = program_rows(n_rows, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    at = TileIndex(rows, cols, row_mask, col_mask)
    G = weight_tile(S, T, consts_ptr, at, DENSE, D_CEIL, DENSE_T, D_CEIL_T, True, DOT_PRECISION, BLOCK_D)
    offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(out_ptr + offsets, G, mask=row_mask[:, None] & col_mask[None, :])
