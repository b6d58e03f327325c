// Python bindings of the CPU kernels (module sotalign._C). Every kernel exists for float32 and
// float64, releases the GIL while it computes, and takes the OpenMP thread count explicitly.
//
// The KLOT passes take numpy arrays (pybind11 picks the overload whose dtype matches exactly).
// The Sinkhorn half-steps, called hundreds of times per solve, take the data addresses of
// contiguous CPU tensors instead, in the submodules `float32` and `float64`: turning a torch
// tensor into a numpy array costs more than a whole half-step of a small problem. Their only
// caller, sotalign/kernels/cpu.py, checks every shape, dtype and layout before the call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>

#include "affinity.hpp"
#include "fast_exp.hpp"
#include "klot.hpp"
#include "lse.hpp"
#include "scaled.hpp"

namespace py = pybind11;
using namespace sotalign;

namespace {

template <class T>
using Array = py::array_t<T, py::array::c_style | py::array::forcecast>;

template <class T>
void check_shape(const Array<T>& a, std::initializer_list<ptrdiff_t> shape, const char* name) {
    bool ok = a.ndim() == ptrdiff_t(shape.size());
    ptrdiff_t axis = 0;
    for (ptrdiff_t s : shape) ok = ok && a.shape(axis++) == s;
    if (!ok) throw std::invalid_argument(std::string("sotalign._C: wrong shape for ") + name);
}

template <class T>
std::pair<ptrdiff_t, ptrdiff_t> matrix_shape(const Array<T>& a, const char* name) {
    if (a.ndim() != 2) throw std::invalid_argument(std::string("sotalign._C: ") + name + " must be 2-D");
    return {a.shape(0), a.shape(1)};
}

template <class T>
AffinitySource<T> dense_source(const Array<T>& K) {
    auto [n, m] = matrix_shape(K, "K");
    return AffinitySource<T>::stored(K.data(), n, m);
}

// Packing y is O(m·d) work, done with the GIL released.
// Packing y is O(m·d) work, done with the GIL released.
template <class T>
AffinitySource<T> feature_source(const Array<T>& x, const Array<T>& y) {
    auto [n, d] = matrix_shape(x, "x");
    check_shape(y, {y.ndim() == 2 ? y.shape(0) : -1, d}, "y (m×d, same d as x)");
    py::gil_scoped_release release;
    AffinitySource<T> source = AffinitySource<T>::features(x.data(), y.data(), n, y.shape(0), d);
    source.pack();
    return source;
}

template <class T>
Array<T> fast_exp2_array(const Array<T>& x, int num_threads) {
    Array<T> out(x.request().shape);
    const T* in = x.data();
    T* o = out.mutable_data();
    const ptrdiff_t size = x.size();
    {
        py::gil_scoped_release release;
#pragma omp parallel for simd num_threads(useful_threads(size, num_threads)) schedule(static)
        for (ptrdiff_t i = 0; i < size; ++i) o[i] = fast_exp2<T>(in[i]);
    }
    return out;
}

// A tensor's data address (Tensor.data_ptr()) as a pointer; 0 is the null pointer.
template <class T>
T* address(uintptr_t data_ptr) { return reinterpret_cast<T*>(data_ptr); }

// One half-step over a batch of affinities: lse_rows or lse_cols with the epilogue given by
// (log_w, coef); see sotalign/kernels/cpu.py for the arguments.
template <class T>
using HalfStep = void (*)(AffinitySource<T>&, const T*, T, Epilogue<T>, T*, int);

template <class T, HalfStep<T> kernel>
void bind_half_step(py::module_& m, const char* name, const char* doc) {
    m.def(std::string(name).append("_dense").c_str(),
          [](uintptr_t K, ptrdiff_t batch, ptrdiff_t n, ptrdiff_t cols, uintptr_t bias, double eps,
             uintptr_t log_w, double coef, uintptr_t out, int num_threads) {
              py::gil_scoped_release release;
              AffinitySource<T> source = AffinitySource<T>::stored(address<const T>(K), n, cols, batch);
              kernel(source, address<const T>(bias), T(eps), Epilogue<T>{address<const T>(log_w), T(coef)},
                     address<T>(out), num_threads);
          },
          py::arg("K"), py::arg("batch"), py::arg("n"), py::arg("m"), py::arg("bias"), py::arg("eps"),
          py::arg("log_w"), py::arg("coef"), py::arg("out"), py::arg("num_threads"), doc);
    m.def(std::string(name).append("_online").c_str(),
          [](uintptr_t x, uintptr_t y, ptrdiff_t batch, ptrdiff_t n, ptrdiff_t cols, ptrdiff_t d, uintptr_t bias,
             double eps, uintptr_t log_w, double coef, uintptr_t out, int num_threads) {
              py::gil_scoped_release release;
              AffinitySource<T> source =
                  AffinitySource<T>::features(address<const T>(x), address<const T>(y), n, cols, d, batch);
              kernel(source, address<const T>(bias), T(eps), Epilogue<T>{address<const T>(log_w), T(coef)},
                     address<T>(out), num_threads);
          },
          py::arg("x"), py::arg("y"), py::arg("batch"), py::arg("n"), py::arg("m"), py::arg("d"), py::arg("bias"),
          py::arg("eps"), py::arg("log_w"), py::arg("coef"), py::arg("out"), py::arg("num_threads"), doc);
}

// A scaled half-step (scaled.hpp) over E, n×m per problem; returns false when it must be
// redone in the log domain.
template <class T>
using ScaledHalfStep = bool (*)(const T*, const T*, ptrdiff_t, ptrdiff_t, ptrdiff_t, const T*, T, Epilogue<T>, T*,
                                int);

template <class T, ScaledHalfStep<T> kernel>
void bind_scaled_half_step(py::module_& m, const char* name, const char* doc) {
    m.def(name,
          [](uintptr_t E, uintptr_t shift, ptrdiff_t batch, ptrdiff_t n, ptrdiff_t cols, uintptr_t bias, double eps,
             uintptr_t log_w, double coef, uintptr_t out, int num_threads) {
              py::gil_scoped_release release;
              return kernel(address<const T>(E), address<const T>(shift), batch, n, cols, address<const T>(bias),
                            T(eps), Epilogue<T>{address<const T>(log_w), T(coef)}, address<T>(out), num_threads);
          },
          py::arg("E"), py::arg("shift"), py::arg("batch"), py::arg("n"), py::arg("m"), py::arg("bias"),
          py::arg("eps"), py::arg("log_w"), py::arg("coef"), py::arg("out"), py::arg("num_threads"), doc);
}

template <class T>
void bind_half_steps(py::module_& m) {
    m.def("exponentiate",
          [](uintptr_t K, ptrdiff_t batch, ptrdiff_t n, ptrdiff_t cols, double eps, uintptr_t E, uintptr_t shift,
             int num_threads) {
              py::gil_scoped_release release;
              exponentiate(address<const T>(K), batch, n, cols, T(eps), address<T>(E), address<T>(shift),
                           num_threads);
          },
          py::arg("K"), py::arg("batch"), py::arg("n"), py::arg("m"), py::arg("eps"), py::arg("E"),
          py::arg("shift"), py::arg("num_threads"),
          "E[p] = 2^(K[p]·s − shift[p]) with s = log2(e)/eps and shift[p] = max K[p] · s.");
    bind_scaled_half_step<T, scaled_rows<T>>(
        m, "scaled_rows", "lse_rows_dense from E = exponentiate(K) (false: redo it in the log domain).");
    bind_scaled_half_step<T, scaled_cols<T>>(
        m, "scaled_cols", "lse_cols_dense from E = exponentiate(K) (false: redo it in the log domain).");
    bind_half_step<T, lse_rows<T>>(
        m, "lse_rows",
        "out[p, i] = LSE_j (K[p, i, j] + bias[p, j]) / eps, or coef · (log_w[p, i] − that) when "
        "log_w is not 0, for a batch of K (stored, or x yᵀ recomputed tile by tile).");
    bind_half_step<T, lse_cols<T>>(
        m, "lse_cols",
        "out[p, j] = LSE_i (K[p, i, j] + bias[p, i]) / eps, or coef · (log_w[p, j] − that) when "
        "log_w is not 0, for a batch of K (stored, or x yᵀ recomputed tile by tile).");
}

template <class T>
void check_potentials(const AffinitySource<T>& K, const AffinitySource<T>& Kt, const Array<T>& f,
                      const Array<T>& g, const Array<T>& ft, const Array<T>& gt) {
    if (K.n != Kt.n || K.m != Kt.m) throw std::invalid_argument("sotalign._C: K and K_t differ in shape");
    check_shape(f, {K.n}, "f (n,)");
    check_shape(g, {K.m}, "g (m,)");
    check_shape(ft, {K.n}, "f_t (n,)");
    check_shape(gt, {K.m}, "g_t (m,)");
}

template <class T>
double klot_value_impl(const AffinitySource<T>& K, const Array<T>& f, const Array<T>& g, double eps,
                       const AffinitySource<T>& Kt, const Array<T>& ft, const Array<T>& gt, double eps_t,
                       int num_threads) {
    check_potentials(K, Kt, f, g, ft, gt);
    py::gil_scoped_release release;
    return klot_value<T>(K, f.data(), g.data(), eps, Kt, ft.data(), gt.data(), eps_t, num_threads);
}

template <class T>
py::tuple klot_grad_online_impl(const Array<T>& x, const Array<T>& y, const Array<T>& f, const Array<T>& g,
                                double eps, const AffinitySource<T>& Kt, const Array<T>& ft,
                                const Array<T>& gt, double eps_t, int num_threads) {
    auto [n, d] = matrix_shape(x, "x");
    check_shape(y, {Kt.m, d}, "y (m×d, same d as x)");
    const AffinitySource<T> shape_only = AffinitySource<T>::stored(nullptr, n, Kt.m);
    check_potentials(shape_only, Kt, f, g, ft, gt);
    Array<T> gy({n, d}), gtx({Kt.m, d});
    T* gy_data = gy.mutable_data();
    T* gtx_data = gtx.mutable_data();
    {
        py::gil_scoped_release release;
        klot_grad_features<T>(x.data(), y.data(), d, f.data(), g.data(), T(eps), Kt, ft.data(), gt.data(),
                              T(eps_t), gy_data, gtx_data, num_threads);
    }
    return py::make_tuple(gy, gtx);
}

template <class T>
void bind(py::module_& m) {
    m.def("fast_exp2", &fast_exp2_array<T>, py::arg("x"), py::arg("num_threads") = 1,
          "Elementwise 2^x with the vectorised exp2 of the kernels (for tests).");

    m.def("klot_value_dense",
          [](const Array<T>& K, const Array<T>& f, const Array<T>& g, double eps, const Array<T>& Kt,
             const Array<T>& ft, const Array<T>& gt, double eps_t, int nt) {
              return klot_value_impl<T>(dense_source(K), f, g, eps, dense_source(Kt), ft, gt, eps_t, nt);
          },
          py::arg("K"), py::arg("f"), py::arg("g"), py::arg("eps"), py::arg("K_t"), py::arg("f_t"),
          py::arg("g_t"), py::arg("eps_t"), py::arg("num_threads"),
          "Σ P*_ij (log P*_ij − log P_ij) in float64, for stored K and K_t.");
    m.def("klot_value_online",
          [](const Array<T>& x, const Array<T>& y, const Array<T>& f, const Array<T>& g, double eps,
             const Array<T>& xt, const Array<T>& yt, const Array<T>& ft, const Array<T>& gt, double eps_t,
             int nt) {
              return klot_value_impl<T>(feature_source(x, y), f, g, eps, feature_source(xt, yt), ft, gt,
                                        eps_t, nt);
          },
          py::arg("x"), py::arg("y"), py::arg("f"), py::arg("g"), py::arg("eps"), py::arg("x_t"),
          py::arg("y_t"), py::arg("f_t"), py::arg("g_t"), py::arg("eps_t"), py::arg("num_threads"),
          "Σ P*_ij (log P*_ij − log P_ij) in float64, for K = x yᵀ and K_t = x_t y_tᵀ.");

    m.def("klot_value_online_dense_teacher",
          [](const Array<T>& x, const Array<T>& y, const Array<T>& f, const Array<T>& g, double eps,
             const Array<T>& Kt, const Array<T>& ft, const Array<T>& gt, double eps_t, int nt) {
              return klot_value_impl<T>(feature_source(x, y), f, g, eps, dense_source(Kt), ft, gt, eps_t, nt);
          },
          py::arg("x"), py::arg("y"), py::arg("f"), py::arg("g"), py::arg("eps"), py::arg("K_t"),
          py::arg("f_t"), py::arg("g_t"), py::arg("eps_t"), py::arg("num_threads"),
          "Σ P*_ij (log P*_ij − log P_ij) in float64, for K = x yᵀ and a stored K_t.");

    m.def("klot_grad_dense",
          [](const Array<T>& K, const Array<T>& f, const Array<T>& g, double eps, const Array<T>& Kt,
             const Array<T>& ft, const Array<T>& gt, double eps_t, int nt) {
              const AffinitySource<T> s = dense_source(K), st = dense_source(Kt);
              check_potentials(s, st, f, g, ft, gt);
              Array<T> G({s.n, s.m});
              T* out = G.mutable_data();
              {
                  py::gil_scoped_release release;
                  klot_grad_dense<T>(K.data(), f.data(), g.data(), T(eps), Kt.data(), ft.data(), gt.data(),
                                     T(eps_t), s.n, s.m, out, nt);
              }
              return G;
          },
          py::arg("K"), py::arg("f"), py::arg("g"), py::arg("eps"), py::arg("K_t"), py::arg("f_t"),
          py::arg("g_t"), py::arg("eps_t"), py::arg("num_threads"),
          "G = (P − P*) / eps (n×m) for stored K and K_t.");
    m.def("klot_grad_online",
          [](const Array<T>& x, const Array<T>& y, const Array<T>& f, const Array<T>& g, double eps,
             const Array<T>& xt, const Array<T>& yt, const Array<T>& ft, const Array<T>& gt, double eps_t,
             int nt) {
              return klot_grad_online_impl<T>(x, y, f, g, eps, feature_source(xt, yt), ft, gt, eps_t, nt);
          },
          py::arg("x"), py::arg("y"), py::arg("f"), py::arg("g"), py::arg("eps"), py::arg("x_t"),
          py::arg("y_t"), py::arg("f_t"), py::arg("g_t"), py::arg("eps_t"), py::arg("num_threads"),
          "(G y, Gᵀ x) with G = (P − P*) / eps, K = x yᵀ and K_t = x_t y_tᵀ, G formed tile by tile.");
    m.def("klot_grad_online_dense_teacher",
          [](const Array<T>& x, const Array<T>& y, const Array<T>& f, const Array<T>& g, double eps,
             const Array<T>& Kt, const Array<T>& ft, const Array<T>& gt, double eps_t, int nt) {
              return klot_grad_online_impl<T>(x, y, f, g, eps, dense_source(Kt), ft, gt, eps_t, nt);
          },
          py::arg("x"), py::arg("y"), py::arg("f"), py::arg("g"), py::arg("eps"), py::arg("K_t"),
          py::arg("f_t"), py::arg("g_t"), py::arg("eps_t"), py::arg("num_threads"),
          "(G y, Gᵀ x) with G = (P − P*) / eps, K = x yᵀ and a stored K_t, G formed tile by tile.");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "sotalign CPU kernels: streaming log-sum-exp and fused KLOT passes (pybind11 + OpenMP).";
    bind<float>(m);
    bind<double>(m);
    py::module_ f32 = m.def_submodule("float32", "Sinkhorn half-steps on float32 data (addresses).");
    py::module_ f64 = m.def_submodule("float64", "Sinkhorn half-steps on float64 data (addresses).");
    bind_half_steps<float>(f32);
    bind_half_steps<double>(f64);
}
