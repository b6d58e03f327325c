// Tiles of an affinity K (n×m), read from a stored matrix or recomputed as K = x yᵀ.
//
// The recomputation is a small register-blocked GEMM: a micro-kernel keeps a kMR × (NV·W)
// block of accumulators in vector registers (W lanes per register) and streams the shared
// dimension, broadcasting one A entry per row against NV vectors of B. The same micro-kernel
// also serves the gradient products G·y and Gᵀ·x (A may be read row- or column-wise).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>

namespace sotalign {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
constexpr int kMaxNV = 4;  // 6×4 accumulators + 4 B vectors fit the 32 zmm registers
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
constexpr int kMaxNV = 2;  // 6×2 accumulators + 2 B vectors fit the 16 ymm registers
#else
constexpr int kVecBytes = 16;  // portable SSE2 build (SOTALIGN_NO_NATIVE=1)
constexpr int kMaxNV = 2;
#endif
constexpr int kMR = 6;          // micro-kernel rows
constexpr int kTileRows = 24;   // rows of a K tile (4 micro-kernel rows)
constexpr int kTileCols = 256;  // columns of a recomputed K tile

template <class T> struct Vec;
template <> struct Vec<float> { typedef float type __attribute__((vector_size(kVecBytes))); };
template <> struct Vec<double> { typedef double type __attribute__((vector_size(kVecBytes))); };

template <class T> constexpr int kW = kVecBytes / int(sizeof(T));  // lanes per register
template <class T> constexpr int kNR = kMaxNV * kW<T>;              // packed panel width

template <class V, class T> inline V vload(const T* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
template <class V, class T> inline void vstore(T* p, const V& v) { std::memcpy(p, &v, sizeof v); }

inline ptrdiff_t round_up(ptrdiff_t a, ptrdiff_t b) { return (a + b - 1) / b * b; }

// Threads worth starting for `entries` entries of K: small problems run on one thread, where
// a parallel region's start and barrier would cost more than the work (and far more when the
// cores are shared with other processes).
inline int useful_threads(ptrdiff_t entries, int requested) {
    constexpr ptrdiff_t kEntriesPerThread = ptrdiff_t(1) << 16;
    return int(std::max<ptrdiff_t>(1, std::min<ptrdiff_t>(requested, entries / kEntriesPerThread)));
}

// C[r, 0:NV·W] (+)= Σ_{l<L} A[r, l] · B[l, 0:NV·W] for r < rows ≤ kMR, where A[r, l] is
// A[r·a_rs + l·a_cs] and row l of B starts at B + l·ldb.
template <class T, int NV>
inline void micro_kernel(ptrdiff_t L, const T* A, ptrdiff_t a_rs, ptrdiff_t a_cs, int rows,
                         const T* B, ptrdiff_t ldb, T* C, ptrdiff_t ldc, bool accumulate) {
    using V = typename Vec<T>::type;
    constexpr int W = kW<T>;
    const T* a[kMR];
    for (int r = 0; r < kMR; ++r) a[r] = A + std::min(r, rows - 1) * a_rs;  // pad by repeating
    V acc[kMR][NV] = {};
    for (ptrdiff_t l = 0; l < L; ++l) {
        V b[NV];
        for (int v = 0; v < NV; ++v) b[v] = vload<V>(B + l * ldb + v * W);
        for (int r = 0; r < kMR; ++r) {
            const T s = a[r][l * a_cs];
            for (int v = 0; v < NV; ++v) acc[r][v] += s * b[v];
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < NV; ++v) {
            T* c = C + r * ldc + v * W;
            vstore(c, accumulate ? V(vload<V>(c) + acc[r][v]) : acc[r][v]);
        }
}

// The same with a runtime number of vectors 1 ≤ nv ≤ kMaxNV (for the tail of a padded row).
template <class T>
inline void micro_kernel_nv(int nv, ptrdiff_t L, const T* A, ptrdiff_t a_rs, ptrdiff_t a_cs,
                            int rows, const T* B, ptrdiff_t ldb, T* C, ptrdiff_t ldc, bool accumulate) {
    switch (nv) {
        case 1: micro_kernel<T, 1>(L, A, a_rs, a_cs, rows, B, ldb, C, ldc, accumulate); break;
        case 2: micro_kernel<T, 2>(L, A, a_rs, a_cs, rows, B, ldb, C, ldc, accumulate); break;
        case 3: micro_kernel<T, 3>(L, A, a_rs, a_cs, rows, B, ldb, C, ldc, accumulate); break;
        default: micro_kernel<T, kMaxNV>(L, A, a_rs, a_cs, rows, B, ldb, C, ldc, accumulate); break;
    }
}

// C (rows × width, leading dim ldc) += A · B where A is rows × L (strides a_rs, a_cs), B is
// L × width with leading dim ldb, and width is a multiple of the register width.
template <class T>
inline void gemm_accumulate(int rows, ptrdiff_t width, ptrdiff_t L, const T* A, ptrdiff_t a_rs,
                            ptrdiff_t a_cs, const T* B, ptrdiff_t ldb, T* C, ptrdiff_t ldc) {
    constexpr int W = kW<T>;
    for (ptrdiff_t c = 0; c < width; c += kMaxNV * W) {
        const int nv = int(std::min<ptrdiff_t>(kMaxNV, (width - c) / W));
        for (int r = 0; r < rows; r += kMR)
            micro_kernel_nv<T>(nv, L, A + r * a_rs, a_rs, a_cs, std::min(kMR, rows - r),
                               B + c, ldb, C + r * ldc + c, ldc, true);
    }
}

// A batch of `batch` n×m affinities (one problem when batch = 1), problem p either stored
// row-major at dense + p·n·m, or K = x_p y_pᵀ with x_p = x + p·n·d, y_p = y + p·m·d. For features,
// y is packed (pack()) into zero-padded panels of kNR columns, panel[k][jj] = y[q·kNR + jj][k],
// so that the micro-kernel reads each k-row of a panel contiguously.
template <class T>
struct AffinitySource {
    ptrdiff_t batch = 1, n = 0, m = 0, d = 0;
    const T* dense = nullptr;
    const T* x = nullptr;
    const T* y = nullptr;
    std::unique_ptr<T[]> panels;  // not value-initialised: pack() writes every entry

    static AffinitySource stored(const T* K, ptrdiff_t n, ptrdiff_t m, ptrdiff_t batch = 1) {
        AffinitySource s;
        s.batch = batch; s.n = n; s.m = m; s.dense = K;
        return s;
    }

    // Call pack() before the first tile().
    static AffinitySource features(const T* x, const T* y, ptrdiff_t n, ptrdiff_t m, ptrdiff_t d,
                                   ptrdiff_t batch = 1) {
        AffinitySource s;
        s.batch = batch; s.n = n; s.m = m; s.d = d; s.x = x; s.y = y;
        s.panels.reset(new T[size_t(batch * s.panel_stride())]);
        return s;
    }

    bool is_dense() const { return dense != nullptr; }

    ptrdiff_t panels_per_problem() const { return (m + kNR<T> - 1) / kNR<T>; }
    ptrdiff_t panel_stride() const { return panels_per_problem() * d * kNR<T>; }

    // Packs y into panels (nothing to do for a stored K). Its loop is an orphaned `omp for`
    // without a barrier: inside a parallel region the threads share it (and must meet a barrier
    // before reading the panels); outside one it runs serially.
    void pack() {
        if (is_dense()) return;
        constexpr int NR = kNR<T>;
        const ptrdiff_t per_problem = panels_per_problem(), total = batch * per_problem;
#pragma omp for schedule(static) nowait
        for (ptrdiff_t q = 0; q < total; ++q) {
            const ptrdiff_t j0 = (q % per_problem) * NR, cols = std::min<ptrdiff_t>(NR, m - j0);
            const T* yp = y + (q / per_problem) * m * d;
            T* panel = panels.get() + q * d * NR;
            for (ptrdiff_t k = 0; k < d; ++k) {
                for (ptrdiff_t jj = 0; jj < cols; ++jj) panel[k * NR + jj] = yp[(j0 + jj) * d + k];
                for (ptrdiff_t jj = cols; jj < NR; ++jj) panel[k * NR + jj] = T(0);
            }
        }
    }

    // Width of the column tiles to stream: whole rows of a stored K, cache-sized tiles otherwise.
    ptrdiff_t tile_cols() const { return is_dense() ? m : kTileCols; }

    // Scratch a thread needs for tile() with up to max_rows rows (none when stored).
    size_t scratch_size(int max_rows = kTileRows) const { return is_dense() ? 0 : size_t(max_rows) * kTileCols; }

    // K_p[r0 : r0+rows, c0 : c0+cols] of problem p (for features c0 is a multiple of kTileCols
    // and cols ≤ kTileCols). Returns the tile and sets its leading dimension.
    const T* tile(ptrdiff_t p, ptrdiff_t r0, int rows, ptrdiff_t c0, ptrdiff_t cols, T* scratch,
                  ptrdiff_t& ld) const {
        if (is_dense()) {
            ld = m;
            return dense + (p * n + r0) * m + c0;
        }
        constexpr int NR = kNR<T>;
        ld = kTileCols;
        const T* xp = x + (p * n + r0) * d;
        const T* problem_panels = panels.get() + p * panel_stride();
        for (ptrdiff_t q = c0 / NR; q * NR < c0 + cols; ++q) {
            const T* panel = problem_panels + q * d * NR;
            for (int r = 0; r < rows; r += kMR)
                micro_kernel<T, kMaxNV>(d, xp + r * d, d, 1, std::min(kMR, rows - r),
                                        panel, NR, scratch + r * ld + (q * NR - c0), ld, false);
        }
        return scratch;
    }
};

}  // namespace sotalign
