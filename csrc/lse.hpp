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
#include <memory>

#include <omp.h>

#include "affinity.hpp"
#include "fast_exp.hpp"

namespace sotalign {

// max by value: std::max returns a reference, which turns a vector max into a masked load.
template <class T>
inline T vmax(T a, T b) { return a > b ? a : b; }

// The shift of a running maximum: the maximum itself, or 0 while every term so far is −inf
// (zero weights), so that 2^(t − shift) is 2^(−inf) = 0 rather than 2^(−inf + inf) = NaN.
template <class T>
inline T safe_shift(T max) { return max == -std::numeric_limits<T>::infinity() ? T(0) : max; }

// Folds cols entries of one row (t_j = row[j]·s + bs[j]) into its running (M, S).
template <class T>
inline void fold_row(const T* __restrict row, ptrdiff_t cols, const T* __restrict bs, T s, T& M, T& S) {
    T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
    for (ptrdiff_t j = 0; j < cols; ++j) mx = vmax(mx, row[j] * s + bs[j]);
    const T new_max = std::max(M, mx), shift = safe_shift(new_max);
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (ptrdiff_t j = 0; j < cols; ++j) sum += fast_exp2<T>(row[j] * s + bs[j] - shift);
    S = S * fast_exp2<T>(M - shift) + sum;
    M = new_max;
}

// Folds R rows of a tile into per-column running (M, S): the block maximum is taken first so
// that each column is rescaled once per R rows (R + 1 exponentials for R entries). Columns go
// in chunks, each step a flat loop over the chunk's columns: GCC does not vectorise an outer
// loop over columns whose body loops over rows.
template <class T, int R>
inline void fold_cols(const T* __restrict tile, ptrdiff_t ld, ptrdiff_t cols, const T* __restrict bs,
                      T s, T* __restrict M, T* __restrict S) {
    constexpr ptrdiff_t kChunk = 64;
    T block_max[kChunk], shift[kChunk];
    for (ptrdiff_t c0 = 0; c0 < cols; c0 += kChunk) {
        const ptrdiff_t width = std::min(kChunk, cols - c0);
        const T* __restrict t = tile + c0;
        T* __restrict Mc = M + c0;
        T* __restrict Sc = S + c0;
#pragma omp simd
        for (ptrdiff_t j = 0; j < width; ++j) block_max[j] = t[j] * s + bs[0];
        for (int r = 1; r < R; ++r) {
#pragma omp simd
            for (ptrdiff_t j = 0; j < width; ++j) block_max[j] = vmax(block_max[j], t[r * ld + j] * s + bs[r]);
        }
#pragma omp simd
        for (ptrdiff_t j = 0; j < width; ++j) {
            const T new_max = vmax(Mc[j], block_max[j]);
            shift[j] = safe_shift(new_max);
            Sc[j] *= fast_exp2<T>(Mc[j] - shift[j]);
            Mc[j] = new_max;
        }
        for (int r = 0; r < R; ++r) {
#pragma omp simd
            for (ptrdiff_t j = 0; j < width; ++j) Sc[j] += fast_exp2<T>(t[r * ld + j] * s + bs[r] - shift[j]);
        }
    }
}

// ln Σ 2^t from (M, S); −inf when every term was −inf (M = −inf, S = 0).
template <class T>
inline T finish_lse(T M, T S) { return T(kLn2) * (M + std::log2(S)); }

// What a half-step writes: the LSE itself, or the fused Sinkhorn update coef · (log_w − LSE)
// when log weights are given (coef = τ ε).
template <class T>
struct Epilogue {
    const T* log_w = nullptr;
    T coef = T(0);
    T operator()(ptrdiff_t k, T lse) const { return log_w ? coef * (log_w[k] - lse) : lse; }
};

// bs[k] = bias[k] · s for k < size, shared by the threads of the enclosing region (no barrier).
template <class T>
inline void scale_bias(const T* bias, T s, ptrdiff_t size, T* bs) {
#pragma omp for schedule(static) nowait
    for (ptrdiff_t k = 0; k < size; ++k) bs[k] = bias[k] * s;
}

// out[p, i] = epilogue(LSE_j (K_p[i, j] + bias[p, j]) / ε) for every problem p of the batch, in
// one parallel region over (problem, block of rows).
template <class T>
void lse_rows(AffinitySource<T>& K, const T* bias, T eps, Epilogue<T> epilogue, T* out, int num_threads) {
    const ptrdiff_t n = K.n, m = K.m, tc = K.tile_cols();
    const T s = T(kLog2e) / eps;
    std::unique_ptr<T[]> bs(new T[size_t(K.batch * m)]);
    const ptrdiff_t blocks = (n + kTileRows - 1) / kTileRows, items = K.batch * blocks;
#pragma omp parallel num_threads(useful_threads(K.batch * n * m, num_threads))
    {
        scale_bias(bias, s, K.batch * m, bs.get());
        K.pack();
#pragma omp barrier
        const std::unique_ptr<T[]> scratch(new T[K.scratch_size()]);  // no zero fill: tile() writes it
#pragma omp for schedule(dynamic, 1)
        for (ptrdiff_t item = 0; item < items; ++item) {
            const ptrdiff_t p = item / blocks, r0 = (item % blocks) * kTileRows;
            const int rows = int(std::min<ptrdiff_t>(kTileRows, n - r0));
            T M[kTileRows], S[kTileRows];
            std::fill(M, M + rows, -std::numeric_limits<T>::infinity());
            std::fill(S, S + rows, T(0));
            for (ptrdiff_t c0 = 0; c0 < m; c0 += tc) {
                const ptrdiff_t cols = std::min(tc, m - c0);
                ptrdiff_t ld;
                const T* tile = K.tile(p, r0, rows, c0, cols, scratch.get(), ld);
                const T* bias_cols = bs.get() + p * m + c0;
                for (int r = 0; r < rows; ++r) fold_row(tile + r * ld, cols, bias_cols, s, M[r], S[r]);
            }
            for (int r = 0; r < rows; ++r) {
                const ptrdiff_t k = p * n + r0 + r;
                out[k] = epilogue(k, finish_lse(M[r], S[r]));
            }
        }
    }
}

// out[p, j] = epilogue(LSE_i (K_p[i, j] + bias[p, i]) / ε) for every problem p of the batch, in
// one parallel region over (problem, block of rows): each thread folds its blocks into its own
// running (M, S) over all B·m columns, and the partials are merged once at the end.
template <class T>
void lse_cols(AffinitySource<T>& K, const T* bias, T eps, Epilogue<T> epilogue, T* out, int num_threads) {
    const ptrdiff_t n = K.n, m = K.m, tc = K.tile_cols(), columns = K.batch * m;
    const T s = T(kLog2e) / eps;
    std::unique_ptr<T[]> bs(new T[size_t(K.batch * n)]);
    const ptrdiff_t blocks = (n + kTileRows - 1) / kTileRows, items = K.batch * blocks;
    num_threads = useful_threads(K.batch * n * m, int(std::min<ptrdiff_t>(num_threads, items)));
    std::unique_ptr<T[]> M(new T[size_t(num_threads * columns)]), S(new T[size_t(num_threads * columns)]);
#pragma omp parallel num_threads(num_threads)
    {
        scale_bias(bias, s, K.batch * n, bs.get());
        T* Mt = M.get() + omp_get_thread_num() * columns;
        T* St = S.get() + omp_get_thread_num() * columns;
        std::fill(Mt, Mt + columns, -std::numeric_limits<T>::infinity());
        std::fill(St, St + columns, T(0));
        K.pack();
#pragma omp barrier
        const std::unique_ptr<T[]> scratch(new T[K.scratch_size()]);  // no zero fill: tile() writes it
#pragma omp for schedule(dynamic, 2)  // dynamic: a thread that is preempted holds back little
        for (ptrdiff_t item = 0; item < items; ++item) {
            const ptrdiff_t p = item / blocks, r0 = (item % blocks) * kTileRows;
            const int rows = int(std::min<ptrdiff_t>(kTileRows, n - r0));
            const T* bias_rows = bs.get() + p * n + r0;
            for (ptrdiff_t c0 = 0; c0 < m; c0 += tc) {
                const ptrdiff_t cols = std::min(tc, m - c0);
                ptrdiff_t ld;
                const T* tile = K.tile(p, r0, rows, c0, cols, scratch.get(), ld);
                T* Mc = Mt + p * m + c0;
                T* Sc = St + p * m + c0;
                int r = 0;
                for (; r + 8 <= rows; r += 8) fold_cols<T, 8>(tile + r * ld, ld, cols, bias_rows + r, s, Mc, Sc);
                for (; r < rows; ++r) fold_cols<T, 1>(tile + r * ld, ld, cols, bias_rows + r, s, Mc, Sc);
            }
        }
#pragma omp for schedule(static)
        for (ptrdiff_t k = 0; k < columns; ++k) {
            T mx = M[k];
            for (int t = 1; t < num_threads; ++t) mx = std::max(mx, M[t * columns + k]);
            const T shift = safe_shift(mx);
            T sum = 0;
            for (int t = 0; t < num_threads; ++t) sum += S[t * columns + k] * fast_exp2<T>(M[t * columns + k] - shift);
            out[k] = epilogue(k, finish_lse(mx, sum));
        }
    }
}

}  // namespace sotalign
