// Fused KLOT passes between a student plan P and a teacher plan P*:
//
//   log P_ij = (f_i + g_j + K_ij) / ε,        log P*_ij = (f*_i + g*_j + K*_ij) / ε*,
//   value = Σ_ij P*_ij (log P*_ij − log P_ij),   G = (P − P*) / ε.
//
// Both affinities share n and m and are streamed tile by tile, so an online (feature) affinity
// never needs an n×m buffer.
#pragma once

#include <limits>
#include <vector>

#include <omp.h>

#include "affinity.hpp"
#include "fast_exp.hpp"

namespace sotalign {

constexpr int kGradTileRows = 96;

// The value, accumulated in double: each term P*_ij (log P*_ij − log P_ij) is formed from
// double log-plans (the two sums taken apart cancel catastrophically at small ε). Only the
// first problem of K and K* is read (KLOT takes one problem).
template <class T>
double klot_value(const AffinitySource<T>& K, const T* f, const T* g, double eps,
                  const AffinitySource<T>& Kt, const T* ft, const T* gt, double eps_t, int num_threads) {
    const ptrdiff_t n = K.n, m = K.m;
    const ptrdiff_t tc = std::min(K.tile_cols(), Kt.tile_cols());
    std::vector<double> fs(n), fts(n), gs(m), gts(m);
    for (ptrdiff_t i = 0; i < n; ++i) { fs[i] = f[i] / eps; fts[i] = ft[i] / eps_t; }
    for (ptrdiff_t j = 0; j < m; ++j) { gs[j] = g[j] / eps; gts[j] = gt[j] / eps_t; }
    const double inv = 1.0 / eps, inv_t = 1.0 / eps_t;
    const ptrdiff_t blocks = (n + kTileRows - 1) / kTileRows;
    double total = 0.0;
#pragma omp parallel num_threads(useful_threads(n * m, num_threads)) reduction(+ : total)
    {
        std::vector<T> scratch(K.scratch_size()), scratch_t(Kt.scratch_size());
#pragma omp for schedule(dynamic, 1)
        for (ptrdiff_t b = 0; b < blocks; ++b) {
            const ptrdiff_t r0 = b * kTileRows;
            const int rows = int(std::min<ptrdiff_t>(kTileRows, n - r0));
            for (ptrdiff_t c0 = 0; c0 < m; c0 += tc) {
                const ptrdiff_t cols = std::min(tc, m - c0);
                ptrdiff_t ld, ld_t;
                const T* k = K.tile(0, r0, rows, c0, cols, scratch.data(), ld);
                const T* kt = Kt.tile(0, r0, rows, c0, cols, scratch_t.data(), ld_t);
                for (int r = 0; r < rows; ++r) {
                    const T* __restrict krow = k + r * ld;
                    const T* __restrict ktrow = kt + r * ld_t;
                    const double* __restrict gsc = gs.data() + c0;
                    const double* __restrict gtsc = gts.data() + c0;
                    const double a = fs[r0 + r], at = fts[r0 + r];
                    double acc = 0.0;
#pragma omp simd reduction(+ : acc)
                    for (ptrdiff_t j = 0; j < cols; ++j) {
                        const double log_p = double(krow[j]) * inv + (a + gsc[j]);
                        const double log_pt = double(ktrow[j]) * inv_t + (at + gtsc[j]);
                        // P* = 0 (a zero weight) adds 0, not 0 · (−inf − log P) = NaN
                        const double term = fast_exp<double>(log_pt) * (log_pt - log_p);
                        acc += log_pt == -std::numeric_limits<double>::infinity() ? 0.0 : term;
                    }
                    total += acc;
                }
            }
        }
    }
    return total;
}

// One tile of G = (P − P*) / ε in the input precision, in base 2: P = 2^(K·s + fs_i + gs_j)
// with s = log2(e)/ε and fs = f·s, gs = g·s (likewise for the teacher).
template <class T>
struct PlanDifference {
    std::vector<T> fs, gs, fts, gts;
    T s, s_t, inv_eps;

    PlanDifference(ptrdiff_t n, ptrdiff_t m, const T* f, const T* g, T eps,
                   const T* ft, const T* gt, T eps_t)
        : fs(n), gs(m), fts(n), gts(m), s(T(kLog2e) / eps), s_t(T(kLog2e) / eps_t), inv_eps(T(1) / eps) {
        for (ptrdiff_t i = 0; i < n; ++i) { fs[i] = f[i] * s; fts[i] = ft[i] * s_t; }
        for (ptrdiff_t j = 0; j < m; ++j) { gs[j] = g[j] * s; gts[j] = gt[j] * s_t; }
    }

