// Streaming log-sum-exp half-steps of log-domain Sinkhorn over a stored or recomputed K:
//
//   lse_rows[i] = LSE_j (K_ij + bias_j) / ε,      lse_cols[j] = LSE_i (K_ij + bias_i) / ε.
//
// Work is done in base 2 on t = K·s + bias·s with s = log2(e)/ε (one FMA per entry), keeping a
// running maximum M and a sum S = Σ 2^(t − M); the result is ln2 · (M + log2 S).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <omp.h>

#include "affinity.hpp"
#include "fast_exp.hpp"

namespace sotalign {

// max by value: std::max returns a reference, which turns a vector max into a masked load.
template <class T>
inline T vmax(T a, T b) { return a > b ? a : b; }

// Folds cols entries of one row (t_j = row[j]·s + bs[j]) into its running (M, S).
template <class T>
inline void fold_row(const T* __restrict row, ptrdiff_t cols, const T* __restrict bs, T s, T& M, T& S) {
    T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
    for (ptrdiff_t j = 0; j < cols; ++j) mx = vmax(mx, row[j] * s + bs[j]);
    const T new_max = std::max(M, mx);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (ptrdiff_t j = 0; j < cols; ++j) sum += fast_exp2<T>(row[j] * s + bs[j] - new_max);
    S = S * fast_exp2<T>(M - new_max) + sum;
    M = new_max;
}

// Folds R rows of a tile into per-column running (M, S): the block maximum is taken first so
// that each column is rescaled once per R rows (R + 1 exponentials for R entries).
template <class T, int R>
inline void fold_cols(const T* __restrict tile, ptrdiff_t ld, ptrdiff_t cols, const T* __restrict bs,
                      T s, T* __restrict M, T* __restrict S) {
#pragma omp simd
    for (ptrdiff_t j = 0; j < cols; ++j) {
        // t is recomputed rather than kept in an array: the loads hit L1 and the loop stays
        // straight-line once the row loops are unrolled, so it vectorises over j.
        T block_max = tile[j] * s + bs[0];
#pragma GCC unroll 16
        for (int r = 1; r < R; ++r) block_max = vmax(block_max, tile[r * ld + j] * s + bs[r]);
        const T new_max = vmax(M[j], block_max);
        T sum = S[j] * fast_exp2<T>(M[j] - new_max);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) sum += fast_exp2<T>(tile[r * ld + j] * s + bs[r] - new_max);
        S[j] = sum;
        M[j] = new_max;
    }
}

template <class T>
inline T finish_lse(T M, T S) { return T(kLn2) * (M + std::log2(S)); }

template <class T>
void lse_rows(const AffinitySource<T>& K, const T* bias, T eps, T* out, int num_threads) {
    const ptrdiff_t n = K.n, m = K.m, tc = K.tile_cols();
    const T s = T(kLog2e) / eps;
    std::vector<T> bs(m);
    for (ptrdiff_t j = 0; j < m; ++j) bs[j] = bias[j] * s;
    const ptrdiff_t blocks = (n + kTileRows - 1) / kTileRows;
#pragma omp parallel num_threads(useful_threads(n * m, num_threads))
    {
        std::vector<T> scratch(K.scratch_size());
#pragma omp for schedule(dynamic, 1)
        for (ptrdiff_t b = 0; b < blocks; ++b) {
            const ptrdiff_t r0 = b * kTileRows;
            const int rows = int(std::min<ptrdiff_t>(kTileRows, n - r0));
            T M[kTileRows], S[kTileRows];
            std::fill(M, M + rows, -std::numeric_limits<T>::infinity());
            std::fill(S, S + rows, T(0));
            for (ptrdiff_t c0 = 0; c0 < m; c0 += tc) {
                const ptrdiff_t cols = std::min(tc, m - c0);
                ptrdiff_t ld;
                const T* tile = K.tile(r0, rows, c0, cols, scratch.data(), ld);
                for (int r = 0; r < rows; ++r) fold_row(tile + r * ld, cols, bs.data() + c0, s, M[r], S[r]);
            }
            for (int r = 0; r < rows; ++r) out[r0 + r] = finish_lse(M[r], S[r]);
        }
    }
}

template <class T>
void lse_cols(const AffinitySource<T>& K, const T* bias, T eps, T* out, int num_threads) {
    const ptrdiff_t n = K.n, m = K.m, tc = K.tile_cols();
    const T s = T(kLog2e) / eps;
    std::vector<T> bs(n);
    for (ptrdiff_t i = 0; i < n; ++i) bs[i] = bias[i] * s;
    const ptrdiff_t blocks = (n + kTileRows - 1) / kTileRows;
    num_threads = useful_threads(n * m, int(std::min<ptrdiff_t>(num_threads, blocks)));
    // Per-thread running (M, S) over all columns, merged once at the end.
    std::vector<T> M(size_t(num_threads) * m, -std::numeric_limits<T>::infinity());
    std::vector<T> S(size_t(num_threads) * m, T(0));
#pragma omp parallel num_threads(num_threads)
    {
        std::vector<T> scratch(K.scratch_size());
        T* Mt = M.data() + size_t(omp_get_thread_num()) * m;
        T* St = S.data() + size_t(omp_get_thread_num()) * m;
#pragma omp for schedule(dynamic, 2)  // dynamic: a thread that is preempted holds back little
        for (ptrdiff_t b = 0; b < blocks; ++b) {
            const ptrdiff_t r0 = b * kTileRows;
            const int rows = int(std::min<ptrdiff_t>(kTileRows, n - r0));
            for (ptrdiff_t c0 = 0; c0 < m; c0 += tc) {
                const ptrdiff_t cols = std::min(tc, m - c0);
                ptrdiff_t ld;
                const T* tile = K.tile(r0, rows, c0, cols, scratch.data(), ld);
                int r = 0;
                for (; r + 8 <= rows; r += 8)
                    fold_cols<T, 8>(tile + r * ld, ld, cols, bs.data() + r0 + r, s, Mt + c0, St + c0);
                for (; r < rows; ++r)
                    fold_cols<T, 1>(tile + r * ld, ld, cols, bs.data() + r0 + r, s, Mt + c0, St + c0);
            }
        }
#pragma omp for schedule(static)
        for (ptrdiff_t j = 0; j < m; ++j) {
            T mx = M[j];
            for (int t = 1; t < num_threads; ++t) mx = std::max(mx, M[size_t(t) * m + j]);
            T sum = 0;
            for (int t = 0; t < num_threads; ++t) sum += S[size_t(t) * m + j] * fast_exp2<T>(M[size_t(t) * m + j] - mx);
            out[j] = finish_lse(mx, sum);
        }
    }
}

}  // namespace sotalign
