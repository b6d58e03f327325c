// Branch-free exp2 for float and double that GCC vectorises inside `omp simd` loops (given
// -fno-trapping-math, checked below).
//
// 2^x = 2^k · 2^r with k = round(x), r = x − k ∈ [−½, ½]:
//   * k is found with the "magic number" trick: adding 1.5·2^p (p = mantissa bits) rounds x
//     to an integer held in the low mantissa bits, so no float→int conversion is needed
//     (AVX2 has none for doubles);
//   * 2^r is a Chebyshev (near-minimax) polynomial, degree 6 (float) / 11 (double), ≲ 1 ulp;
//   * 2^k is applied by adding k to the exponent field of 2^r.
// Inputs below emin + 1 return exactly 0 (so exp2(−inf) = 0, never NaN; the bound keeps
// 2^k · 2^r a normal number); inputs above emax are clamped to a huge finite value.
#pragma once

#if defined(__FAST_MATH__)
#error "fast_exp2 needs IEEE rounding: -ffast-math would fold (x + magic) - magic into x"
#endif
#if defined(__GNUC__) && !defined(__clang__) && !defined(__NO_TRAPPING_MATH__)
// Without it GCC will not if-convert the clamp and the underflow select, and every loop that
// calls fast_exp2 stays scalar: a 4x slower half-step.
#error "build with -fno-trapping-math: GCC does not vectorise fast_exp2 without it"
#endif

#include <cstdint>
#include <cstring>

namespace sotalign {

constexpr double kLog2e = 1.4426950408889634074;
constexpr double kLn2 = 0.69314718055994530942;

template <class T> struct Exp2Traits;

template <> struct Exp2Traits<float> {
    using Bits = uint32_t;
    static constexpr int kMantissa = 23;
    static constexpr float kLo = -125.0f, kHi = 127.0f;
    static constexpr float kMagic = 12582912.0f;  // 1.5 · 2^23
    static inline float poly(float r) {
        return 1.0f + r * (0.6931471824645996f + r * (0.24022650718688965f
             + r * (0.05550327152013779f + r * (0.009618056938052177f
             + r * (0.0013400427997112274f + r * 0.00015461444854736328f)))));
    }
};

template <> struct Exp2Traits<double> {
    using Bits = uint64_t;
    static constexpr int kMantissa = 52;
    static constexpr double kLo = -1021.0, kHi = 1023.0;
    static constexpr double kMagic = 6755399441055744.0;  // 1.5 · 2^52
    static inline double poly(double r) {
        return 1.0 + r * (0.6931471805599453 + r * (0.24022650695910158
             + r * (0.055504108664821625 + r * (0.009618129107587256
             + r * (0.001333355814640647 + r * (0.00015403530463724353
             + r * (1.5252733841556773e-05 + r * (1.3215432535912375e-06
             + r * (1.0178057087733941e-07 + r * (7.074194297288521e-09
             + r * 4.4558179083360645e-10))))))))));
    }
};

template <class T>
inline T fast_exp2(T x) {
    using Tr = Exp2Traits<T>;
    using Bits = typename Tr::Bits;
    const T xc = x < Tr::kLo ? Tr::kLo : (x > Tr::kHi ? Tr::kHi : x);
    const T shifted = xc + Tr::kMagic;           // round-to-nearest puts k in the low bits
    const T k = shifted - Tr::kMagic;
    const T p = Tr::poly(xc - k);
    Bits kb, pb;
    std::memcpy(&kb, &shifted, sizeof kb);
    std::memcpy(&pb, &p, sizeof pb);
    pb += kb << Tr::kMantissa;                   // the magic's own bits shift out of the word
    T out;
    std::memcpy(&out, &pb, sizeof out);
    return x < Tr::kLo ? T(0) : out;
}

template <class T>
inline T fast_exp(T x) {
    return fast_exp2<T>(x * T(kLog2e));
}

}  // namespace sotalign