    void row(ptrdiff_t i, ptrdiff_t c0, ptrdiff_t cols, const T* __restrict k, const T* __restrict kt,
             T* __restrict out) const {
        const T a = fs[i], at = fts[i], sc = s, sc_t = s_t, inv = inv_eps;  // locals: no aliasing with out
        const T* __restrict gsc = gs.data() + c0;
        const T* __restrict gtsc = gts.data() + c0;
#pragma omp simd
        for (ptrdiff_t j = 0; j < cols; ++j)
            out[j] = (fast_exp2<T>(k[j] * sc + (a + gsc[j])) - fast_exp2<T>(kt[j] * sc_t + (at + gtsc[j]))) * inv;
    }
};

// G = (P − P*) / ε for stored K and K* (n×m output).
template <class T>
void klot_grad_dense(const T* K, const T* f, const T* g, T eps, const T* Kt, const T* ft, const T* gt,
                     T eps_t, ptrdiff_t n, ptrdiff_t m, T* G, int num_threads) {
    const PlanDifference<T> diff(n, m, f, g, eps, ft, gt, eps_t);
#pragma omp parallel for num_threads(useful_threads(n * m, num_threads)) schedule(dynamic, 16)
    for (ptrdiff_t i = 0; i < n; ++i) diff.row(i, 0, m, K + i * m, Kt + i * m, G + i * m);
}

// (G y, Gᵀ x) for a student K = x yᵀ (x: n×d, y: m×d) and any teacher K*, with G formed one
// tile at a time. x and y are copied with rows zero-padded to a multiple of the register width
// so every product runs on full vectors; Gᵀx is accumulated per thread, then reduced.
template <class T>
void klot_grad_features(const T* x, const T* y, ptrdiff_t d, const T* f, const T* g, T eps,
                        const AffinitySource<T>& Kt, const T* ft, const T* gt, T eps_t,
                        T* gy, T* gtx, int num_threads) {
    const ptrdiff_t n = Kt.n, m = Kt.m, dp = round_up(d, kW<T>);
    AffinitySource<T> K = AffinitySource<T>::features(x, y, n, m, d);
    K.pack();
    const PlanDifference<T> diff(n, m, f, g, eps, ft, gt, eps_t);
    std::vector<T> xp(size_t(n * dp), T(0)), yp(size_t(m * dp), T(0));
    for (ptrdiff_t i = 0; i < n; ++i) std::copy(x + i * d, x + (i + 1) * d, xp.begin() + i * dp);
    for (ptrdiff_t j = 0; j < m; ++j) std::copy(y + j * d, y + (j + 1) * d, yp.begin() + j * dp);

    // Taller row blocks than the forward passes: every block adds its Gᵀx contribution into the
    // whole m×d partial, so more rows per block means fewer passes over that partial.
    constexpr int kRows = kGradTileRows;
    const ptrdiff_t tc = kTileCols;  // the student tiles are recomputed, so always cache-sized
    const ptrdiff_t blocks = (n + kRows - 1) / kRows;
    num_threads = useful_threads(n * m, int(std::min<ptrdiff_t>(num_threads, blocks)));
    std::vector<T> gtx_partial(size_t(num_threads) * m * dp, T(0));
#pragma omp parallel num_threads(num_threads)
    {
        std::vector<T> scratch(K.scratch_size(kRows)), scratch_t(Kt.scratch_size(kRows));
        std::vector<T> G(size_t(kRows) * tc), gy_rows(size_t(kRows) * dp);
        T* gtx_t = gtx_partial.data() + size_t(omp_get_thread_num()) * m * dp;
#pragma omp for schedule(dynamic, 1)
        for (ptrdiff_t b = 0; b < blocks; ++b) {
            const ptrdiff_t r0 = b * kRows;
            const int rows = int(std::min<ptrdiff_t>(kRows, n - r0));
            std::fill(gy_rows.begin(), gy_rows.end(), T(0));
            for (ptrdiff_t c0 = 0; c0 < m; c0 += tc) {
                const ptrdiff_t cols = std::min(tc, m - c0);
                ptrdiff_t ld, ld_t;
                const T* k = K.tile(0, r0, rows, c0, cols, scratch.data(), ld);
                const T* kt = Kt.tile(0, r0, rows, c0, cols, scratch_t.data(), ld_t);
                for (int r = 0; r < rows; ++r) diff.row(r0 + r, c0, cols, k + r * ld, kt + r * ld_t, G.data() + r * tc);
                // G y: rows × dp += G[rows × cols] · y[c0 : c0+cols]
                gemm_accumulate<T>(rows, dp, cols, G.data(), tc, 1, yp.data() + c0 * dp, dp, gy_rows.data(), dp);
                // Gᵀ x: cols × dp += Gᵀ[cols × rows] · x[r0 : r0+rows]
                gemm_accumulate<T>(int(cols), dp, rows, G.data(), 1, tc, xp.data() + r0 * dp, dp, gtx_t + c0 * dp, dp);
            }
            for (int r = 0; r < rows; ++r)
                std::copy(gy_rows.begin() + r * dp, gy_rows.begin() + r * dp + d, gy + (r0 + r) * d);
        }
#pragma omp for schedule(static)
        for (ptrdiff_t j = 0; j < m; ++j)
            for (ptrdiff_t k = 0; k < d; ++k) {
                T sum = 0;
                for (int t = 0; t < num_threads; ++t) sum += gtx_partial[(size_t(t) * m + j) * dp + k];
                gtx[j * d + k] = sum;
            }
    }
}

}  // namespace sotalign
