// Half-steps of a stored K in the scaling domain, for the iterations of one solve at one ε.
//
// With s = log2(e)/ε, k_p = max K_p · s and E = 2^(K·s − k_p) formed once (so E ≤ 1),
//
//   LSE_j (K_ij + bias_j)/ε = ln2 · (k_p + B + log2 Σ_j E_ij w_j),   w_j = 2^(bias_j·s − B),
//
// with B = max_j bias_j·s: a multiply-add per entry instead of an exp2 (a matrix-vector
// product, bound by reading E). It is exact up to rounding while every sum Σ_j E_ij w_j is at
// least kTiny: the terms it loses (E or w below the smallest normal number) add less than
// m · 2^(emin) to it, far below its last bit. A half-step returns false when some sum is
// smaller (its terms all lie far below the shifts), and the caller redoes it in the log domain.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

#include <omp.h>

#include "affinity.hpp"
#include "fast_exp.hpp"
#include "lse.hpp"

namespace sotalign {

template <class T> struct ScaledTraits;
template <> struct ScaledTraits<float> { static constexpr float kTiny = 0x1p-50f; };
template <> struct ScaledTraits<double> { static constexpr double kTiny = 0x1p-500; };

// E_p = 2^(K_p·s − shift_p) with shift_p = max K_p · s (0 when K_p is all −inf).
template <class T>
void exponentiate(const T* K, ptrdiff_t batch, ptrdiff_t n, ptrdiff_t m, T eps, T* E, T* shift, int num_threads) {
    const T s = T(kLog2e) / eps;
    const ptrdiff_t size = n * m;
    for (ptrdiff_t p = 0; p < batch; ++p) {
        const T* Kp = K + p * size;
        T* Ep = E + p * size;
        T mx = -std::numeric_limits<T>::infinity();
        const int threads = useful_threads(size, num_threads);
#pragma omp parallel for simd num_threads(threads) schedule(static) reduction(max : mx)
        for (ptrdiff_t k = 0; k < size; ++k) mx = vmax(mx, Kp[k]);
        const T sp = safe_shift(mx * s);
#pragma omp parallel for simd num_threads(threads) schedule(static)
        for (ptrdiff_t k = 0; k < size; ++k) Ep[k] = fast_exp2<T>(Kp[k] * s - sp);
        shift[p] = sp;
    }
}

// B_p = max_k bias[p, k]·s (−inf when every bias is) and w[p, k] = 2^(bias[p, k]·s − B_p)
// (all 0 then).
template <class T>
void scaled_weights(const T* bias, ptrdiff_t batch, ptrdiff_t size, T s, T* w, T* B) {
    for (ptrdiff_t p = 0; p < batch; ++p) {
        const T* b = bias + p * size;
        T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
        for (ptrdiff_t k = 0; k < size; ++k) mx = vmax(mx, b[k] * s);
        B[p] = mx;
        const T shift = safe_shift(mx);
#pragma omp simd
        for (ptrdiff_t k = 0; k < size; ++k) w[p * size + k] = fast_exp2<T>(b[k] * s - shift);
    }
}

// ln Σ 2^t from a scaled sum; false when the sum is too small to trust (see above). When every
// bias is −inf (B = −inf) the LSE is −inf, as in the log domain.
template <class T>
inline bool finish_scaled(T sum, T shift, T B, T& lse) {
    if (B == -std::numeric_limits<T>::infinity()) {
        lse = B;
        return true;
    }
    lse = T(kLn2) * (shift + B + std::log2(sum));
    return sum >= ScaledTraits<T>::kTiny;
}

// out[p, i] = epilogue(LSE_j (K_p[i, j] + bias[p, j]) / ε) from E (see the top of the file).
template <class T>
bool scaled_rows(const T* E, const T* shift, ptrdiff_t batch, ptrdiff_t n, ptrdiff_t m, const T* bias, T eps,
                 Epilogue<T> epilogue, T* out, int num_threads) {
    const T s = T(kLog2e) / eps;
    std::unique_ptr<T[]> w(new T[size_t(batch * m)]), B(new T[size_t(batch)]);
    scaled_weights(bias, batch, m, s, w.get(), B.get());
    bool trusted = true;
#pragma omp parallel for num_threads(useful_threads(batch * n * m, num_threads)) schedule(static) \
    reduction(&& : trusted)
    for (ptrdiff_t row = 0; row < batch * n; ++row) {
        const ptrdiff_t p = row / n;
        const T* e = E + row * m;
        const T* wp = w.get() + p * m;
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (ptrdiff_t j = 0; j < m; ++j) sum += e[j] * wp[j];
        T lse;
        trusted = finish_scaled(sum, shift[p], B[p], lse) && trusted;
        out[row] = epilogue(row, lse);
    }
    return trusted;
}

// out[p, j] = epilogue(LSE_i (K_p[i, j] + bias[p, i]) / ε) from E: each thread adds its rows'
// w_i E_i· into its own column sums, merged once at the end.
template <class T>
bool scaled_cols(const T* E, const T* shift, ptrdiff_t batch, ptrdiff_t n, ptrdiff_t m, const T* bias, T eps,
                 Epilogue<T> epilogue, T* out, int num_threads) {
    const T s = T(kLog2e) / eps;
    const ptrdiff_t columns = batch * m;
    std::unique_ptr<T[]> w(new T[size_t(batch * n)]), B(new T[size_t(batch)]);
    scaled_weights(bias, batch, n, s, w.get(), B.get());
    const int threads = useful_threads(batch * n * m, num_threads);
    std::unique_ptr<T[]> partial(new T[size_t(threads * columns)]());
    bool trusted = true;
#pragma omp parallel num_threads(threads)
    {
        T* mine = partial.get() + omp_get_thread_num() * columns;
#pragma omp for schedule(static)
        for (ptrdiff_t row = 0; row < batch * n; ++row) {
            const T wi = w[row];
            if (wi == T(0)) continue;
            const T* e = E + row * m;
            T* acc = mine + (row / n) * m;
#pragma omp simd
            for (ptrdiff_t j = 0; j < m; ++j) acc[j] += wi * e[j];
        }
#pragma omp for schedule(static) reduction(&& : trusted)
        for (ptrdiff_t k = 0; k < columns; ++k) {
            T sum = 0;
            for (int t = 0; t < threads; ++t) sum += partial[t * columns + k];
            const ptrdiff_t p = k / m;
            T lse;
            trusted = finish_scaled(sum, shift[p], B[p], lse) && trusted;
            out[k] = epilogue(k, lse);
        }
    }
    return trusted;
}

}  // namespace sotalign
